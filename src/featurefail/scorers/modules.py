"""Scoring as ``nn.Module(feats, logits) -> (N,)``: what ``Scorer.as_module()`` returns.

Buffers hold the fitted state, so a module saves with ``state_dict``, moves with ``.to(device)``, runs under
``torch.jit.trace``/``torch.export``/``torch.compile``, and is differentiable in ``feats`` (purification).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._tensor import full_precision_matmul, mask_nonfinite, zero_nonfinite_rows
from ..gmm import rescored_log_prob

__all__ = [
    "BlockSumScoreModule",
    "GMMScoreModule",
    "HeadEnergyScoreModule",
    "KNNScoreModule",
    "LogitScoreModule",
    "RelativeMahalanobisScoreModule",
    "StackedGMMScoreModule",
    "TransformedScoreModule",
    "ViMScoreModule",
    "kth_neighbour_distance",
]


class GMMScoreModule(nn.Module):
    """``log p(F)`` under a fitted :class:`~featurefail.DiagonalGMM` as buffers: ``(N, D) -> (N,)``.

    The same computation as ``DiagonalGMM.score_samples`` (:func:`~featurefail.gmm.rescored_log_prob`: a float32
    product picks each row's dominant components, which are recomputed exactly in float64, so a TF32 setting
    cannot spoil the result). Non-finite rows score ``-inf``. With ``bpd=True`` returns ``log p(F) / (D ln 2)``
    (i.e. ``-BPD``).
    """

    def __init__(self, gmm: Any, bpd: bool = False, top: int = 4) -> None:
        super().__init__()
        for name, value in gmm.scoring_parameters().items():
            self.register_buffer(name, value.detach().cpu().clone())
        self.top = min(top, gmm.n_components)
        self.scale = 1.0 / (gmm.n_features_in_ * math.log(2.0)) if bpd else 1.0

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        _, x = zero_nonfinite_rows(feats.float())
        lp = rescored_log_prob(
            x, self.coef, self.bias, self.center, self.means64, self.precisions64, self.exact_bias64, self.top
        )
        return mask_nonfinite(torch.logsumexp(lp, dim=1) * self.scale, feats).float()


class StackedGMMScoreModule(nn.Module):
    """``Σ_l scale_l · log p_l(g(F_l))``: the diagonal mixtures of ``L`` consecutive feature blocks, fused.

    The score of :class:`BlockSumScoreModule` over :class:`GMMScoreModule` parts (each behind an optional per-block
    L2 normalisation ``g``), computed with a fixed, small number of kernels whatever ``L`` (what a GPU forward
    pays for, one launch each), ``(N, D_1 + … + D_L) -> (N,)`` float32:

    1. one product ``[x, x²] @ W + b`` of the centred rows against the block-diagonal stack of every mixture's
       linear form (``W (2D, L·K)``) gives all ``L·K`` log-densities;
    2. each block's ``top`` largest entries, which carry its log-likelihood, are recomputed in the direct form
       ``b_k − ½ Σ_d (x_d − μ_kd)² / σ²_kd`` from one gathered table ``[μ, 1/σ², b] (L·K, 2D + 1)`` (zero outside
       the component's block), then one ``logsumexp`` per block.

    The product and the ``logsumexp`` run in float32; the product form loses precision as ``x²/σ²`` grows
    (cancellation), which is why the dominant entries are recomputed. That recomputation stays in float64 (one
    cast of ``x`` and one of the result, the table gathered in float64): in float32, rounding ``x − μ`` alone
    costs ``~|μ|·2⁻²⁴/σ`` per dimension, 1e-4 nat on clusters 400σ from the data mean
    (``tests/test_fused_head.py``), against the float32 rounding of the score itself with float64. On a GPU
    the cost is kernels, not their dtype: float64 here is two extra launches, not a ``(N, K)`` float64 pass.
    Mixtures whose scale is unsafe in float32 (their ``scoring_parameters`` come in float64) are not stacked;
    use :class:`GMMScoreModule`. Non-finite rows score ``-inf``; differentiable in ``feats``.

    Args:
        gmms: fitted :class:`~featurefail.DiagonalGMM` per block, all with the same ``n_components`` and float32
            scoring parameters.
        l2: whether each block is L2-normalised before its mixture (``preprocess="l2"``).
        bpd: score ``-BPD`` (each block's log-likelihood divided by ``D_l ln 2``) instead of the log-likelihood.
        top: entries per row and block recomputed in the direct form.
    """

    def __init__(self, gmms: list[Any], l2: bool = False, bpd: bool = False, top: int = 4) -> None:
        super().__init__()
        if not gmms:
            raise ValueError("StackedGMMScoreModule needs at least one mixture")
        k = gmms[0].n_components
        if any(g.n_components != k for g in gmms):
            raise ValueError(f"every block's mixture needs the same n_components, got {[g.n_components for g in gmms]}")
        params = [g.scoring_parameters() for g in gmms]
        if any(p["coef"].dtype != torch.float32 for p in params):
            raise ValueError("a mixture scores in float64 (its scale leaves float32's range); use GMMScoreModule")
        widths = [int(g.n_features_in_) for g in gmms]
        d, n_blocks = sum(widths), len(gmms)
        weight = torch.zeros(2 * d, n_blocks * k, dtype=torch.float64)
        table = torch.zeros(n_blocks * k, 2 * d + 1, dtype=torch.float64)
        start = 0
        for i, (p, w) in enumerate(zip(params, widths, strict=True)):
            cols, block = slice(i * k, (i + 1) * k), slice(start, start + w)
            coef = p["coef"].detach().cpu().double()
            weight[block, cols] = coef[:, :w].T
            weight[d + start : d + start + w, cols] = coef[:, w:].T
            table[cols, block] = p["means64"].detach().cpu().double()
            table[cols, d + start : d + start + w] = p["precisions64"].detach().cpu().double()
            table[cols, 2 * d] = p["exact_bias64"].detach().cpu().double()
            start += w
        center = torch.cat([p["center"].detach().cpu().double() for p in params])
        self.register_buffer("center", center.float())
        self.register_buffer("center64", center)
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", torch.cat([p["bias"].detach().cpu() for p in params]).float())
        self.register_buffer("table", table)
        self.register_buffer("offsets", torch.arange(n_blocks, dtype=torch.long)[:, None] * k)
        self.register_buffer("block_of_column", torch.repeat_interleave(torch.arange(n_blocks), torch.tensor(widths)))
        scales = [1.0 / (w * math.log(2.0)) if bpd else 1.0 for w in widths]
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))
        self.widths = widths
        self.n_components = k
        self.top = min(top, k)
        self.l2 = bool(l2)
        self.bpd = bool(bpd)

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        x = feats.float()
        finite = torch.isfinite(x).all(dim=1)
        x = torch.where(finite[:, None], x, 0.0)  # scalars, not tensors: no extra kernel launches
        if self.l2:  # as preprocess "l2": f / max(‖f‖, 1e-12), block by block
            norms = torch.stack([b.norm(dim=1) for b in torch.split(x, self.widths, dim=1)], dim=1)
            x = x / norms.clamp_min(1e-12).index_select(1, self.block_of_column)
        n, d, k = x.shape[0], x.shape[1], self.n_components
        xc = x - self.center
        lp = torch.addmm(self.bias, torch.cat([xc, xc * xc], dim=1), self.weight)
        blocks = len(self.widths)  # explicit: a batch of zero rows has no -1 to infer
        index = lp.detach().view(n, blocks, k).topk(self.top, dim=2).indices
        index = (index if blocks == 1 else index + self.offsets).view(n, blocks * self.top)
        rows = self.table[index]  # (n, L·top, 2D + 1) float64
        diff = (x.double() - self.center64)[:, None, :] - rows[..., :d]
        exact = rows[..., 2 * d] - 0.5 * (diff * diff * rows[..., d : 2 * d]).sum(-1)
        lp = lp.scatter(1, index, exact.float())
        per_block = torch.logsumexp(lp.view(n, blocks, k), dim=2)
        if self.bpd:
            per_block = per_block * self.scales
        score = per_block[:, 0] if len(self.widths) == 1 else per_block.sum(1)
        return torch.where(finite, score, -math.inf)


class TransformedScoreModule(nn.Module):
    """``score(transform(feats), logits)``: a fitted feature transform in front of a score module."""

    def __init__(self, transform: nn.Module, score: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.score = score

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        _, safe = zero_nonfinite_rows(feats)
        return mask_nonfinite(self.score(self.transform(safe), logits), feats)


class BlockSumScoreModule(nn.Module):
    """``scale · Σ_l score_l(feats[:, block_l])``: per-layer score modules over consecutive column blocks."""

    def __init__(self, blocks: tuple[int, ...], parts: list[nn.Module], scale: float = 1.0) -> None:
        super().__init__()
        if len(blocks) != len(parts):
            raise ValueError(f"{len(blocks)} blocks but {len(parts)} score modules")
        self.blocks = [int(b) for b in blocks]
        self.parts = nn.ModuleList(parts)
        self.scale = float(scale)

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        total = torch.zeros(feats.shape[0], dtype=torch.float32, device=feats.device)
        for part, block in zip(self.parts, torch.split(feats, self.blocks, dim=1), strict=True):
            total = total + part(block, logits).float()
        return total * self.scale


class LogitScoreModule(nn.Module):
    """A score computed from the logits alone: ``fn(logits) -> (N,)`` (max softmax, max logit, ...)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(logits)


# ---- post-hoc OOD detectors (issue 21): energy through the head, ReAct, ASH, ViM, KNN, relative Mahalanobis -------


def _finite_rows(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(finite (N,), float64 features with non-finite rows zeroed)``: those rows score ``-inf`` afterwards."""
    return zero_nonfinite_rows(feats.double())


def _masked(finite: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, score, torch.full_like(score, -math.inf)).float()


class HeadEnergyScoreModule(nn.Module):
    """``logsumexp(W·g(f) + b)``: the energy score of the classifier head on shaped features, in float64.

    ``shaping="none"``: ``g(f) = f``; ``"clip"`` (ReAct): ``g(f) = min(f, threshold)``; ``"ash"`` (ASH-S):
    ``g(f)`` keeps each row's top ``keep`` activations, zeroes the rest and scales by ``exp(Σf / Σg)``.
    ``(N, D) -> (N,)``; non-finite rows score ``-inf``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        shaping: str = "none",
        threshold: float = math.inf,
        keep: int = 0,
    ) -> None:
        super().__init__()
        if shaping not in ("none", "clip", "ash"):
            raise ValueError(f"shaping must be 'none', 'clip' or 'ash', got {shaping!r}")
        if shaping == "ash" and not 1 <= keep <= weight.shape[1]:
            raise ValueError(f"ASH keeps between 1 and {weight.shape[1]} activations per row, got {keep}")
        self.register_buffer("weight", weight.detach().double().cpu().clone())
        self.register_buffer("bias", bias.detach().double().cpu().clone())
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64))
        self.shaping = shaping
        self.keep = int(keep)

    def shape(self, f: torch.Tensor) -> torch.Tensor:
        """``g(f)``: ``(N, D) -> (N, D)`` float64."""
        if self.shaping == "clip":
            return torch.minimum(f, self.threshold)
        if self.shaping == "ash":
            top, index = f.topk(self.keep, dim=1)
            pruned = torch.zeros_like(f).scatter(1, index, top)
            before, after = f.sum(1), top.sum(1)
            ratio = torch.where(after > 0, before / after.where(after > 0, torch.ones_like(after)), 1.0)
            return pruned * torch.exp(ratio)[:, None]
        return f

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        finite, f = _finite_rows(feats)
        z = self.shape(f) @ self.weight.T + self.bias
        return _masked(finite, torch.logsumexp(z, dim=1))


class ViMScoreModule(nn.Module):
    """ViM: ``logsumexp(W f + b) − α ‖(f − u) R‖`` with ``R (D, D − dim)`` the residual directions; float64.

    ``(N, D) -> (N,)``; non-finite rows score ``-inf``.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, origin: torch.Tensor, residual: torch.Tensor, alpha: float
    ) -> None:
        super().__init__()
        for name, value in (("weight", weight), ("bias", bias), ("origin", origin), ("residual", residual)):
            self.register_buffer(name, value.detach().double().cpu().clone())
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float64))

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        finite, f = _finite_rows(feats)
        energy = torch.logsumexp(f @ self.weight.T + self.bias, dim=1)
        residual = torch.linalg.vector_norm((f - self.origin) @ self.residual, dim=1)
        return _masked(finite, energy - self.alpha * residual)


def kth_neighbour_distance(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int = 4096) -> torch.Tensor:
    """Euclidean distance from each query to its ``k``-th nearest row of ``bank``, exact; ``(Q,)`` float64.

    Both inputs are expected L2-normalised (``(Q, D)`` and ``(N, D)``, on one device). Candidates are found by
    chunked float32 products ``q·b`` at full precision (no TF32; memory ``O(chunk_size² + Q·m)``, never
    ``Q × N``) with a running top-``m``, ``m = k + max(8, k/4)``; their distances are recomputed as ``‖q − b‖``
    in float64. A row is **certified** when the ``m``-th candidate's product, plus the float32 error bound
    ``D·2⁻²³ + 10⁻⁶``, is still below the product any row closer than the ``k``-th candidate would need; the
    rare rows that are not (near-ties at float32 resolution) are searched again exhaustively in float64.
    """
    n, d = bank.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the bank size {n}")
    m = min(n, k + max(8, k // 4))
    tol = d * 2.0**-23 + 1e-6
    bank32 = bank.float()
    out = []
    for q in torch.split(queries, chunk_size):
        q32, q64 = q.float(), q.double()
        best_sim = torch.empty(len(q), 0, dtype=torch.float32, device=q.device)
        best_idx = torch.empty(len(q), 0, dtype=torch.long, device=q.device)
        with full_precision_matmul():
            for start in range(0, n, chunk_size):
                sims = q32 @ bank32[start : start + chunk_size].T
                sim, idx = sims.topk(min(m, sims.shape[1]), dim=1)
                sim, idx = torch.cat([best_sim, sim], 1), torch.cat([best_idx, idx + start], 1)
                best_sim, pos = sim.topk(min(m, sim.shape[1]), dim=1)
                best_idx = idx.gather(1, pos)
        rows = max(1, 2**23 // max(1, m * d))  # float64 candidates of at most 64 MiB at a time
        kth = torch.cat(
            [
                torch.linalg.vector_norm(q64[i : i + rows, None, :] - bank[best_idx[i : i + rows]].double(), dim=2)
                .topk(k, dim=1, largest=False)
                .values[:, -1]
                for i in range(0, len(q), rows)
            ]
        )
        if m < n:  # a closer non-candidate b would need q·b > (‖q‖² + ‖b‖² − d_k²) / 2
            needed = (q64.square().sum(1) + 1.0 - kth.square()) / 2
            unsure = torch.nonzero(best_sim[:, -1].double() + tol >= needed).flatten()
            if len(unsure):
                kth[unsure] = _exhaustive_kth(q64[unsure], bank, k, chunk_size)
        out.append(kth)
    if not out:
        return torch.empty(0, dtype=torch.float64, device=queries.device)
    return torch.cat(out)


def _exhaustive_kth(q64: torch.Tensor, bank: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    best = torch.empty(len(q64), 0, dtype=torch.float64, device=q64.device)
    for start in range(0, bank.shape[0], chunk_size):
        dist = torch.cdist(q64, bank[start : start + chunk_size].double(), compute_mode="donot_use_mm_for_euclid_dist")
        best = torch.cat([best, dist], 1).topk(min(k, best.shape[1] + dist.shape[1]), dim=1, largest=False).values
    return best[:, -1]


class KNNScoreModule(nn.Module):
    """Deep nearest neighbours: ``−‖f/‖f‖ − b_(k)‖``, the negated distance of the L2-normalised features to
    their ``k``-th nearest row of the normalised training bank (a buffer). ``(N, D) -> (N,)``; non-finite rows
    score ``-inf``. Exact, chunked (see :func:`kth_neighbour_distance`); not differentiable in ``feats``.
    """

    def __init__(self, bank: torch.Tensor, k: int, chunk_size: int = 4096) -> None:
        super().__init__()
        if not 1 <= k <= bank.shape[0]:
            raise ValueError(f"k={k} must be between 1 and the bank size {bank.shape[0]}")
        self.register_buffer("bank", bank.detach().float().clone())
        self.k = int(k)
        self.chunk_size = int(chunk_size)

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        finite, f = _finite_rows(feats.to(self.bank.device))
        queries = torch.nn.functional.normalize(f, dim=1)
        with torch.no_grad():
            dist = kth_neighbour_distance(queries, self.bank, self.k, self.chunk_size)
        return _masked(finite, -dist)


def _squared_distances(f: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    fp = f @ precision
    mean_terms = ((means @ precision) * means).sum(1)
    return ((fp * f).sum(1, keepdim=True) - 2.0 * fp @ means.T + mean_terms).clamp_min(0.0)


class RelativeMahalanobisScoreModule(nn.Module):
    """Relative Mahalanobis: ``d²_0(f) − min_c d²_c(f)`` (class Gaussians with a tied precision, one background
    Gaussian), float64 buffers. ``(N, D) -> (N,)``, differentiable in ``feats``; non-finite rows score ``-inf``.
    """

    def __init__(
        self,
        means: torch.Tensor,
        precision: torch.Tensor,
        background_mean: torch.Tensor,
        background_precision: torch.Tensor,
    ) -> None:
        super().__init__()
        self.register_buffer("means", means.detach().double().cpu().clone())
        self.register_buffer("precision", precision.detach().double().cpu().clone())
        self.register_buffer("background_mean", background_mean.detach().double().cpu().reshape(1, -1).clone())
        self.register_buffer("background_precision", background_precision.detach().double().cpu().clone())

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        finite, f = _finite_rows(feats)
        d2 = _squared_distances(f, self.means, self.precision).min(dim=1).values
        d0 = _squared_distances(f, self.background_mean, self.background_precision)[:, 0]
        return _masked(finite, d0 - d2)
