"""CIFAR-10 from the project's ``.npz`` files, a seeded stratified 45,000/5,000 split, and on-device augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split


def load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 (N, 3, H, W), labels int64 (N,))`` from an ``.npz`` with ``x`` (N, H, W, C) and ``y``."""
    with np.load(path, allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or y.shape != (len(x),):
        raise ValueError(f"{path}: expected uint8 x (N, H, W, C) and y (N,), got {x.dtype} {x.shape}, {y.shape}")
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype(np.int64))


def cifar10_splits(data_dir: str | Path, seed: int = 0):
    """``(x_train, y_train), (x_val, y_val), (x_test, y_test)``, images uint8 ``(N, 3, 32, 32)``.

    The training file is sorted by class, so the 45,000/5,000 split is a seeded stratified permutation (the
    same split as ``benchmarks/cifar10/data.py`` for ``seed=0``). The test set is untouched.
    """
    data_dir = Path(data_dir)
    x, y = load_npz(data_dir / "cifar10_train.npz")
    x_test, y_test = load_npz(data_dir / "cifar10_test.npz")
    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=5000, stratify=y.numpy(), random_state=seed)
    tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
    return (x[tr], y[tr]), (x[va], y[va]), (x_test, y_test)


def translate_and_flip(x: torch.Tensor, flip: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (reflect padding), then a horizontal flip where ``flip``.

    ``x``: ``(N, C, H, W)`` float on any device; ``flip``: bool ``(N,)``; the random offsets come from
    ``generator`` (CPU) so a run is reproducible on every device.
    """
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None]  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)[None]  # (N, W)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one random ``size``×``size`` square per image (DeVries & Taylor, 2017), clipped at the borders;
    ``x``: ``(N, C, H, W)``, changed in place and returned."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=generator).to(x.device)
    cx = torch.randint(0, w, (n,), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device)[None]
    cols = torch.arange(w, device=x.device)[None]
    inside_rows = (rows >= cy[:, None] - size // 2) & (rows < cy[:, None] - size // 2 + size)  # (N, H)
    inside_cols = (cols >= cx[:, None] - size // 2) & (cols < cx[:, None] - size // 2 + size)  # (N, W)
    mask = inside_rows[:, :, None] & inside_cols[:, None, :]  # (N, H, W)
    return x.masked_fill_(mask[:, None], 0.0)


def affine_warp(x: torch.Tensor, angle: torch.Tensor, shear: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image of ``x`` ``(N, C, H, W)`` rotated by ``angle`` (radians, ``(N,)``), sheared by ``shear`` ``(N,)``
    and shifted by ``shift`` pixels ``(N, 2)`` (x, y) about its centre; bilinear, zero outside the image."""
    h, w = x.shape[-2:]
    cos, sin = angle.cos(), angle.sin()
    to_grid = 2 / torch.tensor([w, h], device=x.device, dtype=x.dtype)  # pixels → affine_grid's [-1, 1] units
    offset = -shift * to_grid  # the grid holds, for every output pixel, where to read the input
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear * cos, offset[:, 0]], 1),
            torch.stack([sin, cos + shear * sin, offset[:, 1]], 1),
        ],
        1,
    )  # (N, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


COLOUR_OPERATIONS = ("identity", "brightness", "contrast", "saturation", "solarize", "posterize")


def colour_operations(
    x: torch.Tensor, factor: torch.Tensor, threshold: torch.Tensor, bits: torch.Tensor
) -> torch.Tensor:
    """Every ``COLOUR_OPERATIONS`` entry applied to every image, as Pillow's ``ImageEnhance`` and ``ImageOps`` do on
    uint8 images (brightness, contrast and saturation by ``factor``, solarize above ``threshold``, posterize to
    ``bits`` bits), unclipped: ``x`` ``(N, 3, H, W)`` in [0, 1], ``factor``, ``threshold`` and ``bits`` ``(N,)`` →
    ``(6, N, 3, H, W)``."""
    factor, threshold = factor.view(-1, 1, 1, 1), threshold.view(-1, 1, 1, 1)
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    mean = grey.mean((2, 3), keepdim=True)
    step = (2 ** (8 - bits)).view(-1, 1, 1, 1).to(x.dtype)
    return torch.stack(
        [
            x,
            x * factor,
            mean + factor * (x - mean),
            grey + factor * (x - grey),
            torch.where(x >= threshold, 1 - x, x),
            torch.floor(x * 255 / step + 1e-4) * step / 255,
        ]
    )


def strong_augment(x: torch.Tensor, generator: torch.Generator, cutout_size: int = 16) -> torch.Tensor:
    """FixMatch's strong view (Sohn et al., NeurIPS 2020), RandAugment-style with random magnitudes, batched:
    every image gets one random affine map (rotation ±30°, shear ±0.3, shift ±4 px; each with probability 1/2,
    zero outside) and two ``colour_operations`` drawn uniformly (factors uniform in [0.05, 1.95], solarize
    threshold in [0, 1], posterize to 4–8 bits), then one ``cutout_size`` cutout. ``x``: float ``(N, 3, H, W)`` in
    [0, 1]; returns a new tensor in [0, 1]."""
    n = len(x)
    dev = x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, generator=generator)).to(dev)

    def chance() -> torch.Tensor:
        return (torch.rand(n, generator=generator) < 0.5).to(dev)

    angle = uniform(-30, 30).deg2rad() * chance()
    shear = uniform(-0.3, 0.3) * chance()
    shift = torch.stack([uniform(-4, 4), uniform(-4, 4)], 1) * chance()[:, None]
    out = affine_warp(x, angle, shear, shift)
    for _ in range(2):
        op = torch.randint(0, len(COLOUR_OPERATIONS), (n,), generator=generator).to(dev)
        bits = torch.randint(4, 9, (n,), generator=generator).to(dev)
        choices = colour_operations(out, uniform(0.05, 1.95), uniform(0, 1), bits)
        out = choices[op, torch.arange(n, device=dev)].clamp(0, 1)
    return cutout(out, cutout_size, generator)
