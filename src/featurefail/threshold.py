"""Choosing the flagging threshold ``T`` (flag when ``score < T``; scores: higher = more normal).

Three families of strategies, all reachable through :func:`calibrate_threshold`:

* ``"f1"``, ``"recall@R"``, ``"fpr@F"``: point rules chosen by k-fold cross-validation
  (:func:`cross_validate_threshold`). Their held-out metrics are estimates, not guarantees.
* ``"fpr"`` (:func:`conformal_threshold`): a conformal false-alarm guarantee. From ``n`` held-out in-distribution
  scores, ``T`` is the ``k``-th smallest with ``k = floor(alpha (n + 1))``, so a new exchangeable in-distribution
  input is flagged with probability ``<= k / (n + 1) <= alpha``. With ``delta`` it is a PAC guarantee instead:
  with probability ``>= 1 - delta`` over the calibration set, the in-distribution flag rate is ``<= alpha``.
* ``"risk"`` (:func:`selective_risk_threshold`): selective classification with guaranteed risk (Geifman and
  El-Yaniv, 2017): the most permissive ``T`` such that, with probability ``>= 1 - delta``, the error rate among
  the *accepted* inputs (``score >= T``) is ``<= target_risk``.

Labels of ``-1`` mean "unlabelled": the functions take ``wrong`` booleans of labelled rows only; use
:func:`labelled_mistakes` to drop unlabelled rows before calling them.

One file (over 500 lines) because the three families share one result type (:class:`ThresholdResult`, which a
saved detector stores and validates) and one set of input checks, and a user compares them side by side.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from scipy import stats
from sklearn.model_selection import StratifiedKFold

__all__ = [
    "ThresholdResult",
    "calibrate_threshold",
    "choose_threshold",
    "conformal_threshold",
    "cross_validate_threshold",
    "labelled_mistakes",
    "parse_strategy",
    "selective_risk_threshold",
]

GUARANTEED_STRATEGIES = ("fpr", "risk")


def parse_strategy(strategy: str) -> tuple[str, float | None]:
    """Parse a strategy name.

    ``"f1"`` -> ("f1", None); ``"recall@0.95"`` -> ("recall", 0.95); ``"fpr@0.05"`` -> ("fpr", 0.05);
    the guaranteed strategies ``"fpr"`` -> ("fpr", None) and ``"risk"`` -> ("risk", None) (their targets are the
    ``alpha`` / ``target_risk`` arguments of :func:`calibrate_threshold`).
    """
    if not isinstance(strategy, str):
        raise ValueError(f"strategy must be a string, got {type(strategy).__name__}")
    if strategy in ("f1", *GUARANTEED_STRATEGIES):
        return strategy, None
    match = re.fullmatch(r"(recall|fpr)@(0?\.\d+|1(?:\.0*)?)", strategy)
    if not match:
        raise ValueError(
            f"strategy must be 'f1', 'recall@R' (flag at least R of the failures), 'fpr@F' (flag at most F "
            f"of the normal samples), with 0 < R, F <= 1, or a guaranteed strategy 'fpr' (with alpha) or 'risk' "
            f"(with target_risk and delta); got {strategy!r}"
        )
    value = float(match.group(2))
    if value <= 0:
        raise ValueError(f"the target in {strategy!r} must be > 0")
    return match.group(1), value


def _as_array(values: Any, dtype: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    a = np.asarray(values)
    if a.dtype == object:
        raise TypeError(f"{name} must be numeric, got an object array")
    return a.astype(dtype, copy=False).ravel()


def _scores(scores: Any) -> np.ndarray:
    s = _as_array(scores, np.float64, "scores")
    if s.size == 0:
        raise ValueError("scores is empty")
    if np.isnan(s).any():
        raise ValueError(f"scores hold {int(np.isnan(s).sum())} NaN value(s); score non-finite inputs as -inf")
    return s


def _wrong(wrong: Any, n: int) -> np.ndarray:
    a = np.asarray(wrong.detach().cpu().numpy() if hasattr(wrong, "detach") else wrong).ravel()
    if a.dtype != bool:
        if a.dtype.kind not in "biuf" or not np.isin(a, (0, 1)).all():
            raise ValueError("wrong must be booleans (True = the model's prediction is wrong)")
        a = a.astype(bool)
    if a.size != n:
        raise ValueError(f"scores and wrong differ in length: {n} vs {a.size}")
    return a


def _probability(value: Any, name: str, *, closed_right: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (0.0 < v < 1.0 or (closed_right and v == 1.0)):
        raise ValueError(f"{name} must be in (0, 1{']' if closed_right else ')'}, got {value}")
    return v


def _between(rejected: float, accepted: float) -> float:
    """A finite threshold ``t`` with ``rejected < t <= accepted`` (both scores; ``rejected < accepted``)."""
    if math.isfinite(rejected) and math.isfinite(accepted):
        mid = (rejected + accepted) / 2.0
        return mid if rejected < mid <= accepted else accepted
    if math.isfinite(accepted):  # rejected is -inf
        return accepted
    if math.isfinite(rejected):  # accepted is +inf
        return max(rejected + 1.0, float(np.nextafter(rejected, np.inf)))
    return 0.0


def labelled_mistakes(scores: Any, predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Keep the labelled rows and say which predictions are wrong.

    Args:
        scores: ``(N,)`` scores, higher = more normal.
        predictions: ``(N,)`` predicted classes or ``(N, C)`` logits/probabilities (argmax taken).
        labels: ``(N,)`` integer labels; ``label < 0`` (e.g. ``-1``) means unlabelled and the row is dropped, so
            unlabelled inputs never count as mistakes.

    Returns:
        ``(scores, wrong)`` of the ``M <= N`` labelled rows: float64 ``(M,)`` and bool ``(M,)``.
    """
    s = _scores(scores)
    p = predictions.detach().cpu().numpy() if hasattr(predictions, "detach") else np.asarray(predictions)
    if p.ndim == 2:
        p = p.argmax(axis=1)
    y = _as_array(labels, np.float64, "labels")
    p = np.asarray(p).ravel()
    if not (s.size == p.size == y.size):
        raise ValueError(f"scores, predictions and labels differ in length: {s.size}, {p.size}, {y.size}")
    if np.isnan(y).any() or (y != np.round(y)).any():
        raise ValueError("labels must be integers (use -1 for unlabelled rows)")
    keep = y >= 0
    return s[keep], p[keep] != y[keep]


def choose_threshold(scores: np.ndarray, is_failure: np.ndarray, strategy: str = "f1") -> float:
    """The threshold ``T`` (flag ``score < T``) that best meets a point ``strategy`` on these samples.

    Candidates lie halfway between consecutive distinct scores (and below/above all of them), so ties are
    never split. ``"f1"`` maximises F1 of the failure class; ``"recall@R"`` takes the highest precision among
    thresholds flagging at least ``R`` of the failures; ``"fpr@F"`` the highest recall among thresholds
    flagging at most ``F`` of the normal samples. The guaranteed strategies live in :func:`calibrate_threshold`.
    """
    kind, target = parse_strategy(strategy)
    if kind == "risk" or (kind == "fpr" and target is None):
        raise ValueError(f"strategy {strategy!r} carries a guarantee: use calibrate_threshold(..., {strategy!r}, ...)")
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


_METRICS = ("precision", "recall", "f1", "fpr", "precision_std", "recall_std", "f1_std", "fpr_std")
_PROBABILITIES = ("alpha", "delta", "target_risk")
_RATES = ("bound", "coverage", "risk")
_COUNTS = ("n_failures", "n_normal", "n_calibration")


@dataclass
class ThresholdResult:
    """A chosen threshold (flag when ``score < threshold``) and what is known about it.

    Attributes:
        threshold: the threshold (always finite).
        strategy: ``"f1"``, ``"recall@R"``, ``"fpr@F"`` (cross-validated) or ``"fpr"`` / ``"risk"`` (guaranteed).
        fold_thresholds: cross-validated strategies: the threshold chosen on each fold's training part.
        precision, recall, f1, fpr: cross-validated strategies: mean over held-out folds of the failure-class
            metrics (NaN for the guaranteed strategies).
        precision_std, recall_std, f1_std, fpr_std: their standard deviations over folds.
        n_failures, n_normal: counts of failures / normal samples in the data (0 when not labelled).
        guarantee: the guarantee in words ("" for the cross-validated strategies, which have none).
        alpha: ``"fpr"``: the false-alarm level.
        delta: ``"fpr"`` with PAC, ``"risk"``: the probability, over the calibration draw, that the guarantee fails.
        target_risk: ``"risk"``: the selective-risk target.
        bound: the guaranteed number: ``"fpr"`` marginal: ``k / (n + 1)`` (the exact expected flag rate, ``<= alpha``);
            ``"fpr"`` PAC: ``alpha``; ``"risk"``: the Clopper-Pearson upper bound on the selective risk (``<= target``).
        coverage: fraction of the calibration samples accepted (``score >= threshold``), i.e. ``1 - flag rate``.
        risk: fraction wrong among the accepted calibration samples (when ``wrong`` was given).
        n_calibration: number of samples the threshold was chosen on.
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
    guarantee: str = ""
    alpha: float | None = None
    delta: float | None = None
    target_risk: float | None = None
    bound: float | None = None
    coverage: float | None = None
    risk: float | None = None
    n_calibration: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON data (NaN written as ``None``); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and math.isnan(value):
                value = None
            elif isinstance(value, list):
                value = [float(v) for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ThresholdResult:
        """Validate and rebuild from :meth:`as_dict` data (e.g. read from a file, so possibly hostile).

        Missing optional keys take their defaults (files written before the guarantee fields load).

        Raises:
            ValueError: unknown keys, wrong types, non-finite thresholds, probabilities out of range, etc.
        """
        if not isinstance(data, dict):
            raise ValueError(f"calibration must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"calibration has unknown keys: {unknown}")
        for key in ("threshold", "strategy"):
            if key not in data:
                raise ValueError(f"calibration lacks {key!r}")

        def number(key: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"calibration {key!r} must be a number, got {value!r}")
            return float(value)

        kw: dict[str, Any] = {}
        threshold = number("threshold", data["threshold"])
        if not math.isfinite(threshold):
            raise ValueError(f"calibration threshold must be finite, got {threshold}")
        kw["threshold"] = threshold
        strategy = data["strategy"]
        try:
            parse_strategy(strategy)
        except ValueError as exc:
            raise ValueError(f"calibration strategy: {exc}") from None
        kw["strategy"] = strategy
        folds = data.get("fold_thresholds", [])
        if not isinstance(folds, list) or len(folds) > 10_000:
            raise ValueError("calibration fold_thresholds must be a list of numbers")
        kw["fold_thresholds"] = [number("fold_thresholds", v) for v in folds]
        if not all(math.isfinite(v) for v in kw["fold_thresholds"]):
            raise ValueError("calibration fold_thresholds must be finite")
        for key in _METRICS:
            value = data.get(key)
            kw[key] = float("nan") if value is None else number(key, value)
        for key in _COUNTS:
            value = data.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"calibration {key!r} must be a non-negative integer, got {value!r}")
            kw[key] = value
        for key in _PROBABILITIES + _RATES:
            value = data.get(key)
            if value is None:
                kw[key] = None
                continue
            v = number(key, value)
            ok = 0.0 < v < 1.0 if key in _PROBABILITIES else 0.0 <= v <= 1.0
            if not ok:
                raise ValueError(f"calibration {key!r} out of range: {v}")
            kw[key] = v
        guarantee = data.get("guarantee", "")
        if not isinstance(guarantee, str) or len(guarantee) > 4000:
            raise ValueError("calibration guarantee must be a string (at most 4000 characters)")
        kw["guarantee"] = guarantee
        return cls(**kw)


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
    thresholds and the metrics are the held-out means (an honest estimate of what it will do, not a guarantee).

    Args:
        scores: ``(N,)`` scores, higher = more normal.
        is_failure: ``(N,)`` bool, True for failures (e.g. the model's mistakes).

    Raises:
        ValueError: with fewer than ``folds`` samples in either class, or mismatched shapes.
    """
    kind, target = parse_strategy(strategy)
    if kind == "risk" or (kind == "fpr" and target is None):
        raise ValueError(f"strategy {strategy!r} carries a guarantee: use calibrate_threshold(..., {strategy!r}, ...)")
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
    threshold = float(np.median(chosen))
    accepted = s >= threshold
    return ThresholdResult(
        threshold=threshold,
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
        coverage=float(accepted.mean()),
        risk=float(y[accepted].mean()) if accepted.any() else None,
        n_calibration=int(s.size),
    )


def conformal_threshold(scores: Any, alpha: float, delta: float | None = None) -> ThresholdResult:
    """Threshold with a finite-sample false-alarm guarantee from held-out in-distribution scores.

    Let ``s_(1) <= ... <= s_(n)`` be the calibration scores sorted ascending. The threshold is ``T = s_(k)`` (flag
    ``score < T``), so exactly the calibration scores below the ``k``-th smallest are flagged:

    * marginal (``delta=None``): ``k = floor(alpha (n + 1))``. For a new input exchangeable with the calibration
      inputs, ``P(flagged) <= k / (n + 1) <= alpha``, averaged over the calibration draw (equality for continuous
      scores; ties only lower it, because the comparison is strict).
    * PAC (``delta`` given): ``k`` is the largest with ``P(Binomial(n, alpha) <= k - 1) <= delta``. The flag rate
      ``P(s < s_(k))`` is at most the ``k``-th uniform order statistic ``~ Beta(k, n + 1 - k)``, hence with
      probability ``>= 1 - delta`` over the calibration set the in-distribution flag rate is ``<= alpha``.

    Scores of ``-inf`` (non-finite features) are always flagged; they count among the ``k - 1`` flagged.

    Args:
        scores: ``(n,)`` in-distribution scores (higher = more normal), not used to fit the scorer. All of them
            count, whether the model's prediction on them is right or wrong (no labels needed).
        alpha: the false-alarm level in (0, 1).
        delta: ``None`` for the marginal guarantee, else the PAC failure probability in (0, 1).

    Raises:
        ValueError: when ``n`` is too small for ``alpha`` (marginal: ``n + 1 < 1 / alpha``; PAC:
            ``(1 - alpha)^n > delta``) — the message gives the ``n`` needed — or when more than ``k - 1`` of the
            calibration scores are ``-inf``.
    """
    s = np.sort(_scores(scores))
    alpha = _probability(alpha, "alpha")
    n = int(s.size)
    if delta is None:
        k = math.floor(alpha * (n + 1) * (1 + 1e-12))
        if k < 1:
            need = math.ceil(1.0 / alpha - 1.0 - 1e-9)
            raise ValueError(
                f"alpha={alpha} needs at least {need} calibration scores (alpha (n + 1) >= 1) to flag anything; "
                f"got {n}. Use more held-out in-distribution data or a larger alpha."
            )
    else:
        delta = _probability(delta, "delta")
        # largest k with P(Bin(n, alpha) <= k - 1) <= delta
        k = int(np.searchsorted(stats.binom.cdf(np.arange(n), n, alpha), delta, side="right"))
        if k < 1:
            need = math.ceil(math.log(delta) / math.log1p(-alpha))
            raise ValueError(
                f"a PAC guarantee with alpha={alpha}, delta={delta} needs at least {need} calibration scores "
                f"((1 - alpha)^n <= delta); got {n}. Use more held-out in-distribution data, a larger alpha or delta, "
                f"or delta=None for the marginal guarantee."
            )
    threshold = float(s[k - 1])
    n_neg_inf = int(np.isneginf(s).sum())
    if n_neg_inf >= k:
        raise ValueError(
            f"{n_neg_inf} of the {n} calibration scores are -inf (non-finite features or logits), which are always "
            f"flagged; the guarantee allows at most {k - 1}. Check the model and data before calibrating."
        )
    if threshold == math.inf:
        threshold = _between(float(s[np.isfinite(s)].max()) if np.isfinite(s).any() else 0.0, math.inf)
    coverage = float((s >= threshold).mean())
    expected = k / (n + 1)
    if delta is None:
        guarantee = (
            f"A new input exchangeable with the {n} calibration inputs is flagged with probability at most "
            f"k/(n+1) = {k}/{n + 1} = {expected:.4g} <= alpha = {alpha:g} (on average over calibration sets)."
        )
        bound = expected
    else:
        guarantee = (
            f"With probability at least {1 - delta:g} over the draw of the {n} calibration inputs, the rate at "
            f"which in-distribution inputs are flagged is at most alpha = {alpha:g} (expected rate "
            f"{k}/{n + 1} = {expected:.4g})."
        )
        bound = alpha
    return ThresholdResult(
        threshold=threshold,
        strategy="fpr",
        guarantee=guarantee,
        alpha=alpha,
        delta=delta,
        bound=bound,
        coverage=coverage,
        n_calibration=n,
    )


def _clopper_pearson_upper(errors: np.ndarray, n: np.ndarray, level: float) -> np.ndarray:
    """One-sided ``1 - level`` upper confidence bound on a binomial proportion (exact, via the Beta quantile)."""
    errors = np.asarray(errors, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        upper = stats.beta.ppf(1.0 - level, errors + 1.0, np.maximum(n - errors, 1e-300))
    return np.where(errors >= n, 1.0, upper)


def _samples_needed(risks: np.ndarray, target: float, level: float) -> np.ndarray:
    """Per risk ``r < target``: about the smallest ``m`` at which ``r * m`` mistakes of ``m`` bound ``<= target``."""
    r = np.asarray(risks, dtype=np.float64)

    def ok(m: np.ndarray) -> np.ndarray:
        return _clopper_pearson_upper(r * m, m, level) <= target

    hi = np.ones_like(r)
    for _ in range(60):  # doubling
        bad = ~ok(hi)
        if not bad.any():
            break
        hi = np.where(bad, hi * 2, hi)
    lo = np.floor(hi / 2)
    for _ in range(60):  # bisection on integers
        if (hi - lo <= 1).all():
            break
        mid = np.floor((lo + hi) / 2)
        good = ok(mid)
        hi, lo = np.where(good, mid, hi), np.where(good, lo, mid)
    return hi


def selective_risk_threshold(
    scores: Any, wrong: Any, target_risk: float, delta: float = 0.05, *, n_candidates: int = 100
) -> ThresholdResult:
    """Selective classification with guaranteed risk (SGR; Geifman and El-Yaniv, 2017).

    Accept inputs with ``score >= T``. Returns the most permissive ``T`` (largest coverage) such that, with
    probability ``>= 1 - delta`` over the validation draw, the error rate among accepted inputs is
    ``<= target_risk``.

    Method: the candidates accept the top ``m_j = ceil(j n / K)`` validation scores, ``j = 1..K`` with
    ``K = n_candidates`` (moved down to the nearest tie boundary so ties are never split; duplicates merged). For
    each, the exact one-sided Clopper-Pearson upper bound on the selective risk is computed at level ``delta / K``
    (Bonferroni over the candidates), and the candidate with the largest coverage whose bound is ``<= target_risk``
    wins. Why this is valid: given the highest rejected score ``v``, the ``m`` accepted samples are i.i.d. draws
    from the distribution above ``v``, so their mistakes are exactly Binomial(m, R(v)), with ``R(v)`` the
    selective risk of accepting ``score > v``; the grid positions depend on ``n`` only (for untied scores), so the
    union bound over the ``K`` candidates holds. The returned threshold lies halfway between ``v`` and the lowest
    accepted score, a sliver of probability mass (about ``1 / n``) inside that region. SGR's binary search tests
    only ``ceil(log2 n)`` thresholds but relies on the risk being monotone in the threshold, and which thresholds
    it tests depends on the labels; the Bonferroni grid needs neither, at the price of ``log K`` instead of
    ``log log2 n`` inside the bound.

    Scores of ``-inf`` are always rejected. Drop unlabelled rows first (:func:`labelled_mistakes`).

    Args:
        scores: ``(n,)`` validation scores, higher = more normal.
        wrong: ``(n,)`` bool, True where the model's prediction is wrong.
        target_risk: the error rate allowed among accepted inputs, in (0, 1).
        delta: probability that the guarantee fails, in (0, 1).
        n_candidates: size ``K`` of the candidate grid (finer grid: finer coverage, slightly looser bound).

    Raises:
        ValueError: when no candidate meets the target; the message says roughly how many validation samples
            would be needed.
    """
    s = _scores(scores)
    y = _wrong(wrong, s.size)
    target_risk = _probability(target_risk, "target_risk")
    delta = _probability(delta, "delta")
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, (int, np.integer)) or n_candidates < 1:
        raise ValueError(f"n_candidates must be a positive integer, got {n_candidates!r}")
    n = int(s.size)
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], y[order]
    n_acceptable = int((s_desc > -np.inf).sum())
    if n_acceptable == 0:
        raise ValueError("every validation score is -inf (non-finite features or logits); nothing can be accepted")
    # achievable accepted counts: m such that s_desc[m - 1] > s_desc[m] (ties never split)
    boundaries = np.flatnonzero(s_desc[1:n_acceptable] < s_desc[: n_acceptable - 1]) + 1
    achievable = np.concatenate([boundaries, [n_acceptable]])
    wanted = np.ceil(np.arange(1, n_candidates + 1) / n_candidates * n).astype(np.int64)
    pick = np.clip(np.searchsorted(achievable, wanted, side="right") - 1, 0, achievable.size - 1)
    m = np.unique(achievable[pick])
    level = delta / m.size
    errors = np.concatenate([[0], np.cumsum(y_desc)])[m]
    bounds = _clopper_pearson_upper(errors, m, level)
    ok = np.flatnonzero(bounds <= target_risk)
    if ok.size == 0:
        zero_errors = math.ceil(math.log(level) / math.log1p(-target_risk))
        risks = errors / m
        best = int(np.argmin(bounds))
        msg = (
            f"no threshold meets selective risk <= {target_risk:g} with probability {1 - delta:g} from {n} "
            f"validation samples: the best candidate (coverage {m[best] / n:.3f}, {int(errors[best])} mistakes "
            f"of {int(m[best])} accepted) has upper bound {bounds[best]:.4g}. Even with zero mistakes at least "
            f"{zero_errors} accepted samples are needed."
        )
        below = np.flatnonzero(risks < target_risk)
        if below.size:
            need = _samples_needed(risks[below], target_risk, level) * n / m[below]
            i = int(below[int(np.argmin(need))])
            msg += (
                f" At the observed error rate {risks[i]:.4g} among the top {m[i] / n:.1%} of scores, roughly "
                f"{math.ceil(min(need))} labelled validation samples would be needed."
            )
        else:
            msg += " The observed error rate is above the target at every candidate coverage; lower the target."
        raise ValueError(msg)
    j = int(ok[np.argmax(m[ok])])
    accepted = int(m[j])
    if accepted < n_acceptable:
        threshold = _between(float(s_desc[accepted]), float(s_desc[accepted - 1]))
    else:  # accept every finite score; -inf scores stay flagged
        rest = s_desc[:n_acceptable]
        lowest = float(rest[-1])
        threshold = lowest if math.isfinite(lowest) else _between(-math.inf, lowest)
    coverage = accepted / n
    risk = float(errors[j] / accepted)
    bound = float(bounds[j])
    guarantee = (
        f"With probability at least {1 - delta:g} over the draw of the {n} validation samples, the error rate among "
        f"accepted inputs (score >= threshold) is at most {bound:.4g} <= target_risk = {target_risk:g}; "
        f"validation coverage {coverage:.4f} (Clopper-Pearson bound, Bonferroni over {m.size} candidate thresholds)."
    )
    return ThresholdResult(
        threshold=threshold,
        strategy="risk",
        n_failures=int(y.sum()),
        n_normal=int((~y).sum()),
        guarantee=guarantee,
        delta=delta,
        target_risk=target_risk,
        bound=bound,
        coverage=coverage,
        risk=risk,
        n_calibration=n,
    )


def calibrate_threshold(
    scores: Any,
    wrong: Any = None,
    strategy: str = "f1",
    *,
    alpha: float | None = None,
    delta: float | None = None,
    target_risk: float | None = None,
    folds: int = 5,
    seed: int = 0,
) -> ThresholdResult:
    """One entry point for every strategy (what :meth:`FailureDetector.calibrate` calls).

    Args:
        scores: ``(N,)`` held-out scores, higher = more normal (not the data the scorer was fitted on).
        wrong: ``(N,)`` bool, True where the model is wrong; labelled rows only (see :func:`labelled_mistakes`).
            Needed by every strategy except ``"fpr"``, which ignores it.
        strategy: ``"f1"``, ``"recall@R"``, ``"fpr@F"`` (cross-validated with ``folds`` and ``seed``); ``"fpr"``
            (conformal, needs ``alpha``, optional ``delta`` for PAC); ``"risk"`` (needs ``target_risk``,
            ``delta`` defaults to 0.05).

    Returns:
        A :class:`ThresholdResult`; ``guarantee`` states the guarantee in words for ``"fpr"`` and ``"risk"``.
    """
    parse_strategy(strategy)
    if strategy == "fpr":
        if alpha is None:
            raise ValueError("strategy 'fpr' needs alpha, the false-alarm level (e.g. alpha=0.05)")
        if target_risk is not None:
            raise ValueError("target_risk belongs to strategy 'risk', not 'fpr'")
        return conformal_threshold(scores, alpha, delta)
    if strategy == "risk":
        if target_risk is None:
            raise ValueError("strategy 'risk' needs target_risk (e.g. target_risk=0.02)")
        if alpha is not None:
            raise ValueError("alpha belongs to strategy 'fpr', not 'risk'")
        if wrong is None:
            raise ValueError("strategy 'risk' needs wrong, the model's mistakes on the labelled validation rows")
        return selective_risk_threshold(scores, wrong, target_risk, 0.05 if delta is None else delta)
    if alpha is not None or delta is not None or target_risk is not None:
        raise ValueError(f"alpha, delta and target_risk apply to strategies 'fpr' and 'risk', not {strategy!r}")
    if wrong is None:
        raise ValueError(f"strategy {strategy!r} needs wrong, the model's mistakes on the validation rows")
    return cross_validate_threshold(scores, wrong, strategy, folds=folds, seed=seed)
