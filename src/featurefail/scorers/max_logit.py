"""Maximum logit (Hendrycks & Gimpel, 2017; Hendrycks et al., 2022)."""

from __future__ import annotations

from typing import Any

import torch

from ..features import Features
from .base import check_features, register_scorer

__all__ = ["MaxLogit"]


@register_scorer("max_logit")
class MaxLogit:
    """``score = max_c z_c`` for logits ``z``; needs no fitting.

    Papers: Hendrycks & Gimpel, ICLR 2017 (the logit baseline); Hendrycks et al., "Scaling out-of-distribution
    detection for real-world settings", ICML 2022 (MaxLogit).
    """

    name = "max_logit"
    requires_labels = False

    def fit(self, features: Features) -> MaxLogit:
        check_features(features, logits=True, who="MaxLogit")
        return self

    def score(self, features: Features) -> torch.Tensor:
        if features.logits is None:
            check_features(features, logits=True, who="MaxLogit")
        return _max_logit(features.logits)

    def as_module(self) -> torch.nn.Module:
        """The scoring as ``nn.Module(feats, logits) -> (N,)`` for deployment."""
        from ..deploy import LogitScoreModule

        return LogitScoreModule(_max_logit)

    def get_config(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> MaxLogit:
        return self


def _max_logit(logits: torch.Tensor) -> torch.Tensor:
    """``(N, C) -> (N,)`` largest logit."""
    return logits.max(dim=1).values
