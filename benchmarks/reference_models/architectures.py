"""Fast CIFAR-10 reference classifiers, trainable on a 2-core CPU in 90 minutes (about 90–91% test; see
benchmarks/README.md).

Two families (VGG and ResNet; the whitened ResNet-9 borrows the VGG's stem), three architectures, all with
per-channel standardisation inside the model (they take images in [0, 1]):

* ``WhitenedVGG`` — a small wide VGG-style net after the "airbench" speed-run line of work (Jordan, 2024,
  *94% on CIFAR-10 in 3.29 seconds on a single GPU*): a frozen 2×2 patch-whitening convolution initialised
  from the training images' patch covariance (its eigenvectors scaled by ``1/sqrt(eigenvalue)``, with their
  negatives: 24 channels), then three groups ``conv3×3 → maxpool 2 → BN → act → conv3×3 → BN → act`` of widths
  64/256/256 (airbench's; our supervised references use 96/384/384, the semi-supervised ones 64/256/256) and a
  global max pool, a bias-free linear head scaled by 1/9.
  ``feature_activation="tanh"`` ends the last group in tanh instead of GELU, so the max-pooled features lie in
  ``(-1, 1)`` (the paper's DenseNet ends its features in tanh).
* ``ResNet9`` — the DAWNBench residual net (Page, 2018, *How to train your ResNet*): prep conv, then
  ``conv → pool`` stages with two-conv residual blocks after the first and last, global max pool, linear head
  scaled by 1/8; widths configurable (default 48/96/192/384, sized to a projected 88 CPU minutes;
  trained on the H200 only).
* ``WhitenedResNet9`` — the same stages on the VGG's patch-whitening stem instead of the prep convolution
  (31×31 whitened map, ReLU); the cheaper stem pays for wider stages (default 112/224/448) in the same time.

Features for the detector are the head's input (``model.head``); ``layer="auto"`` finds the stage ends.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Standardize(nn.Module):
    """``(x − mean) / std`` per channel; ``x``: ``(N, 3, H, W)`` in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with a frozen unit scale and a trainable shift (the speed-run convention)."""
    bn = nn.BatchNorm2d(channels, momentum=0.4, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


def activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "relu": nn.ReLU(), "tanh": nn.Tanh(), "identity": nn.Identity()}[name]


class ConvGroup(nn.Module):
    """``conv3×3 → maxpool 2 → BN → act → conv3×3 → BN → act``: ``(N, c_in, H, W) → (N, c_out, H/2, W/2)``."""

    def __init__(self, c_in: int, c_out: int, act: str = "gelu", last_act: str = "gelu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = batch_norm(c_out)
        self.act1 = activation(act)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = batch_norm(c_out)
        self.act2 = activation(last_act)
        for conv in (self.conv1, self.conv2):  # identity on the first channels: an easier start (airbench)
            nn.init.dirac_(conv.weight.data[: conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.pool(self.conv1(x))))
        return self.act2(self.norm2(self.conv2(x)))


class ScaledHeadNet(nn.Module):
    """Base of the reference nets: ``forward`` = ``head(features(x)) · logit_scale``, ``(N, 3, 32, 32)`` in [0, 1]
    → logits ``(N, 10)``; subclasses define ``features``, ``head`` and ``logit_scale``."""

    head: nn.Linear
    logit_scale: float

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        return logits if self.logit_scale == 1 else logits * self.logit_scale


class PatchWhitenedNet(ScaledHeadNet):
    """Base of the nets whose first layer is a frozen 2×2 patch-whitening convolution ``whiten``
    ``(N, 3, 32, 32) → (N, 24, 31, 31)`` after per-channel standardisation; ``train.py`` calls
    ``init_whitening`` before training and trains the whitening bias for the first epochs only."""

    def __init__(self) -> None:
        super().__init__()
        self.standardize = Standardize()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from ``images`` ``(N, 3, 32, 32)`` in [0, 1] (a few thousand suffice)."""
        x = self.standardize(images.float())
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3 * 2 * 2).double()
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(12, 3, 2, 2).float()
        self.whiten.weight.copy_(torch.cat([filters, -filters]))


class WhitenedVGG(PatchWhitenedNet):
    """Patch-whitening VGG-style net; ``forward``: ``(N, 3, 32, 32)`` in [0, 1] → logits ``(N, 10)``."""

    def __init__(
        self, widths: tuple[int, int, int] = (64, 256, 256), n_classes: int = 10, feature_activation: str = "gelu"
    ) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.block1 = ConvGroup(24, widths[0])
        self.block2 = ConvGroup(widths[0], widths[1])
        self.block3 = ConvGroup(widths[1], widths[2], last_act=feature_activation)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], n_classes, bias=False)
        self.logit_scale = 1 / 9

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, widths[2])``."""
        h = self.act(self.whiten(self.standardize(x)))
        h = self.block3(self.block2(self.block1(h)))
        return self.pool(h).flatten(1)


class Residual(nn.Module):
    """``x + f(x)``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [batch_norm(c_out), nn.ReLU()]
    return nn.Sequential(*layers)


def residual_stage(c_in: int, c_out: int) -> nn.Sequential:
    """``conv → pool → BN → ReLU`` then a two-conv residual block: ``(N, c_in, H, W) → (N, c_out, H/2, W/2)``."""
    return nn.Sequential(
        conv_bn(c_in, c_out, pool=True), Residual(nn.Sequential(conv_bn(c_out, c_out), conv_bn(c_out, c_out)))
    )


class ResNet9(ScaledHeadNet):
    """DAWNBench ResNet-9; ``forward``: ``(N, 3, 32, 32)`` in [0, 1] → logits ``(N, 10)``."""

    def __init__(self, widths: tuple[int, int, int, int] = (48, 96, 192, 384), n_classes: int = 10) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        self.standardize = Standardize()
        self.prep = conv_bn(3, w0)
        self.layer1 = residual_stage(w0, w1)
        self.layer2 = conv_bn(w1, w2, pool=True)
        self.layer3 = residual_stage(w2, w3)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(w3, n_classes, bias=False)
        self.logit_scale = 1 / 8

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.prep(self.standardize(x)))))
        return self.pool(h).flatten(1)


class WhitenedResNet9(PatchWhitenedNet):
    """ResNet-9 with the patch-whitening stem in place of its prep convolution; ``forward``: ``(N, 3, 32, 32)`` in
    [0, 1] → logits ``(N, 10)``. Stages as ``ResNet9`` (ReLU, residual blocks after the first and last) on the
    whitened 31×31 map: ``conv → pool`` to 15×15 + residual block, 7×7, 3×3 + residual block; widths ``w1/w2/w3``."""

    def __init__(self, widths: tuple[int, int, int] = (112, 224, 448), n_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.act = nn.ReLU()  # at zero whitening bias the ± filter pairs make this ReLU lossless
        self.layer1 = residual_stage(24, w1)
        self.layer2 = conv_bn(w1, w2, pool=True)
        self.layer3 = residual_stage(w2, w3)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(w3, n_classes, bias=False)
        self.logit_scale = 1 / 8

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, widths[2])``, non-negative."""
        h = self.act(self.whiten(self.standardize(x)))
        return self.pool(self.layer3(self.layer2(self.layer1(h)))).flatten(1)


ARCHITECTURES = {
    "vgg": lambda widths: WhitenedVGG(widths or (96, 384, 384)),
    "vgg-tanh": lambda widths: WhitenedVGG(widths or (96, 384, 384), feature_activation="tanh"),
    "resnet9": lambda widths: ResNet9(widths or (48, 96, 192, 384)),
    "resnet9-whitened": lambda widths: WhitenedResNet9(widths or (112, 224, 448)),
}


def make_model(arch: str, widths: tuple[int, ...] | None = None) -> nn.Module:
    """A fresh reference model by name (a key of ``ARCHITECTURES``), default widths unless given."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](tuple(widths) if widths else None)


def load_reference_model(path: str | Path) -> nn.Module:
    """The model saved at ``path`` (``<name>.safetensors`` beside its ``<name>.json`` card), in eval mode, float32.
    Its logits are ``head(features) * logit_scale``; featurefail's head discovery finds such a scaled head."""
    path = Path(path)
    info = json.loads(path.with_suffix(".json").read_text())
    model = make_model(info["arch"], info.get("widths"))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()
