"""Conversion between :class:`~featurefail.gmm.DiagonalGMM` and scikit-learn's ``GaussianMixture``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..exceptions import NotFittedError

if TYPE_CHECKING:
    from sklearn.mixture import GaussianMixture

    from .estimator import DiagonalGMM

__all__ = ["from_sklearn", "to_sklearn"]


def to_sklearn(model: DiagonalGMM) -> GaussianMixture:
    """A fitted ``sklearn.mixture.GaussianMixture(covariance_type="diag")`` with ``model``'s parameters."""
    from sklearn.mixture import GaussianMixture

    model.check_fitted()
    gm = GaussianMixture(
        n_components=int(model.means_.shape[0]), covariance_type="diag", tol=model.tol, max_iter=model.max_iter
    )
    variances = model.covariances_.detach().cpu().numpy().astype(np.float64)
    gm.weights_ = model.weights_.detach().cpu().numpy().astype(np.float64)
    gm.means_ = model.means_.detach().cpu().numpy().astype(np.float64)
    gm.covariances_ = variances
    gm.precisions_ = 1.0 / variances
    gm.precisions_cholesky_ = 1.0 / np.sqrt(variances)
    gm.converged_ = model.converged_
    gm.n_iter_ = model.n_iter_
    gm.lower_bound_ = model.lower_bound_
    gm.n_features_in_ = model.n_features_in_
    return gm


def from_sklearn(cls: type[DiagonalGMM], gm: Any, **kwargs: Any) -> DiagonalGMM:
    """A fitted ``cls`` (a :class:`DiagonalGMM`) from a fitted diagonal ``sklearn.mixture.GaussianMixture``.

    ``kwargs`` go to the constructor (``device``, ``dtype``, ...).
    """
    if getattr(gm, "covariance_type", None) != "diag":
        raise ValueError(f"need covariance_type='diag', got {getattr(gm, 'covariance_type', None)!r}")
    if not hasattr(gm, "weights_"):
        raise NotFittedError("the scikit-learn mixture is not fitted")
    model = cls(n_components=int(gm.n_components), **kwargs)
    weights = torch.as_tensor(np.asarray(gm.weights_), dtype=torch.float64)
    means = torch.as_tensor(np.asarray(gm.means_), dtype=torch.float64)
    state = {
        "weights": weights,
        "means": means,
        "covariances": torch.as_tensor(np.asarray(gm.covariances_), dtype=torch.float64),
        "center": weights @ means,
        "converged": bool(getattr(gm, "converged_", True)),
        "n_iter": int(getattr(gm, "n_iter_", 0)),
        "lower_bound": float(getattr(gm, "lower_bound_", math.nan)),
    }
    return model.load_state_dict(state)
