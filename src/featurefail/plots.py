"""Figures (matplotlib extra): score histograms, ROC/PR curves, reliability diagrams, written as PNG files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["score_histogram"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'featurefail[plots]'") from exc
    return plt


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
    for name, values in data.items():
        dropped = len(np.asarray(groups[name]).ravel()) - values.size if hasattr(groups[name], "__len__") else 0
        label = f"{name} (n={values.size}" + (f", {dropped} non-finite" if dropped else "") + ")"
        ax.hist(np.clip(values, lo, hi), bins=edges, density=True, alpha=0.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
