"""Threshold cross-validation, Mann-Whitney, rank metrics and ECE against their references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from featurefail import cross_validate_threshold, mann_whitney, metrics
from featurefail.threshold import choose_threshold


def test_threshold_recovers_a_known_gap():
    rng = np.random.default_rng(0)
    correct = rng.uniform(1.0, 2.0, 400)
    wrong = rng.uniform(0.0, 0.98, 60)
    scores = np.concatenate([correct, wrong])
    is_failure = np.r_[np.zeros(400, bool), np.ones(60, bool)]
    result = cross_validate_threshold(scores, is_failure, strategy="f1", folds=5)
    assert wrong.max() < result.threshold < correct.min()
    assert result.precision == 1.0 and result.recall == 1.0 and result.f1 == 1.0


def test_fpr_and_recall_targets():
    rng = np.random.default_rng(1)
    correct, wrong = rng.normal(0, 1, 20000), rng.normal(-2, 1, 20000)
    scores = np.concatenate([correct, wrong])
    is_failure = np.r_[np.zeros(20000, bool), np.ones(20000, bool)]
    t = choose_threshold(scores, is_failure, "fpr@0.05")
    assert abs(t - (-1.645)) < 0.05  # 5% quantile of N(0, 1)
    t = choose_threshold(scores, is_failure, "recall@0.95")
    assert abs(t - (-2 + 1.645)) < 0.05  # 95% quantile of N(-2, 1)
    cv = cross_validate_threshold(scores, is_failure, "fpr@0.05", folds=4)
    assert abs(cv.fpr - 0.05) < 0.01


def test_threshold_never_splits_ties_and_errors_are_clear():
    scores = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
    t = choose_threshold(scores, np.array([True, True, False, False, False]), "f1")
    assert 0.0 < t < 1.0
    with pytest.raises(ValueError, match="at least 5 failures"):
        cross_validate_threshold(np.arange(10.0), np.r_[np.ones(2, bool), np.zeros(8, bool)])
    for bad in ("recall@2", "fpr@-1", "auc", "recall@"):
        with pytest.raises(ValueError, match="strategy"):
            choose_threshold(scores, scores > 0, bad)


@pytest.mark.parametrize("ties", [False, True])
def test_mann_whitney_equals_scipy(ties):
    rng = np.random.default_rng(2)
    c, w = rng.normal(0.3, 1, 300), rng.normal(0, 1, 40)
    if ties:
        c, w = np.round(c), np.round(w)
    ours = mann_whitney(torch.tensor(c), w)
    ref = mannwhitneyu(c, w)
    assert ours.u_correct == ref.statistic and ours.pvalue == ref.pvalue
    assert ours.statistic == min(ref.statistic, 300 * 40 - ref.statistic)
    y = np.r_[np.ones(300), np.zeros(40)]
    assert ours.auroc == pytest.approx(roc_auc_score(y, np.r_[c, w]), abs=1e-12)
    with pytest.raises(ValueError, match="both groups"):
        mann_whitney([], w)


@pytest.mark.parametrize("ties", [False, True])
def test_rank_metrics_equal_scikit_learn(ties):
    rng = np.random.default_rng(3)
    normal, failure = rng.normal(1, 1, 500), rng.normal(0, 1, 80)
    if ties:
        normal, failure = np.round(normal), np.round(failure)
    s = np.r_[normal, failure]
    y = np.r_[np.ones(500), np.zeros(80)]
    assert metrics.auroc(normal, failure) == pytest.approx(roc_auc_score(y, s))
    assert metrics.aupr_in(normal, failure) == pytest.approx(average_precision_score(y, s))
    assert metrics.aupr_out(normal, failure) == pytest.approx(average_precision_score(1 - y, -s))
    fpr, tpr, _ = roc_curve(y, s)
    assert metrics.fpr_at_tpr(normal, failure, 0.95) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])
    # unbounded scores keep their ranks (a sigmoid would collapse these to 0.5)
    assert metrics.auroc(normal * 1e6, failure * 1e6) == pytest.approx(roc_auc_score(y, s))
    assert metrics.auroc(np.r_[normal, 1.0], np.r_[failure, -np.inf]) > 0.5


def test_ece_by_hand():
    logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 0.5], [0.0, 0.5]])
    labels = torch.tensor([0, 1, 1, 1])
    p_high = torch.softmax(logits[0], 0)[0].item()
    p_low = torch.softmax(logits[2], 0)[1].item()
    expected = 0.5 * abs(0.5 - p_high) + 0.5 * abs(1.0 - p_low)
    assert metrics.ece(logits, labels) == pytest.approx(expected)


def _brute_rc(normal, failure):
    """Risk-coverage points by a plain loop over the distinct scores (accept score >= t)."""
    s = np.r_[normal, failure]
    wrong = np.r_[np.zeros(len(normal), bool), np.ones(len(failure), bool)]
    points = []
    for t in sorted(set(s.tolist())):
        accepted = s >= t
        points.append((accepted.mean(), wrong[accepted].mean(), t))
    return points


@pytest.mark.parametrize("ties", [False, True])
def test_risk_coverage_metrics_equal_a_brute_force_loop(ties):
    rng = np.random.default_rng(4)
    normal, failure = rng.normal(1, 1, 300), rng.normal(0, 1, 60)
    if ties:
        normal, failure = np.round(normal * 2) / 2, np.round(failure * 2) / 2
    points = _brute_rc(normal, failure)
    cov, risk, thr = metrics.risk_coverage_curve(normal, failure)
    assert np.allclose(cov, [p[0] for p in points]) and np.allclose(risk, [p[1] for p in points])
    assert np.allclose(thr, [p[2] for p in points])
    # FD-Shifts: trapezoids between the curve points, then a flat segment down to coverage 0
    area = 0.0
    for (c0, r0, _), (c1, r1, _) in zip(points, [*points[1:], (0.0, points[-1][1], None)], strict=True):
        area += (r0 + r1) / 2 * (c0 - c1)
    assert metrics.aurc(normal, failure) == pytest.approx(area)
    e = 60 / 360
    assert metrics.eaurc(normal, failure) == pytest.approx(area - (e + (1 - e) * np.log(1 - e)))
    for c in (0.1, 0.5, 0.77, 1.0):
        ref = min((p for p in points if p[0] >= c), key=lambda p: p[0])[1]
        assert metrics.risk_at_coverage(normal, failure, c) == pytest.approx(ref)
    for r in (0.0, 0.05, 0.1, 0.3):
        ref = max([p[0] for p in points if p[1] <= r], default=0.0)
        assert metrics.coverage_at_risk(normal, failure, r) == pytest.approx(ref)
    if not ties:  # without ties AURC is the mean selective risk over coverages k/N, up to (r_1 - r_N) / 2N
        r = [p[1] for p in points][::-1]  # r_k: risk of the k most confident, k = 1..N
        assert metrics.aurc(normal, failure) == pytest.approx(np.mean(r) + (r[0] - r[-1]) / (2 * len(r)))


def test_aurc_extremes_and_errors():
    # a perfect score (all failures below all normal samples) reaches the ideal AURC, up to finite-sample terms
    rng = np.random.default_rng(5)
    normal, failure = rng.uniform(1, 2, 9000), rng.uniform(0, 1, 1000)
    assert abs(metrics.eaurc(normal, failure)) < 2e-3
    assert metrics.aurc(normal, failure) < metrics.aurc(rng.uniform(0, 2, 9000), failure)
    # a reversed score is the worst: risk 1 at every coverage below the failure rate
    assert metrics.aurc(failure, normal) > 0.9
    # a constant score is one point: the overall failure rate everywhere
    assert metrics.aurc(np.zeros(90), np.zeros(10)) == pytest.approx(0.1)
    assert metrics.aurc(np.r_[1.0, np.inf], np.r_[0.0, -np.inf]) == pytest.approx(metrics.aurc([1.0, 2.0], [0.0, -1]))
    with pytest.raises(ValueError, match="coverage"):
        metrics.risk_at_coverage(normal, failure, 0.0)
    with pytest.raises(ValueError, match="risk"):
        metrics.coverage_at_risk(normal, failure, -0.1)
    with pytest.raises(ValueError, match="NaN"):
        metrics.aurc([np.nan], [0.0])


def test_risk_coverage_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from featurefail.plots import risk_coverage_curves

    rng = np.random.default_rng(6)
    curves = {
        "good": (rng.normal(2, 1, 200), rng.normal(0, 1, 40)),
        "bad": (rng.normal(0, 1, 200), rng.normal(0, 1, 40)),
    }
    path = risk_coverage_curves(curves, tmp_path / "rc" / "curves.png", target_risk=0.05, working_points={"good": 0.5})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
