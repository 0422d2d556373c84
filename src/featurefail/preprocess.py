"""Feature preprocessing for density scorers, fitted on training features only (no labels).

Each transform is an ``nn.Module`` whose state lives in buffers, so it saves with the detector, runs inside
``as_module()`` and is differentiable (purification goes through it). Under ``torch.distributed`` the
statistics (means, deviations, the PCA covariance) are those of the union of all ranks' rows.

* ``"standardize"``: ``(f − μ) / σ`` per dimension.
* ``"pca"`` / ``"pca:0.99"``: PCA whitening keeping the leading components that explain that fraction of the
  variance (default 0.99): ``diag(λ)^{-½} Vᵀ (f − μ)``.
* ``"l2"``: ``f / ‖f‖₂``.
* ``"tanh"``: ``tanh((f − μ) / σ)``, a bounded squashing like the paper's tanh feature layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .distributed import all_reduce_sum, is_distributed

__all__ = ["FeatureTransform", "floored_std", "make_transform", "observe_fits"]

_fit_observers: list[Callable[[FeatureTransform, torch.Tensor], None]] = []


@contextmanager
def observe_fits() -> Iterator[list[torch.Tensor]]:
    """Record every ``(N, D)`` tensor a :class:`FeatureTransform` is fitted on inside the block.

    The evaluation runner uses it to assert that preprocessing was fitted on the training features only.
    """
    seen: list[torch.Tensor] = []
    observer = lambda transform, feats: seen.append(feats)  # noqa: E731
    _fit_observers.append(observer)
    try:
        yield seen
    finally:
        _fit_observers.remove(observer)


def floored_std(std: torch.Tensor) -> torch.Tensor:
    """``(D,)`` standard deviations floored at ``1e-6 ×`` the largest, so constant dimensions (dead units) divide
    by a small positive number instead of zero."""
    return std.clamp_min(1e-6 * float(std.max().clamp_min(1e-12)))


class FeatureTransform(nn.Module):
    """``fit(feats)`` on ``(N, D)`` training features, then ``forward(feats) -> (N, D')``."""

    spec: str = ""

    def fit(self, feats: torch.Tensor) -> FeatureTransform:
        """Fit on ``(N, D)`` training features (labels are never used)."""
        for observer in list(_fit_observers):
            observer(self, feats)
        return self._fit(feats)

    def _fit(self, feats: torch.Tensor) -> FeatureTransform:
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    def load(self, state: dict[str, Any]) -> FeatureTransform:
        for key, value in state.items():
            self.register_buffer(key, torch.as_tensor(value))
        return self


class _Standardize(FeatureTransform):
    def __init__(self, squash: bool = False) -> None:
        super().__init__()
        self.squash = squash
        self.spec = "tanh" if squash else "standardize"

    def _fit(self, feats: torch.Tensor) -> FeatureTransform:
        f = feats.double()
        mean, std = _distributed_moments(f) if is_distributed() else (f.mean(0), f.std(0))
        self.register_buffer("mean", mean)
        self.register_buffer("scale", 1.0 / floored_std(std))
        return self

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        z = (feats.double() - self.mean) * self.scale
        return (torch.tanh(z) if self.squash else z).to(feats.dtype)


class _PCAWhiten(FeatureTransform):
    def __init__(self, kept: float = 0.99) -> None:
        super().__init__()
        if not 0.0 < kept <= 1.0:
            raise ValueError(f"the kept variance must be in (0, 1], got {kept}")
        self.kept = kept
        self.spec = f"pca:{kept:g}"

    def _fit(self, feats: torch.Tensor) -> FeatureTransform:
        f = feats.double()
        if is_distributed():
            n, mean = _distributed_mean(f)
            centred = f - mean
            cov = all_reduce_sum(centred.T @ centred) / n
        else:
            mean = f.mean(0)
            centred = f - mean
            cov = centred.T @ centred / f.shape[0]
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0.0), eigvecs.flip(1)
        if not eigvals[0] > 0:
            raise ValueError("the features are constant: PCA whitening has no direction of variance to keep")
        share = torch.cumsum(eigvals, 0) / eigvals.sum().clamp_min(1e-300)
        keep = int(torch.searchsorted(share, torch.tensor(self.kept, dtype=torch.float64)).item()) + 1
        keep = max(1, min(keep, int((eigvals > 1e-12 * eigvals[0]).sum())))
        self.register_buffer("mean", mean)
        self.register_buffer("projection", eigvecs[:, :keep] / eigvals[:keep].sqrt())
        return self

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats.double() - self.mean) @ self.projection).to(feats.dtype)


def _distributed_mean(f: torch.Tensor) -> tuple[int, torch.Tensor]:
    """``(N, mean (D,))`` of the rows of all ranks (float64)."""
    sums = all_reduce_sum(torch.cat([f.new_tensor([f.shape[0]]), f.sum(0)]))
    return int(sums[0].item()), sums[1:] / sums[0]


def _distributed_moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased standard deviation ``(D,)`` of the rows of all ranks, in two passes as ``Tensor.std``."""
    n, mean = _distributed_mean(f)
    squares = all_reduce_sum(((f - mean) ** 2).sum(0))
    return mean, (squares / max(n - 1, 1)).sqrt()


class _L2Normalize(FeatureTransform):
    spec = "l2"

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)


def make_transform(spec: str | None) -> FeatureTransform | None:
    """A fresh (unfitted) transform: ``None``, ``"standardize"``, ``"pca"``, ``"pca:0.95"``, ``"l2"`` or ``"tanh"``."""
    if spec is None or spec == "none":
        return None
    if spec == "standardize":
        return _Standardize()
    if spec == "tanh":
        return _Standardize(squash=True)
    if spec == "l2":
        return _L2Normalize()
    match = re.fullmatch(r"pca(?::(0?\.\d+|1(?:\.0*)?))?", spec)
    if match:
        return _PCAWhiten(float(match.group(1)) if match.group(1) else 0.99)
    raise ValueError(f"unknown preprocessing {spec!r}; use None, 'standardize', 'pca[:kept]', 'l2' or 'tanh'")
