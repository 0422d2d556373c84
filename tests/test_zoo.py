"""Model zoo: head discovery, automatic layers and deployment on real torchvision, timm and transformers
architectures (random init, no download).

Each family runs where its package imports. torchvision (and timm, which imports it) needs a torchvision build
matching the installed torch; where it does not import, its cases are skipped with the reason in the summary
(``pytest -rs``) and a warning. To run everything, use a separate environment, e.g.::

    python3.11 -m venv /tmp/zoo && /tmp/zoo/bin/pip install torch==2.14.1 torchvision==0.29.1 timm transformers \\
        numpy scipy scikit-learn pydantic safetensors pytest && /tmp/zoo/bin/pip install --no-deps -e .
    /tmp/zoo/bin/python -m pytest tests/test_zoo.py -rs

``python tests/test_zoo.py`` prints the table of ``docs/layers.md`` (layer choices and feature widths).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from featurefail import FeatureHook
from featurefail.deploy import feature_extractor
from featurefail.hooks import auto_layers, describe, parse_layer, pool_features


def _importable(name: str) -> str | None:
    """None when ``name`` imports, else why not (one line)."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # a mismatched torchvision raises RuntimeError at import, not ImportError
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return None


_WHY_NOT = {pkg: _importable(pkg) for pkg in ("torchvision", "timm", "transformers")}
for _pkg, _why in _WHY_NOT.items():
    if _why is not None:
        warnings.warn(f"model zoo: {_pkg} cases skipped ({_why}); see tests/test_zoo.py", stacklevel=1)


@dataclass
class Arch:
    name: str
    package: str
    build: Callable[[], nn.Module]
    example: Callable[[int], Any]  # rows -> model inputs
    heads: list[str]
    other_size: Callable[[int], Any] | None = None  # a second input size for the invariance check


def _images(size: int) -> Callable[[int], torch.Tensor]:
    return lambda n: torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, num_classes=10, **kwargs)

    return build


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
        intermediate_size=64, num_labels=10,
    )  # fmt: skip
    return ViTForImageClassification(config)


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def _tokens(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(1, 100, (n, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


ZOO = [
    Arch("resnet18", "torchvision", _tv("resnet18"), _images(64), ["fc"], _images(80)),
    Arch("mobilenet_v3_small", "torchvision", _tv("mobilenet_v3_small"), _images(64), ["classifier.3"], _images(80)),
    Arch("efficientnet_b0", "torchvision", _tv("efficientnet_b0"), _images(64), ["classifier.1"], _images(80)),
    Arch("convnext_tiny", "torchvision", _tv("convnext_tiny"), _images(64), ["classifier.2"], _images(80)),
    Arch("swin_t", "torchvision", _tv("swin_t"), _images(64), ["head"], _images(80)),
    Arch("vit_b_16", "torchvision", _tv("vit_b_16", image_size=64), _images(64), ["heads.head"]),
    Arch("densenet121", "torchvision", _tv("densenet121"), _images(64), ["classifier"], _images(80)),
    Arch("vgg11", "torchvision", _tv("vgg11"), _images(64), ["classifier.6"], _images(80)),
    Arch(
        "googlenet",
        "torchvision",
        _tv("googlenet", aux_logits=False, init_weights=True),
        _images(64),
        ["fc"],
        _images(80),
    ),
    Arch("resnet18", "timm", _timm("resnet18"), _images(64), ["fc"], _images(80)),
    Arch("mobilenetv3_small_100", "timm", _timm("mobilenetv3_small_100"), _images(64), ["classifier"], _images(80)),
    Arch("efficientnet_b0", "timm", _timm("efficientnet_b0"), _images(64), ["classifier"], _images(80)),
    Arch("convnext_atto", "timm", _timm("convnext_atto"), _images(64), ["head.fc"], _images(80)),
    Arch("swin_tiny_patch4_window7_224", "timm", _timm("swin_tiny_patch4_window7_224"), _images(224), ["head.fc"]),
    Arch("vit_tiny_patch16_224", "timm", _timm("vit_tiny_patch16_224", img_size=64), _images(64), ["head"]),
    Arch(
        "deit_tiny_distilled_patch16_224",
        "timm",
        _timm("deit_tiny_distilled_patch16_224", img_size=64),
        _images(64),
        ["head", "head_dist"],
    ),
    Arch("densenet121", "timm", _timm("densenet121"), _images(64), ["classifier"], _images(80)),
    Arch("vgg11", "timm", _timm("vgg11"), _images(64), ["head.fc"], _images(80)),
    Arch("ViTForImageClassification (tiny)", "transformers", _hf_vit, _images(32), ["classifier"]),
    Arch("BertForSequenceClassification (tiny)", "transformers", _hf_bert, _tokens, ["classifier"]),
]


def _call(module: nn.Module, x: Any) -> Any:
    return module(**x) if isinstance(x, dict) else module(x)


def _head_inputs(model: nn.Module, names: list[str], x: Any) -> torch.Tensor:
    got: list[torch.Tensor] = []
    named = dict(model.named_modules())
    handles = [
        named[n].register_forward_pre_hook(lambda m, a, k: got.append((a or tuple(k.values()))[0]), with_kwargs=True)
        for n in names
    ]
    try:
        with torch.no_grad():
            _call(model, x)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(got, dim=1)


def _case(arch: Arch):
    why = _WHY_NOT[arch.package]
    marks = [pytest.mark.skip(reason=f"{arch.package} does not import here: {why}")] if why else []
    return pytest.param(arch, id=f"{arch.package}:{arch.name}", marks=marks)


@pytest.mark.parametrize("arch", [_case(a) for a in ZOO])
def test_zoo_head_layers_and_deployment(arch: Arch):
    torch.manual_seed(0)
    model = arch.build().eval()
    x = arch.example(2)
    with FeatureHook(model, layer="auto") as hook, torch.no_grad():
        feats, logits = hook(x)
    assert hook.heads == arch.heads
    width0 = hook.block_sizes[0]
    torch.testing.assert_close(feats[:, :width0], _head_inputs(model, arch.heads, x))
    weight, bias = hook.head_linear()
    torch.testing.assert_close(feats[:, :width0] @ weight.T + bias, logits, rtol=1e-3, atol=1e-4)

    layers = hook.resolved_layers
    plan = describe(model, x, layer=layers)  # the raw activation shapes, read before pooling
    for spec, block in zip(layers[1:], plan.blocks[1:], strict=True):
        (shape,) = block.shape
        channels = shape[0] if block.layout == "channels_first" else shape[-1]
        assert block.width == channels >= 16, (spec, block)  # a channel count, never H or W
    chosen = [parse_layer(s)[0].name for s in layers[1:]]
    for a in chosen:
        for b in chosen + arch.heads:
            assert a == b or not (b.startswith(a + ".") or a.startswith(b + "."))
    if arch.other_size is not None:
        assert auto_layers(model, arch.other_size(2)) == layers

    extractor = feature_extractor(model, layers)  # the plan resolved above: no probe pass
    with torch.no_grad():
        _, acts = _call(extractor, x)
    deployed = torch.cat([pool_features(a, "avg", lay) for a, lay in zip(acts, extractor.layouts, strict=True)], 1)
    torch.testing.assert_close(deployed, feats, rtol=1e-4, atol=1e-4)
    assert not any(m._forward_hooks for m in model.modules())


def markdown_table() -> str:
    rows = [
        "| package | model | head(s) | layer='auto' (after the head's input) | widths |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arch in ZOO:
        if _WHY_NOT[arch.package]:
            rows.append(f"| {arch.package} | {arch.name} | (not importable here) | | |")
            continue
        torch.manual_seed(0)
        plan = describe(arch.build().eval(), arch.example(2))
        heads = " + ".join(plan.heads) + (f" ({plan.head_combine})" if plan.head_combine != "single" else "")
        layers = ", ".join(f"`{s}`" for s in plan.layers[1:]) or "(none: the head's input only)"
        widths = " + ".join(str(w) for w in plan.widths)
        rows.append(f"| {arch.package} | {arch.name} | `{heads}` | {layers} | {widths} |")
    return "\n".join(rows)


def token_pooling_table(n: int = 64) -> str:
    """CLS token vs mean token at the automatic blocks of the token models, on ``n`` random inputs: the
    participation ratio ``(Σλ)² / Σλ²`` of the features' covariance (effective dimensions; higher = less
    degenerate for a mixture) and the median over dimensions of std / (|mean| + std) across inputs."""
    rows = [
        "| model | block | pooling | participation ratio | median relative std |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arch in ZOO:
        if _WHY_NOT[arch.package] or arch.name.split(" ")[0] not in {
            "vit_b_16", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
            "ViTForImageClassification", "BertForSequenceClassification",
        }:  # fmt: skip
            continue
        torch.manual_seed(0)
        model = arch.build().eval()
        x = arch.example(n)
        for pooling in ("mean", "cls"):
            layers = auto_layers(model, x, token_pool=pooling)
            with FeatureHook(model, layer=layers) as hook, torch.no_grad():
                feats, _ = hook(x)
            start = hook.block_sizes[0]
            for spec, width in zip(layers[1:], hook.block_sizes[1:], strict=True):
                block = feats[:, start : start + width].double()
                start += width
                eig = torch.linalg.eigvalsh(torch.cov(block.T)).clamp_min(0)
                ratio = float(eig.sum() ** 2 / (eig**2).sum())
                std, mean = block.std(0), block.mean(0)
                rel = float((std / (mean.abs() + std)).median())
                rows.append(f"| {arch.package}:{arch.name} | `{spec}` | {pooling} | {ratio:.1f} | {rel:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(token_pooling_table() if "--token-pooling" in sys.argv else markdown_table())
