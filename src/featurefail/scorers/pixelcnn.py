"""A small gated PixelCNN on the inputs (model-agnostic baseline), scored by −bits per dimension."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import NotFittedError
from ..features import Features
from ._training import load_network, network_state, resolve_device, train_density
from .base import Scorer, register_scorer

__all__ = ["GatedPixelCNN", "PixelCNNScorer"]


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only pixels above, and to the left on the same row (``"A"``: not the centre)."""

    def __init__(self, mask_type: str, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__(c_in, c_out, kernel, padding=kernel // 2)
        mask = torch.ones_like(self.weight)
        centre = kernel // 2
        mask[:, :, centre, centre + (mask_type == "B") :] = 0
        mask[:, :, centre + 1 :] = 0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class GatedBlock(nn.Module):
    """``x + W₁ₓ₁ (tanh(a) ⊙ σ(b))`` with ``[a, b]`` from a masked ``"B"`` convolution (van den Oord et al., 2016)."""

    def __init__(self, channels: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = MaskedConv2d("B", channels, 2 * channels, kernel)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return x + self.out(torch.tanh(a) * torch.sigmoid(b))


class GatedPixelCNN(nn.Module):
    """``p(x) = Π_i Π_c p(x_{i,c} | x_{<i})``: a 256-way softmax per channel of every pixel given the pixels
    before it in raster order (channels of one pixel are conditionally independent, a simplification of the
    R→G→B ordering that keeps the density exact)."""

    def __init__(self, channels: int, hidden: int = 32, blocks: int = 4, levels: int = 256) -> None:
        super().__init__()
        self.levels = levels
        self.channels = channels
        self.inp = MaskedConv2d("A", channels, hidden, 7)
        self.blocks = nn.Sequential(*[GatedBlock(hidden) for _ in range(blocks)])
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels * levels, 1)
        )

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats per image of ``x (N, C, H, W)`` in [0, 1]: ``(N,)``."""
        target = (x * (self.levels - 1)).round().clamp(0, self.levels - 1).long()
        h = self.blocks(self.inp(target.float() / (self.levels - 1) * 2 - 1))
        logits = self.head(h).view(x.shape[0], self.levels, self.channels, *x.shape[2:])
        return F.cross_entropy(logits, target, reduction="none").flatten(1).sum(1)


@register_scorer("pixelcnn")
class PixelCNNScorer(Scorer):
    """``score = −BPD(x) = −NLL(x) / (C·H·W·ln 2)`` under a gated PixelCNN trained on the training **inputs**.

    Model-agnostic: it never looks at the classifier. Inputs must lie in [0, 1] (they are quantised to 256
    levels). The defaults train in minutes on a CPU at 28×28 or 32×32; raise ``hidden``, ``blocks`` and
    ``epochs`` on a GPU. ``max_train`` fits on a seeded random subset of that many training inputs (large sets
    on a CPU); ``n_train_`` records how many were used.

    Papers: van den Oord et al., "Conditional image generation with PixelCNN decoders", NeurIPS 2016; used as a
    baseline in the featurefail paper (PixelCNN++ there).
    """

    requires_inputs = True

    def __init__(
        self,
        hidden: int = 32,
        blocks: int = 4,
        epochs: int = 10,
        lr: float = 1e-3,
        batch_size: int = 64,
        seed: int = 0,
        device: str | None = None,
        progress: bool = False,
        max_train: int | None = None,
    ) -> None:
        if max_train is not None and max_train < 1:
            raise ValueError(f"max_train must be a positive number of inputs or None, got {max_train}")
        self.hidden, self.blocks, self.epochs, self.lr = hidden, blocks, epochs, lr
        self.batch_size, self.seed, self.device, self.progress = batch_size, seed, device, progress
        self.max_train = max_train

    @staticmethod
    def _inputs(features: Features) -> torch.Tensor:
        x = features.inputs
        if x is None:
            raise ValueError("PixelCNNScorer needs the inputs (features.inputs); FailureDetector keeps them for it")
        if x.ndim != 4:
            raise ValueError(f"PixelCNNScorer needs image inputs (N, C, H, W), got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("the inputs hold NaN or infinite values")
        if x.min() < -1e-6 or x.max() > 1 + 1e-6:
            raise ValueError("PixelCNNScorer needs inputs in [0, 1] (normalisation belongs inside the model)")
        return x

    def fit(self, features: Features) -> PixelCNNScorer:
        x = self._inputs(features)
        if self.max_train is not None and len(x) > self.max_train:
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))[: self.max_train]
            x = x[keep]
        self.n_train_ = len(x)
        dev = resolve_device(self.device)
        torch.manual_seed(self.seed)
        self.model_ = GatedPixelCNN(x.shape[1], self.hidden, self.blocks)
        self.shape_ = tuple(x.shape[1:])
        self.loss_history_ = train_density(
            self.model_,
            x,
            self.model_.nll,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            device=dev,
            desc="PixelCNN",
            show_progress=self.progress,
        )
        return self

    def score(self, features: Features) -> torch.Tensor:
        if not hasattr(self, "model_"):
            raise NotFittedError("PixelCNNScorer is not fitted")
        x = features.inputs
        if x is None:
            raise ValueError("PixelCNNScorer needs the inputs (features.inputs)")
        if tuple(x.shape[1:]) != self.shape_:
            raise ValueError(f"inputs have shape {tuple(x.shape[1:])}, the PixelCNN was trained on {self.shape_}")
        dev = next(self.model_.parameters()).device
        dims = math.prod(self.shape_)
        out = []
        with torch.no_grad():
            for chunk in torch.split(x.clamp(0, 1), 256):
                out.append(-self.model_.nll(chunk.to(dev)).double().cpu() / (dims * math.log(2.0)))
        return torch.cat(out).float()

    def state_dict(self) -> dict[str, Any]:
        return network_state(self.model_, {"shape": torch.tensor(self.shape_)})

    def load_state_dict(self, state: dict[str, Any]) -> PixelCNNScorer:
        self.shape_ = tuple(int(v) for v in torch.as_tensor(state["shape"]).tolist())
        self.model_ = GatedPixelCNN(self.shape_[0], self.hidden, self.blocks)
        load_network(self.model_, state, self.device)
        return self
