"""The reference-model training script (benchmarks/reference_models): every architecture trains a few steps on a
tiny synthetic set (shapes, the loss falls, weights round-trip through safetensors), and the recipe's pieces."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "reference_models"))
import cpu_speed
from architectures import ARCHITECTURES, Residual, WhitenedResNet9, WhitenedVGG, load_reference_model, make_model
from cifar_data import cifar10_splits, translate_and_flip
from cpu_speed import cpu_description
from train import (
    Recipe,
    accuracy,
    build_parser,
    mix_batch,
    mixed_cross_entropy,
    predict,
    pseudo_labels,
    train,
    triangle,
)
from train import main as train_main
from tta_study import main as tta_study_main


def synthetic_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose class is a colour tint plus a bright quadrant: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randint(0, 80, (n, 3, 32, 32), generator=g)
    for c in range(10):
        rows = y == c
        x[rows, c % 3] += 100
        r, q = (c // 3) % 2 * 16, (c // 6) * 16
        x[rows, :, r : r + 16, q : q + 16] += 70
    return x.clamp(0, 255).to(torch.uint8), y


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_architecture_trains_and_round_trips(arch, tmp_path):
    x, y = synthetic_images(128)
    model = make_model(arch)
    assert model(x[:4].float() / 255).shape == (4, 10)
    recipe = Recipe(epochs=6, batch=32, lr=0.5, whiten_bias_epochs=1)
    result = train(model, x, y, recipe, device=torch.device("cpu"), seed=0, bf16=False, channels_last=arch == "vgg")
    assert result["steps"] == 6 * 4 and len(result["losses"]) == 6
    assert sum(result["losses"][-2:]) / 2 < 0.85 * result["losses"][0], result["losses"]
    # save as the script does, load back: same logits
    from train import save

    info = {"name": arch, "arch": arch}
    save(model, info, tmp_path)
    assert json.loads((tmp_path / f"{arch}.json").read_text())["arch"] == arch
    loaded = load_reference_model(tmp_path / f"{arch}.safetensors")
    model.eval()
    with torch.no_grad():
        expected = model(x[:16].float() / 255)
        got = loaded(x[:16].float() / 255)
    # large weights are stored in bfloat16: equal only once the live model is rounded the same way
    from train import round_large_weights

    round_large_weights(model)
    with torch.no_grad():
        assert torch.allclose(loaded(x[:16].float() / 255), model(x[:16].float() / 255), atol=1e-5)
    assert got.shape == expected.shape


def test_mixed_cross_entropy_is_the_cross_entropy_of_the_mixed_smoothed_targets():
    """Cross-entropy is linear in the target: mixing the two losses equals one loss against the mixed targets."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    partner = torch.randperm(16, generator=g)
    smoothing, weight = 0.2, 0.3

    def smoothed(labels):
        return torch.nn.functional.one_hot(labels, 10).float() * (1 - smoothing) + smoothing / 10

    targets = weight * smoothed(y) + (1 - weight) * smoothed(y[partner])
    expected = -(targets * torch.log_softmax(logits, 1)).sum(1).mean()
    assert torch.allclose(mixed_cross_entropy(logits, y, partner, weight, smoothing), expected, atol=1e-6)
    plain = torch.nn.functional.cross_entropy(logits, y, label_smoothing=smoothing)
    assert torch.allclose(mixed_cross_entropy(logits, y, partner, 1.0, smoothing), plain)


def test_mix_batch_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 4, 4, generator=g)
    partner = torch.tensor([3, 0, 5, 1, 2, 4])
    mixed = mix_batch(x, partner, 0.7)
    for i in range(6):
        assert torch.allclose(mixed[i], 0.7 * x[i] + 0.3 * x[partner[i]])


def test_training_with_mixup_learns_the_training_images():
    x, y = synthetic_images(256, seed=4)
    losses = {}
    for alpha in (0.0, 1.0):
        model = make_model("vgg", (8, 16, 16))
        recipe = Recipe(epochs=10, batch=32, lr=0.5, whiten_bias_epochs=1, mixup=alpha)
        losses[alpha] = train(model, x, y, recipe, device=torch.device("cpu"), seed=0, bf16=False)["losses"]
    assert losses[1.0] != losses[0.0]  # mixup changed the training
    assert losses[1.0][-1] < 0.85 * losses[1.0][0], losses[1.0]
    assert accuracy(model, x, y, torch.device("cpu"), tta=False, bf16=False) > 0.4  # chance: 0.1


def test_training_mixes_images_and_labels_with_the_same_weight_and_partner(monkeypatch):
    import train as train_module

    images, losses = [], []

    def spy_mix(x, partner, weight):
        images.append((partner.clone(), weight))
        return mix_batch(x, partner, weight)

    def spy_loss(logits, y, partner, weight, smoothing):
        losses.append((partner.clone(), weight))
        return mixed_cross_entropy(logits, y, partner, weight, smoothing)

    monkeypatch.setattr(train_module, "mix_batch", spy_mix)
    monkeypatch.setattr(train_module, "mixed_cross_entropy", spy_loss)
    x, y = synthetic_images(64, seed=5)
    recipe = Recipe(epochs=4, batch=16, lr=0.5, whiten_bias_epochs=1, mixup=0.2)
    train(make_model("vgg", (8, 16, 16)), x, y, recipe, device=torch.device("cpu"), seed=0, bf16=False)
    assert len(images) == len(losses) == 16
    for (p1, w1), (p2, w2) in zip(images, losses, strict=True):
        assert torch.equal(p1, p2) and w1 == w2 and 0 <= w1 <= 1
        assert sorted(p1.tolist()) == list(range(16))  # a permutation of the batch
    # Beta(0.2, 0.2) puts 2/3 of its mass within 0.1 of 0 or 1 (a uniform draw 1/5): 8 of 16 tells them apart
    assert sum(min(w, 1 - w) < 0.1 for _, w in images) >= 8


@pytest.mark.parametrize("mixup", [0.0, 1.0])
def test_training_on_one_hot_probabilities_equals_training_on_class_indices(mixup):
    """``train`` takes soft targets ``(N, C)``; one-hot ones must give the model that the indices give (the label
    smoothing and mixup's weights applied alike)."""
    x, y = synthetic_images(64)
    recipe = Recipe(epochs=5, batch=32, lr=0.5, whiten_bias_epochs=1, mixup=mixup)  # lookahead every 5 steps
    models = []
    one_hot = torch.nn.functional.one_hot(y, 10).float()
    for targets in (y, one_hot, 0.5 * one_hot + 0.05):  # the last: soft, its argmax the same labels
        torch.manual_seed(0)
        model = make_model("vgg", (8, 16, 16))
        train(model, x, targets, recipe, device=torch.device("cpu"), seed=0, bf16=False, channels_last=False)
        models.append(model)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    differences = [(a - b).abs().max() for a, b in zip(models[0].parameters(), models[2].parameters(), strict=True)]
    assert max(differences) > 1e-2  # soft targets are not their argmax


def test_tanh_variant_bounds_the_features():
    model = make_model("vgg-tanh").eval()
    with torch.no_grad():
        features = model.features(torch.rand(8, 3, 32, 32))
    assert features.abs().max() <= 1 and features.shape == (8, 384)


COMMITTED_WEIGHTS = sorted((Path(__file__).parents[1] / "benchmarks/reference_models/weights").glob("*.safetensors"))


@pytest.mark.parametrize("path", COMMITTED_WEIGHTS, ids=lambda p: p.stem)
def test_committed_reference_weights_load_strictly(path):
    """Every committed model loads into its card's architecture with no missing or unexpected tensor (a refactor
    that renamed a module would fail here) and gives finite logits."""
    model = load_reference_model(path)
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_committed_weights_are_found():
    assert {p.stem for p in COMMITTED_WEIGHTS} >= {"vgg", "vgg-tanh", "resnet9", "resnet9-whitened"}
    for path in COMMITTED_WEIGHTS:  # the results page keys caches and runs by the card's name, --models by the file's
        assert json.loads(path.with_suffix(".json").read_text())["name"] == path.stem
    for card in COMMITTED_WEIGHTS[0].parent.glob("*.json"):  # cards without weights too (a labelled-only baseline)
        assert json.loads(card.read_text())["name"] == card.stem, card


def test_default_output_folder_is_ignored_and_never_the_committed_weights():
    out = Path(build_parser().parse_args(["--data-dir", "x"]).out)
    root = Path(__file__).parents[1]
    assert out == root / "reference_model_runs" and f"/{out.name}/" in (root / ".gitignore").read_text()


@pytest.mark.parametrize("net", [WhitenedVGG, WhitenedResNet9])
def test_whitening_filters_whiten_the_patches(net):
    """After ``init_whitening`` the first 12 channels of the 2×2 patch responses have identity covariance."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(400, 3, 8, 8, generator=g)
    images = torch.nn.functional.interpolate(base, size=32, mode="bilinear")  # correlated neighbouring pixels
    model = net()
    model.init_whitening(images, eps=0.0)
    with torch.no_grad():
        responses = torch.nn.functional.conv2d(model.standardize(images), model.whiten.weight[:12])
    flat = responses.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=2e-2)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_whitened_resnet9_is_a_resnet9_on_the_whitened_map():
    """Shapes stage by stage (31 → 15 → 7 → 3), non-negative features of the last width, logits = head / 8; and
    ``train`` sets its whitening filters from the data and trains the whitening bias for its first epochs only."""
    model = WhitenedResNet9((8, 16, 32)).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        h = model.act(model.whiten(model.standardize(x)))
        shapes = [tuple(h.shape[1:])]
        for layer in (model.layer1, model.layer2, model.layer3):
            h = layer(h)
            shapes.append(tuple(h.shape[1:]))
        features = model.features(x)
        logits = model(x)
    assert shapes == [(24, 31, 31), (8, 15, 15), (16, 7, 7), (32, 3, 3)]
    with torch.no_grad():  # the residual blocks after the first and last stage add their input back
        for stage, channels, size in ((model.layer1, 8, 15), (model.layer3, 32, 3)):
            block = stage[1]
            probe = torch.rand(2, channels, size, size)
            assert isinstance(block, Residual) and torch.equal(block(probe), probe + block.body(probe))
    assert torch.equal(features, h.amax((2, 3))) and features.min() >= 0 and features.shape == (4, 32)
    torch.testing.assert_close(logits, model.head(features) / 8)

    images, labels = synthetic_images(96, seed=6)
    trained = WhitenedResNet9((8, 16, 32))
    recipe = Recipe(epochs=2, batch=32, lr=0.5, whiten_bias_epochs=1)
    seen = []
    real_step = torch.optim.SGD.step

    def spy_step(optimizer, *args, **kwargs):
        seen.append(trained.whiten.bias.detach().clone())
        return real_step(optimizer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", spy_step)
        train(trained, images, labels, recipe, device=torch.device("cpu"), seed=0, bf16=False, channels_last=False)
    expected = WhitenedResNet9((8, 16, 32))
    g = torch.Generator().manual_seed(0)
    expected.init_whitening(images[torch.randperm(len(images), generator=g)[:5000]].float() / 255)
    torch.testing.assert_close(trained.whiten.weight, expected.whiten.weight)  # set from the data, then frozen
    assert not torch.equal(seen[1], seen[0])  # the bias moves during the first epoch (3 steps) ...
    assert torch.equal(seen[4], seen[3])  # ... and not in step 3 (schedule factor 0; the lookahead pulls after step 4)


def test_translate_and_flip_matches_a_brute_force_crop():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, 3, 32, 32, generator=g)
    flip = torch.tensor([True, False, True, False, False])
    out = translate_and_flip(x, flip, torch.Generator().manual_seed(7), shift=2)
    g2 = torch.Generator().manual_seed(7)
    dy, dx = torch.randint(0, 5, (5,), generator=g2), torch.randint(0, 5, (5,), generator=g2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(5):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_flip_and_translate_tta_matches_a_brute_force_average_of_six_views():
    """A model that sees every pixel (no translation invariance): the flip-and-translate average equals, per image,
    ½ · mean(image, mirror) + ¼ · mean over the one-pixel shifts (numpy reflect padding) of the same, before the
    softmax; plain and flip-only are checked the same way."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    cpu = torch.device("cpu")
    got = {
        "plain": predict(model, x, cpu, tta=False, bf16=False, batch=3),
        "flip": predict(model, x, cpu, tta=True, bf16=False, batch=3),
        "flip+translate": predict(model, x, cpu, tta=True, bf16=False, translate=True, batch=3),
    }
    weight, bias = (p.detach().double().numpy() for p in model[1].parameters())
    for i, image in enumerate(x.double().numpy() / 255):

        def logits(view):
            return weight @ view.reshape(-1) + bias

        def mirrored(view):
            return (logits(view) + logits(view[:, :, ::-1])) / 2

        padded = np.pad(image, ((0, 0), (1, 1), (1, 1)), mode="reflect")
        shifted = (mirrored(padded[:, :32, :32]) + mirrored(padded[:, 2:, 2:])) / 2
        expected = {
            "plain": logits(image),
            "flip": mirrored(image),
            "flip+translate": mirrored(image) / 2 + shifted / 2,
        }
        for view, value in expected.items():
            probabilities = np.exp(value - value.max()) / np.exp(value - value.max()).sum()
            np.testing.assert_allclose(got[view][i].numpy(), probabilities, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got["flip"], got["flip+translate"])
    with pytest.raises(ValueError, match="translate=True needs tta=True"):
        predict(model, x, cpu, tta=False, bf16=False, translate=True)


def fake_cifar_folder(folder: Path, n: int = 5600, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A folder with ``cifar10_train.npz`` (``n`` synthetic images sorted by class, like the real file) and
    ``cifar10_test.npz`` (the first 200); returns the test images and labels."""
    x, y = synthetic_images(n, seed=seed)
    folder.mkdir()
    order = torch.argsort(y, stable=True)
    np.savez(folder / "cifar10_train.npz", x=x[order].permute(0, 2, 3, 1).numpy(), y=y[order].numpy())
    np.savez(folder / "cifar10_test.npz", x=x[:200].permute(0, 2, 3, 1).numpy(), y=y[:200].numpy())
    return x[:200], y[:200]


def tiny_saved_model(folder: Path, images: torch.Tensor) -> Path:
    from train import save

    torch.manual_seed(0)
    model = make_model("vgg", (8, 16, 16))
    model.init_whitening(images.float() / 255)
    save(model, {"name": "tiny", "arch": "vgg", "widths": [8, 16, 16], "test_accuracy": 0.5}, folder)
    return folder / "tiny.safetensors"


def test_tta_study_writes_every_view_into_the_card(tmp_path):
    x_test, y_test = fake_cifar_folder(tmp_path / "data")
    weights = tiny_saved_model(tmp_path, x_test)
    tta_study_main([str(weights), "--data-dir", str(tmp_path / "data"), "--no-bf16", "--write-cards"])
    card = json.loads((tmp_path / "tiny.json").read_text())
    loaded, cpu = load_reference_model(weights), torch.device("cpu")
    _, (x_val, y_val), _ = cifar10_splits(tmp_path / "data")
    views = {"plain": dict(tta=False), "flip": dict(tta=True), "flip+translate": dict(tta=True, translate=True)}
    for split, (x, y) in (("val", (x_val, y_val)), ("test", (x_test, y_test))):
        expected = {view: round(accuracy(loaded, x, y, cpu, bf16=False, **o), 4) for view, o in views.items()}
        assert card["tta_study"][f"{split}_accuracy"] == expected
    assert card["test_accuracy"] == 0.5  # the training figures stay
    assert card["tta_study"]["command"].endswith("--no-bf16 --write-cards") and card["tta_study"]["device"] == "cpu"


@pytest.mark.parametrize("best_on_validation", ["flip", "flip+translate", "tie"])
def test_tta_study_chooses_the_view_on_validation_and_writes_only_its_test_figure(
    tmp_path, monkeypatch, best_on_validation
):
    """A spy ``view_accuracies``: validation (5,000 images) favours one view, test (200) favours another; the choice
    follows validation, and the card's top-level figure is the test accuracy of flip and translate only when
    that view was chosen."""
    import tta_study

    x_test, _ = fake_cifar_folder(tmp_path / "data")
    weights = tiny_saved_model(tmp_path, x_test)

    def spy(model, x, y, device, *, bf16):
        if len(y) == 5000:
            return {view: 0.9 if view in (best_on_validation, "tie") else 0.8 for view in tta_study.VIEWS}
        return {"plain": 0.95, "flip": 0.6, "flip+translate": 0.7}

    monkeypatch.setattr(tta_study, "view_accuracies", spy)
    tta_study_main([str(weights), "--data-dir", str(tmp_path / "data"), "--write-cards"])
    card = json.loads((tmp_path / "tiny.json").read_text())
    assert card["tta_study"]["chosen_on_validation"] == best_on_validation.replace("tie", "plain")  # the cheapest
    assert card["tta_study"]["test_accuracy"] == {"plain": 0.95, "flip": 0.6, "flip+translate": 0.7}
    if best_on_validation == "flip+translate":
        assert card["test_accuracy_flip_translate_tta"] == 0.7
    else:
        assert "test_accuracy_flip_translate_tta" not in card


def test_tta_study_refuses_to_overwrite_a_figure_from_training(tmp_path):
    x_test, _ = fake_cifar_folder(tmp_path / "data")
    weights = tiny_saved_model(tmp_path, x_test)
    card = json.loads((tmp_path / "tiny.json").read_text())
    figures = {"val_accuracy_flip_translate_tta": 0.4, "test_accuracy_flip_translate_tta": 0.3}  # as train.py writes
    (tmp_path / "tiny.json").write_text(json.dumps({**card, **figures}))
    with pytest.raises(SystemExit, match="from training"):
        tta_study_main([str(weights), "--data-dir", str(tmp_path / "data"), "--write-cards"])
    assert json.loads((tmp_path / "tiny.json").read_text())["test_accuracy_flip_translate_tta"] == 0.3


def test_triangle_schedule_shape():
    total = 100
    values = [triangle(s, total) for s in range(total + 1)]
    assert values[0] == pytest.approx(0.2) and max(values) == pytest.approx(1.0)
    assert values[23] == pytest.approx(1.0) and values[-1] == pytest.approx(0.07)
    assert np.all(np.diff(values[:24]) > 0) and np.all(np.diff(values[23:]) < 0)


def test_pseudo_labels_keep_the_most_confident_fraction_of_each_predicted_class():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(300, 4, generator=g) * 3, 1)
    kept, labels = pseudo_labels(probs, 0.5)
    confidence, predicted = probs.max(1)
    for c in range(4):
        members = torch.nonzero(predicted == c).flatten()
        chosen = kept[labels == c]
        assert len(chosen) == round(0.5 * len(members))
        # brute force: every kept member is at least as confident as every dropped one
        dropped = members[~torch.isin(members, chosen)]
        if len(dropped):
            assert confidence[chosen].min() >= confidence[dropped].max()
    assert torch.equal(labels, predicted[kept])


def test_script_writes_weights_and_cards_for_the_semi_supervised_run(tmp_path):
    """``--semi`` on a fake CIFAR folder: the labelled-only baseline and the curriculum-labelled model, each with
    a card; the split keeps 5,000 validation images stratified by class."""
    data = tmp_path / "data"
    x_test, y_test = fake_cifar_folder(data)
    (_, y_tr), (_, y_va), _ = cifar10_splits(data)
    assert len(y_va) == 5000 and torch.bincount(y_va).tolist() == [500] * 10 and len(y_tr) == 600
    out = tmp_path / "weights"
    train_main(
        [
            "--arch",
            "vgg",
            "--semi",
            "--labels-per-class",
            "3",
            "--rounds",
            "2",
            "--epochs",
            "1",
            "--min-steps",
            "2",
            "--limit",
            "300",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--no-bf16",
        ]
    )
    base = json.loads((out / "vgg-labelled30.json").read_text())
    semi = json.loads((out / "vgg-semi30.json").read_text())
    assert base["labelled_images"] == 30 and semi["unlabelled_images"] == 270
    assert [r["pseudo_labelled"] for r in semi["rounds"]] == [pytest.approx(135, abs=10), 270]
    for card in (base, semi):
        assert 0 <= card["test_accuracy"] <= 1 and card["command"].startswith("python")
        assert card["seconds_launch_to_card"] > card["seconds"] > 0  # the card's wall time covers data and evaluation
        assert card["cpu"] == cpu_description()  # the wall time holds with the CPU it was measured on
        loaded = load_reference_model(out / f"{card['name']}.safetensors")  # --limit keeps all 200 test images
        expected = accuracy(loaded, x_test, y_test, torch.device("cpu"), tta=True, bf16=False, translate=True)
        assert card["test_accuracy_flip_translate_tta"] == round(expected, 4)
        assert 0 <= card["val_accuracy_flip_tta"] <= 1 and 0 <= card["val_accuracy_flip_translate_tta"] <= 1
        assert (out / f"{card['name']}.safetensors").exists()


def test_cpu_description_reads_the_model_the_count_and_the_bf16_instructions():
    cpuinfo = (
        "processor\t: 0\nmodel name\t: Xeon Y\nflags\t\t: fpu avx2 amx_tile amx_bf16 avx512f\n\n"
        "processor\t: 1\nmodel name\t: Xeon Y\nflags\t\t: fpu avx2 amx_tile amx_bf16 avx512f\n\n"
        "processor\t: 2\nmodel name\t: Xeon Y\nflags\t\t: fpu avx2 amx_tile amx_bf16 avx512f\n"
    )
    assert cpu_description(cpuinfo) == {"model": "Xeon Y", "logical_cpus": 3, "bf16_instructions": ["amx_bf16"]}
    plain = "processor: 0\nmodel name: Old\nflags: fpu avx2 avx512_bf16x\n"  # a flag is a whole word
    assert cpu_description(plain) == {"model": "Old", "logical_cpus": 1, "bf16_instructions": []}
    assert cpu_description("") == {}


@pytest.mark.parametrize("mixup", ["0", "1"])
def test_semi_run_from_a_saved_round_zero_equals_the_full_run(tmp_path, mixup):
    """``--labelled-model`` reuses an earlier run's labelled-only model: the rounds after it, their pseudo-labels and
    the final weights are those of the full run, and its seconds count; a semi-supervised card, or a round 0 of
    other arguments, is refused; every round trains at least ``--round-min-steps`` steps."""
    from safetensors.torch import load_file

    x, y = synthetic_images(5600, seed=2)
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "cifar10_train.npz", x=x.permute(0, 2, 3, 1).numpy(), y=y.numpy())
    np.savez(data / "cifar10_test.npz", x=x[:200].permute(0, 2, 3, 1).numpy(), y=y[:200].numpy())

    def run(out: str, *extra: str, widths: tuple[str, ...] = ("8", "16", "16")) -> None:
        args = ["--arch", "vgg", "--widths", *widths, "--semi", "--labels-per-class", "3", "--rounds", "2"]
        args += ["--epochs", "1", "--min-steps", "2", "--round-min-steps", "5", "--limit", "300", "--mixup", mixup]
        train_main([*args, "--data-dir", str(data), "--no-bf16", "--out", str(tmp_path / out), *extra])

    run("full")
    base = tmp_path / "full" / "vgg-labelled30.safetensors"
    run("resumed", "--labelled-model", str(base))
    full = json.loads((tmp_path / "full" / "vgg-semi30.json").read_text())
    resumed = json.loads((tmp_path / "resumed" / "vgg-semi30.json").read_text())
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full["rounds"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed["rounds"]]
    assert all(r["steps"] >= 5 for r in full["rounds"])  # one epoch of ~150 images at batch 1024 is one step
    weights = [load_file(str(tmp_path / d / "vgg-semi30.safetensors")) for d in ("full", "resumed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    base_card = json.loads(base.with_suffix(".json").read_text())
    assert full["labelled_only"]["test_accuracy"] == base_card["test_accuracy"]
    assert resumed["labelled_model"] == str(base) and full["labelled_model"] is None
    assert resumed["seconds"] == pytest.approx(
        base_card["seconds"] + sum(r["seconds"] for r in resumed["rounds"]), abs=0.2
    )
    copied = json.loads((tmp_path / "resumed" / "vgg-labelled30.json").read_text())
    assert copied["name"] == "vgg-labelled30" and copied["copied_from"] == str(base)
    with pytest.raises(ValueError, match="not a round-0"):
        run("x", "--labelled-model", str(tmp_path / "full" / "vgg-semi30.safetensors"))
    with pytest.raises(ValueError, match="widths"):
        run("x", "--labelled-model", str(base), widths=("8", "16", "32"))
    with pytest.raises(ValueError, match="seed"):
        run("x", "--labelled-model", str(base), "--seed", "1")
    with pytest.raises(ValueError, match="cutout"):
        run("x", "--labelled-model", str(base), "--cutout", "4")
    with pytest.raises(ValueError, match="mixup"):
        run("x", "--labelled-model", str(base), "--mixup", "0.5")


def test_semi_with_no_rounds_writes_only_the_labelled_only_model(tmp_path):
    x, y = synthetic_images(5600, seed=3)
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "cifar10_train.npz", x=x.permute(0, 2, 3, 1).numpy(), y=y.numpy())
    np.savez(data / "cifar10_test.npz", x=x[:200].permute(0, 2, 3, 1).numpy(), y=y[:200].numpy())
    args = ["--arch", "vgg", "--widths", "8", "16", "16", "--semi", "--labels-per-class", "3", "--rounds", "0"]
    args += ["--epochs", "1", "--min-steps", "2", "--limit", "300", "--data-dir", str(data), "--no-bf16"]
    train_main([*args, "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vgg-labelled30.json", "vgg-labelled30.safetensors"]
    card = json.loads((tmp_path / "out" / "vgg-labelled30.json").read_text())
    assert card["command"].endswith("--no-bf16 --out " + str(tmp_path / "out"))  # this call's arguments
    with pytest.raises(SystemExit):
        train_main(["--data-dir", str(data), "--round-min-steps", "5"])  # without --semi
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            train_main(["--data-dir", str(data), "--mixup", bad])


def test_colour_operations_match_pillow():
    """Each colour operation of the strong view against Pillow's ``ImageEnhance`` / ``ImageOps`` on uint8 images."""
    from cifar_data import COLOUR_OPERATIONS, colour_operations
    from PIL import Image, ImageEnhance, ImageOps

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8)
    factor = torch.tensor([0.1, 0.5, 0.9, 1.2, 1.6, 1.9])
    threshold_levels = torch.tensor([0, 40, 100, 128, 200, 256])
    bits = torch.tensor([4, 5, 6, 7, 8, 4])
    got = colour_operations(x.float() / 255, factor, threshold_levels / 255, bits).clamp(0, 1)
    assert got.shape == (len(COLOUR_OPERATIONS), 6, 3, 8, 8)
    for i in range(6):
        image = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        f = float(factor[i])
        expected = [
            image,
            ImageEnhance.Brightness(image).enhance(f),
            ImageEnhance.Contrast(image).enhance(f),
            ImageEnhance.Color(image).enhance(f),
            ImageOps.solarize(image, int(threshold_levels[i])),
            ImageOps.posterize(image, int(bits[i])),
        ]
        for name, op, pil in zip(COLOUR_OPERATIONS, got, expected, strict=True):
            want = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).float()
            # Pillow rounds its grey image and the contrast mean to integers: within 1.5 grey levels
            assert (op[i] * 255 - want).abs().max() <= 1.5, (name, i)


def test_affine_warp_rotates_and_shifts_like_the_exact_pixel_maps():
    from cifar_data import affine_warp

    x = torch.rand(2, 3, 8, 8)
    zero = torch.zeros(2)
    quarter = affine_warp(x, torch.full((2,), torch.pi / 2), zero, torch.zeros(2, 2))
    turned = [torch.rot90(x, k, (2, 3)) for k in (1, -1)]
    assert any(torch.allclose(quarter, t, atol=1e-5) for t in turned)
    shifted = affine_warp(x, zero, zero, torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    assert torch.allclose(shifted[0, :, :, 2:], x[0, :, :, :-2], atol=1e-5) and shifted[0, :, :, :2].abs().max() < 1e-6
    assert torch.allclose(shifted[1, :, 3:], x[1, :, :-3], atol=1e-5) and shifted[1, :, :3].abs().max() < 1e-6
    assert torch.allclose(affine_warp(x, zero, zero, torch.zeros(2, 2)), x, atol=1e-5)


def test_affine_warp_matches_scipy_for_rotation_shear_and_shift():
    """Against ``scipy.ndimage.affine_transform`` (bilinear, zero outside): output pixel ``p`` (row, column, about
    the centre) reads the input at ``M p + shift`` with ``M`` = [[cos + shear·sin, sin], [−sin + shear·cos, cos]]
    in (row, column) order."""
    from cifar_data import affine_warp
    from scipy.ndimage import affine_transform

    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 2, 12, 12, generator=g, dtype=torch.float64)
    angle = torch.tensor([0.3, -0.5, 0.0], dtype=torch.float64)
    shear = torch.tensor([0.2, -0.25, 0.3], dtype=torch.float64)
    shift = torch.tensor([[1.5, -2.0], [0.0, 3.0], [-1.0, 0.5]], dtype=torch.float64)
    got = affine_warp(x, angle, shear, shift)
    centre = (12 - 1) / 2
    for i in range(3):
        c, s, k = float(angle[i].cos()), float(angle[i].sin()), float(shear[i])
        # input (column, row) − centre = [[c, −s + k·c], [s, c + k·s]] · (column, row) − shift, in (row, column):
        matrix = np.array([[c + k * s, s], [-s + k * c, c]])
        offset = centre - matrix @ np.array([centre, centre]) - np.array([float(shift[i, 1]), float(shift[i, 0])])
        for channel in range(2):
            want = affine_transform(x[i, channel].numpy(), matrix, offset=offset, order=1, mode="grid-constant")
            assert np.allclose(got[i, channel].numpy(), want, atol=1e-6), i


def test_strong_augment_draws_per_image_operations():
    """Each image draws its own two colour operations (uniform over the six) and its own affine map (each part
    with probability 1/2, within its range)."""
    import cifar_data
    from cifar_data import COLOUR_OPERATIONS

    drawn = {}

    def record_warp(x, angle, shear, shift):
        drawn.update(angle=angle, shear=shear, shift=shift)
        return x

    def marker_operations(x, factor, threshold, bits):  # operation k leaves (previous marker + k) / 100 everywhere
        return torch.stack([x + k / 100 for k in range(len(COLOUR_OPERATIONS))])

    original = cifar_data.affine_warp, cifar_data.colour_operations
    try:
        cifar_data.affine_warp, cifar_data.colour_operations = record_warp, marker_operations
        out = cifar_data.strong_augment(torch.zeros(3000, 3, 4, 4), torch.Generator().manual_seed(0), cutout_size=0)
    finally:
        cifar_data.affine_warp, cifar_data.colour_operations = original
    sums = torch.round(out[:, 0, 0, 0] * 100).long()  # the sum of the two operations' indices, 0..10
    counts = torch.bincount(sums, minlength=11).float() / len(sums)
    expected = torch.tensor([min(s, 10 - s) + 1 for s in range(11)], dtype=torch.float) / 36  # two uniform dice 0..5
    assert torch.allclose(counts, expected, atol=0.02), counts
    for name, bound in (("angle", np.pi / 6), ("shear", 0.3), ("shift", 4.0)):
        values = drawn[name].flatten()
        assert values.abs().max() <= bound + 1e-6
        nonzero = (drawn[name] != 0).float().mean() if name != "shift" else (drawn[name] != 0).any(1).float().mean()
        assert 0.45 < float(nonzero) < 0.55, name


def test_strong_augment_is_seeded_bounded_and_changes_images():
    from cifar_data import strong_augment

    x = torch.rand(64, 3, 32, 32)
    a = strong_augment(x, torch.Generator().manual_seed(1))
    b = strong_augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    changed = (a - x).abs().flatten(1).mean(1) > 0.01
    assert changed.all()  # at least the cutout


def test_fixmatch_loss_matches_a_per_example_computation():
    from train import fixmatch_loss

    g = torch.Generator().manual_seed(0)
    logits_l, labels = torch.randn(4, 10, generator=g), torch.tensor([1, 2, 3, 4])
    logits_w = torch.randn(6, 10, generator=g) * 3
    logits_s = torch.randn(6, 10, generator=g, requires_grad=True)
    weak = logits_w.clone().requires_grad_(True)
    loss, mask, pseudo = fixmatch_loss(logits_l, labels, weak, logits_s, 0.5, 2.0, 0.2)

    def smoothed_ce(logits, label):
        target = np.full(10, 0.2 / 10)
        target[label] += 0.8
        log_p = logits.double().numpy() - np.log(np.exp(logits.double().numpy()).sum())
        return -(target * log_p).sum()

    p_weak = torch.softmax(logits_w.double(), 1).numpy()
    expected_mask = p_weak.max(1) >= 0.5
    assert 0 < expected_mask.sum() < 6  # the test has both kinds
    expected = np.mean([smoothed_ce(logits_l[i], int(labels[i])) for i in range(4)])
    expected += 2.0 * np.mean(
        [smoothed_ce(logits_s[j].detach(), int(p_weak[j].argmax())) if expected_mask[j] else 0.0 for j in range(6)]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert mask.tolist() == expected_mask.tolist() and pseudo.tolist() == p_weak.argmax(1).tolist()
    loss.backward()
    assert weak.grad is None  # the weak view's prediction is a constant target
    assert torch.all(logits_s.grad[torch.from_numpy(~expected_mask)] == 0)


def test_frozen_running_statistics_keeps_the_running_statistics_and_restores_momentum():
    from train import frozen_running_statistics

    norm = torch.nn.BatchNorm2d(3, momentum=0.4).train()
    before = norm.running_mean.clone(), norm.running_var.clone()
    with pytest.raises(RuntimeError), frozen_running_statistics([norm]):
        out = norm(torch.randn(8, 3, 4, 4) * 3 + 2)
        assert out.mean().abs() < 1e-4  # normalised by the batch's statistics
        raise RuntimeError
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])
    assert norm.momentum == 0.4
    norm(torch.randn(8, 3, 4, 4) + 2)
    assert not torch.equal(norm.running_mean, before[0])


def test_fixmatch_pairs_weak_and_strong_views_and_lets_only_the_weak_views_move_running_statistics(monkeypatch):
    """With the augmentations replaced by the identity, every step's strong batch is its weak batch (the same
    unlabelled images, in the same order), the labelled batch comes with its own labels; only the weak forward
    updates BatchNorm's running statistics; the unlabelled images' labels, given for the log, change nothing."""
    import train as train_module

    monkeypatch.setattr(train_module, "translate_and_flip", lambda x, flip, generator, shift: x)
    monkeypatch.setattr(train_module, "strong_augment", lambda x, generator, cutout_size: x.clone())
    x, y = synthetic_images(200, seed=6)
    labelled, unlabelled = torch.arange(20), torch.arange(20, 200)
    recipe = Recipe(batch=40, lr=0.2, weight_decay=3e-3, cutout=0, lookahead_every=1000)
    calls, inputs, losses, recipes = [], [], [], []
    real_loss, real_sgd = train_module.fixmatch_loss, train_module.sgd_with_schedule

    def spy_loss(logits_labelled, labels, logits_weak, logits_strong, threshold, *rest):
        losses.append((labels.clone(), logits_weak.clone(), logits_strong.detach().clone(), threshold))
        return real_loss(logits_labelled, labels, logits_weak, logits_strong, threshold, *rest)

    def spy_sgd(model, scaled, total, whiten_steps):
        recipes.append((scaled, whiten_steps))
        return real_sgd(model, scaled, total, whiten_steps)

    monkeypatch.setattr(train_module, "fixmatch_loss", spy_loss)
    monkeypatch.setattr(train_module, "sgd_with_schedule", spy_sgd)

    def run(y_unlabelled):
        torch.manual_seed(0)
        model = make_model("vgg", (8, 16, 16))
        whiten = model.whiten.weight.clone(), model.whiten.bias.clone()
        model.block1.norm1.register_forward_hook(
            lambda module, args, output: calls.append((module.momentum, len(args[0])))
        )
        model.register_forward_hook(lambda module, args, output: inputs.append(args[0].clone()))
        train_module.train_fixmatch(
            model,
            x[labelled],
            y[labelled],
            x[unlabelled],
            recipe,
            train_module.FixMatch(steps=3, unlabelled_ratio=3, threshold=0.5, lr_scale=0.1),
            device=torch.device("cpu"),
            seed=0,
            bf16=False,
            channels_last=False,
            y_unlabelled=y_unlabelled,
        )
        assert torch.equal(model.whiten.weight, whiten[0]) and torch.equal(model.whiten.bias, whiten[1])
        return model.state_dict()

    first = run(y[unlabelled])
    assert calls == [(0.4, 30), (0.0, 10), (0.0, 30)] * 3  # weak (30 unlabelled), labelled (10), strong (30)
    images = x.float() / 255
    for step, (labels, weak, strong, threshold) in enumerate(losses):
        assert torch.allclose(weak, strong, atol=1e-5) and threshold == pytest.approx(0.5 * (0.8 + 0.2 / 10))
        weak_images, labelled_images, strong_images = inputs[3 * step : 3 * step + 3]
        assert torch.equal(weak_images, strong_images)
        where = [int(torch.nonzero((images[labelled] == image).flatten(1).all(1))[0]) for image in labelled_images]
        assert torch.equal(labels, y[labelled][where])  # each labelled image with its own label
        assert all(bool((images[unlabelled] == image).flatten(1).all(1).any()) for image in weak_images)
    scaled, whiten_steps = recipes[0]
    assert scaled.lr == pytest.approx(0.02) and scaled.weight_decay == pytest.approx(3e-4) and whiten_steps == 0
    second = run(None)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_script_runs_fixmatch_from_a_saved_round_zero_as_from_a_fresh_one(tmp_path):
    """``--semi --method fixmatch``: the card names the method, its settings, the labelled-only baseline and the
    summed wall time; its accuracies are those of the saved weights; starting from a saved round 0 gives the same
    weights; FixMatch's flags without ``--method fixmatch`` are a usage error."""
    from safetensors.torch import load_file

    data = tmp_path / "data"
    x_test, y_test = fake_cifar_folder(data, seed=7)
    args = ["--arch", "vgg", "--widths", "8", "16", "16", "--semi", "--labels-per-class", "3", "--epochs", "1"]
    args += ["--min-steps", "2", "--limit", "300", "--data-dir", str(data), "--no-bf16", "--method", "fixmatch"]
    args += ["--fixmatch-steps", "4", "--fixmatch-threshold", "0.5", "--eval-every", "2"]
    train_main([*args, "--out", str(tmp_path / "full")])
    base = tmp_path / "full" / "vgg-labelled30.safetensors"
    train_main([*args, "--out", str(tmp_path / "resumed"), "--labelled-model", str(base)])
    cards = [json.loads((tmp_path / d / "vgg-fixmatch30.json").read_text()) for d in ("full", "resumed")]
    base_card = json.loads(base.with_suffix(".json").read_text())
    card = cards[0]
    assert card["method"].startswith("FixMatch") and card["fixmatch"]["steps"] == 4
    assert card["fixmatch"]["threshold"] == 0.5 and card["fixmatch"]["lr_scale"] == 0.05
    assert card["labelled_only"]["test_accuracy"] == base_card["test_accuracy"]
    assert card["labelled_images"] == 30 and card["unlabelled_images"] == 270 and card["steps"] == 4
    assert card["seconds"] == pytest.approx(base_card["seconds"] + card["fixmatch_seconds"], abs=0.2)
    assert [row["step"] for row in card["log"]] == [2, 4] and "pseudo_label_accuracy" in card
    loaded = load_reference_model(tmp_path / "full" / "vgg-fixmatch30.safetensors")
    expected = accuracy(loaded, x_test, y_test, torch.device("cpu"), tta=False, bf16=False)
    assert card["test_accuracy"] == round(expected, 4)
    weights = [load_file(str(tmp_path / d / "vgg-fixmatch30.safetensors")) for d in ("full", "resumed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert cards[1]["labelled_model"] == str(base) and cards[0]["labelled_model"] is None
    fixmatch = ["--semi", "--method", "fixmatch"]
    for bad in (
        ["--fixmatch-steps", "3"],  # without --method fixmatch
        ["--semi", "--fixmatch-threshold", "0.5"],
        ["--method", "fixmatch"],  # without --semi
        [*fixmatch, "--fixmatch-lr-scale", "0"],
        [*fixmatch, "--fixmatch-lr-scale", "nan"],
        [*fixmatch, "--fixmatch-steps", "0"],
        [*fixmatch, "--fixmatch-threshold", "1.5"],
        [*fixmatch, "--round-min-steps", "5"],
    ):
        with pytest.raises(SystemExit):
            train_main(["--data-dir", str(data), *bad])


def test_fixmatch_control_trains_on_the_labelled_images_alone():
    """``weight=0`` (``--fixmatch-weight 0``): every forward sees labelled images only (none unlabelled are needed)
    and the loss is the labelled cross-entropy; no mask or pseudo-label statistics are reported."""
    from train import FixMatch, train_fixmatch

    x, y = synthetic_images(40, seed=8)
    model = make_model("vgg", (8, 16, 16))
    sizes = []
    model.register_forward_hook(lambda module, args, output: sizes.append(len(args[0])))
    result = train_fixmatch(
        model,
        x,
        y,
        torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
        Recipe(batch=80, lr=0.2, cutout=0),
        FixMatch(steps=4, unlabelled_ratio=1, weight=0.0),
        device=torch.device("cpu"),
        seed=0,
        bf16=False,
        channels_last=False,
        eval_every=2,
        val=(x, y),
    )
    assert sizes[:2] == [40, 40] and "mask_rate" not in result and "mask_rate" not in result["log"][0]
    assert [row["step"] for row in result["log"]] == [2, 4]
    with pytest.raises(ValueError, match="labelled and unlabelled"):
        train_fixmatch(
            model, x, y, x[:0], Recipe(batch=80), FixMatch(steps=1), device=torch.device("cpu"), seed=0, bf16=False
        )


def test_thread_table_times_each_count_and_restores_the_setting(monkeypatch):
    seen = []

    def fake_speed(arch, widths, bf16, channels_last):  # the speed a count gives: 100 img/s per thread
        seen.append((arch, torch.get_num_threads(), bf16, channels_last))
        return 100.0 * torch.get_num_threads(), 0.0

    monkeypatch.setattr(cpu_speed, "images_per_second", fake_speed)
    before = torch.get_num_threads()
    lines = cpu_speed.thread_table([0], [1, 2])
    assert [n for _, n, _, _ in seen] == [1, 2] and all(bf16 and cl for *_, bf16, cl in seen)
    assert lines[0] == "| model | 1 thread | 2 threads |"
    assert lines[2] == "| vgg 96/384/384 | 100 img/s | 200 img/s (2.00×) |"
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_architecture_trains_with_the_production_settings(arch):
    """bf16 autocast and channels-last, as every committed model was trained: the loss still falls and the
    trained model is left in float32 (autocast never casts the parameters)."""
    x, y = synthetic_images(128)
    model = make_model(arch)
    recipe = Recipe(epochs=6, batch=32, lr=0.5, whiten_bias_epochs=1)
    result = train(model, x, y, recipe, device=torch.device("cpu"), seed=0, bf16=True, channels_last=True)
    assert sum(result["losses"][-2:]) / 2 < 0.85 * result["losses"][0], result["losses"]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_jpeg_reencode_damages_more_at_lower_quality_and_keeps_shape():
    import data_cost_study

    images, _ = synthetic_images(16)
    near, far = data_cost_study.jpeg_reencode(images, 95), data_cost_study.jpeg_reencode(images, 10)
    assert near.shape == far.shape == images.shape and near.dtype == far.dtype == torch.uint8
    assert not torch.equal(near, images)
    brute = torch.tensor(
        [(a.double() - b.double()).abs().mean().item() for a, b in zip(far, images, strict=True)], dtype=torch.float64
    )
    assert torch.allclose(data_cost_study.mean_abs_deviation(far, images).double(), brute, atol=1e-5)
    assert (data_cost_study.mean_abs_deviation(near, images) < data_cost_study.mean_abs_deviation(far, images)).all()


def test_data_cost_estimates_match_their_closed_forms():
    import math

    from data_cost_study import jpeg_cost, size_cost

    cost = jpeg_cost([0.0, 2.0, 4.0], [0.90, 0.88, 0.86], (4.5, 8.0))  # exactly −0.01 per grey level
    assert cost["slope_per_grey_level"] == pytest.approx(-0.01)
    assert cost["cost_low"] == pytest.approx(0.045) and cost["cost_high"] == pytest.approx(0.08)
    x, acc = np.array([0.0, 1.0, 3.0, 5.0]), np.array([0.9, 0.89, 0.86, 0.85])
    slope = ((x - x.mean()) * (acc - acc.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert jpeg_cost(list(x), list(acc), (1.0, 2.0))["cost_high"] == pytest.approx(-2 * slope)
    # accuracy = a + b·log(n): 35k → 45k gains b·log(45/35), 45k → 50k would gain b·log(50/45)
    b = 0.02
    assert size_cost(0.9 + b * math.log(35), 35_000, 0.9 + b * math.log(45), 45_000, 50_000) == pytest.approx(
        b * math.log(50 / 45)
    )


def tiny_data_cost_study(monkeypatch):
    """``data_cost_study`` shrunk to the fake data's 600 training images, a tiny VGG and one epoch."""
    import data_cost_study
    from data_cost_study import Condition

    conditions = {
        "given": Condition(training_images=600),
        "given-35k": Condition(training_images=400),
        "q50": Condition(50, 600),
        "q30": Condition(30, 600),
        "q15": Condition(15, 600),
        "given-fp32": Condition(training_images=600, bf16=False, whiten_bias_lr_scale=1.0),
    }
    monkeypatch.setattr(data_cost_study, "CONDITIONS", conditions)
    monkeypatch.setattr(data_cost_study, "WIDTHS", (8, 16, 16))
    monkeypatch.setattr(data_cost_study, "RECIPE", Recipe(epochs=1, batch=200))
    return data_cost_study


def test_data_cost_study_runs_every_condition_once_and_resumes(tmp_path, monkeypatch, capsys):
    study = tiny_data_cost_study(monkeypatch)
    fake_cifar_folder(tmp_path / "data")  # 600 training images after the 5,000 validation ones
    out = tmp_path / "study.jsonl"
    common = ["--data-dir", str(tmp_path / "data"), "--out", str(out), "--no-compute"]
    study.main([*common, "--conditions", "given", "q50"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["condition"] for r in rows] == ["given", "q50"]
    assert rows[0]["distortion_mean"] == 0 and rows[1]["distortion_mean"] > 0 and rows[1]["steps"] == 3
    assert set(rows[1]["test"]) == {"plain", "flip", "flip+translate"}

    trained = []
    real_train = study.train
    monkeypatch.setattr(study, "train", lambda *a, **k: trained.append(a[3]) or real_train(*a, **k))
    study.main([*common, "--conditions", "given", "q50"])  # both saved: nothing trained, nothing appended
    assert trained == [] and len(out.read_text().splitlines()) == 2
    capsys.readouterr()
    study.main(common)
    lines = out.read_text().splitlines()
    assert len(lines) == 6 and len(trained) == 4
    rows = {r["condition"]: r for r in map(json.loads, lines)}
    assert list(rows) == ["given", "q50", "given-35k", "q30", "q15", "given-fp32"] and rows["given-35k"]["steps"] == 2
    assert rows["given-fp32"]["bf16"] is False and rows["given-fp32"]["recipe"]["whiten_bias_lr_scale"] == 1.0
    assert rows["q50"]["distortion_mean"] < rows["q30"]["distortion_mean"] < rows["q15"]["distortion_mean"]
    printed = capsys.readouterr().out
    assert "points per grey level" in printed and printed.count("\n| q") == 3 and printed.count("\n| given") == 3
    assert "| float32, whitening bias 1× lr |" in printed


def test_data_cost_study_trains_each_condition_with_its_own_recipe_and_precision(tmp_path, monkeypatch):
    study = tiny_data_cost_study(monkeypatch)
    fake_cifar_folder(tmp_path / "data")
    seen = {}

    def spy_train(model, x, y, recipe, **kwargs):
        seen[kwargs["label"]] = (recipe.whiten_bias_lr_scale, kwargs["bf16"], len(y))
        return {"seconds": 1.0, "images_per_second": 1.0, "steps": 1, "epochs": 1}

    monkeypatch.setattr(study, "train", spy_train)
    for name in ("given", "given-35k", "given-fp32"):
        study.run_condition(name, str(tmp_path / "data"), torch.device("cpu"), seed=0)
    assert seen == {"given": (64.0, True, 600), "given-35k": (64.0, True, 400), "given-fp32": (1.0, False, 600)}


def test_data_cost_study_refuses_rows_made_with_other_settings(tmp_path, monkeypatch):
    study = tiny_data_cost_study(monkeypatch)
    fake_cifar_folder(tmp_path / "data")
    out = tmp_path / "study.jsonl"
    common = ["--data-dir", str(tmp_path / "data"), "--out", str(out), "--no-compute", "--conditions", "given"]
    study.main(common)
    with pytest.raises(SystemExit):  # another seed: the saved row is not this run's
        study.main([*common, "--seed", "1"])
    monkeypatch.setattr(study, "WIDTHS", (8, 16, 32))
    with pytest.raises(ValueError, match="other settings"):
        study.saved_rows(out, seed=0)
    monkeypatch.setattr(study, "WIDTHS", (8, 16, 16))
    assert list(study.saved_rows(out, seed=0)) == ["given"]
    out.write_text(out.read_text() + json.dumps({"condition": "q99"}) + "\n")
    with pytest.raises(ValueError, match="unknown condition"):
        study.saved_rows(out, seed=0)


def test_training_flops_match_airbench_published_counts():
    from data_cost_study import PUBLISHED, training_flops

    for name in ("airbench94", "airbench95"):  # airbench's README: 0.36 and 1.39 PFLOPs on 50,000 images
        run = PUBLISHED[name]
        counted = training_flops(run["arch"], run["widths"], run["epochs"] * 50_000)
        assert counted / 1e15 == pytest.approx(run["pflops"], rel=0.05)
    # a multiply-add is two operations: a 3×3 conv c_in → c_out on an H×W map costs 2·9·c_in·c_out·H·W forward;
    # block3 works on the 7×7 map (32 → whitening 31 → 15 → 7), its second conv after the pool on 3×3
    small, wide = training_flops("vgg", (8, 16, 16), 1), training_flops("vgg", (8, 16, 32), 1)
    forward_extra = 2 * 9 * 16 * (32 - 16) * 7 * 7 + 2 * 9 * (32 * 32 - 16 * 16) * 3 * 3 + 2 * (32 - 16) * 10
    assert wide - small == pytest.approx(3 * forward_extra, rel=0.02)  # forward + input and weight gradients


def test_compute_lines_read_the_committed_cards():
    from data_cost_study import OUR_RUNS, compute_lines

    lines = compute_lines(Path(__file__).resolve().parents[1] / "benchmarks" / "reference_models")
    assert len([line for line in lines if "JPEG q75, 45,000" in line]) == len(OUR_RUNS)
    assert "TFLOP/s" in lines[-1] and "90 minutes train" in lines[-1]


def test_whitening_bias_learning_rate_has_its_own_scale():
    from train import sgd_with_schedule

    model = make_model("vgg", (8, 16, 16))
    optimizer, _ = sgd_with_schedule(model, Recipe(lr=0.5, bias_lr_scale=64, whiten_bias_lr_scale=1), 10, 3)
    others, biases, whiten = optimizer.param_groups
    assert whiten["params"] == [model.whiten.bias] and len(biases["params"]) == 6
    assert biases["initial_lr"] == pytest.approx(32) and whiten["initial_lr"] == pytest.approx(0.5)
    # the same per-step decay in every group: lr · weight_decay = the recipe's weight decay
    for group in (others, biases, whiten):
        assert group["initial_lr"] * group["weight_decay"] == pytest.approx(Recipe().weight_decay)
