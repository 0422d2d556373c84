"""Which parts of the default k-means initialisation buy what (issue 19): an ablation on clustered data.

Every variant builds k-means centres from the library's own pieces (:func:`kmeans_plusplus`, :func:`kmeans_runs`,
:func:`hard_log_likelihood`) on the centred rows, then ``DiagonalGMM`` runs EM from those means with the
benchmark's settings (``max_iter=30``, default ``tol``); the final mean log-likelihood is judged by scikit-learn's
float64 ``score`` and compared with scikit-learn's own whole fit (``GaussianMixture(covariance_type="diag")``,
``random_state`` = the seed). Times are of the centres only (the EM that follows costs the same for all). The
seedings' products run in bfloat16 where the library's do (:func:`bfloat16_seeding`), or in float32
for all variants with ``--float32-seeding``.

Variants (``R`` runs, ``t`` candidates per centre; ``t = 2 + ⌊ln K⌋ = 6`` is scikit-learn's greedy rule):

* ``greedy-1``: one greedy seeding on all rows, Lloyd to convergence (what scikit-learn's ``KMeans`` does);
* ``greedy-3-inertia``: three greedy runs, the lowest inertia kept;
* ``greedy-3-likelihood``: three greedy runs, the highest classification log-likelihood kept (the default);
* ``greedy-2-likelihood``: two runs, same rule;
* ``greedy-3-likelihood-t3``: three runs with 3 candidates per centre;
* ``greedy-3-likelihood-sub8k``: three runs seeded on 8,000 of the rows;
* ``plain-5-inertia``: five plain k-means++ runs (one candidate per centre), the lowest inertia kept.

Usage::

    python benchmarks/gmm_init_ablation.py --seeds 0 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from gmm_init_bench import clustered
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from featurefail import DiagonalGMM
from featurefail.gmm.initialisation import (
    bfloat16_seeding,
    hard_log_likelihood,
    kmeans_plusplus,
    kmeans_runs,
)

K = 100
CHUNK = 8192
VARIANTS = {  # name -> (runs, candidates per centre, rule, rows the seeding sees)
    "greedy-1": (1, 6, "inertia", None),
    "greedy-3-inertia": (3, 6, "inertia", None),
    "greedy-3-likelihood": (3, 6, "likelihood", None),
    "greedy-2-likelihood": (2, 6, "likelihood", None),
    "greedy-3-likelihood-t3": (3, 3, "likelihood", None),
    "greedy-3-likelihood-sub8k": (3, 6, "likelihood", 8000),
    "plain-5-inertia": (5, 1, "inertia", None),
}


def centres(
    x: torch.Tensor, variant: str, generator: torch.Generator, product_dtype: torch.dtype | None
) -> torch.Tensor:
    """k-means centres ``(K, D)`` of centred rows ``x (m, D)`` by ``variant``."""
    runs, trials, rule, seed_rows = VARIANTS[variant]
    rows = x if seed_rows is None else x[torch.randperm(len(x), generator=generator)[:seed_rows]]
    seeds = kmeans_plusplus(rows, K, generator, trials, runs, product_dtype=product_dtype).view(runs, K, -1)
    final, _, inertias, labels = kmeans_runs(x, seeds, CHUNK)
    if rule == "inertia":
        return final[int(np.argmin(inertias))]
    variance = x.double().var(0, unbiased=False)
    scores = hard_log_likelihood(x, labels, final, 1e-6 * variance, variance, CHUNK)
    return final[int(np.argmax(scores))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--float32-seeding", action="store_true", help="seed in float32 even where bfloat16 is fast")
    args = parser.parse_args()
    fast = bfloat16_seeding(torch.device("cpu"), torch.float32) and not args.float32_seeding
    product_dtype = torch.bfloat16 if fast else None
    warnings.simplefilter("ignore", ConvergenceWarning)
    gains: dict[str, list[float]] = {v: [] for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    sk_times = []
    for seed in args.seeds:
        data = clustered(seed=seed)
        x64 = data.astype(np.float64)
        t0 = time.perf_counter()
        ref = GaussianMixture(K, covariance_type="diag", random_state=seed, max_iter=30).fit(x64)
        sk_times.append(time.perf_counter() - t0)
        reference = ref.score(x64)
        mean = data.mean(0)
        x = torch.from_numpy(data - mean)
        for variant in VARIANTS:
            t0 = time.perf_counter()
            c = centres(x, variant, torch.Generator().manual_seed(seed), product_dtype)
            times[variant].append(time.perf_counter() - t0)
            model = DiagonalGMM(K, means_init=c.double().numpy() + mean, max_iter=30, random_state=seed).fit(data)
            gains[variant].append(model.to_sklearn().score(x64) - reference)
    threads = torch.get_num_threads()
    print(
        f"torch {torch.__version__}, {threads} threads; clustered N=20000 D=128 (150 clusters), K={K}; "
        f"seeding products in {'bfloat16' if fast else 'float32'}"
    )
    print(f"scikit-learn whole fit: {np.mean(sk_times):.2f} s on average; seeds {args.seeds}\n")
    print("| variant | centres, s (mean) | final log-lik − scikit-learn's, nats: mean | worst | per seed |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        g = np.array(gains[variant])
        per_seed = " ".join(f"{v:+.2f}" for v in g)
        print(f"| {variant} | {np.mean(times[variant]):.3f} | {g.mean():+.3f} | {g.min():+.3f} | {per_seed} |")


if __name__ == "__main__":
    main()
