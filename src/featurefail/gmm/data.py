"""The training rows as EM sees them: centred ``[x, x², 1]`` chunks from a tensor, an array or a re-iterable."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .._tensor import as_2d_tensor, count_nonfinite_rows
from .distributed import all_reduce_, distributed_info
from .kernels import augmented_features

__all__ = ["FitData", "auto_chunk_size"]

_STATS_ROWS = 65536
_CPU_CHUNK_BYTES = 64 * 2**20
_CUDA_CHUNK_FRACTION = 0.25
_CUDA_CHUNK_MAX_BYTES = 4 * 2**30


class FitData:
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
