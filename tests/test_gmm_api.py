"""DiagonalGMM as a scikit-learn estimator: settings, set_params, clone, Pipeline, serialisable parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from featurefail import DiagonalGMM


def scaled_blobs(n: int = 3000, d: int = 6, k: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    x = centers[rng.integers(0, k, n)] + rng.normal(size=(n, d))
    return x * np.logspace(-3, 3, d) + 100.0  # very different scales per column


def test_get_params_is_json_serialisable_and_dtype_accepts_names():
    model = DiagonalGMM(3, dtype="float64", device=torch.device("cpu"))
    assert model.dtype is torch.float64  # stored as the torch dtype, so code comparing dtypes keeps working
    params = model.get_params()
    assert params["dtype"] == "float64" and params["device"] == "cpu"
    assert json.loads(json.dumps(params)) == params
    assert DiagonalGMM(3).get_params()["dtype"] == "float32"
    rebuilt = DiagonalGMM(**params)
    assert rebuilt.get_params() == params
    with pytest.raises(ValueError, match="dtype"):
        DiagonalGMM(3, dtype="float16")


def test_set_params_validates_returns_self_and_names_unknown_settings():
    model = DiagonalGMM(3)
    assert model.set_params(n_components=5, dtype="float64", tol=0.5) is model
    assert (model.n_components, model.dtype, model.tol) == (5, torch.float64, 0.5)
    with pytest.raises(ValueError, match="'n_component'"):
        model.set_params(n_component=4)
    with pytest.raises(ValueError, match="tol"):
        model.set_params(tol=-1.0, max_iter=7)
    # a refused change leaves every setting as it was
    assert (model.tol, model.max_iter) == (0.5, 100)


def test_set_params_dtype_changes_the_scoring_precision_of_a_fitted_model():
    x = scaled_blobs()
    model = DiagonalGMM(4, random_state=0).fit(x)
    assert model.scoring_parameters()["coef"].dtype == torch.float32
    model.set_params(dtype="float64")
    assert model.scoring_parameters()["coef"].dtype == torch.float64


def test_clone_gives_an_unfitted_copy_with_the_same_settings():
    model = DiagonalGMM(4, random_state=1, dtype="float64", reg_covar=1e-4)
    copy = clone(model)
    assert copy is not model and copy.get_params() == model.get_params()
    assert not hasattr(copy, "weights_")


def test_in_a_pipeline_after_standard_scaler_equals_fitting_scaled_data():
    x = scaled_blobs()
    pipe = Pipeline([("scale", StandardScaler()), ("gmm", DiagonalGMM(4, random_state=0, dtype="float64"))])
    assert pipe.fit(x) is pipe
    z = StandardScaler().fit_transform(x)
    direct = DiagonalGMM(4, random_state=0, dtype="float64").fit(z, None)
    np.testing.assert_allclose(pipe.score_samples(x).numpy(), direct.score_samples(z).numpy(), rtol=1e-10)
    assert pipe.score(x) == pytest.approx(direct.score(z), rel=1e-12)
    # scikit-learn's own mixture on the standardised data agrees with our log-likelihood formula
    reference = direct.to_sklearn().score_samples(z)
    np.testing.assert_allclose(pipe.score_samples(x).numpy(), reference, rtol=1e-9)
    pipe.set_params(gmm__n_components=2)
    assert pipe.named_steps["gmm"].n_components == 2
    assert pipe.fit(x).named_steps["gmm"].weights_.shape == (2,)
