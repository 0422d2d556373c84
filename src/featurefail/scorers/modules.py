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

from ..gmm import rescored_log_prob

__all__ = ["BlockSumScoreModule", "GMMScoreModule", "LogitScoreModule", "TransformedScoreModule"]


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
        x = feats.float()
        finite = torch.isfinite(x).all(dim=1)
        x = torch.where(finite[:, None], x, torch.zeros_like(x))
        lp = rescored_log_prob(
            x, self.coef, self.bias, self.center, self.means64, self.precisions64, self.exact_bias64, self.top
        )
        score = torch.logsumexp(lp, dim=1) * self.scale
        return torch.where(finite, score, torch.full_like(score, -math.inf)).float()


class TransformedScoreModule(nn.Module):
    """``score(transform(feats), logits)``: a fitted feature transform in front of a score module."""

    def __init__(self, transform: nn.Module, score: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.score = score

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        finite = torch.isfinite(feats).all(dim=1)
        safe = torch.where(finite[:, None], feats, torch.zeros_like(feats))
        out = self.score(self.transform(safe), logits)
        return torch.where(finite, out, torch.full_like(out, -math.inf))


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
