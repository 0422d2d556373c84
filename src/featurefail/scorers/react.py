"""ReAct (Sun, Guo & Li, 2021): clip the features at a percentile of the training features, then the energy."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..distributed import all_gather_rows
from ..features import Features
from .base import ModelContext, Scorer, check_features, register_scorer
from .energy import check_head_state, check_keys, check_width, classifier_head, scalar
from .modules import HeadEnergyScoreModule

__all__ = ["ReAct"]


@register_scorer("react")
class ReAct(Scorer):
    """``score = logsumexp(W · min(f, c) + b)``: the energy (``T = 1``) of the classifier head on features
    clipped at ``c``, the ``percentile``-th percentile of **all** training activations (every row and column
    of the training features ``(N, D)``, NumPy's linear interpolation). Higher = more normal.

    Needs the classifier head ``(W (C, D), b (C,))``: hook the head's input (``layer=None``, the detector then
    finds the head) or pass ``head=`` to ``FailureDetector.fit_features``.

    The paper's default ``percentile=90`` is kept: Sun et al. chose it on OOD data, which here is never used to
    pick a setting (choose it, if at all, on in-distribution data only).

    Paper: Sun, Guo & Li, "ReAct: Out-of-distribution detection with rectified activations", NeurIPS 2021.

    Args:
        percentile: ``p`` in ``[0, 100]``.

    Attributes:
        threshold_: the clipping value ``c``; head_weight_, head_bias_: the head, float64.
    """

    supports_distributed = True  # the clipping percentile is taken over all ranks' rows

    def __init__(self, percentile: Annotated[float, Field(ge=0.0, le=100.0)] = 90.0) -> None:
        self.percentile = percentile
        self._context = ModelContext()

    def attach(self, context: ModelContext) -> None:
        """Receive the classifier head (``context.head_weight``, ``context.head_bias``)."""
        self._context = context

    def fit(self, features: Features) -> ReAct:
        check_features(features, who="react")
        weight, bias = classifier_head(self._context, features.feats.shape[1], "react")
        # under torch.distributed the percentile is that of all ranks' rows: every rank receives all of them
        every_row = all_gather_rows(features.feats)
        threshold = float(np.percentile(every_row.double().numpy(), self.percentile))
        self.head_weight_, self.head_bias_, self.threshold_ = weight, bias, threshold
        return self

    def as_module(self) -> nn.Module:
        """``nn.Module(feats, logits) -> (N,)`` with the head and ``c`` as buffers."""
        self.check_fitted()
        return HeadEnergyScoreModule(self.head_weight_, self.head_bias_, shaping="clip", threshold=self.threshold_)

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        check_width(features, self.head_weight_.shape[1], "react")
        with torch.no_grad():
            return self.as_module()(features.feats)

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        return {"head_weight": self.head_weight_, "head_bias": self.head_bias_, "threshold": self.threshold_}

    def load_state_dict(self, state: dict[str, Any]) -> ReAct:
        check_keys(state, {"head_weight", "head_bias", "threshold"}, "react")
        weight, bias = check_head_state(state["head_weight"], state["head_bias"], "react")
        self.head_weight_, self.head_bias_, self.threshold_ = weight, bias, scalar(state, "threshold", "react")
        return self
