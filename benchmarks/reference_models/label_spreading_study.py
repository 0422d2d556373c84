"""Would label spreading pseudo-label better than the teacher's softmax?  Measured on the validation split.

    python benchmarks/reference_models/label_spreading_study.py MODEL.safetensors --data-dir ../shared/data

The teacher (a ``train.py`` model) embeds the 45,000 training and 5,000 validation images (flip-averaged
penultimate features, L2-normalised). Label spreading (Zhou et al., 2004; scikit-learn's ``LabelSpreading`` on a
k-nearest-neighbour graph, the pseudo-labeller of Iscen et al., CVPR 2019) starts from the 1,000 labelled training
images of ``train.py --semi`` (seed 0) and labels every other image; the validation images' labels are used only
to score. Printed per method: validation accuracy of its labels, and the accuracy of the most confident 20, 40,
..., 100% of each predicted class (the sets curriculum labelling would keep).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.semi_supervised import LabelSpreading

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import load_reference_model
from cifar_data import cifar10_splits
from train import pseudo_labels

FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)


@torch.inference_mode()
def embed(model: torch.nn.Module, images: torch.Tensor, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Flip-averaged features ``(N, D)`` and softmax of the flip-averaged logits ``(N, C)`` of uint8 ``images``."""
    features, probs = [], []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(images), batch):
            x = images[i : i + batch].float() / 255
            a, b = model.features(x).float(), model.features(x.flip(-1)).float()
            logits = (model.head(a).float() + model.head(b).float()) / 2 * model.logit_scale
            features.append((a + b) / 2)
            probs.append(torch.softmax(logits, 1))
    return torch.cat(features).numpy(), torch.cat(probs).numpy()


def kept_accuracy(probs: np.ndarray, truth: np.ndarray) -> list[float]:
    """Accuracy of the labels curriculum labelling would keep from ``probs`` ``(N, C)`` (``train.pseudo_labels``:
    the most confident fraction of each predicted class), for each of ``FRACTIONS``."""
    out = []
    for fraction in FRACTIONS:
        kept, labels = pseudo_labels(torch.from_numpy(probs), fraction)
        out.append(round(float((labels.numpy() == truth[kept.numpy()]).mean()), 4))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--neighbours", type=int, nargs="+", default=[10, 30, 50])
    parser.add_argument("--alpha", type=float, default=0.99)
    parser.add_argument("--labels-per-class", type=int, default=100)
    args = parser.parse_args()
    (x, y), (x_val, y_val), _ = cifar10_splits(args.data_dir)
    generator = torch.Generator().manual_seed(0)  # the labelled images of train.py --semi --seed 0
    labelled = torch.cat(
        [
            torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=generator)][
                : args.labels_per_class
            ]
            for c in range(10)
        ]
    ).numpy()
    model = load_reference_model(args.model)
    f_train, _ = embed(model, x)
    f_val, p_val = embed(model, x_val)
    truth = y_val.numpy()
    softmax = p_val.argmax(1)
    print(f"softmax: val {np.mean(softmax == truth):.4f}, kept {kept_accuracy(p_val, truth)}")
    features = np.concatenate([f_train, f_val])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    seeds = np.full(len(features), -1)
    seeds[labelled] = y.numpy()[labelled]
    for k in args.neighbours:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            spreading = LabelSpreading(kernel="knn", n_neighbors=k, alpha=args.alpha, max_iter=1000).fit(
                features, seeds
            )
        dist = spreading.label_distributions_[len(f_train) :]
        pred = dist.argmax(1)
        print(f"label spreading k={k}: val {np.mean(pred == truth):.4f}, kept {kept_accuracy(dist, truth)}")


if __name__ == "__main__":
    main()
