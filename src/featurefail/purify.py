"""Purification: move features toward high GMM likelihood and classify again (paper Appendix B, Eq. 8–9).

    F* = argmin_F  BPD(F) + ν ‖F − F_ref‖²,   by   F ← F − ε (∇_F BPD(F) + 2ν (F − F_ref))

for a fixed number of steps, each step backtracked until J = BPD + ν‖F − F_ref‖² decreases, then logits = W F* + b
with the classifier head (or a head you pass). Nothing flows back into the model or the GMM: only the features
are optimised.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .features import Features
from .scorers.gmm import GMMScorer
from .scorers.per_layer import PerLayer

__all__ = ["GridRow", "PurificationGrid", "PurifyResult", "bpd_gradient", "purification_grid", "purify"]

Head = Callable[[torch.Tensor], torch.Tensor] | tuple[torch.Tensor, torch.Tensor]


@dataclass
class PurifyResult:
    """Output of :func:`purify`.

    Attributes:
        features: ``(N, D)`` purified features ``F*``.
        logits: ``(N, C)`` head logits of ``F*``.
        predictions: ``(N,)`` argmax of ``logits``.
        original_predictions: ``(N,)`` predictions of the head on the unpurified features.
        distance: ``(N,)`` ``‖F* − F_ref‖₂``, how far each feature moved.
        bpd_before, bpd_after: ``(N,)`` bits per dimension of ``F_ref`` and ``F*``.
        bpd_history: ``(steps + 1, N)`` BPD after each step, when requested.
        finite: ``(N,)`` bool, False for rows holding NaN or infinity (not purified; prediction ``-1``).
    """

    features: torch.Tensor
    logits: torch.Tensor
    predictions: torch.Tensor
    original_predictions: torch.Tensor
    distance: torch.Tensor
    bpd_before: torch.Tensor
    bpd_after: torch.Tensor
    bpd_history: torch.Tensor | None = None
    finite: torch.Tensor | None = None


def bpd_gradient(density: nn.Module, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``BPD(F)`` and ``∇_F BPD(F)`` row by row: ``(N, D) -> (N,), (N, D)``; the density gets no gradient.

    ``density`` is a module ``(feats, logits) -> -BPD`` such as ``GMMScorer.bpd_module()``.
    """
    f = feats.detach().requires_grad_(True)
    with torch.enable_grad():
        bpd = -density(f, None)
        (grad,) = torch.autograd.grad(bpd.sum(), f)
    return bpd.detach(), grad


def _density_and_head(detector: Any, head: Head | None) -> tuple[nn.Module, Head, slice]:
    """The penultimate block's density (``-BPD`` module), the head re-classifying it, and its columns."""
    scorer = detector.scorer_
    layers = detector.layers_
    columns = slice(None)
    if isinstance(scorer, PerLayer):
        first_is_penultimate = layers is None or (isinstance(layers, list) and layers[0] is None)
        if not first_is_penultimate and len(scorer.parts_) > 1:
            raise ValueError(
                f"purify works on the penultimate layer's mixture; this detector's first layer is {layers[0]!r}"
            )
        columns = scorer.block_slices()[0]
        scorer = scorer.parts_[0]
    elif isinstance(layers, list) and len(layers) > 1:
        raise ValueError(
            f"this detector models the concatenation of several layers ({layers}) with one mixture, which has no "
            "density of the penultimate features alone; use per_layer=True (the default detector) or layer=None"
        )
    if not isinstance(scorer, GMMScorer):
        raise ValueError(f"purify needs a density of the features: the GMM scorer, not {scorer.name!r}")
    if head is None:
        if detector.head_weight_ is None:
            raise ValueError(
                "the hooked layer is not the input of the classifier head, so there is no head to re-classify "
                "with; pass head=callable mapping features (N, D) to logits (N, C), or head=(weight, bias)"
            )
        head = (detector.head_weight_, detector.head_bias_)
    if isinstance(head, tuple | list):  # (weight (C, D), bias (C,)), as fit_features takes it
        if not (len(head) == 2 and all(isinstance(t, torch.Tensor) for t in head)):
            raise TypeError("head must be a callable features -> logits or a pair of tensors (weight, bias)")
        weight, bias = head

        def linear_head(f: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(f, weight.to(f), bias.to(f))

        head = linear_head
    elif not callable(head):
        raise TypeError(f"head must be a callable features -> logits or (weight, bias), got {type(head).__name__}")
    return scorer.bpd_module(), head, columns


def purify(
    detector: Any,
    x_or_features: Any,
    lr: float = 0.1,
    nu: float = 0.01,
    steps: int = 100,
    *,
    head: Head | None = None,
    as_features: bool = False,
    batch_size: int = 4096,
    history: bool = False,
    max_halvings: int = 30,
) -> PurifyResult:
    """Purify features by descent on ``J(F) = BPD(F) + ν‖F − F_ref‖²`` and re-classify them.

    Each step is ``F ← F − ε_n ∇J(F)`` with a per-row step ``ε_n`` that starts at ``lr`` and is halved until the
    Armijo condition ``J(F_new) ≤ J(F) − 10⁻⁴ ε_n ‖∇J‖²`` holds (backtracking line search), so ``J`` never
    increases and no step can diverge; a row whose step cannot decrease ``J`` after ``max_halvings`` halvings
    stays where it is (it is at a stationary point to float precision). Since ``J(F*) ≤ J(F_ref) = BPD(F_ref)``,
    ``BPD(F*) ≤ BPD(F_ref) − ν‖F* − F_ref‖²``: purification never lowers the likelihood.

    With the default detector (one mixture per layer) the penultimate layer's mixture and columns are used.
    Rows holding NaN or infinity are not purified: ``finite`` is False there, their prediction is ``-1``.

    Args:
        detector: a fitted :class:`~featurefail.FailureDetector` with the ``"gmm"`` scorer.
        x_or_features: :class:`~featurefail.Features`, a tensor of inputs (run through the attached model), or
            a ``(N, D)`` tensor of features with ``as_features=True``.
        lr: the largest step size ``ε``.
        nu: pull ``ν`` toward the original features (``ν = 0``: pure likelihood ascent).
        steps: gradient steps (the paper: 100).
        head: callable features -> logits, or ``(weight (C, D), bias (C,))``; default the classifier head
            ``(W, b)`` found by the hook.
        batch_size: rows optimised at once.
        history: also return the BPD after every step.
        max_halvings: backtracking halvings tried per step.

    Returns:
        :class:`PurifyResult`.
    """
    for name, value, least in (("steps", steps, 0), ("batch_size", batch_size, 1), ("max_halvings", max_halvings, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not lr > 0 or not nu >= 0 or not math.isfinite(lr) or not math.isfinite(nu):
        raise ValueError(f"need steps >= 0, finite lr > 0 and finite nu >= 0; got steps={steps}, lr={lr}, nu={nu}")
    density, head, columns = _density_and_head(detector, head)
    expected = detector.n_features_
    if isinstance(x_or_features, Features):
        feats = x_or_features.feats
    elif as_features:
        feats = torch.as_tensor(x_or_features)
    elif isinstance(x_or_features, torch.Tensor) and x_or_features.ndim and x_or_features.shape[0] == 0:
        feats = torch.zeros(0, expected)
    else:
        feats = detector.features(x_or_features).feats
    if feats.ndim != 2 or feats.shape[1] != expected:
        raise ValueError(f"features must be (N, {expected}), got {tuple(feats.shape)}")
    feats = feats[:, columns]
    if feats.shape[0] == 0:
        return _empty_result(head, feats.shape[1], steps if history else None)
    device = next(iter(density.buffers())).device
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("f", "before", "after", "hist", "lg", "lg0", "ok")}
    for ref in torch.split(feats, batch_size):
        ref = ref.detach().to(device, torch.float64)
        finite = torch.isfinite(ref).all(dim=1)
        ref = torch.where(finite[:, None], ref, torch.zeros_like(ref))
        f, trace = _descend(density, ref, lr, nu, steps, max_halvings)
        with torch.no_grad():
            out["lg"].append(_logits(head, f))
            out["lg0"].append(_logits(head, ref))
        out["f"].append(torch.where(finite[:, None], f, torch.full_like(f, math.nan)))
        out["before"].append(trace[0])
        out["after"].append(trace[-1])
        out["ok"].append(finite)
        if history:
            out["hist"].append(torch.stack(trace))
    purified = torch.cat(out["f"])
    finite = torch.cat(out["ok"])
    logits = torch.cat(out["lg"])
    ref_all = feats.to(device, purified.dtype)
    missing = torch.full((len(finite),), -1, dtype=torch.long, device=logits.device)
    nan = torch.full_like(finite, math.nan, dtype=purified.dtype)
    return PurifyResult(
        features=purified,
        logits=torch.where(finite[:, None], logits, torch.full_like(logits, math.nan)),
        predictions=torch.where(finite, logits.argmax(dim=1), missing),
        original_predictions=torch.where(finite, torch.cat(out["lg0"]).argmax(dim=1), missing),
        distance=torch.where(finite, (purified - ref_all).norm(dim=1), nan),
        bpd_before=torch.where(finite, torch.cat(out["before"]), nan),
        bpd_after=torch.where(finite, torch.cat(out["after"]), nan),
        bpd_history=torch.cat(out["hist"], dim=1) if history else None,
        finite=finite,
    )


def _logits(head: Head, feats: torch.Tensor) -> torch.Tensor:
    logits = head(feats.float())
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != feats.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"head must map features ({feats.shape[0]}, D) to logits ({feats.shape[0]}, C); got {shape}")
    return logits.float()


def _empty_result(head: Head, width: int, history_steps: int | None) -> PurifyResult:
    """The result for no rows: every field with 0 rows (logits ``(0, C)`` from the head)."""
    feats = torch.zeros(0, width, dtype=torch.float64)
    logits = _logits(head, feats)
    none = torch.zeros(0, dtype=torch.float64)
    return PurifyResult(
        features=feats,
        logits=logits,
        predictions=torch.zeros(0, dtype=torch.long),
        original_predictions=torch.zeros(0, dtype=torch.long),
        distance=none,
        bpd_before=none,
        bpd_after=none,
        bpd_history=None if history_steps is None else torch.zeros(history_steps + 1, 0, dtype=torch.float64),
        finite=torch.zeros(0, dtype=torch.bool),
    )


def _descend(
    density: nn.Module, ref: torch.Tensor, lr: float, nu: float, steps: int, max_halvings: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Monotone backtracking descent of ``J`` from ``ref`` (float64): the final features and BPD per step."""

    def objective(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bpd = -density(f, None).double()
        return bpd + nu * ((f - ref) ** 2).sum(dim=1), bpd

    f = ref.clone()
    with torch.no_grad():
        value, bpd = objective(f)
    trace = [bpd]
    step = torch.full_like(value, lr)
    for _ in range(steps):
        g = f.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(g)[0].sum(), g)
        grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
        sq = (grad * grad).sum(dim=1)
        pending = sq > 0
        trial = step.clone()
        with torch.no_grad():
            for _ in range(max_halvings):
                if not pending.any():
                    break
                candidate = f - trial[:, None] * grad
                new_value, new_bpd = objective(candidate)
                accept = pending & torch.isfinite(new_value) & (new_value <= value - 1e-4 * trial * sq)
                f = torch.where(accept[:, None], candidate, f)
                value = torch.where(accept, new_value, value)
                bpd = torch.where(accept, new_bpd, bpd)
                pending = pending & ~accept
                trial = torch.where(pending, trial / 2, trial)
        step = torch.where(pending, step, torch.minimum(trial * 2, torch.full_like(trial, lr)))
        trace.append(bpd)
    return f.detach(), trace


@dataclass
class GridRow:
    """One setting of the Table-4 grid; accuracies in [0, 1], counts on the test split."""

    lr: float
    nu: float
    val_before: float
    val_after: float
    test_before: float
    test_after: float
    test_fixed: int
    test_new_mistakes: int
    val_fixed: int
    val_new_mistakes: int


@dataclass
class PurificationGrid:
    """All rows, and the setting chosen on validation accuracy alone (ties: smallest ``lr``, then largest ``nu``)."""

    rows: list[GridRow] = field(default_factory=list)
    chosen: GridRow | None = None

    def to_markdown(self) -> str:
        lines = [
            "| ε | ν | val before | val after | test before | test after | test fixed | test new mistakes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            mark = " (chosen)" if r is self.chosen else ""
            lines.append(
                f"| {r.lr:g} | {r.nu:g}{mark} | {100 * r.val_before:.2f} | {100 * r.val_after:.2f} | "
                f"{100 * r.test_before:.2f} | {100 * r.test_after:.2f} | {r.test_fixed} | {r.test_new_mistakes} |"
            )
        return "\n".join(lines)


def _counts(result: PurifyResult, labels: torch.Tensor) -> tuple[float, float, int, int]:
    y = labels.to(result.predictions.device)
    before = result.original_predictions == y
    after = result.predictions == y
    return (
        float(before.float().mean()),
        float(after.float().mean()),
        int((~before & after).sum()),
        int((before & ~after).sum()),
    )


def purification_grid(
    detector: Any,
    val: Features,
    test: Features,
    lrs: Sequence[float] = (0.1, 0.01),
    nus: Sequence[float] = (0.0, 0.01, 0.1, 1.0),
    steps: int = 100,
    head: Head | None = None,
) -> PurificationGrid:
    """The paper's Table 4: accuracy before/after purification for each ``(ε, ν)``, fixed and new mistakes.

    The chosen setting maximises **validation** accuracy after purification; test numbers are only reported.
    """
    for name, f in (("val", val), ("test", test)):
        if f.labels is None:
            raise ValueError(f"the {name} features need labels")
    lrs, nus = list(lrs), list(nus)
    if not lrs or not nus:
        raise ValueError(f"lrs and nus must each hold at least one value, got lrs={lrs} and nus={nus}")
    grid = PurificationGrid()
    for lr, nu in itertools.product(lrs, nus):
        v = _counts(purify(detector, val, lr=lr, nu=nu, steps=steps, head=head), val.labels)
        t = _counts(purify(detector, test, lr=lr, nu=nu, steps=steps, head=head), test.labels)
        grid.rows.append(GridRow(lr, nu, v[0], v[1], t[0], t[1], t[2], t[3], v[2], v[3]))
    grid.chosen = max(grid.rows, key=lambda r: (r.val_after, -r.lr, r.nu))
    return grid
