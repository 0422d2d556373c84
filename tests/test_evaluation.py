"""Attacks, OOD sources, the evaluation runner, plots and the `featurefail evaluate` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from models import FunctionalCNN, train
from torch import nn

from featurefail import FailureDetector, Features
from featurefail.attacks import bim, fgsm
from featurefail.cli import main
from featurefail.evaluate import EvalResult, evaluate, holdout_split, parse_attack
from featurefail.ood import NpzImages, gaussian_noise, uniform_noise
from featurefail.plots import reliability_diagram, roc_pr_curves, score_histogram, write_report
from featurefail.scorers import Scorer, register_scorer


def test_fgsm_equals_the_closed_form_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(12, 4)
    x, y = torch.rand(30, 12), torch.randint(0, 4, (30,))
    p = torch.softmax(model(x), 1) - torch.nn.functional.one_hot(y, 4).float()
    grad = p @ model.weight  # d CE / d x for a linear model
    expected = (x + 0.05 * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(fgsm(model, x, y, 0.05), expected)


@pytest.mark.parametrize("attack", ["fgsm", "bim"])
def test_attacks_stay_in_the_ball_and_range_and_restore_the_model(attack):
    model = train(FunctionalCNN(), torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,)), epochs=2).train()
    model.zero_grad(set_to_none=True)
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 3, (20,))
    eps = 0.1
    adv = fgsm(model, x, y, eps) if attack == "fgsm" else bim(model, x, y, eps, alpha=0.03, steps=7)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        loss = lambda z: torch.nn.functional.cross_entropy(model(z), y)  # noqa: E731
        assert loss(adv) > loss(x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fgsm(model, x * 3, y, eps)


def test_parse_attack():
    assert parse_attack("fgsm:0.03") == ("fgsm", 0.03)
    assert parse_attack("bim:8/255") == ("bim", pytest.approx(8 / 255))
    for bad in ("pgd:0.1", "fgsm", "fgsm:-1"):
        with pytest.raises(ValueError):
            parse_attack(bad)


def test_ood_sources(tmp_path):
    ref = torch.rand(100, 3, 8, 8) * 0.5
    noise = gaussian_noise(ref, 40, seed=1)
    assert noise.shape == (40, 3, 8, 8) and noise.min() >= 0 and noise.max() <= 1
    assert abs(noise.mean() - ref.mean()) < 0.05
    assert uniform_noise((1, 4, 4), 5).shape == (5, 1, 4, 4)
    x = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x=x, y=np.arange(6))
    images = NpzImages(tmp_path / "grey.npz", size=32, channels=3)
    assert images.images.shape == (6, 3, 32, 32) and images.labels.tolist() == list(range(6))
    assert images.images.min() >= 0 and images.images.max() <= 1
    same = NpzImages(tmp_path / "grey.npz")
    torch.testing.assert_close(same.images[:, 0], torch.from_numpy(x[..., 0]).float() / 255)
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(ValueError, match="no array 'x'"):
        NpzImages(tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def tiny_task():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(700, 1, 8, 8, generator=g)
    y = ((x[:, 0, :, :4].mean((1, 2)) - x[:, 0, :, 4:].mean((1, 2))) * 20).round().clamp(-1, 1).long() + 1
    model = train(FunctionalCNN(), x[:400], y[:400], epochs=8)
    return model, (x[:400], y[:400]), (x[400:550], y[400:550]), (x[550:], y[550:])


SEEN: list[int] = []


@register_scorer("spy")
class SpyScorer(Scorer):
    """Records how many rows every fit received (test-only scorer)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, features: Features) -> SpyScorer:
        SEEN.append(len(features))
        return self

    def fit_validation(self, features: Features) -> SpyScorer:
        SEEN.append(len(features))
        return self

    def score(self, features: Features) -> torch.Tensor:
        return -features.feats.norm(dim=1)


def test_runner_every_scorer_every_source_and_no_failure_in_fitting(tiny_task, tmp_path):
    model, tr, va, te = tiny_task
    SEEN.clear()
    fast = {
        "vae": {"epochs": 3, "hidden": 16, "latent": 4},
        "maf": {"epochs": 3, "hidden": 8, "transforms": 1},
        "pixelcnn": {"epochs": 1, "hidden": 8, "blocks": 1},
        "gmm": {"n_components": 3},
        "zheng_hong": {"n_components": 1},
    }
    names = [
        "gmm",
        "max_softmax",
        "max_logit",
        "temperature",
        "mahalanobis",
        "zheng_hong",
        "vae",
        "maf",
        "pixelcnn",
        "spy",
    ]
    result = evaluate(
        model,
        tr,
        va,
        te,
        scorers=names,
        scorer_options=fast,
        ood={"noise": gaussian_noise(tr[0], 60)},
        attacks=["fgsm:0.1", "bim:0.1"],
        seeds=[0, 1],
    )
    sources = {r.source for r in result.rows}
    assert {"test mistakes", "fgsm ε=0.1", "bim ε=0.1", "ood: noise"} <= sources
    assert len(result.rows) == len(sources) * len(names)
    for r in result.rows:
        for v in (r.auroc, r.aupr_in, r.aupr_out, r.fpr95):
            assert math.isfinite(v) and 0 <= v <= 1
        assert r.n_failure > 0 and r.seeds == 2
    assert SEEN == [400, 150] * 2  # training then validation rows, once per seed, nothing else
    assert set(result.mann_whitney) == set(names)
    md = result.to_markdown()
    assert "AUROC" in md and "±" in md
    back = json.loads(result.to_json(tmp_path / "r.json").read_text())
    assert len(back["rows"]) == len(result.rows)
    reread = EvalResult.from_json(tmp_path / "r.json")
    assert reread.rows == result.rows and reread.mann_whitney == result.mann_whitney
    assert (tmp_path / "r.csv").exists() is False and result.to_csv(tmp_path / "r.csv").stat().st_size > 100
    report = write_report(result, tmp_path / "report")
    assert "![histogram](histogram.png)" in report.read_text()
    for png in (tmp_path / "report").glob("*.png"):
        assert png.stat().st_size > 5000


def test_plots_write_files(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 200), rng.normal(0, 1, 50)
    assert score_histogram({"normal": a, "failure": b}, tmp_path / "h.png").stat().st_size > 5000
    assert roc_pr_curves({"s": (a, b)}, tmp_path / "c.png").stat().st_size > 5000
    logits = torch.randn(300, 4) * 3
    labels = torch.randint(0, 4, (300,))
    assert reliability_diagram(logits, labels, tmp_path / "r.png", temperature=2.0).stat().st_size > 5000
    with pytest.raises(ValueError, match="no finite"):
        score_histogram({"x": [np.inf]}, tmp_path / "none.png")


def test_holdout_split():
    tr, va = holdout_split(100, 0.2)
    assert len(va) == 20 and len(tr) == 80 and not set(tr.tolist()) & set(va.tolist())
    assert torch.equal(holdout_split(100, 0.2)[1], va)


MODEL_FILE = """
import torch
from torch import nn

def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
"""


def test_cli_evaluate_smoke(tmp_path, capsys):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    for name, n in (("train", 300), ("test", 120)):
        np.savez(
            tmp_path / f"{name}.npz", x=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), y=rng.integers(0, 3, n)
        )
    np.savez(tmp_path / "ood.npz", x=rng.integers(0, 256, (50, 16, 16, 3), dtype=np.uint8))
    code = main(
        [
            "evaluate",
            "--model",
            f"{tmp_path / 'net.py'}:make",
            "--weights",
            str(tmp_path / "net.pt"),
            "--train",
            str(tmp_path / "train.npz"),
            "--test",
            str(tmp_path / "test.npz"),
            "--ood",
            f"colour={tmp_path / 'ood.npz'}",
            "--attack",
            "fgsm:0.05",
            "--scorers",
            "default,gmm,max_logit",
            "--n-components",
            "3",
            "--option",
            "gmm.max_iter=20",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "ood: colour" in out and "fgsm" in out
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "results.csv").exists()


def test_cli_default_row_is_exactly_the_default_detector(tmp_path, monkeypatch):
    """One pipeline: the `default` row of `featurefail evaluate` scores the test set exactly as
    FailureDetector().fit(model, train).score(test) does."""
    from featurefail import plots
    from featurefail.evaluate import holdout_split

    (tmp_path / "net.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    x = {name: rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8) for name, n in (("train", 300), ("test", 90))}
    for name in x:
        np.savez(tmp_path / f"{name}.npz", x=x[name], y=rng.integers(0, 3, len(x[name])))
    captured = {}
    write_report_itself = plots.write_report

    def keep(result, out, **kwargs):
        captured["result"] = result
        return write_report_itself(result, out, **kwargs)

    monkeypatch.setattr(plots, "write_report", keep)
    args = ["evaluate", "--model", f"{tmp_path / 'net.py'}:make", "--weights", str(tmp_path / "net.pt")]
    args += ["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz")]
    args += ["--scorers", "default", "--n-components", "2", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    result = captured["result"]
    to_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    x_train = to_tensor(x["train"])[holdout_split(300, 0.1)[0]]
    net.eval()
    detector = FailureDetector(n_components=2, progress=False).fit(net, [(x_train,)])
    expected = detector.score(to_tensor(x["test"]))
    labels = torch.from_numpy(np.load(tmp_path / "test.npz")["y"])
    with torch.no_grad():
        correct = net(to_tensor(x["test"])).argmax(1) == labels
    normal, failed = result.scores["test mistakes"]["default"]
    np.testing.assert_array_equal(normal, expected[correct].numpy())
    np.testing.assert_array_equal(failed, expected[~correct].numpy())


def test_detector_temperature_reliability_story(tiny_task, tmp_path):
    model, tr, va, te = tiny_task
    det = FailureDetector(scorer="temperature", progress=False).fit(model, [tr]).calibrate([va], folds=2)
    f = det.features(te[0])
    path = reliability_diagram(f.logits, te[1], tmp_path / "rel.png", temperature=det.scorer_.temperature_)
    assert path.stat().st_size > 5000


def test_dataset_and_folder_sources(tmp_path):
    from PIL import Image

    from featurefail.ood import DatasetImages, ImageFolder, load_images

    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)) for _ in range(4)]
    data = DatasetImages([(im, i % 2) for i, im in enumerate(pil)], size=8, channels=1)
    assert data.images.shape == (4, 1, 8, 8) and data.labels.tolist() == [0, 1, 0, 1]
    unlabelled = DatasetImages([torch.rand(3, 8, 8) for _ in range(3)])
    assert unlabelled.labels is None and unlabelled.images.shape == (3, 3, 8, 8)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for j in range(2):
            pil[j].save(tmp_path / "imgs" / cls / f"{j}.png")
    folder = load_images(tmp_path / "imgs", size=16)
    assert isinstance(folder, ImageFolder) and folder.classes == ["cat", "dog"]
    assert folder.images.shape == (4, 3, 16, 16) and folder.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(
        ImageFolder(tmp_path / "imgs").images[0].permute(1, 2, 0).numpy() * 255, np.asarray(pil[0]), atol=1e-3
    )


def test_collected_data_round_trips_and_rescoring_equals_evaluate(tiny_task, tmp_path):
    from featurefail.evaluate import EvalData, collect, evaluate_features

    model, tr, va, te = tiny_task
    data = collect(model, tr, va, te, ood={"noise": gaussian_noise(tr[0], 40)}, attacks=["fgsm:0.1"])
    data.save(tmp_path / "cache.safetensors")
    back = EvalData.load(tmp_path / "cache.safetensors")
    assert [s.name for s in back.sources] == [s.name for s in data.sources]
    assert torch.equal(back.test.feats, data.test.feats) and torch.equal(
        back.sources[0].normal_mask, data.sources[0].normal_mask
    )
    direct = evaluate(
        model,
        tr,
        va,
        te,
        scorers=["gmm", "max_logit"],
        scorer_options={"gmm": {"n_components": 3}},
        ood={"noise": gaussian_noise(tr[0], 40)},
        attacks=["fgsm:0.1"],
    )
    cached = evaluate_features(back, scorers=["gmm", "max_logit"], scorer_options={"gmm": {"n_components": 3}})
    assert [(r.source, r.scorer, r.auroc) for r in cached.rows] == [(r.source, r.scorer, r.auroc) for r in direct.rows]


def test_collect_with_auto_layers_round_trips_and_block_zero_is_the_penultimate(tiny_task, tmp_path):
    from featurefail.evaluate import EvalData, collect

    model, tr, va, te = tiny_task
    multi = collect(model, tr, va, te, ood={"noise": gaussian_noise(tr[0], 30)}, layer="auto")
    single = collect(model, tr, va, te, ood={"noise": gaussian_noise(tr[0], 30)})
    assert multi.layers[0] is None and multi.layers[1].startswith("conv1") and multi.train.blocks == (20, 8)
    multi.save(tmp_path / "multi.safetensors")
    back = EvalData.load(tmp_path / "multi.safetensors")
    assert back.layers == multi.layers and back.sources[-1].failures.blocks == (20, 8)
    penultimate = back.select_blocks(0)
    assert penultimate.layers == [None] and penultimate.train.blocks is None
    for a, b in zip(
        [penultimate.train, penultimate.test, penultimate.sources[-1].failures],
        [single.train, single.test, single.sources[-1].failures],
        strict=True,
    ):
        torch.testing.assert_close(a.feats, b.feats)
