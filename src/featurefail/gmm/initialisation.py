"""Initialisation of EM: k-means++ seeding and Lloyd steps, then weights and variances from a hard assignment."""

from __future__ import annotations

import math

import torch

from .data import FitData
from .distributed import all_reduce_, broadcast_

__all__ = ["INITS", "initial_parameters", "kmeans_plusplus", "lloyd", "nearest"]

INITS = ("kmeans++", "random_from_data")
INIT_SAMPLES_PER_COMPONENT = 16  # k-means++ seeding and Lloyd steps run on at most this many rows per component
INIT_MIN_SAMPLES = 4096
LLOYD_STEPS = 5


def nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean): ``x (n, D)``, ``centers (K, D)`` -> ``(n,)``."""
    c_sq = (centers * centers).sum(1)
    out = []
    for piece in torch.split(x, chunk):
        out.append(torch.addmm(c_sq, piece, centers.T, alpha=-2.0).argmin(1))
    return torch.cat(out)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``x (m, D)`` -> ``k`` centres ``(k, D)``.

    Each new centre is drawn with probability proportional to the squared distance to the nearest centre
    chosen so far; when every remaining distance is zero (duplicate rows) the draw is uniform.
    """
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
    if means is None:
        m = max(INIT_SAMPLES_PER_COMPONENT * k, INIT_MIN_SAMPLES)
        sample = data.subsample(m, generator)  # collective: the same rows of the union on every rank
        if init == "kmeans++":
            centers = kmeans_plusplus(sample, k, generator)
            centers = lloyd(sample, centers, LLOYD_STEPS, data.chunk_size)
        else:
            pick = torch.randperm(sample.shape[0], generator=generator)[:k].to(dev)
            centers = sample[pick].clone()
        means = broadcast_(centers.contiguous()).to(torch.float64)

    # one pass of hard assignment gives the missing weights and variances (and refines k-means centres)
    counts = torch.zeros(k, dtype=torch.float64, device=dev)
    sums = torch.zeros(k, 2 * d, dtype=torch.float64, device=dev)
    centers = means.to(data.dtype)
    for xx in data.chunks():
        labels = nearest(xx[:, :d], centers, data.chunk_size)
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
