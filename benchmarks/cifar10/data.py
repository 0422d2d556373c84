"""CIFAR-10 from the project's .npz files: a seeded stratified 45,000/5,000 split and tensor augmentation."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference_models"))
from cifar_data import cifar10_splits as uint8_cifar10_splits


def cifar10_splits(data_dir: str | Path, seed: int = 0):
    """``(x_train, y_train), (x_val, y_val), (x_test, y_test)`` as float [0, 1] tensors ``(N, 3, 32, 32)``: the
    seeded stratified 45,000/5,000 split of ``reference_models/cifar_data.py``, scaled."""
    return tuple((x.float() / 255, y) for x, y in uint8_cifar10_splits(data_dir, seed))


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero padding) and random horizontal flips."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift))
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(32)[None]).long()
    cols = (dx[:, None] + torch.arange(32)[None]).long()
    out = padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(3)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
