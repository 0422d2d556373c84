"""as_module(): equal to detector.score/detect, export round trips, thread safety."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from models import TinyDenseNet, TinyResNet, train
from torch import nn

from featurefail import FailureDetector


@pytest.fixture(scope="module")
def resnet_detector():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long() + (x.mean((1, 2, 3)) > 0.5).long()
    model = train(TinyResNet(), x[:300], y[:300], epochs=5)
    det = FailureDetector(n_components=5, progress=False).fit(model, [(x[:300], y[:300])])
    det.calibrate([(x[300:], y[300:])], folds=2)
    return det, model, x[300:]


def test_as_module_equals_score_and_detect(resnet_detector):
    det, model, x = resnet_detector
    module = det.as_module()
    logits, score, flag = module(x)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(score, det.score(x), rtol=1e-6, atol=1e-5)
    assert torch.equal(flag, det.detect(x))
    assert not any(m._forward_hooks for m in model.modules())


def test_as_module_flags_non_finite_inputs(resnet_detector):
    det, _, x = resnet_detector
    bad = x[:3].clone()
    bad[1] = float("nan")
    _, score, flag = det.as_module()(bad)
    assert score[1] == -math.inf and flag[1]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.9+ deprecates TorchScript; it still works
def test_torchscript_round_trip(resnet_detector, tmp_path):
    det, _, x = resnet_detector
    module = det.as_module()
    traced = torch.jit.trace(module, x[:4])
    traced.save(str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    for a, b in zip(loaded(x), module(x), strict=True):
        torch.testing.assert_close(a, b)


def test_torch_export_and_compile(resnet_detector, tmp_path):
    det, _, x = resnet_detector
    module = det.as_module()
    exported = torch.export.export(module, (x[:4],))
    torch.export.save(exported, str(tmp_path / "m.pt2"))
    reloaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    for a, b in zip(reloaded(x[:4]), module(x[:4]), strict=True):
        torch.testing.assert_close(a, b)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(x), module(x), strict=True):
        torch.testing.assert_close(a, b)


def test_as_module_on_a_named_layer_and_logit_scorers():
    model = TinyDenseNet().eval()
    x = torch.rand(50, 1, 8, 8)
    det = FailureDetector(n_components=3, layer="features", progress=False).fit(model, [(x,)])
    _, score, _ = det.as_module(threshold=0.0)(x)
    torch.testing.assert_close(score, det.score(x), rtol=1e-6, atol=1e-5)
    soft = FailureDetector(scorer="max_softmax", progress=False).fit(model, [(x,)])
    torch.testing.assert_close(soft.as_module(threshold=0.5)(x)[1], soft.score(x))


class Branchy(nn.Module):
    """Python control flow on a tensor's rank: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        h = self.body(x)
        if h.dim() == 2:  # control flow on a traced value defeats symbolic tracing
            h = h * 2
        return self.fc(h)


def test_untraceable_model_deploys_with_hooks_inside_and_exports(tmp_path):
    from featurefail.deploy import HookedExtractor

    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(40, 4)
    det = FailureDetector(n_components=2, preprocess=None, per_layer=False, layer=None, progress=False)
    det.fit(model, [(x,)])
    module = det.as_module(threshold=0.0)
    assert isinstance(module.extractor, HookedExtractor)
    logits, score, _ = module(x)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(score, det.score(x), rtol=1e-5, atol=1e-4)
    assert not any(m._forward_hooks for m in model.modules())  # the hooks live on the module's own copy
    exported = torch.export.export(module, (x[:4],))
    for a, b in zip(exported.module()(x[:4]), module(x[:4]), strict=True):
        torch.testing.assert_close(a, b)


def test_as_module_never_changes_the_users_model_mode():
    model = TinyResNet().train()
    model.layer1[0].bn.eval()  # a frozen BatchNorm
    modes = [m.training for m in model.modules()]
    x = torch.rand(30, 1, 8, 8)
    det = FailureDetector(n_components=2, progress=False).fit(model, [(x,)])
    module = det.as_module(threshold=0.0)
    assert [m.training for m in model.modules()] == modes
    assert not module.training and not any(m.training for m in module.modules())
    torch.testing.assert_close(module(x)[1], det.score(x), rtol=1e-5, atol=1e-4)
    assert [m.training for m in model.modules()] == modes


def test_concurrent_scores_equal_serial(resnet_detector):
    det, _, x = resnet_detector
    chunks = [x[i : i + 10] for i in range(0, 100, 10)] * 3
    serial = [det.score(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=6) as pool:
        threaded = list(pool.map(det.score, chunks))
    for a, b in zip(serial, threaded, strict=True):
        assert torch.equal(a, b)


def test_serving_example_scores_a_batch_file(tmp_path):
    import importlib.util
    from pathlib import Path

    import numpy as np

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("serve_example", root / "examples" / "serve.py")
    serve_example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_example)
    (tmp_path / "net.py").write_text(
        "from torch import nn\n\ndef make():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))\n"
    )
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    torch.save(net.state_dict(), tmp_path / "net.pt")
    x = torch.rand(200, 1, 4, 4)
    det = FailureDetector(n_components=3, progress=False).fit(net, [(x,)])
    det.threshold_ = float(det.score(x).quantile(0.1))
    det.save(tmp_path / "det.safetensors")
    batch = (np.random.default_rng(0).random((7, 4, 4, 1)) * 255).astype(np.uint8)
    np.savez(tmp_path / "batch.npz", x=batch)
    rows = serve_example.serve(
        f"{tmp_path / 'net.py'}:make",
        str(tmp_path / "net.pt"),
        str(tmp_path / "det.safetensors"),
        str(tmp_path / "batch.npz"),
    )
    images = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    expected = det.score(images)
    assert [r["score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-5)
    assert [r["likely_failure"] for r in rows] == (expected < det.threshold_).tolist()
