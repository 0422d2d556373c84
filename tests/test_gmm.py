"""DiagonalGMM: agreement with scikit-learn, precision, degenerate data, determinism, streaming, distribution."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from featurefail import DiagonalGMM, NotFittedError


def blobs(n: int = 20_000, d: int = 64, k: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    labels = rng.integers(0, k, n)
    scales = 0.5 + rng.random((k, d))
    x = centers[labels] + rng.normal(size=(n, d)) * scales[labels]
    return x, centers, rng


def same_start(x, centers, rng):
    k, d = centers.shape
    return dict(
        weights_init=np.full(k, 1.0 / k),
        means_init=centers + rng.normal(size=(k, d)),
        variances_init=np.ones((k, d)),
    )


def test_same_start_same_iterations_matches_sklearn():
    x, centers, rng = blobs()
    start = same_start(x, centers, rng)
    ours = DiagonalGMM(50, max_iter=20, tol=0, reg_covar=1e-6, **start).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = GaussianMixture(
            50,
            covariance_type="diag",
            max_iter=20,
            tol=0,
            weights_init=start["weights_init"],
            means_init=start["means_init"],
            precisions_init=1.0 / start["variances_init"],
        ).fit(x)
    assert ours.n_iter_ == 20 and ref.n_iter_ == 20
    assert abs(ours.score(x) - ref.score(x)) < 1e-3
    assert abs(ours.lower_bound_ - ref.lower_bound_) < 1e-3
    theirs = ours.to_sklearn().score_samples(x)
    mine = ours.score_samples(x).double().numpy()
    np.testing.assert_allclose(mine, theirs, rtol=1e-5)
    # float32 input goes through the float32 product and still meets the bound
    mine32 = ours.score_samples(x.astype(np.float32)).double().numpy()
    np.testing.assert_allclose(mine32, theirs, rtol=1e-5)


def test_from_sklearn_round_trip():
    x, _, _ = blobs(n=3000, d=8, k=5)
    gm = GaussianMixture(5, covariance_type="diag", random_state=0).fit(x)
    ours = DiagonalGMM.from_sklearn(gm)
    np.testing.assert_allclose(ours.score_samples(x).double().numpy(), gm.score_samples(x), rtol=1e-6)
    np.testing.assert_array_equal(ours.predict(x).numpy(), gm.predict(x))
    with pytest.raises(ValueError, match="diag"):
        DiagonalGMM.from_sklearn(GaussianMixture(2, covariance_type="full").fit(x[:200]))


def test_float32_path_matches_float64_on_uncentred_positive_features():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.softplus(torch.randn(20_000, 128, generator=g)) + 10
    base = DiagonalGMM(100, max_iter=1, tol=0, random_state=0).fit(x)
    start = dict(weights_init=base.weights_, means_init=base.means_, variances_init=base.covariances_)
    f32 = DiagonalGMM(100, max_iter=50, tol=0, **start).fit(x)
    f64 = DiagonalGMM(100, max_iter=50, tol=0, dtype=torch.float64, **start).fit(x)
    assert f32.n_iter_ == f64.n_iter_ == 50
    assert abs(f32.lower_bound_ - f64.lower_bound_) < 1e-3
    assert abs(f32.score(x) - f64.score(x)) < 1e-3


def test_log_likelihood_formula_and_bpd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 3)) * [1, 2, 3] + 5
    model = DiagonalGMM(2, random_state=0).fit(x)
    w, mu, var = (t.numpy() for t in (model.weights_, model.means_, model.covariances_))
    dens = sum(
        w[k] * np.prod(np.exp(-((x - mu[k]) ** 2) / (2 * var[k])) / np.sqrt(2 * np.pi * var[k]), axis=1)
        for k in range(2)
    )
    np.testing.assert_allclose(model.score_samples(x).numpy(), np.log(dens), rtol=1e-9)
    np.testing.assert_allclose(model.bpd(x).numpy(), -np.log(dens) / (3 * math.log(2)), rtol=1e-9)
    proba = model.predict_proba(x)
    torch.testing.assert_close(proba.sum(1), torch.ones(400, dtype=proba.dtype))


def test_score_samples_is_differentiable():
    x, _, _ = blobs(n=2000, d=6, k=4)
    model = DiagonalGMM(4, random_state=0).fit(x)
    point = torch.tensor(x[:3], requires_grad=True)
    model.score_samples(point).sum().backward()
    h = 1e-6
    for j in range(6):
        step = np.zeros_like(x[:3])
        step[:, j] = h
        up = model.score_samples(x[:3] + step).numpy()
        down = model.score_samples(x[:3] - step).numpy()
        np.testing.assert_allclose(point.grad[:, j].numpy(), (up - down) / (2 * h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    ["duplicates", "constant_dims", "k_above_distinct", "scaled_dim", "single_row"],
)
def test_degenerate_data_gives_finite_results(case):
    rng = np.random.default_rng(0)
    k = 5
    if case == "duplicates":
        x = np.repeat(rng.normal(size=(3, 4)), 200, axis=0)
    elif case == "constant_dims":
        x = rng.normal(size=(500, 6))
        x[:, 2] = 7.0
        x[:, 4] = 0.0
    elif case == "k_above_distinct":
        x = np.repeat(rng.normal(size=(4, 5)), 50, axis=0)
        k = 10
    elif case == "scaled_dim":
        x = rng.normal(size=(800, 5))
        x[:, 1] *= 1e6
    else:
        x = rng.normal(size=(1, 5))
        k = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = DiagonalGMM(k, random_state=0, max_iter=30).fit(x)
    for t in (model.weights_, model.means_, model.covariances_):
        assert torch.isfinite(t).all()
    assert (model.covariances_ > 0).all()
    assert torch.isfinite(model.score_samples(x)).all()
    assert all(math.isfinite(v) for v in model.lower_bounds_)


def test_too_few_rows_and_non_finite_rows_are_clear_errors():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="larger than the number of samples"):
        DiagonalGMM(11).fit(x)
    bad = x.copy()
    bad[2, 0] = np.nan
    bad[5, 1] = np.inf
    with pytest.raises(ValueError, match="2 row"):
        DiagonalGMM(2).fit(bad)
    with pytest.raises(ValueError, match="2-D"):
        DiagonalGMM(2).fit(x[0])


def test_score_time_non_finite_rows_get_minus_inf():
    x, _, _ = blobs(n=1000, d=4, k=3)
    model = DiagonalGMM(3, random_state=0).fit(x)
    probe = x[:4].copy()
    probe[1, 2] = np.nan
    scores = model.score_samples(probe)
    assert scores[1] == -math.inf and torch.isfinite(scores[[0, 2, 3]]).all()
    with pytest.raises(ValueError, match="NaN"):
        model.predict(probe)
    with pytest.raises(ValueError, match="fitted on 4"):
        model.score_samples(x[:, :3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_components=0), "n_components"),
        (dict(n_components=2, tol=-1), "tol"),
        (dict(n_components=2, reg_covar=0), "reg_covar"),
        (dict(n_components=2, init="bogus"), "init"),
        (dict(n_components=2, max_iter=0), "max_iter"),
        (dict(n_components=2, weights_init=[0.2, 0.2]), "sum to 1"),
        (dict(n_components=2, means_init=np.zeros((3, 4))), "shape"),
        (dict(n_components=2, variances_init=-np.ones((2, 4))), "positive"),
        (dict(n_components=2, dtype=torch.float16), "dtype"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiagonalGMM(**kwargs)


def test_not_fitted():
    with pytest.raises(NotFittedError, match="fit"):
        DiagonalGMM(2).score_samples(np.zeros((3, 2)))


def test_same_seed_identical_and_chunking_and_streaming_equal():
    x, _, _ = blobs(n=6000, d=16, k=8)
    a = DiagonalGMM(8, random_state=3, max_iter=15, tol=0).fit(x)
    b = DiagonalGMM(8, random_state=3, max_iter=15, tol=0).fit(x)
    for name in ("weights_", "means_", "covariances_"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    start = dict(weights_init=a.weights_, means_init=a.means_, variances_init=a.covariances_)
    # float32 products summed in another order differ by rounding only; float64 ones agree to 1e-10
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        kw = dict(max_iter=10, tol=0, dtype=dtype, **start)
        whole = DiagonalGMM(8, **kw).fit(x)
        chunked = DiagonalGMM(8, chunk_size=257, **kw).fit(x)
        streamed = DiagonalGMM(8, **kw).fit([x[:1000], x[1000:3500], x[3500:]])
        for other in (chunked, streamed):
            for name in ("weights_", "means_", "covariances_"):
                torch.testing.assert_close(getattr(other, name), getattr(whole, name), rtol=tol, atol=tol)
    # default initialisation from a stream matches the in-memory one (same rows drawn for k-means++)
    s1 = DiagonalGMM(8, random_state=1, max_iter=5, tol=0).fit(x)
    s2 = DiagonalGMM(8, random_state=1, max_iter=5, tol=0).fit([x[:2000], x[2000:]])
    torch.testing.assert_close(s1.means_, s2.means_, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="one-shot"):
        DiagonalGMM(2).fit(iter([x[:100]]))


def test_kmeans_init_beats_random_and_converges():
    x, _, _ = blobs(n=5000, d=8, k=6)
    km = DiagonalGMM(6, random_state=0).fit(x)
    assert km.converged_ and km.n_iter_ < 100
    assert km.lower_bounds_ == sorted(km.lower_bounds_)  # EM never decreases the bound here
    rnd = DiagonalGMM(6, random_state=0, init="random_from_data", n_init=3).fit(x)
    assert math.isfinite(rnd.lower_bound_)


def test_dead_component_is_reseeded_and_counted():
    x, centers, _ = blobs(n=3000, d=4, k=3)
    means = np.vstack([centers, np.full((1, 4), 1e4)])  # the fourth starts far from every row
    model = DiagonalGMM(
        4, max_iter=5, tol=0, weights_init=np.full(4, 0.25), means_init=means, variances_init=np.ones((4, 4))
    ).fit(x)
    assert model.n_reseeded_ >= 1
    assert torch.isfinite(model.means_).all() and (model.means_.abs() < 100).all()


def test_state_dict_round_trip_holds_no_objects():
    x, _, _ = blobs(n=2000, d=5, k=4)
    model = DiagonalGMM(4, random_state=0).fit(x)
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor | int | float | bool) for v in state.values())
    clone = DiagonalGMM(4).load_state_dict(state)
    assert torch.equal(clone.score_samples(x), model.score_samples(x))
    with pytest.raises(ValueError, match="n_components"):
        DiagonalGMM(3).load_state_dict(state)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str, start: dict, x: np.ndarray):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = np.array_split(x, world)[rank]
        for dtype in (torch.float64, torch.float32):
            model = DiagonalGMM(6, max_iter=10, tol=0, dtype=dtype, **start).fit(rows)
            np.savez(
                os.path.join(out_dir, f"rank{rank}_{str(dtype)[-7:]}.npz"),
                w=model.weights_.numpy(),
                m=model.means_.numpy(),
                v=model.covariances_.numpy(),
            )
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_fit_equals_single_process(tmp_path):
    x, centers, rng = blobs(n=4000, d=8, k=6)
    start = same_start(x, centers, rng)
    mp.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path), start, x),
        nprocs=2,
        join=True,
    )
    # float64 products: equal to 1e-6 absolute; float32: equal up to float32 rounding, which E[x²] − μ² amplifies
    for dtype, tol in ((torch.float64, dict(atol=1e-6, rtol=0)), (torch.float32, dict(atol=1e-6, rtol=1e-4))):
        single = DiagonalGMM(6, max_iter=10, tol=0, dtype=dtype, **start).fit(x)
        for rank in range(2):
            got = np.load(tmp_path / f"rank{rank}_{str(dtype)[-7:]}.npz")
            np.testing.assert_allclose(got["w"], single.weights_.numpy(), **tol)
            np.testing.assert_allclose(got["m"], single.means_.numpy(), **tol)
            np.testing.assert_allclose(got["v"], single.covariances_.numpy(), **tol)


def saturated_features(n: int = 5000, d: int = 64, seed: int = 0) -> np.ndarray:
    """tanh features that saturate, so components collapse onto the variance floor in many dimensions."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(32, d)) / math.sqrt(32)
    z = rng.normal(size=(10, 32))[rng.integers(0, 10, n)] * 2 + rng.normal(size=(n, 32))
    return np.tanh(z @ basis + 0.3 * rng.normal(size=(n, d)) + 0.5).astype(np.float32)


def test_float32_rounding_falls_back_to_float64_and_keeps_the_bound_monotone():
    x = saturated_features()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no decrease warning on the default path
        model = DiagonalGMM(20, random_state=0, max_iter=60, tol=0).fit(x)
    assert model.float64_from_iter_ is not None
    after = np.asarray(model.lower_bounds_[model.float64_from_iter_ - 1 :])
    assert (np.diff(after) > -1e-9).all()
    with pytest.warns(RuntimeWarning, match="decreased"):
        DiagonalGMM(20, random_state=0, max_iter=60, tol=0, precision_fallback=False).fit(x)
