"""Re-run the paper's CIFAR-10 experiments from saved weights and write ``docs/results.md`` from the outputs.

    python benchmarks/reproduce_cifar10.py --data-dir ../shared/data --out results/

For every model in ``benchmarks/cifar10/weights/*.safetensors`` (trained by ``benchmarks/cifar10/train.py``):
features of the 45,000/5,000/10,000 train/validation/test splits, FGSM and BIM at ε ∈ {1, 2, 4, 8}/255 on
(a subset of) the correctly classified test images, and OOD sets (matched Gaussian noise, Fashion-MNIST and
MNIST resized to 32×32×3) are extracted once and cached in ``OUT/cache/``; then every scorer is fitted on the
training features (temperature scaling and Mahalanobis's ε on validation) for each seed. Outputs per model:
``OUT/<model>/report.md`` with figures, CSV and JSON, the purification grid, and the page ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cifar10"))
from data import cifar10_splits  # noqa: E402
from models import make_model  # noqa: E402

from featurefail import FailureDetector, purification_grid  # noqa: E402
from featurefail.evaluate import EvalData, EvalResult, collect, evaluate_features  # noqa: E402
from featurefail.ood import NpzImages, gaussian_noise  # noqa: E402
from featurefail.plots import write_report  # noqa: E402

# the paper's CIFAR-10 figures (appendix Table 2, DenseNet-100; AUROC in %)
PAPER_TABLE2 = {
    "ood: fashion-mnist": {"GMM-1000": 97.47, "mahalanobis": 98.38, "temperature": 93.71},
    "ood: gaussian-noise": {"GMM-1000": 100.0, "mahalanobis": 100.0, "temperature": 77.85},
}
FAST_SCORERS = ("max_softmax", "temperature", "mahalanobis", "zheng_hong")
DENSITY_SCORERS = ("vae", "maf", "pixelcnn")


def load_reference(path: Path) -> tuple[torch.nn.Module, dict]:
    info = json.loads(path.with_suffix(".json").read_text())
    model = make_model(info["arch"], info["config"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), info


def run_model(path: Path, args: argparse.Namespace, splits, ood) -> dict:
    model, info = load_reference(path)
    name = info["name"]
    out = Path(args.page).parent / "results" / name  # figures are part of the page
    cache = Path(args.out) / "cache" / f"{name}.safetensors"
    say = lambda m: print(f"[{name}] {m}", flush=True)  # noqa: E731
    t0 = time.perf_counter()
    (x_tr, y_tr), val, (x_te, y_te) = splits
    if cache.exists() and not args.refresh:
        say(f"reusing cached features {cache}")
        data = EvalData.load(cache)
    else:
        attacks = [f"{kind}:{eps}/255" for kind in ("fgsm", "bim") for eps in (1, 2, 4, 8)]
        # attacks run on a subset of the test set (the clean rows of every source stay the full test set)
        data = collect(
            model, (x_tr, y_tr), val, (x_te, y_te), ood=ood, attacks=(), keep_inputs=args.density, progress=say
        )
        g = torch.Generator().manual_seed(0)
        subset = torch.randperm(len(y_te), generator=g)[: args.attack_subset]
        adv = collect(
            model,
            (x_tr[:10], y_tr[:10]),
            (val[0][:10], val[1][:10]),
            (x_te[subset], y_te[subset]),
            attacks=attacks,
            keep_inputs=args.density,
            progress=say,
        )
        for src in adv.sources:
            if src.kind == "adversarial":
                mask = torch.zeros(len(y_te), dtype=torch.bool)
                mask[subset[src.normal_mask]] = True
                src.normal_mask = mask
                data.sources.append(src)
        cache.parent.mkdir(parents=True, exist_ok=True)
        data.save(cache)
    t_collect = time.perf_counter() - t0
    seeds = list(range(args.seeds))
    parts = []
    for label, k in (("GMM-100", 100), ("GMM-1000", 1000)):
        part = evaluate_features(
            data, scorers=["gmm"], scorer_options={"gmm": {"n_components": k}}, seeds=seeds, progress=say
        )
        parts.append(_renamed(part, "gmm", label))
    scorers = list(FAST_SCORERS) + (list(DENSITY_SCORERS) if args.density else [])
    options = {"mahalanobis": {"epsilon": 0.0}, "pixelcnn": {"epochs": 1}, "vae": {"epochs": 20}, "maf": {"epochs": 20}}
    parts.append(
        evaluate_features(data, scorers=scorers, scorer_options=options, seeds=seeds, model=model, progress=say)
    )
    result = _merge(parts)
    report = write_report(result, out, histogram_scorer="GMM-100", title=f"{name} on CIFAR-10")
    # purification (Table 4) with GMM-100 and the model's last layer
    det = FailureDetector(n_components=100, seed=0, progress=False).fit_features(data.train)
    det.head_weight_, det.head_bias_ = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    grid = purification_grid(det, data.val, data.test)
    (out / "purification.md").write_text(grid.to_markdown())
    return {
        "name": name,
        "info": info,
        "result": result,
        "report": report,
        "grid": grid,
        "seconds": time.perf_counter() - t0,
        "collect_seconds": t_collect,
    }


def _renamed(result: EvalResult, old: str, new: str) -> EvalResult:
    for row in result.rows:
        if row.scorer == old:
            row.scorer = new
    result.mann_whitney = {new if k == old else k: v for k, v in result.mann_whitney.items()}
    for by_scorer in result.scores.values():
        if old in by_scorer:
            by_scorer[new] = by_scorer.pop(old)
    return result


def _merge(parts: list[EvalResult]) -> EvalResult:
    merged = EvalResult(accuracy=parts[0].accuracy)
    order = {}
    for part in parts:
        for row in part.rows:
            order.setdefault(row.source, []).append(row)
        merged.mann_whitney.update(part.mann_whitney)
        for source, by_scorer in part.scores.items():
            merged.scores.setdefault(source, {}).update(by_scorer)
    merged.rows = [row for rows in order.values() for row in rows]
    return merged


def write_results_page(runs: list[dict], path: Path, args: argparse.Namespace, total: float) -> None:
    lines = [
        "# Results on real CIFAR-10",
        "",
        "Generated by `python benchmarks/reproduce_cifar10.py "
        f"--data-dir {args.data_dir} --out {args.out}{' --density' if args.density else ''}` — do not edit by hand.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Wall time of this run: {total / 60:.1f} min "
        "(features and attacks are cached; a rerun with the cache only refits the scorers).",
        "",
        "Data: CIFAR-10 from `cifar10_train.npz`/`cifar10_test.npz` (JPEG re-encoded, see the data README), a "
        "seeded stratified 45,000/5,000 train/validation split. Attacks: untargeted L∞ FGSM and BIM (10 steps) at "
        f"ε ∈ {{1, 2, 4, 8}}/255 on {args.attack_subset} random test images; the adversarial rows compare the "
        "correctly classified clean images among them with their successful adversarial versions. OOD: Gaussian "
        "noise matched to the training mean/std, Fashion-MNIST and MNIST test sets resized to 32×32×3. "
        f"{args.seeds} seeds (mean ± std). AUROC/AUPR in %.",
        "",
    ]
    for run in runs:
        info = run["info"]
        lines += [
            f"## {run['name']}",
            "",
            f"{info['arch']} ({info['config']} configuration){_semi(info)}; "
            f"trained {info['epochs']} epochs on {info['device']} in {info['train_seconds'] / 60:.1f} min; "
            f"test accuracy {100 * run['result'].accuracy:.2f}%. Evaluation: {run['seconds'] / 60:.1f} min "
            f"(feature extraction and attacks {run['collect_seconds'] / 60:.1f} min).",
            "",
            run["result"].to_markdown().replace("### ", "#### "),
            "",
            "#### Purification (GMM-100, 100 steps; chosen on validation)",
            "",
            run["grid"].to_markdown(),
            "",
            f"Figures and CSV/JSON: [results/{run['name']}/report.md](results/{run['name']}/report.md).",
            "",
        ]
        lines += _comparison(run["result"])
    lines += [
        "## Not run yet",
        "",
        "The paper's DenseNet-100 (tanh features) and the semi-supervised temporal-ensembling WRN are defined in "
        "`benchmarks/cifar10/` (`--arch densenet`, `--semi`) but their CPU trainings do not fit one working "
        "session on two cores; models without saved weights are skipped by this page.",
        "",
    ]
    path.write_text("\n".join(lines))


def _semi(info: dict) -> str:
    return f", temporal ensembling with {info['labels_per_class']} labels per class" if info["semi"] else ""


def _comparison(result: EvalResult) -> list[str]:
    by = {(r.source, r.scorer): r for r in result.rows}
    lines = [
        "#### Against the paper (its CIFAR-10 Table 2 is for a DenseNet-100; AUROC)",
        "",
        "| source | scorer | paper | ours | verdict |",
        "|---|---|---|---|---|",
    ]
    for source, paper in PAPER_TABLE2.items():
        for scorer, value in paper.items():
            row = by.get((source, scorer))
            if row is None:
                continue
            ours = 100 * row.auroc
            verdict = (
                "agrees (within 2 points)"
                if abs(ours - value) <= 2
                else ("ours higher" if ours > value else "ours lower")
            )
            lines.append(f"| {source} | {scorer} | {value:.2f} | {ours:.2f} ± {100 * row.auroc_std:.2f} | {verdict} |")
    best = {}
    for r in result.rows:
        if r.source not in best or r.auroc > best[r.source].auroc:
            best[r.source] = r
    lines += [
        "",
        "Best scorer per source: " + "; ".join(f"{s}: {r.scorer} ({100 * r.auroc:.1f})" for s, r in best.items()) + ".",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="results")
    parser.add_argument("--weights", default=str(HERE / "cifar10" / "weights"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--attack-subset", type=int, default=2000)
    parser.add_argument("--density", action="store_true", help="also VAE, MAF and PixelCNN (slow on a CPU)")
    parser.add_argument("--refresh", action="store_true", help="ignore cached features")
    parser.add_argument("--page", default=str(HERE.parent / "docs" / "results.md"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    splits = cifar10_splits(args.data_dir)
    data_dir = Path(args.data_dir)
    n = len(splits[2][1])
    ood = {
        "gaussian-noise": gaussian_noise(splits[0][0], n, seed=0),
        "fashion-mnist": NpzImages(data_dir / "fashion_mnist_test.npz", size=32, channels=3).images,
        "mnist": NpzImages(data_dir / "mnist_test.npz", size=32, channels=3).images,
    }
    weights = sorted(Path(args.weights).glob("*.safetensors"))
    if not weights:
        raise SystemExit(f"no weights in {args.weights}; train with benchmarks/cifar10/train.py first")
    runs = [run_model(w, args, splits, ood) for w in weights]
    write_results_page(runs, Path(args.page), args, time.perf_counter() - t0)
    print(f"wrote {args.page} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
