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
        TypeError: when the scores are not numbers.
    """
    c, w = _scores(scores_correct, "correct"), _scores(scores_wrong, "wrong")
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


def _scores(x: Any, group: str) -> np.ndarray:
    """The scores of one group as a flat float64 array (TypeError when they are not numbers)."""
    values = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if values.dtype == object or not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        raise TypeError(f"the {group} scores must be numbers, got dtype {values.dtype}")
    return values.astype(np.float64).ravel()
