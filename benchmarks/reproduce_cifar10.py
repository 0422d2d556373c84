"""Re-run the paper's CIFAR-10 experiments from saved weights and write ``docs/results.md`` from the outputs.

    python benchmarks/reproduce_cifar10.py --data-dir ../shared/data --out results/

For every model in ``benchmarks/cifar10/weights/*.safetensors`` (trained by ``benchmarks/cifar10/train.py``):
features of the 45,000/5,000/10,000 train/validation/test splits, FGSM and BIM at ε ∈ {1, 2, 4, 8}/255 on
(a subset of) the correctly classified test images, and OOD sets (matched Gaussian noise, Fashion-MNIST and
MNIST resized to 32×32×3) are extracted once and cached in ``OUT/cache/``; then every scorer is fitted on the
training features (temperature scaling and Mahalanobis's ε on validation) for each seed. Outputs per model:
``docs/results/<model>/`` with figures, CSV and JSON, the purification grid, the beyond-the-paper study (every
GMM preprocessing option, features of three layers, the fused scorer, against the baselines) and the default
chosen by the rule of issue 9; a summary per model in ``OUT/<model>/run.json``; and the page ``docs/results.md``.

``--models NAME ...`` recomputes only those models; the page then takes the others from their ``run.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cifar10"))
from data import cifar10_splits  # noqa: E402
from models import make_model  # noqa: E402

from featurefail import DetectorConfig, FailureDetector, purification_grid  # noqa: E402
from featurefail.evaluate import EvalData, EvalResult, EvalRow, collect, evaluate_features  # noqa: E402
from featurefail.hooks import auto_layers  # noqa: E402
from featurefail.ood import NpzImages, gaussian_noise  # noqa: E402
from featurefail.plots import write_report  # noqa: E402

# the paper's CIFAR-10 figures (appendix Table 2, DenseNet-100; AUROC in %)
PAPER_TABLE2 = {
    "ood: fashion-mnist": {"GMM-1000": 97.47, "mahalanobis": 98.38, "temperature": 93.71, "pixelcnn": 0.61},
    "ood: gaussian-noise": {"GMM-1000": 100.0, "mahalanobis": 100.0, "temperature": 77.85, "pixelcnn": 100.0},
}
FAST_SCORERS = ("max_softmax", "temperature", "mahalanobis", "zheng_hong")
DENSITY_SCORERS = ("vae", "maf", "pixelcnn")
BASELINES = ("max_softmax", "temperature", "mahalanobis", "zheng_hong", "GMM-1000")
# the beyond-the-paper options: (label, scorer, options, layer blocks: "penultimate" or "all" of layer="auto")
STUDY = [
    ("GMM-100 (paper)", "gmm", {}, "penultimate"),
    ("standardize", "gmm", {"preprocess": "standardize"}, "penultimate"),
    ("pca:0.99", "gmm", {"preprocess": "pca:0.99"}, "penultimate"),
    ("pca:0.9", "gmm", {"preprocess": "pca:0.9"}, "penultimate"),
    ("l2", "gmm", {"preprocess": "l2"}, "penultimate"),
    ("tanh", "gmm", {"preprocess": "tanh"}, "penultimate"),
    ("layer=auto concat + standardize", "gmm", {"preprocess": "standardize"}, "all"),
    ("layer=auto per-layer sum + standardize", "gmm", {"preprocess": "standardize", "per_layer": True}, "all"),
    ("layer=auto per-layer sum + l2", "gmm", {"preprocess": "l2", "per_layer": True}, "all"),
    ("fused energy", "fused", {"logit_score": "energy"}, "penultimate"),
    ("fused max_softmax", "fused", {"logit_score": "max_softmax"}, "penultimate"),
    ("fused energy + l2", "fused", {"logit_score": "energy", "preprocess": "l2"}, "penultimate"),
    ("fused max_softmax + layer=auto", "fused", {"logit_score": "max_softmax", "preprocess": "standardize"}, "all"),
]


def load_reference(path: Path) -> tuple[torch.nn.Module, dict]:
    info = json.loads(path.with_suffix(".json").read_text())
    model = make_model(info["arch"], info["config"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), info


def run_model(path: Path, args: argparse.Namespace, splits, ood) -> dict:
    model, info = load_reference(path)
    name = info["name"]
    out = Path(args.page).parent / "results" / name  # figures are part of the page
    cache = Path(args.out) / "cache" / f"{name}{f'-limit{args.limit}' if args.limit else ''}.safetensors"
    say = lambda m: print(f"[{name}] {m}", flush=True)  # noqa: E731
    t0 = time.perf_counter()
    (x_tr, y_tr), val, (x_te, y_te) = splits
    layers = auto_layers(model, x_te[:2])  # what FailureDetector(layer="auto") hooks: [None, stage ends]
    data = EvalData.load(cache) if cache.exists() and not args.refresh else None
    from_cache = data is not None and data.layers == layers and (data.train.inputs is not None or not args.density)
    if from_cache:
        say(f"reusing cached features {cache}")
    else:
        attacks = [f"{kind}:{eps}/255" for kind in ("fgsm", "bim") for eps in (1, 2, 4, 8)]
        # inputs are kept (and cached) so that a later --density run needs no new forward passes or attacks
        common = dict(layer=layers, keep_inputs=True, progress=say)
        data = collect(model, (x_tr, y_tr), val, (x_te, y_te), ood=ood, attacks=(), **common)
        # attacks run on a subset of the test set (the clean rows of every source stay the full test set)
        g = torch.Generator().manual_seed(0)
        subset = torch.randperm(len(y_te), generator=g)[: args.attack_subset]
        tiny = (x_tr[:10], y_tr[:10]), (val[0][:10], val[1][:10])
        adv = collect(model, *tiny, (x_te[subset], y_te[subset]), attacks=attacks, **common)
        for src in adv.sources:
            if src.kind == "adversarial":
                mask = torch.zeros(len(y_te), dtype=torch.bool)
                mask[subset[src.normal_mask]] = True
                src.normal_mask = mask
                data.sources.append(src)
        cache.parent.mkdir(parents=True, exist_ok=True)
        data.save(cache)
    t_collect = time.perf_counter() - t0
    penultimate = data.select_blocks(0)
    seeds = list(range(args.seeds))
    parts = []
    for label, k in (("GMM-100", 100), ("GMM-1000", 1000)):
        part = evaluate_features(
            penultimate, scorers=["gmm"], scorer_options={"gmm": {"n_components": k}}, seeds=seeds, progress=say
        )
        parts.append(_renamed(part, "gmm", label))
    options = {
        "mahalanobis": {"epsilon": 0.0},
        "vae": {"epochs": 20},
        "maf": {"epochs": 20},
        "pixelcnn": {"epochs": 1, "max_train": args.pixelcnn_train},
    }
    parts.append(
        evaluate_features(
            penultimate, scorers=list(FAST_SCORERS), scorer_options=options, seeds=seeds, model=model, progress=say
        )
    )
    if args.density:
        for density, density_seeds in (("vae", seeds), ("maf", seeds), ("pixelcnn", seeds[: args.pixelcnn_seeds])):
            part = evaluate_features(
                penultimate, scorers=[density], scorer_options=options, seeds=density_seeds, progress=say
            )
            parts.append(part)
    result = _merge(parts)
    report = write_report(result, out, histogram_scorer="GMM-100", title=f"{name} on CIFAR-10")
    # purification (Table 4) with GMM-100 and the model's last layer
    det = FailureDetector.paper(n_components=100, seed=0, progress=False).fit_features(penultimate.train)
    det.head_weight_, det.head_bias_ = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    grid = purification_grid(det, penultimate.val, penultimate.test)
    (out / "purification.md").write_text(grid.to_markdown())
    t_study = time.perf_counter()
    study = run_study(data, penultimate, result, seeds, say)
    study_seconds = time.perf_counter() - t_study
    run = {
        "name": name,
        "info": info,
        "layers": [layer or "penultimate (input of fc)" for layer in layers],
        "seconds": time.perf_counter() - t0,
        "collect_seconds": t_collect,
        "from_cache": from_cache,
        "study_seconds": study_seconds,
        "density": bool(args.density),
        "pixelcnn_train": args.pixelcnn_train,
        "pixelcnn_seeds": args.pixelcnn_seeds,
        "seeds": args.seeds,
        "grid": grid.to_markdown(),
        "study": [asdict(row) for row in study.rows],
    }
    summary = Path(args.out) / name
    summary.mkdir(parents=True, exist_ok=True)
    result.to_json(summary / "result.json")
    (summary / "run.json").write_text(json.dumps(run, indent=2))
    return {**run, "result": result, "study": study, "report": report}


def run_study(data: EvalData, penultimate: EvalData, main: EvalResult, seeds: list[int], say) -> EvalResult:
    """Every option of :data:`STUDY` on every source; the paper's GMM-100 and the baselines come from ``main``."""
    parts = [_only(main, ["GMM-100"], rename={"GMM-100": STUDY[0][0]})]
    for label, scorer, options, blocks in STUDY[1:]:
        source = data if blocks == "all" else penultimate
        part = evaluate_features(
            source, scorers=[scorer], scorer_options={scorer: {"n_components": 100, **options}}, seeds=seeds
        )
        say(f"study: {label}: mean AUROC {100 * sum(r.auroc for r in part.rows) / len(part.rows):.1f}")
        parts.append(_renamed(part, scorer, label))
    parts.append(_only(main, list(BASELINES)))
    return _merge(parts)


def _only(result: EvalResult, scorers: list[str], rename: dict[str, str] | None = None) -> EvalResult:
    rename = rename or {}
    rows = [
        EvalRow(**{**asdict(r), "scorer": rename.get(r.scorer, r.scorer)}) for r in result.rows if r.scorer in scorers
    ]
    return EvalResult(rows=rows, accuracy=result.accuracy)


def load_run(summary: Path) -> dict | None:
    """A model's results from an earlier invocation (``run.json`` + ``result.json``), or None."""
    if not (summary / "run.json").exists():
        return None
    run = json.loads((summary / "run.json").read_text())
    study = EvalResult(rows=[EvalRow(**row) for row in run["study"]])
    return {**run, "result": EvalResult.from_json(summary / "result.json"), "study": study}


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
        f"Generated by `python benchmarks/reproduce_cifar10.py --data-dir {args.data_dir} --out {args.out}` from "
        "the per-model runs below (`--density` adds VAE, MAF and PixelCNN; `--models NAME ...` recomputes only "
        "those models and reuses the others' saved summaries; `--models` alone rewrites this page) — do not edit "
        "by hand.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Evaluation time summed over the models: "
        f"{sum(run['seconds'] for run in runs) / 60:.1f} min (per model below; features and attacks are cached, so "
        f"a rerun only refits the scorers); this page was written by an invocation of {total / 60:.1f} min.",
        "",
        "Data: CIFAR-10 from `cifar10_train.npz`/`cifar10_test.npz` (JPEG re-encoded, see the data README), a "
        "seeded stratified 45,000/5,000 train/validation split. Attacks: untargeted L∞ FGSM and BIM (10 steps) at "
        f"ε ∈ {{1, 2, 4, 8}}/255 on {args.attack_subset} random test images; the adversarial rows compare the "
        "correctly classified clean images among them with their successful adversarial versions. OOD: Gaussian "
        "noise matched to the training mean/std, Fashion-MNIST and MNIST test sets resized to 32×32×3. "
        f"{args.seeds} seeds (mean ± std). AUROC/AUPR in %. Every scorer is fitted on the training features only "
        "(temperature, Mahalanobis's ε and the fused scorer's weight on the validation split); the runner asserts "
        "that no failure sample and no validation/test row reaches a fit or a feature preprocessing.",
        "",
        "Contents: "
        + ", ".join(f"[{run['name']}](#{run['name']})" for run in runs)
        + ", [beyond the paper: the default detector](#beyond-the-paper-the-default-detector).",
        "",
    ]
    lines += agreement_section(runs)
    for run in runs:
        info = run["info"]
        lines += [
            f"## {run['name']}",
            "",
            f"{info['arch']} ({info['config']} configuration){_semi(info)}; "
            f"trained {info['epochs']} epochs on {info['device']} in {info['train_seconds'] / 60:.1f} min; "
            f"test accuracy {100 * run['result'].accuracy:.2f}%. Evaluation: {run['seconds'] / 60:.1f} min "
            + (
                "(features and attacks read from the cache"
                if run.get("from_cache", False)
                else f"(feature extraction and attacks {run['collect_seconds'] / 60:.1f} min"
            )
            + f"; the beyond-the-paper study "
            f"{run['study_seconds'] / 60:.1f} min). Density scorers on features and inputs (VAE, MAF, PixelCNN): "
            + (
                f"run (VAE and MAF 20 epochs; PixelCNN 1 epoch on {run['pixelcnn_train']} training images, "
                f"{run['pixelcnn_seeds']} seed(s))."
                if run.get("density")
                else "not run for this model (add `--density`)."
            ),
            "",
            run["result"].to_markdown().replace("### ", "#### "),
            "",
            "#### Purification (GMM-100, 100 steps; chosen on validation)",
            "",
            run["grid"],
            "",
            f"Figures and CSV/JSON: [results/{run['name']}/report.md](results/{run['name']}/report.md).",
            "",
        ]
        lines += _comparison(run["result"])
        lines += _claims(run)
    lines += study_section(runs)
    missing = [arch for arch in ("densenet", "te-") if not any(arch in run["name"] for run in runs)]
    if missing:
        lines += [
            "## Not run yet",
            "",
            "Models defined in `benchmarks/cifar10/` without saved weights are skipped by this page: "
            + ", ".join(missing)
            + ".",
            "",
        ]
    lines += [
        "## GPU configurations",
        "",
        "`benchmarks/cifar10/train.py --config gpu` builds the paper-size networks (DenseNet-BC-100, WRN-28-10, "
        "temporal ensembling on WRN-28-10). They have not been trained: the GPU machine lent to this project "
        "reaches no data, and the CIFAR-10 training file (142 MB) is larger than what may be carried to it.",
        "",
    ]
    path.write_text("\n".join(lines))


def _short(source: str) -> str:
    return source.replace("test mistakes", "mistakes").replace("ood: ", "").replace("gaussian-noise", "noise")


def qualification(study: EvalResult) -> dict[str, dict]:
    """Per option of :data:`STUDY`: mean AUROC over sources, the largest gap to the best scorer of each source,
    and whether it meets the rule (mean above every baseline's and within 1 point of the best on every source)."""
    sources = list(dict.fromkeys(r.source for r in study.rows))
    by = {(r.scorer, r.source): r.auroc for r in study.rows}
    scorers = list(dict.fromkeys(r.scorer for r in study.rows))
    best = {src: max(by[(name, src)] for name in scorers) for src in sources}
    mean = {name: sum(by[(name, src)] for src in sources) / len(sources) for name in scorers}
    best_baseline = max(mean[b] for b in BASELINES)
    out = {}
    for label, *_ in STUDY:
        gaps = {src: best[src] - by[(label, src)] for src in sources}
        worst = max(gaps, key=gaps.get)
        out[label] = {
            "mean": mean[label],
            "worst_gap": gaps[worst],
            "worst_source": worst,
            "beats_baselines": mean[label] > best_baseline,
            "within_1pt": gaps[worst] <= 0.01,
        }
        out[label]["qualifies"] = out[label]["beats_baselines"] and out[label]["within_1pt"]
    out["_baselines"] = {name: mean[name] for name in BASELINES}
    return out


def choose_default(runs: list[dict]) -> tuple[str, bool, dict[str, list]]:
    """The rule of issue 9: an option qualifying on at least two reference models (the best average mean among
    them); if none does, the best-on-average option. Returns ``(label, qualified, per-option facts)``."""
    facts: dict[str, list] = {label: [] for label, *_ in STUDY}
    for run in runs:
        q = qualification(run["study"])
        for label in facts:
            facts[label].append(q[label])
    average = {label: sum(f["mean"] for f in rows) / len(rows) for label, rows in facts.items()}
    qualified = [label for label, rows in facts.items() if sum(f["qualifies"] for f in rows) >= min(2, len(runs))]
    if qualified:
        return max(qualified, key=average.get), True, facts
    return max(average, key=average.get), False, facts


def study_section(runs: list[dict]) -> list[str]:
    lines = [
        "## Beyond the paper: the default detector",
        "",
        "Every GMM-100 option (feature preprocessing fitted on the training features without labels; features of "
        'three layers as `layer="auto"` picks them — the penultimate one and the pooled ends of the two earlier '
        "resolution stages — concatenated or scored per layer and summed; the fused scorer, whose weight is chosen "
        "on validation mistakes only) against the baselines, AUROC % mean ± std over the seeds. The paper's "
        "method is `GMM-100 (paper)`.",
        "",
        "**Rule** (issue 9): an option becomes the `FailureDetector` default if, on at least two reference models, "
        "its mean AUROC over all failure sources is higher than every baseline's and it is within 1 AUROC point of "
        "the best scorer on every source; among such options the best average wins. If none qualifies, the "
        "best-on-average option is named and the page says so.",
        "",
    ]
    for run in runs:
        study = run["study"]
        sources = list(dict.fromkeys(r.source for r in study.rows))
        by = {(r.scorer, r.source): r for r in study.rows}
        q = qualification(study)
        lines += [
            f"### {run['name']}",
            "",
            "| option | " + " | ".join(_short(s) for s in sources) + " | mean | worst gap to best |",
            "|---|" + "---|" * (len(sources) + 2),
        ]
        best = {src: max(by[(n, src)].auroc for n in dict.fromkeys(r.scorer for r in study.rows)) for src in sources}
        for name in dict.fromkeys(r.scorer for r in study.rows):
            cells = []
            for src in sources:
                r = by[(name, src)]
                cell = f"{100 * r.auroc:.1f} ± {100 * r.auroc_std:.1f}"
                cells.append(f"**{cell}**" if r.auroc == best[src] else cell)
            mean = sum(by[(name, src)].auroc for src in sources) / len(sources)
            gap = max(best[src] - by[(name, src)].auroc for src in sources)
            mark = " ✓" if name in q and q[name]["qualifies"] else ""
            lines.append(f"| {name}{mark} | " + " | ".join(cells) + f" | {100 * mean:.1f} | {100 * gap:.1f} |")
        lines.append("")
    label, qualified, facts = choose_default(runs)
    lines += [
        "### The choice",
        "",
        "| option | qualifies on | average of the mean AUROC | worst gap (model: source) |",
        "|---|---|---|---|",
    ]
    for name, rows in facts.items():
        worst = max(range(len(rows)), key=lambda i: rows[i]["worst_gap"])
        lines.append(
            f"| {name} | {sum(f['qualifies'] for f in rows)} of {len(rows)} | "
            f"{100 * sum(f['mean'] for f in rows) / len(rows):.1f} | {100 * rows[worst]['worst_gap']:.1f} "
            f"({runs[worst]['name']}: {_short(rows[worst]['worst_source'])}) |"
        )
    baselines = [qualification(run["study"])["_baselines"] for run in runs]
    best_baseline = max(BASELINES, key=lambda b: sum(x[b] for x in baselines))
    lines += [
        "",
        f"Best baseline on average: {best_baseline} "
        f"({100 * sum(x[best_baseline] for x in baselines) / len(baselines):.1f}).",
        "",
    ]
    if qualified:
        lines.append(f"**Chosen default: {label}** — it meets the rule on at least two reference models.")
    else:
        lines.append(
            f"**No option meets the rule.** The best-on-average option is **{label}**; the table above gives, for "
            "every option, the source where it falls furthest behind the best scorer."
        )
    lines += ["", _library_default(label), ""]
    return lines


def _library_default(label: str) -> str:
    """Whether ``FailureDetector()``'s defaults are the chosen option (checked against the code, not typed)."""
    config = DetectorConfig()
    _, scorer, options, blocks = next(entry for entry in STUDY if entry[0] == label)
    wanted = {
        "scorer": scorer,
        "layer": "auto" if blocks == "all" else None,
        "preprocess": options.get("preprocess"),
        "per_layer": bool(options.get("per_layer", False)),
    }
    actual = {key: getattr(config, key) for key in wanted}
    if actual == wanted and scorer == "gmm":
        return (
            f"`FailureDetector()` uses it: its GMM defaults are `layer={config.layer!r}`, "
            f"`preprocess={config.preprocess!r}`, `per_layer={config.per_layer}` (checked when this page was "
            "generated). The paper's method stays available as `FailureDetector.paper()` and is the "
            "`GMM-100 (paper)` row."
        )
    return f"Note: `FailureDetector()` defaults ({actual}) differ from this choice ({wanted})."


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


def _verdict(holds: bool, partly: bool = False) -> str:
    return "holds" if holds else ("holds in part" if partly else "does not hold")


def claims(run: dict) -> list[tuple[str, str, str]]:
    """The paper's qualitative claims checked on one model: ``(claim, evidence, verdict)``."""
    result = run["result"]
    auroc = {(r.source, r.scorer): 100 * r.auroc for r in result.rows}
    sources = list(dict.fromkeys(r.source for r in result.rows))
    attacks = [s for s in sources if s.startswith(("fgsm", "bim"))]
    mw = result.mann_whitney.get("GMM-100", {})
    p = mw.get("pvalue", float("nan"))
    softmax, gmm100 = auroc[("test mistakes", "max_softmax")], auroc[("test mistakes", "GMM-100")]
    beats_logits = [s for s in attacks if auroc[(s, "GMM-1000")] > auroc[(s, "max_softmax")]]
    near_maha = [s for s in attacks if abs(auroc[(s, "GMM-1000")] - auroc[(s, "mahalanobis")]) <= 5]
    out = [
        (
            "the feature likelihood separates correct from wrong test samples (Mann-Whitney)",
            f"GMM-100 p = {p:.1e}, AUROC {100 * mw.get('auroc', float('nan')):.1f}",
            _verdict(p < 0.05),
        ),
        (
            "logit scores detect test mistakes at least as well as the GMM",
            f"max-softmax {softmax:.1f} vs GMM-100 {gmm100:.1f}",
            _verdict(softmax >= gmm100),
        ),
        (
            "GMM-1000 detects adversarial samples better than logit scores",
            f"better than max-softmax on {len(beats_logits)} of {len(attacks)} settings "
            f"({', '.join(beats_logits) or 'none'})",
            _verdict(len(beats_logits) == len(attacks), bool(beats_logits)),
        ),
        (
            "GMM-1000 is comparable to Mahalanobis on adversarial samples",
            f"within 5 points on {len(near_maha)} of {len(attacks)} settings",
            _verdict(len(near_maha) == len(attacks), bool(near_maha)),
        ),
    ]
    if ("test mistakes", "vae") in auroc and ("test mistakes", "maf") in auroc:
        flexible = max(auroc[("test mistakes", "vae")], auroc[("test mistakes", "maf")])
        out.append(
            (
                "a GMM on the features detects test mistakes better than a VAE or MAF on the features",
                f"GMM-100 {gmm100:.1f}, VAE {auroc[('test mistakes', 'vae')]:.1f}, "
                f"MAF {auroc[('test mistakes', 'maf')]:.1f}",
                _verdict(gmm100 > flexible),
            )
        )
    if ("ood: fashion-mnist", "pixelcnn") in auroc:
        fashion = auroc[("ood: fashion-mnist", "pixelcnn")]
        out.append(
            (
                "a PixelCNN on the images fails on Fashion-MNIST (paper: 0.6) and mistakes",
                f"Fashion-MNIST {fashion:.1f}, MNIST {auroc.get(('ood: mnist', 'pixelcnn'), float('nan')):.1f}, "
                f"mistakes {auroc[('test mistakes', 'pixelcnn')]:.1f}",
                _verdict(fashion < 50 and auroc[("test mistakes", "pixelcnn")] < gmm100),
            )
        )
    noise = "ood: gaussian-noise"
    if (noise, "GMM-1000") in auroc:
        gmm, calibrated = auroc[(noise, "GMM-1000")], auroc[(noise, "temperature")]
        out.append(
            (
                "the feature likelihood detects Gaussian noise (paper: 100) where calibrated scores fail (77.9)",
                f"GMM-1000 {gmm:.1f}, temperature {calibrated:.1f}",
                _verdict(gmm >= 99 and calibrated < gmm),
            )
        )
    return out


def _claims(run: dict) -> list[str]:
    lines = ["#### The paper's claims, checked on this model", ""]
    lines += [f"- *{claim}*: {evidence} → {verdict}." for claim, evidence, verdict in claims(run)]
    return [*lines, ""]


def agreement_section(runs: list[dict]) -> list[str]:
    """One table: every checked claim of the paper × every model."""
    checked = {run["name"]: {claim: verdict for claim, _, verdict in claims(run)} for run in runs}
    names = list(checked)
    all_claims = list(dict.fromkeys(c for by in checked.values() for c in by))
    lines = [
        "## Where we agree with the paper and where we do not",
        "",
        "Each claim is checked per model from the tables below (the evidence is under each model). The paper's "
        "CIFAR-10 figures are for a DenseNet-100 trained on a GPU; ours are the smaller CPU configurations. "
        "— = the scorers involved were not run for that model (`--density`).",
        "",
        "| claim | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {c} | " + " | ".join(checked[n].get(c, "—") for n in names) + " |" for c in all_claims]
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="results")
    parser.add_argument("--weights", default=str(HERE / "cifar10" / "weights"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--attack-subset", type=int, default=2000)
    parser.add_argument("--density", action="store_true", help="also VAE, MAF and PixelCNN (slow on a CPU)")
    parser.add_argument("--pixelcnn-train", type=int, default=10000, help="PixelCNN training images (subset)")
    parser.add_argument("--pixelcnn-seeds", type=int, default=1, help="PixelCNN fits (1 epoch each)")
    parser.add_argument("--refresh", action="store_true", help="ignore cached features")
    parser.add_argument("--page", default=str(HERE.parent / "docs" / "results.md"))
    parser.add_argument("--limit", type=int, default=None, help="smoke run on N training images (not cached)")
    parser.add_argument("--models", nargs="*", help="recompute only these models (others: from OUT/<model>/run.json)")
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
    if args.limit:  # a smoke run: seeded random subsets of every split and OOD set
        g = torch.Generator().manual_seed(0)

        def cut(x: torch.Tensor, m: int) -> torch.Tensor:
            return x[torch.randperm(len(x), generator=g)[:m]]

        small = max(args.limit // 5, 50)
        keep = [
            torch.randperm(len(y), generator=g)[:m]
            for (_, y), m in zip(splits, (args.limit, small, small), strict=True)
        ]
        splits = tuple((x[i], y[i]) for (x, y), i in zip(splits, keep, strict=True))
        ood = {name: cut(x, small) for name, x in ood.items()}
    weights = sorted(Path(args.weights).glob("*.safetensors"))
    if not weights:
        raise SystemExit(f"no weights in {args.weights}; train with benchmarks/cifar10/train.py first")
    runs = []
    for w in weights:
        if args.models is not None and w.stem not in args.models:
            previous = load_run(Path(args.out) / w.stem)
            if previous is not None:
                runs.append(previous)
            continue
        runs.append(run_model(w, args, splits, ood))
    write_results_page(runs, Path(args.page), args, time.perf_counter() - t0)
    print(f"wrote {args.page} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
