"""Deployment: the classifier and its detector as one ``nn.Module``.

``FailureDetector.as_module()`` builds a module whose forward pass returns the logits and the hooked
activations, scores the pooled features with the scorer's own module and compares with the calibrated
threshold. The classifier is copied first, so the user's model is never modified (no mode change, no hook).
The copy is rewritten with ``torch.fx`` when it can be traced symbolically (no Python hook runs at inference);
otherwise (Hugging Face models, data-dependent control flow) the copy runs with forward hooks inside the module,
which ``torch.export.export`` traces like the model itself. ``torch.jit.trace`` works on both;
``torch.jit.script`` does not (TorchScript is deprecated by PyTorch).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from .hooks import Capture, default_output_fn, first_tensor, pool_features, resolved_captures

__all__ = ["DetectorModule", "HookedExtractor", "feature_extractor"]


def _first_positional(node: torch.fx.Node) -> Any:
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()))


def _fx_extractor(model: nn.Module, captures: list[Capture]) -> nn.Module:
    names = {c.name for c in captures}

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # keep the hooked modules whole
            return qualname in names or super().is_leaf_module(m, qualname)

    graph = _Tracer().trace(model)
    graph_module = torch.fx.GraphModule(model, graph)
    captured = []
    for c in captures:
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == c.name]
        index = c.call or 0
        if index >= len(calls):
            raise ValueError(f"layer {c.name!r} is not called as a module (call {index}) in the traced graph")
        node = calls[index]
        captured.append(_first_positional(node) if c.side == "input" else node)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        tensors = tuple(graph.call_function(first_tensor, (node,)) for node in captured)
        pair = graph.call_function(tuple, ((output.args[0], graph.call_function(tuple, (tensors,))),))
    output.args = (pair,)
    graph.lint()
    graph_module.recompile()
    return graph_module


class HookedExtractor(nn.Module):
    """Runs ``model`` (a private copy) with forward hooks inside: ``forward(*args, **kwargs) -> (output,
    activations)``, one activation per capture, in order. Concurrent calls from several threads keep their
    activations apart (one store per thread)."""

    def __init__(self, model: nn.Module, captures: list[Capture]) -> None:
        super().__init__()
        self.model = model
        self.captures = list(captures)
        self._stores: dict[int, dict[tuple[str, str, int], torch.Tensor | None]] = {}
        named = dict(model.named_modules())
        for name in dict.fromkeys(c.name for c in self.captures):
            named[name].register_forward_hook(self._make_hook(name), with_kwargs=True)

    def _make_hook(self, name: str) -> Callable:
        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            store = self._stores.get(threading.get_ident())
            if store is None:
                return
            index = sum(1 for key in store if key[0] == name and key[1] == "output")
            store[(name, "input", index)] = first_tensor((args, kwargs))
            store[(name, "output", index)] = first_tensor(output)

        return on_forward

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
        key = threading.get_ident()
        self._stores[key] = {}
        try:
            output = self.model(*args, **kwargs)
        finally:
            store = self._stores.pop(key)
        acts = []
        for c in self.captures:
            t = store.get((c.name, c.side, c.call or 0))
            if t is None:
                raise RuntimeError(f"the hooked module {c.name!r} did not run (call {c.call or 0})")
            acts.append(t)
        return output, tuple(acts)


def feature_extractor(
    model: nn.Module,
    layer: Any = None,
    *,
    example: Any = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    mode: str = "auto",
) -> nn.Module:
    """A module computing ``(model_output, activations)`` in one pass, on a copy of ``model`` in eval mode.

    ``activations`` is a tuple with one tensor per capture of ``layer`` (the specs of
    :class:`~featurefail.FeatureHook`; ``None`` = the head's input), in order; the module's ``layouts``
    attribute gives each one's layout for :func:`~featurefail.hooks.pool_features`. The head and the layouts
    come from ``example`` (one probe forward pass) or, without it, from the last ``FeatureHook`` that resolved
    ``layer`` on ``model``; fully resolved specs (every entry a string with its ``#layout``) need neither.

    Args:
        mode: ``"auto"`` (``torch.fx`` when the model traces, else hooks inside the module), ``"fx"`` or
            ``"hooks"``.

    Raises:
        ValueError: when the layers cannot be resolved, the model cannot be copied, or ``mode="fx"`` and the
            model cannot be traced.
    """
    if mode not in ("auto", "fx", "hooks"):
        raise ValueError(f"mode must be 'auto', 'fx' or 'hooks', got {mode!r}")
    blocks = resolved_captures(model, layer, example=example, output_fn=output_fn)
    captures = [c for block in blocks for c in block]
    try:
        copied = copy.deepcopy(model)
    except Exception as exc:
        raise ValueError(f"as_module() copies the model so as never to modify it; deepcopy failed: {exc}") from exc
    copied.eval()
    extractor: nn.Module
    if mode == "hooks":
        extractor = HookedExtractor(copied, captures)
    else:
        try:
            extractor = _fx_extractor(copied, captures)
        except Exception as exc:
            if mode == "fx":
                raise ValueError(f"torch.fx cannot trace this model ({exc}); use mode='hooks'") from exc
            extractor = HookedExtractor(copied, captures)
    extractor.layouts = [c.layout for c in captures]
    return extractor.eval()


class DetectorModule(nn.Module):
    """Classifier + detector: ``forward(*inputs) -> (logits, score, flag)``, flag = ``score < threshold``.

    The inputs are the classifier's own (a tensor, or keyword arguments such as ``input_ids=``). Non-finite
    features or logits score ``-inf`` and are flagged, as in ``FailureDetector.score``.
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
        threshold = float(threshold)
        if math.isnan(threshold):
            raise ValueError("the threshold is NaN; calibrate the detector or pass a finite threshold")
        self.extractor = extractor
        self.scorer = scorer
        self.register_buffer("threshold", torch.tensor(threshold))
        self.pool = pool
        self.output_fn = output_fn or default_output_fn
        layouts = getattr(extractor, "layouts", None)
        self.layouts = list(layouts) if layouts is not None else None

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        output, activation = self.extractor(*args, **kwargs)
        logits = self.output_fn(output)
        acts = list(activation) if isinstance(activation, tuple | list) else [activation]
        layouts = self.layouts if self.layouts is not None else [None] * len(acts)
        pooled = [pool_features(a, self.pool, layout) for a, layout in zip(acts, layouts, strict=True)]
        feats = pooled[0] if len(pooled) == 1 else torch.cat([p.to(logits.dtype) for p in pooled], dim=1)
        score = self.scorer(feats, logits).float()
        bad = ~(torch.isfinite(feats).all(dim=1) & torch.isfinite(logits).all(dim=1)) | torch.isnan(score)
        score = torch.where(bad, torch.full_like(score, -math.inf), score)
        return logits, score, score < self.threshold
