"""Figures (matplotlib extra): score histograms, ROC/PR curves, reliability diagrams, written as PNG files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["reliability_diagram", "risk_coverage_curves", "roc_pr_curves", "score_histogram", "write_report"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'featurefail[plots]'") from exc
    return plt


def _save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG (creating the folder), close it and return the path."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _finite(values: Any) -> np.ndarray:
    a = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def score_histogram(
    groups: Mapping[str, Any],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "log-likelihood of the features",
    bins: int = 50,
) -> Path:
    """Overlaid density histograms of scores per group (e.g. correct / wrong / OOD), like the paper's Fig. 2 and 4.

    Args:
        groups: name -> ``(n,)`` scores. Non-finite scores are left out (their count goes in the legend).
        path: PNG file to write.

    Returns:
        The path written.
    """
    plt = _pyplot()
    data = {name: _finite(v) for name, v in groups.items()}
    everything = np.concatenate([v for v in data.values() if v.size]) if any(v.size for v in data.values()) else None
    if everything is None:
        raise ValueError("no finite scores to plot")
    lo, hi = np.percentile(everything, [0.5, 99.5])
    edges = np.linspace(lo, hi, bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = plt.get_cmap("tab10" if len(data) <= 10 else "tab20").colors
    for i, (name, values) in enumerate(data.items()):
        dropped = len(np.asarray(groups[name]).ravel()) - values.size if hasattr(groups[name], "__len__") else 0
        label = f"{name} (n={values.size}" + (f", {dropped} non-finite" if dropped else "") + ")"
        ax.hist(
            np.clip(values, lo, hi), bins=edges, density=True, alpha=0.5, label=label, color=colours[i % len(colours)]
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    ax.legend()
    return _save(fig, path, dpi=120)


def roc_pr_curves(scores: Mapping[str, tuple[Any, Any]], path: str | Path, *, title: str = "") -> Path:
    """ROC (normal positive) and PR (failures positive, ranked by −score) curves, one line per scorer.

    Args:
        scores: scorer name -> ``(normal_scores, failure_scores)``.
        path: PNG file to write (two panels side by side, like the paper's Figures 3 and 5).
    """
    from sklearn.metrics import precision_recall_curve, roc_curve

    from .metrics import aupr_out, auroc, labelled

    plt = _pyplot()
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, (normal, failure) in scores.items():
        s, is_normal = labelled(normal, failure)
        fpr, tpr, _ = roc_curve(is_normal, s)
        ax_roc.plot(fpr, tpr, label=f"{name} ({100 * auroc(normal, failure):.1f})")
        precision, recall, _ = precision_recall_curve(1 - is_normal, -s)
        ax_pr.plot(recall, precision, label=f"{name} ({100 * aupr_out(normal, failure):.1f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax_roc.set_xlabel("false positive rate (failures accepted)")
    ax_roc.set_ylabel("true positive rate (normal accepted)")
    ax_roc.set_title("ROC, legend: AUROC %")
    ax_pr.set_xlabel("recall of failures")
    ax_pr.set_ylabel("precision of failures")
    ax_pr.set_title("PR (failures positive), legend: AUPR-out %")
    for ax in (ax_roc, ax_pr):
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=110)


def risk_coverage_curves(
    scores: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    *,
    title: str = "",
    target_risk: float | None = None,
    working_points: Mapping[str, float] | None = None,
) -> Path:
    """Risk-coverage curves (selective risk against coverage, accepting ``score >= t``), one line per scorer.

    Args:
        scores: scorer name -> ``(normal_scores, failure_scores)``; the legend shows AURC (lower is better).
        path: PNG file to write.
        target_risk: draw this selective-risk target as a horizontal line.
        working_points: scorer name -> threshold; marks the (coverage, risk) a chosen threshold reaches.
    """
    from .metrics import aurc, labelled, risk_coverage_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, (normal, failure) in scores.items():
        coverages, risks, _ = risk_coverage_curve(normal, failure)
        (line,) = ax.step(coverages, risks, where="post", label=f"{name} (AURC {1000 * aurc(normal, failure):.1f}‰)")
        if working_points and name in working_points:
            s, is_normal = labelled(normal, failure)
            accepted = s >= working_points[name]
            if accepted.any():
                ax.plot(accepted.mean(), 1 - is_normal[accepted].mean(), "o", color=line.get_color())
    if target_risk is not None:
        ax.axhline(target_risk, color="grey", ls=":", lw=1, label=f"target risk {target_risk:g}")
    ax.set_xlabel("coverage (fraction accepted)")
    ax.set_ylabel("selective risk (failures among accepted)")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi=110)


def reliability_diagram(
    logits: Any, labels: Any, path: str | Path, *, temperature: float | None = None, n_bins: int = 10
) -> Path:
    """Accuracy against confidence in ``n_bins`` bins, before and (if given) after temperature scaling."""
    import torch

    from .metrics import ece

    plt = _pyplot()
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    fig, ax = plt.subplots(figsize=(5, 5))
    edges = np.linspace(0, 1, n_bins + 1)
    variants = [("uncalibrated", z)] + ([(f"T = {temperature:.2f}", z / temperature)] if temperature else [])
    for label, logit in variants:
        conf, pred = torch.softmax(logit, 1).max(1)
        hit = (pred == y).double().numpy()
        conf_np = conf.numpy()
        idx = np.clip(np.digitize(conf_np, edges[1:-1], right=True), 0, n_bins - 1)
        xs = [conf_np[idx == b].mean() for b in range(n_bins) if (idx == b).any()]
        ys = [hit[idx == b].mean() for b in range(n_bins) if (idx == b).any()]
        ax.plot(xs, ys, marker="o", label=f"{label} (ECE {100 * ece(logit, y, n_bins):.2f}%)")
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend()
    return _save(fig, path, dpi=110)


def write_report(
    result: Any, out_dir: str | Path, *, histogram_scorer: str = "gmm", title: str = "featurefail report"
) -> Path:
    """Write ``report.md`` with the result tables and embedded PNGs, plus ``results.csv`` and ``results.json``.

    Figures: a score histogram of ``histogram_scorer`` over every failure source, and ROC/PR curves per source.
    Without matplotlib the report has the tables only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.to_csv(out / "results.csv")
    result.to_json(out / "results.json")
    lines = [f"# {title}", "", result.to_markdown()]
    try:
        _pyplot()
        figures = True
    except ImportError:
        figures = False
        lines.append("(install matplotlib for figures: pip install 'featurefail[plots]')")
    if figures:
        # one histogram stays legible with a handful of groups: all non-adversarial sources and, per attack,
        # only its last (largest) ε
        kinds = {row.source: row.kind for row in result.rows}
        last_attack = {source.split()[0]: source for source in result.scores if kinds.get(source) == "adversarial"}
        shown = [s for s in result.scores if kinds.get(s) != "adversarial" or s in last_attack.values()]
        groups: dict[str, Any] = {}
        for source in shown:
            by_scorer = result.scores[source]
            if histogram_scorer in by_scorer:
                normal, failure = by_scorer[histogram_scorer]
                groups.setdefault("clean (normal)", normal)
                groups[source] = failure
        if groups:
            score_histogram(
                groups,
                out / "histogram.png",
                title=f"{histogram_scorer} score per failure source",
                xlabel=f"{histogram_scorer} score (higher = more normal)",
            )
            lines += ["## Score histogram", "", "![histogram](histogram.png)", ""]
        lines += ["## ROC and PR curves", ""]
        for i, (source, by_scorer) in enumerate(result.scores.items()):
            name = f"curves_{i}.png"
            roc_pr_curves(by_scorer, out / name, title=source)
            lines += [f"### {source}", "", f"![{source}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
