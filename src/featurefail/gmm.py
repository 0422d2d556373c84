"""A Gaussian mixture with diagonal covariances, fitted by EM in PyTorch.

The E-step is written as one matrix product per chunk of rows. For a component ``k`` with weight
``π_k``, mean ``μ_k`` and variances ``σ²_k``::

    log π_k N(x | μ_k, σ²_k) = [x, x²] · [μ_k/σ²_k, -1/(2σ²_k)]ᵀ + b_k
    b_k = log π_k - ½ Σ_d μ²_kd/σ²_kd - ½ Σ_d log σ²_kd - D/2 · log 2π

so memory is O(chunk · K), never O(N · K · D). The sufficient statistics of the M-step,
``N_k = Σ r_nk`` and ``Σ r_nk [x_n, x_n²]``, come from the same chunk with one more product.

Numerical care, each measured (see the project's DESIGN notes):

* TF32 is switched off inside every product (it moved the log-likelihood by ~10^3 nats).
* The data are centred once on the training mean, and the statistics and log-likelihood are accumulated
  and the M-step computed in float64, so float32 products do not drift on uncentred features.
* ``var = E[x²] − μ²`` can round below zero: variances are floored at ``reg_covar`` times each dimension's
  variance in the training data (a relative floor, so it works at any feature scale).
* A component whose effective count ``N_k`` falls below two samples (no variance left to estimate) is
  re-seeded by splitting the heaviest component; the events are counted in ``n_reseeded_``.
* Exact EM never lowers the lower bound; when float32 rounding makes it fall (dimensions collapsed onto
  the floor), the remaining iterations run in float64.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from ._tensor import as_2d_tensor, count_nonfinite_rows, full_precision_matmul, progress
from .exceptions import NotFittedError

__all__ = ["DiagonalGMM", "NotFittedError"]

logger = logging.getLogger(__name__)

LOG_2PI = math.log(2.0 * math.pi)
_MIN_COMPONENT_SIZE = 2.0  # fewer effective samples than this leave no variance to estimate: re-seed
_INIT_SAMPLES_PER_COMPONENT = 16  # k-means++ seeding and Lloyd steps run on at most this many rows per component
_INIT_MIN_SAMPLES = 4096
_LLOYD_STEPS = 5
_STATS_ROWS = 65536
_EXACT_TOP = 4  # components per row whose log-density is recomputed exactly at scoring time
_CPU_CHUNK_BYTES = 64 * 2**20
_CUDA_CHUNK_FRACTION = 0.25
_CUDA_CHUNK_MAX_BYTES = 4 * 2**30
_INITS = ("kmeans++", "random_from_data")


# --------------------------------------------------------------------------------------------------------------
# math helpers


def squared_features(x: torch.Tensor) -> torch.Tensor:
    """``[x, x²]`` along the feature axis: ``(n, D) -> (n, 2D)``."""
    return torch.cat([x, x * x], dim=1)


def augmented_features(x: torch.Tensor) -> torch.Tensor:
    """``[x, x², 1]`` along the feature axis: ``(n, D) -> (n, 2D + 1)``.

    With it one product gives the E-step (``coef`` and ``bias`` stacked) and one the M-step statistics
    (the last column sums the responsibilities into ``N_k``).
    """
    return torch.cat([x, x * x, torch.ones_like(x[:, :1])], dim=1)


def em_chunk_statistics(xa: torch.Tensor, coef_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step and M-step statistics of one chunk.

    Args:
        xa: ``(n, 2D + 1)`` augmented centred rows (:func:`augmented_features`).
        coef_bias: ``(K, 2D + 1)``: :func:`natural_parameters`' ``coef`` with ``bias`` as last column.

    Returns:
        ``Σ_n r_nk [x_n, x_n², 1]`` of shape ``(K, 2D + 1)`` (the last column is ``N_k``) and the chunk's
        summed log-likelihood (float64 scalar tensor).

    The responsibilities ``r_nk = e_nk / s_n`` with ``e_nk = exp(l_nk − max_k l_nk)`` are never normalised in
    place: ``1/s_n`` scales the ``(n, 2D+1)`` rows instead of the ``(n, K)`` matrix, saving a pass over it.
    """
    log_p = xa @ coef_bias.T
    row_max = log_p.amax(dim=1, keepdim=True)
    e = log_p.sub_(row_max).exp_()
    row_sum = e.sum(dim=1, keepdim=True)
    stats = e.T @ (xa / row_sum)
    loglik = (row_max.double() + row_sum.double().log()).sum()
    return stats, loglik


def natural_parameters(
    weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear form of the diagonal-Gaussian log-density.

    Args:
        weights: ``(K,)`` mixture weights.
        means: ``(K, D)`` component means (in the coordinates the data will be given in).
        variances: ``(K, D)`` component variances, all positive.
        dtype: dtype of the returned tensors.

    Returns:
        ``coef`` of shape ``(K, 2D)`` and ``bias`` of shape ``(K,)`` such that
        ``squared_features(x) @ coef.T + bias`` is ``log π_k N(x | μ_k, σ²_k)``, shape ``(n, K)``.
    """
    precisions = 1.0 / variances
    coef = torch.cat([means * precisions, -0.5 * precisions], dim=1)
    d = means.shape[1]
    bias = (
        torch.log(weights)
        - 0.5 * (means * means * precisions).sum(1)
        - 0.5 * torch.log(variances).sum(1)
        - 0.5 * d * LOG_2PI
    )
    return coef.to(dtype), bias.to(dtype)


def component_log_prob(xx: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``log π_k N(x_n | μ_k, σ²_k)``: ``xx (n, 2D)``, ``coef (K, 2D)``, ``bias (K,)`` -> ``(n, K)``."""
    return torch.addmm(bias, xx, coef.T)


def rescored_log_prob(
    x: torch.Tensor,
    coef: torch.Tensor,
    bias: torch.Tensor,
    center: torch.Tensor,
    means64: torch.Tensor,
    precisions64: torch.Tensor,
    exact_bias64: torch.Tensor,
    top: int,
) -> torch.Tensor:
    """``log π_k N(x | k)`` of every row and component, ``(n, D) -> (n, K)`` in float64.

    The product form runs in ``coef.dtype``; in float32 its rounding grows with ``x²/σ²``, so the ``top`` largest
    entries of each row, which carry the log-likelihood, are recomputed directly as
    ``b_k − ½ Σ_d (x_d − μ_kd)² / σ²_kd`` in float64 (``means64`` centred on ``center``, ``exact_bias64`` =
    ``log π_k − ½ Σ log σ²_k − D/2 log 2π``). Differentiable in ``x``; used by ``DiagonalGMM`` and by the
    exportable ``GMMScoreModule``.
    """
    centre64 = center.double()
    lp = component_log_prob(squared_features(x.to(coef.dtype) - center.to(coef.dtype)), coef, bias).double()
    if coef.dtype == torch.float64 or top == 0:
        return lp
    idx = lp.detach().topk(top, dim=1).indices
    diff = (x.double() - centre64)[:, None, :] - means64[idx]
    exact = exact_bias64[idx] - 0.5 * (diff * diff * precisions64[idx]).sum(-1)
    return lp.scatter(1, idx, exact)


def m_step(
    counts: torch.Tensor, sums: torch.Tensor, floor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximisation step from float64 sufficient statistics.

    Args:
        counts: ``(K,)`` effective counts ``N_k = Σ_n r_nk``.
        sums: ``(K, 2D)`` ``Σ_n r_nk [x_n, x_n²]``.
        floor: ``(D,)`` smallest variance allowed per dimension.

    Returns:
        weights ``(K,)``, means ``(K, D)`` and floored variances ``(K, D)``.
    """
    d = sums.shape[1] // 2
    safe = counts.clamp_min(torch.finfo(counts.dtype).tiny)[:, None]
    means = sums[:, :d] / safe
    variances = torch.maximum(sums[:, d:] / safe - means * means, floor)
    weights = counts / counts.sum()
    return weights, means, variances


def variance_floor(variance: torch.Tensor, reg_covar: float) -> torch.Tensor:
    """Per-dimension variance floor ``reg_covar · Var[x_d]``: ``(D,) -> (D,)``.

    A constant dimension has no scale of its own; it borrows the mean variance of the others (1.0 if all
    dimensions are constant), so the floor stays positive and the log-likelihood finite.
    """
    positive = variance > 0
    fallback = variance[positive].mean() if bool(positive.any()) else variance.new_tensor(1.0)
    return reg_covar * torch.where(positive, variance, fallback)


# --------------------------------------------------------------------------------------------------------------
# distributed helpers


def _distributed() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        return world > 1, torch.distributed.get_rank(), world
    return False, 0, 1


def _all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op outside ``torch.distributed``)."""
    active, _, _ = _distributed()
    if not active:
        return t
    if torch.distributed.get_backend() == "gloo" and t.is_cuda:
        host = t.cpu()
        torch.distributed.all_reduce(host)
        t.copy_(host)
    else:
        torch.distributed.all_reduce(t)
    return t


def _broadcast_(t: torch.Tensor) -> torch.Tensor:
    """Overwrite ``t`` with rank 0's value on every rank."""
    active, _, _ = _distributed()
    if not active:
        return t
    if torch.distributed.get_backend() == "gloo" and t.is_cuda:
        host = t.cpu()
        torch.distributed.broadcast(host, src=0)
        t.copy_(host)
    else:
        torch.distributed.broadcast(t, src=0)
    return t


# --------------------------------------------------------------------------------------------------------------
# the data as EM sees it


class _FitData:
    """Training rows as centred ``[x, x²]`` chunks on the compute device, from a tensor or a re-iterable.

    One pass at construction counts rows, validates them and computes the (all-reduced) mean and variance.
    """

    def __init__(self, X: Any, device: torch.device | None, dtype: torch.dtype, chunk_size: int | None, k: int):
        if isinstance(X, torch.Tensor | np.ndarray):
            tensor = as_2d_tensor(X)
            self.device = torch.device(device) if device is not None else tensor.device
            self._tensor: torch.Tensor | None = tensor
            self._source: Iterable | None = None
        else:
            if not isinstance(X, Iterable):
                raise TypeError(f"X must be a tensor, an array or an iterable of chunks, got {type(X).__name__}")
            if iter(X) is X:
                raise TypeError(
                    "X is a one-shot iterator; EM streams over the data once per iteration, so pass a "
                    "re-iterable (a list of chunks, a DataLoader, or an object whose __iter__ starts over)"
                )
            self._tensor = None
            self._source = X
            first = next(iter(X), None)
            if first is None:
                raise ValueError("X yielded no chunks")
            self.device = torch.device(device) if device is not None else as_2d_tensor(first).device

        n, total, total_sq, bad, d = 0, None, None, 0, None
        for chunk in self._raw_chunks(validate_shape=True):
            if d is None:
                d = chunk.shape[1]
                total = torch.zeros(d, dtype=torch.float64, device=self.device)
                total_sq = torch.zeros_like(total)
            for piece in torch.split(chunk, _STATS_ROWS):
                c64 = piece.to(self.device, torch.float64)
                bad += count_nonfinite_rows(c64)
                finite = c64.nan_to_num(0.0, 0.0, 0.0)
                total += finite.sum(0)
                total_sq += (finite * finite).sum(0)
                n += c64.shape[0]
        assert d is not None and total is not None and total_sq is not None
        self.n_local = n
        self.n_features = d
        stats = torch.cat([torch.tensor([n, bad], dtype=torch.float64, device=self.device), total, total_sq])
        dims = torch.tensor([d], dtype=torch.float64, device=self.device)
        _all_reduce_(dims)
        _, _, world = _distributed()
        if int(dims.item()) != d * world:
            raise ValueError("all ranks must give rows with the same number of features")
        _all_reduce_(stats)
        self.n_total = int(stats[0].item())
        n_bad = int(stats[1].item())
        if n_bad:
            raise ValueError(f"X has {n_bad} row(s) with NaN or infinite values; remove or impute them before fit")
        if self.n_total < k:
            raise ValueError(
                f"n_components={k} is larger than the number of samples ({self.n_total}); "
                "lower n_components or give more rows"
            )
        self.mean = stats[2 : 2 + d] / self.n_total
        self.variance = (stats[2 + d :] / self.n_total - self.mean**2).clamp_min(0.0)
        self._fixed_chunk = chunk_size
        self._k = k
        self._prepared: torch.Tensor | None = None
        self.set_dtype(dtype)

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Present the data in ``dtype`` from now on (re-centring an in-memory copy)."""
        self.dtype = dtype
        self._center = self.mean.to(dtype)
        self.chunk_size = self._fixed_chunk or auto_chunk_size(self._k, self.n_features, self.device, dtype)
        self._prepared = None
        if self._tensor is not None:
            self._prepared = augmented_features(self._tensor.to(self.device, dtype) - self._center)

    def _raw_chunks(self, validate_shape: bool = False) -> Iterator[torch.Tensor]:
        if self._tensor is not None:
            yield self._tensor
            return
        d = None
        assert self._source is not None
        for item in self._source:
            if isinstance(item, list | tuple) and len(item) >= 1 and not isinstance(item[0], int | float):
                item = item[0]
            chunk = as_2d_tensor(item, name="a chunk of X")
            if validate_shape:
                if d is not None and chunk.shape[1] != d:
                    raise ValueError(f"chunks of X disagree on the number of features: {d} then {chunk.shape[1]}")
                d = chunk.shape[1]
            yield chunk

    def chunks(self) -> Iterator[torch.Tensor]:
        """Centred ``[x, x², 1]`` chunks ``(n_chunk, 2D + 1)`` on the compute device."""
        if self._prepared is not None:
            yield from torch.split(self._prepared, self.chunk_size)
            return
        for raw in self._raw_chunks():
            for piece in torch.split(raw, self.chunk_size):
                yield augmented_features(piece.to(self.device, self.dtype) - self._center)

    def subsample(self, m: int, generator: torch.Generator) -> torch.Tensor:
        """``m`` distinct local rows drawn uniformly, centred, ``(m, D)`` on the compute device."""
        m = min(m, self.n_local)
        idx = torch.randperm(self.n_local, generator=generator)[:m].sort().values
        d = self.n_features
        if self._prepared is not None:
            return self._prepared[idx.to(self.device), :d]
        parts, offset, pos = [], 0, 0
        for raw in self._raw_chunks():
            hi = offset + raw.shape[0]
            stop = pos
            while stop < m and idx[stop] < hi:
                stop += 1
            if stop > pos:
                rows = raw[(idx[pos:stop] - offset).to(raw.device)]
                parts.append(rows.to(self.device, self.dtype) - self._center)
            pos, offset = stop, hi
        return torch.cat(parts)


def auto_chunk_size(k: int, d: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows per chunk so that the ``(chunk, K)`` work arrays and ``(chunk, 2D)`` inputs fit a memory budget."""
    itemsize = torch.finfo(dtype).bits // 8
    per_row = itemsize * (3 * k + 4 * d)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(_CUDA_CHUNK_FRACTION * free, _CUDA_CHUNK_MAX_BYTES)
    else:
        budget = _CPU_CHUNK_BYTES
    return max(256, int(budget // per_row))


# --------------------------------------------------------------------------------------------------------------
# initialisation


def _nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean): ``x (n, D)``, ``centers (K, D)`` -> ``(n,)``."""
    c_sq = (centers * centers).sum(1)
    out = []
    for piece in torch.split(x, chunk):
        out.append(torch.addmm(c_sq, piece, centers.T, alpha=-2.0).argmin(1))
    return torch.cat(out)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``x (m, D)`` -> ``k`` centres ``(k, D)``.

    Each new centre is drawn with probability proportional to the squared distance to the nearest centre
    chosen so far; when every remaining distance is zero (duplicate rows) the draw is uniform.
    """
    m = x.shape[0]
    x_sq = (x * x).sum(1)
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(m, (1,), generator=generator).item())
    centers[0] = x[first]
    d2 = (x_sq - 2.0 * (x @ centers[0]) + x_sq[first]).clamp_min(0.0)
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64)
    for i in range(1, k):
        cumulative = torch.cumsum(d2.double(), 0)
        total = float(cumulative[-1].item())
        if total > 0.0 and math.isfinite(total):
            target = cumulative.new_tensor([uniforms[i].item() * total])
            idx = int(torch.searchsorted(cumulative, target).clamp_max(m - 1).item())
        else:
            idx = int(uniforms[i].item() * m) % m
        centers[i] = x[idx]
        new_d2 = (x_sq - 2.0 * (x @ centers[i]) + x_sq[idx]).clamp_min(0.0)
        d2 = torch.minimum(d2, new_d2)
    return centers


def lloyd(x: torch.Tensor, centers: torch.Tensor, steps: int, chunk: int) -> torch.Tensor:
    """``steps`` Lloyd iterations of k-means on ``x (m, D)`` from ``centers (K, D)``; empty clusters stay put."""
    k = centers.shape[0]
    for _ in range(steps):
        labels = _nearest(x, centers, chunk)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        filled = counts > 0
        centers = torch.where(filled[:, None], sums / counts.clamp_min(1.0)[:, None], centers)
    return centers


# --------------------------------------------------------------------------------------------------------------
# the estimator


class DiagonalGMM:
    """Gaussian mixture with diagonal covariances, fitted by EM on torch tensors (CPU or GPU).

    A scikit-learn-style estimator: hyper-parameters are stored as given, ``fit`` returns ``self`` and the
    fitted state ends with an underscore. The density is ``p(x) = Σ_k π_k N(x; μ_k, diag(σ²_k))``.

    Args:
        n_components: number of mixture components ``K``.
        max_iter: most EM iterations per initialisation.
        tol: stop when the mean log-likelihood per sample changes by less than ``tol`` nats between two
            iterations; ``tol=0`` runs exactly ``max_iter`` iterations.
        reg_covar: **relative** variance floor: every variance is kept ``>= reg_covar · Var[x_d]``, the
            variance of dimension ``d`` in the training data (constant dimensions use the mean variance of
            the others). Unlike scikit-learn's absolute ``reg_covar`` it is not added, and it works at any scale.
        init: ``"kmeans++"`` (k-means++ seeding and a few Lloyd steps on a subsample, then variances and
            weights from a hard assignment of all rows) or ``"random_from_data"`` (random rows as means).
        n_init: number of initialisations; the fit with the highest final lower bound is kept.
        random_state: seed for the initialisation and re-seeding; ``None`` draws one.
        device: where EM runs; ``None`` means the device of the data.
        chunk_size: rows per chunk; ``None`` picks it from free memory (GPU) or a 64 MiB budget (CPU).
        weights_init: ``(K,)`` starting weights (sum to 1).
        means_init: ``(K, D)`` starting means.
        variances_init: ``(K, D)`` starting variances. When all three are given EM starts exactly there;
            any that are missing come from a hard assignment of the rows to the starting means.
        dtype: dtype of the matrix products (``torch.float32`` default; ``torch.float64`` for a reference or
            on GPUs where float64 is fast). Statistics are accumulated in float64 either way.
        precision_fallback: in float32, when the lower bound falls by more than rounding (which exact EM
            never does; it happens when dimensions collapse onto the variance floor), run the remaining
            iterations in float64. ``float64_from_iter_`` records when. With False, such a fall is a warning.
        verbose: show a progress bar over EM iterations (needs ``tqdm``) and log each iteration.

    Attributes:
        weights_: ``(K,)`` float64 mixture weights.
        means_: ``(K, D)`` float64 means.
        covariances_: ``(K, D)`` float64 variances.
        center_: ``(D,)`` float64 training mean used to centre the data.
        converged_: whether the ``tol`` criterion was met.
        n_iter_: EM iterations run by the kept initialisation.
        lower_bound_: mean log-likelihood per sample computed in the last E-step (as scikit-learn).
        lower_bounds_: that value at every iteration.
        n_reseeded_: components re-seeded because their effective count fell below two samples.
        float64_from_iter_: first iteration run in float64 by ``precision_fallback`` (None if never).
        n_features_in_: ``D``.
    """

    def __init__(
        self,
        n_components: int,
        *,
        max_iter: int = 100,
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        init: str = "kmeans++",
        n_init: int = 1,
        random_state: int | None = None,
        device: str | torch.device | None = None,
        chunk_size: int | None = None,
        weights_init: Any = None,
        means_init: Any = None,
        variances_init: Any = None,
        dtype: torch.dtype = torch.float32,
        precision_fallback: bool = True,
        verbose: bool = False,
    ) -> None:
        self.n_components = n_components
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.init = init
        self.n_init = n_init
        self.random_state = random_state
        self.device = device
        self.chunk_size = chunk_size
        self.weights_init = weights_init
        self.means_init = means_init
        self.variances_init = variances_init
        self.dtype = dtype
        self.precision_fallback = precision_fallback
        self.verbose = verbose
        self._validate_params()
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- parameters -------------------------------------------------------------------------------------------

    def _validate_params(self) -> None:
        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("n_components", self.n_components)
        positive_int("max_iter", self.max_iter)
        positive_int("n_init", self.n_init)
        if self.chunk_size is not None:
            positive_int("chunk_size", self.chunk_size)
        if not isinstance(self.tol, int | float) or not math.isfinite(self.tol) or self.tol < 0:
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        if not isinstance(self.reg_covar, int | float) or not math.isfinite(self.reg_covar) or self.reg_covar <= 0:
            raise ValueError(f"reg_covar must be a finite number > 0, got {self.reg_covar!r}")
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}")
        if self.random_state is not None and (
            isinstance(self.random_state, bool) or not isinstance(self.random_state, int | np.integer)
        ):
            raise ValueError(f"random_state must be an int or None, got {self.random_state!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device {self.device!r} is not a torch device") from exc
        k = self.n_components
        for name, ndim in (("weights_init", 1), ("means_init", 2), ("variances_init", 2)):
            value = getattr(self, name)
            if value is None:
                continue
            t = _host_tensor(value)
            if t.ndim != ndim or t.shape[0] != k:
                want = f"({k},)" if ndim == 1 else f"({k}, n_features)"
                raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds NaN or infinite values")
        if self.weights_init is not None:
            w = _host_tensor(self.weights_init)
            if bool((w <= 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
                raise ValueError("weights_init must be positive and sum to 1")
        if self.variances_init is not None:
            v = _host_tensor(self.variances_init)
            if bool((v <= 0).any()):
                raise ValueError("variances_init must be positive")

    def get_params(self) -> dict[str, Any]:
        """The constructor's arguments, as given."""
        names = (
            "n_components max_iter tol reg_covar init n_init random_state device chunk_size "
            "weights_init means_init variances_init dtype precision_fallback verbose"
        ).split()
        return {name: getattr(self, name) for name in names}

    # ---- fitting ----------------------------------------------------------------------------------------------

    def fit(self, X: Any) -> DiagonalGMM:
        """Fit the mixture by EM.

        Args:
            X: ``(N, D)`` tensor or NumPy array, or a re-iterable of such chunks (streamed once per EM
                iteration, for data larger than memory). Under ``torch.distributed`` each rank passes its own
                rows and all ranks end with one model fitted on their union.

        Returns:
            self.
        """
        with full_precision_matmul():
            data = _FitData(X, self.device, self.dtype, self.chunk_size, self.n_components)
            return self._fit(data)

    def _fit(self, data: _FitData) -> DiagonalGMM:
        d = data.n_features
        dev = data.device
        start = self._explicit_start(d, dev, data.mean)
        floor = variance_floor(data.variance, self.reg_covar)
        seed = self.random_state
        if seed is None:
            seed = int(_broadcast_(torch.randint(0, 2**62, (1,), dtype=torch.int64).to(dev)).item())
        generator = torch.Generator().manual_seed(int(seed))
        n_runs = 1 if all(p is not None for p in start) else self.n_init

        best: dict[str, Any] | None = None
        for run in range(n_runs):
            if data.dtype != self.dtype:
                data.set_dtype(self.dtype)
            params = self._initialise(data, start, floor, generator)
            result = self._run_em(data, params, floor, generator, run)
            if best is None or result["lower_bound"] > best["lower_bound"]:
                best = result
        assert best is not None
        if not best["converged"] and self.tol > 0:
            warnings.warn(
                f"EM did not converge in {self.max_iter} iterations (last change of the mean log-likelihood "
                f"{best['last_change']:.3g} > tol={self.tol}); raise max_iter or tol",
                ConvergenceWarning,
                stacklevel=3,
            )
        weights, means, variances = best["params"]
        self.center_ = data.mean.clone()
        self.weights_ = weights
        self.means_ = means + self.center_
        self.covariances_ = variances
        self.converged_ = bool(best["converged"])
        self.n_iter_ = int(best["n_iter"])
        self.lower_bound_ = float(best["lower_bound"])
        self.lower_bounds_ = list(best["lower_bounds"])
        self.n_reseeded_ = int(best["n_reseeded"])
        self.float64_from_iter_ = best["float64_from"]
        self.n_features_in_ = d
        self.device_ = dev
        self._cache = None
        return self

    def _explicit_start(self, d: int, dev: torch.device, mean: torch.Tensor) -> tuple[Any, Any, Any]:
        def load(value: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
            if value is None:
                return None
            t = _host_tensor(value)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for data with {d} features, got {tuple(t.shape)}")
            return t.to(dev, torch.float64)

        k = self.n_components
        weights = load(self.weights_init, "weights_init", (k,))
        means = load(self.means_init, "means_init", (k, d))
        variances = load(self.variances_init, "variances_init", (k, d))
        if weights is not None:
            weights = weights / weights.sum()
        return weights, (means - mean if means is not None else None), variances

    def _initialise(
        self, data: _FitData, start: tuple[Any, Any, Any], floor: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights, means, variances = start
        k, d = self.n_components, data.n_features
        if weights is not None and means is not None and variances is not None:
            return weights.clone(), means.clone(), variances.clone()
        dev = data.device
        refine = means is None
        if means is None:
            centers = torch.empty(k, d, dtype=data.dtype, device=dev)
            if _distributed()[1] == 0:
                m = max(_INIT_SAMPLES_PER_COMPONENT * k, _INIT_MIN_SAMPLES)
                sample = data.subsample(m, generator)
                if sample.shape[0] < k:
                    raise ValueError(
                        f"rank 0 holds {sample.shape[0]} rows, fewer than n_components={k}; "
                        "give rank 0 at least n_components rows"
                    )
                if self.init == "kmeans++":
                    centers = kmeans_plusplus(sample, k, generator)
                    centers = lloyd(sample, centers, _LLOYD_STEPS, data.chunk_size)
                else:
                    pick = torch.randperm(sample.shape[0], generator=generator)[:k].to(dev)
                    centers = sample[pick].clone()
            means = _broadcast_(centers).to(torch.float64)

        # one pass of hard assignment gives the missing weights and variances (and refines k-means centres)
        counts = torch.zeros(k, dtype=torch.float64, device=dev)
        sums = torch.zeros(k, 2 * d, dtype=torch.float64, device=dev)
        centers = means.to(data.dtype)
        for xx in data.chunks():
            labels = _nearest(xx[:, :d], centers, data.chunk_size)
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
            sums.index_add_(0, labels, xx[:, : 2 * d].double())
        _all_reduce_(counts)
        _all_reduce_(sums)
        filled = counts > 0
        safe = counts.clamp_min(1.0)[:, None]
        if refine:
            means = torch.where(filled[:, None], sums[:, :d] / safe, means)
        if variances is None:
            spread = sums[:, d:] / safe - 2.0 * means * sums[:, :d] / safe + means * means
            enough = (counts >= 2)[:, None]
            variances = torch.maximum(torch.where(enough, spread, data.variance.expand(k, d)), floor)
        if weights is None:
            weights = counts.clamp_min(1.0)
            weights = weights / weights.sum()
        return weights, means, variances

    def _run_em(
        self,
        data: _FitData,
        params: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        floor: torch.Tensor,
        generator: torch.Generator,
        run: int,
    ) -> dict[str, Any]:
        k, d = self.n_components, data.n_features
        dev = data.device
        weights, means, variances = params
        lower_bounds: list[float] = []
        converged, n_reseeded, warned, reseeded_last = False, 0, False, False
        last_change = math.inf
        float64_from: int | None = None
        iterations = progress(
            range(1, self.max_iter + 1),
            enabled=self.verbose,
            desc=f"EM (init {run + 1}/{self.n_init})",
            total=self.max_iter,
        )
        n_iter = 0
        for n_iter in iterations:
            coef, bias = natural_parameters(weights, means, variances, data.dtype)
            coef_bias = torch.cat([coef, bias[:, None]], dim=1)
            stats = torch.zeros(k * (2 * d + 1) + 1, dtype=torch.float64, device=dev)
            sums_all, loglik = stats[:-1].view(k, 2 * d + 1), stats[-1:]
            for xa in data.chunks():
                chunk_stats, chunk_loglik = em_chunk_statistics(xa, coef_bias)
                sums_all += chunk_stats
                loglik += chunk_loglik
            _all_reduce_(stats)
            counts, sums = sums_all[:, -1], sums_all[:, :-1]
            lower_bound = float(loglik.item()) / data.n_total
            if not math.isfinite(lower_bound):
                raise FloatingPointError(
                    f"EM produced a non-finite log-likelihood at iteration {n_iter}; "
                    "try dtype=torch.float64 or a larger reg_covar"
                )
            if lower_bounds:
                last_change = lower_bound - lower_bounds[-1]
                slack = 10 * torch.finfo(data.dtype).eps * (abs(lower_bound) + d)
                if data.dtype == torch.float64:
                    # rounding grows with μ²/σ², up to 1/reg_covar in dimensions sitting on the floor
                    slack /= self.reg_covar
                if last_change < -slack and not reseeded_last and float64_from != n_iter:
                    # exact EM never lowers the bound: float32 rounding has reached the fit (typically
                    # dimensions collapsed onto the variance floor), so finish in float64
                    if data.dtype != torch.float64 and self.precision_fallback:
                        logger.info(
                            "EM: lower bound fell by %.3g at iteration %d; continuing in float64", -last_change, n_iter
                        )
                        data.set_dtype(torch.float64)
                        float64_from = n_iter + 1
                    elif not warned:
                        warnings.warn(
                            f"EM lower bound decreased by {-last_change:.3g} nats/sample at iteration {n_iter} "
                            "(more than rounding)",
                            RuntimeWarning,
                            stacklevel=4,
                        )
                        warned = True
            lower_bounds.append(lower_bound)
            if self.verbose:
                logger.info("EM iteration %d: mean log-likelihood %.6f", n_iter, lower_bound)
                if hasattr(iterations, "set_postfix"):
                    iterations.set_postfix(loglik=f"{lower_bound:.4f}")
            weights, means, variances = m_step(counts, sums, floor)
            weights, means, variances, n_split = _split_heaviest(counts, weights, means, variances, generator)
            reseeded_last = n_split > 0
            n_reseeded += n_split
            if len(lower_bounds) > 1 and abs(last_change) < self.tol:
                converged = True
                break
        if hasattr(iterations, "close"):
            iterations.close()
        return {
            "params": (weights, means, variances),
            "lower_bound": lower_bounds[-1],
            "lower_bounds": lower_bounds,
            "converged": converged,
            "n_iter": n_iter,
            "n_reseeded": n_reseeded,
            "last_change": last_change,
            "float64_from": float64_from,
        }

    # ---- inference --------------------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X) first")

    def _scoring_parameters(self) -> dict[str, torch.Tensor]:
        """Tensors of :func:`rescored_log_prob` for the fitted state (cached until the state changes)."""
        cache = self._cache
        if cache is None:
            centred_means = self.means_ - self.center_
            coef, bias = natural_parameters(self.weights_, centred_means, self.covariances_, self.dtype)
            cache = {
                "coef": coef,
                "bias": bias,
                "center": self.center_,
                "means64": centred_means,
                "precisions64": 1.0 / self.covariances_,
                "exact_bias64": torch.log(self.weights_)
                - 0.5 * torch.log(self.covariances_).sum(1)
                - 0.5 * self.n_features_in_ * LOG_2PI,
            }
            self._cache = cache
        return cache

    def _prepare(self, X: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        x = as_2d_tensor(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features, but this mixture was fitted on {self.n_features_in_}")
        x = x.to(self.device_)
        finite = torch.isfinite(x).all(dim=1)
        x = torch.where(finite[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x, finite

    def _component_log_prob_chunks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """:func:`rescored_log_prob` chunk by chunk: ``(n, K)`` float64 each."""
        p = self._scoring_parameters()
        chunk = self.chunk_size or auto_chunk_size(self.n_components, self.n_features_in_, self.device_, self.dtype)
        top = min(_EXACT_TOP, self.n_components)
        for piece in torch.split(x, chunk):
            yield rescored_log_prob(piece, top=top, **p)

    def score_samples(self, X: Any) -> torch.Tensor:
        """Log-likelihood of each row, ``log p(x_n)``: ``(N, D) -> (N,)`` on the estimator's device.

        Computed in float64 for the few components that dominate each row; returned in float64 for float64
        input and in ``dtype`` otherwise.

        Differentiable with respect to ``X`` when ``X.requires_grad``. Rows holding NaN or infinity get
        ``-inf`` (and zero gradient) rather than NaN.
        """
        differentiable = isinstance(X, torch.Tensor) and X.requires_grad and torch.is_grad_enabled()
        with full_precision_matmul(), contextlib.nullcontext() if differentiable else torch.no_grad():
            x, finite = self._prepare(X)
            out = torch.cat([torch.logsumexp(lp, dim=1) for lp in self._component_log_prob_chunks(x)])
            out = torch.where(finite, out, torch.full_like(out, -math.inf))
            return out.to(x.dtype if x.dtype == torch.float64 else self.dtype)

    def score(self, X: Any) -> float:
        """Mean log-likelihood per sample (``-inf`` if any row is non-finite)."""
        return float(self.score_samples(X).double().mean().item())

    def bpd(self, X: Any) -> torch.Tensor:
        """Bits per dimension ``-log p(x) / (D · ln 2)``: ``(N, D) -> (N,)``; lower is more typical."""
        return -self.score_samples(X) / (self.n_features_in_ * math.log(2.0))

    def predict_proba(self, X: Any) -> torch.Tensor:
        """Posterior responsibility of each component, ``(N, D) -> (N, K)``.

        Raises:
            ValueError: when a row holds NaN or infinity.
        """
        with full_precision_matmul(), torch.no_grad():
            x, finite = self._prepare(X)
            if not bool(finite.all()):
                raise ValueError(f"X has {int((~finite).sum())} row(s) with NaN or infinite values")
            return torch.cat([torch.softmax(lp, dim=1) for lp in self._component_log_prob_chunks(x)]).to(self.dtype)

    def predict(self, X: Any) -> torch.Tensor:
        """Most responsible component of each row, ``(N, D) -> (N,)`` int64."""
        return self.predict_proba(X).argmax(dim=1)

    def to(self, device: str | torch.device) -> DiagonalGMM:
        """Move the fitted state to ``device`` (in place) and return self."""
        self._check_fitted()
        dev = torch.device(device)
        for name in ("weights_", "means_", "covariances_", "center_"):
            setattr(self, name, getattr(self, name).to(dev))
        self.device_ = dev
        self._cache = None
        return self

    # ---- saving and interop -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Fitted state as tensors and plain numbers (no Python objects, safe for safetensors/JSON)."""
        self._check_fitted()
        return {
            "weights": self.weights_.detach().cpu(),
            "means": self.means_.detach().cpu(),
            "covariances": self.covariances_.detach().cpu(),
            "center": self.center_.detach().cpu(),
            "lower_bounds": torch.tensor(self.lower_bounds_, dtype=torch.float64),
            "n_components": int(self.n_components),
            "converged": bool(self.converged_),
            "n_iter": int(self.n_iter_),
            "lower_bound": float(self.lower_bound_),
            "n_reseeded": int(self.n_reseeded_),
        }

    def load_state_dict(self, state: dict[str, Any]) -> DiagonalGMM:
        """Restore a fitted state written by :meth:`state_dict`; returns self."""
        required = {"weights", "means", "covariances", "center"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        weights = torch.as_tensor(state["weights"], dtype=torch.float64)
        means = torch.as_tensor(state["means"], dtype=torch.float64)
        variances = torch.as_tensor(state["covariances"], dtype=torch.float64)
        center = torch.as_tensor(state["center"], dtype=torch.float64)
        k = self.n_components
        if weights.shape != (k,) or means.ndim != 2 or means.shape[0] != k or variances.shape != means.shape:
            raise ValueError(
                f"state shapes do not fit n_components={k}: weights {tuple(weights.shape)}, "
                f"means {tuple(means.shape)}, covariances {tuple(variances.shape)}"
            )
        if center.shape != (means.shape[1],):
            raise ValueError(f"center must have shape ({means.shape[1]},), got {tuple(center.shape)}")
        if not all(bool(torch.isfinite(t).all()) for t in (weights, means, variances, center)):
            raise ValueError("state holds NaN or infinite values")
        if bool((variances <= 0).any()) or bool((weights <= 0).any()):
            raise ValueError("state has non-positive weights or variances")
        dev = torch.device(self.device) if self.device is not None else torch.device("cpu")
        self.weights_, self.means_ = weights.to(dev), means.to(dev)
        self.covariances_, self.center_ = variances.to(dev), center.to(dev)
        lbs = state.get("lower_bounds")
        self.lower_bounds_ = [float(v) for v in torch.as_tensor(lbs).tolist()] if lbs is not None else []
        self.converged_ = bool(state.get("converged", True))
        self.n_iter_ = int(state.get("n_iter", 0))
        self.lower_bound_ = float(state.get("lower_bound", math.nan))
        self.n_reseeded_ = int(state.get("n_reseeded", 0))
        self.n_features_in_ = int(means.shape[1])
        self.device_ = dev
        self._cache = None
        return self

    def to_sklearn(self):
        """A fitted ``sklearn.mixture.GaussianMixture(covariance_type="diag")`` with this mixture's parameters."""
        from sklearn.mixture import GaussianMixture

        self._check_fitted()
        gm = GaussianMixture(
            n_components=self.n_components, covariance_type="diag", tol=self.tol, max_iter=self.max_iter
        )
        variances = self.covariances_.detach().cpu().numpy().astype(np.float64)
        gm.weights_ = self.weights_.detach().cpu().numpy().astype(np.float64)
        gm.means_ = self.means_.detach().cpu().numpy().astype(np.float64)
        gm.covariances_ = variances
        gm.precisions_ = 1.0 / variances
        gm.precisions_cholesky_ = 1.0 / np.sqrt(variances)
        gm.converged_ = self.converged_
        gm.n_iter_ = self.n_iter_
        gm.lower_bound_ = self.lower_bound_
        gm.n_features_in_ = self.n_features_in_
        return gm

    @classmethod
    def from_sklearn(cls, gm: Any, **kwargs: Any) -> DiagonalGMM:
        """Build a fitted :class:`DiagonalGMM` from a fitted diagonal ``sklearn.mixture.GaussianMixture``."""
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

    def __repr__(self) -> str:
        fitted = f", fitted on D={self.n_features_in_}" if hasattr(self, "weights_") else ""
        return f"DiagonalGMM(n_components={self.n_components}, init={self.init!r}{fitted})"


def _host_tensor(value: Any) -> torch.Tensor:
    """A float64 CPU tensor of an array, list or tensor on any device."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def _split_heaviest(
    counts: torch.Tensor,
    weights: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Re-seed each component with ``counts < _MIN_COMPONENT_SIZE`` by splitting the heaviest one in two.

    The pair gets half the weight and count each and means ``μ_h ± ½σ_h ⊙ s`` for a random sign vector
    ``s``. A component is left alone when no other holds enough samples to split (tiny data, K close to N).

    Returns:
        weights, means, variances and the number of components re-seeded.
    """
    dead = torch.nonzero(counts < _MIN_COMPONENT_SIZE).flatten().tolist()
    if not dead:
        return weights, means, variances, 0
    counts, weights, means, variances = counts.clone(), weights.clone(), means.clone(), variances.clone()
    counts[dead] = 0.0
    n_done = 0
    for k in dead:
        h = int(torch.argmax(counts).item())
        if counts[h] < 2 * _MIN_COMPONENT_SIZE:
            break
        signs = (torch.randint(0, 2, (means.shape[1],), generator=generator) * 2 - 1).to(means)
        offset = 0.5 * variances[h].sqrt() * signs
        means[k], variances[k] = means[h] + offset, variances[h]
        means[h] = means[h] - offset
        counts[k] = counts[h] = counts[h] / 2
        weights[k] = weights[h] = weights[h] / 2
        n_done += 1
    return weights / weights.sum(), means, variances, n_done
