"""FailureDetector: model -> hook -> features -> scorer -> scores -> threshold."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from .exceptions import NotFittedError
from .features import Features, extract_features
from .hooks import FeatureHook
from .scorers.base import Scorer, get_scorer
from .threshold import ThresholdResult, cross_validate_threshold, parse_strategy

__all__ = ["DetectorConfig", "FailureDetector", "detect", "score"]

FORMAT_NAME = "featurefail-detector"
FORMAT_VERSION = 1


class DetectorConfig(BaseModel):
    """Settings of a :class:`FailureDetector`, validated on construction.

    The GMM fields configure the default ``"gmm"`` scorer; ``scorer_options`` are the keyword arguments of
    any other registered scorer.

    Defaults of the GMM scorer (chosen by the study in ``docs/results.md``: the best mean AUROC over all
    failure sources on the reference CIFAR-10 models): ``layer="auto"`` (the penultimate layer plus two earlier
    stage ends), ``preprocess="l2"`` and ``per_layer=True`` (one mixture per layer on L2-normalised features,
    log-likelihoods summed). Other scorers default to ``layer=None``, and :meth:`FailureDetector.paper` is the
    paper's method (raw penultimate features, one mixture) exactly.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    scorer: str = Field("gmm", description="registered scorer name")
    n_components: int = Field(100, ge=1, description="GMM components K")
    max_iter: int = Field(100, ge=1)
    tol: float = Field(1e-3, ge=0.0)
    reg_covar: float = Field(1e-6, gt=0.0, description="relative variance floor of the GMM")
    init: Literal["kmeans++", "random_from_data"] = "kmeans++"
    n_init: int = Field(1, ge=1)
    chunk_size: int | None = Field(None, ge=1)
    score: Literal["loglik", "bpd"] = Field("loglik", description="GMM score: log-likelihood or -bits/dim")
    preprocess: str | None = Field(
        None,
        description="GMM feature preprocessing: standardize, pca[:kept], l2, tanh (default for the gmm scorer: l2)",
    )
    per_layer: bool = Field(
        False,
        description="GMM over several layers: one preprocessing + mixture per layer, log-likelihoods summed "
        "(default for the gmm scorer: True)",
    )
    scorer_options: dict[str, Any] = Field(default_factory=dict)
    layer: str | list[str | None] | None = Field(
        None,
        description="dotted module name; None = input of the last nn.Linear; a list = several layers, pooled and "
        "concatenated (None in the list = the penultimate layer); 'auto' = the penultimate layer plus the ends of "
        "the two spatial stages before the last (resolved at fit time into layers_; the gmm scorer's default)",
    )
    pool: Literal["avg", "flatten", "none"] = "avg"
    device: str | None = Field(None, description="where scorers run; None = the features' device (CPU)")
    seed: int | None = 0
    batch_size: int = Field(256, ge=1, description="batch size when scoring a tensor of inputs")
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _gmm_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("scorer", "gmm") == "gmm":
            data = {"layer": "auto", "preprocess": "l2", "per_layer": True, **data}
        return data

    @field_validator("layer")
    @classmethod
    def _valid_layer(cls, value: str | list[str | None] | None) -> str | list[str | None] | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("layer is an empty list; name at least one layer (None = the penultimate one)")
            if len(set(value)) != len(value):
                raise ValueError(f"layer lists a module twice: {value}")
            if len(value) == 1:
                return value[0]
        return value

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                torch.device(value)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"{value!r} is not a torch device") from exc
        return value

    def scorer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``get_scorer(self.scorer, ...)``."""
        if self.scorer == "gmm":
            return dict(
                n_components=self.n_components,
                score=self.score,
                max_iter=self.max_iter,
                tol=self.tol,
                reg_covar=self.reg_covar,
                init=self.init,
                n_init=self.n_init,
                chunk_size=self.chunk_size,
                random_state=self.seed,
                device=self.device,
                preprocess=self.preprocess,
                per_layer=self.per_layer,
            ) | dict(self.scorer_options)
        return dict(self.scorer_options)


class FailureDetector:
    """Flag the inputs a classifier is likely to get wrong, from the density of its penultimate features.

    Typical use::

        detector = FailureDetector(n_components=100).fit(model, train_loader)   # labels unused
        detector.calibrate(val_loader, strategy="f1")                          # threshold by 5-fold CV
        flags = detector.detect(x)                                              # True = likely failure

    Args:
        config: a :class:`DetectorConfig`; or give its fields as keywords.
        scorer: a registered scorer name or an object following :class:`~featurefail.scorers.Scorer`
            (default ``"gmm"``, the paper's class-agnostic GMM).
        output_fn: maps the model's output to logits (models returning tuples or dicts).
        **kwargs: :class:`DetectorConfig` fields.

    Attributes:
        scorer_: the fitted scorer.
        model_: the classifier the detector was fitted on (or attached at load).
        head_weight_, head_bias_: ``(C, D)`` and ``(C,)`` of the hooked ``nn.Linear`` when the hook sits on
            one (used by :meth:`purify`), else None.
        n_features_: ``D``.
        threshold_: flag when ``score < threshold_`` (set by :meth:`calibrate`).
        calibration_: the :class:`~featurefail.threshold.ThresholdResult` of the last calibration.
    """

    def __init__(
        self,
        config: DetectorConfig | None = None,
        *,
        scorer: str | Scorer | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        if config is not None and kwargs:
            raise ValueError("give either a DetectorConfig or keyword settings, not both")
        if scorer is not None and not isinstance(scorer, str):
            self._scorer_instance: Scorer | None = get_scorer(scorer)
            kwargs["scorer"] = getattr(scorer, "name", type(scorer).__name__)
        else:
            self._scorer_instance = None
            if scorer is not None:
                kwargs["scorer"] = scorer
        try:
            self.config = config if config is not None else DetectorConfig(**kwargs)
        except ValidationError as exc:
            raise ValueError(f"invalid FailureDetector settings:\n{exc}") from None
        self.output_fn = output_fn
        self.model_: nn.Module | None = None
        self.threshold_: float | None = None
        self.calibration_: ThresholdResult | None = None
        self.head_weight_: torch.Tensor | None = None
        self.head_bias_: torch.Tensor | None = None
        self._forward_lock = threading.Lock()
        self._layers: list[str | None] | None = None

    @classmethod
    def paper(cls, n_components: int = 100, **kwargs: Any) -> FailureDetector:
        """The paper's method exactly: a class-agnostic diagonal GMM-``n_components`` on the raw penultimate
        features (input of the last ``nn.Linear``), no preprocessing. Other settings as keywords."""
        settings = {"scorer": "gmm", "layer": None, "preprocess": None, "per_layer": False}
        settings |= kwargs | {"n_components": n_components}
        return cls(**settings)

    # ---- plumbing ---------------------------------------------------------------------------------------------

    def _new_scorer(self) -> Scorer:
        if self._scorer_instance is not None:
            return self._scorer_instance
        return get_scorer(self.config.scorer, **self.config.scorer_kwargs())

    @property
    def layers_(self) -> str | list[str | None] | None:
        """The hooked layer(s): ``config.layer`` with ``"auto"`` resolved by ``fit``."""
        return self._layers if self._layers is not None else self.config.layer

    def _hook(self, model: nn.Module) -> FeatureHook:
        pool = None if self.config.pool == "none" else self.config.pool
        return FeatureHook(model, layer=self.layers_, pool=pool, output_fn=self.output_fn)

    def _check_fitted(self) -> None:
        if not hasattr(self, "scorer_"):
            raise NotFittedError("this FailureDetector is not fitted yet; call fit(model, loader) first")

    def _require_model(self) -> nn.Module:
        if self.model_ is None:
            raise RuntimeError("no model is attached; pass model= to FailureDetector.load or call fit")
        return self.model_

    def features(self, x: Any, *, batch_fn: Callable | None = None) -> Features:
        """Features of inputs: a tensor batch ``(N, ...)`` (scored in batches) or an iterable of batches."""
        model = self._require_model()
        loader: Iterable
        if isinstance(x, torch.Tensor):
            loader = [(chunk,) for chunk in torch.split(x, self.config.batch_size)]
        else:
            loader = x
        needs_inputs = bool(getattr(getattr(self, "scorer_", None), "requires_inputs", False))
        # forward hooks fire for every caller of the module: one hooked pass at a time per detector
        # (as_module() needs no hooks and no lock)
        with self._forward_lock:
            return extract_features(
                model,
                loader,
                self._hook(model),
                batch_fn=batch_fn,
                keep_inputs=needs_inputs,
                progress_bar=self.config.progress and not isinstance(x, torch.Tensor),
            )

    # ---- fitting ----------------------------------------------------------------------------------------------

    def fit(self, model: nn.Module, loader: Iterable, *, batch_fn: Callable | None = None) -> FailureDetector:
        """Extract training features with a hook and fit the scorer (labels are not used by the GMM).

        Args:
            model: the trained classifier (not modified; its mode is restored).
            loader: training batches ``x``, ``(x, y)`` or mappings.

        Returns:
            self.
        """
        self.model_ = model
        self._layers = None
        hook = self._hook(model)
        scorer = self._new_scorer()
        attach = getattr(scorer, "attach", None)
        if callable(attach):
            attach(model, self._hook)
        feats = extract_features(
            model,
            loader,
            hook,
            batch_fn=batch_fn,
            keep_inputs=bool(getattr(scorer, "requires_inputs", False)),
            progress_bar=self.config.progress,
        )
        if self.config.layer == "auto":
            self._layers = hook.resolved_layers
        if hook.head is not None:
            self.head_weight_ = hook.head.weight.detach().float().cpu().clone()
            self.head_bias_ = (
                hook.head.bias.detach().float().cpu().clone()
                if hook.head.bias is not None
                else torch.zeros(hook.head.weight.shape[0])
            )
        else:
            self.head_weight_ = self.head_bias_ = None
        return self.fit_features(feats, scorer=scorer)

    def fit_features(self, features: Features, *, scorer: Scorer | None = None) -> FailureDetector:
        """Fit the scorer on precomputed :class:`Features` (no model needed); returns self."""
        scorer = scorer or self._new_scorer()
        if getattr(scorer, "requires_labels", False) and features.labels is None:
            raise ValueError(f"scorer {scorer.name!r} needs labels to fit; pass a loader that yields (x, y)")
        scorer.fit(features)
        self.scorer_ = scorer
        self.n_features_ = int(features.feats.shape[1])
        self.threshold_ = None
        self.calibration_ = None
        return self

    def calibrate(
        self, val_loader: Any, strategy: str = "f1", folds: int = 5, *, batch_fn: Callable | None = None
    ) -> FailureDetector:
        """Choose ``threshold_`` by k-fold cross-validation on labelled validation data.

        Positives are the model's mistakes (``argmax logits != y``). Scorers that learn from labelled validation
        data (those with a ``fit_validation`` method, e.g. temperature scaling) are fitted on it here first.

        Args:
            val_loader: validation batches with labels (or precomputed :class:`Features`).
            strategy: ``"f1"``, ``"recall@0.95"`` (flag at least 95% of mistakes) or ``"fpr@0.05"`` (flag at
                most 5% of correct samples), any target in (0, 1].
            folds: number of folds.

        Returns:
            self, with ``threshold_`` and ``calibration_`` (cross-validated precision and recall).
        """
        self._check_fitted()
        parse_strategy(strategy)
        feats = val_loader if isinstance(val_loader, Features) else self.features(val_loader, batch_fn=batch_fn)
        if feats.labels is None:
            raise ValueError("calibrate needs labels: pass a validation loader that yields (x, y)")
        fit_validation = getattr(self.scorer_, "fit_validation", None)
        if callable(fit_validation):
            fit_validation(feats)
        scores = self.score_features(feats)
        result = cross_validate_threshold(
            scores, ~feats.correct, strategy=strategy, folds=folds, seed=self.config.seed or 0
        )
        self.threshold_ = result.threshold
        self.calibration_ = result
        return self

    # ---- inference --------------------------------------------------------------------------------------------

    def score_features(self, features: Features | torch.Tensor) -> torch.Tensor:
        """Scores ``(N,)`` of precomputed features, higher = more typical.

        Samples whose features (or logits) hold NaN or infinity get ``-inf``, so :meth:`detect` flags them.

        Raises:
            ValueError: when the feature dimension differs from the one fitted.
        """
        self._check_fitted()
        if isinstance(features, torch.Tensor):
            features = Features(features)
        d = features.feats.shape[1]
        if d != self.n_features_:
            raise ValueError(f"features have dimension {d}, expected {self.n_features_} (the fitted dimension)")
        bad = ~torch.isfinite(features.feats).all(dim=1)
        if features.logits is not None:
            bad |= ~torch.isfinite(features.logits).all(dim=1)
        scores = self.scorer_.score(features).detach().float().cpu()
        if scores.shape != (len(features),):
            raise RuntimeError(
                f"scorer {self.scorer_.name!r} returned shape {tuple(scores.shape)}, expected ({len(features)},)"
            )
        bad |= torch.isnan(scores)
        return torch.where(bad, torch.full_like(scores, -math.inf), scores)

    def score(self, x: Any, *, batch_fn: Callable | None = None) -> torch.Tensor:
        """Scores ``(N,)`` (CPU float32) of inputs ``x``: a batch ``(N, ...)`` or an iterable of batches.

        Higher = more typical of the training data; for the GMM the log-likelihood of the features
        (or ``-BPD``). Non-finite features score ``-inf``.
        """
        self._check_fitted()
        return self.score_features(self.features(x, batch_fn=batch_fn))

    def detect(self, x: Any, threshold: float | None = None, *, batch_fn: Callable | None = None) -> torch.Tensor:
        """``(N,)`` bool, True = likely failure (``score < threshold``; default ``threshold_``)."""
        t = self._threshold(threshold)
        return self.score(x, batch_fn=batch_fn) < t

    def detect_features(self, features: Features | torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """:meth:`detect` for precomputed features."""
        return self.score_features(features) < self._threshold(threshold)

    def as_module(self, threshold: float | None = None) -> nn.Module:
        """The attached model and this detector as one module: ``forward(x) -> (logits, score, flag)``.

        The model is rewritten with ``torch.fx`` to return the hooked activation with its output, so no Python
        hook runs at inference; the scorer runs as its own module (``scorer_.as_module()``) and the threshold
        (default ``threshold_``) is a buffer. Works with ``torch.jit.trace``, ``torch.export`` and
        ``torch.compile`` where the model does, on any device (``.to(device)``).

        Raises:
            ValueError: when the model cannot be traced by ``torch.fx``; TypeError when the scorer has no
                ``as_module()``.
        """
        from .deploy import DetectorModule, feature_extractor

        self._check_fitted()
        model = self._require_model()
        make = getattr(self.scorer_, "as_module", None)
        if not callable(make):
            raise TypeError(f"scorer {self.scorer_.name!r} has no as_module(); it cannot be deployed as a module")
        t = self._threshold(threshold) if (threshold is not None or self.threshold_ is not None) else -math.inf
        pool = None if self.config.pool == "none" else self.config.pool
        extractor = feature_extractor(model, self.layers_)
        return DetectorModule(extractor, make(), t, pool=pool, output_fn=self.output_fn).eval()

    def purify(self, x_or_features: Any, lr: float = 0.1, nu: float = 0.01, steps: int = 100, **kwargs: Any):
        """:func:`featurefail.purify` with this detector (GMM scorer; head = the hooked ``nn.Linear``)."""
        from .purify import purify

        self._check_fitted()
        return purify(self, x_or_features, lr=lr, nu=nu, steps=steps, **kwargs)

    def _threshold(self, threshold: float | None) -> float:
        if threshold is not None:
            return float(threshold)
        if self.threshold_ is None:
            raise NotFittedError("no threshold: call calibrate(val_loader) or pass threshold=")
        return self.threshold_

    # ---- saving -----------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the detector to one safetensors file: tensors plus JSON metadata (config, scalars, version).

        The model is not saved; attach it again with ``FailureDetector.load(path, model=model)``.
        """
        from safetensors.torch import save_file

        self._check_fitted()
        for method in ("state_dict", "get_config"):
            if not callable(getattr(self.scorer_, method, None)):
                raise TypeError(f"scorer {self.scorer_.name!r} has no {method}(); it cannot be saved")
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for key, value in self.scorer_.state_dict().items():
            if isinstance(value, torch.Tensor):
                tensors[f"scorer.{key}"] = value.detach().cpu().contiguous()
            elif isinstance(value, bool | int | float | str) or value is None:
                scalars[key] = value
            else:
                raise TypeError(f"scorer state {key!r} is a {type(value).__name__}; only tensors and numbers")
        if self.head_weight_ is not None and self.head_bias_ is not None:
            tensors["head.weight"] = self.head_weight_.contiguous()
            tensors["head.bias"] = self.head_bias_.contiguous()
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "config": self.config.model_dump_json(),
            "scorer": self.scorer_.name,
            "scorer_config": json.dumps(self.scorer_.get_config()),
            "scorer_scalars": json.dumps(scalars),
            "n_features": str(self.n_features_),
            "threshold": json.dumps(self.threshold_),
            "calibration": json.dumps(self.calibration_.as_dict() if self.calibration_ else None),
            "layers": json.dumps(self._layers),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        *,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        device: str | None = None,
    ) -> FailureDetector:
        """Read a detector written by :meth:`save`; nothing in the file is executed.

        Args:
            path: the file.
            model: the classifier to attach (needed for :meth:`score` on inputs, not on features).
            device: override the saved device (e.g. ``"cpu"`` for a detector fitted on a GPU).

        Raises:
            ValueError: when the file is not a featurefail detector (a pickle, say), is truncated, or has an
                unsupported format version.
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable featurefail detector (safetensors) file: {exc}") from None
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is a safetensors file but not a featurefail detector")
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ValueError(
                f"{path} has detector format version {version}; this featurefail reads version {FORMAT_VERSION}"
            )
        try:
            config = DetectorConfig.model_validate_json(metadata["config"])
            if device is not None:
                config.device = device
            scorer_config = json.loads(metadata["scorer_config"])
            if metadata["scorer"] == "gmm" and device is not None:
                scorer_config["device"] = device
            scalars = json.loads(metadata["scorer_scalars"])
            threshold = json.loads(metadata["threshold"])
            calibration = json.loads(metadata["calibration"])
            n_features = int(metadata["n_features"])
            layers = json.loads(metadata.get("layers", "null"))
            if layers is not None and not (
                isinstance(layers, list) and all(isinstance(v, str) or v is None for v in layers)
            ):
                raise ValueError(f"layers must be a list of module names, got {layers!r}")
        except (KeyError, ValueError, ValidationError) as exc:
            raise ValueError(f"{path} has damaged detector metadata: {exc}") from None
        detector = cls(config, output_fn=output_fn)
        scorer = get_scorer(metadata["scorer"], **scorer_config)
        state = {k[len("scorer.") :]: v for k, v in tensors.items() if k.startswith("scorer.")}
        state.update(scalars)
        scorer.load_state_dict(state)  # type: ignore[attr-defined]
        attach = getattr(scorer, "attach", None)
        if callable(attach) and model is not None:
            attach(model, detector._hook)
        detector.scorer_ = scorer
        detector._layers = layers
        detector.n_features_ = n_features
        detector.threshold_ = None if threshold is None else float(threshold)
        detector.calibration_ = ThresholdResult(**calibration) if calibration else None
        detector.head_weight_ = tensors.get("head.weight")
        detector.head_bias_ = tensors.get("head.bias")
        detector.model_ = model
        return detector

    def __repr__(self) -> str:
        state = "fitted" if hasattr(self, "scorer_") else "not fitted"
        return f"FailureDetector(scorer={self.config.scorer!r}, {state}, threshold={self.threshold_})"


def score(detector: FailureDetector, x: Any) -> torch.Tensor:
    """``detector.score(x)``: ``(N,)`` scores, higher = more typical."""
    return detector.score(x)


def detect(detector: FailureDetector, x: Any, threshold: float | None = None) -> torch.Tensor:
    """``detector.detect(x)``: ``(N,)`` bool, True = likely failure."""
    return detector.detect(x, threshold)
