"""Head discovery, explicit captures and layout-aware layer choice on replicas of real architectures' patterns.

Every replica checks the three acceptance properties: the first feature block equals the head's input captured
independently (a forward pre-hook on the known head), every automatic block's width is a channel count, and the
deployed extractor (``feature_extractor``) gives the hooked features.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from models import (
    CifarWithUnusedProj,
    ConvClassifier,
    EarlyAuxHead,
    FunctionalHead,
    SharedBlock,
    TinyInception,
    TinyResNet,
    TinySwin,
    TinyTextClassifier,
    TinyVGG,
    TinyViT,
    mlp,
)
from torch import nn

from featurefail import FeatureHook, extract_features
from featurefail.deploy import DetectorModule, feature_extractor
from featurefail.features import from_batch_fn, iter_batches, n_rows, split_batch
from featurefail.hooks import ModelInputs, auto_layers, describe, parse_layer, pool_features


def head_inputs(model: nn.Module, names: list[str], x) -> torch.Tensor:
    """The inputs of the named modules in one plain forward pass (the independent reference)."""
    got: list[torch.Tensor] = []
    named = dict(model.named_modules())
    handles = [named[n].register_forward_pre_hook(lambda m, a: got.append(a[0].detach())) for n in names]
    try:
        with torch.no_grad():
            model.eval()
            model(x) if not isinstance(x, dict) else model(**x)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(got, dim=1)


def deployed_features(model: nn.Module, layer, x, mode: str = "auto") -> torch.Tensor:
    extractor = feature_extractor(model, layer, example=x, mode=mode)
    with torch.no_grad():
        _, acts = extractor(**x) if isinstance(x, dict) else extractor(x)
    return torch.cat([pool_features(a, "avg", lay) for a, lay in zip(acts, extractor.layouts, strict=True)], dim=1)


def hooked(model: nn.Module, x, layer=None, **kwargs):
    with FeatureHook(model, layer=layer, **kwargs) as hook, torch.no_grad():
        feats, logits = hook(x)
    return hook, feats, logits


CASES = [
    # (factory, input, head module names, auto widths = channel counts of the chosen stage ends)
    (CifarWithUnusedProj, torch.randn(4, 3, 16, 16), ["fc"], (12, 8)),
    (EarlyAuxHead, torch.randn(4, 3, 16, 16), ["fc"], (16, 8)),
    (lambda: TinyViT(depth=6), torch.randn(4, 3, 16, 16), ["head"], (16, 16, 16)),
    (lambda: TinyViT(depth=6, distilled=True), torch.randn(4, 3, 16, 16), ["head", "head_dist"], (32, 16, 16)),
    (TinySwin, torch.randn(4, 3, 32, 32), ["head"], (32, 16, 8)),
    (TinyVGG, torch.randn(4, 3, 32, 32), ["classifier.3"], (20, 16, 12)),
    (TinyResNet, torch.randn(4, 1, 8, 8), ["head"], (8,)),
    (TinyInception, torch.randn(4, 3, 16, 16), ["fc"], (20, 12)),
]


@pytest.mark.parametrize(("make", "x", "heads", "widths"), CASES)
def test_head_input_is_the_first_block_and_auto_widths_are_channel_counts(make, x, heads, widths):
    torch.manual_seed(0)
    model = make().train()
    modes = [m.training for m in model.modules()]
    hook, feats, logits = hooked(model, x, layer=None)
    assert hook.heads == heads
    reference = head_inputs(model, heads, x)
    model.train()
    torch.testing.assert_close(feats, reference)
    weight, bias = hook.head_linear()
    torch.testing.assert_close(feats @ weight.T + bias, logits, rtol=1e-4, atol=1e-5)

    auto, auto_feats, _ = hooked(model, x, layer="auto")
    assert auto.block_sizes == widths
    assert [m.training for m in model.modules()] == modes  # never left in eval
    torch.testing.assert_close(auto_feats[:, : widths[0]], reference)
    torch.testing.assert_close(deployed_features(model, "auto", x), auto_feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deployed_features(model, "auto", x, mode="hooks"), auto_feats, rtol=1e-5, atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    chosen = [name for spec in auto.resolved_layers[1:] for name in (c.name for c in parse_layer(spec))]
    for a in chosen:  # never a container together with its own child (or the head's container)
        for b in chosen + heads:
            assert a == b or not (b.startswith(a + ".") or a.startswith(b + "."))


def test_auto_chooses_the_same_modules_at_other_input_sizes():
    torch.manual_seed(0)
    for make, small, large in [
        (TinySwin, torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)),
        (TinyVGG, torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 48)),
        (CifarWithUnusedProj, torch.randn(2, 3, 16, 16), torch.randn(2, 3, 40, 40)),
        (lambda: TinyViT(depth=6), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)),
    ]:
        model = make()
        assert auto_layers(model, small) == auto_layers(model, large)


def test_channels_last_stages_pool_over_the_map_not_the_channels():
    torch.manual_seed(0)
    model, x = TinySwin().eval(), torch.randn(3, 3, 32, 32)
    layers = auto_layers(model, x)
    assert layers == [None, "stages.2:output#channels_last", "stages.0:output#channels_last"]
    _, feats, _ = hooked(model, x, layer="stages.0")  # inferred from the LayerNorm/Linear inside: channels-last
    with torch.no_grad():
        stage0 = model.stages[0](model.embed(x).permute(0, 2, 3, 1))
    torch.testing.assert_close(feats, stage0.mean((1, 2)))
    _, forced, _ = hooked(model, x, layer="stages.0#channels_first")  # an explicit layout wins
    torch.testing.assert_close(forced, stage0.mean((2, 3)))


def test_token_models_take_evenly_spaced_blocks_mean_or_cls_token():
    torch.manual_seed(0)
    model, x = TinyViT(depth=6).eval(), torch.randn(3, 3, 16, 16)
    assert auto_layers(model, x) == [None, "blocks.3:output#channels_last", "blocks.1:output#channels_last"]
    assert auto_layers(model, x, token_pool="cls") == [None, "blocks.3:output#cls", "blocks.1:output#cls"]
    _, feats, _ = hooked(model, x, layer="auto", token_pool="cls")
    with torch.no_grad():
        h = torch.cat([model.cls_token.expand(3, -1, -1), model.patch_embed(x).flatten(2).transpose(1, 2)], 1)
        h2 = model.blocks[:2](h)
    torch.testing.assert_close(feats[:, 32:], h2[:, 0])
    assert auto_layers(mlp(), torch.randn(2, 16)) == [None]


@pytest.mark.parametrize("kind", ["object", "dict", "tuple"])
def test_outputs_as_objects_dicts_and_tuples(kind):
    torch.manual_seed(0)
    text = TinyTextClassifier().eval()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = text

        def forward(self, input_ids, attention_mask=None):
            out = self.net(input_ids, attention_mask)
            if kind == "dict":
                return {"hidden": out.hidden, "logits": out.logits}
            if kind == "tuple":
                return out.logits, out.hidden
            return out

    model = Wrapped()
    ids = torch.randint(0, 50, (5, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    hook, feats, logits = hooked(model, batch)
    assert hook.heads == ["net.classifier"]
    torch.testing.assert_close(feats, head_inputs(model, ["net.classifier"], batch))
    torch.testing.assert_close(logits, text(ids, mask).logits)
    torch.testing.assert_close(deployed_features(model, None, batch), feats)


def test_text_model_dict_batches_with_labels_and_batch_fn_forms():
    torch.manual_seed(0)
    model = TinyTextClassifier().eval()
    ids, y = torch.randint(0, 50, (10, 6)), torch.randint(0, 3, (10,))
    mask = torch.ones_like(ids)
    loader = [
        {"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4], "labels": y[i : i + 4]} for i in (0, 4, 8)
    ]
    out = extract_features(model, loader, layer="auto", progress_bar=False)
    assert torch.equal(out.labels, y) and out.feats.shape == (10, 48) and out.blocks == (16, 16, 16)
    expected = model(ids, mask).logits
    torch.testing.assert_close(out.logits, expected)
    renamed = [{"input_ids": b["input_ids"], "answer": b["labels"]} for b in loader]
    assert torch.equal(extract_features(model, renamed, label_key="answer", progress_bar=False).labels, y)
    as_args = extract_features(
        model, loader, batch_fn=lambda b: (((b["input_ids"],), {"attention_mask": b["attention_mask"]}), b["labels"]),
        progress_bar=False,
    )  # fmt: skip
    torch.testing.assert_close(as_args.logits, expected)
    assert torch.equal(as_args.labels, y)
    # iter_batches splits one dict batch (what score()/detect() receive) like a loader of chunks
    whole = {"input_ids": ids, "attention_mask": mask, "labels": y}
    chunks = iter_batches(whole, 3)
    assert len(chunks) == 4 and n_rows(whole) == 10
    again = extract_features(model, chunks, progress_bar=False)
    torch.testing.assert_close(again.logits, expected)
    assert torch.equal(again.labels, y)


def test_batch_forms_and_batch_fn_results():
    x, y = torch.randn(4, 16), torch.arange(4)
    assert split_batch({"input_ids": x, "labels": y})[0].keys() == {"input_ids"}
    assert torch.equal(split_batch({"image": x, "label": y})[0], x)
    assert from_batch_fn(x) == (x, None)  # batch_fn returning only x is accepted
    inputs, labels = from_batch_fn(((x,), {"flag": True}))
    assert isinstance(inputs, ModelInputs) and inputs.kwargs == {"flag": True} and labels is None
    with pytest.raises(TypeError, match="batch_fn must return"):
        from_batch_fn((x, y, y))
    with pytest.raises(ValueError, match="only labels"):
        split_batch({"labels": y})
    out = extract_features(mlp(), [(x, y)], batch_fn=lambda b: b[0], progress_bar=False)
    assert out.labels is None and out.feats.shape == (4, 24)
    assert [c[0].shape[0] for c in iter_batches(torch.randn(5, 2), 2)] == [2, 2, 1]
    assert iter_batches(torch.randn(0, 2), 2) == [] and n_rows(torch.randn(0, 2)) == 0
    with pytest.raises(TypeError, match="cannot score"):
        iter_batches("images/", 2)
    with pytest.raises(ValueError, match="no samples"):
        extract_features(mlp(), [torch.randn(0, 16)], progress_bar=False)


def test_missing_batch_dimension_is_named():
    model = mlp().eval()
    with pytest.raises(ValueError, match="batch dimension"), FeatureHook(model) as hook:
        hook(torch.randn(16))
    with pytest.raises((RuntimeError, ValueError)) as info, FeatureHook(TinyResNet()) as hook:
        hook(torch.randn(1, 8, 8))
    assert "batch dimension" in "".join(getattr(info.value, "__notes__", []) or [str(info.value)])


def test_conv_classifier_and_functional_head_are_clear_errors():
    with pytest.raises(ValueError, match=r"no nn.Linear.*Candidates.*classifier"), FeatureHook(ConvClassifier()) as h:
        h(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"no module's output is the logits.*body"), FeatureHook(FunctionalHead()) as h:
        h(torch.randn(2, 6))
    # an explicit capture still works on both
    _, feats, _ = hooked(ConvClassifier().eval(), torch.randn(2, 3, 8, 8), layer="classifier.0:input")
    assert feats.shape == (2, 8)


def test_a_module_called_twice_needs_the_call_index():
    torch.manual_seed(0)
    model, x = SharedBlock().eval(), torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"runs 2 times.*block:output@k"), FeatureHook(model, layer="block") as h:
        h(x)
    _, first, _ = hooked(model, x, layer="block:output@0")
    _, second, _ = hooked(model, x, layer="block:output@1")
    with torch.no_grad():
        torch.testing.assert_close(first, model.block(x))
        torch.testing.assert_close(second, model.block(model.block(x)))
    torch.testing.assert_close(deployed_features(model, "block:output@1", x), second)
    torch.testing.assert_close(deployed_features(model, "block:output@1", x, mode="hooks"), second)
    with pytest.raises(ValueError, match="@2 does not exist"), FeatureHook(model, layer="block:output@2") as h:
        h(x)
    with pytest.raises(ValueError, match="cannot read layer"):
        parse_layer("block:sideways")


def test_explicit_input_capture_of_any_module():
    torch.manual_seed(0)
    model, x = TinyVGG().eval(), torch.randn(3, 3, 32, 32)
    _, feats, _ = hooked(model, x, layer="classifier.3:input")
    torch.testing.assert_close(feats, head_inputs(model, ["classifier.3"], x))
    _, pooled, _ = hooked(model, x, layer="features:output")
    with torch.no_grad():
        torch.testing.assert_close(pooled, model.features(x).mean((2, 3)))


def test_two_hooks_on_one_model_in_two_threads_never_swap_features():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    xs = [torch.randn(3, 1, 8, 8) for _ in range(12)]
    with FeatureHook(model) as a, FeatureHook(model, layer="layer1") as b:
        serial_a = [a(x)[0] for x in xs]
        serial_b = [b(x)[0] for x in xs]
        errors: list[str] = []

        def run(hook, expected) -> None:
            for _ in range(15):
                for x, want in zip(xs, expected, strict=True):
                    if not torch.equal(hook(x)[0], want):
                        errors.append("mixed")

        threads = [threading.Thread(target=run, args=args) for args in [(a, serial_a), (b, serial_b)] * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_detectors_on_one_model_from_threads_agree_with_serial():
    from featurefail import FailureDetector

    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(120, 1, 8, 8)
    one = FailureDetector.paper(n_components=2, progress=False).fit(model, [(x[:80],)])
    two = FailureDetector(n_components=2, layer="layer1", progress=False).fit(model, [(x[:80],)])
    chunks = [x[80 + 5 * i : 85 + 5 * i] for i in range(8)]
    want = {id(d): [d.score(c) for c in chunks] for d in (one, two)}
    jobs = [(d, i) for _ in range(4) for d in (one, two) for i in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda job: job[0].score(chunks[job[1]]), jobs))
    for (d, i), scores in zip(jobs, got, strict=True):
        assert torch.equal(scores, want[id(d)][i])


def test_describe_lists_head_layers_sides_layouts_and_widths():
    torch.manual_seed(0)
    model = TinyViT(depth=6, distilled=True).train()
    plan = describe(model, torch.randn(2, 3, 16, 16))
    assert plan.heads == ("head", "head_dist") and plan.head_combine == "mean" and plan.n_classes == 3
    assert plan.widths == (32, 16, 16) and plan.blocks[0].side == "input"
    assert plan.blocks[1].layout == "channels_last" and plan.blocks[1].shape == ((18, 16),)
    text = str(plan)
    assert "head + head_dist (mean of 2 heads)" in text and "blocks.3:output#channels_last" in text
    assert model.training and all(m.training for m in model.modules())


def test_pool_features_layouts_against_manual_reductions():
    t = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(pool_features(t, "avg", "channels_first"), t.mean((2, 3)))
    torch.testing.assert_close(pool_features(t, "avg", "channels_last"), t.mean((1, 2)))
    tokens = torch.randn(2, 7, 5)
    torch.testing.assert_close(pool_features(tokens, "avg", "cls"), tokens[:, 0])
    torch.testing.assert_close(pool_features(tokens, "avg", "channels_last"), tokens.mean(1))
    assert pool_features(t, "flatten", "channels_last").shape == (2, 60)
    with pytest.raises(ValueError, match="cls"):
        pool_features(t, "avg", "cls")


def test_detector_module_from_a_dict_input_model_equals_score():
    from featurefail import FailureDetector

    torch.manual_seed(0)
    model = TinyTextClassifier().eval()
    ids = torch.randint(0, 50, (60, 6))
    mask = torch.ones_like(ids)
    loader = [{"input_ids": ids[i : i + 20], "attention_mask": mask[i : i + 20]} for i in (0, 20, 40)]
    det = FailureDetector(n_components=2, progress=False).fit(model, loader)
    module = det.as_module(threshold=0.0)
    assert isinstance(module, DetectorModule)
    _, score, _ = module(input_ids=ids[:20], attention_mask=mask[:20])
    torch.testing.assert_close(score, det.score([loader[0]]), rtol=1e-5, atol=1e-4)
    exported = torch.export.export(module, (), {"input_ids": ids[:4], "attention_mask": mask[:4]})
    torch.testing.assert_close(exported.module()(input_ids=ids[:4], attention_mask=mask[:4])[1], score[:4])


def test_inspect_command_prints_the_plan(tmp_path, capsys):
    from featurefail.cli import main

    here = str(Path(__file__).parent)
    (tmp_path / "net.py").write_text(
        f"import sys\nsys.path.insert(0, {here!r})\nfrom models import TinyVGG\n\ndef make():\n    return TinyVGG()\n"
    )
    assert main(["inspect", "--model", f"{tmp_path / 'net.py'}:make", "--input-shape", "3,32,32"]) == 0
    out = capsys.readouterr().out
    assert "head: classifier.3, 3 classes" in out and "features: 48 dims in 3 block(s)" in out
    assert "| 1 features.7:output#channels_first | features.7 | output | channels_first | (16, 8, 8) | 16 |" in out
    assert (
        main(["inspect", "--model", f"{tmp_path / 'net.py'}:make", "--input-shape", "3,32,32", "--layer", "none"]) == 0
    )
    assert "features: 20 dims in 1 block(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="integers"):
        main(["inspect", "--model", f"{tmp_path / 'net.py'}:make", "--input-shape", "3x32"])


class ScaledLogits(nn.Module):
    """airbench / CLIP style: the logits are the head's output times a constant (``logit_scale``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(12, 5)
        self.logit_scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).amax((2, 3))) * self.logit_scale


def test_a_head_times_a_constant_is_found_and_its_linear_map_includes_the_constant():
    torch.manual_seed(0)
    model = ScaledLogits()
    x = torch.randn(6, 3, 16, 16)
    hook, feats, logits = hooked(model, x, layer=None)
    assert hook.heads == ["head"] and hook.head_combine == "scaled"
    assert hook.head_scale == pytest.approx(1 / 9, rel=1e-5)
    torch.testing.assert_close(feats, head_inputs(model, ["head"], x))
    weight, bias = hook.head_linear()
    torch.testing.assert_close(feats @ weight.T + bias, logits, rtol=1e-4, atol=1e-5)  # fails without the constant
    torch.testing.assert_close(weight, model.head.weight.detach() / 9)
    auto, auto_feats, _ = hooked(model, x, layer="auto")
    assert auto.resolved_layers[0] is None and auto.head_combine == "scaled"
    torch.testing.assert_close(auto_feats[:, :12], feats)
    assert "times a constant" in str(describe(model, x))
