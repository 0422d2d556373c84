"""Every registered scorer on the `featurefail demo` digits model: AUROC for test mistakes and Gaussian noise.

    python benchmarks/digits_scorers.py [--seed 0]

Scorers are fitted on the training split only (temperature scaling and Mahalanobis's ε on the validation
split); mistakes and noise are used for nothing but the AUROC.
"""

from __future__ import annotations

import argparse
import time

import torch

from featurefail import FailureDetector, Features, metrics
from featurefail.demo import DigitsCNN, load_digits_splits, photo_patches, train_classifier
from featurefail.ood import gaussian_noise
from featurefail.scorers import available_scorers

OPTIONS = {"gmm": {}, "mahalanobis": {"epsilon": "auto"}, "zheng_hong": {"n_components": 2}, "pixelcnn": {"epochs": 20}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_digits_splits(args.seed)
    model = train_classifier(DigitsCNN(), data.x_train, data.y_train, epochs=12, seed=args.seed)
    train = [(data.x_train, data.y_train)]
    val = [(data.x_val, data.y_val)]
    noise = gaussian_noise(data.x_train, len(data.y_test), seed=args.seed)
    patches = photo_patches(len(data.y_test), seed=args.seed)
    print("| scorer | mistakes AUROC | Gaussian-noise AUROC | photo-patch AUROC | fit + score time |")
    print("|---|---|---|---|---|")
    for name in available_scorers():
        t0 = time.perf_counter()
        # "gmm" = the paper's GMM on the raw penultimate features, as the other scorers see them
        paper = {"n_components": 10, "seed": args.seed, "layer": None, "preprocess": None, "per_layer": False}
        kw = paper if name == "gmm" else {"scorer_options": OPTIONS.get(name, {})}
        det = FailureDetector(scorer=name, progress=False, **kw).fit(model, train)
        det.calibrate(val, folds=3)
        feats = det.features(data.x_test)
        correct = Features(feats.feats, feats.logits, data.y_test).correct
        s = det.score_features(feats)
        row = (
            metrics.auroc(s[correct], s[~correct]),
            metrics.auroc(s, det.score(noise)),
            metrics.auroc(s, det.score(patches)),
        )
        print(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in row) + f" | {time.perf_counter() - t0:.1f} s |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
