"""`featurefail demo`: a small CNN on scikit-learn's bundled digits, end to end, in well under a minute on a CPU.

Trains the classifier (seeded), fits the detector on its training features, calibrates the threshold on a
validation split, and reports on the test split: accuracy, how well the score separates the model's mistakes
from its correct answers, a Mann-Whitney test, adversarial detection (FGSM and BIM, ε = 0.1) and
out-of-distribution detection (Gaussian noise, and 8×8 grey patches cut from the photos scikit-learn ships).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images
from sklearn.model_selection import train_test_split
from torch import nn

from . import metrics
from .attacks import bim, fgsm
from .detector import FailureDetector
from .features import Features
from .ood import gaussian_noise
from .stats import mann_whitney

__all__ = ["DigitsCNN", "DigitsData", "load_digits_splits", "photo_patches", "run_demo", "train_classifier"]


class DigitsCNN(nn.Module):
    """A small CNN for 1×8×8 inputs in [0, 1]; the penultimate features are the 64-d input of ``fc``."""

    def __init__(self, n_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.embed = nn.Linear(2 * width, 64)
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1((x - 0.3) / 0.4))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)
        return self.fc(torch.tanh(self.embed(h)))


@dataclass
class DigitsData:
    """Seeded stratified splits of the digits, images ``(N, 1, 8, 8)`` in [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_splits(seed: int = 0) -> DigitsData:
    """45% train, 20% validation, 35% test of scikit-learn's 1,797 digits, stratified and seeded."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = np.arange(len(y))
    train, rest = train_test_split(idx, train_size=0.45, stratify=y, random_state=seed)
    val, test = train_test_split(rest, train_size=0.2 / 0.55, stratify=y[rest], random_state=seed)
    return DigitsData(x[train], y[train], x[val], y[val], x[test], y[test])


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 12,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 64,
) -> nn.Module:
    """Plain Adam + cross-entropy training, seeded; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


def photo_patches(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """``n`` grey ``size×size`` patches in [0, 1] from scikit-learn's sample photos (downscaled 8×): ``(n,1,s,s)``."""
    try:
        photos = load_sample_images().images
    except ImportError as exc:
        raise ImportError("the photo OOD set needs Pillow: pip install 'featurefail[demo]'") from exc
    rng = np.random.default_rng(seed)
    grey = [torch.tensor(p.mean(axis=2) / 255.0, dtype=torch.float32)[None, None] for p in photos]
    small = [F.avg_pool2d(g, 8)[0, 0] for g in grey]
    out = torch.empty(n, 1, size, size)
    for i in range(n):
        img = small[i % len(small)]
        r = rng.integers(0, img.shape[0] - size)
        c = rng.integers(0, img.shape[1] - size)
        out[i, 0] = img[r : r + size, c : c + size]
    return out


@dataclass
class DemoResult:
    """Numbers the demo prints, per scorer, plus where the figure went."""

    accuracy: float
    n_test: int
    n_mistakes: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    threshold: float = float("nan")
    cv_precision: float = float("nan")
    cv_recall: float = float("nan")
    fpr_threshold: float = float("nan")
    fpr_guarantee: str = ""
    fpr_test_flag_rate: float = float("nan")
    figure: Path | None = None
    seconds: float = 0.0


def run_demo(
    out_dir: str | Path = "featurefail-demo",
    *,
    seed: int = 0,
    epochs: int = 12,
    n_components: int = 10,
    plot: bool = True,
    scorers: tuple[str, ...] = ("gmm", "max_softmax"),
    verbose: bool = True,
) -> DemoResult:
    """Train, fit, calibrate and evaluate on the digits; print a table; write a histogram PNG if possible."""
    t0 = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    data = load_digits_splits(seed)
    torch.manual_seed(seed)
    model = train_classifier(DigitsCNN(), data.x_train, data.y_train, epochs=epochs, seed=seed)
    train_loader = [(data.x_train[i : i + 256], data.y_train[i : i + 256]) for i in range(0, len(data.y_train), 256)]
    val_loader = [(data.x_val, data.y_val)]

    noise = gaussian_noise(data.x_train, len(data.y_test), seed=seed)
    patches = photo_patches(len(data.y_test), seed=seed)
    with torch.no_grad():
        clean_correct = model(data.x_test).argmax(1) == data.y_test
    x_ok, y_ok = data.x_test[clean_correct], data.y_test[clean_correct]
    adversarial = {}
    for label, attack in (
        ("FGSM ε=0.1", lambda: fgsm(model, x_ok, y_ok, 0.1)),
        ("BIM ε=0.1", lambda: bim(model, x_ok, y_ok, 0.1, steps=10)),
    ):
        adv = attack()
        with torch.no_grad():
            fooled = model(adv).argmax(1) != y_ok
        adversarial[label] = adv[fooled]  # successful attacks only

    result: DemoResult | None = None
    hist_groups: dict[str, torch.Tensor] = {}
    for name in scorers:
        options = dict(n_components=n_components, seed=seed) if name == "gmm" else {}
        detector = FailureDetector(scorer=name, progress=False, **options).fit(model, train_loader)
        test_feats: Features = detector.features(data.x_test)
        test_feats = Features(test_feats.feats, test_feats.logits, data.y_test)
        correct = test_feats.correct
        scores = detector.score_features(test_feats)
        noise_scores, patch_scores = detector.score(noise), detector.score(patches)
        if result is None:
            result = DemoResult(
                accuracy=float(correct.float().mean()), n_test=len(correct), n_mistakes=int((~correct).sum())
            )
        normal, wrong = scores[correct], scores[~correct]
        row = {
            "mistakes AUROC": metrics.auroc(normal, wrong),
            "mistakes AUPR-in": metrics.aupr_in(normal, wrong),
            "mistakes AUPR-out": metrics.aupr_out(normal, wrong),
            "Mann-Whitney p": mann_whitney(normal, wrong).pvalue,
            **{
                f"{label} AUROC": metrics.auroc(scores[correct], detector.score(adv))
                for label, adv in adversarial.items()
            },
            "noise AUROC": metrics.auroc(scores, noise_scores),
            "photo patches AUROC": metrics.auroc(scores, patch_scores),
        }
        result.rows[name] = row
        if name == "gmm":
            val_mistakes = int((~detector.features(data.x_val).predictions.eq(data.y_val)).sum())
            folds = min(5, val_mistakes)
            if folds >= 2:
                detector.calibrate(val_loader, strategy="f1", folds=folds)
                assert detector.calibration_ is not None
                result.threshold = detector.threshold_ or float("nan")
                result.cv_precision = detector.calibration_.precision
                result.cv_recall = detector.calibration_.recall
            detector.calibrate(val_loader, strategy="fpr", alpha=0.05)  # guaranteed false-alarm rate
            assert detector.calibration_ is not None
            result.fpr_threshold = detector.calibration_.threshold
            result.fpr_guarantee = detector.calibration_.guarantee
            result.fpr_test_flag_rate = float((scores < result.fpr_threshold).float().mean())
            hist_groups = {
                "correct": normal,
                "wrong": wrong,
                "FGSM ε=0.1": detector.score(adversarial["FGSM ε=0.1"]),
                "Gaussian noise": noise_scores,
                "photo patches": patch_scores,
            }
    assert result is not None
    if plot and hist_groups:
        try:
            from .plots import score_histogram

            result.figure = score_histogram(
                hist_groups,
                Path(out_dir) / "loglik_hist.png",
                title=f"digits CNN: GMM-{n_components} log-likelihood of test features",
            )
        except ImportError:
            say("(matplotlib is not installed: no histogram; pip install 'featurefail[plots]')")
    result.seconds = time.perf_counter() - t0
    say(format_demo(result))
    return result


def format_demo(result: DemoResult) -> str:
    """The demo's table as Markdown."""
    names = list(result.rows)
    lines = [
        f"digits CNN: test accuracy {100 * result.accuracy:.2f}% "
        f"({result.n_mistakes} mistakes in {result.n_test} test images)",
        "",
        "| metric (test split) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for metric in next(iter(result.rows.values())):
        cells = []
        for name in names:
            v = result.rows[name][metric]
            cells.append(f"{v:.2e}" if "p" == metric.split()[-1] else f"{100 * v:.2f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("AUROC/AUPR in %, normal samples positive for AUROC and AUPR-in, failures positive for AUPR-out.")
    lines.append("FGSM/BIM rows: correctly classified test images against their successful adversarial versions.")
    if np.isfinite(result.threshold):
        lines.append(
            f"GMM threshold (F1, cross-validated on the validation split): {result.threshold:.3f}; "
            f"held-out precision {100 * result.cv_precision:.1f}%, recall {100 * result.cv_recall:.1f}%"
        )
    if np.isfinite(result.fpr_threshold):
        lines.append(
            f"GMM threshold with a guarantee (strategy='fpr', alpha=0.05): {result.fpr_threshold:.3f}; "
            f"{result.fpr_guarantee} Test images flagged: {100 * result.fpr_test_flag_rate:.1f}%"
        )
    if result.figure is not None:
        lines.append(f"histogram written to {result.figure}")
    lines.append(f"done in {result.seconds:.1f} s")
    return "\n".join(lines)
