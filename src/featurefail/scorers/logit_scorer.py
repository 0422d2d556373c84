"""The shared base of scorers computed from the logits alone (max softmax, max logit, energy, ...)."""

from __future__ import annotations

import torch
from torch import nn

from ..features import Features
from .base import Scorer, check_features
from .modules import LogitScoreModule

__all__ = ["LogitScorer"]


class LogitScorer(Scorer):
    """A scorer ``s(z)`` of the logits ``z (N, C)`` only: nothing to fit, deployable as a module.

    Subclasses implement :meth:`evidence`; ``fit`` only checks that the features carry logits.
    """

    requires_logits = True

    def evidence(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N, C) -> (N,)``, higher = more normal."""
        raise NotImplementedError

    def fit(self, features: Features) -> LogitScorer:
        check_features(features, logits=True, who=type(self).__name__)
        return self

    def score(self, features: Features) -> torch.Tensor:
        if features.logits is None:
            raise ValueError(f"{type(self).__name__} needs logits; these features have none")
        return self.evidence(features.logits).float()

    def as_module(self) -> nn.Module:
        return LogitScoreModule(self.evidence)

    def is_fitted(self) -> bool:
        return True  # nothing is learned from data
