"""Settings belong to their scorer: validated, never dropped, explicit in the config, saved and loaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from featurefail import DetectorConfig, FailureDetector, Features
from featurefail.detector import DEFAULT_DETECTOR
from featurefail.scorers import GMMScorer, PerLayer, available_scorers, build_scorer


def blobs(n: int = 400, d: int = 6, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g) + 4 * (torch.arange(n) % 3)[:, None]
    labels = torch.arange(n) % 3
    logits = torch.nn.functional.one_hot(labels, 3).float() * 3 + torch.randn(n, 3, generator=g)
    return Features(feats, logits, labels)


def test_every_registered_scorer_reports_json_settings_that_rebuild_it():
    for name in available_scorers():
        if name.startswith(("test_", "spy", "leaky")):
            continue
        params = build_scorer(name).get_params()
        json.dumps(params)  # serialisable, dtype included
        assert build_scorer(name, params).get_params() == params, name


def test_keyword_settings_reach_the_scorer_they_belong_to():
    feats = blobs()
    fused = FailureDetector(scorer="fused", n_components=7, progress=False).fit_features(feats)
    assert fused.config.scorer_options["n_components"] == 7
    assert fused.scorer_.gmm_scorer_.gmm_.n_components == 7
    zh = FailureDetector(scorer="zheng_hong", n_components=2, progress=False).fit_features(feats)
    assert {g.n_components for g in zh.scorer_.class_gmms_} == {2}


def test_unknown_or_invalid_settings_are_errors_naming_the_setting_and_the_scorer():
    with pytest.raises(ValueError, match="scorer 'max_softmax' has no setting 'n_components'"):
        FailureDetector(scorer="max_softmax", n_components=3)
    with pytest.raises(ValueError, match="scorer 'mahalanobis' has no setting 'preprocess'"):
        FailureDetector(scorer="mahalanobis", scorer_options={"preprocess": "l2"})
    with pytest.raises(ValueError, match="n_components"):
        FailureDetector(scorer="gmm", n_components=0)
    with pytest.raises(ValueError, match="preprocess"):
        GMMScorer(preprocess="whiten-it-all")
    config = FailureDetector(scorer="gmm").config
    with pytest.raises(ValueError, match="scorer 'max_softmax' has no setting"):
        config.scorer = "max_softmax"  # the gmm settings do not fit max_softmax: no silent drop
    with pytest.raises(ValueError, match="given beside a scorer instance"):
        FailureDetector(scorer=GMMScorer(), n_components=3)


def test_a_scorer_instance_reports_its_own_settings_and_they_are_saved(tmp_path):
    det = FailureDetector(scorer=GMMScorer(n_components=5, max_iter=20), progress=False)
    assert det.config.scorer_options["n_components"] == 5 and det.config.scorer_options["preprocess"] is None
    assert det.config.per_layer is False and det.config.layer is None
    det.fit_features(blobs())
    det.save(tmp_path / "d.safetensors")
    back = FailureDetector.load(tmp_path / "d.safetensors")
    assert back.config == det.config and back.scorer_.gmm_.n_components == 5
    wrapped = FailureDetector(scorer=PerLayer(GMMScorer(n_components=2)), progress=False)
    assert wrapped.config.per_layer is True and wrapped.config.scorer_options["n_components"] == 2


def test_dtype_is_a_string_setting_that_round_trips(tmp_path):
    det = FailureDetector(scorer="gmm", n_components=3, dtype=torch.float64, progress=False)
    assert det.config.scorer_options["dtype"] == "float64"
    det.fit_features(blobs())
    assert det.scorer_.gmm_.dtype == torch.float64
    det.save(tmp_path / "d.safetensors")
    back = FailureDetector.load(tmp_path / "d.safetensors")
    assert back.config.scorer_options["dtype"] == "float64"
    x = blobs(seed=1)
    assert torch.equal(back.score_features(x), det.score_features(x))


def test_defaults_are_explicit_values_in_one_place():
    config = FailureDetector().config
    assert config.scorer == DEFAULT_DETECTOR["scorer"] and config.layer == DEFAULT_DETECTOR["layer"]
    assert config.per_layer is DEFAULT_DETECTOR["per_layer"]
    assert config.scorer_options == GMMScorer(**DEFAULT_DETECTOR["scorer_options"], random_state=0).get_params()
    assert FailureDetector(seed=4).config.scorer_options["random_state"] == 4
    assert FailureDetector(scorer="gmm").config == DetectorConfig(scorer="gmm", scorer_options=GMMScorer().get_params())


def test_architecture_page_example_runs_and_is_the_one_shown():
    """docs/architecture.md shows examples/custom_scorer.py's scorer; running the example checks it plugs into
    FailureDetector, save/load and as_module()."""
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    example = (root / "examples" / "custom_scorer.py").read_text()
    page = (root / "docs" / "architecture.md").read_text()
    shown = example[example.index("from typing import Annotated") : example.index('\n\nif __name__ == "__main__":')]
    assert shown in page
    runpy.run_path(str(root / "examples" / "custom_scorer.py"), run_name="__main__")


def test_describe_shows_what_fit_will_hook_before_fitting():
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).train()
    x = torch.rand(4, 3, 16, 16)
    plan = FailureDetector().describe(model, x[:2])
    assert model.training and all(m.training for m in model.modules())  # the user's mode is left as it was
    assert plan.heads == ("6",) and plan.n_classes == 4 and plan.widths[0] == 16
    fitted = FailureDetector(n_components=2, progress=False).fit(model, [x, x])
    assert list(plan.layers) == fitted.layers_ and sum(plan.widths) == fitted.n_features_
    assert "head input" in str(plan)
    assert FailureDetector.paper().describe(model, x[:2]).widths == (16,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_when_built_and_a_gpu_file_loads_on_the_cpu(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        FailureDetector(device="cuda")  # used to pass, then fail inside fit with torch's AssertionError
    with pytest.raises(ValueError, match="CUDA is not available"):
        FailureDetector(scorer="gmm", n_components=2, device="cuda:1")  # the scorer's own device too
    features = Features(torch.randn(60, 4, generator=torch.Generator().manual_seed(0)))
    detector = FailureDetector(n_components=2, progress=False).fit_features(features)
    path = tmp_path / "det.safetensors"
    detector.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps(json.loads(meta["config"]) | {"device": "cuda"})  # as a GPU machine writes it
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="device='cpu'"):
        FailureDetector.load(path)
    loaded = FailureDetector.load(path, device="cpu")
    assert torch.equal(loaded.score_features(features), detector.score_features(features))
