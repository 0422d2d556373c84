"""A small MNIST CNN and its training script, for `featurefail evaluate` on real data.

    python examples/mnist_model.py --data ../shared/data/mnist_train.npz --out mnist_cnn.safetensors
    featurefail evaluate --model examples/mnist_model.py:make_model --weights mnist_cnn.safetensors \\
        --train ../shared/data/mnist_train.npz --test ../shared/data/mnist_test.npz \\
        --ood fashion=../shared/data/fashion_mnist_test.npz --attack fgsm:0.1 --attack bim:0.1 --out mnist-report
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from featurefail.evaluate import holdout_split
from featurefail.ood import NpzImages


class MnistCNN(nn.Module):
    """Two conv layers and two linear layers; inputs (N, 1, 28, 28) in [0, 1], standardised inside."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1((x - 0.1307) / 0.3081)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


def make_model() -> nn.Module:
    return MnistCNN()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="mnist_train.npz")
    parser.add_argument("--out", default="mnist_cnn.safetensors")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held out, as featurefail evaluate does")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = NpzImages(args.data, limit=args.limit)
    train_idx, _ = holdout_split(len(data), args.val_fraction)  # the split `featurefail evaluate` holds out
    images, labels = data.images[train_idx], data.labels[train_idx]
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(labels), generator=g)
        for i in range(0, len(order), 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            opt.step()
        print(f"epoch {epoch + 1}: {time.perf_counter() - t0:.0f} s")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
