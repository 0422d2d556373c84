"""The paper's method: a class-agnostic diagonal Gaussian mixture on the penultimate features."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from .._tensor import mask_nonfinite, zero_nonfinite_rows
from ..features import Features
from ..gmm import DiagonalGMM
from ..preprocess import make_transform
from .base import DTypeName, Scorer, check_features, register_scorer
from .modules import GMMScoreModule, StackedGMMScoreModule, TransformedScoreModule

__all__ = ["GMMScorer", "stacked_gmm_module"]


@register_scorer("gmm")
class GMMScorer(Scorer):
    """Log-likelihood of the features under a class-agnostic diagonal GMM fitted by EM (labels unused).

    ``score(F) = log p(F) = log Σ_k π_k N(F; μ_k, diag σ²_k)`` for ``F (N, D)``, or ``-BPD(F) = log p(F) / (D ln 2)``
    with ``score="bpd"``. Higher = more typical of the training features.

    Paper: "Understanding classifier mistakes with generative models" (section 3.2, Eq. 5).

    Args:
        n_components: ``K`` (the paper uses 100 and 1000).
        score: ``"loglik"`` or ``"bpd"`` (negated bits per dimension, so higher is still more normal).
        preprocess: feature preprocessing fitted on the training features (``None``, ``"standardize"``,
            ``"pca[:kept]"``, ``"l2"``, ``"tanh"``; see :mod:`featurefail.preprocess`); the mixture then models
            the transformed features.
        max_iter, tol, reg_covar, init, n_init, chunk_size, random_state, device, dtype: those of
            :class:`~featurefail.DiagonalGMM`.

    Attributes:
        gmm_: the fitted :class:`~featurefail.DiagonalGMM`; transform_: the fitted preprocessing, or None.
    """

    setting_attributes: ClassVar[dict[str, str]] = {"score": "score_kind"}  # the method score() takes the name
    supports_distributed = True  # the preprocessing and the mixture reduce over ranks

    def __init__(
        self,
        n_components: Annotated[int, Field(ge=1)] = 100,
        score: Literal["loglik", "bpd"] = "loglik",
        preprocess: str | None = None,
        max_iter: Annotated[int, Field(ge=1)] = 100,
        tol: Annotated[float, Field(ge=0.0)] = 1e-3,
        reg_covar: Annotated[float, Field(gt=0.0)] = 1e-6,
        init: str = "kmeans++",
        n_init: Annotated[int, Field(ge=1)] = 1,
        chunk_size: Annotated[int, Field(ge=1)] | None = None,
        random_state: int | None = 0,
        device: str | None = None,
        dtype: DTypeName = "float32",
    ) -> None:
        make_transform(preprocess)  # validates the spec now
        self.n_components = n_components
        self.score_kind = score
        self.preprocess = preprocess
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.init = init
        self.n_init = n_init
        self.chunk_size = chunk_size
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.new_mixture()  # validates the mixture's settings now

    def new_mixture(self) -> DiagonalGMM:
        """An unfitted :class:`~featurefail.DiagonalGMM` with this scorer's settings."""
        return DiagonalGMM(
            self.n_components,
            max_iter=self.max_iter,
            tol=self.tol,
            reg_covar=self.reg_covar,
            init=self.init,
            n_init=self.n_init,
            chunk_size=self.chunk_size,
            random_state=self.random_state,
            device=self.device,
            dtype=getattr(torch, self.dtype),
        )

    def transform(self, feats: torch.Tensor) -> torch.Tensor:
        """``(N, D) -> (N, D')``: the features the mixture models (``preprocess`` applied; identity without one)."""
        self.check_fitted()
        return feats if self.transform_ is None else self.transform_(feats)

    def fit(self, features: Features) -> GMMScorer:
        check_features(features, who="GMMScorer")
        transform = make_transform(self.preprocess)
        feats = features.feats if transform is None else transform.fit(features.feats)(features.feats)
        gmm = self.new_mixture().fit(feats)
        self.transform_, self.gmm_ = transform, gmm
        return self

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        _, safe = zero_nonfinite_rows(features.feats)
        loglik = mask_nonfinite(self.gmm_.score_samples(self.transform(safe)).cpu(), features.feats)
        if self.score_kind == "bpd":
            return loglik / (self.gmm_.n_features_in_ * math.log(2.0))
        return loglik

    def as_module(self) -> nn.Module:
        """``nn.Module(feats, logits) -> (N,)``: the preprocessing and the mixture's log-density as buffers."""
        self.check_fitted()
        stacked = stacked_gmm_module([self])
        if stacked is not None:
            return stacked
        module = GMMScoreModule(self.gmm_, bpd=self.score_kind == "bpd")
        return module if self.transform_ is None else TransformedScoreModule(self.transform_, module)

    def bpd_module(self) -> nn.Module:
        """``nn.Module(feats, logits) -> (N,)`` giving ``-BPD`` of the features (preprocessing included),
        differentiable in ``feats``; purification descends its negative."""
        self.check_fitted()
        module = GMMScoreModule(self.gmm_, bpd=True)
        return module if self.transform_ is None else TransformedScoreModule(self.transform_, module)

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        state = self.gmm_.state_dict()
        if self.transform_ is not None:
            state.update({f"pre.{k}": v for k, v in self.transform_.state().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> GMMScorer:
        gmm = self.new_mixture().load_state_dict({k: v for k, v in state.items() if not k.startswith("pre.")})
        transform = make_transform(self.preprocess)
        if transform is not None:
            transform.load({k[4:]: v for k, v in state.items() if k.startswith("pre.")})
        elif any(k.startswith("pre.") for k in state):
            raise ValueError("the state holds preprocessing parameters but the scorer has preprocess=None")
        self.transform_, self.gmm_ = transform, gmm
        return self


def stacked_gmm_module(scorers: list[Any]) -> StackedGMMScoreModule | None:
    """The fused module of fitted :class:`GMMScorer` s over consecutive feature blocks, or ``None`` when they
    cannot be stacked (a preprocessing other than ``None``/``"l2"``, different settings or ``n_components``,
    or a mixture that scores in float64); then score them with their own ``as_module()``."""
    if not scorers or not all(isinstance(s, GMMScorer) for s in scorers):
        return None
    specs = {None if s.transform_ is None else s.transform_.spec for s in scorers}
    kinds = {s.score_kind for s in scorers}
    if len(specs) != 1 or not specs <= {None, "l2"} or len(kinds) != 1:
        return None
    gmms = [s.gmm_ for s in scorers]
    if len({g.n_components for g in gmms}) != 1:
        return None
    if any(g.scoring_parameters()["coef"].dtype != torch.float32 for g in gmms):
        return None
    return StackedGMMScoreModule(gmms, l2=specs == {"l2"}, bpd=kinds == {"bpd"})
