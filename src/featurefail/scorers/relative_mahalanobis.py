"""Relative Mahalanobis distance (Ren et al., 2021): class-conditional minus background Mahalanobis distance."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from ..features import Features
from .base import Scorer, check_features, register_scorer
from .energy import check_width
from .mahalanobis import TiedGaussians
from .modules import RelativeMahalanobisScoreModule

__all__ = ["RelativeMahalanobis"]


@register_scorer("relative_mahalanobis")
class RelativeMahalanobis(Scorer):
    """``score(f) = −(min_c d²_c(f) − d²_0(f)) = d²_0(f) − min_c d²_c(f)``. Higher = more normal.

    ``d²_c(f) = (f − μ_c)ᵀ Σ⁺ (f − μ_c)`` with class means ``μ_c`` and one tied covariance ``Σ`` (as
    :class:`~featurefail.scorers.Mahalanobis`, :class:`~featurefail.scorers.mahalanobis.TiedGaussians`), and
    ``d²_0(f) = (f − μ_0)ᵀ Σ_0⁺ (f − μ_0)`` under one background Gaussian fitted to all training features
    (mean ``μ_0``, covariance ``Σ_0`` around it). Ren et al.'s ``RMD_c = d²_c − d²_0`` is an OOD-ness per
    class, and their confidence is ``−min_c RMD_c``; ``d²_0`` does not depend on ``c``, hence the formula.
    Both covariances are maximum likelihood (``1/N``), pseudo-inverted, optionally shrunk by ``shrinkage``.

    Labels needed (rows labelled ``< 0`` are left out of both fits). No hyper-parameter is tuned on OOD data.

    Paper: Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A simple fix to Mahalanobis distance for improving
    near-OOD detection", ICML 2021 workshop on uncertainty and robustness (arXiv:2106.09022).

    Args:
        shrinkage: weight of ``(tr Σ / D)·I`` in both covariances (0 = maximum likelihood).

    Attributes:
        classes_: the class-conditional :class:`TiedGaussians`; background_: the one-component background.
    """

    requires_labels = True
    supports_distributed = True  # both TiedGaussians reduce their class statistics over all ranks

    def __init__(self, shrinkage: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0) -> None:
        self.shrinkage = shrinkage

    def fit(self, features: Features) -> RelativeMahalanobis:
        check_features(features, labels=True, who="relative_mahalanobis")
        known = features.labels >= 0
        feats, labels = features.feats[known], features.labels[known]
        self.classes_ = TiedGaussians(feats, labels, self.shrinkage)
        self.background_ = TiedGaussians(feats, torch.zeros_like(labels), self.shrinkage)
        return self

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        check_width(features, self.classes_.means.shape[1], "relative_mahalanobis")
        with torch.no_grad():
            finite = torch.isfinite(features.feats).all(dim=1)
            f = torch.where(finite[:, None], features.feats, torch.zeros_like(features.feats))
            d2 = self.classes_.squared_distances(f).min(dim=1).values
            d0 = self.background_.squared_distances(f)[:, 0]
        return torch.where(finite, d0 - d2, torch.full_like(d0, -torch.inf)).float()

    def as_module(self) -> nn.Module:
        """``nn.Module(feats, logits) -> (N,)`` with both Gaussians as buffers (differentiable in ``feats``)."""
        self.check_fitted()
        g, b = self.classes_, self.background_
        return RelativeMahalanobisScoreModule(g.means, g.precision, b.means[0], b.precision)

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        return {**self.classes_.state("class."), **self.background_.state("background.")}

    def load_state_dict(self, state: dict[str, Any]) -> RelativeMahalanobis:
        parts = ("classes", "means", "precision")
        expected = {f"{p}.{k}" for p in ("class", "background") for k in parts}
        if set(state) != expected:
            raise ValueError(f"relative_mahalanobis state needs the keys {sorted(expected)}, got {sorted(state)}")
        classes = TiedGaussians.from_state(state, "class.")
        background = TiedGaussians.from_state(state, "background.")
        if background.means.shape != (1, classes.means.shape[1]):
            raise ValueError(
                f"relative_mahalanobis: the background must be one Gaussian of dimension {classes.means.shape[1]}, "
                f"got means {tuple(background.means.shape)}"
            )
        self.classes_, self.background_ = classes, background
        return self
