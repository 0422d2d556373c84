"""The paper's experiments as one runner: scorers × failure sources × seeds, with typed result rows.

Failure sources, each compared against normal samples of the clean test set:

* ``test mistakes``: normal = correctly classified test samples, failures = misclassified ones;
* ``fgsm ε=…`` / ``bim ε=…``: normal = correctly classified clean test samples, failures = their adversarial
  versions that the model gets wrong (successful attacks only, as in Lee et al.);
* ``ood: name``: normal = all clean test samples, failures = the out-of-distribution samples;
* ``corruption: name`` (covariate shift, :mod:`featurefail.corruptions`): normal = the corrupted inputs the model
  still classifies correctly, failures = those it gets wrong (labels stay valid under a corruption).

Holistic evaluation (FD-Shifts, Jaeger et al., ICLR 2023): a *stream* is the clean test set plus some sources,
mixed; a failure is a wrong prediction on a clean or corrupted input, or any OOD (or successful adversarial)
input; every detector is judged by the area under its risk–coverage curve (``metrics.aurc``, lower is better).

Scorers are fitted on a :class:`FitData` — the training split and the labelled validation split, nothing
else; the fitting function takes only that object, so no failure sample can reach ``fit`` or
``fit_validation`` (by construction, not by a check afterwards).

One file (over 500 lines) because that construction is the point: the sources, the fit data and the only
function that fits live together, so no other module can hand a failure sample to a fit.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import metrics
from .attacks import bim, fgsm
from .detector import FailureDetector, penultimate_head
from .features import Features, extract_features
from .hooks import FeatureHook
from .preprocess import observe_fits
from .stats import mann_whitney

__all__ = [
    "DESIGN_SOURCES",
    "HELD_OUT_SOURCES",
    "EvalData",
    "EvalResult",
    "EvalRow",
    "FitData",
    "HolisticRow",
    "Source",
    "collect",
    "evaluate",
    "evaluate_features",
    "fit_detector",
    "holdout_split",
    "parse_attack",
    "protocol_group",
]

# The held-out protocol of issue 15, fixed in code before any run: the *design* sources may be looked at while
# developing a detector; the *held-out* sources may not, and only they decide the default. Every failure source
# the CIFAR-10 runner (benchmarks/reproduce_cifar10.py) produces belongs to exactly one group.
#: failure sources that may be looked at during development
DESIGN_SOURCES = frozenset(
    {
        "test mistakes",
        "fgsm ε=1/255",
        "fgsm ε=2/255",
        "ood: gaussian-noise",
        "ood: fashion-mnist",
        "corruption: gaussian_noise",
        "corruption: gaussian_blur",
        "corruption: contrast",
    }
)
#: failure sources kept for the final judgement (and the choice of the default)
HELD_OUT_SOURCES = frozenset(
    {
        "ood: mnist",
        "fgsm ε=4/255",
        "fgsm ε=8/255",
        "bim ε=1/255",
        "bim ε=2/255",
        "bim ε=4/255",
        "bim ε=8/255",
        "corruption: defocus_blur",
        "corruption: jpeg",
        "corruption: pixelate",
        "corruption: brightness",
    }
)


def protocol_group(source: str) -> str:
    """``"design"`` or ``"held-out"``: the group of a failure source under the fixed protocol (ValueError for a
    source the protocol does not name, so a new source cannot slip into either group unnoticed)."""
    if source in DESIGN_SOURCES:
        return "design"
    if source in HELD_OUT_SOURCES:
        return "held-out"
    raise ValueError(f"failure source {source!r} is in neither the design nor the held-out group")


def holdout_split(n: int, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random ``(train_index, validation_index)`` with ``max(10, fraction·n)`` validation rows.

    ``featurefail evaluate`` uses it when no ``--val`` is given; train the classifier on ``train_index`` only.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(int(n * fraction), 10)
    return order[n_val:], order[:n_val]


def parse_attack(spec: str) -> tuple[str, float]:
    """``"fgsm:0.03"`` -> ("fgsm", 0.03); ``"bim:8/255"`` -> ("bim", 0.0314)."""
    try:
        kind, value = spec.split(":")
        if "/" in value:
            num, den = value.split("/")
            eps = float(num) / float(den)
        else:
            eps = float(value)
    except ValueError:
        raise ValueError(f"attack must look like 'fgsm:0.03' or 'bim:8/255', got {spec!r}") from None
    if kind not in ("fgsm", "bim") or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"attack must be fgsm or bim with a finite eps > 0, got {spec!r}")
    return kind, eps


@dataclass
class EvalRow:
    """One scorer on one failure source, over seeds (AUROC/AUPR/FPR in [0, 1])."""

    scorer: str
    source: str
    kind: str
    n_normal: int
    n_failure: int
    auroc: float
    auroc_std: float
    aupr_in: float
    aupr_in_std: float
    aupr_out: float
    aupr_out_std: float
    fpr95: float
    fpr95_std: float
    seeds: int


@dataclass
class HolisticRow:
    """One detector on one mixed stream, over seeds: AURC and E-AURC (fractions, lower is better) and the
    selective risk at ``coverage``; ``n`` inputs of which ``n_failure`` are failures."""

    scorer: str
    stream: str
    n: int
    n_failure: int
    aurc: float
    aurc_std: float
    eaurc: float
    eaurc_std: float
    coverage: float
    risk: float
    risk_std: float
    seeds: int


@dataclass
class EvalResult:
    """All rows, the Mann-Whitney tests on test mistakes, the holistic (stream) rows, and the first seed's raw
    scores for plots (per source and per stream: ``(normal scores, failure scores)``)."""

    rows: list[EvalRow] = field(default_factory=list)
    mann_whitney: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: float = float("nan")
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict, repr=False)
    holistic: list[HolisticRow] = field(default_factory=list)
    stream_scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict, repr=False)
    stream_sizes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def to_markdown(self) -> str:
        """Tables in the paper's layout: AUROC, AUPR-in, AUPR-out (mean ± std, %), FPR@95%TPR."""
        out = [f"Test accuracy: {100 * self.accuracy:.2f}%", ""]
        for source in dict.fromkeys(r.source for r in self.rows):
            rows = [r for r in self.rows if r.source == source]
            out.append(f"### {source} (normal:failure = {rows[0].n_normal}:{rows[0].n_failure})")
            out.append("")
            out.append("| scorer | AUROC | AUPR-in | AUPR-out | FPR@95%TPR |")
            out.append("|---|---|---|---|---|")
            for r in rows:
                out.append(
                    f"| {r.scorer} | {_pm(r.auroc, r.auroc_std, r.seeds)} | {_pm(r.aupr_in, r.aupr_in_std, r.seeds)} | "
                    f"{_pm(r.aupr_out, r.aupr_out_std, r.seeds)} | {_pm(r.fpr95, r.fpr95_std, r.seeds)} |"
                )
            out.append("")
        if self.mann_whitney:
            out.append("### Mann-Whitney U test, correct vs wrong test samples")
            out.append("")
            out.append("| scorer | U = min(U_C, U_W) | p-value |")
            out.append("|---|---|---|")
            for name, mw in self.mann_whitney.items():
                out.append(f"| {name} | {mw['statistic']:.0f} | {mw['pvalue']:.2e} |")
            out.append("")
        return "\n".join(out)

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(self.rows[0])))
            writer.writeheader()
            for r in self.rows:
                writer.writerow(asdict(r))
        return path

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        payload = {
            "accuracy": self.accuracy,
            "rows": [asdict(r) for r in self.rows],
            "mann_whitney": self.mann_whitney,
            "holistic": [asdict(r) for r in self.holistic],
        }
        path.write_text(json.dumps(payload, indent=2, allow_nan=True))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> EvalResult:
        """The rows, Mann-Whitney tests and accuracy written by :meth:`to_json` (raw scores are not kept)."""
        payload = json.loads(Path(path).read_text())
        return cls(
            rows=[EvalRow(**row) for row in payload["rows"]],
            mann_whitney=payload.get("mann_whitney", {}),
            accuracy=float(payload.get("accuracy", float("nan"))),
            holistic=[HolisticRow(**row) for row in payload.get("holistic", [])],
        )


def _pm(mean: float, std: float, seeds: int) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if seeds > 1 else f"{100 * mean:.2f}"


def _features(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    make_hook: Callable[[], FeatureHook],
    keep_inputs: bool,
    batch_size: int,
    device: torch.device,
) -> Features:
    loader = [
        (x[i : i + batch_size],) if y is None else (x[i : i + batch_size], y[i : i + batch_size])
        for i in range(0, len(x), batch_size)
    ]
    return extract_features(model, loader, make_hook(), device=device, keep_inputs=keep_inputs, progress_bar=False)


def _attack(
    model: nn.Module,
    kind: str,
    eps: float,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    bim_steps: int,
) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        adv = fgsm(model, xb, yb, eps) if kind == "fgsm" else bim(model, xb, yb, eps, steps=bim_steps)
        out.append(adv.cpu())
    return torch.cat(out)


@dataclass
class Source:
    """One failure source: its failure features and its normal samples — the clean test samples selected by
    ``normal_mask``, or, when ``normals`` is given (corruptions), those features instead."""

    name: str
    kind: str
    failures: Features
    normal_mask: torch.Tensor
    normals: Features | None = None


@dataclass(frozen=True)
class FitData:
    """What a detector may be fitted on: training features, labelled validation features, the classifier head.

    It holds no failure source and no test row: :func:`fit_detector` takes only this, so whatever a scorer does
    in ``fit`` or ``fit_validation``, it cannot read a failure sample.
    """

    train: Features
    val: Features
    head: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            if not isinstance(getattr(self, name), Features):
                raise TypeError(f"FitData.{name} must be Features, got {type(getattr(self, name)).__name__}")


@dataclass
class EvalData:
    """Everything the scorers see: clean train/validation/test features and the failure sources.

    ``save``/``load`` cache it as one safetensors file, so re-scoring needs no forward passes or attacks.
    """

    train: Features
    val: Features
    test: Features
    sources: list[Source] = field(default_factory=list)
    layers: list[str | None] | None = None
    auto: bool = False
    head: tuple[torch.Tensor, torch.Tensor] | None = None

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}

        def put(prefix: str, f: Features) -> None:
            for key in ("feats", "logits", "labels", "inputs"):
                value = getattr(f, key)
                if value is not None:
                    tensors[f"{prefix}.{key}"] = value.clone().contiguous()

        put("train", self.train)
        put("val", self.val)
        put("test", self.test)
        for i, src in enumerate(self.sources):
            put(f"source{i}", src.failures)
            tensors[f"source{i}.normal_mask"] = src.normal_mask.clone().contiguous()
            if src.normals is not None:
                put(f"source{i}.normals", src.normals)
        if self.head is not None:
            tensors["head.weight"], tensors["head.bias"] = (t.clone().contiguous() for t in self.head)
        meta = {
            "sources": json.dumps([[src.name, src.kind] for src in self.sources]),
            "blocks": json.dumps(list(self.train.blocks) if self.train.blocks else None),
            "layers": json.dumps(self.layers),
            "auto": json.dumps(self.auto),
        }
        save_file(tensors, str(path), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> EvalData:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}

        blocks = json.loads(meta.get("blocks", "null"))

        def get(prefix: str) -> Features:
            keys = ("feats", "logits", "labels", "inputs")
            return Features(*(tensors.get(f"{prefix}.{key}") for key in keys), blocks=tuple(blocks) if blocks else None)

        sources = [
            Source(
                name,
                kind,
                get(f"source{i}"),
                tensors[f"source{i}.normal_mask"],
                get(f"source{i}.normals") if f"source{i}.normals.feats" in tensors else None,
            )
            for i, (name, kind) in enumerate(json.loads(meta["sources"]))
        ]
        head = (tensors["head.weight"], tensors["head.bias"]) if "head.weight" in tensors else None
        return cls(
            get("train"),
            get("val"),
            get("test"),
            sources,
            layers=json.loads(meta.get("layers", "null")),
            auto=bool(json.loads(meta.get("auto", "false"))),
            head=head,
        )

    def select_blocks(self, indices: int | list[int]) -> EvalData:
        """The same data restricted to some layer blocks (see :meth:`Features.select_blocks`)."""
        wanted = [indices] if isinstance(indices, int) else list(indices)
        pick = lambda f: f.select_blocks(wanted)  # noqa: E731
        layers = [self.layers[i] for i in wanted] if self.layers else None
        sources = [
            Source(s.name, s.kind, pick(s.failures), s.normal_mask, None if s.normals is None else pick(s.normals))
            for s in self.sources
        ]
        head = self.head if wanted and wanted[0] == 0 else None
        return EvalData(pick(self.train), pick(self.val), pick(self.test), sources, layers=layers, head=head)

    def fit_data(self) -> FitData:
        """The only part of these data a detector may be fitted on (see :class:`FitData`)."""
        return FitData(self.train, self.val, self.head)


def collect(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    ood: Mapping[str, torch.Tensor] | None = None,
    attacks: Sequence[str] = (),
    layer: str | list[str | None] | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    bim_steps: int = 10,
    keep_inputs: bool = False,
    progress: Callable[[str], None] | None = None,
) -> EvalData:
    """Extract clean features, craft the attacks and extract every failure source (see the module docstring).

    Features come from the same hook as ``FailureDetector.fit``: ``layer`` may list several layers (``None`` =
    the penultimate one) or be ``"auto"``, resolved on the first training batch exactly as ``fit`` resolves it;
    every set then carries the pooled, concatenated blocks (``Features.blocks``) and
    :meth:`EvalData.select_blocks` picks some of them. The classifier head is kept when the first block is its
    input.
    """
    say = progress or (lambda message: None)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    first = FeatureHook(model, layer=layer)
    say("extracting features of train / validation / test")
    f_train = _features(model, *train, lambda: first, keep_inputs, batch_size, dev)
    resolved = first.resolved_layers
    if layer == "auto":
        say(f"layer='auto' resolved to {resolved}")
    head = penultimate_head(first)

    def make_hook() -> FeatureHook:
        return FeatureHook(model, layer=resolved if len(resolved) > 1 else resolved[0])

    f_val = _features(model, *val, make_hook, keep_inputs, batch_size, dev)
    f_test = _features(model, *test, make_hook, keep_inputs, batch_size, dev)
    correct = f_test.correct
    data = EvalData(f_train, f_val, f_test, layers=list(resolved), auto=layer == "auto", head=head)
    if (~correct).any() and correct.any():
        data.sources.append(Source("test mistakes", "mistakes", f_test.subset(~correct), correct))
    clean_x, clean_y = test[0][correct], test[1][correct]
    for spec in attacks:
        kind, eps = parse_attack(spec)
        say(f"crafting {kind} adversarial examples, eps={eps:.4g}")
        adv_x = _attack(model, kind, eps, clean_x, clean_y, batch_size, dev, bim_steps)
        f_adv = _features(model, adv_x, clean_y, make_hook, keep_inputs, batch_size, dev)
        fooled = ~f_adv.correct
        if fooled.any():
            data.sources.append(
                Source(f"{kind} ε={spec.split(':', 1)[1]}", "adversarial", f_adv.subset(fooled), correct)
            )
    for name, x_ood in (ood or {}).items():
        if tuple(x_ood.shape[1:]) != tuple(test[0].shape[1:]):
            raise ValueError(
                f"OOD set {name!r} has shape {tuple(x_ood.shape[1:])}, the test inputs "
                f"{tuple(test[0].shape[1:])}; resize it first (featurefail.ood.NpzImages(size=...))"
            )
        f_ood = _features(model, x_ood, None, make_hook, keep_inputs, batch_size, dev)
        data.sources.append(Source(f"ood: {name}", "ood", f_ood, torch.ones_like(correct)))
    return data


def detector_for(name: str, options: Mapping[str, Any] | None = None, seed: int = 0) -> FailureDetector:
    """The detector a runner row evaluates: ``"default"`` = ``FailureDetector()``, ``"paper"`` =
    ``FailureDetector.paper()``, any other name = ``FailureDetector(scorer=name)``; ``options`` are keyword
    settings of the detector or its scorer, ``seed`` the detector's seed (the scorer's unless given)."""
    settings = {"progress": False, "seed": seed, **dict(options or {})}
    if name == "default":
        return FailureDetector(**settings)
    if name == "paper":
        return FailureDetector.paper(**settings)
    return FailureDetector(scorer=name, **settings)


def _blocks_for(detector: FailureDetector, data: EvalData) -> list[int]:
    layer = detector.config.layer
    available = data.layers or [None]
    if layer == "auto":
        if not data.auto:
            raise ValueError("this detector hooks layer='auto': collect the data with collect(..., layer='auto')")
        return list(range(len(available)))
    wanted = layer if isinstance(layer, list) else [layer]
    missing = [name for name in wanted if name not in available]
    if missing:
        raise ValueError(f"the collected data have no layer {missing[0]!r}; they hold {available}")
    return [available.index(name) for name in wanted]


def fit_detector(
    name: str,
    fit_data: FitData,
    *,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    model: nn.Module | None = None,
) -> FailureDetector:
    """The row ``name``'s detector (:func:`detector_for`) fitted on ``fit_data.train`` (``fit_features``) and then
    on ``fit_data.val`` (``fit_validation``). It receives a :class:`FitData` and nothing else, so no failure
    sample can reach a fit; feature preprocessing is checked to be fitted on exactly the training features."""
    if not isinstance(fit_data, FitData):
        raise TypeError(f"fit_detector takes a FitData (training and validation features only), got {type(fit_data)}")
    detector = detector_for(name, options, seed)
    with observe_fits() as preprocessing_fits:
        detector.fit_features(fit_data.train, model=model, head=fit_data.head)
        detector.fit_validation(fit_data.val)
    _assert_preprocessing_fitted_on_train(preprocessing_fits, fit_data.train, name)
    return detector


def _stream(
    s_test: torch.Tensor, correct: torch.Tensor, scored: Mapping[str, tuple[torch.Tensor | None, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normal scores, failure scores)`` of a mixed stream: the clean test set plus every source in ``scored``
    (``(normal scores or None, failure scores)``; a source's normal scores are added only when it has its own)."""
    normal, failed = [s_test[correct]], [s_test[~correct]]
    for own_normal, failures in scored.values():
        if own_normal is not None:
            normal.append(own_normal)
        failed.append(failures)
    return torch.cat(normal), torch.cat(failed)


def _score_row(
    name: str,
    score: Callable[[Features], torch.Tensor],
    data: EvalData,
    seed: int,
    first_seed: int,
    streams: Mapping[str, list[str]],
    coverage: float,
    result: EvalResult,
    per_seed: dict[tuple[str, str], list[tuple[float, float, float, float]]],
    per_stream: dict[tuple[str, str], list[tuple[float, float, float]]],
) -> None:
    """Score every source and stream of ``data`` with one fitted row; append the metrics of this seed."""
    correct = data.test.correct
    s_test = score(data.test)
    if seed == first_seed and (~correct).any() and correct.any():
        mw = mann_whitney(s_test[correct], s_test[~correct])
        result.mann_whitney[name] = {"statistic": mw.statistic, "pvalue": mw.pvalue, "auroc": mw.auroc}
    scored: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for src in data.sources:
        own = None if src.normals is None else score(src.normals)
        normal = s_test[src.normal_mask] if own is None else own
        failed = score(src.failures)
        if src.kind != "mistakes":
            scored[src.name] = (own, failed)
        per_seed.setdefault((name, src.name), []).append(
            (
                metrics.auroc(normal, failed),
                metrics.aupr_in(normal, failed),
                metrics.aupr_out(normal, failed),
                metrics.fpr_at_tpr(normal, failed, 0.95),
            )
        )
        if seed == first_seed:
            result.scores.setdefault(src.name, {})[name] = (normal.numpy(), failed.numpy())
    for stream, names in streams.items():
        normal, failed = _stream(s_test, correct, {n: scored[n] for n in names if n in scored})
        per_stream.setdefault((name, stream), []).append(
            (
                metrics.aurc(normal, failed),
                metrics.eaurc(normal, failed),
                metrics.risk_at_coverage(normal, failed, coverage),
            )
        )
        if seed == first_seed:
            result.stream_scores.setdefault(stream, {})[name] = (normal.numpy(), failed.numpy())
            result.stream_sizes[stream] = (len(normal) + len(failed), len(failed))


def _checked_options(
    scorers: Sequence[str], scorer_options: Mapping[str, Mapping[str, Any]] | None, seeds: list[int]
) -> dict[str, dict[str, Any]]:
    """A copy of the per-row options, refusing options for a row that is not run (a typo would be ignored) and
    an empty ``seeds``."""
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed, e.g. seeds=(0,)")
    options = {k: dict(v) for k, v in (scorer_options or {}).items()}
    unknown = sorted(set(options) - set(scorers))
    if unknown:
        raise ValueError(f"scorer_options names {unknown[0]!r}, which is not one of the rows {list(scorers)}")
    return options


def evaluate_features(
    data: EvalData,
    *,
    scorers: Sequence[str] = ("default", "max_softmax"),
    scorer_options: Mapping[str, Mapping[str, Any]] | None = None,
    seeds: Sequence[int] = (0,),
    model: nn.Module | None = None,
    streams: Mapping[str, Sequence[str]] | None = None,
    coverage: float = 0.8,
    derived: Mapping[str, tuple[str, Callable[[FailureDetector], Callable[[Features], torch.Tensor]]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Build every row's detector, fit it with :func:`fit_detector` on ``data.fit_data()`` (training and
    validation features only) for every seed, and score every source with ``score_features`` — the pipeline of
    ``FailureDetector`` itself. ``model`` is needed only by scorers that need it (Mahalanobis input
    preprocessing).

    ``streams``: name -> source names; each stream is the clean test set mixed with those sources (a source of
    kind ``"mistakes"`` adds nothing: the clean test set is always in), scored per row by AURC, E-AURC and the
    selective risk at ``coverage`` (:class:`HolisticRow`, in ``EvalResult.holistic``).

    ``derived``: extra rows scored from a fitted row without refitting: label -> ``(row name, make)``, where
    ``make(fitted detector)`` returns a function ``Features -> (N,) scores`` (e.g. another combination rule of
    the same fitted fusion).
    """
    say = progress or (lambda message: None)
    seeds = list(seeds)
    options = _checked_options(scorers, scorer_options, seeds)
    streams = {k: list(v) for k, v in (streams or {}).items()}
    derived = dict(derived or {})
    bad = [label for label, (base, _) in derived.items() if base not in scorers or label in scorers]
    if bad:
        raise ValueError(f"derived row {bad[0]!r} must name a fitted row and not repeat a row name")
    known = {src.name for src in data.sources}
    for stream, names in streams.items():
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"stream {stream!r} names source {missing[0]!r}, which the data do not hold")
    correct = data.test.correct
    result = EvalResult(accuracy=float(correct.float().mean()))
    per_seed: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    per_stream: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for seed in seeds:
        for name in scorers:
            say(f"seed {seed}: fitting {name}")
            blocks = _blocks_for(detector_for(name, options.get(name), seed), data)
            sub = data if blocks == list(range(len(data.layers or [None]))) else data.select_blocks(blocks)
            detector = fit_detector(name, sub.fit_data(), options=options.get(name), seed=seed, model=model)
            rows = [(name, detector.score_features)]
            rows += [(label, make(detector)) for label, (base, make) in derived.items() if base == name]
            for row, score in rows:
                _score_row(row, score, sub, seed, seeds[0], streams, coverage, result, per_seed, per_stream)
    names = list(scorers) + list(derived)
    for src in data.sources:
        for name in names:
            values = np.asarray(per_seed[(name, src.name)])
            mean, std = values.mean(0), values.std(0)
            result.rows.append(
                EvalRow(
                    scorer=name,
                    source=src.name,
                    kind=src.kind,
                    n_normal=int(src.normal_mask.sum()) if src.normals is None else len(src.normals),
                    n_failure=len(src.failures),
                    auroc=float(mean[0]),
                    auroc_std=float(std[0]),
                    aupr_in=float(mean[1]),
                    aupr_in_std=float(std[1]),
                    aupr_out=float(mean[2]),
                    aupr_out_std=float(std[2]),
                    fpr95=float(mean[3]),
                    fpr95_std=float(std[3]),
                    seeds=len(seeds),
                )
            )
    for stream in streams:
        for name in names:
            values = np.asarray(per_stream[(name, stream)])
            mean, std = values.mean(0), values.std(0)
            n, n_failure = result.stream_sizes[stream]
            result.holistic.append(
                HolisticRow(
                    scorer=name,
                    stream=stream,
                    n=n,
                    n_failure=n_failure,
                    aurc=float(mean[0]),
                    aurc_std=float(std[0]),
                    eaurc=float(mean[1]),
                    eaurc_std=float(std[1]),
                    coverage=coverage,
                    risk=float(mean[2]),
                    risk_std=float(std[2]),
                    seeds=len(seeds),
                )
            )
    return result


def evaluate(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    scorers: Sequence[str] = ("default", "max_softmax"),
    scorer_options: Mapping[str, Mapping[str, Any]] | None = None,
    ood: Mapping[str, torch.Tensor] | None = None,
    attacks: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    batch_size: int = 256,
    device: str | torch.device | None = None,
    bim_steps: int = 10,
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Run every detector on every failure source for every seed: :func:`collect` then :func:`evaluate_features`.

    Args:
        model: the classifier (inputs in [0, 1], normalisation inside).
        train, val, test: ``(x, y)`` tensors; labels of ``train`` are used only by scorers that need them.
        scorers: row names: ``"default"`` (``FailureDetector()``), ``"paper"`` (``FailureDetector.paper()``) or
            registered scorer names (``FailureDetector(scorer=name)``).
        scorer_options: per-row keyword settings of the detector or its scorer (e.g. ``{"gmm": {"n_components":
            10}, "default": {"layer": None}}``); the seed is set per seed unless given.
        ood: name -> ``(M, ...)`` out-of-distribution inputs shaped like ``test[0]``.
        attacks: specs like ``"fgsm:0.03"`` or ``"bim:8/255"`` (crafted on the test set).
        seeds: one fit of every detector per seed; rows report mean ± std.

    Returns:
        :class:`EvalResult`.
    """
    seeds = list(seeds)
    options = _checked_options(scorers, scorer_options, seeds)
    detectors = [detector_for(name, options.get(name)) for name in scorers]
    layers = [d.config.layer for d in detectors]
    if "auto" in layers:
        if any(layer not in ("auto", None) for layer in layers):
            raise ValueError("rows hooking layer='auto' and rows hooking named layers cannot share one collection")
        layer: Any = "auto"
    else:
        names = [None, *dict.fromkeys(n for la in layers for n in (la if isinstance(la, list) else [la]))]
        names = list(dict.fromkeys(names))
        layer = names if len(names) > 1 else None
    data = collect(
        model,
        train,
        val,
        test,
        ood=ood,
        attacks=attacks,
        layer=layer,
        batch_size=batch_size,
        device=device,
        bim_steps=bim_steps,
        keep_inputs=any(d.new_scorer().requires_inputs for d in detectors),
        progress=progress,
    )
    return evaluate_features(data, scorers=scorers, scorer_options=options, seeds=seeds, model=model, progress=progress)


def _assert_preprocessing_fitted_on_train(seen: list[torch.Tensor], f_train: Features, scorer: str) -> None:
    """Every feature preprocessing was fitted on training rows only (all of them or a subset, all columns or
    one layer block) — so never on a validation, test, adversarial or OOD row."""
    candidates = [f_train.feats] + [f_train.feats[:, cols] for cols in f_train.block_slices()]
    known: dict[int, set[bytes]] = {}
    for feats in seen:
        ok = False
        for i, c in enumerate(candidates):
            if feats.shape[1:] != c.shape[1:] or len(feats) > len(c):
                continue
            if feats.shape == c.shape and torch.equal(feats.to(c.dtype), c):
                ok = True
                break
            rows = known.setdefault(i, {r.tobytes() for r in c.contiguous().numpy()})
            if all(r.tobytes() in rows for r in feats.to(c.dtype).contiguous().numpy()):
                ok = True
                break
        assert ok, (
            f"scorer {scorer!r} fitted a feature preprocessing on {tuple(feats.shape)} features that are not the "
            "training features"
        )
