"""Mahalanobis confidence score (Lee et al., 2018): class means with one tied covariance."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ..distributed import all_gather_rows, all_reduce_sum, is_distributed, union_labels
from ..features import Features
from ..metrics import auroc
from .base import ModelContext, Scorer, ValidationUse, check_features, register_scorer

__all__ = ["Mahalanobis", "TiedGaussians"]

EPSILON_GRID = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)  # Lee et al.'s search grid


class TiedGaussians:
    """Class-conditional Gaussians sharing one covariance, in float64.

    ``Σ = (1/N) Σ_n (f_n − μ_{y_n})(f_n − μ_{y_n})ᵀ``, optionally shrunk toward ``(tr Σ / D)·I`` by
    ``shrinkage`` (0 = maximum likelihood), and pseudo-inverted (``Σ⁺``, as in Lee et al.'s code).
    Under ``torch.distributed`` each rank passes its rows; classes, means and covariance are those of the union.
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, shrinkage: float = 0.0) -> None:
        f = feats.double()
        if is_distributed():
            self.classes = union_labels(labels)
            column = torch.searchsorted(self.classes, labels)
            sums = torch.zeros(len(self.classes), f.shape[1] + 1, dtype=torch.float64, device=f.device)
            sums.index_add_(0, column, torch.cat([f, torch.ones_like(f[:, :1])], dim=1))
            all_reduce_sum(sums)
            self.means = sums[:, :-1] / sums[:, -1:]  # (C, D)
            centred = f - self.means[column]
            cov = all_reduce_sum(centred.T @ centred) / sums[:, -1].sum()
        else:
            self.classes = torch.unique(labels)
            self.means = torch.stack([f[labels == c].mean(0) for c in self.classes.tolist()])  # (C, D)
            centred = f - self.means[torch.searchsorted(self.classes, labels)]
            cov = centred.T @ centred / f.shape[0]
        d = cov.shape[0]
        scale = torch.trace(cov) / d
        if not torch.isfinite(scale) or scale <= 0:
            if shrinkage == 0.0:
                raise ValueError(
                    "the training features do not vary within their classes (zero covariance): every Mahalanobis "
                    "distance would be 0. Hook another layer, or set shrinkage > 0 (then distances are Euclidean)"
                )
            scale = torch.tensor(1.0, dtype=torch.float64)
        cov = (1.0 - shrinkage) * cov + shrinkage * scale * torch.eye(d, dtype=torch.float64)
        # pseudo-inverse, as scikit-learn's EmpiricalCovariance (used by Lee et al.): directions without
        # variance in the training features (dead ReLU units) are ignored instead of dominating every distance
        self.precision = torch.linalg.pinv(cov, hermitian=True)
        self._mean_terms = ((self.means @ self.precision) * self.means).sum(1)  # μᵀ P μ, (C,)

    def squared_distances(self, feats: torch.Tensor) -> torch.Tensor:
        """``d²_c(f) = (f − μ_c)ᵀ Σ⁻¹ (f − μ_c)``: ``(N, D) -> (N, C)``, differentiable in ``feats``."""
        f = feats.double()
        precision, means = self.precision.to(f.device), self.means.to(f.device)
        fp = f @ precision
        return ((fp * f).sum(1, keepdim=True) - 2.0 * fp @ means.T + self._mean_terms.to(f.device)).clamp_min(0.0)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}classes": self.classes, f"{prefix}means": self.means, f"{prefix}precision": self.precision}

    @classmethod
    def from_state(cls, state: dict[str, Any], prefix: str) -> TiedGaussians:
        obj = cls.__new__(cls)
        obj.classes = torch.as_tensor(state[f"{prefix}classes"]).long()
        obj.means = torch.as_tensor(state[f"{prefix}means"]).double()
        obj.precision = torch.as_tensor(state[f"{prefix}precision"]).double()
        c, d = obj.means.shape if obj.means.ndim == 2 else (-1, -1)
        if obj.classes.shape != (c,) or obj.precision.shape != (d, d):
            raise ValueError(
                f"inconsistent Gaussian state: classes {tuple(obj.classes.shape)}, means {tuple(obj.means.shape)}, "
                f"precision {tuple(obj.precision.shape)}"
            )
        if not (torch.isfinite(obj.means).all() and torch.isfinite(obj.precision).all()):
            raise ValueError("the Gaussian state holds NaN or infinite values")
        obj._mean_terms = ((obj.means @ obj.precision) * obj.means).sum(1)
        return obj


@register_scorer("mahalanobis")
class Mahalanobis(Scorer):
    """``score = max_c −½ (f − μ_c)ᵀ Σ⁻¹ (f − μ_c)`` with class means and a tied covariance (labels needed).

    Optional input preprocessing (Lee et al., Eq. 4): ``x̃ = x − ε · sign(∇_x ½ d²_ĉ(f(x)))`` with ``ĉ`` the
    closest class, then the score of ``f(x̃)``. ``epsilon="auto"`` picks ε from Lee et al.'s grid by the AUROC
    of telling the model's correct from its wrong **validation** predictions — in-distribution data only,
    never OOD or adversarial samples (Lee et al. tuned on OOD data; that leaks the test set).

    Several layers (Lee et al.'s feature ensemble, with equal weights): ``FailureDetector(scorer="mahalanobis",
    layer=[...], per_layer=True)`` fits one copy per layer block and sums the scores
    (:class:`~featurefail.scorers.PerLayer`).

    Paper: Lee, Lee, Lee & Shin, "A simple unified framework for detecting out-of-distribution samples and
    adversarial attacks", NeurIPS 2018.

    Args:
        shrinkage: weight of ``(tr Σ / D)·I`` in the covariance (0 = maximum likelihood).
        epsilon: preprocessing step (0 = none), or ``"auto"``.
        batch_size: inputs per forward/backward pass when preprocessing.
    """

    requires_labels = True
    supports_distributed = True  # class statistics, and the epsilon search's validation scores, over all ranks

    def __init__(
        self,
        shrinkage: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0,
        epsilon: Annotated[float, Field(ge=0.0)] | Literal["auto"] = 0.0,
        batch_size: Annotated[int, Field(ge=1)] = 256,
    ) -> None:
        self.shrinkage = shrinkage
        self.epsilon = epsilon
        self.batch_size = batch_size
        self._context = ModelContext()

    @property
    def requires_inputs(self) -> bool:  # type: ignore[override]
        return self.epsilon != 0.0

    requires_model = requires_inputs

    def attach(self, context: ModelContext) -> None:
        """Receive the classifier and the detector's hook factory (used for input preprocessing)."""
        self._context = context

    def fit(self, features: Features) -> Mahalanobis:
        check_features(features, labels=True, who="Mahalanobis")
        known = features.labels >= 0
        self.gaussians_ = TiedGaussians(features.feats[known], features.labels[known], self.shrinkage)
        self.epsilon_ = 0.0 if self.epsilon == "auto" else float(self.epsilon)
        return self

    def validation_use(self) -> ValidationUse:
        return "labels" if self.epsilon == "auto" else "nothing"

    def fit_validation(self, features: Features) -> Mahalanobis:
        """With ``epsilon="auto"``: choose ε on labelled validation data (correct vs wrong predictions)."""
        if self.epsilon != "auto":
            return self
        check_features(features, labels=True, logits=True, who="Mahalanobis")
        known = features.labels >= 0
        correct = all_gather_rows(features.correct[known])  # under torch.distributed: all ranks' rows
        if correct.all() or (~correct).all():
            self.epsilon_ = 0.0
            return self
        results = {}
        for eps in EPSILON_GRID:
            s = all_gather_rows(self._score_inputs(features, eps)[known])
            results[eps] = auroc(s[correct], s[~correct])
        self.epsilon_ = max(results, key=lambda e: (results[e], -e))
        self.epsilon_search_ = results
        return self

    def _score_inputs(self, features: Features, eps: float) -> torch.Tensor:
        g = self.gaussians_
        if eps == 0.0 or len(features) == 0:  # no row (a rank's empty shard): no forward pass
            return -0.5 * g.squared_distances(features.feats).min(dim=1).values
        block = self._context.block or slice(None)
        scores = []
        batches = self._context.input_batches(features, self.batch_size, "Mahalanobis with epsilon > 0")
        with contextlib.closing(batches):
            for x, hook in batches:
                x_in = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    d2 = g.squared_distances(hook(x_in)[0][:, block])
                    (grad,) = torch.autograd.grad(0.5 * d2.min(dim=1).values.sum(), x_in)
                x = x - eps * grad.sign()
                with torch.no_grad():
                    scores.append(-0.5 * g.squared_distances(hook(x)[0][:, block]).min(dim=1).values.cpu())
        return torch.cat(scores)

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        return self._score_inputs(features, self.epsilon_).float()

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        return {"fitted_epsilon": float(self.epsilon_), **self.gaussians_.state("")}

    def load_state_dict(self, state: dict[str, Any]) -> Mahalanobis:
        expected = {"fitted_epsilon", "classes", "means", "precision"}
        if set(state) != expected:
            raise ValueError(f"Mahalanobis state needs the keys {sorted(expected)}, got {sorted(state)}")
        epsilon = float(state["fitted_epsilon"])
        if not epsilon >= 0.0 or epsilon == float("inf"):
            raise ValueError(f"fitted_epsilon must be a finite number >= 0, got {epsilon}")
        self.gaussians_ = TiedGaussians.from_state(state, "")
        self.epsilon_ = epsilon
        return self
