"""Initialisation of EM: k-means on the rows, then weights and variances from a hard assignment of all rows.

``init="kmeans++"`` (default): Lloyd's k-means on all rows, or on ``max(256 K, 65536)`` uniformly drawn rows
when there are more (at most 256 MiB of them), measured in the data's units (centred, not column-scaled).
When ``rows · K · D <= 2²⁸`` it is restarted three times and the lowest inertia kept, each run seeded by
greedy k-means++ (as scikit-learn's ``KMeans``: ``2 + ⌊ln K⌋`` candidates per centre, the one lowering the
inertia most is kept) on those rows and run to convergence (centre shift below ``1e-4`` of the mean variance,
at most 100 iterations); otherwise once, seeded by plain k-means++ on ``16 K`` rows, for at most 10
iterations (each costs about one EM iteration). Empty clusters are re-seeded at the rows farthest from their
centres. See ``benchmarks/gmm_init_bench.py`` and ``benchmarks/README.md`` for the comparison with scikit-learn.

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

__all__ = ["INITS", "assign", "initial_parameters", "kmeans", "kmeans_plusplus", "lloyd", "nearest"]

INITS = ("kmeans++", "kmeans++-fast", "random_from_data")
INIT_SAMPLES_PER_COMPONENT = 16  # k-means++ seeding runs on at most this many rows per component
INIT_MIN_SAMPLES = 4096
LLOYD_STEPS = 5  # of "kmeans++-fast"
KMEANS_ROWS_PER_COMPONENT = 256  # Lloyd's k-means runs on all rows, or on this many per component (at least
KMEANS_MIN_ROWS = 65536  # KMEANS_MIN_ROWS, at most KMEANS_MAX_BYTES of them)
KMEANS_MAX_BYTES = 256 * 2**20
KMEANS_MAX_ITER = 100
KMEANS_RESTARTS = 3  # seeding + Lloyd restarts (lowest inertia kept) when one run costs at most KMEANS_CHEAP_WORK
KMEANS_CHEAP_WORK = 2**28  # rows · K · D of the Lloyd sample
KMEANS_MAX_ITER_LARGE = 10  # Lloyd iterations when a run is not cheap (each costs about one EM iteration)
KMEANS_TOL = 1e-4  # stop when Σ ||Δ centre||² <= KMEANS_TOL · mean per-dimension variance (scikit-learn's rule)


def nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean): ``x (n, D)``, ``centers (K, D)`` -> ``(n,)``."""
    c_sq = (centers * centers).sum(1)
    out = []
    for piece in torch.split(x, chunk):
        out.append(torch.addmm(c_sq, piece, centers.T, alpha=-2.0).argmin(1))
    return torch.cat(out)


def assign(x: torch.Tensor, centers: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre and its squared distance: ``x (n, D)``, ``centers (K, D)`` -> ``(n,)`` int64, ``(n,)``."""
    c_sq = (centers * centers).sum(1)
    labels, dist = [], []
    for piece in torch.split(x, chunk):
        d2, idx = torch.addmm(c_sq, piece, centers.T, alpha=-2.0).min(1)
        labels.append(idx)
        dist.append((d2 + (piece * piece).sum(1)).clamp_min(0.0))
    return torch.cat(labels), torch.cat(dist)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator, n_local_trials: int = 1) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``x (m, D)`` -> ``k`` centres ``(k, D)``.

    Each new centre is drawn with probability proportional to the squared distance to the nearest centre
    chosen so far; when every remaining distance is zero (duplicate rows) the draw is uniform. With
    ``n_local_trials > 1`` (greedy k-means++, as scikit-learn's ``KMeans``) that many candidates are drawn
    and the one that lowers the total squared distance most is kept.
    """
    if n_local_trials > 1:
        return _greedy_kmeans_plusplus(x, k, generator, n_local_trials)
    m = x.shape[0]
    x_sq = (x * x).sum(1)
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(m, (1,), generator=generator).item())
    centers[0] = x[first]
    d2 = (x_sq - 2.0 * (x @ centers[0]) + x_sq[first]).clamp_min(0.0)
    uniforms = torch.rand(k, generator=generator, dtype=torch.float64)
    for i in range(1, k):
        cumulative = torch.cumsum(d2.double(), 0)
        total = float(cumulative[-1].item())
        if total > 0.0 and math.isfinite(total):
            target = cumulative.new_tensor([uniforms[i].item() * total])
            idx = int(torch.searchsorted(cumulative, target).clamp_max(m - 1).item())
        else:
            idx = int(uniforms[i].item() * m) % m
        centers[i] = x[idx]
        new_d2 = (x_sq - 2.0 * (x @ centers[i]) + x_sq[idx]).clamp_min(0.0)
        d2 = torch.minimum(d2, new_d2)
    return centers


def _greedy_kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator, trials: int) -> torch.Tensor:
    m = x.shape[0]
    x_sq = (x * x).sum(1)
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(m, (1,), generator=generator).item())
    centers[0] = x[first]
    d2 = (x_sq - 2.0 * (x @ centers[0]) + x_sq[first]).clamp_min(0.0)
    uniforms = torch.rand(k, trials, generator=generator, dtype=torch.float64)
    for i in range(1, k):
        cumulative = torch.cumsum(d2.double(), 0)
        total = float(cumulative[-1].item())
        if total > 0.0 and math.isfinite(total):
            targets = (uniforms[i] * total).to(cumulative.device)
            idx = torch.searchsorted(cumulative, targets).clamp_max(m - 1)
        else:
            idx = (uniforms[i] * m).long().clamp_max(m - 1).to(x.device)
        cand = x[idx]  # (trials, D)
        cand_d2 = (x_sq[:, None] - 2.0 * (x @ cand.T) + x_sq[idx][None, :]).clamp_min(0.0)  # (m, trials)
        new_d2 = torch.minimum(d2[:, None], cand_d2)
        best = int(new_d2.double().sum(0).argmin().item())
        centers[i] = cand[best]
        d2 = new_d2[:, best].contiguous()
    return centers


def kmeans(
    x: torch.Tensor, centers: torch.Tensor, chunk: int, max_iter: int = KMEANS_MAX_ITER, tol: float = KMEANS_TOL
) -> tuple[torch.Tensor, int, float]:
    """Lloyd's k-means on ``x (m, D)`` from ``centers (K, D)``: final centres ``(K, D)``, iterations, inertia.

    Stops when ``Σ_k ||Δμ_k||² <= tol · mean_d Var[x_d]`` (scikit-learn's rule) or after ``max_iter``
    iterations. A cluster left empty is moved to the row farthest from its centre (one row per empty cluster).
    Cluster sums are one matrix product with the one-hot assignment per chunk; the inertia (sum of squared
    distances to the nearest centre) is that of the last assignment.
    """
    k = centers.shape[0]
    threshold = tol * float(x.var(0, unbiased=False).double().mean().item())
    centers = centers.clone()
    n_iter, inertia = 0, math.inf
    while n_iter < max_iter:
        n_iter += 1
        sums = torch.zeros_like(centers)
        counts = torch.zeros(k, dtype=torch.int64, device=x.device)
        dist = []
        for piece in torch.split(x, chunk):
            labels, d2 = assign(piece, centers, piece.shape[0])
            onehot = torch.zeros(piece.shape[0], k, dtype=x.dtype, device=x.device)
            onehot.scatter_(1, labels[:, None], 1.0)
            sums.addmm_(onehot.T, piece)
            counts += torch.bincount(labels, minlength=k)
            dist.append(d2)
        d2 = torch.cat(dist)
        inertia = float(d2.double().sum().item())
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            far = d2.topk(min(int(empty.numel()), x.shape[0])).indices
            new[empty[: far.numel()]] = x[far]
            new[empty[far.numel() :]] = centers[empty[far.numel() :]]
        shift = float(((new - centers).double() ** 2).sum().item())
        centers = new
        if shift <= threshold and not empty.numel():
            break
    return centers, n_iter, inertia


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the enclosed CPU code on one thread, restoring the setting after.

    k-means++ seeding is K sequential thin products; on a busy CPU, OpenMP barriers between them cost 30x
    more than the work (5.8 s against 0.17 s for K=100 on 4,096 rows, measured under load).
    """
    if device.type != "cpu":
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
            best, centers = math.inf, None
            for _ in range(restarts):
                seed_rows = sample
                if not cheap and sample.shape[0] > m_seed:
                    seed_rows = sample[torch.randperm(sample.shape[0], generator=generator)[:m_seed].to(dev)]
                with _one_cpu_thread(dev):
                    trials = 2 + int(math.log(k)) if cheap else 1  # greedy seeding costs trials x plain
                    seeds = kmeans_plusplus(seed_rows, k, generator, n_local_trials=trials)
                run_centers, _, inertia = kmeans(sample, seeds, data.chunk_size, max_iter=max_iter)
                if centers is None or inertia < best:
                    best, centers = inertia, run_centers / metric
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
