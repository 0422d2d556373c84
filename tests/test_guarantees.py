"""Thresholds with guarantees (conformal false-alarm rate, selective risk): exact formulas and simulations.

The simulations draw exchangeable data with a known distribution, so the true false-alarm rate / selective risk
of a returned threshold is computed in closed form (no test-set noise); the only noise is over the splits, and the
tolerances are 3 binomial standard errors over those splits.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from featurefail import metrics
from featurefail.threshold import (
    ThresholdResult,
    calibrate_threshold,
    conformal_threshold,
    labelled_mistakes,
    parse_strategy,
    selective_risk_threshold,
)


def _binomial_slack(p: float, trials: int) -> float:
    return 3.0 * math.sqrt(p * (1.0 - p) / trials)


# ---- conformal false-alarm threshold ----------------------------------------------------------------------------


def test_conformal_threshold_is_the_kth_order_statistic():
    rng = np.random.default_rng(0)
    for n, alpha in [(19, 0.05), (99, 0.1), (1000, 0.05), (1234, 0.013)]:
        s = rng.normal(size=n)
        k = math.floor(alpha * (n + 1))
        r = conformal_threshold(s, alpha)
        assert r.threshold == np.sort(s)[k - 1]
        assert (s < r.threshold).sum() == k - 1  # continuous scores: exactly k - 1 calibration points flagged
        assert r.bound == pytest.approx(k / (n + 1)) and r.bound <= alpha
        assert r.coverage == pytest.approx(1 - (k - 1) / n) and r.n_calibration == n
        assert r.strategy == "fpr" and r.alpha == alpha and r.delta is None and "probability" in r.guarantee


def test_conformal_pac_k_matches_the_binomial_tail():
    rng = np.random.default_rng(1)
    n, alpha, delta = 2000, 0.05, 0.1
    s = rng.normal(size=n)
    r = conformal_threshold(s, alpha, delta)
    k = int((s < r.threshold).sum()) + 1
    # k is the largest with P(Bin(n, alpha) <= k - 1) <= delta, by brute force
    brute = max(j for j in range(1, n + 1) if stats.binom.cdf(j - 1, n, alpha) <= delta)
    assert k == brute
    assert r.bound == alpha and r.delta == delta and f"{1 - delta:g}" in r.guarantee


def test_conformal_edge_cases_are_clear():
    with pytest.raises(ValueError, match="needs at least 19 calibration scores"):
        conformal_threshold(np.arange(18.0), 0.05)  # 0.05 * 19 < 1
    assert conformal_threshold(np.arange(19.0), 0.05).threshold == 0.0  # k = 1: flags nothing seen, P <= 1/20
    need = math.ceil(math.log(0.05) / math.log(0.99))
    with pytest.raises(ValueError, match=f"at least {need} calibration scores"):
        conformal_threshold(np.arange(need - 1.0), 0.01, delta=0.05)
    conformal_threshold(np.arange(float(need)), 0.01, delta=0.05)
    with pytest.raises(ValueError, match="NaN"):
        conformal_threshold([0.0, np.nan] * 50, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        conformal_threshold(np.arange(100.0), 1.5)
    # -inf scores are always flagged; too many of them and the guarantee is impossible
    s = np.r_[np.full(3, -np.inf), np.arange(97.0)]
    r = conformal_threshold(s, 0.1)  # k = 10: flag the 3 -inf and 6 lowest finite scores
    assert r.threshold == 6.0 and (s < r.threshold).sum() == 9
    with pytest.raises(ValueError, match="-inf"):
        conformal_threshold(np.r_[np.full(10, -np.inf), np.arange(90.0)], 0.1)
    # +inf scores rank on top and give a finite threshold
    assert math.isfinite(conformal_threshold(np.r_[np.full(90, np.inf), np.arange(10.0)], 0.5).threshold)


def test_conformal_ties_never_raise_the_flag_rate():
    # discrete scores: P(s < T) is computed exactly from the distribution; strict '<' keeps it <= k / (n + 1)
    rng = np.random.default_rng(2)
    n, alpha, splits = 200, 0.1, 1000
    dist = stats.poisson(4)
    rates = []
    for _ in range(splits):
        r = conformal_threshold(dist.rvs(n, random_state=rng).astype(float), alpha)
        rates.append(dist.cdf(r.threshold - 1))  # P(s < T) for integer T
    assert np.mean(rates) <= math.floor(alpha * (n + 1)) / (n + 1) + 1e-12  # ties: strictly conservative


def test_conformal_marginal_guarantee_over_splits():
    """E[flag rate] = k / (n + 1) <= alpha exactly: not above it (invalid) and not far below it (conservative)."""
    rng = np.random.default_rng(3)
    n, alpha, splits = 500, 0.1, 1000
    k = math.floor(alpha * (n + 1))
    rates = np.array([stats.norm.cdf(conformal_threshold(rng.normal(size=n), alpha).threshold) for _ in range(splits)])
    se = math.sqrt(stats.beta.var(k, n + 1 - k) / splits)
    assert abs(rates.mean() - k / (n + 1)) < 3 * se
    assert rates.mean() < alpha + 3 * se


def test_conformal_pac_guarantee_over_splits_and_not_conservative():
    rng = np.random.default_rng(4)
    n, alpha, delta, splits = 2000, 0.05, 0.1, 800
    rates = np.array(
        [stats.norm.cdf(conformal_threshold(rng.normal(size=n), alpha, delta).threshold) for _ in range(splits)]
    )
    exceed = float((rates > alpha).mean())
    k = max(j for j in range(1, n + 1) if stats.binom.cdf(j - 1, n, alpha) <= delta)
    exact = stats.binom.cdf(k - 1, n, alpha)  # the exact P(rate > alpha), a bit under delta (discreteness)
    assert exceed <= delta + _binomial_slack(delta, splits)
    assert abs(exceed - exact) < _binomial_slack(exact, splits)
    # the oracle threshold flags exactly alpha; ours gives up well under one point of coverage
    assert np.median(rates) > alpha - 0.01
    # a plain empirical quantile (alibi-detect's infer_threshold) is not PAC: it exceeds alpha about half the time
    plain = np.array([stats.norm.cdf(np.quantile(rng.normal(size=n), alpha)) for _ in range(splits)])
    assert (plain > alpha).mean() > 0.3


# ---- selective risk guarantee -----------------------------------------------------------------------------------

# s ~ U(0, 1), P(wrong | s) = 0.5 (1 - s)^4, so the selective risk of accepting s >= t is R(t) = 0.1 (1 - t)^4
# and the oracle threshold for target r has coverage (10 r)^(1/4).


def _risk_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    s = rng.uniform(size=n)
    return s, rng.uniform(size=n) < 0.5 * (1 - s) ** 4


def _true_risk(t: float) -> float:
    return 0.1 * (1 - min(max(t, 0.0), 1.0)) ** 4


def test_selective_risk_bound_is_clopper_pearson_with_bonferroni():
    rng = np.random.default_rng(5)
    s, wrong = _risk_data(rng, 3000)
    r = selective_risk_threshold(s, wrong, 0.03, 0.05, n_candidates=50)
    accepted = s >= r.threshold
    m, e = int(accepted.sum()), int(wrong[accepted].sum())
    # exact Clopper-Pearson upper limit from scipy's binomial test, at level delta / 50
    ref = stats.binomtest(e, m).proportion_ci(confidence_level=1 - 2 * 0.05 / 50, method="exact").high
    assert r.bound == pytest.approx(ref, rel=1e-9) and r.bound <= 0.03
    assert r.coverage == pytest.approx(m / 3000) and r.risk == pytest.approx(e / m)
    # the next candidate up (2% more coverage) no longer meets the target
    m2 = math.ceil((round(m / 60) + 1) * 60)
    e2 = int(wrong[np.argsort(-s)[:m2]].sum())
    assert stats.beta.ppf(1 - 0.05 / 50, e2 + 1, m2 - e2) > 0.03
    assert r.n_failures == int(wrong.sum()) and r.target_risk == 0.03 and "0.95" in r.guarantee


def test_selective_risk_guarantee_over_splits():
    rng = np.random.default_rng(6)
    target, delta, n, splits = 0.02, 0.1, 20_000, 500
    oracle = (10 * target) ** 0.25
    ours, naive = [], []
    for _ in range(splits):
        s, wrong = _risk_data(rng, n)
        r = selective_risk_threshold(s, wrong, target, delta)
        ours.append((_true_risk(r.threshold), r.coverage))
        # the naive working point (empirical risk <= target, no bound) is what the guarantee protects against
        naive.append(_true_risk(1 - metrics.coverage_at_risk(s[~wrong], s[wrong], target)))
    risk, coverage = np.array(ours).T
    assert (risk > target).mean() <= delta + _binomial_slack(delta, splits)
    assert (np.array(naive) > target).mean() > 0.3
    assert coverage.mean() > oracle - 0.05  # a few points under the oracle's 66.9%


def test_selective_risk_errors_say_how_much_data_is_needed():
    rng = np.random.default_rng(7)
    s, wrong = _risk_data(rng, 1000)
    with pytest.raises(ValueError, match=r"roughly (\d+) labelled validation samples") as info:
        selective_risk_threshold(s, wrong, 0.01, 0.05)
    needed = int(info.value.args[0].split("roughly ")[1].split()[0])
    assert needed > 1000
    # the estimate is rough (read off noisy low-coverage points), but a few times that many samples suffice
    s, wrong = _risk_data(rng, 3 * needed)
    assert selective_risk_threshold(s, wrong, 0.01, 0.05).bound <= 0.01
    with pytest.raises(ValueError, match="above the target at every"):
        selective_risk_threshold(np.arange(100.0), np.ones(100, bool), 0.1)
    with pytest.raises(ValueError, match="zero mistakes at least"):
        selective_risk_threshold(np.arange(10.0), np.zeros(10, bool), 0.01)
    with pytest.raises(ValueError, match="differ in length"):
        selective_risk_threshold(np.arange(10.0), np.zeros(9, bool), 0.1)
    with pytest.raises(ValueError, match="booleans"):
        selective_risk_threshold(np.arange(3.0), [0, 2, 1], 0.1)


def test_selective_risk_ties_and_infinities():
    # a tie group is accepted or rejected as a whole; -inf is always rejected; thresholds stay finite
    s = np.r_[np.full(500, 5.0), np.full(500, 1.0), np.full(20, -np.inf)]
    wrong = np.r_[np.zeros(500, bool), np.ones(500, bool), np.zeros(20, bool)]
    r = selective_risk_threshold(s, wrong, 0.05)
    assert 1.0 < r.threshold <= 5.0 and r.coverage == pytest.approx(500 / 1020)
    r = selective_risk_threshold(np.r_[np.full(800, np.inf), np.zeros(200)], np.zeros(1000, bool), 0.05)
    assert math.isfinite(r.threshold) and r.coverage == 1.0 and r.risk == 0.0


def test_labelled_mistakes_drops_unlabelled_rows():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    labels = np.array([0, 0, -1, -1])
    s, wrong = labelled_mistakes([0.1, 0.2, 0.3, 0.4], logits, labels)
    assert s.tolist() == [0.1, 0.2] and wrong.tolist() == [False, True]
    s, wrong = labelled_mistakes([0.1, 0.2, 0.3], [1, 1, 0], [1, -1, 1])
    assert s.tolist() == [0.1, 0.3] and wrong.tolist() == [False, True]
    with pytest.raises(ValueError, match="differ in length"):
        labelled_mistakes([0.1], [1, 1], [1, 1])


# ---- the entry point and the result's (de)serialisation ----------------------------------------------------------


def test_calibrate_threshold_dispatches_and_checks_arguments():
    rng = np.random.default_rng(8)
    s, wrong = _risk_data(rng, 4000)
    same = [
        (calibrate_threshold(s, None, "fpr", alpha=0.05), conformal_threshold(s, 0.05)),
        (calibrate_threshold(s, wrong, "fpr", alpha=0.05, delta=0.1), conformal_threshold(s, 0.05, 0.1)),
        (calibrate_threshold(s, wrong, "risk", target_risk=0.05), selective_risk_threshold(s, wrong, 0.05, 0.05)),
    ]
    for ours, ref in same:
        assert ours.as_dict() == ref.as_dict()
    cv = calibrate_threshold(s, wrong, "f1", folds=3, seed=1)
    assert cv.guarantee == "" and cv.coverage == pytest.approx((s >= cv.threshold).mean())
    assert parse_strategy("fpr") == ("fpr", None) and parse_strategy("fpr@0.05") == ("fpr", 0.05)
    for kwargs, match in [
        ({"strategy": "fpr"}, "needs alpha"),
        ({"strategy": "risk"}, "needs target_risk"),
        ({"strategy": "risk", "target_risk": 0.1, "alpha": 0.1}, "alpha belongs"),
        ({"strategy": "f1", "alpha": 0.1}, "apply to strategies"),
        ({"strategy": "fpr", "alpha": 0.1, "target_risk": 0.1}, "target_risk belongs"),
    ]:
        with pytest.raises(ValueError, match=match):
            calibrate_threshold(s, wrong, **kwargs)
    with pytest.raises(ValueError, match="needs wrong"):
        calibrate_threshold(s, None, "risk", target_risk=0.1)


def test_threshold_result_round_trips_through_strict_json():
    rng = np.random.default_rng(9)
    s, wrong = _risk_data(rng, 4000)
    for r in (
        conformal_threshold(s, 0.05),
        conformal_threshold(s, 0.05, 0.1),
        selective_risk_threshold(s, wrong, 0.05),
        calibrate_threshold(s, wrong, "recall@0.9", folds=3),
    ):
        text = json.dumps(r.as_dict(), allow_nan=False)
        back = ThresholdResult.from_dict(json.loads(text))
        assert back.as_dict() == r.as_dict()
    old = {"threshold": 1.5, "strategy": "f1", "precision": float("nan"), "n_failures": 3}  # an older file
    assert ThresholdResult.from_dict(old).n_failures == 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"evil": 1}, "unknown keys"),
        ({"threshold": float("nan")}, "finite"),
        ({"threshold": "0.5"}, "number"),
        ({"threshold": True}, "number"),
        ({"strategy": "os.system"}, "strategy"),
        ({"alpha": 1.5}, "out of range"),
        ({"coverage": -0.1}, "out of range"),
        ({"n_calibration": -3}, "non-negative integer"),
        ({"n_calibration": 2.5}, "non-negative integer"),
        ({"fold_thresholds": "abc"}, "list"),
        ({"fold_thresholds": [float("inf")]}, "finite"),
        ({"guarantee": ["x"]}, "string"),
        ({"precision": [1]}, "number"),
    ],
)
def test_threshold_result_from_dict_rejects_hostile_data(change, match):
    good = conformal_threshold(np.arange(100.0), 0.1).as_dict()
    with pytest.raises(ValueError, match=match):
        ThresholdResult.from_dict({**good, **change})
    with pytest.raises(ValueError, match="dict"):
        ThresholdResult.from_dict([good])
    with pytest.raises(ValueError, match="lacks"):
        ThresholdResult.from_dict({"strategy": "f1"})
