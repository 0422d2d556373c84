"""The EM loop of :class:`~featurefail.gmm.DiagonalGMM` in EM's coordinates (centred, column-scaled rows)."""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .._tensor import progress
from .data import FitData
from .distributed import all_reduce_
from .kernels import em_chunk_statistics, m_step, natural_parameters, split_heaviest

if TYPE_CHECKING:
    from .estimator import DiagonalGMM

__all__ = ["run_em"]

logger = logging.getLogger("featurefail.gmm.estimator")


def run_em(
    model: DiagonalGMM,
    data: FitData,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    floor: torch.Tensor,
    generator: torch.Generator,
    run: int,
) -> dict[str, Any]:
    """EM from ``params`` (weights ``(K,)``, means and variances ``(K, D)``, float64) with ``model``'s settings.

    Returns the final parameters, the lower bounds (mean log-likelihood in EM's coordinates), whether ``tol``
    was met, the iterations run, the re-seeding count, the last change and the first float64 iteration.
    """
    k, d = model.n_components, data.n_features
    dev = data.device
    weights, means, variances = params
    lower_bounds: list[float] = []
    converged, n_reseeded, warned, reseeded_last = False, 0, False, False
    last_change = math.inf
    float64_from: int | None = None
    iterations = progress(
        range(1, model.max_iter + 1),
        enabled=model.verbose,
        desc=f"EM (init {run + 1}/{model.n_init})",
        total=model.max_iter,
    )
    n_iter = 0
    for n_iter in iterations:
        coef, bias = natural_parameters(weights, means, variances, data.dtype)
        coef_bias = torch.cat([coef, bias[:, None]], dim=1)
        stats = torch.zeros(k * (2 * d + 1) + 1, dtype=torch.float64, device=dev)
        sums_all, loglik = stats[:-1].view(k, 2 * d + 1), stats[-1:]
        for xa in data.chunks():
            chunk_stats, chunk_loglik = em_chunk_statistics(xa, coef_bias)
            sums_all += chunk_stats
            loglik += chunk_loglik
        all_reduce_(stats)
        counts, sums = sums_all[:, -1], sums_all[:, :-1]
        lower_bound = float(loglik.item()) / data.n_total
        if not math.isfinite(lower_bound):
            raise FloatingPointError(
                f"EM produced a non-finite log-likelihood at iteration {n_iter}; "
                "try dtype=torch.float64 or a larger reg_covar"
            )
        if lower_bounds:
            last_change = lower_bound - lower_bounds[-1]
            slack = 10 * torch.finfo(data.dtype).eps * (abs(lower_bound) + d)
            if data.dtype == torch.float64:
                # rounding grows with μ²/σ², up to 1/reg_covar in dimensions sitting on the floor
                slack /= model.reg_covar
            if last_change < -slack and not reseeded_last and float64_from != n_iter:
                # exact EM never lowers the bound: float32 rounding has reached the fit (typically
                # dimensions collapsed onto the variance floor), so finish in float64
                if data.dtype != torch.float64 and model.precision_fallback:
                    logger.info(
                        "EM: lower bound fell by %.3g at iteration %d; continuing in float64", -last_change, n_iter
                    )
                    data.set_dtype(torch.float64)
                    float64_from = n_iter + 1
                elif not warned:
                    warnings.warn(
                        f"EM lower bound decreased by {-last_change:.3g} nats/sample at iteration {n_iter} "
                        "(more than rounding)",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    warned = True
        lower_bounds.append(lower_bound)
        if model.verbose:
            shown = lower_bound - data.log_scale_sum
            logger.info("EM iteration %d: mean log-likelihood %.6f", n_iter, shown)
            if hasattr(iterations, "set_postfix"):
                iterations.set_postfix(loglik=f"{shown:.4f}")
        weights, means, variances = m_step(counts, sums, floor)
        weights, means, variances, n_split = split_heaviest(counts, weights, means, variances, generator)
        reseeded_last = n_split > 0
        n_reseeded += n_split
        if len(lower_bounds) > 1 and abs(last_change) < model.tol:
            converged = True
            break
    if hasattr(iterations, "close"):
        iterations.close()
    return {
        "params": (weights, means, variances),
        "lower_bound": lower_bounds[-1],
        "lower_bounds": lower_bounds,
        "converged": converged,
        "n_iter": n_iter,
        "n_reseeded": n_reseeded,
        "last_change": last_change,
        "float64_from": float64_from,
    }
