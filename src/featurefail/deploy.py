"""Deployment: the classifier and its detector as one ``nn.Module``, with no Python hooks at run time.

``FailureDetector.as_module()`` rewrites the classifier with ``torch.fx`` so that one forward pass returns the
logits and the hooked activation, then scores the pooled features with the scorer's own module and compares
with the calibrated threshold. The result is a plain module: ``torch.jit.trace``, ``torch.export`` and
``torch.compile`` see ordinary tensor operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from .gmm import rescored_log_prob
from .hooks import default_output_fn, find_layer, pool_features

__all__ = ["BlockSumScoreModule", "DetectorModule", "GMMScoreModule", "LogitScoreModule", "feature_extractor"]


def feature_extractor(model: nn.Module, layer: Any, capture_input: bool | None = None) -> nn.Module:
    """A ``torch.fx.GraphModule`` computing ``(model_output, activation)`` in one pass.

    The activation is the input of the module ``layer`` (default: the last ``nn.Linear``) or its output when a
    layer is named, exactly as :class:`~featurefail.FeatureHook` captures it. For a list of layers the second
    item is a tuple with one activation per layer, in the listed order.

    Raises:
        ValueError: when the model cannot be traced symbolically (data-dependent control flow) or a
            layer is not called in the traced graph.
    """
    specs = list(layer) if isinstance(layer, list | tuple) else [layer]
    found = [find_layer(model, spec) for spec in specs]
    names = {name for name, _, _ in found}

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # keep the hooked modules whole
            return qualname in names or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
        graph_module = torch.fx.GraphModule(model, graph)
    except Exception as exc:
        raise ValueError(
            f"as_module() needs a model that torch.fx can trace; tracing failed with: {exc}. "
            "Score with detector.score() (hooks) instead, or make the forward traceable."
        ) from exc
    captured = []
    for name, _, auto_input in found:
        target = next((n for n in graph.nodes if n.op == "call_module" and n.target == name), None)
        if target is None:
            raise ValueError(f"layer {name!r} is not called as a module in the traced graph")
        use_input = auto_input if capture_input is None else capture_input
        captured.append(target.args[0] if use_input else target)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        activation = captured[0] if len(captured) == 1 else graph.call_function(tuple, (tuple(captured),))
        pair = graph.call_function(tuple, ((output.args[0], activation),))
    output.args = (pair,)
    graph.lint()
    graph_module.recompile()
    return graph_module


class GMMScoreModule(nn.Module):
    """``log p(F)`` under a fitted :class:`~featurefail.DiagonalGMM` as buffers: ``(N, D) -> (N,)``.

    The same computation as ``DiagonalGMM.score_samples`` (:func:`~featurefail.gmm.rescored_log_prob`: a float32
    product picks each row's dominant components, which are recomputed exactly in float64, so a TF32 setting
    cannot spoil the result). Non-finite rows score ``-inf``. With ``bpd=True`` returns ``log p(F) / (D ln 2)``
    (i.e. ``-BPD``).
    """

    def __init__(self, gmm: Any, bpd: bool = False, top: int = 4) -> None:
        super().__init__()
        for name, value in gmm._scoring_parameters().items():
            self.register_buffer(name, value.detach().cpu().clone())
        self.top = min(top, gmm.n_components)
        self.scale = 1.0 / (gmm.n_features_in_ * math.log(2.0)) if bpd else 1.0

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        x = feats.float()
        finite = torch.isfinite(x).all(dim=1)
        x = torch.where(finite[:, None], x, torch.zeros_like(x))
        lp = rescored_log_prob(
            x, self.coef, self.bias, self.center, self.means64, self.precisions64, self.exact_bias64, self.top
        )
        score = torch.logsumexp(lp, dim=1) * self.scale
        return torch.where(finite, score, torch.full_like(score, -math.inf)).float()


class TransformedScoreModule(nn.Module):
    """``score(transform(feats), logits)``: a fitted feature transform in front of a score module."""

    def __init__(self, transform: nn.Module, score: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.score = score

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        finite = torch.isfinite(feats).all(dim=1)
        safe = torch.where(finite[:, None], feats, torch.zeros_like(feats))
        out = self.score(self.transform(safe), logits)
        return torch.where(finite, out, torch.full_like(out, -math.inf))


class BlockSumScoreModule(nn.Module):
    """``scale · Σ_l score_l(feats[:, block_l])``: per-layer score modules over consecutive column blocks."""

    def __init__(self, blocks: tuple[int, ...], parts: list[nn.Module], scale: float = 1.0) -> None:
        super().__init__()
        if len(blocks) != len(parts):
            raise ValueError(f"{len(blocks)} blocks but {len(parts)} score modules")
        self.blocks = [int(b) for b in blocks]
        self.parts = nn.ModuleList(parts)
        self.scale = float(scale)

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        total = torch.zeros(feats.shape[0], dtype=torch.float32, device=feats.device)
        for part, block in zip(self.parts, torch.split(feats, self.blocks, dim=1), strict=True):
            total = total + part(block, logits).float()
        return total * self.scale


class LogitScoreModule(nn.Module):
    """A score computed from the logits alone: ``fn(logits) -> (N,)`` (max softmax, max logit, ...)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(logits)


class DetectorModule(nn.Module):
    """Classifier + detector: ``forward(x) -> (logits, score, flag)``, flag = ``score < threshold``.

    Non-finite features or logits score ``-inf`` and are flagged, as in ``FailureDetector.score``.
    """

    def __init__(
        self,
        extractor: nn.Module,
        scorer: nn.Module,
        threshold: float,
        pool: Any = "avg",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.scorer = scorer
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.pool = pool
        self.output_fn = output_fn or default_output_fn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        output, activation = self.extractor(x)
        logits = self.output_fn(output)
        if isinstance(activation, tuple | list):
            feats = torch.cat([pool_features(a, self.pool).to(logits.dtype) for a in activation], dim=1)
        else:
            feats = pool_features(activation, self.pool)
        score = self.scorer(feats, logits).float()
        bad = ~(torch.isfinite(feats).all(dim=1) & torch.isfinite(logits).all(dim=1)) | torch.isnan(score)
        score = torch.where(bad, torch.full_like(score, -math.inf), score)
        return logits, score, score < self.threshold
