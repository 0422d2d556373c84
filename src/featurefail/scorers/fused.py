"""A fused score: GMM feature likelihood and logit evidence, each standardised on in-distribution data."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from ..distributed import all_gather_rows
from ..exceptions import NotFittedError
from ..features import Features
from ..metrics import auroc
from .base import Scorer, ValidationUse, check_features, register_scorer
from .gmm import GMMScorer

__all__ = ["FusedScorer"]

_WEIGHTS = np.linspace(0.0, 1.0, 21)


def _logit_evidence(logits: torch.Tensor, kind: str) -> torch.Tensor:
    z = logits.double()
    if kind == "energy":  # negative free energy, Liu et al. (2020): logsumexp of the logits
        return torch.logsumexp(z, dim=1)
    return torch.softmax(z, dim=1).max(dim=1).values


def _robust_scale(values: torch.Tensor) -> tuple[float, float]:
    finite = values[torch.isfinite(values)].double()
    median = float(finite.median())
    iqr = float(torch.quantile(finite, 0.75) - torch.quantile(finite, 0.25))
    return median, iqr if iqr > 0 else float(finite.std().clamp_min(1e-12))


@register_scorer("fused")
class FusedScorer(Scorer):
    """``score = w · z(log p(F)) + (1 − w) · z(e(logits))`` with ``e`` = energy (``logsumexp z``) or max-softmax.

    ``z(·)`` is a robust standardisation ``(s − median) / IQR`` measured on in-distribution data (the training
    features after ``fit``, the validation features after ``fit_validation``). The weight ``w`` is chosen on
    the labelled validation split to maximise the AUROC of telling correct from wrong predictions — the
    model's own mistakes only; no OOD or adversarial sample is used to fit or tune anything. Before
    ``fit_validation`` the weight is ``0.5``.

    Args:
        logit_score: ``"energy"`` (default) or ``"max_softmax"``.
        weight: fix ``w`` instead of choosing it on validation.
        n_components, preprocess, max_iter, random_state, device: the settings of its
            :class:`~featurefail.scorers.GMMScorer`.

    Attributes:
        gmm_scorer_: the fitted GMM scorer; weight_: the weight in use; weight_search_: validation AUROC per
        candidate weight.
    """

    requires_logits = True
    supports_distributed = True  # the mixture reduces over ranks; scales and the weight use all ranks' scores

    def __init__(
        self,
        logit_score: Literal["energy", "max_softmax"] = "energy",
        weight: Annotated[float, Field(ge=0.0, le=1.0)] | None = None,
        n_components: Annotated[int, Field(ge=1)] = 100,
        preprocess: str | None = None,
        max_iter: Annotated[int, Field(ge=1)] = 100,
        random_state: int | None = 0,
        device: str | None = None,
    ) -> None:
        self.logit_score = logit_score
        self.weight = weight
        self.n_components = n_components
        self.preprocess = preprocess
        self.max_iter = max_iter
        self.random_state = random_state
        self.device = device
        self.new_gmm_scorer()  # validates the GMM settings now

    def new_gmm_scorer(self) -> GMMScorer:
        """An unfitted GMM scorer with this scorer's GMM settings."""
        return GMMScorer(
            n_components=self.n_components,
            preprocess=self.preprocess,
            max_iter=self.max_iter,
            random_state=self.random_state,
            device=self.device,
        )

    def _parts(self, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        if features.logits is None:
            check_features(features, logits=True, who="FusedScorer")
        return self.gmm_scorer_.score(features).double().cpu(), _logit_evidence(features.logits, self.logit_score)

    def _standardise(self, features: Features) -> None:
        density, evidence = (all_gather_rows(part) for part in self._local_parts(features))
        self.scales_ = (*_robust_scale(density), *_robust_scale(evidence))

    def _local_parts(self, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_parts`, also on a rank whose shard is empty (``torch.distributed``)."""
        if len(features) == 0:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return self._parts(features)

    def fit(self, features: Features) -> FusedScorer:
        check_features(features, logits=True, who="FusedScorer")
        self.gmm_scorer_ = self.new_gmm_scorer().fit(features)
        self._standardise(features)
        self.weight_ = 0.5 if self.weight is None else float(self.weight)
        return self

    def validation_use(self) -> ValidationUse:
        return "labels"  # the robust scales are re-estimated on labelled validation features, w searched there

    def fit_validation(self, features: Features) -> FusedScorer:
        """Re-standardise on validation features and choose ``w`` for mistake detection on them."""
        check_features(features, logits=True, labels=True, who="FusedScorer")
        self._standardise(features)
        if self.weight is not None:
            return self
        correct = all_gather_rows(features.correct)  # under torch.distributed: all ranks' rows
        if correct.all() or (~correct).all():
            return self
        m_d, s_d, m_e, s_e = self.scales_
        density, evidence = (all_gather_rows(part) for part in self._local_parts(features))
        density, evidence = (density - m_d) / s_d, (evidence - m_e) / s_e
        search = {}
        for w in _WEIGHTS:
            s = w * density + (1 - w) * evidence
            search[float(w)] = auroc(s[correct], s[~correct])
        self.weight_search_ = search
        self.weight_ = max(search, key=lambda w: (round(search[w], 6), w))  # ties: more weight on the GMM
        return self

    def _standardised(self, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "scales_"):
            raise NotFittedError("FusedScorer is not fitted")
        density, evidence = self._parts(features)
        m_d, s_d, m_e, s_e = self.scales_
        return (density - m_d) / s_d, (evidence - m_e) / s_e

    def score(self, features: Features) -> torch.Tensor:
        density, evidence = self._standardised(features)
        return (self.weight_ * density + (1 - self.weight_) * evidence).float()

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        state = {f"gmm.{k}": v for k, v in self.gmm_scorer_.state_dict().items()}
        state["scales"] = torch.tensor(self.scales_, dtype=torch.float64)
        state["fitted_weight"] = float(self.weight_)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> FusedScorer:
        scales = tuple(float(v) for v in torch.as_tensor(state["scales"]).reshape(-1).tolist())
        weight = float(state["fitted_weight"])
        if len(scales) != 4 or not all(map(math.isfinite, scales)) or scales[1] <= 0 or scales[3] <= 0:
            raise ValueError(f"fused scales must be 4 finite numbers with positive spreads, got {scales}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"fitted_weight must be in [0, 1], got {weight}")
        gmm = self.new_gmm_scorer().load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("gmm.")})
        self.gmm_scorer_, self.scales_, self.weight_ = gmm, scales, weight
        return self
