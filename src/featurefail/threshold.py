"""Choosing the flagging threshold ``T`` (flag when ``score < T``) by k-fold cross-validation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

__all__ = ["ThresholdResult", "choose_threshold", "cross_validate_threshold", "parse_strategy"]


def parse_strategy(strategy: str) -> tuple[str, float | None]:
    """``"f1"`` -> ("f1", None); ``"recall@0.95"`` -> ("recall", 0.95); ``"fpr@0.05"`` -> ("fpr", 0.05)."""
    if strategy == "f1":
        return "f1", None
    match = re.fullmatch(r"(recall|fpr)@(0?\.\d+|1(?:\.0*)?)", strategy)
    if not match:
        raise ValueError(
            f"strategy must be 'f1', 'recall@R' (flag at least R of the failures) or 'fpr@F' (flag at most F "
            f"of the normal samples), with 0 < R, F <= 1; got {strategy!r}"
        )
    value = float(match.group(2))
    if value <= 0:
        raise ValueError(f"the target in {strategy!r} must be > 0")
    return match.group(1), value


def choose_threshold(scores: np.ndarray, is_failure: np.ndarray, strategy: str = "f1") -> float:
    """The threshold ``T`` (flag ``score < T``) that best meets ``strategy`` on these samples.

    Candidates lie halfway between consecutive distinct scores (and below/above all of them), so ties are
    never split. ``"f1"`` maximises F1 of the failure class; ``"recall@R"`` takes the highest precision among
    thresholds flagging at least ``R`` of the failures; ``"fpr@F"`` the highest recall among thresholds
    flagging at most ``F`` of the normal samples.
    """
    kind, target = parse_strategy(strategy)
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_failure, dtype=bool)
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    distinct = np.flatnonzero(np.diff(s) > 0)  # flag the first j+1 samples for j in distinct
    cut = np.concatenate([[-1], distinct, [s.size - 1]])
    flagged = cut + 1
    tp = np.concatenate([[0], np.cumsum(y)])[flagged]
    fp = flagged - tp
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    precision = np.where(flagged > 0, tp / np.maximum(flagged, 1), 1.0)
    recall = tp / pos
    fpr = fp / neg
    finite = np.where(np.isfinite(s), s, np.nan)
    lo = np.nanmin(finite) - 1.0 if np.isfinite(finite).any() else -1.0
    hi = np.nanmax(finite) + 1.0 if np.isfinite(finite).any() else 1.0
    padded = np.clip(np.concatenate([[lo], np.nan_to_num(s, neginf=lo, posinf=hi), [hi]]), lo, hi)
    thresholds = (padded[cut + 1] + padded[cut + 2]) / 2.0
    if kind == "f1":
        f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
        best = int(np.argmax(f1))
    elif kind == "recall":
        ok = np.flatnonzero(recall >= target - 1e-12)
        best = int(ok[np.argmax(precision[ok])]) if ok.size else len(thresholds) - 1
    else:
        ok = np.flatnonzero(fpr <= target + 1e-12)
        best = int(ok[np.argmax(recall[ok])]) if ok.size else 0
    return float(thresholds[best])


@dataclass
class ThresholdResult:
    """Outcome of :func:`cross_validate_threshold`.

    Attributes:
        threshold: the median of the per-fold thresholds (flag when ``score < threshold``).
        strategy: the trade-off requested.
        fold_thresholds: threshold chosen on each fold's training part.
        precision, recall, f1, fpr: mean over held-out folds of the failure-class metrics.
        precision_std, recall_std, f1_std, fpr_std: their standard deviations over folds.
        n_failures, n_normal: counts in the calibration set.
    """

    threshold: float
    strategy: str
    fold_thresholds: list[float] = field(default_factory=list)
    precision: float = float("nan")
    recall: float = float("nan")
    f1: float = float("nan")
    fpr: float = float("nan")
    precision_std: float = float("nan")
    recall_std: float = float("nan")
    f1_std: float = float("nan")
    fpr_std: float = float("nan")
    n_failures: int = 0
    n_normal: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rates(scores: np.ndarray, is_failure: np.ndarray, threshold: float) -> tuple[float, float, float, float]:
    flag = scores < threshold
    tp = int((flag & is_failure).sum())
    fp = int((flag & ~is_failure).sum())
    fn = int((~flag & is_failure).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = fp / max(int((~is_failure).sum()), 1)
    return precision, recall, f1, fpr


def cross_validate_threshold(
    scores: Any, is_failure: Any, strategy: str = "f1", folds: int = 5, seed: int = 0
) -> ThresholdResult:
    """Choose a threshold by stratified k-fold cross-validation.

    On each fold the threshold is chosen on the other ``folds - 1`` parts and its precision, recall, F1 and
    false-positive rate are measured on the held-out part; ``threshold`` is the median of the fold
    thresholds and the metrics are the held-out means (an honest estimate of what it will do).

    Args:
        scores: ``(N,)`` scores, higher = more normal.
        is_failure: ``(N,)`` bool, True for failures (e.g. the model's mistakes).

    Raises:
        ValueError: with fewer than ``folds`` samples in either class, or mismatched shapes.
    """
    parse_strategy(strategy)
    s = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64).ravel()
    y = np.asarray(is_failure.detach().cpu() if hasattr(is_failure, "detach") else is_failure, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and is_failure differ in length: {s.size} vs {y.size}")
    if np.isnan(s).any():
        raise ValueError("scores hold NaN")
    n_fail, n_norm = int(y.sum()), int((~y).sum())
    if folds < 2:
        raise ValueError("folds must be >= 2")
    if min(n_fail, n_norm) < folds:
        raise ValueError(
            f"cross-validation with {folds} folds needs at least {folds} failures and {folds} normal samples; "
            f"got {n_fail} failures and {n_norm} normal. Use a larger validation set or fewer folds."
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    chosen, metrics = [], []
    for train, held in splitter.split(s, y):
        t = choose_threshold(s[train], y[train], strategy)
        chosen.append(t)
        metrics.append(_rates(s[held], y[held], t))
    m = np.asarray(metrics)
    mean, std = m.mean(0), m.std(0)
    return ThresholdResult(
        threshold=float(np.median(chosen)),
        strategy=strategy,
        fold_thresholds=[float(t) for t in chosen],
        precision=float(mean[0]),
        recall=float(mean[1]),
        f1=float(mean[2]),
        fpr=float(mean[3]),
        precision_std=float(std[0]),
        recall_std=float(std[1]),
        f1_std=float(std[2]),
        fpr_std=float(std[3]),
        n_failures=n_fail,
        n_normal=n_norm,
    )
