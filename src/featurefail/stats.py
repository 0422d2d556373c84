"""Is the difference between the scores of correct and wrong samples real? (paper Eq. 6–7)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

__all__ = ["MannWhitneyResult", "mann_whitney"]


@dataclass(frozen=True)
class MannWhitneyResult:
    """Mann-Whitney U test of correct against wrong samples.

    Attributes:
        statistic: ``U = min(U_C, U_W)`` (paper Eq. 7).
        u_correct: ``U_C``, the number of (correct, wrong) pairs where the correct sample scores higher
            (ties count one half).
        u_wrong: ``U_W = n·m − U_C``.
        pvalue: two-sided p-value, exactly ``scipy.stats.mannwhitneyu(correct, wrong).pvalue``.
        auroc: ``U_C / (n·m)``, the AUROC of the score for telling correct (positive) from wrong samples.
        n_correct: ``n``.
        n_wrong: ``m``.
    """

    statistic: float
    u_correct: float
    u_wrong: float
    pvalue: float
    auroc: float
    n_correct: int
    n_wrong: int


def mann_whitney(scores_correct: Any, scores_wrong: Any) -> MannWhitneyResult:
    """Two-sided Mann-Whitney U test (scipy's defaults) on 1-D scores, higher = more normal.

    Raises:
        ValueError: when a group is empty or a score is NaN.
    """
    c = np.asarray(_numpy(scores_correct), dtype=np.float64).ravel()
    w = np.asarray(_numpy(scores_wrong), dtype=np.float64).ravel()
    if c.size == 0 or w.size == 0:
        raise ValueError(f"both groups need samples: {c.size} correct, {w.size} wrong")
    if np.isnan(c).any() or np.isnan(w).any():
        raise ValueError("scores hold NaN")
    result = mannwhitneyu(c, w)
    u_c = float(result.statistic)
    u_w = c.size * w.size - u_c
    return MannWhitneyResult(
        statistic=min(u_c, u_w),
        u_correct=u_c,
        u_wrong=u_w,
        pvalue=float(result.pvalue),
        auroc=u_c / (c.size * w.size),
        n_correct=int(c.size),
        n_wrong=int(w.size),
    )


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
