"""Conformal fusion: valid p-values, the combination rules against scipy, exact save/load and as_module()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from featurefail import FailureDetector
from featurefail.features import Features
from featurefail.scorers import build_scorer
from featurefail.scorers.conformal_fusion import COMBINE_RULES, combine_p_values, conformal_p_values


def _features(n: int, seed: int, d: int = 6, c: int = 3, blocks: tuple[int, ...] | None = None) -> Features:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centres = torch.linspace(-2, 2, c)[:, None] * torch.ones(c, d)
    f = centres[y] + torch.randn(n, d, generator=g)
    logits = f[:, :c] * 1.5 + 0.3 * torch.randn(n, c, generator=g)
    return Features(f, logits, y, blocks=blocks)


def test_conformal_p_value_is_the_counting_formula():
    cal = torch.tensor([0.1, 0.5, 0.5, 2.0]).double()
    s = torch.tensor([-1.0, 0.1, 0.3, 0.5, 5.0])
    brute = torch.tensor([(1 + sum(float(c) <= float(v) for c in cal)) / 5 for v in s], dtype=torch.float64)
    torch.testing.assert_close(conformal_p_values(cal, s), brute, rtol=0, atol=0)


def test_p_values_are_uniform_on_exchangeable_data_over_many_splits():
    """Calibration and test scores from one continuous law: (n+1)·p is uniform on {1..n+1}; the
    randomised p − U/(n+1) is exactly U(0, 1). 4,000 random splits, one test score each (independent)."""
    rng = np.random.default_rng(0)
    n, reps = 49, 4000
    draws = torch.from_numpy(rng.standard_t(3, size=(reps, n + 1)))
    p = torch.stack([conformal_p_values(row[:n].sort().values, row[n:]) for row in draws]).ravel().numpy()
    ranks = np.rint(p * (n + 1)).astype(int)
    assert stats.chisquare(np.bincount(ranks, minlength=n + 2)[1:]).pvalue > 1e-3
    smoothed = p - rng.uniform(size=p.size) / (n + 1)
    assert stats.kstest(smoothed, "uniform").pvalue > 1e-3
    for alpha in (0.02, 0.1, 0.3):  # valid: P(p <= alpha) <= alpha within sampling error
        assert stats.binomtest(int((p <= alpha).sum()), p.size, alpha, alternative="greater").pvalue > 1e-3


def test_fusion_component_p_values_are_uniform_on_new_in_distribution_rows():
    """The scorer's own p-values (train-split calibration inside fit): for a fresh row from the training
    distribution, every component's p-value is uniform — over 300 independent data sets and splits."""
    n_cal = 29
    p_rows = []
    for rep in range(300):
        data = _features(300, seed=rep)  # 10% held out -> 30 calibration rows
        scorer = build_scorer(
            "conformal_fusion", {"density": False, "random_state": rep, "calibration_fraction": 0.1}
        ).fit(data.subset(slice(0, 290)))
        assert scorer.n_calibration_ == n_cal
        p_rows.append(scorer.p_values(data.subset(slice(299, 300)))[0])
    p = torch.stack(p_rows).numpy()  # (300, 2): max_softmax, mahalanobis
    rng = np.random.default_rng(1)
    for k in range(p.shape[1]):
        smoothed = p[:, k] - rng.uniform(size=p.shape[0]) / (n_cal + 1)
        assert stats.kstest(smoothed, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("rule", COMBINE_RULES)
def test_combination_rules_against_independent_references(rule):
    rng = np.random.default_rng(2)
    p = torch.from_numpy(rng.uniform(0.001, 1.0, size=(200, 3)))
    ours = combine_p_values(p, rule).numpy()
    pn = p.numpy()
    if rule == "fisher":  # scipy's statistic is -2 Σ log p
        ref = np.array([-0.5 * stats.combine_pvalues(row, method="fisher").statistic for row in pn])
        np.testing.assert_allclose(ours, ref, rtol=1e-12)
    elif rule == "bonferroni":  # same ranking as Tippett's min-p combination
        ref = np.array([stats.combine_pvalues(row, method="tippett").pvalue for row in pn])
        assert stats.spearmanr(ours, ref).statistic > 1 - 1e-12
        np.testing.assert_allclose(ours, np.log(3 * pn.min(1)))
    elif rule == "simes":
        ref = [min(3 * v / (i + 1) for i, v in enumerate(sorted(row))) for row in pn]
        np.testing.assert_allclose(ours, np.log(ref))
    elif rule == "mean":
        np.testing.assert_allclose(ours, np.log(pn.mean(1)))
    else:
        np.testing.assert_allclose(ours, np.log(stats.hmean(pn, axis=1)))


def test_fit_validation_calibrates_on_the_validation_scores():
    train, val = _features(600, seed=1, blocks=(4, 2)), _features(200, seed=2, blocks=(4, 2))
    scorer = build_scorer("conformal_fusion", {"n_components": 2}).fit(train)
    assert scorer.calibrated_on_ == "train-split" and scorer.n_calibration_ == 60
    scorer.fit_validation(val)
    assert scorer.calibrated_on_ == "validation" and scorer.n_calibration_ == 200
    msp = torch.softmax(val.logits.double(), 1).max(1).values.sort().values
    torch.testing.assert_close(scorer.state_dict()["calibration.max_softmax"], msp, rtol=0, atol=0)
    p = scorer.p_values(val)
    # the validation rows against themselves: their p-values are their ranks / (n + 1)
    ranks = torch.tensor(stats.rankdata(msp.numpy(), method="max"), dtype=torch.float64)
    torch.testing.assert_close(p[:, 0].sort().values, (1 + ranks) / 201)


def test_components_and_settings_are_validated():
    with pytest.raises(ValueError, match="at least one component"):
        build_scorer("conformal_fusion", {"logit_score": None, "density": False, "mahalanobis": False})
    with pytest.raises(ValueError, match="combine"):
        build_scorer("conformal_fusion", {"combine": "max"})
    scorer = build_scorer("conformal_fusion", {"density": False})
    with pytest.raises(ValueError, match="logits"):
        scorer.fit(Features(torch.randn(50, 3)))
    fitted = scorer.fit(_features(100, seed=0))
    with pytest.raises(ValueError, match="dimension"):
        fitted.score(_features(10, seed=0, d=5))
    assert fitted.components_ == ["max_softmax", "mahalanobis"]


def test_non_finite_rows_score_minus_inf():
    scorer = build_scorer("conformal_fusion", {"n_components": 2}).fit(_features(300, seed=0))
    test = _features(5, seed=9)
    test.feats[1, 0] = float("nan")
    test.logits[3, 1] = float("inf")
    s = scorer.score(test)
    assert torch.isinf(s[[1, 3]]).all() and (s[[1, 3]] < 0).all() and torch.isfinite(s[[0, 2, 4]]).all()


def test_hostile_states_are_refused():
    scorer = build_scorer("conformal_fusion", {"n_components": 2}).fit(_features(300, seed=0, blocks=(4, 2)))
    state = scorer.state_dict()
    fresh = lambda: build_scorer("conformal_fusion", {"n_components": 2})  # noqa: E731
    for key, value, match in [
        ("calibration.gmm", state["calibration.gmm"].flip(0), "sorted"),
        ("calibration.mahalanobis", torch.tensor([float("nan")]).double(), "finite"),
        ("mahalanobis.precision", torch.zeros(3, 3).double(), "do not fit"),
        ("calibrated_on_validation", 7, "0 or 1"),
        ("surprise", torch.zeros(1), "unexpected"),
    ]:
        bad = {**state, key: value}
        with pytest.raises(ValueError, match=match):
            fresh().load_state_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        fresh().load_state_dict({k: v for k, v in state.items() if k != "calibration.max_softmax"})


@pytest.mark.parametrize("combine", ["fisher", "simes"])
def test_detector_save_load_and_as_module_are_exact(combine, tmp_path):
    from models import TinyResNet

    torch.manual_seed(0)
    model = TinyResNet(n_classes=3).eval()
    x = torch.rand(400, 1, 8, 8)
    det = FailureDetector(
        scorer="conformal_fusion", layer=[None, "layer1.0"], combine=combine, n_components=3, progress=False
    )
    det.fit(model, [(x[:300],)])
    det.fit_validation([(x[300:360], model(x[300:360]).argmax(1))])
    assert det.scorer_.calibrated_on_ == "validation"
    scores = det.score(x[360:])
    assert torch.isfinite(scores).all()
    with torch.no_grad():
        _, module_scores, _ = det.as_module(threshold=0.0)(x[360:])
    torch.testing.assert_close(module_scores.float(), scores, rtol=0, atol=0)
    path = tmp_path / "fusion.ff"
    det.save(path)
    back = FailureDetector.load(path, model=model)
    torch.testing.assert_close(back.score(x[360:]), scores, rtol=0, atol=0)
    assert back.scorer_.get_params() == det.scorer_.get_params()
    module = back.scorer_.as_module()
    f = back.features(x[360:])
    torch.testing.assert_close(module(f.feats, f.logits).float(), scores, rtol=0, atol=0)


def test_with_combine_equals_a_fit_with_that_rule():
    train, test = _features(400, seed=4, blocks=(4, 2)), _features(50, seed=5, blocks=(4, 2))
    fisher = build_scorer("conformal_fusion", {"n_components": 2}).fit(train)
    for rule in COMBINE_RULES:
        direct = build_scorer("conformal_fusion", {"n_components": 2, "combine": rule}).fit(train)
        swapped = fisher.with_combine(rule)
        assert swapped.get_params() == direct.get_params()
        torch.testing.assert_close(swapped.score(test), direct.score(test), rtol=0, atol=0)
    assert fisher.combine == "fisher"
    with pytest.raises(ValueError, match="combine"):
        fisher.with_combine("max")
