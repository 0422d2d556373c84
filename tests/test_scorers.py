"""Every scorer: shapes, sign convention, reference checks, error cases; all of them through FailureDetector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from models import FunctionalCNN, train
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from featurefail import FailureDetector, Features, NotFittedError, metrics
from featurefail.scorers import (
    GMMScorer,
    Mahalanobis,
    MaxLogit,
    MaxSoftmax,
    PixelCNNScorer,
    TemperatureScaling,
    ZhengHong,
    available_scorers,
    get_scorer,
)

FAST = {
    "gmm": dict(n_components=4),
    "vae": dict(hidden=32, latent=4, epochs=15),
    "maf": dict(hidden=16, transforms=2, epochs=15),
    "pixelcnn": dict(hidden=8, blocks=1, epochs=1),
    "zheng_hong": dict(n_components=2),
    "fused": dict(n_components=4),
}


def labelled(n=600, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    feats = torch.randn(3, d, generator=g)[y] * 3 + torch.randn(n, d, generator=g)
    logits = feats[:, :3] * 2
    return Features(feats, logits, y)


def test_registry_and_errors():
    assert {
        "gmm",
        "max_softmax",
        "max_logit",
        "temperature",
        "mahalanobis",
        "zheng_hong",
        "vae",
        "maf",
        "pixelcnn",
    } <= set(available_scorers())
    assert isinstance(get_scorer("gmm", n_components=3), GMMScorer)
    with pytest.raises(ValueError, match="unknown scorer"):
        get_scorer("no_such_scorer")


@pytest.mark.parametrize("scorer", [MaxSoftmax(), MaxLogit()])
def test_logit_scorers_sign(scorer):
    f = Features(torch.zeros(2, 3), torch.tensor([[5.0, 0.0, 0.0], [0.4, 0.3, 0.2]]))
    s = scorer.fit(f).score(f)
    assert s.shape == (2,) and s[0] > s[1]
    with pytest.raises(ValueError, match="logits"):
        scorer.fit(Features(torch.zeros(2, 3)))


def test_temperature_matches_scipy_and_lowers_ece():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (2000,), generator=g)
    clean = torch.randn(2000, 5, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 5)
    logits = clean * 4.0  # an over-confident model
    f = Features(torch.zeros(2000, 2), logits, y)
    ts = TemperatureScaling().fit(f).fit_validation(f)
    z, labels = logits.double().numpy(), y.numpy()

    def nll(log_t):
        return -log_softmax(z / math.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean()

    ref = math.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded", options={"xatol": 1e-10}).x)
    assert abs(ts.temperature_ - ref) < 1e-3
    assert ts.temperature_ > 1.0
    assert metrics.ece(logits / ts.temperature_, y) <= metrics.ece(logits, y)
    with pytest.raises(NotFittedError, match="calibrate"):
        TemperatureScaling().fit(f).score(f)


def test_mahalanobis_matches_numpy_reference():
    f = labelled()
    m = Mahalanobis().fit(f)
    x, y = f.feats.double().numpy(), f.labels.numpy()
    mus = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - mus[y]
    cov = centred.T @ centred / len(x)
    prec = np.linalg.inv(cov)
    probe = np.random.default_rng(0).normal(size=(10, 6)) * 3
    d2 = np.stack([np.einsum("nd,de,ne->n", probe - mu, prec, probe - mu) for mu in mus], 1)
    np.testing.assert_allclose(m.score(Features(torch.tensor(probe))).double().numpy(), -0.5 * d2.min(1), rtol=1e-5)
    shrunk = Mahalanobis(shrinkage=0.5).fit(f)
    assert not torch.allclose(shrunk.score(f), m.score(f))
    with pytest.raises(ValueError, match="labels"):
        Mahalanobis().fit(Features(f.feats))
    with pytest.raises(ValueError, match="two classes"):
        Mahalanobis().fit(Features(f.feats, labels=torch.zeros(len(f), dtype=torch.int64)))


def test_zheng_hong_uses_the_predicted_class_and_per_class_thresholds():
    f = labelled()
    zh = ZhengHong(n_components=2, random_state=0).fit(f)
    s = zh.score(f)
    every = zh.class_log_likelihoods(f.feats)
    torch.testing.assert_close(s, every.gather(1, f.predictions[:, None]).squeeze(1))
    far = Features(f.feats + 50, f.logits)
    assert zh.score(far).max() < s.min()
    wrong = Features(f.feats, f.logits, (f.labels + (torch.arange(len(f)) % 7 == 0).long()) % 3)
    thresholds = zh.per_class_thresholds(wrong, folds=3)
    assert set(thresholds) == {0, 1, 2}


@pytest.mark.parametrize("name", ["vae", "maf"])
def test_feature_density_scorers_rank_outliers_low(name):
    f = labelled(n=500)
    scorer = get_scorer(name, **FAST[name]).fit(f)
    inside, outside = scorer.score(f), scorer.score(Features(f.feats * 4 + 10))
    assert inside.shape == (500,) and torch.isfinite(inside).all()
    assert metrics.auroc(inside, outside) > 0.95
    assert scorer.loss_history_[-1] < scorer.loss_history_[0]


def test_pixelcnn_scores_bits_per_dim_and_checks_inputs():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(200, 1, 16, 16, generator=g), 3, 1, 1)
    x = torch.nn.functional.interpolate(smooth, size=8)
    scorer = PixelCNNScorer(hidden=16, blocks=1, epochs=30, lr=3e-3).fit(Features(torch.zeros(200, 1), inputs=x))
    s = scorer.score(Features(torch.zeros(200, 1), inputs=x))
    noise = scorer.score(Features(torch.zeros(50, 1), inputs=torch.rand(50, 1, 8, 8, generator=g)))
    assert s.shape == (200,) and (s < 0).all()
    assert s.mean() > -8.0  # better than the uniform 8 bits per dimension
    assert s.mean() > noise.mean()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.fit(Features(torch.zeros(3, 1), inputs=x[:3] * 3))
    with pytest.raises(ValueError, match="inputs"):
        scorer.fit(Features(torch.zeros(3, 1)))
    sub = PixelCNNScorer(hidden=4, blocks=1, epochs=1, max_train=30).fit(Features(torch.zeros(200, 1), inputs=x))
    assert sub.n_train_ == 30 and sub.get_config()["max_train"] == 30
    with pytest.raises(ValueError, match="max_train"):
        PixelCNNScorer(max_train=0)


@pytest.fixture(scope="module")
def cnn_task():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(500, 1, 8, 8, generator=g)
    y = ((x[:, 0, :, :4].mean((1, 2)) - x[:, 0, :, 4:].mean((1, 2))) * 20).round().clamp(-1, 1).long() + 1
    model = train(FunctionalCNN(), x[:300], y[:300], epochs=10)
    loader = lambda a, b: [(a[i : i + 100], b[i : i + 100]) for i in range(0, len(a), 100)]  # noqa: E731
    return model, loader(x[:300], y[:300]), loader(x[300:400], y[300:400]), x[400:]


@pytest.mark.parametrize(
    "name", ["gmm", "max_softmax", "max_logit", "temperature", "mahalanobis", "zheng_hong", "vae", "maf", "pixelcnn"]
)
def test_every_registered_scorer_through_the_detector(name, cnn_task, tmp_path):
    model, train_loader, val_loader, x_test = cnn_task
    det = FailureDetector(
        scorer=name,
        progress=False,
        scorer_options=FAST.get(name, {}) if name != "gmm" else {},
        **({"n_components": 4} if name == "gmm" else {}),
    )
    det.fit(model, train_loader).calibrate(val_loader, folds=2)
    scores = det.score(x_test)
    assert scores.shape == (100,) and torch.isfinite(scores).all()
    det.save(tmp_path / "d.safetensors")
    back = FailureDetector.load(tmp_path / "d.safetensors", model=model)
    torch.testing.assert_close(back.score(x_test), scores, rtol=1e-5, atol=1e-5)


def test_mahalanobis_preprocessing_picks_epsilon_on_validation(cnn_task):
    model, train_loader, val_loader, x_test = cnn_task
    det = FailureDetector(scorer="mahalanobis", progress=False, scorer_options={"epsilon": "auto"})
    det.fit(model, train_loader).calibrate(val_loader, folds=2)
    scorer = det.scorer_
    assert scorer.epsilon_ in scorer.epsilon_search_ and len(scorer.epsilon_search_) == 7
    assert torch.isfinite(det.score(x_test)).all()
    # Lee et al.'s several layers: one Mahalanobis per layer block, scores summed (the PerLayer wrapper)
    layered = FailureDetector(scorer="mahalanobis", layer=["conv1", "fc1"], per_layer=True, progress=False)
    layered.fit(model, train_loader)
    per_block = [
        FailureDetector(scorer="mahalanobis", layer=name, progress=False).fit(model, train_loader).score(x_test)
        for name in ("conv1", "fc1")
    ]
    torch.testing.assert_close(layered.score(x_test), per_block[0] + per_block[1], rtol=1e-5, atol=1e-3)
    with_eps = FailureDetector(
        scorer="mahalanobis", layer=[None, "conv1"], per_layer=True, epsilon=0.001, progress=False
    ).fit(model, train_loader)
    assert torch.isfinite(with_eps.score(x_test)).all()
