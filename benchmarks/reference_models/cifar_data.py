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
