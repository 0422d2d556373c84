"""Kernels of the EM engine: the linear form of the diagonal-Gaussian log-density, the chunk statistics,
the M-step, the variance floor and the re-seeding of empty components.

The E-step is written as one matrix product per chunk of rows. For a component ``k`` with weight
``π_k``, mean ``μ_k`` and variances ``σ²_k``::

    log π_k N(x | μ_k, σ²_k) = [x, x²] · [μ_k/σ²_k, -1/(2σ²_k)]ᵀ + b_k
    b_k = log π_k - ½ Σ_d μ²_kd/σ²_kd - ½ Σ_d log σ²_kd - D/2 · log 2π

so memory is O(chunk · K), never O(N · K · D). The sufficient statistics of the M-step,
``N_k = Σ r_nk`` and ``Σ r_nk [x_n, x_n²]``, come from the same chunk with one more product.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "EXACT_TOP",
    "LOG_2PI",
    "MIN_COMPONENT_SIZE",
    "augmented_features",
    "column_scale",
    "component_log_prob",
    "em_chunk_statistics",
    "host_tensor",
    "m_step",
    "natural_parameters",
    "rescored_log_prob",
    "split_heaviest",
    "squared_features",
    "variance_floor",
]

LOG_2PI = math.log(2.0 * math.pi)
MIN_COMPONENT_SIZE = 2.0  # fewer effective samples than this leave no variance to estimate: re-seed
EXACT_TOP = 4  # components per row whose log-density is recomputed exactly at scoring time


def squared_features(x: torch.Tensor) -> torch.Tensor:
    """``[x, x²]`` along the feature axis: ``(n, D) -> (n, 2D)``."""
    return torch.cat([x, x * x], dim=1)


def augmented_features(x: torch.Tensor) -> torch.Tensor:
    """``[x, x², 1]`` along the feature axis: ``(n, D) -> (n, 2D + 1)``.

    With it one product gives the E-step (``coef`` and ``bias`` stacked) and one the M-step statistics
    (the last column sums the responsibilities into ``N_k``).
    """
    return torch.cat([x, x * x, torch.ones_like(x[:, :1])], dim=1)


def em_chunk_statistics(xa: torch.Tensor, coef_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step and M-step statistics of one chunk.

    Args:
        xa: ``(n, 2D + 1)`` augmented centred rows (:func:`augmented_features`).
        coef_bias: ``(K, 2D + 1)``: :func:`natural_parameters`' ``coef`` with ``bias`` as last column.

    Returns:
        ``Σ_n r_nk [x_n, x_n², 1]`` of shape ``(K, 2D + 1)`` (the last column is ``N_k``) and the chunk's
        summed log-likelihood (float64 scalar tensor).

    The responsibilities ``r_nk = e_nk / s_n`` with ``e_nk = exp(l_nk − max_k l_nk)`` are never normalised in
    place: ``1/s_n`` scales the ``(n, 2D+1)`` rows instead of the ``(n, K)`` matrix, saving a pass over it.
    """
    log_p = xa @ coef_bias.T
    row_max = log_p.amax(dim=1, keepdim=True)
    e = log_p.sub_(row_max).exp_()
    row_sum = e.sum(dim=1, keepdim=True)
    stats = e.T @ (xa / row_sum)
    loglik = (row_max.double() + row_sum.double().log()).sum()
    return stats, loglik


def natural_parameters(
    weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear form of the diagonal-Gaussian log-density.

    Args:
        weights: ``(K,)`` mixture weights.
        means: ``(K, D)`` component means (in the coordinates the data will be given in).
        variances: ``(K, D)`` component variances, all positive.
        dtype: dtype of the returned tensors.

    Returns:
        ``coef`` of shape ``(K, 2D)`` and ``bias`` of shape ``(K,)`` such that
        ``squared_features(x) @ coef.T + bias`` is ``log π_k N(x | μ_k, σ²_k)``, shape ``(n, K)``.
    """
    precisions = 1.0 / variances
    coef = torch.cat([means * precisions, -0.5 * precisions], dim=1)
    d = means.shape[1]
    bias = (
        torch.log(weights)
        - 0.5 * (means * means * precisions).sum(1)
        - 0.5 * torch.log(variances).sum(1)
        - 0.5 * d * LOG_2PI
    )
    return coef.to(dtype), bias.to(dtype)


def component_log_prob(xx: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``log π_k N(x_n | μ_k, σ²_k)``: ``xx (n, 2D)``, ``coef (K, 2D)``, ``bias (K,)`` -> ``(n, K)``."""
    return torch.addmm(bias, xx, coef.T)


def rescored_log_prob(
    x: torch.Tensor,
    coef: torch.Tensor,
    bias: torch.Tensor,
    center: torch.Tensor,
    means64: torch.Tensor,
    precisions64: torch.Tensor,
    exact_bias64: torch.Tensor,
    top: int,
) -> torch.Tensor:
    """``log π_k N(x | k)`` of every row and component, ``(n, D) -> (n, K)`` in float64.

    The product form runs in ``coef.dtype``; in float32 its rounding grows with ``x²/σ²``, so the ``top`` largest
    entries of each row, which carry the log-likelihood, are recomputed directly as
    ``b_k − ½ Σ_d (x_d − μ_kd)² / σ²_kd`` in float64 (``means64`` centred on ``center``, ``exact_bias64`` =
    ``log π_k − ½ Σ log σ²_k − D/2 log 2π``). Differentiable in ``x``; used by ``DiagonalGMM`` and by the
    exportable ``GMMScoreModule``.
    """
    centre64 = center.double()
    lp = component_log_prob(squared_features(x.to(coef.dtype) - center.to(coef.dtype)), coef, bias).double()
    if coef.dtype == torch.float64 or top == 0:
        return lp
    idx = lp.detach().topk(top, dim=1).indices
    diff = (x.double() - centre64)[:, None, :] - means64[idx]
    exact = exact_bias64[idx] - 0.5 * (diff * diff * precisions64[idx]).sum(-1)
    return lp.scatter(1, idx, exact)


def m_step(
    counts: torch.Tensor, sums: torch.Tensor, floor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximisation step from float64 sufficient statistics.

    Args:
        counts: ``(K,)`` effective counts ``N_k = Σ_n r_nk``.
        sums: ``(K, 2D)`` ``Σ_n r_nk [x_n, x_n²]``.
        floor: ``(D,)`` smallest variance allowed per dimension.

    Returns:
        weights ``(K,)``, means ``(K, D)`` and floored variances ``(K, D)``.
    """
    d = sums.shape[1] // 2
    safe = counts.clamp_min(torch.finfo(counts.dtype).tiny)[:, None]
    means = sums[:, :d] / safe
    variances = torch.maximum(sums[:, d:] / safe - means * means, floor)
    weights = counts / counts.sum()
    return weights, means, variances


def variance_floor(
    variance: torch.Tensor, reg_covar: float, mean_square: torch.Tensor | None = None, eps: float = 2.0**-23
) -> torch.Tensor:
    """Per-dimension variance floor ``reg_covar · Var[x_d] + (eps · rms_d)²``: ``(D,) -> (D,)``.

    ``variance`` is ``Var[x_d]``; ``mean_square`` (optional, ``(D,)``) is ``E[x_d²]``, the square of the column's
    magnitude. The second term is the variance of rounding at that magnitude (``eps``: the machine epsilon of the
    fitting dtype, float32's 2⁻²³ by default): a column constant up to a few ulps of jitter (a saturated tanh
    unit) would otherwise get a floor of ``reg_covar`` times its jitter's variance, and one ulp off the mean
    would cost ~10⁵ nats. The term exceeds the first only where ``std_d / rms_d < eps / sqrt(reg_covar)`` (~10⁻⁴
    in float32 at the default ``reg_covar``): columns whose spread is a few ulps. A constant dimension
    has no scale of its own; it borrows the mean variance of the others (1.0 if all dimensions are constant),
    so the floor stays positive and the log-likelihood finite.
    """
    positive = variance > 0
    fallback = variance[positive].mean() if bool(positive.any()) else variance.new_tensor(1.0)
    floor = reg_covar * torch.where(positive, variance, fallback)
    if mean_square is not None:
        floor = floor + eps**2 * mean_square
    return floor


def column_scale(variance: torch.Tensor) -> torch.Tensor:
    """Per-column power of two nearest to the standard deviation: ``(D,) -> (D,)`` (1 for constant columns).

    Dividing by a power of two is exact in binary floating point, so EM on ``x / scale`` does the same
    arithmetic as on ``x`` wherever ``x`` is representable, while keeping ``x²`` and ``1/σ²`` of features at
    extreme scales (standard deviations of 1e-19 or 1e19) inside float32's range.
    """
    std = torch.where(variance > 0, variance, torch.ones_like(variance)).sqrt()
    return torch.exp2(torch.round(torch.log2(std)))


def host_tensor(value: Any) -> torch.Tensor:
    """A float64 CPU tensor of an array, list or tensor on any device."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def split_heaviest(
    counts: torch.Tensor,
    weights: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Re-seed each component with ``counts < MIN_COMPONENT_SIZE`` by splitting the heaviest one in two.

    The pair gets half the weight and count each and means ``μ_h ± ½σ_h ⊙ s`` for a random sign vector
    ``s``. A component is left alone when no other holds enough samples to split (tiny data, K close to N).

    Returns:
        weights, means, variances and the number of components re-seeded.
    """
    dead = torch.nonzero(counts < MIN_COMPONENT_SIZE).flatten().tolist()
    if not dead:
        return weights, means, variances, 0
    counts, weights, means, variances = counts.clone(), weights.clone(), means.clone(), variances.clone()
    counts[dead] = 0.0
    n_done = 0
    for k in dead:
        h = int(torch.argmax(counts).item())
        if counts[h] < 2 * MIN_COMPONENT_SIZE:
            break
        signs = (torch.randint(0, 2, (means.shape[1],), generator=generator) * 2 - 1).to(means)
        offset = 0.5 * variances[h].sqrt() * signs
        means[k], variances[k] = means[h] + offset, variances[h]
        means[h] = means[h] - offset
        counts[k] = counts[h] = counts[h] / 2
        weights[k] = weights[h] = weights[h] / 2
        n_done += 1
    return weights / weights.sum(), means, variances, n_done
