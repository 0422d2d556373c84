"""Quickstart: fit a failure detector on a small classifier, calibrate it, and flag risky inputs.

Runs on a CPU in a few seconds with scikit-learn's bundled digits:

    python examples/quickstart.py
"""

from __future__ import annotations

import torch

from featurefail import FailureDetector, mann_whitney, metrics
from featurefail.demo import DigitsCNN, load_digits_splits, train_classifier
from featurefail.ood import gaussian_noise


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def main() -> None:
    torch.manual_seed(0)
    data = load_digits_splits(seed=0)
    model = train_classifier(DigitsCNN(), data.x_train, data.y_train, epochs=12)

    detector = FailureDetector(n_components=10, progress=False)
    detector.fit(model, batches(data.x_train, data.y_train))  # labels are ignored by the GMM
    detector.calibrate(batches(data.x_val, data.y_val), strategy="recall@0.8", folds=3)

    scores = detector.score(data.x_test)
    correct = model(data.x_test).argmax(1) == data.y_test
    test = mann_whitney(scores[correct], scores[~correct])
    print(f"test accuracy {correct.float().mean():.3f}; mistakes AUROC {test.auroc:.3f}, p = {test.pvalue:.2e}")

    flags = detector.detect(data.x_test)
    print(
        f"threshold {detector.threshold_:.2f}: flagged {int(flags.sum())} of {len(flags)} test images, "
        f"catching {int((flags & ~correct).sum())} of {int((~correct).sum())} mistakes"
    )

    noise = gaussian_noise(data.x_train, 500)
    print(f"Gaussian-noise OOD AUROC {metrics.auroc(scores, detector.score(noise)):.3f}")


if __name__ == "__main__":
    main()
