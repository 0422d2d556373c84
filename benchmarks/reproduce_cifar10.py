"""Re-run the CIFAR-10 experiments from saved weights and write ``docs/results.md`` from the outputs.

    python benchmarks/reproduce_cifar10.py --data-dir /work/shared/data --out results/

For every model in ``benchmarks/reference_models/weights/*.safetensors`` (``--weights``; each card's ``name`` must
be its file's stem): features (``layer="auto"``: the penultimate
layer and two earlier stage ends) of the 45,000/5,000/10,000 train/validation/test splits, FGSM and BIM at
ε ∈ {1, 2, 4, 8}/255 and the corruptions of :mod:`featurefail.corruptions` (severities 1–5) on a seeded subset of
the test images, and the OOD sets are extracted once and cached in ``OUT/cache/``; then every row ("default",
"paper", scorer names) is fitted on the training features (and the validation split) for each seed and scored on
every failure source and on the mixed streams. ``--collect-only`` stops after the caches. Cached features and a
saved ``OUT/<model>/run.json`` are used only when they were made from the same weights file (its SHA-256, kept in
``OUT/cache/<model>-weights.json`` and in ``run.json``); caches and runs made before these records are rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from scipy.stats import binomtest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cifar10"))
sys.path.insert(0, str(HERE / "reference_models"))
from architectures import load_reference_model  # noqa: E402
from cpu_speed import cpu_description  # noqa: E402
from data import cifar10_splits  # noqa: E402
from models import make_model  # noqa: E402

from featurefail.corruptions import CORRUPTIONS, SEVERITIES, corrupt  # noqa: E402
from featurefail.detector import DEFAULT_DETECTOR  # noqa: E402
from featurefail.evaluate import (  # noqa: E402
    DESIGN_SOURCES,
    HELD_OUT_SOURCES,
    EvalData,
    EvalResult,
    Source,
    collect,
    evaluate_features,
    fit_detector,
    protocol_group,
)
from featurefail.features import Features  # noqa: E402
from featurefail.ood import NpzImages, gaussian_noise  # noqa: E402
from featurefail.plots import risk_coverage_curves  # noqa: E402
from featurefail.purify import purify  # noqa: E402
from featurefail.scorers import available_scorers  # noqa: E402
from featurefail.scorers.conformal_fusion import COMBINE_RULES  # noqa: E402

ATTACKS = tuple(f"{kind}:{eps}/255" for kind in ("fgsm", "bim") for eps in (1, 2, 4, 8))
FUSION = "conformal_fusion"
#: rows fitted once per seed (random initialisation or splits)
SEEDED_ROWS = ("default", "paper", FUSION)
#: rows fitted once (seed 0): deterministic fits (KNN with its default bank); those registered when the run starts
FIXED_ROWS = tuple(
    name
    for name in (
        "max_softmax",
        "max_logit",
        "energy",
        "temperature",
        "mahalanobis",
        "relative_mahalanobis",
        "knn",
        "vim",
        "react",
        "ash",
    )
    if name in available_scorers()
)
#: the other combination rules, scored from the fitted fusion (the rule plays no part in fitting)
RULE_ROWS = {f"{FUSION} ({rule})": rule for rule in COMBINE_RULES if rule != "fisher"}
FIGURE_ROWS = ("default", "paper", "max_softmax", "energy", "mahalanobis", "knn", FUSION)


def load_reference(path: Path) -> tuple[torch.nn.Module, dict]:
    """A model of ``benchmarks/reference_models/weights`` (cards without ``config``) or of the older
    ``benchmarks/cifar10/weights`` (with it)."""
    info = json.loads(path.with_suffix(".json").read_text())
    if "config" not in info:
        return load_reference_model(path), info
    model = make_model(info["arch"], info["config"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), info


def shift_subset(n_test: int, size: int) -> torch.Tensor:
    """The seeded test subset attacked or corrupted (the same images for every model; a smaller subset is a
    prefix of a larger one)."""
    g = torch.Generator().manual_seed(0)
    return torch.randperm(n_test, generator=g)[:size]


def train_subset(n_train: int, size: int | None) -> torch.Tensor:
    """The seeded training rows scorers are fitted on (all when ``size`` is None), sorted."""
    if size is None or size >= n_train:
        return torch.arange(n_train)
    g = torch.Generator().manual_seed(1)
    return torch.randperm(n_train, generator=g)[:size].sort().values


def _cache(args: argparse.Namespace, name: str, part: str) -> Path:
    return Path(args.out) / "cache" / f"{name}-{part}.safetensors"


def _clean_cache(args: argparse.Namespace, name: str) -> tuple[Path, bool]:
    """``(path, holds all training rows)``: a cache of every training row serves any ``--train-rows``."""
    full = _cache(args, name, "clean")
    if full.exists() or args.train_rows is None:
        return full, True
    return _cache(args, name, f"clean-train{args.train_rows}"), False


CACHE_PARTS = ("clean", "attacks", "corruptions")


def _cached_parts(args: argparse.Namespace, name: str) -> list[Path]:
    """This model's cache files (``<name>-clean[-trainN]``, ``-attacksN``, ``-corruptionsN`` and its build times;
    never those of a model whose name merely starts with ``name``)."""
    folder = Path(args.out) / "cache"
    part = re.compile(rf"{re.escape(name)}-(clean(-train\d+)?|attacks\d+|corruptions\d+)\.safetensors")
    parts = sorted(p for p in folder.glob("*.safetensors") if part.fullmatch(p.name))
    return parts + [p for p in [_timing_path(args, name)] if p.exists()]


def weights_sha256(weights: Path) -> str:
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def match_cache_to_weights(args: argparse.Namespace, name: str, weights: Path, say) -> str:
    """Drop this model's cached features when they were not built from these weights (another SHA-256, or none
    recorded), then record the weights' SHA-256 and return it: a retrained model is never scored on its
    predecessor's features."""
    record = Path(args.out) / "cache" / f"{name}-weights.json"
    digest = weights_sha256(weights)
    built_from = json.loads(record.read_text()).get("sha256") if record.exists() else None
    if built_from != digest:
        stale = _cached_parts(args, name)
        if stale:
            why = "other weights" if built_from else "weights it did not record"
            say(f"cache built from {why}: removing {len(stale)} files, rebuilding from {weights.name}")
        for path in stale:
            path.unlink()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"weights": weights.name, "sha256": digest}, indent=2))
    return digest


def _timing_path(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) / "cache" / f"{name}-build-seconds.json"


def _build_times(args: argparse.Namespace, name: str) -> dict[str, float]:
    path = _timing_path(args, name)
    return json.loads(path.read_text()) if path.exists() else {}


def record_build(args: argparse.Namespace, name: str, part: str, seconds: float) -> None:
    """Keep how long building one cache part took, next to the cache (read back by :func:`cache_build_seconds`)."""
    _timing_path(args, name).write_text(json.dumps({**_build_times(args, name), part: seconds}, indent=2))


def cache_build_seconds(args: argparse.Namespace, name: str) -> float | None:
    """Seconds it took to build this model's whole cache, or None if a part was built without a record."""
    times = _build_times(args, name)
    return sum(times[p] for p in CACHE_PARTS) if all(p in times for p in CACHE_PARTS) else None


def collect_cached(model: torch.nn.Module, name: str, args: argparse.Namespace, splits, ood, say) -> EvalData:
    """Clean splits, test mistakes and OOD sets (``layer="auto"``), then the attacks on the first
    ``--attack-subset`` images of :func:`shift_subset`; each stage cached on its own."""
    (x_tr, y_tr), val, (x_te, y_te) = splits
    rows = train_subset(len(y_tr), args.train_rows)
    clean_path, full = _clean_cache(args, name)
    if clean_path.exists() and not args.refresh:
        say(f"reusing cached features {clean_path}")
        data = EvalData.load(clean_path)
        if full:
            data.train = data.train.subset(rows)
    else:
        t0 = time.perf_counter()
        train = (x_tr, y_tr) if full else (x_tr[rows], y_tr[rows])
        data = collect(model, train, val, (x_te, y_te), ood=ood, layer="auto", progress=say)
        clean_path.parent.mkdir(parents=True, exist_ok=True)
        data.save(clean_path)
        record_build(args, name, "clean", time.perf_counter() - t0)
        if full:
            data.train = data.train.subset(rows)
    attack_path = _cache(args, name, f"attacks{args.attack_subset}")
    if attack_path.exists() and not args.refresh:
        say(f"reusing cached attacks {attack_path}")
        adv = EvalData.load(attack_path)
    else:
        t0 = time.perf_counter()
        subset = shift_subset(len(y_te), args.attack_subset)
        tiny = (x_tr[:10], y_tr[:10]), (val[0][:10], val[1][:10])
        adv = collect(model, *tiny, (x_te[subset], y_te[subset]), attacks=ATTACKS, layer="auto", progress=say)
        adv.sources = [src for src in adv.sources if src.kind == "adversarial"]
        for src in adv.sources:
            mask = torch.zeros(len(y_te), dtype=torch.bool)
            mask[subset[src.normal_mask]] = True
            src.normal_mask = mask
        adv.save(attack_path)
        record_build(args, name, "attacks", time.perf_counter() - t0)
    data.sources += adv.sources
    data.auto = True
    return data


CORRUPTED_IMAGES: dict[tuple[str, int, int], torch.Tensor] = {}


def corruptions_cached(
    model: torch.nn.Module, name: str, args: argparse.Namespace, splits, say
) -> dict[str, torch.Tensor]:
    """Features, logits and labels of every corruption × severity of the first ``--corruption-subset`` images of
    :func:`shift_subset`, as ``{"<corruption>.<severity>.feats"|".logits"|".labels": tensor}``; cached."""
    cache = _cache(args, name, f"corruptions{args.corruption_subset}")
    if cache.exists() and not args.refresh:
        say(f"reusing cached corruptions {cache}")
        return load_file(str(cache))
    t0 = time.perf_counter()
    (x_tr, y_tr), val, (x_te, y_te) = splits
    subset = shift_subset(len(y_te), args.corruption_subset)
    tiny = (x_tr[:10], y_tr[:10]), (val[0][:10], val[1][:10])
    out: dict[str, torch.Tensor] = {}
    for corruption in CORRUPTIONS:
        for severity in SEVERITIES:
            say(f"corruption {corruption} severity {severity}")
            key = (corruption, severity, args.corruption_subset)
            if key not in CORRUPTED_IMAGES:  # the images do not depend on the model: made once per run
                CORRUPTED_IMAGES[key] = corrupt(x_te[subset], corruption, severity, seed=severity)
            x = CORRUPTED_IMAGES[key]
            f = collect(model, *tiny, (x, y_te[subset]), layer="auto").test
            out[f"{corruption}.{severity}.feats"] = f.feats.contiguous()
            out[f"{corruption}.{severity}.logits"] = f.logits.contiguous()
            out[f"{corruption}.{severity}.labels"] = f.labels.contiguous()
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(cache))
    record_build(args, name, "corruptions", time.perf_counter() - t0)
    return out


def corruption_sources(corrupted: dict[str, torch.Tensor], blocks) -> list[Source]:
    """One source per corruption family (all severities pooled): normals = the corrupted inputs the model still
    gets right, failures = those it gets wrong."""
    out = []
    for name in CORRUPTIONS:
        parts = [
            torch.cat([corrupted[f"{name}.{sev}.{key}"] for sev in SEVERITIES]) for key in ("feats", "logits", "labels")
        ]
        f = Features(*parts, blocks=blocks)
        correct = f.correct
        out.append(
            Source(
                f"corruption: {name}",
                "corruption",
                f.subset(~correct),
                torch.zeros(0, dtype=torch.bool),
                normals=f.subset(correct),
            )
        )
    return out


def _merge(parts: list[EvalResult]) -> EvalResult:
    merged = EvalResult(accuracy=parts[0].accuracy)
    for part in parts:
        merged.rows += part.rows
        merged.holistic += part.holistic
        merged.mann_whitney.update(part.mann_whitney)
        for key, attr in (("scores", merged.scores), ("stream_scores", merged.stream_scores)):
            for source, by_row in getattr(part, key).items():
                attr.setdefault(source, {}).update(by_row)
        merged.stream_sizes.update(part.stream_sizes)
    return merged


def _rule_row(rule: str):
    def make(detector):
        scorer = detector.scorer_.with_combine(rule)
        return scorer.score

    return make


def score_model(data: EvalData, args: argparse.Namespace, say) -> tuple[EvalResult, dict[str, str]]:
    """Every row on every source and on the design and held-out streams; and the rows whose scorer refused
    this model's features (``{row: the scorer's error}``, e.g. ASH on features with negative values)."""
    names = [src.name for src in data.sources]
    streams = {
        group: [
            n
            for n, src in zip(names, data.sources, strict=True)
            if src.kind != "adversarial" and protocol_group(n) == group
        ]
        for group in ("design", "held-out")
    }
    derived = {label: (FUSION, _rule_row(rule)) for label, rule in RULE_ROWS.items()}
    seeded = evaluate_features(
        data,
        scorers=list(SEEDED_ROWS),
        scorer_options={FUSION: {"layer": "auto"}},
        seeds=list(range(args.seeds)),
        streams=streams,
        derived=derived,
        progress=say,
    )
    parts, refused = [seeded], {}
    for row in FIXED_ROWS:
        try:
            parts.append(evaluate_features(data, scorers=[row], seeds=[0], streams=streams, progress=say))
        except ValueError as error:  # the scorer's documented refusal, reported on the page
            say(f"{row} refused: {error}")
            refused[row] = str(error)
    return _merge(parts), refused


PURIFY_NU = (0.0, 0.01)
PURIFY_ROWS = 5000


def purification(data: EvalData, say) -> list[dict]:
    """The paper's purification (its detector, 100 steps, on the penultimate features of a seeded subset of
    :data:`PURIFY_ROWS` clean test images) for each ν of :data:`PURIFY_NU`: accuracy before and after, the
    share of predictions it changed, the images it fixed (wrong → right) and broke (right → wrong), and the
    two-sided sign test of fixed against broken (:func:`sign_test`)."""
    penultimate = data.select_blocks(0)
    if penultimate.head is None:
        return []
    detector = fit_detector("paper", penultimate.fit_data(), seed=0)
    rows = torch.randperm(len(penultimate.test), generator=torch.Generator().manual_seed(0))[:PURIFY_ROWS]
    test = penultimate.test.subset(rows)
    labels = test.labels
    out = []
    for nu in PURIFY_NU:
        say(f"purification nu={nu}")
        result = purify(detector, test, nu=nu, steps=100)
        right_before, right_after = result.original_predictions == labels, result.predictions == labels
        fixed, broken = int((right_after & ~right_before).sum()), int((right_before & ~right_after).sum())
        out.append(
            {
                "nu": nu,
                "images": len(labels),
                "accuracy_before": float(right_before.float().mean()),
                "accuracy_after": float(right_after.float().mean()),
                "changed": float((result.predictions != result.original_predictions).float().mean()),
                "fixed": fixed,
                "broken": broken,
                "sign_test_p": sign_test(fixed, broken),
            }
        )
    return out


def sign_test(fixed: int, broken: int) -> float:
    """Two-sided exact sign test (McNemar's exact test) of ``fixed`` wrong → right against ``broken`` right → wrong
    changes: the probability, were each change equally likely either way, of a split at least as uneven; 1.0
    when nothing changed."""
    if fixed + broken == 0:
        return 1.0
    return float(binomtest(fixed, fixed + broken, 0.5).pvalue)


def run_model(path: Path, args: argparse.Namespace, splits, ood) -> dict:
    model, info = load_reference(path)
    name = info["name"]
    say = lambda m: print(f"[{name}] {time.strftime('%H:%M:%S')} {m}", flush=True)  # noqa: E731
    t0 = time.perf_counter()
    digest = match_cache_to_weights(args, name, path, say)
    data = collect_cached(model, name, args, splits, ood, say)
    data.sources += corruption_sources(corruptions_cached(model, name, args, splits, say), data.train.blocks)
    t_collect = time.perf_counter() - t0
    result, refused = score_model(data, args, say)
    purified = purification(data, say)
    out = Path(args.page).parent / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    for stream, by_row in result.stream_scores.items():
        risk_coverage_curves(
            {row: by_row[row] for row in FIGURE_ROWS if row in by_row},
            out / f"risk_coverage_{stream}.png",
            title=f"{name}: {stream} stream (seed 0)",
        )
    summary = Path(args.out) / name
    summary.mkdir(parents=True, exist_ok=True)
    result.to_json(summary / "result.json")
    run = {
        "name": name,
        "weights_sha256": digest,
        "cpu": cpu_description(),
        "info": info,
        "layers": data.layers,
        "seconds": time.perf_counter() - t0,
        "collect_seconds": t_collect,
        "cache_build_seconds": cache_build_seconds(args, name),
        "seeds": args.seeds,
        "train_rows": len(data.train),
        "stream_sizes": result.stream_sizes,
        "streams": {stream: sorted(by_row) for stream, by_row in result.stream_scores.items()},
        "purification": purified,
        "refused": refused,
    }
    (summary / "run.json").write_text(json.dumps(run, indent=2))
    return {**run, "result": result}


def load_run(summary: Path, weights: Path | None = None) -> dict | None:
    """The saved run of one model, or None when there is none or (``weights`` given) it was not made from these
    weights (another SHA-256, or none recorded): a retrained model's old results are never rendered as its own."""
    if not (summary / "run.json").exists():
        return None
    run = json.loads((summary / "run.json").read_text())
    if weights is not None and run.get("weights_sha256") != weights_sha256(weights):
        print(f"[{summary.name}] {summary / 'run.json'} was not made from {weights}: not rendered", flush=True)
        return None
    return {**run, "result": EvalResult.from_json(summary / "result.json")}


def _short(source: str) -> str:
    return source.replace("corruption: ", "").replace("ood: ", "").replace(" ε=", " ")


def _rows(result: EvalResult) -> list[str]:
    return list(dict.fromkeys(r.scorer for r in result.rows))


def group_facts(result: EvalResult, group: str) -> dict[str, dict]:
    """Per row: mean AUROC over the group's sources, worst gap to the best row on any of them (and where)."""
    by = {(r.scorer, r.source): r for r in result.rows}
    sources = [s for s in dict.fromkeys(r.source for r in result.rows) if protocol_group(s) == group]
    rows = _rows(result)
    best = {s: max(by[(n, s)].auroc for n in rows) for s in sources}
    facts = {}
    for n in rows:
        gaps = {s: best[s] - by[(n, s)].auroc for s in sources}
        worst = max(gaps, key=gaps.get)
        facts[n] = {
            "mean": sum(by[(n, s)].auroc for s in sources) / len(sources),
            "gap": gaps[worst],
            "gap_source": worst,
        }
    return facts


def group_table(result: EvalResult, group: str) -> list[str]:
    by = {(r.scorer, r.source): r for r in result.rows}
    sources = [s for s in dict.fromkeys(r.source for r in result.rows) if protocol_group(s) == group]
    rows = _rows(result)
    facts = group_facts(result, group)
    best = {s: max(by[(n, s)].auroc for n in rows) for s in sources}
    best_mean = max(f["mean"] for f in facts.values())
    lines = [
        "| row | " + " | ".join(_short(s) for s in sources) + " | mean | worst gap (source) |",
        "|---|" + "---|" * (len(sources) + 2),
    ]
    for n in rows:
        cells = []
        for s in sources:
            r = by[(n, s)]
            cell = f"{100 * r.auroc:.1f}" + (f" ± {100 * r.auroc_std:.1f}" if r.seeds > 1 else "")
            cells.append(f"**{cell}**" if r.auroc == best[s] else cell)
        f = facts[n]
        mean = f"{100 * f['mean']:.1f}"
        lines.append(
            f"| {n} | " + " | ".join(cells) + f" | {f'**{mean}**' if f['mean'] == best_mean else mean} | "
            f"{100 * f['gap']:.1f} ({_short(f['gap_source'])}) |"
        )
    sizes = "; ".join(f"{_short(s)} {by[(rows[0], s)].n_normal}:{by[(rows[0], s)].n_failure}" for s in sources)
    return [*lines, "", f"normal:failure per source — {sizes}.", ""]


def _pm(value: float, std: float, seeds: int) -> str:
    return f"{value:.1f}" + (f" ± {std:.1f}" if seeds > 1 else "")


def holistic_table(result: EvalResult) -> list[str]:
    streams = list(dict.fromkeys(r.stream for r in result.holistic))
    by = {(r.scorer, r.stream): r for r in result.holistic}
    rows = list(dict.fromkeys(r.scorer for r in result.holistic))
    best = {s: min(by[(n, s)].aurc for n in rows) for s in streams}
    head = " | ".join(f"{s}: AURC ‰ | {s}: E-AURC ‰ | {s}: risk at 80% cov. %" for s in streams)
    lines = [f"| row | {head} |", "|---|" + "---|" * (3 * len(streams))]
    for n in rows:
        cells = []
        for s in streams:
            r = by[(n, s)]
            aurc = _pm(1000 * r.aurc, 1000 * r.aurc_std, r.seeds)
            cells += [
                f"**{aurc}**" if r.aurc == best[s] else aurc,
                _pm(1000 * r.eaurc, 1000 * r.eaurc_std, r.seeds),
                _pm(100 * r.risk, 100 * r.risk_std, r.seeds),
            ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def held_out_aurc(result: EvalResult) -> dict[str, float]:
    """Every row's AURC on the held-out stream."""
    return {r.scorer: r.aurc for r in result.holistic if r.stream == "held-out"}


def verdict(run: dict) -> dict:
    """The fusion against every other method (its other combination rules excluded) on the held-out group."""
    result = run["result"]
    facts = group_facts(result, "held-out")
    others = [n for n in facts if not n.startswith(FUSION)]
    aurc = held_out_aurc(result)
    best_mean = max(others, key=lambda n: facts[n]["mean"])
    best_aurc = min(others, key=aurc.get)
    return {
        "fusion_mean": facts[FUSION]["mean"],
        "best_other_mean": (best_mean, facts[best_mean]["mean"]),
        "fusion_aurc": aurc[FUSION],
        "best_other_aurc": (best_aurc, aurc[best_aurc]),
        "fusion_gap": (facts[FUSION]["gap"], facts[FUSION]["gap_source"]),
        "wins_mean": facts[FUSION]["mean"] > facts[best_mean]["mean"],
        "wins_aurc": aurc[FUSION] < aurc[best_aurc],
    }


def machines_of(runs: list[dict]) -> str:
    """The CPUs the runs recorded (``cpu`` in ``run.json``: model and bf16 instructions, which set the speed)."""
    seen = []
    for run in runs:
        cpu = run.get("cpu")
        text = (
            f"{cpu['model']} with {', '.join(cpu['bf16_instructions']) or 'no bf16 instructions'}"
            if cpu
            else "CPU not recorded"
        )
        if text not in seen:
            seen.append(text)
    return "runs on " + " / ".join(seen)


def regeneration_time(runs: list[dict]) -> str:
    """The header's sentence on a full regeneration: building the cache (timed when each part was built, in
    ``OUT/cache/<model>-build-seconds.json``) plus the scoring of every model."""
    scoring = sum(run["seconds"] - run["collect_seconds"] for run in runs)
    built = [run.get("cache_build_seconds") for run in runs]
    if any(b is None for b in built):
        missing = ", ".join(run["name"] for run, b in zip(runs, built, strict=True) if b is None)
        return (
            f"Scoring took {scoring / 60:.1f} min; the time to build the cache was not recorded for {missing} "
            "(cache built before build times were kept), so a full regeneration's wall time is not stated."
        )
    cache, scoring = round(sum(built) / 60, 1), round(scoring / 60, 1)
    return (
        f"**A full regeneration from an empty cache takes {cache + scoring:.1f} min** on this machine: "
        f"{cache:.1f} min to build the cache (features of all splits, attacks, corruptions; timed when each "
        f"part was built) and {scoring:.1f} min of scoring, while other jobs may have shared the cores (the "
        "inference-cost runs of `overhead_bench.py` below are not included)."
    )


def write_results_page(runs: list[dict], path: Path, args: argparse.Namespace, total: float) -> None:
    seeds = sorted({run["seeds"] for run in runs})
    lines = [
        "# Results on real CIFAR-10: every failure source, judged per source and holistically",
        "",
        f"Generated by `python benchmarks/reproduce_cifar10.py --data-dir {args.data_dir} --out {args.out} "
        f"--seeds {max(seeds)}` "
        "(features, attacks and corruptions cached in `OUT/cache/`; `--models NAME ...` recomputes only those "
        "models, the others come from `OUT/<model>/run.json`; both only when made from the same weights file, by its "
        "SHA-256) — do not edit by hand.",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads (shared with other jobs), "
        f"{machines_of(runs)}, torch "
        f"{torch.__version__}. Wall time per model below (feature extraction, attacks and corruptions, then "
        f"scoring); the model runs behind this page took {sum(run['seconds'] for run in runs) / 60:.1f} min in "
        f"all{f' (this invocation: {total / 60:.1f} min)' if total >= 30 else ''}. {regeneration_time(runs)}",
        "",
        *(
            [
                "Not run yet (no `OUT/<model>/run.json` made from its current weights; CPU budget of this "
                f"session): {', '.join(args.not_run)}.",
                "",
            ]
            if getattr(args, "not_run", None)
            else []
        ),
        "## Set-up",
        "",
        "- **Models**: the reference models in `benchmarks/reference_models/weights/` (trained as in "
        "`benchmarks/README.md`, schedules chosen on the validation split or set by the CPU budget; see each "
        "section); features of "
        '`layer="auto"` (the penultimate layer and two earlier stage ends, as `FailureDetector()` hooks).',
        f"- **Fits**: every row is fitted on a seeded subset of {args.train_rows} of the 45,000 training images "
        "(`--train-rows`, CPU budget) and then sees the 5,000 labelled validation images through "
        "`fit_validation`; nothing else. Rows fitted with randomness (GMMs, the fusion's split) are refitted "
        f"for {', '.join(map(str, seeds))} seed(s)"
        + (
            " (mean ± std)"
            if max(seeds) > 1
            else " only — the CPU budget of this run allowed no more, so no spread is reported"
        )
        + "; deterministic rows are fitted once.",
        f"- **Attacks**: untargeted L∞ FGSM and BIM (10 steps), ε ∈ {{1, 2, 4, 8}}/255, on a seeded subset of "
        f"{args.attack_subset} test images (`--attack-subset`, CPU budget); normal = the correctly classified "
        "clean images among them, failures = their successful adversarial versions.",
        f"- **OOD**: the first {args.ood_size} images of matched Gaussian noise, Fashion-MNIST and MNIST (32×32×3); "
        "normal = all clean test images.",
        f"- **Covariate shift**: the seven corruptions of `featurefail.corruptions` (CIFAR-10-C parameters), "
        f"severities 1–5, on a seeded subset of {args.corruption_subset} test images (`--corruption-subset`); "
        "labels stay valid, so per source normal = corrupted images still classified correctly, failures = "
        "those classified wrongly (all severities pooled).",
        "- **Test mistakes**: normal = correctly classified clean test images, failures = misclassified ones.",
        "",
        "### The held-out protocol (fixed in `featurefail.evaluate` before any run)",
        "",
        f"- **Design group** (may be looked at while developing): {', '.join(sorted(DESIGN_SOURCES))}.",
        f"- **Held-out group** (decides the default): {', '.join(sorted(HELD_OUT_SOURCES))}.",
        "",
        "Which data every choice saw:",
        "",
        "| choice | data it saw |",
        "|---|---|",
        "| GMM, Mahalanobis, KNN, ViM, ReAct, ... fits | training features (the seeded subset) |",
        "| temperature scaling | validation split (labels) |",
        f"| `{FUSION}` components | training features minus a seeded 10% |",
        f"| `{FUSION}` p-value calibration | validation features (no labels), via `fit_validation` |",
        f"| `{FUSION}` combination rule (Fisher) | none: fixed in advance in the code; the other rules are "
        "reported, never chosen |",
        f"| `{FUSION}` components (softmax, per-layer GMM, Mahalanobis) | fixed in advance from issue 15's "
        "list; no ablation was run on any source |",
        "| design/held-out split | none: fixed in code before any run |",
        "| the default (last section) | the held-out tables below, by the rule of issue 15 |",
        "",
        "No fit ever receives a failure sample: `evaluate_features` fits through `fit_detector(FitData)`, a view "
        "that holds only the training and validation features (tests/test_protocol.py).",
        "",
        "### Holistic evaluation (FD-Shifts)",
        "",
        "A *stream* mixes the clean test set with the corrupted and OOD inputs of one group (design: Gaussian "
        "noise, Fashion-MNIST and the noise/blur/contrast corruptions; held-out: MNIST and the "
        "defocus/JPEG/pixelate/brightness corruptions). Following FD-Shifts (Jaeger et al., ICLR 2023), a "
        "**failure** is a wrong prediction on a clean or corrupted input, or any OOD input; a detector accepts "
        "inputs in decreasing score order and is judged by the **area under the risk–coverage curve** (AURC: "
        "selective risk averaged over coverage, lower is better; ‰), its excess over an ideal ranking (E-AURC) "
        "and the selective risk when 80% of the stream is accepted. Attacks are scored per source only.",
        "",
        "Rows: `default` = `FailureDetector()` (per-layer GMM-100 on L2-normalised features of the three layers), "
        "`paper` = `FailureDetector.paper()` (GMM-100 on the raw penultimate features), scorer names = "
        "`FailureDetector(scorer=name)` with its defaults on the penultimate layer, "
        f'`{FUSION}` with `layer="auto"` (Fisher); `{FUSION} (rule)` = the same fitted fusion combined by '
        "another rule. Scorers that need the model's inputs (ODIN) are not run on cached features.",
        "",
    ]
    for run in runs:
        result, info = run["result"], run["info"]
        name = run["name"]
        semi = describe_training(info) + describe_test_time_augmentation(info)
        lines += [
            f"## {name}",
            "",
            f"{info['arch']}{semi}; test accuracy in this run {100 * result.accuracy:.2f}%. "
            f"Wall time {run['seconds'] / 60:.1f} min (of which features/attacks/corruptions "
            f"{run['collect_seconds'] / 60:.1f} min, from the cache where it existed); layers: "
            + ", ".join(f"`{la}`" for la in run["layers"])
            + ".",
            "",
            *(
                [
                    "Rows not fitted on this model (the scorer refused its features): "
                    + "; ".join(f"`{row}`: {reason}" for row, reason in run.get("refused", {}).items()),
                    "",
                ]
                if run.get("refused")
                else []
            ),
            "### Held-out group: AUROC %",
            "",
            *group_table(result, "held-out"),
            "### Design group: AUROC %",
            "",
            *group_table(result, "design"),
            "### Holistic: AURC on the mixed streams",
            "",
            "Stream sizes (inputs, failures): "
            + "; ".join(f"{k}: {v[0]}, {v[1]}" for k, v in run["stream_sizes"].items())
            + ".",
            "",
            *holistic_table(result),
            f"![held-out risk–coverage](results/{name}/risk_coverage_held-out.png) "
            f"![design risk–coverage](results/{name}/risk_coverage_design.png)",
            "",
        ]
    lines += paper_claims_section(runs)
    lines += default_section(runs)
    lines += overhead_section(Path(args.out))
    path.write_text("\n".join(lines) + "\n")


def describe_training(info: dict) -> str:
    """How a reference model was trained, from its JSON card (new cards: ``method``/``labelled_images``; older
    ones: ``semi``/``labels_per_class``)."""
    if info.get("method"):
        text = f", {info['method']} ({info['labelled_images']} labelled images, the rest unlabelled)"
        if baseline := info.get("labelled_only"):
            gain = 100 * (info["test_accuracy"] - baseline["test_accuracy"])
            text += (
                f"; its card{' (bf16 autocast)' if info.get('bf16_autocast') else ''}: "
                f"{100 * info['test_accuracy']:.2f}% test, the same network trained on the "
                f"{info['labelled_images']} labelled images alone {100 * baseline['test_accuracy']:.2f}% "
                f"({gain:+.1f} points)"
            )
        return text
    if info.get("semi"):
        return f", semi-supervised ({info['labels_per_class']} labels per class)"
    return ""


def describe_test_time_augmentation(info: dict) -> str:
    """The card's test accuracies of one view and of the test-time averages, where the card has the
    flip-and-translate figure, with the device that measured each (``tta_study.py`` may have measured it elsewhere
    than the training run); the detector always sees one view."""
    if "test_accuracy_flip_translate_tta" not in info:
        return ""
    trained_on = f"{info['device']}{', bf16 autocast' if info.get('bf16_autocast') else ''}"
    one_view = (
        f"; test accuracy on its card: {100 * info['test_accuracy']:.2f}% with one view (what the detector sees), "
        f"{100 * info['test_accuracy_flip_tta']:.2f}% flip-averaged"
    )
    translated = f"{100 * info['test_accuracy_flip_translate_tta']:.2f}% flip-and-translate-averaged"
    if study := info.get("tta_study"):
        measured_on = f"{study['device']}{', bf16 autocast' if study['bf16_autocast'] else ''}"
        views = study["test_accuracy"]
        return (
            f"{one_view} ({trained_on}), {translated} ({measured_on}: {100 * views['plain']:.2f} / "
            f"{100 * views['flip']:.2f} / {100 * views['flip+translate']:.2f}% one view / flip / flip and translate; "
            "view chosen on validation)"
        )
    return f"{one_view}, {translated} ({trained_on})"


def _cell(mark: str, text: str) -> str:
    return f"{mark} {text}"


def _purification_text(row: dict) -> str:
    delta = 100 * (row["accuracy_after"] - row["accuracy_before"])
    head = f"ν={row['nu']}: {100 * row['accuracy_before']:.2f}→{100 * row['accuracy_after']:.2f}% ({delta:+.2f}"
    if "fixed" not in row:  # runs saved before the fixed/broken counts were recorded
        return f"{head}, {100 * row['changed']:.1f}% changed)"
    return f"{head}; {row['fixed']} fixed, {row['broken']} broken, sign test p = {row['sign_test_p']:.2g})"


def purification_verdict(purified: list[dict]) -> tuple[str, str]:
    """The mark of the purification claim ("raises test accuracy, by at most +0.6%") and, short of ✓, why, from
    the run's own counts: ✓ a gain of at most 0.6 points at some ν whose fixed/broken split the sign test finds
    unlikely by chance (p < 0.05); ~ a gain within chance, or above +0.6; ✗ no gain at any ν."""
    gains = [100 * (r["accuracy_after"] - r["accuracy_before"]) for r in purified]
    best = max(gains)
    top = purified[gains.index(best)]
    if best > 0.6:
        return "~", f"gains more than the paper's +0.6 (+{best:.2f})"
    if "sign_test_p" not in top:  # runs saved before the fixed/broken counts were recorded
        if best > 0:
            return "✓", ""
        return "✗", "no gain at any ν (the run predates the fixed/broken counts: no test of chance)"
    if best > 0:
        if top["sign_test_p"] < 0.05:
            return "✓", ""
        return "~", (
            f"a gain of +{best:.2f} at ν = {top['nu']} ({top['fixed']} fixed, {top['broken']} broken), within "
            f"chance (sign test p = {top['sign_test_p']:.2g})"
        )
    if all(r.get("sign_test_p", 0.0) >= 0.05 for r in purified):
        return "✗", (
            "no gain at any ν, and no loss beyond chance: the images it fixed and broke balance (sign test "
            f"p ≥ {min(r['sign_test_p'] for r in purified):.2g})"
        )
    return "✗", "it breaks significantly more predictions than it fixes (sign test p < 0.05 at some ν)"


def shortfall_reason(
    auroc: dict[str, dict[str, float]], sources: list[str], threshold: float, inclusive: bool = False
) -> str:
    """Which of ``sources`` the ``paper`` row leaves short of ``threshold`` (AUROCs, 0–1; passing means above it,
    or at it too when ``inclusive``), what the ``default`` row (the same kind of GMM, per layer on three
    L2-normalised layers) scores there, the best row on each, and whether ``default`` passes them all."""
    parts = []
    for source in sources:
        others = {row: values[source] for row, values in auroc.items() if row != "paper" and source in values}
        text = f"{_short(source)}: `paper` {100 * auroc['paper'][source]:.1f}"
        if "default" in others:
            text += f", `default` {100 * others['default']:.1f}"
        if others:
            best_row = max(others, key=others.get)
            text += f", best row `{best_row}` {100 * others[best_row]:.1f}"
        parts.append(text)
    default = auroc.get("default", {})
    default_ok = all(
        source in default and (default[source] >= threshold if inclusive else default[source] > threshold)
        for source in sources
    )
    why = (
        "the features: the same likelihood idea on three L2-normalised layers (`default`) clears the bar"
        if default_ok
        else "not only the features: `default` misses it too"
    )
    return f"{'; '.join(parts)} — {why}"


def paper_claims_section(runs: list[dict]) -> list[str]:
    """A verdict per claim of the paper and per model, on the ``paper`` row (its method and features), then a
    line per verdict short of ✓ saying where we differ, read from the same run (other rows, counts)."""
    names = [run["name"] for run in runs]
    claims: dict[str, list[str]] = {}
    reasons: list[str] = []
    for run in runs:
        result, name = run["result"], run["name"]
        auroc: dict[str, dict[str, float]] = {}
        for r in result.rows:
            auroc.setdefault(r.scorer, {})[r.source] = r.auroc
        paper = auroc.get("paper", {})
        mw = result.mann_whitney.get("paper")
        if mw:
            ok = mw["pvalue"] < 0.01 and mw["auroc"] > 0.5
            p_text = "p < 1e-300 (below float64)" if mw["pvalue"] == 0 else f"p = {mw['pvalue']:.1e}"
            text = f"{p_text}, AUROC {100 * mw['auroc']:.1f}"
            claims.setdefault(
                "Misclassified test inputs have lower likelihood (one-sided Mann–Whitney, p < 0.01)", []
            ).append(_cell("✓" if ok else "✗", text))
            if not ok:
                reasons.append(f"- **Mistakes, {name}**: {shortfall_reason(auroc, ['test mistakes'], 0.5)}")
        for kind, label in (("fgsm", "FGSM"), ("bim", "BIM")):
            values = {src: v for src, v in paper.items() if src.startswith(kind)}
            if values:
                mark = "✓" if min(values.values()) > 0.5 else "~" if max(values.values()) > 0.5 else "✗"
                text = f"AUROC {100 * min(values.values()):.1f}–{100 * max(values.values()):.1f} over ε = 1–8/255"
                claims.setdefault(
                    f"{label} adversarial inputs have lower likelihood (AUROC > 50 at every ε)", []
                ).append(_cell(mark, text))
                if mark != "✓":
                    short = [src for src, v in values.items() if v <= 0.5]
                    reasons.append(f"- **{label}, {name}**: {shortfall_reason(auroc, short, 0.5)}")
        ood = {src: v for src, v in paper.items() if src.startswith("ood")}
        if ood:
            mark = "✓" if min(ood.values()) >= 0.9 else "~" if min(ood.values()) > 0.5 else "✗"
            text = ", ".join(f"{src.removeprefix('ood: ')} {100 * v:.1f}" for src, v in ood.items())
            claims.setdefault("OOD inputs have lower likelihood (AUROC ≥ 90 on every OOD set)", []).append(
                _cell(mark, text)
            )
            if mark != "✓":
                short = [src for src, v in ood.items() if v < 0.9]
                reasons.append(f"- **OOD, {name}**: {shortfall_reason(auroc, short, 0.9, inclusive=True)}")
        purified = run.get("purification") or []
        if purified:
            mark, why = purification_verdict(purified)
            cell = _cell(mark, "; ".join(_purification_text(row) for row in purified))
            if why:
                reasons.append(f"- **Purification, {name}**: {why}")
        else:
            cell = "not run for this model"
        claims.setdefault(
            f"Purification raises test accuracy, by at most +0.6% (100 steps, {PURIFY_ROWS} test images)", []
        ).append(cell)
    lines = [
        "## The paper's claims, model by model",
        "",
        "Judged on the `paper` row (`FailureDetector.paper()`: a GMM of 100 components on the raw penultimate "
        "features, as in the paper) with the sources above: ✓ holds, ~ partly, ✗ does not. The paper's models "
        "(DenseNet-100 and WRN-28-10, on CIFAR-100 in its main tables) are larger and trained on the original "
        "images; ours are the reference models of this page, on JPEG re-encoded CIFAR-10, with ε on the [0, 1] "
        "scale. The semi-supervised models test the claim that no labels are needed: their rows use the same "
        "label-free fit. Purification's sign test compares the images it fixed with those it broke (two-sided, "
        "exact); the paper's own purification table (its Table 4, CIFAR-100) has +0.65 on DenseNet-100 at 72.74% "
        "test accuracy, −0.37 to +0.01 on WRN-28 at 80.10% and at most +0.10 on the semi-supervised TE-WRN-28, "
        "with no test of chance.",
        "",
        "| claim | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    lines += [f"| {claim} | " + " | ".join(cells) + " |" for claim, cells in claims.items()]
    if reasons:
        lines += [
            "",
            "**Where we differ, and why** (every verdict short of ✓, read from the same run: the other rows on the "
            "same source, the purification counts; OOD sets: the paper used Gaussian noise, SVHN, Tiny ImageNet "
            "and Fashion-MNIST, we use Gaussian noise, Fashion-MNIST and MNIST):",
            "",
            *reasons,
        ]
    return [*lines, ""]


def overhead_section(out: Path) -> list[str]:
    """The inference cost tables written by ``benchmarks/overhead_bench.py`` into ``OUT/overhead_*.txt``."""
    lines = []
    for detector in ("conformal_fusion", "default"):
        path = out / f"overhead_{detector}.txt"
        if path.exists():
            lines += [
                f"### Inference cost: `{detector}`",
                "",
                "`MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python "
                f"benchmarks/overhead_bench.py --device cpu --detector {detector} > "
                f"{out}/overhead_{detector}.txt` (plain and `as_module()` forwards timed alternately; the "
                "overhead is the median of the paired ratios, its interquartile range in brackets; the load "
                "average of the machine is printed before and after: the benchmark's own two threads raise it "
                "towards 2; a value well above 2 would mean that other work shared the cores and that the "
                "figures are not the detector's cost alone).",
                "",
                *path.read_text().strip().splitlines(),
                "",
            ]
    return lines


def support_table(runs: list[dict]) -> list[str]:
    """What the held-out data support, row by row: held-out mean AUROC and AURC averaged over the models, and on
    how many models the row beats ``default`` on each (the fusion's other combination rules left out)."""
    facts = {run["name"]: group_facts(run["result"], "held-out") for run in runs}
    aurc = {run["name"]: held_out_aurc(run["result"]) for run in runs}
    rows = [n for n in _rows(runs[0]["result"]) if n not in RULE_ROWS and all(n in facts[m] for m in facts)]
    n_models = len(runs)
    table = []
    for n in rows:
        mean = sum(facts[m][n]["mean"] for m in facts) / n_models
        risk = sum(aurc[m][n] for m in aurc) / n_models
        beats_mean = sum(facts[m][n]["mean"] > facts[m]["default"]["mean"] for m in facts)
        beats_aurc = sum(aurc[m][n] < aurc[m]["default"] for m in aurc)
        table.append((n, mean, risk, beats_mean, beats_aurc))
    best_mean = max(t[1] for t in table)
    best_aurc = min(t[2] for t in table)
    lines = [
        f"What the held-out data support, over the {n_models} models (rows fitted on every model; the fusion's "
        "other combination rules left out):",
        "",
        "| row | held-out mean AUROC %, averaged | held-out AURC ‰, averaged | models where it beats `default`: "
        "mean AUROC | models where it beats `default`: AURC |",
        "|---|---|---|---|---|",
    ]
    for n, mean, risk, beats_mean, beats_aurc in sorted(table, key=lambda t: -t[1]):
        mean_cell = f"{100 * mean:.1f}"
        aurc_cell = f"{1000 * risk:.1f}"
        lines.append(
            f"| {n} | {f'**{mean_cell}**' if mean == best_mean else mean_cell} | "
            f"{f'**{aurc_cell}**' if risk == best_aurc else aurc_cell} | "
            + ("–" if n == "default" else f"{beats_mean}/{n_models}")
            + " | "
            + ("–" if n == "default" else f"{beats_aurc}/{n_models}")
            + " |"
        )
    rivals = [t[0] for t in table if t[0] != "default" and t[3] == n_models and t[4] == n_models]
    lines += [
        "",
        (
            f"Beating `default` on both on every model: {', '.join(f'`{r}`' for r in rivals)}."
            if rivals
            else "No row beats `default` on both held-out mean AUROC and held-out AURC on every model; averages "
            "over models are shown for reading, not as a criterion (they weigh a model by the spread of its figures)."
        ),
    ]
    return lines


def default_section(runs: list[dict]) -> list[str]:
    verdicts = {run["name"]: verdict(run) for run in runs}
    lines = [
        "## The default",
        "",
        f"**Rule** (issue 15): `{FUSION}` becomes `FailureDetector()`'s default only if, on every reference model, "
        "on the held-out group, it has the best mean AUROC of all rows and the best (lowest) holistic AURC on the "
        "held-out stream (its other combination rules are not competitors: choosing among them on held-out data "
        "would be selection on the held-out data).",
        "",
        "| model | fusion mean AUROC | best other (mean) | fusion AURC ‰ | best other (AURC ‰) | fusion worst gap |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in verdicts.items():
        lines.append(
            f"| {name} | {100 * v['fusion_mean']:.1f}{' ✓' if v['wins_mean'] else ''} | "
            f"{v['best_other_mean'][0]} ({100 * v['best_other_mean'][1]:.1f}) | "
            f"{1000 * v['fusion_aurc']:.1f}{' ✓' if v['wins_aurc'] else ''} | "
            f"{v['best_other_aurc'][0]} ({1000 * v['best_other_aurc'][1]:.1f}) | "
            f"{100 * v['fusion_gap'][0]:.1f} ({_short(v['fusion_gap'][1])}) |"
        )
    lines += ["", *support_table(runs)]
    qualifies = all(v["wins_mean"] and v["wins_aurc"] for v in verdicts.values())
    current = "the fusion" if DEFAULT_DETECTOR.get("scorer") == FUSION else "the per-layer GMM"
    lines += [
        "",
        (
            f"**The fusion meets the rule on every model run.** `FailureDetector()` is {current} "
            f"(`DEFAULT_DETECTOR = {DEFAULT_DETECTOR}`, read from the code when this page was written)."
            if qualifies
            else f"**The fusion does not meet the rule on every model run**; `FailureDetector()` stays as it is "
            f"(`DEFAULT_DETECTOR = {DEFAULT_DETECTOR}`, read from the code when this page was written). The "
            "tables above show what wins where."
        ),
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="results")
    parser.add_argument("--weights", default=str(HERE / "reference_models" / "weights"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--attack-subset", type=int, default=200, help="test images attacked (seeded subset)")
    parser.add_argument("--corruption-subset", type=int, default=500, help="test images corrupted (seeded subset)")
    parser.add_argument("--ood-size", type=int, default=5000, help="images of every OOD set")
    parser.add_argument("--train-rows", type=int, default=20000, help="training rows scorers are fitted on")
    parser.add_argument("--refresh", action="store_true", help="ignore cached features")
    parser.add_argument("--collect-only", action="store_true", help="only build the caches")
    parser.add_argument("--page", default=str(HERE.parent / "docs" / "results.md"))
    parser.add_argument("--limit", type=int, default=None, help="smoke run on N training images")
    parser.add_argument("--models", nargs="*", help="recompute only these models (others: from OUT/<model>/run.json)")
    args = parser.parse_args()
    splits = cifar10_splits(args.data_dir)
    data_dir = Path(args.data_dir)
    m = args.ood_size
    ood = {
        "gaussian-noise": gaussian_noise(splits[0][0], m, seed=0),
        "fashion-mnist": NpzImages(data_dir / "fashion_mnist_test.npz", size=32, channels=3, limit=m).images,
        "mnist": NpzImages(data_dir / "mnist_test.npz", size=32, channels=3, limit=m).images,
    }
    t0 = time.perf_counter()
    weights = sorted(Path(args.weights).glob("*.safetensors"))
    runs = []
    for w in weights:
        card = json.loads(w.with_suffix(".json").read_text())
        if card.get("name") != w.stem:  # caches and runs are keyed by the card's name, --models by the file's
            parser.error(f"{w.with_suffix('.json')} names the model {card.get('name')!r}; rename it {w.stem!r}")
        if args.models is not None and w.stem not in args.models:
            previous = load_run(Path(args.out) / w.stem, weights=w)
            if previous is not None:  # the run's card, plus fields added to the card since (e.g. its baseline)
                runs.append({**previous, "info": {**card, **previous["info"]}})
            continue
        if args.collect_only:
            model, info = load_reference(w)
            say = lambda m, name=info["name"]: print(f"[{name}] {time.strftime('%H:%M:%S')} {m}", flush=True)  # noqa: E731
            match_cache_to_weights(args, info["name"], w, say)
            collect_cached(model, info["name"], args, splits, ood, say)
            corruptions_cached(model, info["name"], args, splits, say)
            continue
        runs.append(run_model(w, args, splits, ood))
    args.not_run = sorted({w.stem for w in weights} - {run["name"] for run in runs})
    if not args.collect_only and runs:
        write_results_page(runs, Path(args.page), args, time.perf_counter() - t0)
        print(f"wrote {args.page} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
