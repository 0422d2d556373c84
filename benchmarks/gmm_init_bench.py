"""Initialisation quality (issue 19): whole fits with each library's default settings, side by side in one run.

For each dataset it fits, with the same ``max_iter`` and default ``tol``:

* featurefail's default ``init="kmeans++"`` (three greedy k-means++ seedings made together, Lloyd's k-means to
  convergence on the rows, the best partition kept);
* featurefail's previous default, ``init="kmeans++-fast"`` (k-means++ and five Lloyd steps on 16 rows per component);
* scikit-learn's ``GaussianMixture(covariance_type="diag")`` (full ``KMeans`` initialisation),

and reports wall time (the fastest of ``--repeats`` identical fits, timed in turn), EM iterations and
the final mean log-likelihood, judged for all three by scikit-learn's float64 ``score`` on the training rows.
Datasets: ``clustered`` (N=20,000, D=128, K=100, 150 Gaussian clusters, ``max_iter=30``) and ``bench``
(``gmm_bench.py``'s tanh features, N=50,000, D=342, K=100 with ``max_iter=100`` and K=1000 with ``max_iter=20``).

Usage::

    nice -n 10 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gmm_init_bench.py
    python benchmarks/gmm_init_bench.py --datasets clustered --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from gmm_bench import synthetic_features
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from featurefail import DiagonalGMM


def clustered(n: int = 20_000, d: int = 128, n_clusters: int = 150, seed: int = 0) -> np.ndarray:
    """Gaussian clusters: centres N(0, 3²), per-cluster per-dimension scales in [0.5, 1.5), uniform labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, d)) * 3
    labels = rng.integers(0, n_clusters, n)
    scales = 0.5 + rng.random((n_clusters, d))
    return (centers[labels] + rng.normal(size=(n, d)) * scales[labels]).astype(np.float32)


#: seconds of rest before each timed fit: the other library's worker threads (OpenMP, OpenBLAS) spin for a while
#: after their last task and would slow the next fit down
PAUSE = 0.5


def run(name: str, x32: np.ndarray, k: int, max_iter: int, seed: int, sk: bool, repeats: int = 1) -> list[dict]:
    """Whole fits of every implementation, timed in turn ``repeats`` times (interleaved, so that a change in the
    machine's speed during the run reaches all implementations alike; a pause before each); the fastest time of
    each is kept."""
    x64 = x32.astype(np.float64)  # scikit-learn's judge and its fit in float64 (its float32 fit fails here)
    xt = torch.from_numpy(x32)
    fits = {
        f"featurefail {init}": lambda init=init: DiagonalGMM(k, init=init, random_state=seed, max_iter=max_iter).fit(xt)
        for init in ("kmeans++", "kmeans++-fast")
    }
    if sk:
        fits["scikit-learn"] = lambda: GaussianMixture(
            k, covariance_type="diag", random_state=seed, max_iter=max_iter
        ).fit(x64)
    times: dict[str, list[float]] = {impl: [] for impl in fits}
    models = {}
    for _ in range(repeats):
        for impl, fit in fits.items():
            time.sleep(PAUSE)
            t0 = time.perf_counter()
            models[impl] = fit()
            times[impl].append(time.perf_counter() - t0)
    rows = []
    for impl, model in models.items():
        reference = model if impl == "scikit-learn" else model.to_sklearn()
        rows.append(
            dict(
                data=name,
                k=k,
                seed=seed,
                impl=impl,
                s=min(times[impl]),
                it=model.n_iter_,
                ll=float(reference.score(x64)),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["clustered", "bench"], choices=["clustered", "bench"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--repeats", type=int, default=1, help="identical fits timed per implementation (min kept)")
    parser.add_argument("--no-k1000", action="store_true", help="skip the bench data at K=1000")
    args = parser.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| data | K | seed | implementation | seconds | EM iterations | mean log-lik | vs scikit-learn: time, log-lik |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for seed in args.seeds:
        cases = []
        if "clustered" in args.datasets:
            cases.append(("clustered N=20000 D=128 (150 clusters)", clustered(seed=seed), 100, 30))
        if "bench" in args.datasets:
            xb = synthetic_features(50_000, 342, seed=seed)
            cases.append(("gmm_bench N=50000 D=342", xb, 100, 100))
            if not args.no_k1000:
                cases.append(("gmm_bench N=50000 D=342", xb, 1000, 20))
        for name, x, k, max_iter in cases:
            rows = run(name, x, k, max_iter, seed, sk=True, repeats=args.repeats)
            ref = rows[-1]
            for r in rows:
                cmp = "" if r is ref else f"{ref['s'] / r['s']:.2f}x faster, {r['ll'] - ref['ll']:+.3f} nats"
                print(
                    f"| {r['data']} | {r['k']} | {r['seed']} | {r['impl']} | {r['s']:.2f} | {r['it']} | "
                    f"{r['ll']:.3f} | {cmp} |",
                    flush=True,
                )
            summary.setdefault((name, k), []).append((ref["s"] / rows[0]["s"], rows[0]["ll"] - ref["ll"]))
    for (name, k), pairs in summary.items():
        speed, gain = np.array(pairs).T
        print(
            f"\n{name}, K={k}, default `kmeans++` vs scikit-learn over {len(pairs)} seed(s): "
            f"{speed.mean():.2f}x faster on average ({speed.min():.2f}-{speed.max():.2f}x), "
            f"{gain.mean():+.3f} nats/sample on average (worst {gain.min():+.3f})"
        )


if __name__ == "__main__":
    main()
