"""The training rows as EM sees them: centred ``[x, x², 1]`` chunks from a tensor, an array or a re-iterable."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .._tensor import as_2d_tensor, count_nonfinite_rows
from .distributed import all_gather_rows, all_reduce_, distributed_info, row_offset
from .kernels import augmented_features, column_scale
from .memmap import MemmapRows, file_backed

__all__ = ["FitData", "auto_chunk_size"]

_STATS_ROWS = 8192  # float64 statistics are taken over pieces this tall (~3 float64 copies of one)
_CPU_CHUNK_BYTES = 64 * 2**20
_MEMMAP_BLOCK_BYTES = 64 * 2**20
_CUDA_CHUNK_FRACTION = 0.25
_CUDA_CHUNK_MAX_BYTES = 4 * 2**30


class FitData:
    """Training rows as centred ``[x, x²]`` chunks on the compute device.

    From a tensor, an array, a file-backed ``np.memmap`` (read in blocks, never whole) or a re-iterable.

    One pass at construction counts rows, validates them and computes the (all-reduced) mean and variance.
    EM works in the coordinates ``(x − mean) / scale`` (``scale``: per-column powers of two, see
    :func:`~featurefail.gmm.kernels.column_scale`); ``variance`` is given in those coordinates.
    """

    def __init__(self, X: Any, device: torch.device | None, dtype: torch.dtype, chunk_size: int | None, k: int):
        if file_backed(X):  # np.load(path, mmap_mode="r"): streamed from the file, never loaded whole
            X = MemmapRows(X, chunk_size or max(256, _MEMMAP_BLOCK_BYTES // (X.shape[1] * X.dtype.itemsize or 1)))
        if isinstance(X, torch.Tensor | np.ndarray):
            if distributed_info()[0] and X.ndim == 2 and X.shape[0] == 0:  # an empty shard: the others hold rows
                X = torch.as_tensor(X)
                tensor = X if X.is_floating_point() else X.to(torch.float32)
            else:
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
        if d == 0:
            raise ValueError("X has 0 features (shape (n, 0)); a mixture needs at least one column")
        self.n_local = n
        self.n_features = d
        stats = torch.cat([torch.tensor([n, bad], dtype=torch.float64, device=self.device), total, total_sq])
        dims = torch.tensor([d], dtype=torch.float64, device=self.device)
        all_reduce_(dims)
        _, _, world = distributed_info()
        if int(dims.item()) != d * world:
            raise ValueError("all ranks must give rows with the same number of features")
        all_reduce_(stats)
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
        variance = (stats[2 + d :] / self.n_total - self.mean**2).clamp_min(0.0)
        # columns are presented divided by a power of two near their spread: exact in binary floating point, and
        # x², 1/σ² stay inside the dtype's range for features at any scale (variances of 1e-38 in float32)
        self.scale = column_scale(variance)
        self.log_scale_sum = float(torch.log(self.scale).sum().item())
        self.variance = variance / self.scale**2
        self._fixed_chunk = chunk_size
        self._k = k
        self._prepared: torch.Tensor | None = None
        self.set_dtype(dtype)

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Present the data in ``dtype`` from now on (re-centring an in-memory copy)."""
        self.dtype = dtype
        self._center = self.mean.to(dtype)
        self._inv_scale = None if bool((self.scale == 1.0).all()) else (1.0 / self.scale).to(dtype)
        self.chunk_size = self._fixed_chunk or auto_chunk_size(self._k, self.n_features, self.device, dtype)
        self._prepared = None
        if self._tensor is not None:
            self._prepared = augmented_features(self.present(self._tensor.to(self.device, dtype)))

    def present(self, x: torch.Tensor) -> torch.Tensor:
        """Raw rows ``(n, D)`` in ``dtype`` as EM sees them: centred and divided by :attr:`scale`."""
        x = x - self._center
        return x if self._inv_scale is None else x * self._inv_scale

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
                yield augmented_features(self.present(piece.to(self.device, self.dtype)))

    def subsample(self, m: int, generator: torch.Generator) -> torch.Tensor:
        """``m`` distinct rows drawn uniformly from the union of all ranks' rows, centred, ``(m, D)`` on the
        compute device, in the order of the union (every rank gets the same rows).

        Collective under ``torch.distributed``: the same global indices are drawn on every rank (same
        generator), each rank contributes its rows among them, and the rows are gathered in rank order, so one
        process holding the concatenated shards draws the same sample.
        """
        m = min(m, self.n_total)
        drawn = torch.randperm(self.n_total, generator=generator)[:m].sort().values
        offset = row_offset(self.n_local)
        local = drawn[(drawn >= offset) & (drawn < offset + self.n_local)] - offset
        return all_gather_rows(self._local_rows(local))

    def _local_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Local rows ``idx`` (sorted), centred, ``(len(idx), D)`` on the compute device."""
        m = idx.shape[0]
        d = self.n_features
        if m == 0:
            return torch.zeros(0, d, dtype=self.dtype, device=self.device)
        if self._prepared is not None:
            return self._prepared[idx.to(self.device), :d]
        if isinstance(self._source, MemmapRows):
            return self.present(self._source.take(idx).to(self.device, self.dtype))
        parts, offset, pos = [], 0, 0
        for raw in self._raw_chunks():
            hi = offset + raw.shape[0]
            stop = pos
            while stop < m and idx[stop] < hi:
                stop += 1
            if stop > pos:
                rows = raw[(idx[pos:stop] - offset).to(raw.device)]
                parts.append(self.present(rows.to(self.device, self.dtype)))
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
