"""The Scorer protocol every detection method follows, and the registry of named scorers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from ..features import Features

__all__ = ["Scorer", "available_scorers", "get_scorer", "register_scorer"]


@runtime_checkable
class Scorer(Protocol):
    """What a detection method must provide; the detector calls nothing else.

    Sign convention everywhere: **higher score = more normal** (more likely to be classified correctly).

    Required:
        name: a short identifier.
        requires_labels: whether ``fit`` needs ``features.labels``.
        fit(features) -> self: learn from training (or validation) :class:`~featurefail.Features`.
        score(features) -> Tensor: ``(N,)`` scores, higher = more normal.

    Optional, read with ``getattr`` (a plain class may omit them):
        requires_inputs: ``features.inputs`` must be kept (input-space scorers such as PixelCNN).
        fit_validation(features) -> self: learn from labelled validation features (temperature scaling, a
            Mahalanobis ε); ``FailureDetector.calibrate`` calls it before choosing the threshold.
        attach(model, make_hook): receive the classifier and the detector's hook factory, for scorers that
            need gradients through the model or other layers (Mahalanobis preprocessing).
        get_config() -> dict: JSON-able constructor arguments, and state_dict() / load_state_dict(state):
            tensors and plain numbers, so that a detector using the scorer can be saved and loaded.
    """

    name: str
    requires_labels: bool

    def fit(self, features: Features) -> Scorer: ...

    def score(self, features: Features) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str) -> Callable[[type], type]:
    """Class decorator: make a scorer available to :func:`get_scorer` and ``FailureDetector(scorer=name)``."""

    def add(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return add


def available_scorers() -> list[str]:
    """Names accepted by :func:`get_scorer`."""
    return sorted(_REGISTRY)


def get_scorer(name: str | Scorer, **kwargs: Any) -> Scorer:
    """A scorer from a registered name (constructed with ``kwargs``), or an instance returned as is."""
    if not isinstance(name, str):
        if not isinstance(name, Scorer):
            raise TypeError(
                f"{type(name).__name__} does not follow the Scorer protocol "
                "(needs name, requires_labels, fit(features) and score(features))"
            )
        if kwargs:
            raise ValueError("keyword arguments are only used with a scorer name, not with an instance")
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(available_scorers())}")
    return _REGISTRY[name](**kwargs)


def check_features(features: Features, *, labels: bool = False, logits: bool = False, who: str = "scorer") -> None:
    """Raise a clear ``ValueError`` when ``features`` lack what a scorer needs or hold non-finite values."""
    if logits and features.logits is None:
        raise ValueError(f"{who} needs logits; these features have none")
    if labels:
        if features.labels is None:
            raise ValueError(f"{who} needs labels to fit; pass a loader that yields (x, y)")
        if torch.unique(features.labels).numel() < 2:
            raise ValueError(f"{who} needs at least two classes in the labels to fit")
    bad = int((~torch.isfinite(features.feats)).any(dim=1).sum())
    if bad:
        raise ValueError(f"the features hold {bad} row(s) with NaN or infinite values; remove them before fit")
