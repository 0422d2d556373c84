"""Today's post-hoc detectors (issue 21): each against an independent reference, and through FailureDetector."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from featurefail import FailureDetector, Features, metrics
from featurefail.scorers import ASH, KNN, ODIN, Energy, ModelContext, ReAct, RelativeMahalanobis, ViM, get_scorer
from featurefail.scorers.modules import kth_neighbour_distance
from featurefail.scorers.vim import default_vim_dim

# the state entry a damaged file spoils in the round-trip test
DAMAGE = {
    "knn": "bank",
    "vim": "origin",
    "react": "head_bias",
    "ash": "head_bias",
    "relative_mahalanobis": "class.means",
}
NEW = ["energy", "knn", "vim", "react", "ash", "odin", "relative_mahalanobis"]


def head_task(n=400, d=16, c=4, seed=0):
    """Non-negative (post-ReLU-like) class-clustered features, a random linear head and its logits."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    centres = torch.rand(c, d, generator=g) * 3
    feats = F.relu(centres[labels] + torch.randn(n, d, generator=g))
    weight, bias = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    return Features(feats, feats @ weight.T + bias, labels), weight, bias


def with_head(scorer, weight, bias):
    scorer.attach(ModelContext(head_weight=weight, head_bias=bias))
    return scorer


def np64(t):
    return t.double().numpy()


# ---- references ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5, 7.0])
def test_energy_matches_scipy_logsumexp(temperature):
    z = torch.tensor([[1000.0, 999.0, -5.0], [0.1, 0.2, 0.3], [-800.0, -801.0, -900.0]])
    f = Features(torch.zeros(3, 2), z)
    s = Energy(temperature=temperature).fit(f).score(f)
    ref = temperature * logsumexp(np64(z) / temperature, axis=1)
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-6)
    assert s[0] > s[1] > s[2]  # larger logits = lower energy = more normal
    with pytest.raises(ValueError, match="temperature"):
        FailureDetector(scorer="energy", temperature=0.0)


@pytest.mark.parametrize("k", [1, 7, 50])
def test_knn_matches_sklearn_nearest_neighbours(k):
    g = torch.Generator().manual_seed(k)
    train = torch.randn(300, 8, generator=g) * torch.linspace(0.2, 3, 8)
    queries = torch.cat([torch.randn(45, 8, generator=g) * 2, train[:5]])  # 5 queries are bank rows
    scorer = KNN(k=k, chunk_size=7).fit(Features(train))  # chunks of 7 queries and 7 bank rows, ragged tails
    s = scorer.score(Features(queries))
    normalise = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    nn_ref = NearestNeighbors(n_neighbors=k).fit(normalise(np64(train)))
    ref = -nn_ref.kneighbors(normalise(np64(queries)))[0][:, -1]
    np.testing.assert_allclose(s.numpy(), ref, atol=1e-6)
    if k == 1:
        assert torch.all(s[-5:].abs() < 1e-6)  # a bank row is its own nearest neighbour
    # the bank chunking and the module form give the same numbers
    assert torch.equal(KNN(k=k, chunk_size=4096).fit(Features(train)).score(Features(queries)), s)
    torch.testing.assert_close(scorer.as_module()(queries), s)


def test_knn_kth_distance_survives_near_ties_and_scale():
    # many bank rows at almost the same distance: the exact float64 rescoring of the candidates decides
    g = torch.Generator().manual_seed(3)
    base = F.normalize(torch.randn(1, 32, generator=g), dim=1)
    bank = F.normalize(base + 1e-4 * torch.randn(500, 32, generator=g), dim=1)
    q = F.normalize(base + 1e-3 * torch.randn(20, 32, generator=g), dim=1)
    d = kth_neighbour_distance(q, bank, 10, chunk_size=64)
    ref = NearestNeighbors(n_neighbors=10).fit(np64(bank)).kneighbors(np64(q))[0][:, -1]
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="k=501"):
        kth_neighbour_distance(q, bank, 501)


def test_knn_bank_subsample_is_seeded_and_validated():
    feats = torch.randn(200, 5)
    a = KNN(k=3, max_bank=40, random_state=1).fit(Features(feats))
    b = KNN(k=3, max_bank=40, random_state=1).fit(Features(feats))
    c = KNN(k=3, max_bank=40, random_state=2).fit(Features(feats))
    assert a.bank_.shape == (40, 5) and torch.equal(a.bank_, b.bank_) and not torch.equal(a.bank_, c.bank_)
    normalised = F.normalize(feats.double(), dim=1).float()
    assert all((normalised == row).all(dim=1).any() for row in a.bank_)  # rows of the training set
    assert torch.equal(KNN(k=3, max_bank=500).fit(Features(feats)).bank_, normalised)
    with pytest.raises(ValueError, match="k=50 exceeds the 40 rows"):
        KNN(max_bank=40).fit(Features(feats))
    with pytest.raises(ValueError, match="k"):
        FailureDetector(scorer="knn", k=0)
    with pytest.raises(ValueError, match="not a torch device"):
        KNN(device="gpu:zero")


def test_vim_matches_a_numpy_transcription_of_the_paper_code():
    train, weight, bias = head_task()
    test, _, _ = head_task(n=100, seed=1)
    test = Features(torch.cat([test.feats[:95], 5 * torch.rand(5, 16)]))  # a few off-manifold rows
    scorer = with_head(ViM(dim=6), weight, bias).fit(train)
    s = scorer.score(test).double().numpy()
    # the authors' benchmark.py, transcribed
    w, b, f_train, f_test = np64(weight), np64(bias), np64(train.feats), np64(test.feats)
    u = -np.matmul(np.linalg.pinv(w), b)
    ec = EmpiricalCovariance(assume_centered=True).fit(f_train - u)
    eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[6:]]).T)
    vlogit_train = np.linalg.norm(np.matmul(f_train - u, ns), axis=-1)
    alpha = (f_train @ w.T + b).max(axis=-1).mean() / vlogit_train.mean()
    ref = -np.linalg.norm(np.matmul(f_test - u, ns), axis=-1) * alpha + logsumexp(f_test @ w.T + b, axis=-1)
    np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-4)
    assert scorer.alpha_ == pytest.approx(alpha, rel=1e-9)
    assert s[95:].mean() < s[:95].mean()  # rows off the training subspace score lower


def test_vim_dimension_rule_and_errors():
    assert [default_vim_dim(d) for d in (2048, 1500, 1024, 768, 512, 64, 1)] == [1000, 1000, 512, 512, 256, 32, 1]
    train, weight, bias = head_task()
    assert with_head(ViM(), weight, bias).fit(train).dim_ == 8
    with pytest.raises(ValueError, match=r"vim needs the classifier head; hook the head's input \(layer=None\)"):
        ViM().fit(train)
    with pytest.raises(ValueError, match="dim=16"):
        with_head(ViM(dim=16), weight, bias).fit(train)
    with pytest.raises(ValueError, match="takes 15 inputs"):
        with_head(ViM(), weight[:, :15], bias).fit(train)
    with pytest.raises(ValueError, match="first layer block"):
        scorer = ViM()
        scorer.attach(ModelContext(head_weight=weight, head_bias=bias, block=slice(16, 32)))
        scorer.fit(train)


@pytest.mark.parametrize("percentile", [90.0, 65.0])
def test_react_matches_numpy(percentile):
    train, weight, bias = head_task()
    test, _, _ = head_task(n=80, seed=2)
    scorer = with_head(ReAct(percentile=percentile), weight, bias).fit(train)
    c = np.percentile(np64(train.feats), percentile)
    assert scorer.threshold_ == pytest.approx(c, rel=1e-12)
    ref = logsumexp(np.minimum(np64(test.feats), c) @ np64(weight).T + np64(bias), axis=1)
    np.testing.assert_allclose(scorer.score(test).numpy(), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="percentile"):
        ReAct(percentile=101)


@pytest.mark.parametrize("percentile", [90.0, 65.0, 0.0])
def test_ash_s_matches_numpy(percentile):
    train, weight, bias = head_task()
    test, _, _ = head_task(n=80, seed=3)
    feats = torch.cat([test.feats, torch.zeros(1, 16)])  # an all-zero row is not rescaled (no 0/0)
    scorer = with_head(ASH(percentile=percentile), weight, bias).fit(train)
    ref = []
    for row in np64(feats):
        k = 16 - int(np.round(16 * percentile / 100))
        keep = np.argsort(-row, kind="stable")[:k]
        pruned = np.zeros_like(row)
        pruned[keep] = row[keep]
        scale = np.exp(row.sum() / pruned.sum()) if pruned.sum() > 0 else math.e
        ref.append(logsumexp((pruned * scale) @ np64(weight).T + np64(bias)))
    s = scorer.score(Features(feats))
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-6)
    assert torch.isfinite(s).all()
    with pytest.raises(ValueError, match="non-negative"):
        with_head(ASH(), weight, bias).fit(Features(train.feats - 1.0))
    with pytest.raises(ValueError, match="percentile"):
        ASH(percentile=100)


def test_relative_mahalanobis_matches_sklearn_empirical_covariance():
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 3, (500,), generator=g)
    feats = torch.randn(3, 6, generator=g)[labels] * 4 + torch.randn(500, 6, generator=g) @ torch.randn(6, 6)
    labels[:10] = -1  # unlabelled rows are left out of both fits
    train = Features(feats, labels=labels)
    queries = torch.cat([torch.randn(40, 6, generator=g) * 3, feats[:5] + 30.0])
    s = RelativeMahalanobis().fit(train).score(Features(queries)).double().numpy()
    f, y, q = np64(feats[10:]), labels[10:].numpy(), np64(queries)
    means = np.stack([f[y == c].mean(0) for c in range(3)])
    tied = EmpiricalCovariance(assume_centered=True).fit(f - means[y])
    d2 = np.stack([tied.mahalanobis(q - means[c]) for c in range(3)], axis=1)
    d0 = EmpiricalCovariance().fit(f).mahalanobis(q)
    np.testing.assert_allclose(s, -(d2.min(1) - d0), rtol=1e-4, atol=1e-4)
    assert s[-5:].max() < np.median(s[:40])  # far outliers are less normal
    module = RelativeMahalanobis().fit(train).as_module()
    torch.testing.assert_close(module(queries).double(), torch.from_numpy(s), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="labels"):
        RelativeMahalanobis().fit(Features(feats))


def odin_reference(model, x, temperature, epsilon):
    """ODIN written out: one signed gradient step on −log max softmax(z/T), then max softmax(z(x̃)/T)."""
    x = x.clone().requires_grad_(True)
    z = model(x)
    log_p = torch.log_softmax(z.double() / temperature, dim=1)
    loss = -log_p.gather(1, z.argmax(1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        z_tilde = model(x.detach() - epsilon * torch.sign(grad))
        return torch.softmax(z_tilde.double() / temperature, dim=1).max(dim=1).values


def batches(x, y, size=100):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_odin_matches_a_hand_written_autograd_loop(trained_mlp):
    model, splits = trained_mlp
    x_train, y_train = splits["train"]
    x_test = splits["test"][0]
    was_training = model.training
    grads_before = [p.grad for p in model.parameters()]
    det = FailureDetector(scorer="odin", temperature=10.0, epsilon=0.05, progress=False, batch_size=64)
    det.fit(model, batches(x_train, y_train))
    s = det.score(x_test)
    torch.testing.assert_close(s.double(), odin_reference(model, x_test, 10.0, 0.05), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(s.double(), odin_reference(model, x_test, 10.0, 0.0))  # the step matters
    assert model.training == was_training and [p.grad for p in model.parameters()] == grads_before
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="no module form"):
        det.scorer_.as_module()
    # epsilon = 0: the temperature-scaled max softmax of the logits, no model needed, deployable
    plain = ODIN(temperature=1000.0, epsilon=0.0)
    assert not plain.requires_model and not plain.requires_inputs
    logits = model(x_test).detach()
    f = Features(torch.zeros(len(x_test), 1), logits)
    ref = torch.softmax(logits.double() / 1000.0, dim=1).max(dim=1).values
    torch.testing.assert_close(plain.fit(f).score(f).double(), ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(plain.as_module()(f.feats, logits), plain.score(f))
    with pytest.raises(RuntimeError, match="needs the model"):
        ODIN(epsilon=0.01).fit(f).score(Features(f.feats, logits, inputs=x_test))


def test_odin_auto_chooses_on_in_distribution_validation(trained_mlp):
    model, splits = trained_mlp
    x_val, y_val = splits["val"]
    det = FailureDetector(scorer="odin", temperature="auto", epsilon="auto", progress=False)
    det.fit(model, batches(*splits["train"]))
    assert (det.scorer_.temperature_, det.scorer_.epsilon_) == (1.0, 0.0)  # before validation: plain softmax
    det.fit_validation(batches(x_val, y_val))
    scorer = det.scorer_
    assert set(scorer.search_) == {(t, e) for t in ODIN.TEMPERATURE_GRID for e in ODIN.EPSILON_GRID}
    best = max(scorer.search_.values())
    assert scorer.search_[(scorer.temperature_, scorer.epsilon_)] == best
    # one grid point recomputed independently: AUROC of correct vs wrong validation predictions
    correct = model(x_val).argmax(1) == y_val
    ref = odin_reference(model, x_val, 100.0, 0.002)
    assert scorer.search_[(100.0, 0.002)] == pytest.approx(metrics.auroc(ref[correct], ref[~correct]), abs=1e-9)
    assert torch.isfinite(det.score(splits["test"][0])).all()


# ---- through the detector --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_round_trip_through_the_detector(name, trained_mlp, tmp_path):
    model, splits = trained_mlp
    x_test = splits["test"][0]
    options = {"epsilon": 0.0} if name == "odin" else {}
    det = FailureDetector(scorer=name, progress=False, **options).fit(model, batches(*splits["train"]))
    scores = det.score(x_test)
    assert scores.shape == (len(x_test),) and torch.isfinite(scores).all()
    # mistakes score lower than correct predictions on average (a sanity check that the sign is right)
    correct = model(x_test).argmax(1) == splits["test"][1]
    assert scores[correct].mean() > scores[~correct].mean(), name
    det.save(tmp_path / "d.safetensors")
    back = FailureDetector.load(tmp_path / "d.safetensors", model=model)
    assert torch.equal(back.score(x_test), scores)
    with torch.no_grad():
        _, module_scores, flags = back.as_module(threshold=float(scores.median()))(x_test)
    torch.testing.assert_close(module_scores, scores, rtol=1e-5, atol=1e-5)
    assert flags.sum() in range(len(x_test) // 2 - 2, len(x_test) // 2 + 3)
    # a damaged state is refused
    state = det.scorer_.state_dict()
    with pytest.raises(ValueError):
        type(det.scorer_)(**det.scorer_.get_params()).load_state_dict({**state, "extra": 1.0})
    key = DAMAGE.get(name)
    if key is not None:
        for bad in (state[key] * float("nan"), state[key][..., :-1]):  # non-finite; inconsistent shapes
            with pytest.raises(ValueError):
                type(det.scorer_)(**det.scorer_.get_params()).load_state_dict({**state, key: bad})


def test_odin_perturbation_round_trips_and_is_not_deployable(trained_mlp, tmp_path):
    model, splits = trained_mlp
    det = FailureDetector(scorer="odin", progress=False).fit(model, batches(*splits["train"]))
    assert (det.scorer_.temperature_, det.scorer_.epsilon_) == (1000.0, 0.0014)  # the paper's CIFAR values
    scores = det.score(splits["test"][0])
    det.save(tmp_path / "d.safetensors")
    back = FailureDetector.load(tmp_path / "d.safetensors", model=model)
    assert torch.equal(back.score(splits["test"][0]), scores)
    with pytest.raises(TypeError, match="no module form"):
        back.as_module(threshold=0.5)
    with pytest.raises(ValueError, match="differs from the setting"):
        ODIN(epsilon=0.01).load_state_dict({"temperature": 1000.0, "epsilon": 0.0014})


def test_head_scorers_need_the_head_and_per_layer_scorers_sum_blocks(trained_mlp):
    model, splits = trained_mlp
    train, x_test = batches(*splits["train"]), splits["test"][0]
    with pytest.raises(ValueError, match=r"hook the head's input \(layer=None\)"):
        FailureDetector(scorer="vim", layer="1", progress=False).fit(model, train)
    with pytest.raises(ValueError, match="first layer block"):
        FailureDetector(scorer="react", layer=[None, "1"], per_layer=True, progress=False).fit(model, train)
    for name in ("knn", "relative_mahalanobis"):
        both = FailureDetector(scorer=name, layer=[None, "1"], per_layer=True, progress=False).fit(model, train)
        parts = [
            FailureDetector(scorer=name, layer=layer, progress=False).fit(model, train).score(x_test)
            for layer in (None, "1")
        ]
        torch.testing.assert_close(both.score(x_test), parts[0] + parts[1], rtol=1e-5, atol=1e-4)
    # precomputed features with an explicit head
    feats, weight, bias = head_task()
    det = FailureDetector(scorer="vim", progress=False).fit_features(feats, head=(weight, bias))
    torch.testing.assert_close(det.score_features(feats), with_head(ViM(), weight, bias).fit(feats).score(feats))
    assert get_scorer("vim").get_params() == {"dim": None}


def test_input_perturbing_scorers_leave_no_hook_behind_when_the_model_fails_midway(trained_mlp):
    model, splits = trained_mlp
    x_train, y_train = splits["train"]
    x_test = splits["test"][0][:130]
    for name, options in (("odin", {"temperature": 10.0, "epsilon": 0.05}), ("mahalanobis", {"epsilon": 0.01})):
        det = FailureDetector(scorer=name, **options, progress=False, batch_size=64)
        det.fit(model, batches(x_train, y_train))
        calls = {"n": 0}

        def fail_on_the_third_batch(module, args, calls=calls):
            calls["n"] += 1
            if calls["n"] > 4:  # two forward passes per batch: the third batch's first pass fails
                raise RuntimeError("boom")

        guard = model.register_forward_pre_hook(fail_on_the_third_batch)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                det.score(x_test)
        finally:
            guard.remove()
        hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
        assert hooks == [], name  # the detector's feature hook was removed although the pass raised
