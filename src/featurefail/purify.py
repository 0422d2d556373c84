"""Purification: move features toward high GMM likelihood and classify again (paper Appendix B, Eq. 8–9).

    F* = argmin_F  BPD(F) + ν ‖F − F_ref‖²,   by   F ← F − ε (∇_F BPD(F) + 2ν (F − F_ref))

for a fixed number of steps, then logits = W F* + b with the classifier's last linear layer (or a head you
pass). Nothing flows back into the model or the GMM: only the features are optimised.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .features import Features

__all__ = ["GridRow", "PurificationGrid", "PurifyResult", "bpd_gradient", "purification_grid", "purify"]

Head = Callable[[torch.Tensor], torch.Tensor]


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
    """

    features: torch.Tensor
    logits: torch.Tensor
    predictions: torch.Tensor
    original_predictions: torch.Tensor
    distance: torch.Tensor
    bpd_before: torch.Tensor
    bpd_after: torch.Tensor
    bpd_history: torch.Tensor | None = None


def bpd_gradient(gmm: Any, feats: torch.Tensor, transform: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``BPD(F)`` and ``∇_F BPD(F)`` row by row: ``(N, D) -> (N,), (N, D)``; the GMM gets no gradient.

    With ``transform`` (the scorer's fitted preprocessing) the density is that of ``transform(F)``.
    """
    f = feats.detach().requires_grad_(True)
    with torch.enable_grad():
        bpd = gmm.bpd(transform(f) if transform is not None else f)
        (grad,) = torch.autograd.grad(bpd.sum(), f)
    return bpd.detach(), grad


def _resolve(detector: Any, head: Head | None) -> tuple[Any, Head, Callable | None]:
    scorer = getattr(detector, "scorer_", None)
    if getattr(scorer, "per_layer", False):
        blocks = getattr(scorer, "block_scorers_", [])
        if len(blocks) != 1:
            raise ValueError(
                "purify follows the gradient of one mixture on the penultimate features; this detector scores "
                f"{len(blocks)} layers with a mixture each. Use FailureDetector.paper() (or layer=None) to purify"
            )
        scorer = blocks[0]  # one layer: the per-layer scorer is one mixture
    gmm = getattr(scorer, "gmm", None)
    transform = getattr(scorer, "transform_", None)
    if gmm is None:
        raise ValueError("purify needs a detector fitted with the GMM scorer (scorer='gmm')")
    if head is None:
        layers = getattr(detector, "layers_", None)
        if isinstance(layers, list) and len(layers) > 1:
            raise ValueError(
                f"this detector hooks several layers ({layers}); the head re-classifies the penultimate features "
                "only. Fit a detector with layer=None to purify, or pass head= mapping these features to logits"
            )
        if detector.head_weight_ is None:
            raise ValueError(
                "the hooked layer is not an nn.Linear, so there is no head to re-classify with; "
                "pass head=callable mapping features (N, D) to logits (N, C)"
            )
        weight, bias = detector.head_weight_, detector.head_bias_

        def linear_head(f: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(f, weight.to(f), bias.to(f))

        head = linear_head
    return gmm, head, transform


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
) -> PurifyResult:
    """Purify features by gradient descent on ``BPD(F) + ν‖F − F_ref‖²`` and re-classify them.

    Args:
        detector: a fitted :class:`~featurefail.FailureDetector` with the ``"gmm"`` scorer.
        x_or_features: :class:`~featurefail.Features`, a tensor of inputs (run through the attached model), or
            a ``(N, D)`` tensor of features with ``as_features=True``.
        lr: step size ``ε``.
        nu: pull ``ν`` toward the original features (``ν = 0``: pure likelihood ascent).
        steps: gradient steps (the paper: 100).
        head: callable features -> logits; default the hooked ``nn.Linear`` (W, b).
        batch_size: rows optimised at once.
        history: also return the BPD after every step.

    Returns:
        :class:`PurifyResult`.
    """
    if steps < 0 or lr <= 0 or nu < 0:
        raise ValueError(f"need steps >= 0, lr > 0 and nu >= 0; got steps={steps}, lr={lr}, nu={nu}")
    gmm, head, transform = _resolve(detector, head)
    if isinstance(x_or_features, Features):
        feats = x_or_features.feats
    elif as_features:
        feats = torch.as_tensor(x_or_features)
    else:
        feats = detector.features(x_or_features).feats
    expected = detector.n_features_
    if feats.ndim != 2 or feats.shape[1] != expected:
        raise ValueError(f"features must be (N, {expected}), got {tuple(feats.shape)}")
    device = gmm.device_
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("f", "before", "after", "hist", "lg", "lg0")}
    for ref in torch.split(feats, batch_size):
        ref = ref.detach().to(device, torch.float64 if gmm.dtype == torch.float64 else torch.float32)
        f = ref.clone()
        trace = []
        for _ in range(steps):
            bpd, grad = bpd_gradient(gmm, f, transform)
            trace.append(bpd)
            f = f - lr * (grad + 2.0 * nu * (f - ref))
        final = gmm.bpd(transform(f) if transform is not None else f).detach()
        trace.append(final)
        with torch.no_grad():
            out["lg"].append(head(f).float())
            out["lg0"].append(head(ref).float())
        out["f"].append(f.detach())
        out["before"].append(trace[0])
        out["after"].append(final)
        if history:
            out["hist"].append(torch.stack(trace))
    purified = torch.cat(out["f"])
    logits = torch.cat(out["lg"])
    ref_all = feats.to(device, purified.dtype)
    return PurifyResult(
        features=purified,
        logits=logits,
        predictions=logits.argmax(dim=1),
        original_predictions=torch.cat(out["lg0"]).argmax(dim=1),
        distance=(purified - ref_all).norm(dim=1),
        bpd_before=torch.cat(out["before"]),
        bpd_after=torch.cat(out["after"]),
        bpd_history=torch.cat(out["hist"], dim=1) if history else None,
    )


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
    grid = PurificationGrid()
    for lr, nu in itertools.product(lrs, nus):
        v = _counts(purify(detector, val, lr=lr, nu=nu, steps=steps, head=head), val.labels)
        t = _counts(purify(detector, test, lr=lr, nu=nu, steps=steps, head=head), test.labels)
        grid.rows.append(GridRow(lr, nu, v[0], v[1], t[0], t[1], t[2], t[3], v[2], v[3]))
    grid.chosen = max(grid.rows, key=lambda r: (r.val_after, -r.lr, r.nu))
    return grid
