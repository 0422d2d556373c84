"""ASH-S (Djurisic et al., 2023): prune each sample's activations to its largest ones, sharpen, then energy."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from ..distributed import total_rows
from ..features import Features
from .base import ModelContext, Scorer, check_features, register_scorer
from .energy import check_head_state, check_keys, check_width, classifier_head
from .modules import HeadEnergyScoreModule

__all__ = ["ASH"]


@register_scorer("ash")
class ASH(Scorer):
    """ASH-S: ``score = logsumexp(W · g(f) + b)`` with, per sample ``f (D,)``, ``g(f) = exp(s₁/s₂) · f ⊙ m``:
    ``m`` keeps the ``k = D − round(D·p/100)`` largest activations and zeroes the rest, ``s₁ = Σ f`` and
    ``s₂ = Σ f ⊙ m`` are the sums before and after pruning (as the authors' ``ash_s``, applied to the pooled
    features as OpenOOD does). The energy uses ``T = 1``. Higher = more normal.

    ASH learns nothing from the training features (``p`` is a per-sample percentile); fitting only takes the
    classifier head ``(W (C, D), b (C,))`` — hook the head's input (``layer=None``) or pass ``head=`` to
    ``FailureDetector.fit_features`` — and checks that the activations are non-negative (post-ReLU), which
    the sharpening ``exp(s₁/s₂)`` assumes. A row whose kept activations sum to zero is not rescaled.

    The paper's default ``percentile=90`` is kept: Djurisic et al. chose it on OOD data, which here is never
    used to pick a setting (choose it, if at all, on in-distribution data only).

    Paper: Djurisic, Bozanic, Ashok & Liu, "Extremely simple activation shaping for out-of-distribution
    detection", ICLR 2023.

    Args:
        percentile: ``p`` in ``[0, 100)``: the share of each sample's activations set to zero.

    Attributes:
        keep_: ``k``; head_weight_, head_bias_: the head, float64.
    """

    supports_distributed = True  # nothing is learned from the rows; the sign check counts all ranks

    def __init__(self, percentile: Annotated[float, Field(ge=0.0, lt=100.0)] = 90.0) -> None:
        self.percentile = percentile
        self._context = ModelContext()

    def attach(self, context: ModelContext) -> None:
        """Receive the classifier head (``context.head_weight``, ``context.head_bias``)."""
        self._context = context

    def kept(self, width: int) -> int:
        """``k = D − round(D · p / 100)``, at least 1."""
        return max(1, width - round(width * self.percentile / 100.0))

    def fit(self, features: Features) -> ASH:
        check_features(features, who="ash")
        weight, bias = classifier_head(self._context, features.feats.shape[1], "ash")
        negative = total_rows(int((features.feats < 0).any(dim=1).sum()))  # every rank raises alike
        if negative:
            raise ValueError(
                f"ash needs non-negative (post-ReLU) activations; {negative} training row(s) hold negative values"
            )
        self.head_weight_, self.head_bias_, self.keep_ = weight, bias, self.kept(features.feats.shape[1])
        return self

    def as_module(self) -> nn.Module:
        """``nn.Module(feats, logits) -> (N,)`` with the head as buffers."""
        self.check_fitted()
        return HeadEnergyScoreModule(self.head_weight_, self.head_bias_, shaping="ash", keep=self.keep_)

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        check_width(features, self.head_weight_.shape[1], "ash")
        with torch.no_grad():
            return self.as_module()(features.feats)

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        return {"head_weight": self.head_weight_, "head_bias": self.head_bias_}

    def load_state_dict(self, state: dict[str, Any]) -> ASH:
        check_keys(state, {"head_weight", "head_bias"}, "ash")
        weight, bias = check_head_state(state["head_weight"], state["head_bias"], "ash")
        self.head_weight_, self.head_bias_, self.keep_ = weight, bias, self.kept(weight.shape[1])
        return self
