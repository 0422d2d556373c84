"""Train a reference CIFAR-10 classifier (supervised, or semi-supervised with temporal ensembling).

    python benchmarks/cifar10/train.py --arch resnet20 --config cpu --data-dir ../shared/data --out weights/
    python benchmarks/cifar10/train.py --arch densenet --config cpu --epochs 30 ...
    python benchmarks/cifar10/train.py --arch resnet20 --semi --labels-per-class 100 ...   # temporal ensembling
    python benchmarks/cifar10/train.py --arch wrn --config gpu --device cuda --epochs 200 ...

SGD with Nesterov momentum 0.9, weight decay 5e-4, one-cycle learning rate peaking at ``--lr``, random
translations (±4 px) and horizontal flips. Weights are written as safetensors, with a JSON line of the settings,
validation accuracy and wall time next to them.

Temporal ensembling (Laine & Aila, 2017): every epoch each image's softmax output is accumulated into an
exponential moving average ``Z ← αZ + (1−α)z`` (α = 0.6); the loss is the cross-entropy on the labelled
images plus ``w(t)·MSE(softmax, Z/(1−α^t))`` on all images, with ``w`` ramped up as ``w_max·exp(−5(1−t/T)²)``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import augment, cifar10_splits
from models import make_model


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model.eval()
    hits = 0
    with torch.inference_mode():
        for i in range(0, len(y), 500):
            hits += int((model(x[i : i + 500].to(device)).argmax(1).cpu() == y[i : i + 500]).sum())
    return hits / len(y)


def train(
    model,
    x,
    y,
    *,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    device: torch.device,
    labelled: torch.Tensor | None = None,
    w_max: float = 30.0,
    val=None,
) -> list[dict]:
    """Supervised training, or temporal ensembling when ``labelled`` (a bool mask over ``x``) is given."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * math.ceil(len(y) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    n_classes = 10
    ensemble = torch.zeros(len(y), n_classes)
    target = torch.zeros(len(y), n_classes)
    alpha, ramp = 0.6, max(1, int(0.4 * epochs))
    log = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=g)
        epoch_out = torch.zeros(len(y), n_classes)
        w = w_max * math.exp(-5 * (1 - min(epoch, ramp) / ramp) ** 2) if labelled is not None else 0.0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            xb = augment(x[idx], g).to(device)
            out = model(xb)
            if labelled is None:
                loss = F.cross_entropy(out, y[idx].to(device))
            else:
                mask = labelled[idx].to(device)
                sup = F.cross_entropy(out[mask], y[idx][mask.cpu()].to(device), reduction="sum") / len(idx)
                prob = torch.softmax(out, 1)
                unsup = F.mse_loss(prob, target[idx].to(device), reduction="sum") / (len(idx) * n_classes)
                loss = sup + w * unsup
                epoch_out[idx] = prob.detach().cpu()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if labelled is not None:
            ensemble = alpha * ensemble + (1 - alpha) * epoch_out
            target = ensemble / (1 - alpha ** (epoch + 1))
        row = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - t0, 1), "loss": float(loss.detach())}
        if val is not None:
            row["val_accuracy"] = accuracy(model, *val, device)
        log.append(row)
        print(json.dumps(row), flush=True)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20", choices=["resnet20", "densenet", "wrn"])
    parser.add_argument("--config", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--semi", action="store_true", help="temporal ensembling with --labels-per-class labels")
    parser.add_argument("--labels-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="benchmarks/cifar10/weights")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images (smoke runs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    (x, y), val, test = cifar10_splits(args.data_dir, seed=0)
    if args.limit:  # a seeded random subset (the file is sorted by class)
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[: args.limit]
        sub = keep[keep < len(val[1])][:500]
        x, y, val, test = x[keep], y[keep], (val[0][sub], val[1][sub]), (test[0][sub], test[1][sub])
    labelled = None
    if args.semi:
        g = torch.Generator().manual_seed(args.seed)
        labelled = torch.zeros(len(y), dtype=torch.bool)
        for c in range(10):
            members = torch.nonzero(y == c).flatten()
            labelled[members[torch.randperm(len(members), generator=g)[: args.labels_per_class]]] = True
    torch.manual_seed(args.seed)
    model = make_model(args.arch, args.config)
    log = train(
        model,
        x,
        y,
        epochs=args.epochs,
        lr=args.lr,
        batch=args.batch,
        seed=args.seed,
        device=device,
        labelled=labelled,
        val=val,
    )
    name = f"{'te-' if args.semi else ''}{args.arch}-{args.config}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors")
    )
    summary = {
        "name": name,
        "arch": args.arch,
        "config": args.config,
        "semi": args.semi,
        "labels_per_class": args.labels_per_class if args.semi else None,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch": args.batch,
        "seed": args.seed,
        "device": str(device),
        "val_accuracy": log[-1].get("val_accuracy"),
        "test_accuracy": accuracy(model, *test, device),
        "train_seconds": log[-1]["seconds"],
    }
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
