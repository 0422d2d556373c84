"""DiagonalGMM against scikit-learn's GaussianMixture(covariance_type="diag") on the same data and start.

For each size it reports, in one table:

* whole fit with each library's default initialisation (ours: greedy k-means++ seeding + Lloyd's k-means on
  the rows, see ``featurefail.gmm.initialisation``; scikit-learn: full k-means), wall time, iterations, and
  the final mean log-likelihood evaluated by the same float64 formula for both;
* time per EM iteration from the same explicit start (difference of two fits with ``tol=0``);
* on CUDA, the float32 path against a float64 run from the same start after 50 iterations (acceptance 2).

Usage::

    python benchmarks/gmm_bench.py --device cpu                     # N=50k, D=342, K=100 and 1000
    python benchmarks/gmm_bench.py --device cuda --no-sklearn-large  # adds N=1M, D=512, K=1000
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from featurefail import DiagonalGMM


def synthetic_features(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Penultimate-feature-like data: 10 class clusters in a 32-d subspace, noise, then tanh (bounded)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(32, d)) / math.sqrt(32)
    centers = rng.normal(size=(10, 32)) * 2.0
    labels = rng.integers(0, 10, n)
    z = centers[labels] + rng.normal(size=(n, 32))
    x = np.tanh(z @ basis + 0.3 * rng.normal(size=(n, d)) + 0.5)
    return x.astype(np.float32)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def mean_loglik(model: DiagonalGMM, x: np.ndarray) -> float:
    """Mean log-likelihood by scikit-learn's float64 formula, the same judge for both libraries."""
    return float(model.to_sklearn().score(x))


def bench_size(n: int, d: int, k: int, device: str, sk: bool, iters: int, whole_iters: int) -> list[dict]:
    x = synthetic_features(n, d)
    xt = torch.from_numpy(x).to(device)
    x = x.astype(np.float64)  # scikit-learn fails on float32 input here ("ill-defined empirical covariance")
    rows: list[dict] = []
    warnings.simplefilter("ignore", ConvergenceWarning)

    # whole fit, default initialisations
    t, ours = timed(lambda: DiagonalGMM(k, random_state=0, max_iter=whole_iters).fit(xt), device)
    rows.append(
        dict(
            size=f"N={n} D={d} K={k}",
            impl=f"featurefail ({device})",
            what="whole fit",
            seconds=t,
            iters=ours.n_iter_,
            loglik=mean_loglik(ours, x),
        )
    )
    if sk:
        t, ref = timed(
            lambda: GaussianMixture(k, covariance_type="diag", random_state=0, max_iter=whole_iters).fit(x), "cpu"
        )
        rows.append(
            dict(
                size=f"N={n} D={d} K={k}",
                impl="scikit-learn",
                what="whole fit",
                seconds=t,
                iters=ref.n_iter_,
                loglik=float(ref.score(x)),
            )
        )

    # per-iteration time from one explicit start: the difference of a short and a long fit (data preparation
    # cancels), best of three; the float64 fallback is off so every iteration runs in the named dtype
    start = dict(weights_init=ours.weights_, means_init=ours.means_, variances_init=ours.covariances_)
    variants = [("featurefail", torch.float32)]
    if device.startswith("cuda"):
        variants.append(("featurefail float64", torch.float64))
    for label, dtype in variants:

        def fit(n_iter: int, dtype: torch.dtype = dtype) -> float:
            return timed(
                lambda: DiagonalGMM(k, max_iter=n_iter, tol=0, dtype=dtype, precision_fallback=False, **start).fit(xt),
                device,
            )[0]

        per_iter = min((fit(2 + iters) - fit(2)) / iters for _ in range(3))
        rows.append(
            dict(
                size=f"N={n} D={d} K={k}",
                impl=f"{label} ({device})",
                what="per iteration",
                seconds=per_iter,
                iters=iters,
                loglik=math.nan,
            )
        )
    if sk:
        sk_start = dict(
            weights_init=start["weights_init"].cpu().numpy(),
            means_init=start["means_init"].cpu().numpy(),
            precisions_init=1.0 / start["variances_init"].cpu().numpy(),
        )

        def sk_fit(n_iter: int) -> float:
            return timed(
                lambda: GaussianMixture(k, covariance_type="diag", max_iter=n_iter, tol=0, **sk_start).fit(x), "cpu"
            )[0]

        per_iter = (sk_fit(2 + iters) - sk_fit(2)) / iters
        rows.append(
            dict(
                size=f"N={n} D={d} K={k}",
                impl="scikit-learn",
                what="per iteration",
                seconds=per_iter,
                iters=iters,
                loglik=math.nan,
            )
        )
    return rows


def precision_check(device: str) -> str:
    """Acceptance 2 on ``device``: softplus(N(0,1)) + 10, D=128, K=100, 50 iterations, float32 vs float64."""
    g = torch.Generator().manual_seed(0)
    x = (torch.nn.functional.softplus(torch.randn(20_000, 128, generator=g)) + 10).to(device)
    base = DiagonalGMM(100, max_iter=1, tol=0, random_state=0).fit(x)
    start = dict(weights_init=base.weights_, means_init=base.means_, variances_init=base.covariances_)
    f32 = DiagonalGMM(100, max_iter=50, tol=0, **start).fit(x)
    f64 = DiagonalGMM(100, max_iter=50, tol=0, dtype=torch.float64, **start).fit(x)
    return (
        f"precision on {device}: float32 {f32.lower_bound_:.6f}, float64 {f64.lower_bound_:.6f}, "
        f"|diff| = {abs(f32.lower_bound_ - f64.lower_bound_):.2e} nats/sample (target < 1e-3)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10, help="iterations timed for the per-iteration figure")
    parser.add_argument("--whole-iters", type=int, default=100, help="max_iter of the whole fits (both libraries)")
    parser.add_argument("--k1000-whole-iters", type=int, default=20, help="max_iter of whole fits at K=1000")
    parser.add_argument("--no-sklearn-large", action="store_true", help="skip scikit-learn at N=1M")
    parser.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn everywhere")
    args = parser.parse_args()

    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, device {args.device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if args.device.startswith("cuda")
            else f" ({torch.get_num_threads()} threads)"
        )
    )
    sizes = [(50_000, 342, 100, args.whole_iters), (50_000, 342, 1000, args.k1000_whole_iters)]
    if args.device.startswith("cuda"):
        sizes.append((1_000_000, 512, 1000, args.k1000_whole_iters))
    rows = []
    for n, d, k, whole in sizes:
        sk = not (args.no_sklearn or (n >= 1_000_000 and args.no_sklearn_large))
        rows += bench_size(n, d, k, args.device, sk, args.iters, whole)
        print_table(rows)
    if args.device.startswith("cuda"):
        print(precision_check(args.device))


def print_table(rows: list[dict]) -> None:
    print("\n| size | what | implementation | seconds | iterations | mean log-lik | speed-up vs scikit-learn |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(
            (o for o in rows if o["impl"] == "scikit-learn" and o["size"] == r["size"] and o["what"] == r["what"]), None
        )
        ratio = f"{ref['seconds'] / r['seconds']:.2f}x" if ref is not None and r is not ref else ""
        ll = "" if math.isnan(r["loglik"]) else f"{r['loglik']:.3f}"
        secs = f"{r['seconds'] * 1000:.2f} ms" if r["seconds"] < 1 else f"{r['seconds']:.2f} s"
        print(f"| {r['size']} | {r['what']} | {r['impl']} | {secs} | {r['iters']} | {ll} | {ratio} |")


if __name__ == "__main__":
    main()
