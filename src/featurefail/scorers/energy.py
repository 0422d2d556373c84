"""Energy score (Liu et al., 2020), and the classifier-head helpers of the scorers that recompute logits."""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import Field

from ..features import Features
from .base import ModelContext, register_scorer
from .logit_scorer import LogitScorer

__all__ = ["Energy", "check_head_state", "check_keys", "check_width", "classifier_head", "scalar"]


@register_scorer("energy")
class Energy(LogitScorer):
    """``score = T · logsumexp(z / T)`` for logits ``z (N, C)`` (the negative free energy ``−E(x; T)``), in
    float64; needs no fitting. Higher = more normal (in-distribution inputs have lower energy).

    Paper: Liu, Wang, Owens & Li, "Energy-based out-of-distribution detection", NeurIPS 2020 (Eq. 7; the paper
    scores with ``T = 1``, the default here).

    Args:
        temperature: ``T > 0``.
    """

    supports_distributed = True  # nothing is learned from data

    def __init__(self, temperature: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0) -> None:
        self.temperature = temperature

    def evidence(self, logits: torch.Tensor) -> torch.Tensor:
        t = float(self.temperature)
        return (t * torch.logsumexp(logits.double() / t, dim=1)).float()


def classifier_head(context: ModelContext, width: int, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The head ``(W (C, D), b (C,))`` (float64 copies) given to a scorer through :meth:`Scorer.attach`.

    Raises:
        ValueError: without a head (the features are not the head's input), for a layer block other than the
            head's input, or when the head's input width is not ``width``.
    """
    hint = "hook the head's input (layer=None)"
    if context.head_weight is None or context.head_bias is None:
        raise ValueError(
            f"{who} needs the classifier head; {hint}, so that the detector finds it, "
            "or pass head=(weight, bias) to fit_features"
        )
    if context.block is not None and context.block.start not in (0, None):
        raise ValueError(f"{who} applies to the classifier head's input only (the first layer block); {hint}")
    weight, bias = context.head_weight.detach().double().cpu(), context.head_bias.detach().double().cpu()
    check_head_state(weight, bias, who)
    if weight.shape[1] != width:
        raise ValueError(
            f"{who}: the classifier head takes {weight.shape[1]} inputs but the features have {width} columns; {hint}"
        )
    return weight.clone(), bias.clone()


def check_head_state(weight: Any, bias: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a head ``(W (C, D), b (C,))``: tensors of matching shapes, finite; returns float64 copies."""
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise ValueError(f"{who}: the head weight and bias must be tensors")
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(
            f"{who}: the head weight must be (C, D) and the bias (C,), got {tuple(weight.shape)} and "
            f"{tuple(bias.shape)}"
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ValueError(f"{who}: the head holds NaN or infinite values")
    return weight.detach().double().clone(), bias.detach().double().clone()


def scalar(state: dict[str, Any], key: str, who: str, low: float = -math.inf, high: float = math.inf) -> float:
    """``state[key]`` as a finite float in ``[low, high]`` (a number or a one-element tensor), else ValueError."""
    value = state[key]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{who}: {key!r} must be one number, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{who}: {key!r} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{who}: {key!r} must be a finite number in [{low}, {high}], got {value}")
    return value


def check_keys(state: dict[str, Any], expected: set[str], who: str) -> None:
    """``ValueError`` unless ``state`` has exactly the keys ``expected``."""
    if set(state) != expected:
        raise ValueError(f"{who} state needs the keys {sorted(expected)}, got {sorted(state)}")


def check_width(features: Features, width: int, who: str) -> None:
    """``ValueError`` unless ``features`` have ``width`` columns (the fitted dimension)."""
    if features.feats.shape[1] != width:
        raise ValueError(f"{who}: features have dimension {features.feats.shape[1]}, expected {width}")
