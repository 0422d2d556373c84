"""The :class:`Scorer` base class every detection method derives from, and the registry of named scorers.

A scorer's **settings** are the keyword arguments of its ``__init__``: stored as given under the same names
(scikit-learn style), validated declaratively from their annotations (``Annotated[int, Field(ge=1)]``,
``Literal[...]``) by pydantic when the scorer is built, and read back by :meth:`Scorer.get_params`. Fitted state
ends with an underscore. The base class gives every scorer its defaults (``requires_*`` flags, a no-op
``fit_validation``/``attach``, settings, state packing, ``repr``), so a scorer writes only its method.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BeforeValidator, ConfigDict, validate_call
from torch import nn

from ..distributed import total_rows, union_labels
from ..exceptions import NotFittedError
from ..features import Features

__all__ = [
    "DTypeName",
    "ModelContext",
    "Scorer",
    "ValidationUse",
    "available_scorers",
    "build_scorer",
    "check_features",
    "get_scorer",
    "register_scorer",
    "scorer_class",
    "scorer_settings",
    "validation_use_of",
]

_VALIDATION = ConfigDict(arbitrary_types_allowed=True)


def _dtype_name(value: Any) -> Any:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


#: A floating dtype setting, stored by name (``torch.float64`` is accepted and stored as ``"float64"``).
DTypeName = Annotated[Literal["float32", "float64"], BeforeValidator(_dtype_name)]
ValidationUse = Literal["nothing", "features", "labels"]


@dataclass(frozen=True)
class ModelContext:
    """What a scorer may receive from the detector besides features (see :meth:`Scorer.attach`).

    Attributes:
        model: the classifier, or None when the detector works on precomputed features only.
        make_hook: builds the detector's :class:`~featurefail.FeatureHook` on a model (same layers, pooling).
        head_weight, head_bias: ``(C, D)`` and ``(C,)``: the linear map from the features to the logits when the
            hooked features are the input of the classifier head, else None.
        block: the columns of this scorer's layer block in the detector's features (set by
            :class:`~featurefail.scorers.PerLayer`), or None for all columns.
    """

    model: nn.Module | None = None
    make_hook: Callable[[nn.Module], Any] | None = None
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None
    block: slice | None = None

    def with_block(self, block: slice) -> ModelContext:
        return ModelContext(self.model, self.make_hook, self.head_weight, self.head_bias, block)

    def input_batches(self, features: Features, batch_size: int, who: str) -> Iterator[tuple[torch.Tensor, Any]]:
        """``(x (B, ...), hook)`` per batch of ``features.inputs``, ``x`` on the model's device and ``hook`` the
        detector's hook on the model (``hook(x) -> (feats, logits)``), for scorers that perturb the inputs. The
        hook is removed when the iteration ends; iterate inside ``contextlib.closing(...)`` so that it is also
        removed at once when the loop body raises. No inputs (an empty shard): no batch.

        Raises:
            ValueError: when ``features`` holds no inputs.
            RuntimeError: when no model was attached.
        """
        if features.inputs is None:
            raise ValueError(f"{who} needs the inputs (features.inputs)")
        if self.model is None or self.make_hook is None:
            raise RuntimeError(
                f"{who} needs the model: use it through FailureDetector (which attaches it) "
                "or call attach(ModelContext(model, make_hook))"
            )
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if len(features.inputs) == 0:  # a rank's empty shard: no forward pass on zero rows
            return
        with self.make_hook(self.model) as hook:
            for x in torch.split(features.inputs, batch_size):
                yield x.to(device), hook


class Scorer:
    """Base of every detection method. Sign convention everywhere: **higher score = more normal**.

    A subclass sets ``name`` (the registry name) and implements :meth:`fit` and :meth:`score`; it overrides the
    rest only when it needs to:

    * ``requires_labels``: ``fit`` needs ``features.labels``; ``requires_logits``: fit/score need logits;
      ``requires_inputs``: ``features.inputs`` must be kept (input-space scorers, input preprocessing);
      ``requires_model``: :meth:`attach` must receive the model (gradients through it).
    * :meth:`fit_validation`: learn from in-distribution validation features (``FailureDetector.calibrate``
      calls it before choosing the threshold), with :meth:`validation_use` saying whether it needs their labels.
    * :meth:`attach`: receive a :class:`ModelContext` (model, hook factory, head weights).
    * :meth:`state_dict` / :meth:`load_state_dict`: fitted state as tensors and plain numbers (safetensors).
    * :meth:`as_module`: the scoring as ``nn.Module(feats, logits) -> (N,)`` for deployment (``as_module()``,
      export), differentiable in ``feats`` where the score is (purification uses it).
    * ``supports_distributed``: set True **on the class itself** (it is not inherited, see :meth:`distributable`)
      when ``fit`` and ``fit_validation`` reduce every data statistic over ranks with
      :mod:`featurefail.distributed`, so that under ``torch.distributed`` all ranks fit one scorer on the union
      of their shards. Without it, fitting under a process group of two or more ranks raises.
    """

    name: ClassVar[str] = ""
    requires_labels: ClassVar[bool] = False
    requires_logits: ClassVar[bool] = False
    requires_inputs: bool = False
    requires_model: bool = False
    setting_attributes: ClassVar[dict[str, str]] = {}  # a setting stored under another attribute name
    supports_distributed: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = validate_call(config=_VALIDATION)(cls.__dict__["__init__"])  # type: ignore[method-assign]

    # ---- settings ---------------------------------------------------------------------------------------------

    @classmethod
    def setting_names(cls) -> list[str]:
        """The names of this scorer's settings (its ``__init__`` keyword arguments)."""
        params = inspect.signature(cls.__init__).parameters
        return [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict[str, Any]:
        """The settings as stored (JSON-serialisable), keyed by their ``__init__`` names."""
        return {
            name: _jsonable(getattr(self, self.setting_attributes.get(name, name))) for name in self.setting_names()
        }

    def get_config(self) -> dict[str, Any]:
        """Alias of :meth:`get_params` (what a saved detector records)."""
        return self.get_params()

    # ---- the method -------------------------------------------------------------------------------------------

    def fit(self, features: Features) -> Scorer:
        """Learn from training (in-distribution) features; returns self."""
        raise NotImplementedError(f"{type(self).__name__} must implement fit(features)")

    def score(self, features: Features) -> torch.Tensor:
        """``(N,)`` scores, higher = more normal."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(features)")

    def fit_validation(self, features: Features) -> Scorer:
        """Learn from labelled in-distribution validation features (default: nothing to learn)."""
        return self

    def validation_use(self) -> ValidationUse:
        """What :meth:`fit_validation` learns from, with the current settings: ``"nothing"`` (the default),
        ``"features"`` (validation features; labels unused) or ``"labels"`` (labelled validation features). On
        unlabelled validation data ``FailureDetector.calibrate(strategy="fpr")`` runs ``fit_validation`` for
        ``"features"`` and warns for ``"labels"`` (the scorer then keeps what it learned before). Override it
        with ``fit_validation``; the detector reads it through :func:`validation_use_of`."""
        return "nothing"

    def attach(self, context: ModelContext) -> None:
        """Receive the model, the detector's hook factory and the head weights (default: not needed)."""

    def distributable(self) -> bool:
        """True when this scorer's class itself declares ``supports_distributed = True``: a subclass that
        changes ``fit`` must declare it again, so an unchecked fit never runs per rank."""
        return type(self).__dict__.get("supports_distributed", False) is True

    # ---- fitted state -----------------------------------------------------------------------------------------

    def is_fitted(self) -> bool:
        """True once :meth:`fit` (or :meth:`load_state_dict`) has run."""
        return any(k.endswith("_") and not k.startswith("_") for k in vars(self))

    def check_fitted(self) -> None:
        """Raise :class:`~featurefail.NotFittedError` unless fitted."""
        if not self.is_fitted():
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(features) first")

    def state_dict(self) -> dict[str, Any]:
        """Fitted state: tensors and plain numbers (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> Scorer:
        """Restore what :meth:`state_dict` returned; returns self."""
        if state:
            raise ValueError(f"{type(self).__name__} has no fitted state, got keys {sorted(state)[:5]}")
        return self

    def as_module(self) -> nn.Module:
        """The scoring as ``nn.Module(feats, logits) -> (N,)``."""
        raise TypeError(f"scorer {self.name!r} has no module form; it cannot be deployed with as_module()")

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({settings})"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"setting value {value} is not a finite number")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"setting value of type {type(value).__name__} is not serialisable; use numbers and strings")


_REGISTRY: dict[str, type[Scorer]] = {}


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: make a :class:`Scorer` subclass available as ``FailureDetector(scorer=name)``.

    A name already taken by another class is refused (replacing ``"gmm"`` would change every default detector in
    the process); the same class defined again (a reloaded module) replaces its earlier definition."""

    def add(cls: type[Scorer]) -> type[Scorer]:
        if not (isinstance(cls, type) and issubclass(cls, Scorer)):
            raise TypeError(f"{cls!r} must subclass featurefail.scorers.Scorer to be registered")
        taken = _REGISTRY.get(name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(
                f"scorer name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; register "
                f"{cls.__qualname__} under another name"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available_scorers() -> list[str]:
    """Names accepted by :func:`get_scorer`."""
    return sorted(_REGISTRY)


def scorer_class(name: str) -> type[Scorer]:
    """The registered class of ``name``; ``ValueError`` listing the names when unknown."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(available_scorers())}")
    return _REGISTRY[name]


def scorer_settings(name: str) -> list[str]:
    """The setting names of the registered scorer ``name``."""
    return scorer_class(name).setting_names()


def build_scorer(name: str, settings: dict[str, Any] | None = None) -> Scorer:
    """``name``'s scorer built from ``settings``; a setting it does not take is a ``ValueError`` naming both."""
    cls = scorer_class(name)
    settings = dict(settings or {})
    known = cls.setting_names()
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise ValueError(
            f"scorer {name!r} has no setting {unknown[0]!r}; its settings are: {', '.join(known) or 'none'}"
        )
    try:
        return cls(**settings)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"invalid settings for scorer {name!r}: {exc}") from None


def get_scorer(name: str | Scorer, **settings: Any) -> Scorer:
    """A scorer from a registered name (built with ``settings``), or a :class:`Scorer` instance as is."""
    if isinstance(name, Scorer):
        if settings:
            raise ValueError("settings are only used with a scorer name, not with a scorer instance")
        return name
    if not isinstance(name, str):
        raise TypeError(f"{type(name).__name__} is not a Scorer; subclass featurefail.scorers.Scorer")
    return build_scorer(name, settings)


def validation_use_of(scorer: Scorer) -> ValidationUse:
    """``scorer.validation_use()``, on the safe side: ``"labels"`` when the class that defines ``fit_validation``
    comes below (in the method resolution order) the one that defines ``validation_use`` — a subclass that learns
    from validation data without saying from what — so an unlabelled calibration warns instead of skipping it
    silently. Raises ``ValueError`` for an answer other than ``"nothing"``, ``"features"``, ``"labels"``."""
    mro = type(scorer).__mro__
    learns_at = next(i for i, cls in enumerate(mro) if "fit_validation" in cls.__dict__)
    says_at = next(i for i, cls in enumerate(mro) if "validation_use" in cls.__dict__)
    if learns_at < says_at:
        return "labels"
    use = scorer.validation_use()
    if use not in ("nothing", "features", "labels"):
        raise ValueError(
            f"{type(scorer).__name__}.validation_use() returned {use!r}; expected 'nothing', 'features' or 'labels'"
        )
    return use


def check_features(features: Features, *, labels: bool = False, logits: bool = False, who: str = "scorer") -> None:
    """Raise a clear ``ValueError`` when ``features`` lack what a scorer needs or hold non-finite values.

    Under ``torch.distributed`` the class count and the non-finite rows are those of all ranks (a collective:
    every rank calls it, as every rank calls ``fit``), so a shard holding one class is fine and every rank
    raises alike.
    """
    if logits and features.logits is None:
        raise ValueError(f"{who} needs logits; these features have none")
    if labels:
        if features.labels is None:
            raise ValueError(f"{who} needs labels to fit; pass a loader that yields (x, y)")
        if union_labels(features.labels[features.labels >= 0]).numel() < 2:
            raise ValueError(f"{who} needs at least two classes in the labels to fit")
    bad = total_rows(int((~torch.isfinite(features.feats)).any(dim=1).sum()))
    if bad:
        raise ValueError(f"the features hold {bad} row(s) with NaN or infinite values; remove them before fit")
