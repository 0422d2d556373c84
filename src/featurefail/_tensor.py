"""Small shared helpers: input conversion, full-precision matmuls, device choice, progress bars."""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

_precision_lock = threading.Lock()
_precision_depth = 0
_precision_saved: tuple[str, bool] | None = None


@contextlib.contextmanager
def full_precision_matmul() -> Iterator[None]:
    """Run float32 matrix products at full IEEE precision (no TF32), restoring the global setting after.

    TF32 keeps 10 mantissa bits, too few for the E-step's products.
    Re-entrant and safe across threads: the setting is changed by the first entrant and restored by the last.
    """
    global _precision_depth, _precision_saved
    with _precision_lock:
        if _precision_depth == 0:
            _precision_saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)
            torch.set_float32_matmul_precision("highest")
            torch.backends.cuda.matmul.allow_tf32 = False
        _precision_depth += 1
    try:
        yield
    finally:
        with _precision_lock:
            _precision_depth -= 1
            if _precision_depth == 0 and _precision_saved is not None:
                torch.set_float32_matmul_precision(_precision_saved[0])
                torch.backends.cuda.matmul.allow_tf32 = _precision_saved[1]
                _precision_saved = None


def as_2d_tensor(x: Any, name: str = "X") -> torch.Tensor:
    """Convert a tensor or array-like to a 2-D floating tensor without copying when possible.

    Raises:
        ValueError: when ``x`` is not 2-D or has no rows.
        TypeError: when ``x`` cannot be read as numbers.
    """
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - numpy gives varied errors
            raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(x).__name__}") from exc
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def count_nonfinite_rows(x: torch.Tensor) -> int:
    """Number of rows of a 2-D tensor holding at least one NaN or infinity."""
    return int((~torch.isfinite(x)).any(dim=1).sum().item())


def progress(iterable: Iterable, *, enabled: bool, desc: str, total: int | None = None, leave: bool = False):
    """Wrap ``iterable`` in a tqdm bar when enabled, tqdm is installed and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=leave)


def mask_nonfinite(scores: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """``(N,)`` scores with ``-inf`` wherever a score is NaN or a row of any ``(N, …)`` input holds NaN or ±inf.

    The one place where non-finite data become the lowest score, so that thresholding flags them.
    """
    bad = torch.isnan(scores)
    for t in inputs:
        if t is not None:
            bad = bad | ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1).to(bad.device)
    return torch.where(bad, torch.full_like(scores, -math.inf), scores)


def zero_nonfinite_rows(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(finite (N,) bool, feats with every row holding NaN or ±inf set to 0)``: score the safe rows, then
    :func:`mask_nonfinite` gives the unsafe ones ``-inf``."""
    finite = torch.isfinite(feats).all(dim=1)
    return finite, torch.where(finite[:, None], feats, torch.zeros((), dtype=feats.dtype, device=feats.device))
