"""Rank metrics for failure detection (via scikit-learn, never a sigmoid of scores) and calibration error.

Conventions: every function takes the scores of **normal** samples and of **failures** (mistakes,
adversarial or out-of-distribution inputs), higher score = more normal.

* ``auroc``: area under the ROC curve with normal samples positive (equals ``P(s_normal > s_failure)``).
* ``aupr_in``: average precision with normal samples positive, ranked by score.
* ``aupr_out``: average precision with failures positive, ranked by ``-score``.
* ``fpr_at_tpr``: fraction of failures accepted when the threshold keeps ``tpr`` of the normal samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["aupr_in", "aupr_out", "auroc", "ece", "fpr_at_tpr"]


def _labelled(normal: Any, failure: Any) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(normal.detach().cpu() if hasattr(normal, "detach") else normal, dtype=np.float64).ravel()
    f = np.asarray(failure.detach().cpu() if hasattr(failure, "detach") else failure, dtype=np.float64).ravel()
    if n.size == 0 or f.size == 0:
        raise ValueError(f"need both normal and failure samples, got {n.size} and {f.size}")
    scores = np.concatenate([n, f])
    if np.isnan(scores).any():
        raise ValueError("scores hold NaN")
    # -inf (e.g. non-finite features) ranks below everything; keep it orderable for scikit-learn
    finite = scores[np.isfinite(scores)]
    lo = finite.min() - 1.0 if finite.size else -1.0
    hi = finite.max() + 1.0 if finite.size else 1.0
    scores = np.clip(np.nan_to_num(scores, neginf=lo, posinf=hi), lo, hi)
    is_normal = np.concatenate([np.ones(n.size, dtype=int), np.zeros(f.size, dtype=int)])
    return scores, is_normal


def auroc(normal: Any, failure: Any) -> float:
    """AUROC, normal samples positive: ``(n,), (m,) -> float`` in [0, 1]."""
    scores, is_normal = _labelled(normal, failure)
    return float(roc_auc_score(is_normal, scores))


def aupr_in(normal: Any, failure: Any) -> float:
    """Average precision with normal samples as the positive class, ranked by score."""
    scores, is_normal = _labelled(normal, failure)
    return float(average_precision_score(is_normal, scores))


def aupr_out(normal: Any, failure: Any) -> float:
    """Average precision with failures as the positive class, ranked by ``-score``."""
    scores, is_normal = _labelled(normal, failure)
    return float(average_precision_score(1 - is_normal, -scores))


def fpr_at_tpr(normal: Any, failure: Any, tpr: float = 0.95) -> float:
    """Fraction of failures scored at or above the threshold that keeps ``tpr`` of the normal samples."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    scores, is_normal = _labelled(normal, failure)
    fpr, tprs, _ = roc_curve(is_normal, scores)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def ece(logits: Any, labels: Any, n_bins: int = 10) -> float:
    """Expected calibration error of ``softmax(logits)`` with ``n_bins`` equal-width confidence bins.

    ``ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|`` (Guo et al., 2017). ``logits (N, C)``, ``labels (N,)``.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"need logits (N, C) and labels (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    conf, pred = torch.softmax(z, dim=1).max(dim=1)
    hit = (pred == y).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    bins = torch.bucketize(conf, edges[1:-1], right=True)
    total = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            total += float(mask.double().mean()) * abs(float(hit[mask].mean()) - float(conf[mask].mean()))
    return total
