"""Maximum logit (Hendrycks et al., 2022)."""

from __future__ import annotations

import torch

from .base import register_scorer
from .logit_scorer import LogitScorer

__all__ = ["MaxLogit"]


@register_scorer("max_logit")
class MaxLogit(LogitScorer):
    """``score = max_c z_c`` for logits ``z (N, C)``; needs no fitting.

    Papers: Hendrycks & Gimpel, ICLR 2017 (the logit baseline); Hendrycks et al., "Scaling out-of-distribution
    detection for real-world settings", ICML 2022 (MaxLogit).
    """

    supports_distributed = True  # nothing is learned from data

    def evidence(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().max(dim=1).values
