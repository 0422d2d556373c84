"""FeatureHook and extract_features: placement on four model shapes, safety, batch forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import FunctionalCNN, NoLinear, TinyDenseNet, TinyResNet, mlp
from torch import nn

from featurefail import FeatureHook, Features, extract_features


@pytest.mark.parametrize(
    ("make", "x", "dim", "layer_name"),
    [
        (mlp, torch.randn(5, 16), 24, "4"),
        (FunctionalCNN, torch.randn(5, 1, 8, 8), 20, "fc2"),
        (TinyResNet, torch.randn(5, 1, 8, 8), 8, "head"),
        (TinyDenseNet, torch.randn(5, 1, 8, 8), 14, "classifier"),
    ],
)
def test_default_hook_takes_the_input_of_the_last_linear(make, x, dim, layer_name):
    model = make().eval()
    with FeatureHook(model) as hook:
        feats, logits = hook(x)
    assert hook.layer_name == layer_name and hook.head is not None
    assert feats.shape == (5, dim) and logits.shape == (5, 3)
    torch.testing.assert_close(logits, model(x))
    # the captured features really are what the head sees: re-applying the head gives the logits
    torch.testing.assert_close(hook.head(feats), logits)


def test_named_layer_output_is_pooled():
    model = TinyResNet().eval()
    x = torch.randn(4, 1, 8, 8)
    with FeatureHook(model, layer="layer1") as hook:
        feats, _ = hook(x)
    assert feats.shape == (4, 8) and hook.head is None
    expected = model.layer1(torch.relu(model.stem(x))).mean(dim=(2, 3))
    torch.testing.assert_close(feats, expected)
    with FeatureHook(model, layer=model.layer1, pool="flatten") as hook:
        assert hook(x)[0].shape == (4, 8 * 8 * 8)
    with FeatureHook(model, layer="layer1", pool=None) as hook, pytest.raises(ValueError, match="pool"):
        hook(x)


def test_several_layers_are_pooled_and_concatenated_in_order():
    model = TinyResNet().eval()
    x = torch.randn(5, 1, 8, 8)
    with FeatureHook(model, layer=[None, "layer1.0", model.stem]) as hook:
        feats, logits = hook(x)
    with FeatureHook(model) as one, FeatureHook(model, layer="layer1.0") as two:
        f_pen, logits_one = one(x)
        f_mid, _ = two(x)
    stem = model.stem(x).mean(dim=(2, 3))
    torch.testing.assert_close(feats, torch.cat([f_pen, f_mid, stem], dim=1))
    torch.testing.assert_close(logits, logits_one)
    assert hook.block_sizes == (8, 8, 8) and hook.head is None and hook.multi_layer
    assert hook.layer_names == ["head", "layer1.0", "stem"]
    features = extract_features(
        model, [(x, torch.zeros(5, dtype=torch.long))], layer=[None, "stem"], progress_bar=False
    )
    assert features.blocks == (8, 8)
    assert torch.equal(features.select_blocks(1).feats, stem) and features.select_blocks(1).blocks is None
    assert features.subset(slice(0, 2)).blocks == (8, 8)
    with pytest.raises(ValueError, match="twice"):
        FeatureHook(model, layer=["stem", model.stem])
    with pytest.raises(ValueError, match="empty"):
        FeatureHook(model, layer=[])
    with pytest.raises(ValueError, match="summing"):
        Features(torch.zeros(3, 4), blocks=(2, 3))


def three_stage_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def test_auto_layers_are_the_ends_of_the_earlier_resolution_stages():
    from featurefail.hooks import auto_layers

    model = three_stage_cnn().train()
    x = torch.randn(4, 1, 16, 16)
    ends = [None, "3:output#channels_first", "1:output#channels_first"]
    assert auto_layers(model, x) == ends  # 8x8 stage ends at the ReLU "3", 16x16 at "1"
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert auto_layers(model, x, n_stages=1) == ends[:2]
    assert auto_layers(model, torch.randn(2, 1, 40, 40)) == ends  # the same modules at another input size
    assert auto_layers(mlp(), torch.randn(2, 16)) == [None]
    with FeatureHook(model, layer="auto") as hook:
        feats, _ = hook(x)
        again, _ = hook(x)
    assert hook.resolved_layers == ends and hook.block_sizes == (8, 6, 4)
    torch.testing.assert_close(feats, again)
    with FeatureHook(model, layer=[None, "3", "1"]) as explicit:
        torch.testing.assert_close(explicit(x)[0], feats)


def test_detector_resolves_auto_at_fit_and_keeps_it(tmp_path):
    from featurefail import FailureDetector

    model = three_stage_cnn()
    x = torch.randn(240, 1, 16, 16)
    det = FailureDetector(n_components=2, layer="auto", preprocess="standardize", progress=False).fit(model, [x[:200]])
    ends = [None, "3:output#channels_first", "1:output#channels_first"]
    assert det.layers_ == ends and det.config.layer == "auto"
    scores = det.score(x[200:])
    det.save(tmp_path / "auto.safetensors")
    back = FailureDetector.load(tmp_path / "auto.safetensors", model=model)
    assert back.layers_ == ends
    assert torch.equal(back.score(x[200:]), scores)
    torch.testing.assert_close(det.as_module(threshold=0.0)(x[200:])[1], scores, rtol=1e-5, atol=1e-4)


def test_no_linear_lists_candidates_and_bad_names_are_clear():
    with pytest.raises(ValueError, match=r"no nn.Linear.*conv"), FeatureHook(NoLinear()) as hook:
        hook(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        FeatureHook(TinyResNet(), layer="layer9")
    with pytest.raises(ValueError, match="not part of the model"):
        FeatureHook(TinyResNet(), layer=nn.Linear(2, 2))


def test_hook_restores_mode_and_handles_on_exception():
    model = TinyResNet().train()
    model.layer1[0].bn.eval()  # a frozen BatchNorm inside a training model keeps its own mode
    hook = FeatureHook(model)
    seen = []
    model.layer1.register_forward_pre_hook(lambda m, a: seen.append(m.training))

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom), hook:
        hook(torch.randn(2, 1, 8, 8))
        assert model.training  # eval only during the hooked forward pass
        raise Boom()
    assert seen == [False, False]  # probe and capture ran in eval mode
    assert model.training and not model.layer1[0].bn.training and model.layer1[1].bn.training
    assert not model.head._forward_hooks
    with pytest.raises(RuntimeError, match="with"):
        hook(torch.randn(2, 1, 8, 8))


def test_model_error_inside_forward_restores_state():
    model = FunctionalCNN().train()
    with pytest.raises(RuntimeError), FeatureHook(model) as hook:
        hook(torch.randn(2, 3, 8, 8))  # wrong channel count: conv raises
    assert model.training and not model.fc2._forward_hooks


def test_output_fn_for_tuple_and_dict_outputs():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return {"logits": self.net(x), "aux": x.sum()}

    model = Pair().eval()
    with FeatureHook(model) as hook:
        assert hook(torch.randn(3, 16))[1].shape == (3, 3)
    with FeatureHook(model, output_fn=lambda out: out["logits"] * 2) as hook:
        torch.testing.assert_close(hook(torch.ones(1, 16))[1], 2 * model(torch.ones(1, 16))["logits"])


@pytest.mark.parametrize("form", ["x", "tuple1", "pair", "dict"])
def test_extract_features_batch_forms(form):
    model = mlp().eval()
    x, y = torch.randn(70, 16), torch.randint(0, 3, (70,))
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 70, 32)]
    loader = {
        "x": [b[0] for b in batches],
        "tuple1": [(b[0],) for b in batches],
        "pair": batches,
        "dict": [{"image": b[0], "label": b[1]} for b in batches],
    }[form]
    out = extract_features(model, loader, progress_bar=False)
    assert out.feats.shape == (70, 24) and out.feats.dtype == torch.float32
    assert out.logits.shape == (70, 3)
    if form in ("pair", "dict"):
        assert torch.equal(out.labels, y)
    else:
        assert out.labels is None
    with pytest.raises(ValueError, match="no samples"):
        extract_features(model, [], progress_bar=False)
    custom = extract_features(
        model, [[b[1], b[0]] for b in batches], batch_fn=lambda b: (b[1], b[0]), progress_bar=False
    )
    assert torch.equal(custom.labels, y)


def test_extract_features_to_memmap(tmp_path):
    model = mlp().eval()
    dataset = torch.utils.data.TensorDataset(torch.randn(50, 16), torch.randint(0, 3, (50,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    in_ram = extract_features(model, loader, progress_bar=False)
    mapped = extract_features(model, loader, memmap_path=tmp_path / "f.npy", progress_bar=False)
    assert torch.equal(in_ram.feats, mapped.feats)
    assert np.load(tmp_path / "f.npy", mmap_mode="r").shape == (50, 24)


def test_features_subset_and_correct():
    f = Features.from_tensors(np.zeros((4, 2)), logits=[[1, 0], [0, 1], [1, 0], [0, 1]], labels=[0, 0, 0, 1])
    assert f.correct.tolist() == [True, False, True, True]
    assert len(f.subset(f.correct)) == 3
    with pytest.raises(ValueError, match="rows"):
        Features(torch.zeros(3, 2), labels=torch.zeros(2))
