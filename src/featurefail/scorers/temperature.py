"""Temperature scaling (Guo et al., 2017): calibrated maximum softmax probability."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..exceptions import NotFittedError
from ..features import Features
from .base import check_features, register_scorer

__all__ = ["TemperatureScaling", "fit_temperature"]


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """``T > 0`` minimising the NLL of ``softmax(logits / T)``, by L-BFGS on ``log T`` in float64.

    Args:
        logits: ``(N, C)``.
        labels: ``(N,)`` int64.
        max_iter: L-BFGS iterations (the paper: at most 100).
    """
    z = logits.detach().double()
    y = labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-12
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


@register_scorer("temperature")
class TemperatureScaling:
    """``score = max_c softmax(z / T)_c`` with ``T`` fitted on labelled **validation** logits.

    ``T`` is found by L-BFGS on ``log T`` (so ``T > 0``) minimising the validation negative log-likelihood.
    Fitting happens in :meth:`fit_validation` (``FailureDetector.calibrate`` calls it); ``fit`` on the
    training set does nothing, since training logits are over-confident by construction.

    Paper: Guo, Pleiss, Sun & Weinberger, "On calibration of modern neural networks", ICML 2017.

    Attributes:
        temperature_: the fitted ``T``.
    """

    name = "temperature"
    requires_labels = False
    requires_validation_labels = True

    def __init__(self, max_iter: int = 100) -> None:
        self.max_iter = max_iter

    def fit(self, features: Features) -> TemperatureScaling:
        check_features(features, logits=True, who="TemperatureScaling")
        return self

    def fit_validation(self, features: Features) -> TemperatureScaling:
        """Fit ``T`` on labelled validation features (logits and labels)."""
        check_features(features, logits=True, labels=True, who="TemperatureScaling")
        self.temperature_ = fit_temperature(features.logits, features.labels, self.max_iter)
        return self

    def score(self, features: Features) -> torch.Tensor:
        if not hasattr(self, "temperature_"):
            raise NotFittedError(
                "TemperatureScaling needs validation data: call detector.calibrate(val_loader) "
                "or scorer.fit_validation(features)"
            )
        check_features(features, logits=True, who="TemperatureScaling")
        return torch.softmax(features.logits.double() / self.temperature_, dim=1).max(dim=1).values.float()

    def get_config(self) -> dict[str, Any]:
        return {"max_iter": self.max_iter}

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": float(self.temperature_)} if hasattr(self, "temperature_") else {}

    def load_state_dict(self, state: dict[str, Any]) -> TemperatureScaling:
        if "temperature" in state:
            self.temperature_ = float(state["temperature"])
        return self
