"""Mahalanobis confidence score (Lee et al., 2018): class means with one tied covariance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..exceptions import NotFittedError
from ..features import Features
from ..hooks import FeatureHook
from ..metrics import auroc
from .base import check_features, register_scorer

__all__ = ["Mahalanobis", "TiedGaussians"]

EPSILON_GRID = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)  # Lee et al.'s search grid


class TiedGaussians:
    """Class-conditional Gaussians sharing one covariance, in float64.

    ``Σ = (1/N) Σ_n (f_n − μ_{y_n})(f_n − μ_{y_n})ᵀ``, optionally shrunk toward ``(tr Σ / D)·I`` by
    ``shrinkage`` (0 = maximum likelihood), and pseudo-inverted (``Σ⁺``, as in Lee et al.'s code).
    """

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, shrinkage: float = 0.0) -> None:
        f = feats.double()
        self.classes = torch.unique(labels)
        self.means = torch.stack([f[labels == c].mean(0) for c in self.classes.tolist()])  # (C, D)
        centred = f - self.means[torch.searchsorted(self.classes, labels)]
        cov = centred.T @ centred / f.shape[0]
        d = cov.shape[0]
        scale = torch.trace(cov) / d
        if not torch.isfinite(scale) or scale <= 0:
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
        obj._mean_terms = ((obj.means @ obj.precision) * obj.means).sum(1)
        return obj


@register_scorer("mahalanobis")
class Mahalanobis:
    """``score = max_c −½ (f − μ_c)ᵀ Σ⁻¹ (f − μ_c)`` with class means and a tied covariance (labels needed).

    Optional input preprocessing (Lee et al., Eq. 4): ``x̃ = x − ε · sign(∇_x ½ d²_ĉ(f(x)))`` with ``ĉ`` the
    closest class, then the score of ``f(x̃)``. ``epsilon="auto"`` picks ε from Lee et al.'s grid by the AUROC
    of telling the model's correct from its wrong **validation** predictions — in-distribution data only,
    never OOD or adversarial samples (Lee et al. tuned on OOD data; that leaks the test set).

    Optional several layers (``layers=[...]``, pooled activations of named modules) with equal or given weights:
    ``score = Σ_l w_l · score_l``.

    Paper: Lee, Lee, Lee & Shin, "A simple unified framework for detecting out-of-distribution samples and
    adversarial attacks", NeurIPS 2018.

    Args:
        shrinkage: weight of ``(tr Σ / D)·I`` in the covariance (0 = maximum likelihood).
        epsilon: preprocessing step (0 = none), or ``"auto"``.
        layers: module names whose pooled outputs are scored too (instead of the detector's features).
        layer_weights: one weight per layer (default equal).
        batch_size: inputs per forward/backward pass when preprocessing or using layers.
    """

    name = "mahalanobis"
    requires_labels = True

    def __init__(
        self,
        shrinkage: float = 0.0,
        epsilon: float | str = 0.0,
        layers: Sequence[str] | None = None,
        layer_weights: Sequence[float] | None = None,
        batch_size: int = 256,
    ) -> None:
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError("shrinkage must be in [0, 1]")
        if not (epsilon == "auto" or (isinstance(epsilon, int | float) and epsilon >= 0)):
            raise ValueError(f"epsilon must be >= 0 or 'auto', got {epsilon!r}")
        if layer_weights is not None and (layers is None or len(layer_weights) != len(layers)):
            raise ValueError("layer_weights needs one weight per entry of layers")
        self.shrinkage = shrinkage
        self.epsilon = epsilon
        self.layers = list(layers) if layers is not None else None
        self.layer_weights = list(layer_weights) if layer_weights is not None else None
        self.batch_size = batch_size
        self._model: nn.Module | None = None
        self._make_hook: Callable[[nn.Module], FeatureHook] | None = None

    @property
    def requires_inputs(self) -> bool:
        return self.epsilon != 0.0 or self.layers is not None

    requires_model = requires_inputs

    def attach(self, model: nn.Module, make_hook: Callable[[nn.Module], FeatureHook]) -> None:
        """Receive the classifier and the detector's hook factory (used for preprocessing and layers)."""
        self._model = model
        self._make_hook = make_hook

    def _hooks(self) -> list[FeatureHook]:
        if self._model is None or self._make_hook is None:
            raise RuntimeError(
                "Mahalanobis with preprocessing or layers needs the model: use it through "
                "FailureDetector (which attaches it) or call attach(model, make_hook)"
            )
        if self.layers is None:
            return [self._make_hook(self._model)]
        return [FeatureHook(self._model, layer=name) for name in self.layers]

    def _layer_feats(self, hook: FeatureHook, x: torch.Tensor) -> torch.Tensor:
        out = []
        device = _model_device(hook.model)
        with hook, torch.no_grad():
            for chunk in torch.split(x, self.batch_size):
                out.append(hook(chunk.to(device))[0].double().cpu())
        return torch.cat(out)

    def fit(self, features: Features) -> Mahalanobis:
        check_features(features, labels=True, who="Mahalanobis")
        if self.layers is None:
            self.gaussians_ = [TiedGaussians(features.feats, features.labels, self.shrinkage)]
        else:
            if features.inputs is None:
                raise ValueError("Mahalanobis with layers needs the training inputs (features.inputs)")
            self.gaussians_ = [
                TiedGaussians(self._layer_feats(h, features.inputs), features.labels, self.shrinkage)
                for h in self._hooks()
            ]
        self.epsilon_ = 0.0 if self.epsilon == "auto" else float(self.epsilon)
        return self

    def fit_validation(self, features: Features) -> Mahalanobis:
        """With ``epsilon="auto"``: choose ε on labelled validation data (correct vs wrong predictions)."""
        if self.epsilon != "auto":
            return self
        check_features(features, labels=True, logits=True, who="Mahalanobis")
        correct = features.correct
        if correct.all() or (~correct).all():
            self.epsilon_ = 0.0
            return self
        results = {}
        for eps in EPSILON_GRID:
            s = self._score_inputs(features, eps)
            results[eps] = auroc(s[correct], s[~correct])
        self.epsilon_ = max(results, key=lambda e: (results[e], -e))
        self.epsilon_search_ = results
        return self

    def _score_inputs(self, features: Features, eps: float) -> torch.Tensor:
        if not self.requires_inputs and eps == 0.0:
            return -0.5 * self.gaussians_[0].squared_distances(features.feats).min(dim=1).values
        if features.inputs is None:
            raise ValueError("Mahalanobis preprocessing needs the inputs (features.inputs)")
        weights = self.layer_weights or [1.0] * len(self.gaussians_)
        total = torch.zeros(len(features), dtype=torch.float64)
        for w, hook, g in zip(weights, self._hooks(), self.gaussians_, strict=True):
            scores = []
            device = _model_device(hook.model)
            with hook:
                for x in torch.split(features.inputs, self.batch_size):
                    x = x.to(device)
                    if eps > 0:
                        x_in = x.clone().requires_grad_(True)
                        with torch.enable_grad():
                            d2 = g.squared_distances(hook(x_in)[0])
                            (grad,) = torch.autograd.grad(0.5 * d2.min(dim=1).values.sum(), x_in)
                        x = x - eps * grad.sign()
                    with torch.no_grad():
                        scores.append(-0.5 * g.squared_distances(hook(x)[0]).min(dim=1).values.cpu())
            total += w * torch.cat(scores)
        return total

    def score(self, features: Features) -> torch.Tensor:
        if not hasattr(self, "gaussians_"):
            raise NotFittedError("Mahalanobis is not fitted")
        return self._score_inputs(features, self.epsilon_).float()

    def get_config(self) -> dict[str, Any]:
        return {
            "shrinkage": self.shrinkage,
            "epsilon": self.epsilon,
            "layers": self.layers,
            "layer_weights": self.layer_weights,
            "batch_size": self.batch_size,
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"n_layers": len(self.gaussians_), "fitted_epsilon": float(self.epsilon_)}
        for i, g in enumerate(self.gaussians_):
            state.update(g.state(f"layer{i}."))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> Mahalanobis:
        self.gaussians_ = [TiedGaussians.from_state(state, f"layer{i}.") for i in range(int(state["n_layers"]))]
        self.epsilon_ = float(state["fitted_epsilon"])
        return self


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
