"""Maximum softmax probability (Hendrycks & Gimpel, 2017)."""

from __future__ import annotations

from typing import Any

import torch

from ..features import Features
from .base import check_features, register_scorer

__all__ = ["MaxSoftmax"]


@register_scorer("max_softmax")
class MaxSoftmax:
    """``score = max_c softmax(z)_c`` for logits ``z``; needs no fitting.

    Paper: Hendrycks & Gimpel, "A baseline for detecting misclassified and out-of-distribution examples in
    neural networks", ICLR 2017.
    """

    name = "max_softmax"
    requires_labels = False

    def fit(self, features: Features) -> MaxSoftmax:
        check_features(features, logits=True, who="MaxSoftmax")
        return self

    def score(self, features: Features) -> torch.Tensor:
        if features.logits is None:
            check_features(features, logits=True, who="MaxSoftmax")
        return _max_softmax(features.logits)

    def as_module(self) -> torch.nn.Module:
        """The scoring as ``nn.Module(feats, logits) -> (N,)`` for deployment."""
        from ..deploy import LogitScoreModule

        return LogitScoreModule(_max_softmax)

    def get_config(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> MaxSoftmax:
        return self


def _max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``(N, C) -> (N,)`` largest softmax probability, computed in float64."""
    return torch.softmax(logits.double(), dim=1).max(dim=1).values.float()
