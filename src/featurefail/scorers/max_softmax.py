"""Maximum softmax probability (Hendrycks & Gimpel, 2017)."""

from __future__ import annotations

import torch

from .base import register_scorer
from .logit_scorer import LogitScorer

__all__ = ["MaxSoftmax"]


@register_scorer("max_softmax")
class MaxSoftmax(LogitScorer):
    """``score = max_c softmax(z)_c`` for logits ``z (N, C)``, computed in float64; needs no fitting.

    Paper: Hendrycks & Gimpel, "A baseline for detecting misclassified and out-of-distribution examples in
    neural networks", ICLR 2017.
    """

    supports_distributed = True  # nothing is learned from data

    def evidence(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.double(), dim=1).max(dim=1).values.float()
