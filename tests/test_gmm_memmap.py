"""Fitting DiagonalGMM from a memory-mapped .npy file: streamed in blocks, never loaded whole (issue 19)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from featurefail import DiagonalGMM
from featurefail.gmm import memmap


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) + rng.integers(0, 4, n)[:, None] * 3.0).astype(np.float32)


def test_memmap_fit_equals_in_memory_fit_and_reads_the_file_in_blocks(tmp_path, monkeypatch):
    x = clustered(6000, 8)
    path = tmp_path / "x.npy"
    np.save(path, x)
    blocks: list[int] = []
    original = memmap.MemmapRows.__iter__

    def counting(self):
        for block in original(self):
            blocks.append(block.shape[0])
            yield block

    monkeypatch.setattr(memmap.MemmapRows, "__iter__", counting)
    mapped = np.load(path, mmap_mode="r")
    for rows in (slice(None), slice(1000, None)):  # a view of the mapping starts at its own offset
        blocks.clear()
        kw = dict(random_state=0, max_iter=4, tol=0, chunk_size=500)
        streamed = DiagonalGMM(4, **kw).fit(mapped[rows])
        whole = DiagonalGMM(4, **kw).fit(x[rows])
        assert streamed.lower_bound_ == pytest.approx(whole.lower_bound_, rel=1e-12)
        for name in ("weights_", "means_", "covariances_"):
            torch.testing.assert_close(getattr(streamed, name), getattr(whole, name), rtol=1e-10, atol=1e-12)
        n = x[rows].shape[0]
        assert max(blocks) <= 500  # read in blocks of chunk_size rows (one extra block tells the device)
        assert sum(blocks) % n <= 500 and sum(blocks) // n >= 6  # statistics, assignment, 4 EM passes


_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    import numpy as np
    from featurefail import DiagonalGMM

    def anon_kib():  # anonymous resident memory: what a load into RAM allocates (file pages are page cache)
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    peak, done = [anon_kib()], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kib())
            done.wait(0.002)

    path, mode = sys.argv[1], sys.argv[2]
    x = np.load(path, mmap_mode="r")
    k, d = 2, x.shape[1]
    start = dict(weights_init=np.full(k, 0.5), means_init=np.zeros((k, d)) + [[0.0], [1.0]],
                 variances_init=np.ones((k, d)))
    before = anon_kib()
    sampler = threading.Thread(target=sample)
    sampler.start()
    if mode == "array":
        x = np.array(x)  # the in-memory path: the whole file in RAM, inside the measured window
    DiagonalGMM(k, max_iter=2, tol=0, chunk_size=1024, **start).fit(x)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], anon_kib())
    print(json.dumps({"growth_mib": (peak[0] - before) / 1024}))
    """
)


def test_fitting_a_memmap_does_not_load_it_whole(tmp_path):
    n, d = 100_000, 1024  # a 391 MiB file: the streaming buffers (tens of MiB, independent of N) are far below it
    path = tmp_path / "big.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(0)
    for start in range(0, n, 5000):
        out[start : start + 5000] = rng.normal(size=(5000, d))
    out.flush()
    del out
    file_mib = path.stat().st_size / 2**20

    def peak_growth(mode: str) -> float:
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), mode], capture_output=True, text=True, check=True, timeout=300
        )
        return json.loads(res.stdout.strip().splitlines()[-1])["growth_mib"]

    streamed = peak_growth("memmap")
    assert streamed < 0.35 * file_mib, f"peak RSS grew by {streamed:.0f} MiB for a {file_mib:.0f} MiB file"
    # the measurement can see a whole-file load: the same fit on a plain array view of the mapping grows past it
    assert peak_growth("array") > file_mib
