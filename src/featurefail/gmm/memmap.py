"""Rows of a memory-mapped ``.npy`` file, read in blocks with ordinary file reads (out-of-core fitting).

``DiagonalGMM().fit(np.load(path, mmap_mode="r"))`` streams the file once per EM pass through
:class:`MemmapRows`: each block is read into a fresh buffer with ``readinto`` and never through the mapping,
so the process's resident memory stays at a few blocks whatever the file's size (pages touched through a
mapping would count as resident until unmapped). Random rows for the initialisation are read one by one with
positioned reads.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["MemmapRows", "file_backed"]


def _file_offset(array: np.memmap) -> int | None:
    """Byte offset of ``array``'s first element in its file (also for a view of a mapping), or None."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not isinstance(mm, mmap.mmap):
        return None
    start = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    return start + array.ctypes.data - base


def file_backed(X: object) -> bool:
    """Whether ``X`` is a 2-D C-contiguous ``np.memmap`` of numbers whose file can be read directly."""
    return (
        isinstance(X, np.memmap)
        and X.ndim == 2
        and X.flags.c_contiguous
        and np.issubdtype(X.dtype, np.number)
        and isinstance(getattr(X, "filename", None), str | os.PathLike)
        and os.path.isfile(X.filename)
        and _file_offset(X) is not None
    )


class MemmapRows:
    """A re-iterable of ``(rows, D)`` CPU tensors over a file-backed ``np.memmap`` (see :func:`file_backed`).

    Args:
        array: the ``(N, D)`` memory map (only its file name, offset, shape and dtype are used).
        block_rows: rows per block read.
    """

    def __init__(self, array: np.memmap, block_rows: int) -> None:
        offset = _file_offset(array)
        if offset is None or not file_backed(array):
            raise ValueError("need a 2-D C-contiguous np.memmap backed by a file")
        self.filename = os.fspath(array.filename)
        self.offset = offset
        self.shape = (int(array.shape[0]), int(array.shape[1]))
        self.dtype = array.dtype
        self.block_rows = max(1, int(block_rows))
        self.blocks_read = 0  # counts blocks handed out (what tests use to check the file was streamed)

    def __len__(self) -> int:
        return -(-self.shape[0] // self.block_rows)

    def __iter__(self) -> Iterator[torch.Tensor]:
        n, d = self.shape
        with open(self.filename, "rb", buffering=0) as f:
            f.seek(self.offset)
            for start in range(0, n, self.block_rows):
                rows = min(self.block_rows, n - start)
                buf = np.empty((rows, d), dtype=self.dtype)
                view = memoryview(buf).cast("B")
                got = 0
                while got < view.nbytes:
                    k = f.readinto(view[got:])
                    if not k:
                        raise OSError(f"{self.filename} ended before row {start + rows} of {n}")
                    got += k
                self.blocks_read += 1
                yield torch.from_numpy(buf)

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (sorted int64) as a ``(len(idx), D)`` CPU tensor, one positioned read per row.

        Reads go through the page cache, not a mapping, so the rows' pages never join the resident set
        (gathering 65,536 rows through a mapping of a 2 GB file held ~0.5 GiB of mapped pages).
        """
        rows = idx.cpu().numpy()
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        row_bytes = self.shape[1] * self.dtype.itemsize
        fd = os.open(self.filename, os.O_RDONLY)
        try:
            for i, r in enumerate(rows):
                view = memoryview(out[i]).cast("B")
                got = 0
                while got < row_bytes:
                    k = os.preadv(fd, [view[got:]], self.offset + int(r) * row_bytes + got)
                    if not k:
                        raise OSError(f"{self.filename} ended before row {int(r)}")
                    got += k
        finally:
            os.close(fd)
        return torch.from_numpy(out)
