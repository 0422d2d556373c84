"""Small classifiers of the shapes the hook must handle, defined here so the tests need no downloads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(d_in: int = 16, hidden: int = 24, n_classes: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
    )


class FunctionalCNN(nn.Module):
    """Pooling, activations and flattening done with torch.nn.functional inside forward."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc1 = nn.Linear(12 * 2 * 2, 20)
        self.fc2 = nn.Linear(20, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(h, 1))))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b(F.relu(self.bn(self.a(x)))))


class TinyResNet(nn.Module):
    def __init__(self, n_classes: int = 3, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.layer1 = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer1(F.relu(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, F.relu(self.conv(x))], dim=1)


class TinyDenseNet(nn.Module):
    """Concatenating layers; the feature layer ends in tanh like the paper's DenseNet."""

    def __init__(self, n_classes: int = 3, growth: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), DenseLayer(6, growth), DenseLayer(6 + growth, growth)
        )
        self.classifier = nn.Linear(6 + 2 * growth, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.features(x))
        return self.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))


class NoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def blob_data(n: int = 600, d: int = 16, n_classes: int = 3, seed: int = 0):
    """Separable Gaussian blobs for the MLP: ``(n, d)`` float32 inputs and int64 labels."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, d, generator=g) * 1.0
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g) * 1.5
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    return model.eval()


# ---- replicas of real architectures' patterns (head discovery and layer choice) --------------------------------


class CifarWithUnusedProj(nn.Module):
    """A CIFAR net whose auxiliary ``proj`` Linear (used only in a training loss) is registered after ``fc``."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(12, n_classes)
        self.proj = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))


class EarlyAuxHead(nn.Module):
    """An auxiliary classifier on an early stage, run only in training (GoogLeNet/Inception style)."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(16, n_classes)
        self.aux = nn.Linear(8, n_classes)

    def forward(self, x: torch.Tensor):
        h1 = self.stage1(x)
        logits = self.fc(F.adaptive_avg_pool2d(self.stage2(h1), 1).flatten(1))
        if self.training:
            return logits, self.aux(h1.mean((2, 3)))
        return logits


class Attention(nn.Module):
    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        return self.proj(out)


class TransformerBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, a CLS token (and a distillation token with ``distilled=True``: logits = mean of two
    heads, as timm's DeiT), ``depth`` blocks, final norm, head on the CLS token."""

    def __init__(self, n_classes: int = 3, d: int = 16, depth: int = 6, distilled: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.dist_token = nn.Parameter(torch.randn(1, 1, d) * 0.5) if distilled else None
        self.blocks = nn.Sequential(*[TransformerBlock(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)
        self.head_dist = nn.Linear(d, n_classes) if distilled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = [self.cls_token.expand(len(h), -1, -1)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand(len(h), -1, -1))
        h = self.norm(self.blocks(torch.cat([*tokens, h], dim=1)))
        if self.head_dist is None:
            return self.head(h[:, 0])
        return (self.head(h[:, 0]) + self.head_dist(h[:, 1])) / 2


class ChannelsLastBlock(nn.Module):
    """ConvNeXt/Swin style: the block keeps ``(N, H, W, C)``; LayerNorm and Linear act on the last axis."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class PatchMerging(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * c)
        self.reduction = nn.Linear(4 * c, 2 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class TinySwin(nn.Module):
    """Channels-last stages of widths 8, 16, 32 with patch merging; the map's side (8, 4, 2 at 32x32 inputs)
    never equals a width."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.stages = nn.Sequential(
            nn.Sequential(ChannelsLastBlock(8), ChannelsLastBlock(8)),
            PatchMerging(8),
            nn.Sequential(ChannelsLastBlock(16), ChannelsLastBlock(16)),
            PatchMerging(16),
            nn.Sequential(ChannelsLastBlock(32)),
        )
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.embed(x).permute(0, 2, 3, 1))
        return self.head(self.norm(h).mean((1, 2)))


class TinyVGG(nn.Module):
    """VGG layout: ``features`` container, adaptive 2x2 pool, hidden-Linear classifier (the head is
    ``classifier.3``)."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(64, 20), nn.ReLU(), nn.Dropout(0.5), nn.Linear(20, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class ConvClassifier(nn.Module):
    """SqueezeNet style: a 1x1 convolution classifier, no nn.Linear."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Conv2d(8, n_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


class FunctionalHead(nn.Module):
    """The head is a parameter applied with a function: no module outputs the logits."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 10), nn.ReLU())
        self.weight = nn.Parameter(torch.randn(n_classes, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.body(x), self.weight)


class SharedBlock(nn.Module):
    """One module called twice in a forward pass."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.fc = nn.Linear(6, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.block(x)))


class TinyTextClassifier(nn.Module):
    """A text classifier called with keyword arguments, returning an object with ``.logits``."""

    def __init__(self, vocab: int = 50, d: int = 16, n_classes: int = 3, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([TransformerBlock(d) for _ in range(depth)])
        self.classifier = nn.Linear(d, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return Output(logits=self.classifier(pooled), hidden=h)


class Output:
    """A model output object (as Hugging Face's), not a tuple or a dict."""

    def __init__(self, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        self.logits = logits
        self.hidden = hidden


class Inception(nn.Module):
    """Branches concatenated on the channel axis: the block's output width is none of its convolutions'."""

    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.branch1 = nn.Conv2d(c_in, c, 1)
        self.branch2 = nn.Sequential(nn.Conv2d(c_in, c, 1), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x)], 1)


class TinyInception(nn.Module):
    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inception1 = Inception(8, 6)
        self.pool = nn.MaxPool2d(2)
        self.inception2 = Inception(12, 10)
        self.fc = nn.Linear(20, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inception2(self.pool(self.inception1(F.relu(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
