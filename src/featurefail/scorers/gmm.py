"""The paper's method: a class-agnostic diagonal Gaussian mixture on the penultimate features."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from ..exceptions import NotFittedError
from ..features import Features
from ..gmm import DiagonalGMM
from ..preprocess import make_transform
from .base import check_features, register_scorer

__all__ = ["GMMScorer"]


@register_scorer("gmm")
class GMMScorer:
    """Log-likelihood of the features under a class-agnostic diagonal GMM fitted by EM (labels unused).

    ``score(F) = log p(F) = log Σ_k π_k N(F; μ_k, diag σ²_k)``, or ``-BPD(F) = log p(F) / (D ln 2)`` with
    ``score="bpd"``. Higher = more typical of the training features.

    Paper: "Understanding classifier mistakes with generative models" (section 3.2, Eq. 5).

    Args:
        n_components: ``K`` (the paper uses 100 and 1000).
        score: ``"loglik"`` or ``"bpd"`` (negated bits per dimension, so higher is still more normal).
        preprocess: feature preprocessing fitted on the training features (``None``, ``"standardize"``,
            ``"pca[:kept]"``, ``"l2"``, ``"tanh"``; see :mod:`featurefail.preprocess`); the mixture then models
            the transformed features.
        per_layer: for features of several layers (``FailureDetector(layer=[None, "layer2"])``, i.e.
            ``Features.blocks`` set): fit one preprocessing + mixture per layer block and score
            ``Σ_l log p_l(F_l)``. Without it, one mixture models the concatenated blocks. Single-layer
            features are one block (the same as ``per_layer=False``).
        **gmm_kwargs: passed to :class:`~featurefail.DiagonalGMM` (``max_iter``, ``tol``, ``reg_covar``,
            ``init``, ``n_init``, ``random_state``, ``device``, ``chunk_size``).
    """

    name = "gmm"
    requires_labels = False

    def __init__(
        self,
        n_components: int = 100,
        score: Literal["loglik", "bpd"] = "loglik",
        random_state: int | None = None,
        preprocess: str | None = None,
        per_layer: bool = False,
        **gmm_kwargs: Any,
    ):
        if score not in ("loglik", "bpd"):
            raise ValueError(f"score must be 'loglik' or 'bpd', got {score!r}")
        self.n_components = n_components
        self.score_kind = score
        self.random_state = random_state
        self.preprocess = preprocess
        self.per_layer = bool(per_layer)
        self.transform_ = make_transform(preprocess)  # validates the spec now
        self.gmm_kwargs = gmm_kwargs
        self.gmm = DiagonalGMM(n_components, random_state=random_state, **gmm_kwargs)
        self.blocks_: tuple[int, ...] | None = None
        self.block_scorers_: list[GMMScorer] = []

    def transform(self, feats: torch.Tensor) -> torch.Tensor:
        """The features the mixture models: ``preprocess`` applied (identity without one)."""
        return feats if self.transform_ is None else self.transform_(feats)

    def _block_scorer(self) -> GMMScorer:
        return GMMScorer(self.n_components, "loglik", self.random_state, self.preprocess, **self.gmm_kwargs)

    def _fitted_blocks(self) -> tuple[int, ...]:
        if self.blocks_ is None:
            raise NotFittedError("this GMMScorer is not fitted yet; call fit(features) first")
        return self.blocks_

    def fit(self, features: Features) -> GMMScorer:
        check_features(features, who="GMMScorer")
        if self.per_layer:
            self.blocks_ = features.blocks or (features.feats.shape[1],)
            self.block_scorers_ = [self._block_scorer() for _ in self.blocks_]
            for i, scorer in enumerate(self.block_scorers_):
                scorer.fit(features.select_blocks(i))
            return self
        if self.transform_ is not None:
            self.transform_.fit(features.feats)
        self.gmm.fit(self.transform(features.feats))
        return self

    def score(self, features: Features) -> torch.Tensor:
        if self.per_layer:
            fitted = self._fitted_blocks()
            if features.blocks is not None and features.blocks != fitted:
                raise ValueError(f"features have layer blocks {features.blocks}; the scorer was fitted on {fitted}")
            blocks = Features(features.feats, blocks=fitted if len(fitted) > 1 else None)
            parts = [s.score(blocks.select_blocks(i)) for i, s in enumerate(self.block_scorers_)]
            loglik = torch.stack(parts).sum(0)
            return loglik / (sum(fitted) * math.log(2.0)) if self.score_kind == "bpd" else loglik
        feats = features.feats
        finite = torch.isfinite(feats).all(dim=1)
        safe = torch.where(finite[:, None], feats, torch.zeros_like(feats))
        loglik = self.gmm.score_samples(self.transform(safe))
        loglik = torch.where(finite.to(loglik.device), loglik, torch.full_like(loglik, -math.inf))
        if self.score_kind == "bpd":
            return loglik / (self.gmm.n_features_in_ * math.log(2.0))
        return loglik

    def as_module(self) -> torch.nn.Module:
        """The scoring as a standalone ``nn.Module(feats, logits) -> (N,)`` (for deployment and export)."""
        from ..deploy import BlockSumScoreModule, GMMScoreModule, TransformedScoreModule

        if self.per_layer:
            fitted = self._fitted_blocks()
            scale = 1.0 / (sum(fitted) * math.log(2.0)) if self.score_kind == "bpd" else 1.0
            return BlockSumScoreModule(fitted, [s.as_module() for s in self.block_scorers_], scale)
        module = GMMScoreModule(self.gmm, bpd=self.score_kind == "bpd")
        return module if self.transform_ is None else TransformedScoreModule(self.transform_, module)

    def get_config(self) -> dict[str, Any]:
        config = {
            "n_components": self.n_components,
            "score": self.score_kind,
            "random_state": self.random_state,
            "preprocess": self.preprocess,
            "per_layer": self.per_layer,
        }
        config.update({k: v for k, v in self.gmm_kwargs.items() if isinstance(v, int | float | str | bool | None)})
        return config

    def state_dict(self) -> dict[str, Any]:
        if self.per_layer:
            state: dict[str, Any] = {"blocks": torch.tensor(self._fitted_blocks(), dtype=torch.int64)}
            for i, scorer in enumerate(self.block_scorers_):
                state.update({f"block{i}.{k}": v for k, v in scorer.state_dict().items()})
            return state
        state = self.gmm.state_dict()
        if self.transform_ is not None:
            state.update({f"pre.{k}": v for k, v in self.transform_.state().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> GMMScorer:
        if self.per_layer:
            self.blocks_ = tuple(int(b) for b in torch.as_tensor(state["blocks"]).tolist())
            self.block_scorers_ = []
            for i in range(len(self.blocks_)):
                prefix = f"block{i}."
                part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                self.block_scorers_.append(self._block_scorer().load_state_dict(part))
            return self
        self.gmm.load_state_dict({k: v for k, v in state.items() if not k.startswith("pre.")})
        if self.transform_ is not None:
            self.transform_.load({k[4:]: v for k, v in state.items() if k.startswith("pre.")})
        return self
