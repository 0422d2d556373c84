"""Validation of a saved mixture state (files may be hostile: every tensor is checked before use)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["WEIGHT_SUM_TOLERANCE", "checked_state"]

WEIGHT_SUM_TOLERANCE = 1e-6


def _as_float64(state: dict[str, Any], name: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(state[name], dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"state[{name!r}] is not a numeric array: {exc}") from exc
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"state[{name!r}] holds NaN or infinite values")
    return t


def checked_state(state: dict[str, Any], k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights ``(K,)``, means ``(K, D)``, variances ``(K, D)`` and centre ``(D,)`` of ``state`` as float64 CPU tensors.

    Raises:
        ValueError: naming the entry that is missing, not numeric, non-finite, of the wrong shape, a weight that
            is not positive or weights that do not sum to one (within 1e-6), or a variance that is not positive.
    """
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    missing = {"weights", "means", "covariances", "center"} - set(state)
    if missing:
        raise ValueError(f"state is missing {sorted(missing)}")
    weights = _as_float64(state, "weights")
    means = _as_float64(state, "means")
    variances = _as_float64(state, "covariances")
    center = _as_float64(state, "center")
    if weights.shape != (k,):
        raise ValueError(f"state['weights'] must have shape ({k},) for n_components={k}, got {tuple(weights.shape)}")
    if means.ndim != 2 or means.shape[0] != k or means.shape[1] == 0:
        raise ValueError(f"state['means'] must have shape ({k}, D) with D >= 1, got {tuple(means.shape)}")
    d = means.shape[1]
    if variances.shape != means.shape:
        raise ValueError(
            f"state['covariances'] must have shape ({k}, {d}) like the means, got {tuple(variances.shape)}"
        )
    if center.shape != (d,):
        raise ValueError(f"state['center'] must have shape ({d},), got {tuple(center.shape)}")
    if bool((weights <= 0).any()):
        raise ValueError(f"state['weights'] must be positive; {int((weights <= 0).sum())} are not")
    total = float(weights.sum())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"state['weights'] must sum to 1 (within {WEIGHT_SUM_TOLERANCE:g}), they sum to {total!r}")
    if bool((variances <= 0).any()):
        raise ValueError(f"state['covariances'] must be positive; {int((variances <= 0).sum())} entries are not")
    return weights, means, variances, center
