"""A Gaussian mixture with diagonal covariances, fitted by EM in PyTorch.

Modules:

* :mod:`~featurefail.gmm.kernels`: the linear form of the log-density, chunk statistics, M-step, variance floor;
* :mod:`~featurefail.gmm.distributed`: ``torch.distributed`` sums and broadcasts (no-ops without a group);
* :mod:`~featurefail.gmm.data`: the training rows as centred chunks (tensor, array, memory map or re-iterable);
* :mod:`~featurefail.gmm.initialisation`: k-means++ seeding and Lloyd k-means;
* :mod:`~featurefail.gmm.estimator`: :class:`DiagonalGMM`;
* :mod:`~featurefail.gmm.sklearn_interop`: conversion to and from ``sklearn.mixture.GaussianMixture``.
"""

from __future__ import annotations

from ..exceptions import NotFittedError
from .data import auto_chunk_size
from .estimator import DiagonalGMM
from .initialisation import kmeans_plusplus, lloyd
from .kernels import (
    LOG_2PI,
    augmented_features,
    component_log_prob,
    em_chunk_statistics,
    m_step,
    natural_parameters,
    rescored_log_prob,
    squared_features,
    variance_floor,
)

__all__ = [
    "LOG_2PI",
    "DiagonalGMM",
    "NotFittedError",
    "augmented_features",
    "auto_chunk_size",
    "component_log_prob",
    "em_chunk_statistics",
    "kmeans_plusplus",
    "lloyd",
    "m_step",
    "natural_parameters",
    "rescored_log_prob",
    "squared_features",
    "variance_floor",
]
