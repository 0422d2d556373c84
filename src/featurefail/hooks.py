"""FeatureHook: capture a classifier's penultimate features (and its logits) without editing the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["FeatureHook", "auto_layers", "default_output_fn", "find_layer"]

Pool = Literal["avg", "flatten"] | None
LayerSpec = str | nn.Module | None


def default_output_fn(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, the first item of a tuple/list, or ``out["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; pass output_fn=... "
        "that maps the model's output to a (N, n_classes) tensor"
    )


def find_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module, bool]:
    """Resolve the module to hook.

    Returns:
        ``(name, module, capture_input)``: with ``layer=None`` the last ``nn.Linear`` in ``model.modules()``
        order and ``capture_input=True`` (its input is the penultimate feature); otherwise the named module
        or the given module object and ``capture_input=False`` (its output is the feature).
    """
    named = dict(model.named_modules())
    if layer is None:
        linears = [(name, m) for name, m in named.items() if isinstance(m, nn.Linear)]
        if not linears:
            candidates = [f"{name} ({type(m).__name__})" for name, m in named.items() if name][-8:]
            raise ValueError(
                "the model has no nn.Linear, so the penultimate layer cannot be guessed; pass layer= a dotted "
                f"module name or a module. Candidates (last modules): {', '.join(candidates) or 'none'}"
            )
        name, module = linears[-1]
        return name, module, True
    if isinstance(layer, str):
        if layer not in named:
            close = [n for n in named if n and (layer in n or n in layer)][:8]
            hint = f"; did you mean one of: {', '.join(close)}" if close else ""
            raise ValueError(f"the model has no module named {layer!r}{hint}")
        return layer, named[layer], False
    if isinstance(layer, nn.Module):
        for name, m in named.items():
            if m is layer:
                return name, m, False
        raise ValueError("the given layer module is not part of the model")
    raise TypeError(f"layer must be None, a module name or an nn.Module, got {type(layer).__name__}")


def auto_layers(model: nn.Module, example: Any, n_stages: int = 2) -> list[str | None]:
    """``[None, …]``: the penultimate layer plus the ends of the ``n_stages`` spatial-resolution stages before the
    last one, found by one probe forward pass on ``example`` (a small input batch).

    A stage is a run of consecutive module calls whose 4-D outputs share one spatial size larger than 1×1; its end
    is the last module called in it (e.g. ``layers.5`` and ``layers.2`` of a CIFAR ResNet-20, the transition layers of a
    DenseNet). Models without such stages (MLPs, transformers on tokens) get ``[None]``, the penultimate layer.
    """
    calls: list[tuple[str, tuple[int, ...]]] = []

    def record(name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def on_forward(module: nn.Module, args: tuple, output: Any) -> None:
            # 1x1 outputs are global pools (or squeeze-excitation gates), not a stage
            if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[2:].numel() > 1:
                calls.append((name, tuple(output.shape[2:])))

        return on_forward

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    ends: list[tuple[tuple[int, ...], str]] = []
    for name, size in calls:
        if ends and ends[-1][0] == size:
            ends[-1] = (size, name)
        else:
            ends.append((size, name))
    earlier = [name for _, name in ends[:-1]]
    return [None, *reversed(earlier[-n_stages:])] if earlier else [None]


def pool_features(t: torch.Tensor, pool: Pool) -> torch.Tensor:
    """Turn an activation into ``(N, D)`` features.

    ``"avg"`` global-average-pools every axis after the channel axis (``(N, C, H, W) -> (N, C)``) and leaves
    2-D activations as they are; ``"flatten"`` flattens all but the batch axis; ``None`` requires 2-D.
    """
    if pool == "avg":
        return t.flatten(2).mean(2) if t.ndim > 2 else t.reshape(t.shape[0], -1)
    if pool == "flatten":
        return t.reshape(t.shape[0], -1)
    if pool is None:
        if t.ndim != 2:
            raise ValueError(f"the hooked activation has shape {tuple(t.shape)}; use pool='avg' or 'flatten'")
        return t
    raise ValueError(f"pool must be 'avg', 'flatten' or None, got {pool!r}")


class FeatureHook:
    """Capture penultimate features (and the logits) from any ``nn.Module`` classifier.

    By default the hook sits on the **input** of the last ``nn.Linear`` (the features ``F`` of
    ``softmax(W F + b)`` in the paper); ``layer=`` picks another module by dotted name or object, whose
    **output** is captured. 4-D activations are global-average pooled.

    ``layer`` may also be a list: every listed layer is captured in the same forward pass, pooled, and the
    blocks are concatenated in the listed order into ``(N, D_1 + … + D_L)``; ``block_sizes`` records the
    ``D_l`` (a ``None`` entry is the default penultimate layer). Density scorers can model the concatenation
    or each block separately (``GMMScorer(per_layer=True)``).

    Use it as a context manager: the model is put in eval mode inside and its mode and hooks are restored
    on exit, also when an exception escapes::

        with FeatureHook(model) as hook:
            feats, logits = hook(x)          # (N, D), (N, C)

    Args:
        model: the classifier.
        layer: ``None`` (input of the last ``nn.Linear``), a dotted module name, a module of ``model``, a
            non-empty list of these, or ``"auto"``: the penultimate layer plus two earlier stage ends, chosen by
            :func:`auto_layers` on the first batch (``resolved_layers`` then lists them).
        pool: ``"avg"`` (default), ``"flatten"`` or ``None``.
        output_fn: maps the model's output to logits ``(N, C)``; default handles tensors, tuples and
            ``{"logits": ...}``.
        capture_input: capture the module's input rather than its output (default: True only for the
            automatic last-``nn.Linear`` choice).

    Attributes:
        layer_name: the dotted name of the hooked module (names joined by ``"+"`` for several layers).
        layer_names: one dotted name per hooked layer.
        block_sizes: ``(D_1, …, D_L)`` after the first call, else None.
        head: the hooked ``nn.Linear`` when the features are its input (used to re-classify purified
            features), else ``None`` (always ``None`` for several layers).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | Sequence[LayerSpec] = None,
        pool: Pool = "avg",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        capture_input: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if pool not in ("avg", "flatten", None):
            raise ValueError(f"pool must be 'avg', 'flatten' or None, got {pool!r}")
        self.model = model
        self.pool = pool
        self.output_fn = output_fn or default_output_fn
        self._capture_input_arg = capture_input
        self._auto = isinstance(layer, str) and layer == "auto" and "auto" not in dict(model.named_modules())
        self.resolved_layers: list[str | None] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._was_training: bool | None = None
        self._active = False
        self.block_sizes: tuple[int, ...] | None = None
        if self._auto:
            self.layer_names, self.layer_name, self.modules, self.captures_input = [], "auto", [], []
            self.module, self.capture_input, self.head = None, False, None
            self._captured: list[torch.Tensor | None] = []
            return
        self._resolve(layer)

    def _resolve(self, layer: Any) -> None:
        model, capture_input = self.model, self._capture_input_arg
        specs = list(layer) if isinstance(layer, list | tuple) else [layer]
        if not specs:
            raise ValueError("layer is an empty list; name at least one layer (None = the penultimate one)")
        found = [find_layer(model, spec) for spec in specs]
        if len({name for name, _, _ in found}) != len(found):
            raise ValueError(f"layer lists a module twice: {[name for name, _, _ in found]}")
        self.layer_names = [name for name, _, _ in found]
        self.layer_name = "+".join(self.layer_names)
        self.modules = [module for _, module, _ in found]
        self.module = self.modules[0]
        self.captures_input = [auto if capture_input is None else capture_input for _, _, auto in found]
        self.capture_input = self.captures_input[0]
        single_linear = len(found) == 1 and self.capture_input and isinstance(self.module, nn.Linear)
        self.head = self.module if single_linear else None
        self.resolved_layers = [None if spec is None else name for spec, (name, _, _) in zip(specs, found, strict=True)]
        self._captured = [None] * len(found)

    @property
    def multi_layer(self) -> bool:
        """True when more than one layer is captured."""
        return len(self.modules) > 1

    def _make_callback(self, index: int) -> Callable[[nn.Module, tuple, Any], None]:
        def on_forward(module: nn.Module, args: tuple, output: Any) -> None:
            value = args[0] if self.captures_input[index] else output
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"the hooked module {self.layer_names[index]!r} gave a {type(value).__name__}, not a tensor; "
                    "hook another layer"
                )
            self._captured[index] = pool_features(value, self.pool)

        return on_forward

    def __enter__(self) -> FeatureHook:
        if self._active:
            raise RuntimeError("this FeatureHook is already active")
        self._was_training = self.model.training
        self.model.eval()
        self._active = True
        self._register()
        return self

    def _register(self) -> None:
        self._handles = [m.register_forward_hook(self._make_callback(i)) for i, m in enumerate(self.modules)]

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hook and restore the model's training mode (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False
        if self._was_training is not None:
            self.model.train(self._was_training)
            self._was_training = None
        self._captured = [None] * len(self.modules)

    def __call__(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model on a batch: returns features ``(N, D)`` and logits ``(N, C)``."""
        if not self._active:
            raise RuntimeError("use FeatureHook inside a `with` block (or call __enter__ first)")
        if self._auto:
            self._auto = False
            self._resolve(auto_layers(self.model, x))
            self._register()
        self._captured = [None] * len(self.modules)
        output = self.model(x)
        logits = self.output_fn(output)
        captured, self._captured = self._captured, [None] * len(self.modules)
        missing = [name for name, value in zip(self.layer_names, captured, strict=True) if value is None]
        if missing:
            raise RuntimeError(
                f"the hooked module {missing[0]!r} did not run during the forward pass; "
                "pick a layer the model actually calls"
            )
        blocks = [value for value in captured if value is not None]
        self.block_sizes = tuple(b.shape[1] for b in blocks)
        feats = blocks[0] if len(blocks) == 1 else torch.cat([b.to(blocks[0].dtype) for b in blocks], dim=1)
        if logits.ndim != 2:
            raise ValueError(f"logits must be (N, n_classes), got shape {tuple(logits.shape)}; pass output_fn=")
        return feats, logits
