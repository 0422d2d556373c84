"""Fit and score time of every registered scorer, side by side, on ResNet-sized features and a 512-d bank.

    nice -n 10 python benchmarks/scorer_costs.py [--data-dir ../shared/data] [--epochs 1]

Two blocks in one run:

* **64-d**: the CIFAR-10 ResNet-20 reference (``benchmarks/cifar10/weights/resnet20-cpu.safetensors``) — its
  penultimate features of the 45,000 training, 5,000 validation and 10,000 test images when ``--data-dir``
  holds ``cifar10_*.npz`` and the weights exist; otherwise random features of that shape. Scorers that need
  the model and the images (``odin``'s input perturbation, ``pixelcnn``) run on the ResNet-20 (random weights
  and uniform images without data: the cost does not depend on them).
* **512-d**: random 512-d features (the width of a ResNet-18/34 penultimate layer) of the same split sizes (a
  45,000 × 512 bank by default; `--n-train 50000` for 50,000), a random head.

Random features imitate post-ReLU penultimate features: 10 non-negative class centres plus noise, clipped at
0, with a linear head whose logits predict the class most of the time. Every scorer runs with its registered
defaults except the neural density models (``vae``, ``maf``, ``pixelcnn``), trained ``--epochs`` epochs
(default 1 of their 100/100/10), ``pixelcnn`` on ``--pixelcnn-train`` images: their fit time is that of the
shortened training (training time grows about linearly in the epochs). *fit* = ``fit(train)`` then
``fit_validation(val)``; *score* = ``score(test)`` on the 10,000 test rows, or on ``--n-images`` test images
for the scorers that run the model (``odin``: a forward, a backward and a forward pass per image).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from featurefail import FeatureHook, Features, extract_features
from featurefail.detector import penultimate_head
from featurefail.scorers import ModelContext, available_scorers, build_scorer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cifar10"))
from models import make_model  # noqa: E402

NEURAL = ("vae", "maf", "pixelcnn")


def synthetic(n: int, d: int, c: int = 10, seed: int = 0) -> tuple[Features, torch.Tensor, torch.Tensor]:
    """``n`` random post-ReLU-like features of dimension ``d`` with labels and the logits of a random head."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(c, d, generator=g) * 2
    labels = torch.randint(0, c, (n,), generator=g)
    feats = torch.relu(centres[labels] + torch.randn(n, d, generator=g) * 0.8)
    weight = (centres - centres.mean(0)) * (8.0 / d**0.5)
    bias = -(weight * centres).sum(1) / 2 + torch.randn(c, generator=g) * 0.1
    return Features(feats, feats @ weight.T + bias, labels), weight, bias


def split(features: Features, n_train: int, n_val: int, n_test: int) -> tuple[Features, Features, Features]:
    a, b = n_train, n_train + n_val
    return features.subset(slice(0, a)), features.subset(slice(a, b)), features.subset(slice(b, b + n_test))


def resnet_block(args: argparse.Namespace, say) -> dict:
    weights = HERE / "cifar10" / "weights" / "resnet20-cpu.safetensors"
    model = make_model("resnet20", "cpu").eval()
    data = Path(args.data_dir) if args.data_dir else None
    real = data is not None and (data / "cifar10_train.npz").exists() and weights.exists()
    if real:
        from data import cifar10_splits

        model.load_state_dict(load_file(str(weights)))
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = cifar10_splits(data)
        keep = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))[: args.n_train].sort().values
        x_tr, y_tr = x_tr[keep], y_tr[keep]  # a seeded subset: the training split is sorted by class
        x_te, y_te = x_te[: args.n_test], y_te[: args.n_test]
        cache = Path(args.cache) if args.cache else None
        if cache is not None and cache.exists():
            t = load_file(str(cache))
            parts = [Features(t[f"{p}.feats"], t[f"{p}.logits"], t[f"{p}.labels"]) for p in ("train", "val", "test")]
            weight, bias = t["head.weight"], t["head.bias"]
        else:
            hook = FeatureHook(model, layer=None)
            say(f"extracting ResNet-20 features of {len(x_tr) + len(x_va) + len(x_te)} CIFAR-10 images ...")
            t0 = time.perf_counter()
            parts = []
            for x, y in ((x_tr, y_tr), (x_va, y_va), (x_te, y_te)):
                loader = [(x[i : i + 500], y[i : i + 500]) for i in range(0, len(x), 500)]
                parts.append(extract_features(model, loader, hook, progress_bar=False))
            say(f"  done in {time.perf_counter() - t0:.0f} s")
            weight, bias = penultimate_head(hook)
            if cache is not None:
                tensors = {
                    f"{p}.{k}": getattr(f, k).contiguous()
                    for p, f in zip(("train", "val", "test"), parts, strict=True)
                    for k in ("feats", "logits", "labels")
                }
                save_file({**tensors, "head.weight": weight, "head.bias": bias}, str(cache))
        train, val, test = parts
        images = (x_tr, x_te)
        source = "CIFAR-10 ResNet-20 features (45,000 train / 5,000 val / 10,000 test)"
    else:
        n_val = 5000
        feats, weight, bias = synthetic(args.n_train + n_val + args.n_test, 64, seed=1)
        train, val, test = split(feats, args.n_train, n_val, args.n_test)
        g = torch.Generator().manual_seed(2)
        size = (3, 32, 32)
        images = (torch.rand(args.pixelcnn_train, *size, generator=g), torch.rand(args.n_images, *size, generator=g))
        source = "random 64-d features; random-weight ResNet-20 on uniform images for odin/pixelcnn"
    return {
        "dim": 64,
        "train": train,
        "val": val,
        "test": test,
        "head": (weight, bias),
        "model": model,
        "images": images,
        "source": source,
    }


def bank_block(args: argparse.Namespace) -> dict:
    n_val = 5000
    feats, weight, bias = synthetic(args.n_train + n_val + args.n_test, 512, seed=3)
    train, val, test = split(feats, args.n_train, n_val, args.n_test)
    return {
        "dim": 512,
        "train": train,
        "val": val,
        "test": test,
        "head": (weight, bias),
        "model": None,
        "images": None,
        "source": "random 512-d features",
    }


def options(name: str, args: argparse.Namespace) -> dict:
    if name in ("vae", "maf"):
        return {"epochs": args.epochs}
    if name == "pixelcnn":
        return {"epochs": args.epochs, "max_train": args.pixelcnn_train}
    return {}


def time_scorer(name: str, block: dict, args: argparse.Namespace) -> tuple[str, str, str]:
    """``(fit, score, note)`` as printed strings; ``"—"`` where the block cannot run the scorer."""
    scorer = build_scorer(name, options(name, args))
    train, val, test = block["train"], block["val"], block["test"]
    model = block["model"]
    if scorer.requires_model or scorer.requires_inputs:
        if model is None or block["images"] is None:
            return "—", "—", "needs the model and its inputs (no 512-d model here)"
        x_train, x_test = block["images"]
        n = min(len(x_train), len(train))
        train = Features(train.feats[:n], train.logits[:n], train.labels[:n], inputs=x_train[:n])
        m = min(len(x_test), args.n_images)
        test = Features(test.feats[:m], test.logits[:m], test.labels[:m], inputs=x_test[:m])
    hook_factory = (lambda m: FeatureHook(m, layer=None)) if model is not None else None
    weight, bias = block["head"]
    scorer.attach(ModelContext(model, hook_factory, weight, bias))
    t0 = time.perf_counter()
    scorer.fit(train)
    scorer.fit_validation(val)
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = scorer.score(test)
    score = time.perf_counter() - t0
    notes = [] if torch.isfinite(scores).all() else ["non-finite scores!"]
    if name in NEURAL:
        default = type(scorer)().get_params()["epochs"]
        rows = min(len(train), args.pixelcnn_train) if name == "pixelcnn" else len(train)
        notes.append(f"trained {args.epochs} epoch(s) (default {default}) on {rows} rows")
    if test.inputs is not None:
        notes.append(f"scored {len(test)} images")
    return f"{fit:.2f}", f"{score:.2f}", ", ".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder with cifar10_train.npz / cifar10_test.npz")
    parser.add_argument("--n-train", type=int, default=45000)
    parser.add_argument("--n-test", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of vae, maf and pixelcnn")
    parser.add_argument("--pixelcnn-train", type=int, default=2000, help="training images of pixelcnn")
    parser.add_argument("--n-images", type=int, default=1000, help="test images scored by odin and pixelcnn")
    parser.add_argument("--cache", default=None, help="a .safetensors file caching the ResNet-20 features")
    parser.add_argument("--scorers", nargs="*", default=None, help="default: every registered scorer")
    parser.add_argument("--dims", nargs="*", type=int, default=[64, 512], choices=[64, 512])
    args = parser.parse_args()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    names = args.scorers or available_scorers()
    blocks = []
    if 64 in args.dims:
        blocks.append(resnet_block(args, say))
    if 512 in args.dims:
        blocks.append(bank_block(args))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for b in blocks:
        print(f"- {b['dim']}-d: {b['source']}; train {len(b['train'])}, val {len(b['val'])}, test {len(b['test'])}")
    dims = [b["dim"] for b in blocks]
    print()
    print("| scorer | " + " | ".join(f"fit {d}-d (s) | score {d}-d (s)" for d in dims) + " | note |")
    print("|---|" + "---|---|" * len(dims) + "---|")
    for name in names:
        cells, notes = [], []
        for b in blocks:
            say(f"{name} on {b['dim']}-d ...")
            try:
                fit, score, note = time_scorer(name, b, args)
            except Exception as exc:  # one scorer's failure must not hide the others' figures
                fit, score, note = "error", "error", f"{type(exc).__name__}: {exc}"[:120]
            cells += [fit, score]
            if note:
                notes.append(f"{b['dim']}-d: {note}")
        print(f"| {name} | " + " | ".join(cells) + " | " + "; ".join(notes) + " |", flush=True)


if __name__ == "__main__":
    main()
