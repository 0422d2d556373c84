"""Out-of-core DiagonalGMM fit from a memory-mapped float32 feature file (issue 19).

Writes an ``(N, D)`` float32 ``.npy`` file of ``gmm_bench.py``-like features (10 class clusters in a 32-d
subspace, noise, tanh) to a temporary folder, block by block, then in a child process (so that its peak
resident memory is the fit's alone):

* times one sequential read of the file (the same block reader the fit uses);
* fits ``DiagonalGMM(K)`` on ``np.load(path, mmap_mode="r")`` with ``max_iter`` EM iterations, ``tol=0``,
  timing each EM iteration from the estimator's per-iteration log records;
* reports peak RSS (``ru_maxrss``) of the child;

then fits the same mixture in memory on a uniform subsample of the rows and compares the mean log-likelihood
of both models on held-out rows drawn from the file. The file is deleted at the end (also on error).

Usage::

    nice -n 15 python benchmarks/gmm_ooc_bench.py --rows 4000000            # 8.2 GB at D=512
    python benchmarks/gmm_ooc_bench.py --rows 15000000                      # the issue's 30.7 GB
    python benchmarks/gmm_ooc_bench.py --rows 15000000 --dir /big/scratch   # where the file goes
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from featurefail import DiagonalGMM
from featurefail.gmm.memmap import MemmapRows

BLOCK_ROWS = 32768


def write_features(path: str, n: int, d: int, seed: int = 0) -> float:
    """Write ``(n, d)`` float32 features to ``path`` (.npy) in blocks with plain writes; returns seconds."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(32, d)) / math.sqrt(32)
    centers = rng.normal(size=(10, 32)) * 2.0
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (n, d)}
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, n - start)
            block_rng = np.random.default_rng([seed, start])
            z = centers[block_rng.integers(0, 10, rows)] + block_rng.normal(size=(rows, 32))
            x = np.tanh(z @ basis + 0.3 * block_rng.normal(size=(rows, d)) + 0.5).astype(np.float32)
            f.write(x.tobytes())
    return time.perf_counter() - t0


def child_fit(path: str, k: int, max_iter: int, out: str) -> None:
    """Runs in a fresh process: read time, streamed fit, per-iteration times, peak RSS; writes JSON + state."""
    x = np.load(path, mmap_mode="r")
    t0 = time.perf_counter()
    rows = sum(block.shape[0] for block in MemmapRows(x, BLOCK_ROWS))
    read_s = time.perf_counter() - t0
    assert rows == x.shape[0]

    stamps: list[float] = []

    class Stamp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("EM iteration"):
                stamps.append(record.created)

    logger = logging.getLogger("featurefail.gmm")
    logger.addHandler(Stamp())
    logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    model = DiagonalGMM(k, max_iter=max_iter, tol=0, random_state=0, verbose=True).fit(x)
    fit_s = time.perf_counter() - t0
    per_iter = [b - a for a, b in itertools.pairwise(stamps)]
    result = dict(
        rows=int(x.shape[0]),
        features=int(x.shape[1]),
        file_gb=os.path.getsize(path) / 1e9,
        read_s=read_s,
        fit_s=fit_s,
        iter_s=per_iter,
        n_iter=model.n_iter_,
        lower_bound=model.lower_bound_,
        float64_from_iter=model.float64_from_iter_,
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        threads=torch.get_num_threads(),
    )
    torch.save(model.state_dict(), out + ".pt")
    with open(out, "w") as f:
        json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4_000_000, help="N (15,000,000 gives the issue's 30.7 GB)")
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--components", type=int, default=100)
    parser.add_argument("--max-iter", type=int, default=3)
    parser.add_argument("--subsample", type=int, default=200_000, help="rows of the in-memory reference fit")
    parser.add_argument("--dir", default=None, help="folder for the temporary file (default: the system's)")
    parser.add_argument("--child", nargs=4, metavar=("PATH", "K", "MAX_ITER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_fit(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])
        return

    folder = tempfile.mkdtemp(prefix="featurefail-ooc-", dir=args.dir)
    try:
        path = os.path.join(folder, "features.npy")
        n, d, k = args.rows, args.features, args.components
        write_s = write_features(path, n, d)
        print(f"wrote {n} x {d} float32 ({os.path.getsize(path) / 1e9:.2f} GB) in {write_s:.1f} s", flush=True)
        out = os.path.join(folder, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", path, str(k), str(args.max_iter), out]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            r = json.load(f)
        streamed = DiagonalGMM(k).load_state_dict(torch.load(out + ".pt"))

        # in-memory reference on a uniform subsample, both judged on held-out rows of the file
        x = np.load(path, mmap_mode="r")
        rng = np.random.default_rng(1)
        picked = np.sort(rng.choice(n, size=min(n, args.subsample + 50_000), replace=False))
        rows = np.array(x[picked])
        del x
        held = rng.permutation(rows.shape[0])
        train, test = rows[held[50_000:]], rows[held[:50_000]]
        t0 = time.perf_counter()
        ref = DiagonalGMM(k, max_iter=args.max_iter, tol=0, random_state=0).fit(train)
        ref_s = time.perf_counter() - t0
        iters = r["iter_s"]
        print(
            json.dumps(
                dict(
                    r,
                    held_out_loglik_streamed=streamed.score(test),
                    held_out_loglik_in_memory=ref.score(test),
                    in_memory_rows=int(train.shape[0]),
                    in_memory_fit_s=ref_s,
                ),
                indent=1,
            )
        )
        mean_iter = float(np.mean(iters)) if iters else float("nan")
        print(
            f"\n| N x D (file) | K | EM iterations | s per EM iteration | read once | ratio | fit total | peak RSS |"
            f"\n|---|---|---|---|---|---|---|---|"
            f"\n| {n} x {d} ({r['file_gb']:.2f} GB) | {k} | {r['n_iter']} | {mean_iter:.1f} | {r['read_s']:.1f} s | "
            f"{mean_iter / r['read_s']:.2f}x | {r['fit_s']:.1f} s | {r['peak_rss_gib']:.2f} GiB |"
        )
        print(
            f"held-out mean log-likelihood: streamed {streamed.score(test):.3f}, in-memory on "
            f"{train.shape[0]} rows {ref.score(test):.3f} (same K, max_iter={args.max_iter}, seed 0)"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
