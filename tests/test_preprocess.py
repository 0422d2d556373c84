"""GMM feature preprocessing: the transforms, fitting without labels, save/load, as_module and purification."""

from __future__ import annotations

import pytest
import torch
from models import mlp, train

from featurefail import FailureDetector, Features
from featurefail.preprocess import make_transform
from featurefail.purify import bpd_gradient

SPECS = ["standardize", "pca", "pca:0.9", "l2", "tanh"]


def test_transforms_do_what_they_say():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2000, 6, generator=g) @ torch.randn(6, 6, generator=g) + 5
    z = make_transform("standardize").fit(f)(f)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(6), atol=1e-3, rtol=0)
    w = make_transform("pca").fit(f)(f).double()
    torch.testing.assert_close(w.T @ w / len(w), torch.eye(w.shape[1], dtype=torch.float64), atol=1e-3, rtol=0)
    assert make_transform("pca:0.5").fit(f)(f).shape[1] < 6
    assert torch.allclose(make_transform("l2")(f).norm(dim=1), torch.ones(2000))
    t = make_transform("tanh").fit(f)(f)
    assert t.abs().max() < 1
    assert make_transform(None) is None
    with pytest.raises(ValueError, match="unknown preprocessing"):
        make_transform("zca")


@pytest.fixture(scope="module")
def task():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (900,), generator=g)
    x = torch.randn(3, 16, generator=g)[y] + torch.randn(900, 16, generator=g) * 1.5
    return train(mlp(), x[:600], y[:600]), x


@pytest.mark.parametrize("spec", SPECS)
def test_each_option_fits_without_labels_and_round_trips(spec, task, tmp_path):
    model, x = task
    det = FailureDetector(n_components=3, preprocess=spec, progress=False).fit(model, [x[:600]])  # no labels
    scores = det.score(x[600:])
    assert torch.isfinite(scores).all()
    det.save(tmp_path / "d.safetensors")
    back = FailureDetector.load(tmp_path / "d.safetensors", model=model)
    assert back.config.scorer_options["preprocess"] == spec
    assert torch.equal(back.score(x[600:]), scores)
    _, module_scores, _ = det.as_module(threshold=0.0)(x[600:])
    torch.testing.assert_close(module_scores, scores, rtol=1e-5, atol=1e-4)
    bad = det.features(x[600:603])
    bad.feats[1] = float("nan")
    assert det.score_features(bad)[1] == -float("inf")


def test_purification_goes_through_the_transform(task):
    model, x = task
    det = FailureDetector(n_components=3, preprocess="tanh", per_layer=False, progress=False).fit(model, [x[:600]])
    feats = det.features(x[600:605]).feats.double()
    _, grad = bpd_gradient(det.scorer_.bpd_module(), feats)
    h = 1e-6
    step = torch.zeros_like(feats)
    step[:, 0] = h
    bpd = lambda f: det.scorer_.gmm_.bpd(det.scorer_.transform_(f))  # noqa: E731
    torch.testing.assert_close(grad[:, 0], (bpd(feats + step) - bpd(feats - step)) / (2 * h), rtol=1e-4, atol=1e-6)
    out = det.purify(Features(feats.float()), lr=0.01, nu=0.0, steps=5)
    assert (out.bpd_after <= out.bpd_before + 1e-6).all()


def test_fused_scorer_weights_are_chosen_on_validation_mistakes_only(task, tmp_path):
    from featurefail.metrics import auroc
    from featurefail.scorers import FusedScorer

    model, x = task
    det = FailureDetector(scorer="fused", scorer_options={"n_components": 3, "random_state": 0}, progress=False)
    det.fit(model, [x[:600]])
    assert det.scorer_.weight_ == 0.5
    g = torch.Generator().manual_seed(1)
    y = model(x[600:]).argmax(1)
    y = torch.where(torch.rand(300, generator=g) < 0.2, (y + 1) % 3, y)  # labels that make some predictions wrong
    det.calibrate([(x[600:], y)], folds=3)
    search = det.scorer_.weight_search_
    assert len(search) == 21 and det.scorer_.weight_ == max(search, key=lambda w: (round(search[w], 6), w))
    feats = det.features(x[600:])
    val = Features(feats.feats, feats.logits, y)
    s = det.scorer_.score(val)
    assert auroc(s[val.correct], s[~val.correct]) == pytest.approx(search[det.scorer_.weight_])
    det.save(tmp_path / "f.safetensors")
    back = FailureDetector.load(tmp_path / "f.safetensors", model=model)
    assert torch.equal(back.score(x[600:]), det.score(x[600:]))
    pure_gmm = FusedScorer(weight=1.0, n_components=3, random_state=0).fit(feats)
    torch.testing.assert_close(pure_gmm.score(feats).argsort(), pure_gmm.gmm_scorer_.score(feats).argsort())


@pytest.mark.parametrize("per_layer", [False, True])
def test_features_of_several_layers_fit_without_labels_and_round_trip(per_layer, task, tmp_path):
    from featurefail.scorers import GMMScorer

    model, x = task
    det = FailureDetector(
        n_components=3, layer=[None, "1"], preprocess="standardize", per_layer=per_layer, progress=False
    ).fit(model, [x[:600]])  # no labels
    feats = det.features(x[600:])
    assert feats.blocks == (24, 24)
    scores = det.score(x[600:])
    assert torch.isfinite(scores).all()
    if per_layer:  # one preprocessing + mixture per layer, log-likelihoods summed
        train = det.features(x[:600])
        parts = [
            GMMScorer(n_components=3, random_state=0, preprocess="standardize")
            .fit(train.select_blocks(i))
            .score(feats.select_blocks(i))
            for i in range(2)
        ]
        torch.testing.assert_close(scores, parts[0] + parts[1])
    det.save(tmp_path / "d.safetensors")
    back = FailureDetector.load(tmp_path / "d.safetensors", model=model)
    assert back.config.layer == [None, "1"]
    assert torch.equal(back.score(x[600:]), scores)
    _, module_scores, _ = det.as_module(threshold=0.0)(x[600:])
    torch.testing.assert_close(module_scores, scores, rtol=1e-5, atol=1e-4)
    if per_layer:  # the penultimate layer's mixture purifies the penultimate block
        out = det.purify(x[600:605], steps=3)
        assert out.features.shape == (5, 24) and (out.bpd_after <= out.bpd_before).all()
    else:
        with pytest.raises(ValueError, match="several layers"):
            det.purify(x[600:605])


def test_per_layer_on_one_layer_is_one_mixture(task):
    model, x = task
    options = dict(n_components=3, layer=None, preprocess="l2", progress=False)
    one = FailureDetector(per_layer=True, **options).fit(model, [x[:600]])
    plain = FailureDetector(per_layer=False, **options).fit(model, [x[:600]])
    assert one.scorer_.blocks_ == (24,)
    torch.testing.assert_close(one.score(x[600:]), plain.score(x[600:]))


def test_default_detector_is_the_study_choice_and_paper_is_the_raw_gmm(task):
    from featurefail.scorers import GMMScorer

    model, x = task
    default = FailureDetector(n_components=3, progress=False)
    preprocess = default.config.scorer_options["preprocess"]
    assert (default.config.layer, preprocess, default.config.per_layer) == ("auto", "l2", True)
    paper = FailureDetector.paper(n_components=3, progress=False).fit(model, [x[:600]])
    preprocess = paper.config.scorer_options["preprocess"]
    assert (paper.config.layer, preprocess, paper.config.per_layer) == (None, None, False)
    feats = paper.features(x[:600])
    raw = GMMScorer(n_components=3, random_state=0).fit(feats)
    torch.testing.assert_close(paper.score(x[600:]), raw.score(paper.features(x[600:])))
    assert FailureDetector(scorer="mahalanobis").config.layer is None


def test_runner_asserts_preprocessing_sees_only_training_features(task):
    from featurefail.evaluate import EvalData, Source, evaluate_features
    from featurefail.scorers import Scorer, register_scorer

    model, x = task
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[::7] = (y[::7] + 1) % 3  # some mistakes
    hook_feats = FailureDetector(n_components=3, layer=[None, "1"], progress=False).fit(model, [x[:600]])
    f = hook_feats.features(x)
    feats = Features(f.feats, f.logits, y, blocks=f.blocks)
    test = feats.subset(slice(700, 900))
    data = EvalData(
        feats.subset(slice(0, 600)),
        feats.subset(slice(600, 700)),
        test,
        [Source("test mistakes", "mistakes", test.subset(~test.correct), test.correct)],
    )
    for options in ({"preprocess": "pca"}, {"preprocess": "tanh", "per_layer": True}):
        result = evaluate_features(data, scorers=["gmm"], scorer_options={"gmm": {"n_components": 2, **options}})
        assert 0.0 <= result.rows[0].auroc <= 1.0

    @register_scorer("leaky_preprocessing")
    class LeakyScorer(Scorer):
        """Fits its preprocessing on the validation rows: the runner must refuse it."""

        def fit(self, features: Features) -> LeakyScorer:
            return self

        def fit_validation(self, features: Features) -> LeakyScorer:
            self.transform = make_transform("standardize").fit(features.feats)
            return self

        def score(self, features: Features) -> torch.Tensor:
            return -features.feats.norm(dim=1)

    with pytest.raises(AssertionError, match="not the training features"):
        evaluate_features(data, scorers=["leaky_preprocessing"])
