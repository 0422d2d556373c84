"""FailureDetector: model -> hook -> features -> scorer -> scores -> threshold.

One file because it is one class, the user's entry point: its settings live in :mod:`featurefail.config`, saving in
:mod:`featurefail.persistence`, collectives in :mod:`featurefail.distributed`, and every method here is the
orchestration of those pieces for one step of the user's flow (fit, calibrate, score, deploy, monitor).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._tensor import mask_nonfinite
from .config import DEFAULT_DETECTOR, PAPER_DETECTOR, DetectorConfig, build_config
from .distributed import (
    all_gather_rows,
    extract_shard,
    is_distributed,
    require_distributable,
    require_identical,
    run_on_rank_zero,
    split_union,
    synchronise_scorer,
    total_rows,
)
from .exceptions import NotFittedError
from .features import Features, extract_features, is_xy_batch, iter_batches, n_rows
from .hooks import FeatureHook, HookPlan, describe
from .scorers.base import ModelContext, Scorer, scorer_class, validation_use_of
from .scorers.per_layer import PerLayer
from .threshold import ThresholdResult, calibrate_threshold, parse_strategy

if TYPE_CHECKING:
    from .monitor import DriftMonitor

__all__ = [
    "DEFAULT_DETECTOR",
    "PAPER_DETECTOR",
    "DetectorConfig",
    "FailureDetector",
    "FittedState",
    "detect",
    "penultimate_head",
    "score",
]

FORMAT_NAME = "featurefail-detector"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class FittedState:
    """Everything ``fit`` learns, swapped in at once so a failed fit leaves the detector as it was (the save file
    holds it too)."""

    scorer: Scorer
    model: nn.Module | None
    layers: list[str | None] | None
    n_features: int
    head_weight: torch.Tensor | None
    head_bias: torch.Tensor | None
    fingerprint: str | None


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, bytes): a detector is tied to it."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def penultimate_head(hook: FeatureHook) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(weight (C, D_0), bias (C,))``: the classifier head as one linear map on the first hooked block, when
    that block is the head's input (``layers[0] is None``), else None. ``hook`` must have run once."""
    layers = hook.resolved_layers
    if not layers or layers[0] is not None:
        return None
    return hook.head_linear()


class FailureDetector:
    """Flag the inputs a classifier is likely to get wrong, from the density of its hooked features.

    Typical use::

        detector = FailureDetector().fit(model, train_loader)      # labels unused
        detector.calibrate(val_loader, strategy="f1")              # threshold by 5-fold CV
        flags = detector.detect(x)                                  # True = likely failure

    ``FailureDetector()`` with no scorer named is :data:`DEFAULT_DETECTOR`; ``FailureDetector(scorer=name)`` is that
    scorer with its own defaults on the penultimate layer; :meth:`paper` is the paper's method.

    Args:
        config: a :class:`DetectorConfig`; or give its fields (and the scorer's settings) as keywords.
        scorer: a registered scorer name or a :class:`~featurefail.scorers.Scorer` instance (its settings are
            then the config's ``scorer_options``; ``PerLayer(s)`` sets ``per_layer=True``).
        output_fn: maps the model's output to logits (models returning tuples, dicts or objects).
        **kwargs: :class:`DetectorConfig` fields; any other keyword is a setting of the scorer (``n_components=``).

    Attributes:
        scorer_: the fitted scorer. model_: the classifier fitted on (or attached at load).
        layers_: the hooked layer(s), ``"auto"`` resolved. n_features_: ``D``.
        head_weight_, head_bias_: ``(C, D)`` and ``(C,)`` of the classifier head when the features are its input.
        threshold_: flag when ``score < threshold_`` (set by :meth:`calibrate`).
        calibration_: the :class:`~featurefail.threshold.ThresholdResult` of the last calibration.
    """

    def __init__(
        self,
        config: DetectorConfig | None = None,
        *,
        scorer: str | Scorer | None = None,
        output_fn: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if config is not None and (kwargs or scorer is not None):
            raise ValueError("give either a DetectorConfig or keyword settings, not both")
        if config is None:
            config = build_config(scorer, kwargs)
        self._scorer_type = (
            type(scorer.base if isinstance(scorer, PerLayer) else scorer)
            if isinstance(scorer, Scorer)
            else scorer_class(config.scorer)
        )
        self.config = config
        self.output_fn = output_fn
        self.new_scorer()  # every setting is checked now, not at fit time
        self.model_: nn.Module | None = None
        self.threshold_: float | None = None
        self.calibration_: ThresholdResult | None = None
        self._fitted: FittedState | None = None
        self._lock = threading.RLock()

    @classmethod
    def paper(cls, n_components: int = 100, **kwargs: Any) -> FailureDetector:
        """The paper's method exactly (:data:`PAPER_DETECTOR`): a class-agnostic diagonal GMM-``n_components`` on the
        raw penultimate features (input of the classifier head), no preprocessing. Other settings as keywords."""
        settings = {k: v for k, v in PAPER_DETECTOR.items() if k != "scorer_options"} | kwargs
        return cls(**settings, n_components=n_components)

    # ---- state ------------------------------------------------------------------------------------------------

    def new_scorer(self) -> Scorer:
        """An unfitted scorer built from ``config`` (wrapped in :class:`~featurefail.scorers.PerLayer` with
        ``per_layer``)."""
        cls = self._scorer_type
        try:
            base = cls(**self.config.scorer_options)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"invalid settings for scorer {self.config.scorer!r}: {exc}") from None
        return PerLayer(base) if self.config.per_layer else base

    def _state(self) -> FittedState:
        if self._fitted is None:
            raise NotFittedError("this FailureDetector is not fitted yet; call fit(model, loader) first")
        return self._fitted

    @property
    def scorer_(self) -> Scorer:
        return self._state().scorer

    @property
    def layers_(self) -> str | list[str | None] | None:
        """The hooked layer(s): ``config.layer`` with ``"auto"`` resolved by ``fit``."""
        fitted = self._fitted
        return fitted.layers if fitted is not None and fitted.layers is not None else self.config.layer

    @property
    def n_features_(self) -> int:
        return self._state().n_features

    @property
    def head_weight_(self) -> torch.Tensor | None:
        return self._state().head_weight if self._fitted is not None else None

    @property
    def head_bias_(self) -> torch.Tensor | None:
        return self._state().head_bias if self._fitted is not None else None

    def is_fitted(self) -> bool:
        return self._fitted is not None

    def _hook(self, model: nn.Module, layers: Any = None) -> FeatureHook:
        pool = None if self.config.pool == "none" else self.config.pool
        return FeatureHook(model, layer=self.layers_ if layers is None else layers, pool=pool, output_fn=self.output_fn)

    def _context(self, fitted: FittedState) -> ModelContext:
        if fitted.model is None:
            return ModelContext(head_weight=fitted.head_weight, head_bias=fitted.head_bias)
        layers = fitted.layers if fitted.layers is not None else self.config.layer
        return ModelContext(fitted.model, lambda m: self._hook(m, layers), fitted.head_weight, fitted.head_bias)

    def _require_model(self) -> nn.Module:
        if self.model_ is None:
            raise RuntimeError("no model is attached; pass model= to FailureDetector.load or call fit")
        return self.model_

    def describe(self, model: nn.Module, example: Any) -> HookPlan:
        """What :meth:`fit` would hook on ``model``, from one forward pass on ``example`` (a small batch), before
        any fitting: the head(s), every layer block's module(s), capture side, layout and width. The model is left
        as it was. ``print(detector.describe(model, x[:2]))`` shows a table."""
        pool = None if self.config.pool == "none" else self.config.pool
        return describe(model, example, layer=self.config.layer, output_fn=self.output_fn, pool=pool)

    def features(self, x: Any, *, batch_fn: Callable | None = None) -> Features:
        """Features of inputs: a tensor batch ``(N, ...)`` (scored in batches) or an iterable of batches."""
        return self._extract(self._fitted, x, batch_fn)

    def _extract(self, fitted: FittedState | None, x: Any, batch_fn: Callable | None) -> Features:
        """Features of inputs through ``fitted``'s model and layers (one snapshot, so a concurrent re-fit cannot
        mix two fits' model, layers and scorer)."""
        model = fitted.model if fitted is not None else None
        if model is None:
            raise RuntimeError("no model is attached; pass model= to FailureDetector.load or call fit")
        layers = fitted.layers if fitted.layers is not None else self.config.layer
        loader = iter_batches(_no_array(x), self.config.batch_size)
        with self._lock:  # forward hooks fire for every caller of the module: one hooked pass at a time
            return extract_features(
                model,
                loader,
                self._hook(model, layers),
                batch_fn=batch_fn,
                keep_inputs=fitted.scorer.requires_inputs,
                progress_bar=self.config.progress and not isinstance(x, torch.Tensor),
            )

    # ---- fitting ----------------------------------------------------------------------------------------------

    def fit(self, model: nn.Module, loader: Iterable, *, batch_fn: Callable | None = None) -> FailureDetector:
        """Extract training features with a hook and fit the scorer (labels are not used by the GMM).

        All or nothing: when anything fails, the detector keeps its previous fit, model and threshold.

        Args:
            model: the trained classifier (not modified; its mode is restored).
            loader: training batches ``x``, ``(x, y)`` or mappings.

        Returns:
            self.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(loader, Iterable) or isinstance(loader, str | bytes):
            raise TypeError(f"loader must be an iterable of batches (DataLoader, list); got {type(loader).__name__}")
        if is_xy_batch(loader):  # one (x, y) batch, as score() takes it
            loader = iter_batches(loader, self.config.batch_size)
        scorer = self.new_scorer()
        hook = self._hook(model, self.config.layer)

        def extract() -> tuple[Features, dict[str, Any]]:
            feats = extract_features(
                model,
                loader,
                hook,
                batch_fn=batch_fn,
                keep_inputs=scorer.requires_inputs,
                progress_bar=self.config.progress,
            )
            weight, bias = penultimate_head(hook) or (None, None)
            # "auto" and lists are stored resolved (each spec with its layout), so as_module() after load needs no probe
            resolve = isinstance(self.config.layer, list) or self.config.layer == "auto"
            layers = hook.resolved_layers if resolve else None
            return feats, {"layers": layers, "weight": weight, "bias": bias}

        # under torch.distributed: this rank's shard (possibly empty; layers and head from a rank with rows)
        feats, found = extract_shard(extract)
        self._commit(self._fit_scorer(scorer, feats, model, found["layers"], found["weight"], found["bias"]))
        return self

    def fit_features(
        self,
        features: Features,
        *,
        model: nn.Module | None = None,
        head: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> FailureDetector:
        """Fit the scorer on precomputed :class:`Features` (all or nothing); returns self.

        Args:
            features: training features (as extracted with this detector's layers).
            model: the classifier, for scorers that need it (``requires_model``) and for :meth:`score` on inputs.
            head: ``(weight (C, D), bias (C,))`` of the classifier head, for scorers and purification that use it.
        """
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        features = _as_features(features)
        weight, bias = _checked_head(head, features)
        self._commit(self._fit_scorer(self.new_scorer(), features, model, None, weight, bias))
        return self

    def _fit_scorer(
        self,
        scorer: Scorer,
        features: Features,
        model: nn.Module | None,
        layers: list[str | None] | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> FittedState:
        if scorer.requires_labels and features.labels is None:
            raise ValueError(f"scorer {scorer.name!r} needs labels to fit; pass a loader that yields (x, y)")
        if scorer.requires_model and model is None:
            raise ValueError(f"scorer {scorer.name!r} needs the model; pass model= to fit_features")
        require_distributable(scorer)
        fingerprint = model_fingerprint(model) if model is not None else None
        require_identical({"model": fingerprint}, "the model (its weights' fingerprint)")
        fitted = FittedState(scorer, model, layers, int(features.feats.shape[1]), weight, bias, fingerprint)
        scorer.attach(self._context(fitted))
        scorer.fit(features)
        synchronise_scorer(scorer)
        return fitted

    def _commit(self, fitted: FittedState) -> None:
        with self._lock:
            self._fitted = fitted
            self.model_ = fitted.model
            self.threshold_ = None
            self.calibration_ = None

    def _validated(self, fitted: FittedState, features: Features) -> tuple[Scorer, Features]:
        """A copy of the fitted scorer that has learned from validation ``features``, and their labelled rows (rows
        labelled ``< 0`` left out; all rows of unlabelled features). A scorer whose ``validation_use_of`` is
        ``"features"`` learns from every row, labelled or not; the others need labels."""
        require_distributable(fitted.scorer, validation=True)
        use = validation_use_of(fitted.scorer)
        if features.labels is None:
            if use != "features":
                raise ValueError("validation features need labels: pass a validation loader that yields (x, y)")
            labelled = features
        else:
            labelled = self._labelled_rows(features, required=use != "features")
        scorer = copy.deepcopy(fitted.scorer)
        scorer.attach(self._context(fitted))
        scorer.fit_validation(features if use == "features" else labelled)
        synchronise_scorer(scorer)
        return scorer, labelled

    @staticmethod
    def _labelled_rows(features: Features, *, required: bool = True) -> Features:
        """The rows of labelled ``features`` whose label is ``>= 0``, each a class the model can predict; with
        ``required``, at least one of them over all ranks."""
        labelled = features.subset(features.labels >= 0)
        if required and total_rows(len(labelled)) == 0:  # under torch.distributed: of all ranks
            raise ValueError("the validation data have no labelled rows; every label is < 0 (unlabelled)")
        if labelled.logits is not None and len(labelled) and int(labelled.labels.max()) >= labelled.logits.shape[1]:
            raise ValueError(
                f"validation labels must be class indices in [0, {labelled.logits.shape[1]}) (or < 0 for unlabelled "
                f"rows); got {int(labelled.labels.max())}: a label the model cannot predict would count as a mistake"
            )
        return labelled

    def _install_scorer(self, fitted: FittedState, scorer: Scorer, threshold: ThresholdResult | None) -> None:
        with self._lock:
            self._fitted = dataclasses.replace(fitted, scorer=scorer)
            self.threshold_ = None if threshold is None else threshold.threshold
            self.calibration_ = threshold

    def fit_validation(self, val_loader: Any, *, batch_fn: Callable | None = None) -> FailureDetector:
        """Let the scorer learn from labelled validation data (temperature, a Mahalanobis ε, fusion weights; the
        conformal fusion's p-values also from unlabelled data) without choosing a threshold (all or nothing; the
        previous threshold is dropped). :meth:`calibrate` does this first."""
        fitted = self._state()
        scorer, _ = self._validated(fitted, self._shard_features(val_loader, batch_fn))
        self._install_scorer(fitted, scorer, None)
        return self

    def calibrate(
        self,
        val_loader: Any,
        strategy: str = "f1",
        folds: int = 5,
        *,
        alpha: float | None = None,
        delta: float | None = None,
        target_risk: float | None = None,
        batch_fn: Callable | None = None,
    ) -> FailureDetector:
        """Choose ``threshold_`` on held-out in-distribution validation data (all or nothing).

        Scorers that learn from validation data (``fit_validation``, e.g. temperature scaling) learn here first,
        on a copy that replaces the fitted scorer only when calibration succeeds. Rows labelled ``< 0``
        (unlabelled) never count as mistakes. A scorer that learns from the validation features alone (the
        conformal fusion) learns from a seeded half of the rows and the threshold is chosen on the other half (on
        the same rows its false alarms exceeded ``alpha``), labelled or not. With ``"fpr"`` on unlabelled data
        (batches without labels, or every label ``< 0``), a scorer that needs labels
        (``"labels"``: ``"auto"`` settings of Mahalanobis and ODIN, the fused scorer) keeps what it learned before
        (at ``fit`` or an earlier labelled ``fit_validation``) and a ``UserWarning`` says so once the threshold is
        set; one that has learned nothing yet (temperature scaling before any labelled data) is a ``ValueError``.

        Strategies (see :func:`~featurefail.threshold.calibrate_threshold`):

        * ``"fpr"`` with ``alpha`` — **guaranteed false-alarm rate** (conformal): for a new input exchangeable with
          the validation inputs, ``P(flagged) <= alpha``; with ``delta``, that holds with probability ``>= 1 - delta``
          over the validation draw (PAC). Needs no labels: every validation row counts.
        * ``"risk"`` with ``target_risk`` (and ``delta``, default 0.05) — **guaranteed selective risk**: with
          probability ``>= 1 - delta`` the error rate among accepted (not flagged) inputs is ``<= target_risk``
          (Geifman & El-Yaniv 2017); the most permissive such threshold. Needs labels.
        * ``"f1"``, ``"recall@0.95"``, ``"fpr@0.05"`` — k-fold cross-validated point estimates (no guarantee).

        Returns:
            self, with ``threshold_`` and ``calibration_`` (a :class:`~featurefail.threshold.ThresholdResult` that
            states its guarantee in ``guarantee``, ``alpha``, ``delta``, ``bound``, ``coverage``).
        """
        fitted = self._state()
        parse_strategy(strategy)
        feats = self._shard_features(val_loader, batch_fn)
        if strategy != "fpr" and feats.labels is None:
            raise ValueError(
                f"strategy {strategy!r} needs labelled validation data: pass a validation loader that yields (x, y) "
                "(only 'fpr' works without labels)"
            )
        unlabelled_note, use, learn = None, validation_use_of(fitted.scorer), feats
        if use == "features":
            # its calibration sets and the threshold from disjoint halves: a row in both scores above a new input
            # (measured: 12.4% false alarms for alpha = 0.1 with 50 rows; benchmarks/conformal_fusion_slack.py)
            learn, feats = self._halves(feats)
        if strategy == "fpr" and (feats.labels is None or total_rows(int((feats.labels >= 0).sum())) == 0):
            wrong = None
            if use == "features":
                scorer, _ = self._validated(fitted, learn)
            elif use == "labels" and not fitted.scorer.is_fitted():
                raise ValueError(
                    f"the {fitted.scorer.name!r} scorer learns from labelled validation data and has not yet: pass "
                    "(x, y) batches to calibrate (or fit_validation) first; these validation data have no labels"
                )
            else:
                scorer = fitted.scorer
                if use == "labels":
                    unlabelled_note = (
                        f"the {fitted.scorer.name!r} scorer learns from labelled validation data (fit_validation) and "
                        "these validation data have no labels: it keeps what it learned before (at fit, or an "
                        "earlier fit_validation with labels); pass (x, y) batches to let it learn"
                    )
        else:
            scorer, labelled = self._validated(fitted, learn)
            if learn is not feats:  # the threshold's half
                labelled = self._labelled_rows(feats, required=strategy != "fpr")
            if strategy != "fpr":
                feats, wrong = labelled, ~labelled.correct
            else:
                wrong = None
        scores = self._score_with(scorer, feats, fitted.n_features) if len(feats) else torch.zeros(0)
        # under torch.distributed: the threshold is chosen on the scores of all ranks (same on every rank)
        scores, wrong = all_gather_rows(scores), None if wrong is None else all_gather_rows(wrong)
        result = calibrate_threshold(
            scores,
            wrong,
            strategy,
            alpha=alpha,
            delta=delta,
            target_risk=target_risk,
            folds=folds,
            seed=self.config.seed or 0,
        )
        if unlabelled_note is not None:
            warnings.warn(unlabelled_note, UserWarning, stacklevel=2)
        self._install_scorer(fitted, scorer, result)
        return self

    def _halves(self, features: Features) -> tuple[Features, Features]:
        """This rank's rows of a seeded half of the union of all ranks' rows (rows in rank order), and the rest:
        the same split as one process would draw on the concatenated shards."""
        first, rest = split_union(len(features), total_rows(len(features)) // 2, self.config.seed or 0)
        return features.subset(first), features.subset(rest)

    def _shard_features(self, val_loader: Any, batch_fn: Callable | None) -> Features:
        """Features of validation data; under ``torch.distributed`` this rank's shard, which may be empty."""
        if isinstance(val_loader, Features):  # under torch.distributed, as extract_shard checks for loaders:
            require_identical({"labels": val_loader.labels is not None}, "whether the validation features have labels")
            return val_loader
        return extract_shard(lambda: (self.features(val_loader, batch_fn=batch_fn), {}))[0]

    # ---- inference --------------------------------------------------------------------------------------------

    @staticmethod
    def _score_with(scorer: Scorer, features: Features, n_features: int) -> torch.Tensor:
        d = features.feats.shape[1]
        if d != n_features:
            raise ValueError(f"features have dimension {d}, expected {n_features} (the fitted dimension)")
        scores = scorer.score(features).detach().float().cpu()
        if scores.shape != (len(features),):
            raise RuntimeError(
                f"scorer {scorer.name!r} returned shape {tuple(scores.shape)}, expected ({len(features)},)"
            )
        return mask_nonfinite(scores, features.feats, features.logits)

    def score_features(self, features: Features | torch.Tensor) -> torch.Tensor:
        """Scores ``(N,)`` of precomputed features, higher = more typical.

        Samples whose features (or logits) hold NaN or infinity get ``-inf``, so :meth:`detect` flags them.

        Raises:
            ValueError: when the feature dimension differs from the one fitted.
        """
        return self._score_fitted(self._state(), features)

    def _score_fitted(self, fitted: FittedState, features: Any) -> torch.Tensor:
        features = _as_features(features)
        if len(features) == 0:
            d = features.feats.shape[1]
            if d != fitted.n_features:
                raise ValueError(f"features have dimension {d}, expected {fitted.n_features} (the fitted dimension)")
            return torch.empty(0)
        return self._score_with(fitted.scorer, features, fitted.n_features)

    def score(self, x: Any, *, batch_fn: Callable | None = None) -> torch.Tensor:
        """Scores ``(N,)`` (CPU float32) of inputs ``x``: a batch ``(N, ...)`` or an iterable of batches.

        Higher = more typical of the training data; for the GMM the log-likelihood of the features
        (or ``-BPD``). Non-finite features score ``-inf``. An empty batch gives an empty tensor.
        """
        return self._score_inputs(self._state(), x, batch_fn)

    def _score_inputs(self, fitted: FittedState, x: Any, batch_fn: Callable | None) -> torch.Tensor:
        if n_rows(_no_array(x)) == 0:
            return torch.empty(0)
        return self._score_fitted(fitted, self._extract(fitted, x, batch_fn))

    def _snapshot(self, threshold: float | None) -> tuple[FittedState, float]:
        """The fitted state and the threshold in use, read together (a concurrent fit or calibrate swaps both)."""
        with self._lock:
            return self._state(), self._threshold(threshold)

    def detect(self, x: Any, threshold: float | None = None, *, batch_fn: Callable | None = None) -> torch.Tensor:
        """``(N,)`` bool, True = likely failure (``score < threshold``; default ``threshold_``)."""
        fitted, t = self._snapshot(threshold)
        return self._score_inputs(fitted, x, batch_fn) < t

    def detect_features(self, features: Features | torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """:meth:`detect` for precomputed features."""
        fitted, t = self._snapshot(threshold)
        return self._score_fitted(fitted, features) < t

    def as_module(self, threshold: float | None = None) -> nn.Module:
        """The attached model and this detector as one module: ``forward(x) -> (logits, score, flag)``.

        The model is rewritten to return the hooked activation with its output, so no Python hook runs at
        inference; the scorer runs as its own module (``scorer_.as_module()``) and the threshold (default
        ``threshold_``; pass ``threshold=float("-inf")`` to flag nothing) is a buffer.

        Raises:
            NotFittedError: before :meth:`calibrate` unless ``threshold`` is given.
            TypeError: when the scorer has no module form.
        """
        from .deploy import DetectorModule, feature_extractor

        fitted = self._state()
        model = self._require_model()
        t = self._threshold(threshold)
        pool = None if self.config.pool == "none" else self.config.pool
        extractor = feature_extractor(model, self.layers_)
        module = DetectorModule(extractor, fitted.scorer.as_module(), t, pool=pool, output_fn=self.output_fn)
        module.calibration = self.calibration_ if threshold is None else None  # the threshold's guarantee, if any
        return module.eval()

    def monitor(
        self, window: int = 1000, false_alarm: float = 0.01, callback: Callable[[Any], Any] | None = None
    ) -> DriftMonitor:
        """A :class:`~featurefail.monitor.DriftMonitor` of this detector's calibrated flag rate: feed it
        ``update(flags)`` or ``update(scores=...)`` in production; it alarms when a window of ``window`` inputs
        holds more flags than the calibration makes plausible (false-alarm probability ``<= false_alarm`` per
        window on inputs exchangeable with the calibration data)."""
        from .monitor import DriftMonitor

        self._state()
        if self.calibration_ is None:
            raise NotFittedError("the detector has no calibrated threshold yet: call calibrate(val_loader) first")
        return DriftMonitor.from_calibration(
            self.calibration_, window=window, false_alarm=false_alarm, callback=callback
        )

    def purify(self, x_or_features: Any, lr: float = 0.1, nu: float = 0.01, steps: int = 100, **kwargs: Any):
        """:func:`featurefail.purify` with this detector (GMM scorer; head = the hooked classifier head)."""
        from .purify import purify

        self._state()
        return purify(self, x_or_features, lr=lr, nu=nu, steps=steps, **kwargs)

    def _threshold(self, threshold: float | None) -> float:
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
            if math.isnan(threshold):
                raise ValueError("threshold is NaN; a NaN threshold would flag nothing")
            return float(threshold)
        self._state()
        if self.threshold_ is None:
            raise NotFittedError("the detector has no threshold yet: call calibrate(val_loader) or pass threshold=")
        return self.threshold_

    # ---- saving -----------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the detector to one safetensors file: tensors plus JSON metadata (config, scalars, version).

        The model is not saved, only its fingerprint; attach it again with ``FailureDetector.load(path, model=model)``.

        Under ``torch.distributed`` every rank must call it: the ranks' detectors are checked to be identical,
        rank 0 alone writes, and every rank returns once the file is written (then ``load`` works on every rank
        that sees ``path``).
        """
        from .persistence import save_detector

        fitted = self._state()
        if is_distributed():
            calibration = json.dumps(self.calibration_.as_dict() if self.calibration_ else None, sort_keys=True)
            require_identical(
                {**fitted.scorer.state_dict(), "threshold": self.threshold_, "calibration": calibration},
                "the fitted detector",
            )
        run_on_rank_zero(lambda: save_detector(self, fitted, path))

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        *,
        output_fn: Callable[[Any], Any] | None = None,
        device: str | None = None,
        check_model: bool = True,
    ) -> FailureDetector:
        """Read a detector written by :meth:`save`; nothing in the file is executed and everything is validated.

        Args:
            path: the file.
            model: the classifier to attach (needed for :meth:`score` on inputs, not on features).
            device: override the saved device (e.g. ``"cpu"`` for a detector fitted on a GPU).
            check_model: refuse a model whose weights differ from those the detector was fitted on (the file
                keeps their SHA-256 fingerprint); ``False`` accepts it.

        Raises:
            ValueError: when the file is not a featurefail detector (a pickle, say), is truncated, damaged, has an
                unsupported format version, or the model does not match.
        """
        from .persistence import load_detector

        return load_detector(cls, path, model, output_fn=output_fn, device=device, check_model=check_model)

    def restore(self, fitted: FittedState, threshold: float | None, calibration: ThresholdResult | None) -> None:
        """Install a fitted state with its threshold (what :meth:`load` does after validating a file)."""
        if fitted.model is not None:
            fitted.scorer.attach(self._context(fitted))
        self._commit(fitted)
        self.threshold_, self.calibration_ = threshold, calibration

    def __repr__(self) -> str:
        state = "fitted" if self._fitted is not None else "not fitted"
        return f"FailureDetector(scorer={self.config.scorer!r}, {state}, threshold={self.threshold_})"


def _no_array(x: Any) -> Any:
    """``x`` unchanged unless it is a NumPy array (TypeError: inputs go through the model as torch tensors)."""
    if isinstance(x, np.ndarray):
        raise TypeError("inputs are a NumPy array; pass a torch tensor, e.g. torch.from_numpy(x).float()")
    return x


def _checked_head(head: Any, features: Features) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(weight (C, D_0), bias (C,))`` as given to ``fit_features``, checked against the features' first block."""
    if head is None:
        return None, None
    if not (isinstance(head, tuple | list) and len(head) == 2 and all(isinstance(t, torch.Tensor) for t in head)):
        raise TypeError("head must be a pair of tensors (weight (C, D), bias (C,))")
    weight, bias = head
    width = features.blocks[0] if features.blocks else features.feats.shape[1]
    if weight.ndim != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],):
        raise ValueError(
            f"head must be weight (C, {width}) and bias (C,) for these features; got weight {tuple(weight.shape)} "
            f"and bias {tuple(bias.shape)}"
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ValueError("the head's weight or bias holds NaN or infinite values")
    return weight, bias


def _as_features(features: Any) -> Features:
    """:class:`Features` from Features, or from a ``(N, D)`` tensor or NumPy array of features."""
    if isinstance(features, Features):
        return features
    if isinstance(features, torch.Tensor | np.ndarray):
        return Features(torch.as_tensor(features))
    raise TypeError(f"features must be Features or an (N, D) tensor, got {type(features).__name__}")


def score(detector: FailureDetector, x: Any) -> torch.Tensor:
    """``detector.score(x)``: ``(N,)`` scores, higher = more typical."""
    return detector.score(x)


def detect(detector: FailureDetector, x: Any, threshold: float | None = None) -> torch.Tensor:
    """``detector.detect(x)``: ``(N,)`` bool, True = likely failure."""
    return detector.detect(x, threshold)
