"""Temperature scaling (Guo et al., 2017): calibrated maximum softmax probability."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field

from ..distributed import all_gather_rows
from ..exceptions import NotFittedError
from ..features import Features
from .base import ValidationUse, check_features, register_scorer
from .logit_scorer import LogitScorer

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
class TemperatureScaling(LogitScorer):
    """``score = max_c softmax(z / T)_c`` with ``T`` fitted on labelled **validation** logits.

    ``T`` is found by L-BFGS on ``log T`` (so ``T > 0``) minimising the validation negative log-likelihood.
    Fitting happens in :meth:`fit_validation` (``FailureDetector.calibrate`` calls it); ``fit`` on the
    training set does nothing, since training logits are over-confident by construction.

    Paper: Guo, Pleiss, Sun & Weinberger, "On calibration of modern neural networks", ICML 2017.

    Attributes:
        temperature_: the fitted ``T``.
    """

    supports_distributed = True  # fitted on the validation logits and labels of all ranks

    def __init__(self, max_iter: Annotated[int, Field(ge=1)] = 100) -> None:
        self.max_iter = max_iter

    def fit_validation(self, features: Features) -> TemperatureScaling:
        """Fit ``T`` on labelled validation features (logits and labels; labels < 0 are ignored); under
        ``torch.distributed`` on those of all ranks."""
        check_features(features, logits=True, labels=True, who="TemperatureScaling")
        known = features.labels >= 0
        logits, labels = all_gather_rows(features.logits[known]), all_gather_rows(features.labels[known])
        self.temperature_ = fit_temperature(logits, labels, self.max_iter)
        return self

    def validation_use(self) -> ValidationUse:
        return "labels"

    def is_fitted(self) -> bool:
        return hasattr(self, "temperature_")

    def evidence(self, logits: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "temperature_"):
            raise NotFittedError(
                "TemperatureScaling needs labelled validation data: call detector.calibrate(val_loader) or "
                "detector.fit_validation(val_loader) with (x, y) batches, or scorer.fit_validation(features)"
            )
        return torch.softmax(logits.double() / self.temperature_, dim=1).max(dim=1).values.float()

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": float(self.temperature_)} if hasattr(self, "temperature_") else {}

    def load_state_dict(self, state: dict[str, Any]) -> TemperatureScaling:
        extra = set(state) - {"temperature"}
        if extra:
            raise ValueError(f"TemperatureScaling state has unexpected keys {sorted(extra)}")
        if "temperature" in state:
            temperature = float(state["temperature"])
            if not (temperature > 0 and temperature < float("inf")):
                raise ValueError(f"the temperature must be a positive finite number, got {temperature}")
            self.temperature_ = temperature
        return self
