"""The estimator :class:`DiagonalGMM`: validation, the EM loop, inference and saving.

Numerical care, each measured (see the project's DESIGN notes):

* TF32 is switched off inside every product (it moved the log-likelihood by ~10^3 nats).
* The data are centred once on the training mean, and the statistics and log-likelihood are accumulated
  and the M-step computed in float64, so float32 products do not drift on uncentred features.
* ``var = E[x²] − μ²`` can round below zero: variances are floored at ``reg_covar`` times each dimension's
  variance in the training data (a relative floor, so it works at any feature scale), plus the variance of
  rounding in the fitting dtype at the dimension's magnitude (a column constant up to ulp jitter is not scored
  on its ulps).
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
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning

from .._tensor import as_2d_tensor, full_precision_matmul
from ..exceptions import NotFittedError
from . import sklearn_interop
from .data import FitData, auto_chunk_size
from .distributed import broadcast_
from .em import run_em
from .initialisation import INITS, initial_parameters
from .kernels import (
    EXACT_TOP,
    LOG_2PI,
    host_tensor,
    natural_parameters,
    rescored_log_prob,
    variance_floor,
)
from .state import checked_state

__all__ = ["DiagonalGMM"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_PARAM_NAMES = (
    "n_components",
    "max_iter",
    "tol",
    "reg_covar",
    "init",
    "n_init",
    "random_state",
    "device",
    "chunk_size",
    "weights_init",
    "means_init",
    "variances_init",
    "dtype",
    "precision_fallback",
    "verbose",
)


def _float32_safe(variances: torch.Tensor) -> bool:
    """Whether ``x²`` and ``1/σ²`` of these variances stay well inside float32's range (1e-38 to 3e38)."""
    return bool(((variances > 1e-30) & (variances < 1e30)).all())


class DiagonalGMM(DensityMixin, BaseEstimator):
    """Gaussian mixture with diagonal covariances, fitted by EM on torch tensors (CPU or GPU).

    A scikit-learn estimator (``get_params``/``set_params``, ``clone``, usable as the last step of a
    ``Pipeline``): hyper-parameters are stored as given (``dtype`` as the ``torch.dtype``), ``fit`` returns
    ``self`` and the fitted state ends with an underscore. The density is ``p(x) = Σ_k π_k N(x; μ_k, diag(σ²_k))``.

    Args:
        n_components: number of mixture components ``K``.
        max_iter: most EM iterations per initialisation.
        tol: stop when the mean log-likelihood per sample changes by less than ``tol`` nats between two
            iterations; ``tol=0`` runs exactly ``max_iter`` iterations.
        reg_covar: **relative** variance floor: every variance is kept ``>= reg_covar · Var[x_d]``, the
            variance of dimension ``d`` in the training data (constant dimensions use the mean variance of
            the others), plus the variance of rounding at the dimension's magnitude, ``(ε · rms_d)²`` with ε
            the fitting dtype's epsilon (a column constant up to ulp jitter is not scored on its ulps; this
            term dominates only for columns whose spread is below ~10⁻⁴ of their magnitude in float32).
            Unlike scikit-learn's absolute ``reg_covar`` it is not added, and it works at any scale.
        init: ``"kmeans++"`` (Lloyd's k-means on all rows, or on ``max(256 K, 65536)`` of them: when that is
            cheap, three runs seeded by greedy k-means++, the partition with the highest diagonal
            classification log-likelihood kept; otherwise one run seeded by plain k-means++ on ``16 K`` rows,
            at most 10 Lloyd iterations; then variances and
            weights from a hard assignment of all rows), ``"kmeans++-fast"`` (the previous default: k-means++
            and five Lloyd steps on ``16 K`` rows) or ``"random_from_data"`` (random rows as means). See
            :mod:`featurefail.gmm.initialisation`.
        n_init: number of initialisations; the fit with the highest final lower bound is kept.
        random_state: seed for the initialisation and re-seeding; ``None`` draws one. (A float32 fit on a CPU
            with native bfloat16 seeds k-means++ from bfloat16 products, so the same seed can start elsewhere on
            a GPU or another CPU; see :func:`featurefail.gmm.initialisation.bfloat16_seeding`.)
        device: where EM runs; ``None`` means the device of the data.
        chunk_size: rows per chunk; ``None`` picks it from free memory (GPU) or a 64 MiB budget (CPU).
        weights_init: ``(K,)`` starting weights (sum to 1).
        means_init: ``(K, D)`` starting means.
        variances_init: ``(K, D)`` starting variances. When all three are given EM starts exactly there;
            any that are missing come from a hard assignment of the rows to the starting means.
        dtype: dtype of the matrix products, ``torch.float32`` (default) or ``torch.float64`` (for a reference
            or on GPUs where float64 is fast), or their names ``"float32"``/``"float64"``; stored as the
            ``torch.dtype`` (``get_params()`` gives the name). Statistics are accumulated in float64 either way;
            only the k-means++ seeding of a float32 fit may use bfloat16 products (``random_state``).
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
        dtype: torch.dtype | str = torch.float32,
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
        self._check_settings()
        self._cache: dict[str, torch.Tensor] | None = None

    # ---- parameters -------------------------------------------------------------------------------------------

    def _check_settings(self) -> None:
        if isinstance(self.dtype, str):
            if self.dtype not in _DTYPES:
                raise ValueError(f"dtype must be 'float32' or 'float64' (or the torch dtype), got {self.dtype!r}")
            self.dtype = _DTYPES[self.dtype]

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
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.random_state is not None and (
            isinstance(self.random_state, bool) or not isinstance(self.random_state, int | np.integer)
        ):
            raise ValueError(f"random_state must be an int or None, got {self.random_state!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64 (or its name), got {self.dtype!r}")
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
            t = host_tensor(value)
            if t.ndim != ndim or t.shape[0] != k:
                want = f"({k},)" if ndim == 1 else f"({k}, n_features)"
                raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds NaN or infinite values")
        if self.weights_init is not None:
            w = host_tensor(self.weights_init)
            if bool((w <= 0).any()) or abs(float(w.sum()) - 1.0) > 1e-6:
                raise ValueError("weights_init must be positive and sum to 1")
        if self.variances_init is not None:
            v = host_tensor(self.variances_init)
            if bool((v <= 0).any()):
                raise ValueError("variances_init must be positive")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments, JSON-serialisable where they are settings.

        ``dtype`` is given as its name (``"float32"``/``"float64"``) and ``device`` as a string (or None); the
        other values are returned as given (explicit starting parameters stay arrays or tensors). ``deep`` is
        accepted for scikit-learn compatibility (there are no sub-estimators).
        """
        params = {name: getattr(self, name) for name in _PARAM_NAMES}
        params["dtype"] = _DTYPE_NAMES[self.dtype]
        if isinstance(self.device, torch.device):
            params["device"] = str(self.device)
        return params

    def set_params(self, **params: Any) -> DiagonalGMM:
        """Change settings in place (validated as in the constructor) and return self.

        Raises:
            ValueError: naming an unknown setting, or a value the constructor would refuse (nothing is changed).
        """
        unknown = sorted(set(params) - set(_PARAM_NAMES))
        if unknown:
            raise ValueError(
                f"DiagonalGMM has no setting {', '.join(map(repr, unknown))}; valid settings: {', '.join(_PARAM_NAMES)}"
            )
        old = {name: getattr(self, name) for name in params}
        for name, value in params.items():
            setattr(self, name, value)
        try:
            self._check_settings()
        except ValueError:
            for name, value in old.items():
                setattr(self, name, value)
            raise
        self._cache = None
        return self

    # ---- fitting ----------------------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> DiagonalGMM:
        """Fit the mixture by EM.

        Args:
            X: ``(N, D)`` tensor or NumPy array, or a re-iterable of such chunks (streamed once per EM
                iteration, for data larger than memory). Under ``torch.distributed`` each rank passes its own
                rows and all ranks end with one model fitted on their union.
            y: ignored (there so the mixture can end a scikit-learn ``Pipeline``).

        Returns:
            self.
        """
        with full_precision_matmul():
            data = FitData(X, self.device, self.dtype, self.chunk_size, self.n_components)
            return self._fit(data)

    def _fit(self, data: FitData) -> DiagonalGMM:
        d = data.n_features
        dev = data.device
        start = self._explicit_start(d, dev, data.mean, data.scale)
        rms_square = data.mean**2 / data.scale**2 + data.variance
        floor = variance_floor(data.variance, self.reg_covar, rms_square, torch.finfo(self.dtype).eps)
        seed = self.random_state
        if seed is None:
            seed = int(broadcast_(torch.randint(0, 2**62, (1,), dtype=torch.int64).to(dev)).item())
        generator = torch.Generator().manual_seed(int(seed))
        n_runs = 1 if all(p is not None for p in start) else self.n_init

        best: dict[str, Any] | None = None
        for run in range(n_runs):
            if data.dtype != self.dtype:
                data.set_dtype(self.dtype)
            params = initial_parameters(data, self.n_components, self.init, start, floor, generator)
            result = run_em(self, data, params, floor, generator, run)
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
        # back from EM's coordinates (x − mean) / scale; the density gains the Jacobian −Σ_d log scale_d
        weights, means, variances = best["params"]
        self.center_ = data.mean.clone()
        self.weights_ = weights
        self.means_ = means * data.scale + self.center_
        self.covariances_ = variances * data.scale**2
        self.converged_ = bool(best["converged"])
        self.n_iter_ = int(best["n_iter"])
        self.lower_bound_ = float(best["lower_bound"]) - data.log_scale_sum
        self.lower_bounds_ = [v - data.log_scale_sum for v in best["lower_bounds"]]
        self.n_reseeded_ = int(best["n_reseeded"])
        self.float64_from_iter_ = best["float64_from"]
        self.n_features_in_ = d
        self.device_ = dev
        self._cache = None
        return self

    def _explicit_start(
        self, d: int, dev: torch.device, mean: torch.Tensor, scale: torch.Tensor
    ) -> tuple[Any, Any, Any]:
        """Explicitly given starting parameters in EM's coordinates ``(x − mean) / scale`` (None where not given)."""

        def load(value: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
            if value is None:
                return None
            t = host_tensor(value)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} for data with {d} features, got {tuple(t.shape)}")
            return t.to(dev, torch.float64)

        k = self.n_components
        weights = load(self.weights_init, "weights_init", (k,))
        means = load(self.means_init, "means_init", (k, d))
        variances = load(self.variances_init, "variances_init", (k, d))
        if weights is not None:
            weights = weights / weights.sum()
        if means is not None:
            means = (means - mean) / scale
        if variances is not None:
            variances = variances / scale**2
        return weights, means, variances

    # ---- inference --------------------------------------------------------------------------------------------

    def check_fitted(self) -> None:
        """Raise :class:`~featurefail.NotFittedError` unless ``fit`` or ``load_state_dict`` has run."""
        if not hasattr(self, "weights_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(X) first")

    def scoring_parameters(self) -> dict[str, torch.Tensor]:
        """Keyword tensors of :func:`~featurefail.gmm.rescored_log_prob` for the fitted state.

        ``coef (K, 2D)`` and ``bias (K,)`` in ``dtype``, and float64 ``center (D,)``, ``means64 (K, D)`` (centred),
        ``precisions64 (K, D)``, ``exact_bias64 (K,)``. Cached until the state or ``dtype`` changes; treat the
        tensors as read-only.
        """
        cache = self._cache
        if cache is None:
            centred_means = self.means_ - self.center_
            dtype = self.dtype
            if dtype == torch.float32 and not _float32_safe(self.covariances_):
                dtype = torch.float64  # x² or 1/σ² would leave float32's exponent range: score in float64
            coef, bias = natural_parameters(self.weights_, centred_means, self.covariances_, dtype)
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
        self.check_fitted()
        x = as_2d_tensor(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {x.shape[1]} features, but this mixture was fitted on {self.n_features_in_}")
        x = x.to(self.device_)
        finite = torch.isfinite(x).all(dim=1)
        x = torch.where(finite[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x, finite

    def _component_log_prob_chunks(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """:func:`rescored_log_prob` chunk by chunk: ``(n, K)`` float64 each."""
        p = self.scoring_parameters()
        k = self.means_.shape[0]  # the fitted K: set_params(n_components=...) only applies to the next fit
        chunk = self.chunk_size or auto_chunk_size(k, self.n_features_in_, self.device_, self.dtype)
        top = min(EXACT_TOP, k)
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

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood per sample (``-inf`` if any row is non-finite); ``y`` is ignored."""
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
        self.check_fitted()
        dev = torch.device(device)
        for name in ("weights_", "means_", "covariances_", "center_"):
            setattr(self, name, getattr(self, name).to(dev))
        self.device_ = dev
        self._cache = None
        return self

    # ---- saving and interop -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Fitted state as tensors and plain numbers (no Python objects, safe for safetensors/JSON)."""
        self.check_fitted()
        return {
            "weights": self.weights_.detach().cpu(),
            "means": self.means_.detach().cpu(),
            "covariances": self.covariances_.detach().cpu(),
            "center": self.center_.detach().cpu(),
            "lower_bounds": torch.tensor(self.lower_bounds_, dtype=torch.float64),
            "n_components": int(self.means_.shape[0]),
            "converged": bool(self.converged_),
            "n_iter": int(self.n_iter_),
            "lower_bound": float(self.lower_bound_),
            "n_reseeded": int(self.n_reseeded_),
        }

    def load_state_dict(self, state: dict[str, Any]) -> DiagonalGMM:
        """Restore a fitted state written by :meth:`state_dict`; returns self.

        Raises:
            ValueError: when an entry is missing, non-finite or of the wrong shape, a weight is not positive,
                the weights do not sum to one (within 1e-6) or a variance is not positive.
        """
        weights, means, variances, center = checked_state(state, self.n_components)
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

    def to_sklearn(self) -> Any:
        """A fitted ``sklearn.mixture.GaussianMixture(covariance_type="diag")`` with this mixture's parameters."""
        return sklearn_interop.to_sklearn(self)

    @classmethod
    def from_sklearn(cls, gm: Any, **kwargs: Any) -> DiagonalGMM:
        """Build a fitted :class:`DiagonalGMM` from a fitted diagonal ``sklearn.mixture.GaussianMixture``."""
        return sklearn_interop.from_sklearn(cls, gm, **kwargs)

    def __repr__(self) -> str:
        fitted = f", fitted on D={self.n_features_in_}" if hasattr(self, "weights_") else ""
        return f"DiagonalGMM(n_components={self.n_components}, init={self.init!r}{fitted})"
