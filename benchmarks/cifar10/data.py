"""CIFAR-10 from the project's .npz files: a seeded stratified 45,000/5,000 split and tensor augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from featurefail.ood import NpzImages


def cifar10_splits(data_dir: str | Path, seed: int = 0):
    """``(x_train, y_train), (x_val, y_val), (x_test, y_test)`` as float [0, 1] tensors ``(N, 3, 32, 32)``.

    The training file is sorted by class, so the 45,000/5,000 split is a seeded stratified permutation.
    """
    data_dir = Path(data_dir)
    train = NpzImages(data_dir / "cifar10_train.npz")
    test = NpzImages(data_dir / "cifar10_test.npz")
    idx = np.arange(len(train))
    tr, va = train_test_split(idx, test_size=5000, stratify=train.labels.numpy(), random_state=seed)
    tr, va = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(va))
    return (train.images[tr], train.labels[tr]), (train.images[va], train.labels[va]), (test.images, test.labels)


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
