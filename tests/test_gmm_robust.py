"""DiagonalGMM on hostile saved states, empty feature sets and features at extreme scales."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from featurefail import DiagonalGMM


def fitted(k: int = 3, d: int = 4) -> tuple[DiagonalGMM, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, d)) + rng.integers(0, k, 600)[:, None] * 4.0
    return DiagonalGMM(k, random_state=0).fit(x), x


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.update(weights=torch.tensor([0.5, 0.6, -0.1], dtype=torch.float64)), "positive"),
        (lambda s: s.update(weights=torch.tensor([0.5, float("nan"), 0.5], dtype=torch.float64)), "NaN"),
        (lambda s: s.update(weights=s["weights"] * 1.01), "sum to 1"),
        (lambda s: s.update(weights=s["weights"][:2]), "weights"),
        (lambda s: s.update(means=s["means"][:, :2]), "covariances"),
        (lambda s: s.update(means=s["means"][0]), "means"),
        (lambda s: s.update(covariances=s["covariances"][:, :3]), "covariances"),
        (lambda s: s.update(covariances=-s["covariances"]), "covariances.*positive"),
        (lambda s: s.update(covariances=s["covariances"] * 0), "covariances.*positive"),
        (lambda s: s.update(covariances=s["covariances"].clone().fill_(math.inf)), "infinite"),
        (lambda s: s.update(center=s["center"][:3]), "center"),
        (lambda s: s.update(means="evil"), "means.*numeric"),
        (lambda s: s.pop("center"), "missing"),
    ],
)
def test_load_state_dict_rejects_bad_states_with_a_clear_error(change, match):
    model, _ = fitted()
    state = model.state_dict()
    change(state)
    with pytest.raises(ValueError, match=match):
        DiagonalGMM(3).load_state_dict(state)


def test_load_state_dict_accepts_rounding_in_the_weight_sum():
    model, x = fitted()
    state = model.state_dict()
    state["weights"] = state["weights"] * (1 + 5e-7)
    clone = DiagonalGMM(3).load_state_dict(state)
    torch.testing.assert_close(clone.score_samples(x), model.score_samples(x), rtol=1e-5, atol=1e-5)


def test_fit_on_rows_without_columns_is_a_clear_error():
    with pytest.raises(ValueError, match="0 features"):
        DiagonalGMM(2).fit(np.zeros((100, 0)))
    with pytest.raises(ValueError, match="0 features"):
        DiagonalGMM(2).fit([np.zeros((50, 0)), np.zeros((50, 0))])


def tiny_scale_features(seed: int = 0) -> torch.Tensor:
    """16 clustered columns with variance ~1e-38 (as in a random-init GoogLeNet) beside 4 ordinary ones."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 3, (2000, 1), generator=g).double()
    tiny = (label + 1e-3 * torch.randn(2000, 16, generator=g, dtype=torch.float64)) * 1e-19
    normal = torch.randn(2000, 4, generator=g, dtype=torch.float64) + 3 * label
    return torch.cat([tiny, normal], 1).float()


def explicit_log_density(model: DiagonalGMM, x: np.ndarray) -> np.ndarray:
    w, mu, var = (t.double().numpy() for t in (model.weights_, model.means_, model.covariances_))
    comp = np.log(w) - 0.5 * (((x[:, None, :] - mu) ** 2) / var + np.log(2 * np.pi * var)).sum(-1)
    top = comp.max(1, keepdims=True)
    return (top + np.log(np.exp(comp - top).sum(1, keepdims=True)))[:, 0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_columns_with_variance_near_1e_38_fit_as_the_same_columns_at_unit_scale(dtype):
    x = tiny_scale_features()
    # before: FloatingPointError "EM produced a non-finite log-likelihood" in float32
    tiny = DiagonalGMM(3, random_state=0, max_iter=20, dtype=dtype).fit(x)
    assert all(math.isfinite(v) for v in tiny.lower_bounds_)
    scores = tiny.score_samples(x).double().numpy()
    np.testing.assert_allclose(scores, explicit_log_density(tiny, x.double().numpy()), rtol=1e-6)
    label = torch.from_numpy(np.rint(x[:, 0].double().numpy() * 1e19)).long()
    assert len(set(zip(label.tolist(), tiny.predict(x).tolist(), strict=True))) == 3  # one component per cluster

    # EM itself is equivariant: from the same start (rescaled), the same fit up to the scale
    factor = 2.0**63  # a power of two: the rescaled data are exactly the same numbers up to the exponent
    unit = x.double().clone()
    unit[:, :16] *= factor
    unit = unit.to(x.dtype)
    col = torch.ones(20, dtype=torch.float64)
    col[:16] = factor
    start = dict(weights_init=tiny.weights_, max_iter=10, tol=0, dtype=dtype)
    a = DiagonalGMM(3, means_init=tiny.means_, variances_init=tiny.covariances_, **start).fit(x)
    b = DiagonalGMM(3, means_init=tiny.means_ * col, variances_init=tiny.covariances_ * col**2, **start).fit(unit)
    jacobian = 16 * math.log(factor)  # log p(x) = log p(x · factor) + 16 log factor
    assert a.lower_bound_ == pytest.approx(b.lower_bound_ + jacobian, abs=1e-6 * abs(b.lower_bound_))
    torch.testing.assert_close(a.means_ * col, b.means_, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.covariances_ * col**2, b.covariances_, rtol=1e-5, atol=0)


def test_features_at_1e30_scale_fit_too():
    x = tiny_scale_features().double() * 1e30  # x² of the ordinary columns (~1e60) would overflow float32
    model = DiagonalGMM(3, random_state=0, max_iter=10).fit(x.float())
    assert math.isfinite(model.lower_bound_)
    assert torch.isfinite(model.score_samples(x.float())).all()


def test_a_column_constant_up_to_ulp_jitter_is_not_scored_on_its_ulps():
    """A saturated unit (tanh at 1.0) varies by an ulp or two: a floor relative to that jitter's own variance made
    one ulp cost ~10⁵ nats, and the scores ranked the jitter instead of the informative columns."""
    X = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    X[:, 0] = 0.4295
    X[::3, 0] = torch.nextafter(torch.tensor(0.4295), torch.tensor(1.0))
    with_jitter = DiagonalGMM(2, random_state=0).fit(X).score_samples(X)
    informative = DiagonalGMM(2, random_state=0).fit(X[:, 1:]).score_samples(X[:, 1:])
    assert scipy.stats.spearmanr(with_jitter, informative).statistic > 0.95
    assert float(with_jitter.max() - with_jitter.min()) < 2 * float(informative.max() - informative.min())
