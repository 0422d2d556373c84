"""Out-of-distribution input sources: noise matched to the training data, and images from .npz files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NpzImages", "gaussian_noise", "uniform_noise"]


def gaussian_noise(reference: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images of Gaussian noise with the per-channel mean and std of ``reference``, clipped to [0, 1].

    Args:
        reference: ``(N, C, H, W)`` (or ``(N, ...)``) in-distribution inputs in [0, 1].
        n: number of samples.

    Returns:
        ``(n, *reference.shape[1:])`` float32 tensor.
    """
    ref = reference.float()
    dims = [0, *range(2, ref.ndim)] if ref.ndim > 2 else [0]
    mean = ref.mean(dim=dims, keepdim=True)[0]
    std = ref.std(dim=dims, keepdim=True)[0]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *ref.shape[1:]), generator=g) * std + mean
    return noise.clamp_(0.0, 1.0)


def uniform_noise(shape: tuple[int, ...], n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images of uniform noise in [0, 1] with per-sample shape ``shape``: ``(n, *shape)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g)


class NpzImages:
    """uint8 images ``x (N, H, W, C)`` (and optional labels ``y``) from an ``.npz`` file, as float [0, 1] tensors.

    Loaded without pickle. ``size`` resizes (bilinear, antialiased) to ``size × size``; ``channels`` converts
    grey to colour by repetition (1 → 3) or colour to grey by the mean (3 → 1).

    Args:
        path: the ``.npz`` file.
        size: output height and width, or None to keep.
        channels: output channels, or None to keep.
        limit: keep only the first ``limit`` images.

    Attributes:
        images: ``(N, C, H, W)`` float32 in [0, 1].
        labels: ``(N,)`` int64 or None.
    """

    def __init__(
        self, path: str | Path, size: int | None = None, channels: int | None = None, limit: int | None = None
    ) -> None:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data:
                raise ValueError(f"{path} has no array 'x' (found {sorted(data.files)})")
            x = data["x"][:limit]
            y = data["y"][:limit] if "y" in data else None
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"{path}: x must be (N, H, W, C) or (N, H, W), got shape {x.shape}")
        images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
        if x.dtype == np.uint8:
            images /= 255.0
        self.images = to_format(images, size=size, channels=channels)
        self.labels = torch.from_numpy(y.astype(np.int64)) if y is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: Any) -> Any:
        return self.images[i] if self.labels is None else (self.images[i], self.labels[i])


def to_format(images: torch.Tensor, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` images to ``size × size`` and repeat/average channels to ``channels``."""
    if channels is not None and channels != images.shape[1]:
        if images.shape[1] == 1:
            images = images.repeat(1, channels, 1, 1)
        elif channels == 1:
            images = images.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")
    if size is not None and images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp_(0.0, 1.0)
