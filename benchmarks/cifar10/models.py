"""Reference CIFAR-10 classifiers for the reproduction, with per-channel standardisation inside the model.

* ``ResNet20`` (He et al., 2016): 3 stages × 3 basic blocks, widths 16/32/64; ReLU features (64-d).
* ``DenseNetBC`` (Huang et al., 2017): bottleneck + compression 0.5, growth ``k``; as in the paper the feature
  layer ends in **tanh** (bounded features).
* ``WideResNet`` (Zagoruyko & Komodakis, 2016): WRN-28-10 for a GPU, with dropout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference_models"))
from architectures import Standardize


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = dropout
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.dropout(out, self.dropout, self.training)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, n_classes: int = 10, width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.standardize = Standardize()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for w, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            for i in range(3):
                layers.append(BasicBlock(c, w, stride if i == 0 else 1, dropout))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(self.standardize(x)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class WideResNet(ResNet20):
    """WRN-depth-k: (depth − 4) / 6 pre-activation-free basic blocks per stage, widths 16k/32k/64k."""

    def __init__(self, depth: int = 28, k: int = 10, n_classes: int = 10, dropout: float = 0.3) -> None:
        super().__init__(n_classes)
        n = (depth - 4) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, c = [], 16
        for w, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
            for i in range(n):
                layers.append(BasicBlock(c, w, stride if i == 0 else 1, dropout))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, n_classes)


class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        return torch.cat([x, F.dropout(h, self.dropout, self.training)], dim=1)


class DenseNetBC(nn.Module):
    """DenseNet-BC-depth-k; the feature layer (after the last BatchNorm) is ``tanh``, as in the paper."""

    def __init__(self, depth: int = 100, growth: int = 12, n_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        n = (depth - 4) // 6
        c = 2 * growth
        self.standardize = Standardize()
        blocks: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
        for stage in range(3):
            for _ in range(n):
                blocks.append(_DenseLayer(c, growth, dropout))
                c += growth
            if stage < 2:
                out = c // 2
                blocks += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False), nn.AvgPool2d(2)]
                c = out
        blocks.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.features(self.standardize(x)), 1).flatten(1)
        return self.fc(torch.tanh(h))


ARCHS = {
    # name: (constructor, CPU configuration, GPU configuration)
    "resnet20": (ResNet20, dict(), dict()),
    "densenet": (DenseNetBC, dict(depth=40, growth=12, dropout=0.0), dict(depth=100, growth=12, dropout=0.2)),
    "wrn": (WideResNet, dict(depth=16, k=2, dropout=0.0), dict(depth=28, k=10, dropout=0.3)),
}


def make_model(arch: str = "resnet20", config: str = "cpu") -> nn.Module:
    """A reference architecture in its ``"cpu"`` (trains in about an hour on 2 cores) or ``"gpu"`` size."""
    cls, cpu, gpu = ARCHS[arch]
    return cls(**(cpu if config == "cpu" else gpu))
