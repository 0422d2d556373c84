"""Rank metrics for failure detection (via scikit-learn, never a sigmoid of scores) and calibration error.

Conventions: every function takes the scores of **normal** samples and of **failures** (mistakes,
adversarial or out-of-distribution inputs), higher score = more normal.

* ``auroc``: area under the ROC curve with normal samples positive (equals ``P(s_normal > s_failure)``).
* ``aupr_in``: average precision with normal samples positive, ranked by score.
* ``aupr_out``: average precision with failures positive, ranked by ``-score``.
* ``fpr_at_tpr``: fraction of failures accepted when the threshold keeps ``tpr`` of the normal samples.

Risk-coverage metrics (selective classification, following FD-Shifts, Jaeger et al., ICLR 2023): the score is
the confidence, an input is *accepted* when ``score >= t``, *coverage* is the fraction accepted and the
(selective) *risk* is the fraction of failures among the accepted. Sliding ``t`` over the distinct scores gives
the risk-coverage curve; ties are never split (one curve point per distinct score, as FD-Shifts'
``selective_risk_stats`` does). In a mixed stream a "failure" is whatever the caller counts as one, e.g. a wrong
prediction on an in-distribution or shifted input, or any out-of-distribution input.

* ``risk_coverage_curve``: the curve's points, coverage descending.
* ``aurc``: area under it by the trapezoidal rule, closed by a flat segment from the last point to coverage 0
  (FD-Shifts' linear interpolation; without ties it is the mean selective risk over the coverages
  ``1/N, ..., N/N`` up to ``(r_1 - r_N) / 2N``). A fraction in [0, 1] (FD-Shifts prints it times 1000).
* ``eaurc``: ``aurc`` minus the AURC of an ideal score, ``e + (1 - e) ln(1 - e)`` with ``e`` the overall failure
  rate (FD-Shifts' closed form; it can be slightly negative with few samples).
* ``risk_at_coverage``, ``coverage_at_risk``: one working point each, read off the curve (empirical, no guarantee;
  see :mod:`featurefail.threshold` for thresholds with guarantees).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "aupr_in",
    "aupr_out",
    "aurc",
    "auroc",
    "coverage_at_risk",
    "eaurc",
    "ece",
    "fpr_at_tpr",
    "labelled",
    "risk_at_coverage",
    "risk_coverage_curve",
]


def labelled(normal: Any, failure: Any) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``(n,)`` normal and ``(m,)`` failure scores: ``(scores (n+m,), is_normal (n+m,) int)``.

    Scores stay in order; ``-inf``/``+inf`` are replaced by finite values below/above every finite score (ties
    among them kept) so scikit-learn can rank them. NaN raises ValueError.
    """
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
    scores, is_normal = labelled(normal, failure)
    return float(roc_auc_score(is_normal, scores))


def aupr_in(normal: Any, failure: Any) -> float:
    """Average precision with normal samples as the positive class, ranked by score."""
    scores, is_normal = labelled(normal, failure)
    return float(average_precision_score(is_normal, scores))


def aupr_out(normal: Any, failure: Any) -> float:
    """Average precision with failures as the positive class, ranked by ``-score``."""
    scores, is_normal = labelled(normal, failure)
    return float(average_precision_score(1 - is_normal, -scores))


def fpr_at_tpr(normal: Any, failure: Any, tpr: float = 0.95) -> float:
    """Fraction of failures scored at or above the threshold that keeps ``tpr`` of the normal samples."""
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    scores, is_normal = labelled(normal, failure)
    fpr, tprs, _ = roc_curve(is_normal, scores)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def risk_coverage_curve(normal: Any, failure: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Risk-coverage curve: ``(coverages, risks, thresholds)``, each ``(P,)`` with ``P`` distinct scores.

    Point ``i`` accepts the inputs with ``score >= thresholds[i]``: ``coverages[i]`` of all ``n + m`` inputs, of which
    a fraction ``risks[i]`` are failures. Coverage descends from 1 (thresholds ascend); ties are never split.
    Infinite scores are ranked as by :func:`labelled`, so thresholds are finite.
    """
    scores, is_normal = labelled(normal, failure)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    failures = np.cumsum(1 - is_normal[order])
    last = np.concatenate([np.flatnonzero(np.diff(s) < 0), [s.size - 1]])  # last index of each tie group
    accepted = last + 1
    return (accepted / s.size)[::-1], (failures[last] / accepted)[::-1], s[last][::-1]


def aurc(normal: Any, failure: Any) -> float:
    """Area under the risk-coverage curve (lower is better), a fraction in [0, 1]; see the module docstring."""
    coverages, risks, _ = risk_coverage_curve(normal, failure)
    c = np.concatenate([coverages, [0.0]])
    r = np.concatenate([risks, risks[-1:]])
    return float(np.sum((r[:-1] + r[1:]) / 2.0 * (c[:-1] - c[1:])))


def eaurc(normal: Any, failure: Any) -> float:
    """Excess AURC: :func:`aurc` minus the AURC of an ideal score with the same failure rate ``e``."""
    e = 1.0 - float(labelled(normal, failure)[1].mean())
    optimal = 1.0 if e >= 1.0 else e + (1.0 - e) * float(np.log1p(-e))
    return aurc(normal, failure) - optimal


def risk_at_coverage(normal: Any, failure: Any, coverage: float) -> float:
    """Selective risk at the most selective curve point that still accepts at least ``coverage`` of the inputs."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    coverages, risks, _ = risk_coverage_curve(normal, failure)
    return float(risks[np.flatnonzero(coverages >= coverage - 1e-12)[-1]])


def coverage_at_risk(normal: Any, failure: Any, risk: float) -> float:
    """Largest coverage among the curve points whose selective risk is ``<= risk`` (0.0 when there is none)."""
    if not 0.0 <= risk <= 1.0:
        raise ValueError(f"risk must be in [0, 1], got {risk}")
    coverages, risks, _ = risk_coverage_curve(normal, failure)
    ok = risks <= risk + 1e-12
    return float(coverages[ok].max()) if ok.any() else 0.0


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
    if z.shape[0] == 0:
        raise ValueError("ece needs at least one sample")
    if not torch.isfinite(z).all():
        raise ValueError(f"logits hold NaN or infinite values in {int((~torch.isfinite(z)).any(1).sum())} row(s)")
    if bool(((y < 0) | (y >= z.shape[1])).any()):
        bad = sorted({int(v) for v in y[(y < 0) | (y >= z.shape[1])]})[:5]
        raise ValueError(f"labels must lie in [0, {z.shape[1]}) (one per logit column); got {bad}")
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
