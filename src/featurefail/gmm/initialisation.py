"""Initialisation of EM: k-means on the rows, then weights and variances from a hard assignment of all rows.

``init="kmeans++"`` (default): Lloyd's k-means on all rows, or on ``max(256 K, 65536)`` uniformly drawn rows
when there are more (at most 256 MiB of them), measured in the data's units (centred, not column-scaled).
When ``rows · K · D <= 2²⁸`` three runs are made together, each seeded by greedy k-means++ (as
scikit-learn's ``KMeans``: ``2 + ⌊ln K⌋`` candidates per centre, the one lowering the inertia most is kept;
one pass over the rows per centre serves all three seedings) on those rows and run to convergence (centre
shift below ``1e-4`` of the mean variance, at most 100 iterations), and the run whose last partition has the
highest diagonal-Gaussian classification log-likelihood is kept (:func:`hard_log_likelihood`: ranking the same
runs by it ended higher after EM than ranking them by inertia, ``benchmarks/gmm_init_ablation.py``); otherwise
once, seeded by plain k-means++ on ``16 K`` rows, for at most 10 iterations (each costs about one EM iteration).
On a CPU with native bfloat16 (:func:`bfloat16_seeding`) the seeding's distance products of float32 data run
in bfloat16 (the draws only need approximate distances), so the same ``random_state`` may give other centres on
a CPU without it; ``dtype=torch.float64`` seeds in float64. Lloyd's iterations and all that follows stay in the
data's dtype.
Empty clusters are re-seeded at the rows farthest from their centres. See ``benchmarks/gmm_init_bench.py`` and
``benchmarks/README.md`` for the comparison with scikit-learn.

``init="kmeans++-fast"``: the previous default, plain k-means++ seeding and five Lloyd steps on ``16 K`` rows.
``init="random_from_data"``: ``K`` random rows as means.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from .data import FitData
from .distributed import all_reduce_, broadcast_

__all__ = [
    "INITS",
    "bfloat16_seeding",
    "hard_log_likelihood",
    "initial_parameters",
    "kmeans",
    "kmeans_plusplus",
    "kmeans_runs",
    "lloyd",
    "nearest",
]

INITS = ("kmeans++", "kmeans++-fast", "random_from_data")
INIT_SAMPLES_PER_COMPONENT = 16  # k-means++ seeding runs on at most this many rows per component
INIT_MIN_SAMPLES = 4096
LLOYD_STEPS = 5  # of "kmeans++-fast"
KMEANS_ROWS_PER_COMPONENT = 256  # Lloyd's k-means runs on all rows, or on this many per component (at least
KMEANS_MIN_ROWS = 65536  # KMEANS_MIN_ROWS, at most KMEANS_MAX_BYTES of them)
KMEANS_MAX_BYTES = 256 * 2**20
KMEANS_MAX_ITER = 100
KMEANS_RESTARTS = 3  # seeding + Lloyd runs (best partition kept) when one run costs at most KMEANS_CHEAP_WORK
KMEANS_CHEAP_WORK = 2**28  # rows · K · D of the Lloyd sample
KMEANS_MAX_ITER_LARGE = 10  # Lloyd iterations when a run is not cheap (each costs about one EM iteration)
SEEDING_THREADED_WORK = 2**24  # multiply-adds per seeding step above which it uses all CPU threads
KMEANS_TOL = 1e-4  # stop when Σ ||Δ centre||² <= KMEANS_TOL · mean per-dimension variance (scikit-learn's rule)


def nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean): ``x (n, D)``, ``centers (K, D)`` -> ``(n,)``."""
    c_sq = (centers * centers).sum(1)
    out = []
    for piece in torch.split(x, chunk):
        out.append(torch.addmm(c_sq, piece, centers.T, alpha=-2.0).argmin(1))
    return torch.cat(out)


def bfloat16_seeding(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether k-means++ seeding of ``dtype`` rows on ``device`` computes its products in bfloat16: float32 rows on
    a CPU with native bfloat16 arithmetic (AVX-512 BF16, which every AMX CPU also has) through oneDNN, where the
    seeding's ``(18, 128) @ (128, 20000)`` product ran about twice as fast as in float32 (an AMD EPYC with
    AVX-512 BF16). Not on other CPUs (bfloat16 is emulated there), not for float64 rows, not on GPUs (not
    measured)."""
    if device.type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # torch's own (private) probe; without it, assume no native bfloat16
        return False


def kmeans_plusplus(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    n_local_trials: int = 1,
    n_runs: int = 1,
    product_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``x (m, D)`` -> ``k`` centres ``(k, D)``.

    Each new centre is drawn with probability proportional to the squared distance to the nearest centre
    chosen so far; when every remaining distance is zero (duplicate rows; products in ``x``'s dtype) the draw is
    uniform. With ``n_local_trials > 1`` (greedy k-means++, as scikit-learn's ``KMeans``) that many candidates
    are drawn and the one that lowers the total squared distance most is kept. With ``n_runs > 1``, that many
    independent seedings are drawn together (one product over ``x`` per centre serves all of them: a wider
    product than each run's thin one, which the CPU computes well below its GEMM speed) and ``(n_runs, k, D)``
    is returned. ``product_dtype`` (default: ``x``'s) is the dtype of the candidate-by-row products: with
    ``torch.bfloat16`` the squared distances that weigh the draws and rank the candidates carry a rounding error
    of order ``2⁻⁸ ‖x‖ ‖c‖`` (a chosen row's own distance is still set to zero); the centres are still rows of
    ``x``.
    """
    m, d = x.shape
    runs, trials = n_runs, n_local_trials
    product_dtype = x.dtype if product_dtype is None else product_dtype
    rows_last = x.to(product_dtype).T.contiguous()  # (D, m): (candidates, D) @ (D, m) is the faster layout
    x_sq = (x * x).sum(1)
    centers = torch.empty(runs, k, d, dtype=x.dtype, device=x.device)
    first = torch.randint(m, (runs,), generator=generator).to(x.device)
    centers[:, 0] = x[first]
    d2 = torch.addmm(x_sq[first][:, None], centers[:, 0], x.T, alpha=-2.0).add_(x_sq).clamp_min_(0.0)
    uniforms = torch.rand(k, runs, trials, generator=generator, dtype=torch.float64).to(x.device)
    run_index = torch.arange(runs, device=x.device)
    for i in range(1, k):
        cumulative = torch.cumsum(d2, 1, dtype=torch.float64)  # (runs, m)
        total = cumulative[:, -1:]
        drawn = torch.searchsorted(cumulative, uniforms[i] * total).clamp_max(m - 1)  # (runs, trials)
        degenerate = ~(total > 0.0) | ~torch.isfinite(total)
        idx = torch.where(degenerate, (uniforms[i] * m).long().clamp_max(m - 1), drawn).flatten()
        cand = x[idx]  # (runs * trials, D)
        if product_dtype == x.dtype:
            cand_d2 = torch.addmm(x_sq[idx][:, None], cand, rows_last, alpha=-2.0)
        else:
            cand_d2 = torch.mm(cand.to(product_dtype), rows_last).to(x.dtype).mul_(-2.0).add_(x_sq[idx][:, None])
        cand_d2 = cand_d2.add_(x_sq).clamp_min_(0.0)  # (runs * trials, m)
        new_d2 = torch.minimum(d2[:, None, :], cand_d2.view(runs, trials, m))  # (runs, trials, m)
        best = new_d2.sum(2, dtype=torch.float64).argmin(1)  # (runs,)
        centers[:, i] = cand.view(runs, trials, d)[run_index, best]
        d2 = new_d2[run_index, best]
        d2[run_index, idx.view(runs, trials)[run_index, best]] = 0.0  # exact despite rounded products
    return centers[0] if runs == 1 else centers


def _nearest_per_run(piece: torch.Tensor, flat: torch.Tensor, runs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows ``piece (n, D)`` and ``runs`` stacked centre sets ``flat (runs·K, D)``: the squared distance to
    each run's nearest centre minus ``‖x‖²`` ``(n, runs)`` and that centre's row in ``flat`` ``(n, runs)``."""
    k = flat.shape[0] // runs
    partial, labels = torch.addmm((flat * flat).sum(1), piece, flat.T, alpha=-2.0).view(-1, runs, k).min(2)
    return partial, labels + torch.arange(runs, device=piece.device)[None, :] * k


def kmeans(
    x: torch.Tensor, centers: torch.Tensor, chunk: int, max_iter: int = KMEANS_MAX_ITER, tol: float = KMEANS_TOL
) -> tuple[torch.Tensor, int, float]:
    """Lloyd's k-means on ``x (m, D)`` from ``centers (K, D)``: final centres ``(K, D)``, iterations, inertia.

    Stops when ``Σ_k ||Δμ_k||² <= tol · mean_d Var[x_d]`` (scikit-learn's rule) or after ``max_iter``
    iterations. A cluster left empty is moved to the row farthest from its centre (one row per empty cluster).
    Cluster sums are an index-add on the CPU and one matrix product with the one-hot assignment elsewhere (no
    atomics: deterministic); the inertia (sum of squared distances to the nearest centre) is that of the last
    assignment.
    """
    final, n_iter, inertia, _ = kmeans_runs(x, centers[None], chunk, max_iter, tol)
    return final[0], int(n_iter[0]), float(inertia[0])


def kmeans_runs(
    x: torch.Tensor, centers: torch.Tensor, chunk: int, max_iter: int = KMEANS_MAX_ITER, tol: float = KMEANS_TOL
) -> tuple[torch.Tensor, list[int], list[float], torch.Tensor]:
    """:func:`kmeans` from ``R`` starts ``centers (R, K, D)`` at once: centres ``(R, K, D)``, iterations, inertias
    and the last assignment of every row in each run ``(m, R)`` (indices in ``[0, K)``; the centres are the means
    of these partitions, except clusters left empty, which moved to a row; ``-1`` when ``max_iter=0``).

    Each run follows exactly the steps it would alone (a run stops when it converges); the runs still going
    share one distance product per chunk.
    """
    runs, k, d = centers.shape
    threshold = tol * float(x.var(0, unbiased=False).double().mean().item())
    final = centers.clone()
    last = torch.full((x.shape[0], runs), -1, dtype=torch.int64, device=x.device)
    n_iter, inertia = [0] * runs, [math.inf] * runs
    active = list(range(runs)) if max_iter > 0 else []
    while active:
        current = final[active]  # (r, K, D)
        r = len(active)
        flat = current.reshape(r * k, d)
        sums = torch.zeros_like(flat)
        counts = torch.zeros(r * k, dtype=torch.int64, device=x.device)
        dist, assigned = [], []
        for piece in torch.split(x, chunk):
            d2, labels = _nearest_per_run(piece, flat, r)
            if x.device.type == "cpu":  # deterministic on the CPU; elsewhere it adds with atomics
                for j in range(r):
                    sums.index_add_(0, labels[:, j], piece)
            else:
                onehot = torch.zeros(piece.shape[0], r * k, dtype=x.dtype, device=x.device)
                onehot.scatter_(1, labels, 1.0)
                sums.addmm_(onehot.T, piece)
            counts += torch.bincount(labels.flatten(), minlength=r * k)
            dist.append((d2 + (piece * piece).sum(1)[:, None]).clamp_min(0.0))
            assigned.append(labels)
        d2_all = torch.cat(dist)  # (m, r)
        last[:, active] = torch.cat(assigned) - torch.arange(r, device=x.device)[None, :] * k
        new = (sums / counts.clamp_min(1)[:, None].to(x.dtype)).view(r, k, d)
        counts = counts.view(r, k)
        still = []
        for j, run in enumerate(active):
            n_iter[run] += 1
            inertia[run] = float(d2_all[:, j].double().sum().item())
            empty = torch.nonzero(counts[j] == 0).flatten()
            if empty.numel():
                far = d2_all[:, j].topk(min(int(empty.numel()), x.shape[0])).indices
                new[j, empty[: far.numel()]] = x[far]
                new[j, empty[far.numel() :]] = current[j, empty[far.numel() :]]
            shift = float(((new[j] - current[j]).double() ** 2).sum().item())
            final[run] = new[j]
            if not (shift <= threshold and not empty.numel()) and n_iter[run] < max_iter:
                still.append(run)
        active = still
    return final, n_iter, inertia, last


def hard_log_likelihood(
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor,
    floor: torch.Tensor,
    fallback: torch.Tensor,
    chunk: int,
) -> list[float]:
    """Classification log-likelihood of ``R`` partitions of ``x (m, D)``: row ``i`` of run ``r`` belongs to the
    cluster of centre ``centers[r, labels[i, r]]`` (``labels (m, R)``, ``centers (R, K, D)``; e.g. the last
    assignments and final centres of :func:`kmeans_runs`, where each centre is its cluster's mean) -> ``R``
    floats.

    Each cluster ``c`` (``n_c`` rows) gets weight ``n_c / m``, mean ``μ_c`` (its centre) and the diagonal variance
    EM would start from (as :func:`initial_parameters`): ``σ²_cd = max(s²_cd, floor_d)`` with ``s²_cd`` the mean
    of ``(x_d − μ_cd)²`` over its rows, or ``fallback_d`` (the data's variance) when ``n_c < 2``. The value is
    ``Σ_c [n_c log(n_c / m) − ½ Σ_d (n_c log 2πσ²_cd + n_c s²_cd / σ²_cd)]``, the diagonal mixture's
    log-likelihood of the rows with those labels and parameters. Restarts are ranked by it rather than by the
    inertia: it is the quantity EM goes on to raise, and it weighs each cluster's spread. Squared deviations from
    the centres (no cancellation) are summed in ``x``'s dtype by index-add (on a GPU their order, hence the last
    bits, may vary between calls; under ``torch.distributed`` rank 0's choice is broadcast).
    """
    runs, k, d = centers.shape
    if labels.shape != (x.shape[0], runs):
        raise ValueError(f"labels must have shape {(x.shape[0], runs)}, got {tuple(labels.shape)}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < k):
        raise ValueError(f"labels must lie in [0, {k}), got [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.zeros(runs * k, dtype=torch.float64, device=x.device)
    squares = torch.zeros(runs * k, d, dtype=x.dtype, device=x.device)
    flat = labels + torch.arange(runs, device=x.device) * k  # (m, R): rows of the stacked (R·K) clusters
    counts += torch.bincount(flat.flatten(), minlength=runs * k)
    stacked = centers.reshape(runs * k, d)
    for piece, piece_flat in zip(torch.split(x, chunk), torch.split(flat, chunk), strict=True):
        for j in range(runs):
            deviation = piece - stacked[piece_flat[:, j]]
            squares.index_add_(0, piece_flat[:, j], deviation * deviation)
    safe = counts.clamp_min(1.0)[:, None]
    spread = squares.double() / safe
    variance = torch.where(counts[:, None] >= 2, torch.maximum(spread, floor.double()), fallback.double())
    per_dim = torch.log(2 * math.pi * variance) + spread / variance
    terms = counts * torch.log(safe[:, 0] / x.shape[0]) - 0.5 * counts * per_dim.sum(1)
    return terms.view(runs, k).sum(1).tolist()


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device, work: int) -> Iterator[None]:
    """Run the enclosed CPU code on one thread when each of its products is small (``work`` multiply-adds).

    k-means++ seeding is K sequential thin products; on a busy CPU, OpenMP barriers between small ones cost 30x
    more than the work (5.8 s against 0.17 s for K=100 on 4,096 rows, measured under load). Larger products
    (greedy seeding of several runs: rows x D x runs x trials) gain from all threads.
    """
    if device.type != "cpu" or work >= SEEDING_THREADED_WORK:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def lloyd(x: torch.Tensor, centers: torch.Tensor, steps: int, chunk: int) -> torch.Tensor:
    """``steps`` Lloyd iterations of k-means on ``x (m, D)`` from ``centers (K, D)``; empty clusters stay put."""
    k = centers.shape[0]
    for _ in range(steps):
        labels = nearest(x, centers, chunk)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        filled = counts > 0
        centers = torch.where(filled[:, None], sums / counts.clamp_min(1.0)[:, None], centers)
    return centers


def initial_parameters(
    data: FitData,
    k: int,
    init: str,
    start: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    floor: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Starting weights ``(K,)``, centred means ``(K, D)`` and variances ``(K, D)`` (float64) for EM.

    ``start`` holds the explicitly given parameters (``None`` where not given). Missing means come from
    ``init`` on a seeded subsample of the union of all ranks' rows, which every rank draws and seeds alike
    (same generator, so the generator stays in step across ranks; the centres are then broadcast from rank 0
    for bit-identity); one pass of hard assignment over all rows then gives the missing weights and variances
    (and refines k-means centres).
    """
    weights, means, variances = start
    d = data.n_features
    if weights is not None and means is not None and variances is not None:
        return weights.clone(), means.clone(), variances.clone()
    dev = data.device
    refine = means is None
    # k-means and the hard assignment measure distances in the data's own units up to one power of two (k-means,
    # unlike EM, is not invariant to rescaling a column; the largest column scale is brought to 1 to stay in range)
    metric = (data.scale / data.scale.max()).to(data.dtype)
    if means is None:
        m_seed = max(INIT_SAMPLES_PER_COMPONENT * k, INIT_MIN_SAMPLES)
        if init == "kmeans++":
            itemsize = torch.finfo(data.dtype).bits // 8
            m = max(KMEANS_ROWS_PER_COMPONENT * k, KMEANS_MIN_ROWS)
            m = max(min(m, KMEANS_MAX_BYTES // (itemsize * d)), m_seed)
            sample = data.subsample(m, generator) * metric  # collective: the same rows of the union on every rank
            cheap = sample.shape[0] * k * d <= KMEANS_CHEAP_WORK
            restarts, max_iter = (KMEANS_RESTARTS, KMEANS_MAX_ITER) if cheap else (1, KMEANS_MAX_ITER_LARGE)
            seed_rows = sample
            if not cheap and sample.shape[0] > m_seed:
                seed_rows = sample[torch.randperm(sample.shape[0], generator=generator)[:m_seed].to(dev)]
            trials = 2 + int(math.log(k)) if cheap else 1  # greedy seeding costs trials x plain
            product_dtype = torch.bfloat16 if bfloat16_seeding(dev, data.dtype) else None
            with _one_cpu_thread(dev, seed_rows.shape[0] * d * restarts * trials):
                seeds = kmeans_plusplus(
                    seed_rows, k, generator, n_local_trials=trials, n_runs=restarts, product_dtype=product_dtype
                )
            chunk = max(1, data.chunk_size // restarts)  # the work arrays hold every run's K columns
            runs, _, _, labels = kmeans_runs(sample, seeds.view(restarts, k, d), chunk, max_iter=max_iter)
            if restarts > 1:
                in_sample_units = metric.double() ** 2  # the sample is in EM's coordinates times ``metric``
                scores = hard_log_likelihood(
                    sample, labels, runs, floor * in_sample_units, data.variance * in_sample_units, data.chunk_size
                )
                best = max(range(restarts), key=scores.__getitem__)
            else:
                best = 0
            centers = runs[best] / metric
        elif init == "kmeans++-fast":
            sample = data.subsample(m_seed, generator) * metric
            centers = kmeans_plusplus(sample, k, generator)
            centers = lloyd(sample, centers, LLOYD_STEPS, data.chunk_size) / metric
        else:
            sample = data.subsample(m_seed, generator)
            pick = torch.randperm(sample.shape[0], generator=generator)[:k].to(dev)
            centers = sample[pick].clone()
        means = broadcast_(centers.contiguous()).to(torch.float64)

    # one pass of hard assignment gives the missing weights and variances (and refines k-means centres)
    counts = torch.zeros(k, dtype=torch.float64, device=dev)
    sums = torch.zeros(k, 2 * d, dtype=torch.float64, device=dev)
    centers = means.to(data.dtype)
    for xx in data.chunks():
        labels = nearest(xx[:, :d] * metric, centers * metric, data.chunk_size)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        sums.index_add_(0, labels, xx[:, : 2 * d].double())
    all_reduce_(counts)
    all_reduce_(sums)
    filled = counts > 0
    safe = counts.clamp_min(1.0)[:, None]
    if refine:
        means = torch.where(filled[:, None], sums[:, :d] / safe, means)
    if variances is None:
        spread = sums[:, d:] / safe - 2.0 * means * sums[:, :d] / safe + means * means
        enough = (counts >= 2)[:, None]
        variances = torch.maximum(torch.where(enough, spread, data.variance.expand(k, d)), floor)
    if weights is None:
        weights = counts.clamp_min(1.0)
        weights = weights / weights.sum()
    return weights, means, variances
