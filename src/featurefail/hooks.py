"""Find a classifier's head and its feature layers by watching one forward pass, and capture them with hooks.

Layer specifications (the ``layer=`` setting) are plain values, so a detector's configuration stays JSON:

- ``None``: the input of the classifier's head. The head is found by a probe forward pass: the module whose
  output *is* the logits (after ``output_fn``). When the logits are the sum or the mean of several modules'
  outputs (timm's distilled DeiT: ``(head(x_cls) + head_dist(x_dist)) / 2``) the inputs of all of them are
  captured and concatenated in call order. Registration order never matters; modules that did not run are
  never chosen.
- ``"name"``: the output of the module ``name`` (dotted, as in ``model.named_modules()``).
- ``"name:input"`` / ``"name:output"``: say which side is captured.
- ``"name:output@1"``: the second call (0-based) of a module that runs several times in one forward pass;
  without ``@k`` such a module is an error.
- ``"...#layout"``: how the activation is pooled: ``channels_first`` (``(N, C, *spatial)``, mean over the
  spatial axes), ``channels_last`` (``(N, *spatial, C)`` or tokens ``(N, T, C)``: mean over every axis but the
  first and the last), ``cls`` (tokens ``(N, T, C)``: the first token) or ``flat`` (already ``(N, D)``). Without
  it the layout is inferred from the module (a convolution or batch norm gives ``channels_first``; a
  ``LayerNorm``/``Linear`` over the last axis gives ``channels_last``) and recorded in the resolved spec.
- ``"a:input+b:input"``: several captures concatenated into one block.
- ``"auto"``: the head's input plus the ends of the earlier stages (see :func:`auto_layers`).

One file (over 500 lines) because head discovery, layer specifications, the ``"auto"`` strategies, the hook and
:func:`describe` all read the same record of one forward pass (the private call trace and block plans); splitting
them would make that record a public interface. A split along those lines is planned once the record settles.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "Capture",
    "FeatureHook",
    "HookPlan",
    "HookedBlock",
    "ModelInputs",
    "auto_layers",
    "call_model",
    "default_output_fn",
    "describe",
    "eval_mode",
    "find_layer",
    "model_lock",
    "parse_layer",
    "pool_features",
]

Pool = Literal["avg", "flatten"] | None
LayerSpec = str | nn.Module | None
Layout = Literal["channels_first", "channels_last", "cls", "flat"]
LAYOUTS: tuple[str, ...] = ("channels_first", "channels_last", "cls", "flat")

_SPEC = re.compile(r"^(?P<name>[^:@#+]+?)(?::(?P<side>input|output))?(?:@(?P<call>\d+))?(?:#(?P<layout>[a-z_]+))?$")

_CHANNELS_FIRST = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LocalResponseNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)  # fmt: skip


# ---- model inputs, outputs, locks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInputs:
    """Positional and keyword arguments of one model call: ``model(*args, **kwargs)``."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, ``model(**inputs)`` for a mapping of keyword arguments, or ``model(*args, **kwargs)``."""
    if isinstance(inputs, ModelInputs):
        return model(*inputs.args, **inputs.kwargs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor inside ``ModelInputs``, mappings, tuples and lists (other values kept)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, ModelInputs):
        return ModelInputs(map_tensors(obj.args, fn), map_tensors(dict(obj.kwargs), fn))
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def first_tensor(obj: Any, _depth: int = 0) -> torch.Tensor | None:
    """The first tensor in a (nested) output or argument structure: tensors, tuples, lists, mappings."""
    if isinstance(obj, torch.Tensor):
        return obj
    if _depth > 4:
        return None
    if isinstance(obj, ModelInputs):
        obj = (obj.args, dict(obj.kwargs))
    values: Any = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, tuple | list) else ()
    for value in values:
        found = first_tensor(value, _depth + 1)
        if found is not None:
            return found
    return None


def batch_rows(inputs: Any) -> int | None:
    """The batch size of model inputs: the first axis of their first tensor (None when there is none)."""
    t = first_tensor(inputs)
    return int(t.shape[0]) if t is not None and t.ndim > 0 else None


def default_output_fn(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, the first item of a tuple/list, ``out["logits"]`` or
    ``out.logits`` (Hugging Face outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; pass output_fn=... "
        "that maps the model's output to a (N, n_classes) tensor"
    )


_registry_lock = threading.Lock()
_model_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock serialising hooked forward passes of ``model`` (one per model object, shared by every
    :class:`FeatureHook`): forward hooks sit on the shared module and fire for every caller."""
    with _registry_lock:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.RLock()
        return lock


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode inside the block and restore every submodule's own mode exactly after."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


# ---- specs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capture:
    """One captured activation: the ``side`` of call ``call`` of module ``name``, pooled by ``layout``."""

    name: str
    side: Literal["input", "output"] = "output"
    call: int | None = None
    layout: str | None = None

    def __str__(self) -> str:
        text = f"{self.name}:{self.side}"
        if self.call is not None:
            text += f"@{self.call}"
        return text + (f"#{self.layout}" if self.layout else "")


def parse_layer(spec: str) -> list[Capture]:
    """Parse a layer string (``"name[:input|:output][@call][#layout]"``, several joined by ``"+"``).

    Raises:
        ValueError: on a malformed string or an unknown layout.
    """
    captures = []
    for part in spec.split("+"):
        match = _SPEC.match(part.strip())
        if match is None:
            raise ValueError(
                f"cannot read layer {spec!r}: expected 'module', 'module:input', 'module:output@1' or "
                "'module:output#channels_last' (several joined by '+')"
            )
        layout = match["layout"]
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r} in layer {spec!r}; use one of {LAYOUTS}")
        call = int(match["call"]) if match["call"] is not None else None
        captures.append(Capture(match["name"], match["side"] or "output", call, layout))  # type: ignore[arg-type]
    return captures


def find_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """``(dotted name, module)`` of a module of ``model`` given by name or object.

    Raises:
        ValueError: when there is no such module; TypeError for other values.
    """
    if not isinstance(layer, str | nn.Module):
        raise TypeError(f"layer must be None, a module name or an nn.Module, got {type(layer).__name__}")
    return find_layer_in(dict(model.named_modules()), layer)


# ---- pooling --------------------------------------------------------------------------------------------------


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    """``(N, ...) -> (N, prod(...))``, also for ``N = 0`` (where ``reshape(0, -1)`` is ambiguous)."""
    return t.flatten(1) if t.ndim > 1 else t.reshape(-1, 1)


def pool_features(t: torch.Tensor, pool: Pool, layout: str | None = None) -> torch.Tensor:
    """Turn an activation into ``(N, D)`` features.

    ``"avg"`` averages over the non-channel axes given by ``layout``: ``channels_first`` ``(N, C, ...) -> (N, C)``,
    ``channels_last`` ``(N, ..., C) -> (N, C)`` (tokens ``(N, T, C)``: the mean token), ``cls`` ``(N, T, C) ->
    (N, C)`` (the first token), ``flat``/2-D as is; ``layout=None`` means ``channels_first``. ``"flatten"``
    flattens all but the batch axis; ``None`` requires 2-D.
    """
    if pool == "flatten":
        return _flat_rows(t)
    if pool is None:
        if t.ndim != 2:
            raise ValueError(f"the hooked activation has shape {tuple(t.shape)}; use pool='avg' or 'flatten'")
        return t
    if pool != "avg":
        raise ValueError(f"pool must be 'avg', 'flatten' or None, got {pool!r}")
    if t.ndim <= 2 or layout == "flat":
        return _flat_rows(t)
    if layout == "channels_last":
        return t.mean(dim=tuple(range(1, t.ndim - 1)))
    if layout == "cls":
        if t.ndim != 3:
            raise ValueError(f"layout 'cls' needs tokens (N, T, C), got shape {tuple(t.shape)}")
        return t[:, 0]
    if layout not in (None, "channels_first"):
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    return t.flatten(2).mean(2)


# ---- the probe forward pass -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Call:
    name: str
    module: nn.Module
    index: int
    start: int
    end: int = -1
    inp: torch.Tensor | None = None
    out: torch.Tensor | None = None
    layout: str | None = None
    channels: int | None = None
    guessed: bool = False

    def contains(self, other: _Call) -> bool:
        return self.start < other.start and other.end < self.end


@dataclass
class _Trace:
    calls: list[_Call]
    logits: torch.Tensor
    output: Any
    counts: dict[str, int]


def _head_rows(inputs: Any, n: int = 2) -> Any:
    """The first ``n`` rows of a batch, for the probe pass (a 1-D first tensor may lack its batch axis: kept whole)."""
    first = first_tensor(inputs)
    if first is None or first.ndim < 2:
        return inputs
    rows = first.shape[0]
    return map_tensors(inputs, lambda t: t[:n] if t.ndim > 0 and t.shape[0] == rows else t)


def _forward_note(exc: BaseException, inputs: Any) -> None:
    shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else None
    if shape is not None and hasattr(exc, "add_note"):
        exc.add_note(
            f"featurefail: the model failed on an input of shape {shape}. If this is a single example, add "
            "the batch dimension first (x.unsqueeze(0))."
        )


def _only(owner: int, hook: Callable) -> Callable:
    def guarded(*args: Any) -> None:
        if threading.get_ident() == owner:
            hook(*args)

    return guarded


def _probe(model: nn.Module, inputs: Any, output_fn: Callable[[Any], torch.Tensor]) -> _Trace:
    calls: list[_Call] = []
    open_calls: dict[str, list[_Call]] = {}
    counts: dict[str, int] = {}
    clock = itertools.count()

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = _Call(name, module, counts.get(name, 0), next(clock), inp=first_tensor((args, kwargs)))
            counts[name] = call.index + 1
            open_calls.setdefault(name, []).append(call)
            calls.append(call)

        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            call = open_calls[name].pop()
            call.end = next(clock)
            call.out = first_tensor(output)

        return hook

    handles = []
    owner = threading.get_ident()
    with model_lock(model):  # no other hooked pass runs meanwhile; a plain forward of another thread is ignored
        try:
            for name, m in model.named_modules():
                if name:
                    handles.append(m.register_forward_pre_hook(_only(owner, pre(name)), with_kwargs=True))
                    handles.append(m.register_forward_hook(_only(owner, post(name)), with_kwargs=True))
            with torch.no_grad(), eval_mode(model):
                try:
                    output = call_model(model, inputs)
                except Exception as exc:
                    _forward_note(exc, inputs)
                    raise
        finally:
            for handle in handles:
                handle.remove()
    logits = output_fn(output)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"output_fn returned a {type(logits).__name__}, not a tensor of logits")
    _check_logits(logits, inputs)
    done = [c for c in calls if c.end >= 0]
    _infer_layouts(done)
    return _Trace(done, logits, output, counts)


def _check_logits(logits: torch.Tensor, inputs: Any) -> None:
    rows = batch_rows(inputs)
    shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else None
    hint = (
        f" for an input of shape {shape}; if that is one example without its batch dimension, pass x.unsqueeze(0)"
        if shape is not None
        else ""
    )
    if logits.ndim != 2:
        raise ValueError(f"the model's logits have shape {tuple(logits.shape)}, expected (N, n_classes){hint}")
    if rows is not None and logits.shape[0] != rows:
        raise ValueError(f"the model returned {logits.shape[0]} rows of logits for {rows} inputs{hint}")


def _fixed_layout(module: nn.Module, t: torch.Tensor) -> str | None:
    if t.ndim <= 2:
        return "flat"
    kind = type(module).__name__
    if isinstance(module, _CHANNELS_FIRST) or kind.startswith(("LayerNorm2d", "LayerNorm3d")):
        return "channels_first"
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        shape = tuple(module.normalized_shape)
        if len(shape) == 1 and shape[0] == t.shape[-1]:
            return "channels_last"
    if isinstance(module, nn.Linear) and module.out_features == t.shape[-1]:
        return "channels_last"
    if isinstance(module, nn.Embedding) and module.embedding_dim == t.shape[-1]:
        return "channels_last"
    return None


def _relate(t: torch.Tensor, ref: _Call) -> str | None:
    assert ref.out is not None and ref.channels is not None
    if ref.layout in (None, "flat") or ref.out.ndim != t.ndim:
        return None
    if t.shape == ref.out.shape:
        return ref.layout
    if ref.layout == "channels_first" and t.ndim >= 4 and t.shape[2:] == ref.out.shape[2:]:
        return "channels_first"  # the same map with other channels: a concatenation (Inception, DenseNet)
    if ref.layout == "channels_last" and t.ndim >= 4 and t.shape[1:-1] == ref.out.shape[1:-1]:
        return "channels_last"
    first, last = t.shape[1], t.shape[-1]
    if first == ref.channels and last != ref.channels:
        return "channels_first"
    if last == ref.channels and first != ref.channels:
        return "channels_last"
    return None


def _channels(t: torch.Tensor, layout: str) -> int:
    return int(t.shape[1]) if layout in ("channels_first", "flat") else int(t.shape[-1])


def _infer_layouts(calls: list[_Call]) -> None:
    """Layout of every call's output: from the module type, else from its last nested call, its input's
    producer or the call completed before it; a guess (``channels_first`` for 4-D+, tokens for 3-D) otherwise."""
    by_end = sorted(calls, key=lambda c: c.end)
    producer: dict[int, _Call] = {}
    known: list[_Call] = []
    for call in by_end:
        t = call.out
        if t is None or t.ndim < 2:
            continue
        layout = _fixed_layout(call.module, t)
        if layout is None:
            refs: list[_Call] = []
            nested = [k for k in known if call.contains(k) and k.layout != "flat"]
            if nested:
                refs.append(nested[-1])
            if call.inp is not None and id(call.inp) in producer:
                refs.append(producer[id(call.inp)])
            before = [k for k in known if k.end < call.end and k.layout != "flat" and k.out.ndim == t.ndim]
            if before:
                refs.append(before[-1])
            for ref in refs:
                layout = _relate(t, ref)
                if layout is not None:
                    break
        if layout is None:
            layout, call.guessed = ("channels_first" if t.ndim >= 4 else "channels_last"), True
        call.layout, call.channels = layout, _channels(t, layout)
        producer[id(t)] = call
        known.append(call)


def _input_layout(call: _Call, producer: dict[int, _Call]) -> str | None:
    if call.inp is None or (not call.inp.is_floating_point() and call.inp.ndim <= 2):
        return "flat" if call.inp is not None else None
    src = producer.get(id(call.inp))
    if src is not None and src.layout is not None:
        return src.layout
    return "flat" if call.inp.ndim <= 2 else "channels_first" if call.inp.ndim >= 4 else "channels_last"


def _resolution(t: torch.Tensor | None, layout: str | None) -> tuple[str, tuple[int, ...]] | None:
    """``(kind, extent)``: ``("spatial", (H, W))``, ``("tokens", (T,))`` or ``("flat", ())``."""
    if t is None or layout is None:
        return None
    if t.ndim <= 2 or layout == "flat":
        return ("flat", ())
    if layout == "channels_first":
        return ("spatial", tuple(t.shape[2:]))
    if t.ndim == 3:
        return ("tokens", (int(t.shape[1]),))
    return ("spatial", tuple(t.shape[1:-1]))


def _size(res: tuple[str, tuple[int, ...]]) -> int:
    return math.prod(res[1]) if res[0] != "flat" else 1


# ---- head discovery -------------------------------------------------------------------------------------------


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and (a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)))


def _innermost(calls: list[_Call]) -> list[_Call]:
    return [c for c in calls if not any(c.contains(o) for o in calls if o is not c)]


def _find_heads(trace: _Trace, model: nn.Module) -> tuple[list[_Call], str, float]:
    """The call(s) whose output is the logits, how they combine (``"single"``, ``"sum"``, ``"mean"``, or
    ``"scaled"``: one module's output times a constant, as ``head(f) * logit_scale``), and that constant (1.0
    unless ``"scaled"``)."""
    logits = trace.logits
    targets = [logits]
    try:
        alt = default_output_fn(trace.output)
        if alt is not logits and alt.shape == logits.shape:
            targets.append(alt)
    except TypeError:
        pass
    for target in targets:
        producers = [c for c in trace.calls if _same(c.out, target) and not _same(c.inp, target)]
        producers = _innermost(producers)
        if producers:
            return [max(producers, key=lambda c: c.end)], "single", 1.0
    shaped = [c for c in trace.calls if c.out is not None and c.out.shape == logits.shape and not _same(c.inp, logits)]
    shaped = _innermost(shaped)[-8:]
    scale = float(logits.abs().max()) if logits.numel() else 1.0
    for call in reversed(shaped):  # logits = c · output of one module, c a constant (least squares, then checked)
        out = call.out.to(logits.dtype)
        norm = float((out * out).sum())
        factor = float((out * logits).sum()) / norm if norm > 0 else 0.0
        if factor != 0.0 and math.isfinite(factor) and abs(factor - 1.0) > 1e-6:
            if torch.allclose(out * factor, logits, rtol=1e-4, atol=1e-5 * max(1.0, scale)):
                return [call], "scaled", factor
    for k in (2, 3):
        for combo in itertools.combinations(shaped, k):
            if any(a.contains(b) or b.contains(a) for a, b in itertools.combinations(combo, 2)):
                continue
            total = sum((c.out.to(logits.dtype) for c in combo), torch.zeros_like(logits))
            for how, value in (("sum", total), ("mean", total / k)):
                if torch.allclose(value, logits, rtol=1e-4, atol=1e-5 * max(1.0, scale)):
                    return sorted(combo, key=lambda c: c.start), how, 1.0
    ran = sorted(trace.calls, key=lambda c: c.end)[-8:]
    listing = ", ".join(
        f"{c.name} ({type(c.module).__name__}) -> {tuple(c.out.shape) if c.out is not None else '-'}" for c in ran
    )
    has_linear = any(isinstance(m, nn.Linear) for m in model.modules())
    why = "the model has no nn.Linear and " if not has_linear else ""
    raise ValueError(
        f"{why}no module's output is the logits (shape {tuple(logits.shape)}), nor a constant multiple of one, nor a "
        "sum or mean of a few modules' "
        "outputs, so the head cannot be found (is it a function in forward, or a convolution reshaped later?). "
        f"Pass layer= a module name, e.g. 'name:input' or 'name:output'. Candidates (last modules that ran): {listing}"
    )


# ---- automatic layers -----------------------------------------------------------------------------------------


def _spec_of(call: _Call, counts: dict[str, int], layout: str) -> str:
    return str(Capture(call.name, "output", call.index if counts.get(call.name, 1) > 1 else None, layout))


def _stage_ends(trace: _Trace) -> list[tuple[tuple[str, tuple[int, ...]], list[_Call], int]]:
    """Stages from resolution drops: ``(resolution, candidate stage-end calls, time of the last drop)``."""
    by_start = sorted(trace.calls, key=lambda c: c.start)
    producer = {id(c.out): c for c in sorted(trace.calls, key=lambda c: c.end) if c.out is not None}
    outputs: dict[int, list[_Call]] = {}
    for c in trace.calls:
        if c.out is not None:
            outputs.setdefault(id(c.out), []).append(c)
    ended = sorted(trace.calls, key=lambda c: c.end)
    groups: dict[tuple[str, tuple[int, ...]], tuple[list[_Call], int]] = {}

    def add(boundary: torch.Tensor, res: tuple[str, tuple[int, ...]], before: int) -> None:
        # a stage end's layout must be known from the modules, not guessed from the rank (attention internals)
        cands = [c for c in outputs.get(id(boundary), []) if c.end < before and not c.guessed]
        if not cands or _size(res) <= 1 or res[0] == "flat":
            return
        old, _ = groups.get(res, ([], -1))
        groups[res] = (old + [c for c in cands if c not in old], before)

    for call in by_start:
        source = producer.get(id(call.inp)) if call.inp is not None else None
        in_res = _resolution(call.inp, _input_layout(call, producer))
        out_res = _resolution(call.out, call.layout)
        known = source is not None and not source.guessed and not call.guessed
        if known and in_res is not None and out_res is not None and _size(out_res) < _size(in_res):
            # a container spanning several stages (an nn.Sequential of all blocks) lowers the resolution too, but
            # its input is the start of a stage, not an end: skip it when a resolution lies strictly between
            inner = (_resolution(o.out, o.layout) for o in trace.calls if o is not call and call.contains(o))
            spans = any(r is not None and _size(out_res) < _size(r) < _size(in_res) for r in inner)
            if not spans:
                add(call.inp, in_res, call.start)  # a module that lowers the resolution (strided block, pooling)
        prev = None
        for c in ended:
            if c.end > call.start:
                break
            prev = c
        if prev is None or prev.out is None or prev.guessed or in_res is None or call.inp is prev.out:
            continue
        prev_res = _resolution(prev.out, prev.layout)
        if prev_res is not None and (in_res[0] in (prev_res[0], "flat")) and _size(in_res) < _size(prev_res):
            add(prev.out, prev_res, call.start)  # a function between two modules lowered it (F.max_pool2d, x[:, 0])
    return sorted(((res, cands, t) for res, (cands, t) in groups.items()), key=lambda item: item[2])


def _token_blocks(trace: _Trace) -> list[_Call]:
    """The longest run of sibling calls mapping tokens ``(N, T, C)`` to the same shape (transformer blocks)."""
    runs: dict[str, list[_Call]] = {}
    for c in sorted(trace.calls, key=lambda c: c.start):
        if (
            c.out is not None
            and c.inp is not None
            and c.layout in ("channels_last",)
            and c.out.ndim == 3
            and c.inp.shape == c.out.shape
            and trace.counts.get(c.name, 1) == 1
        ):
            parent = c.name.rsplit(".", 1)[0] if "." in c.name else ""
            runs.setdefault(parent, []).append(c)
    best: list[_Call] = []
    for parent, calls in runs.items():
        depth = parent.count(".") + 1 if parent else 0
        direct = [c for c in calls if c.name.count(".") == depth]
        if len(direct) > len(best):
            best = direct
    return best if len(best) >= 2 else []


def _auto_from_trace(trace: _Trace, heads: list[_Call], n_stages: int, token_pool: str) -> list[str | None]:
    groups = _stage_ends(trace)
    chosen: list[_Call] = []
    picked: list[str] = []
    if len(groups) > 1:
        producer = {id(c.out): c for c in sorted(trace.calls, key=lambda c: c.end) if c.out is not None}

        def single_resolution(c: _Call) -> bool:  # a stage end lies inside one stage: no container of stages
            return _resolution(c.inp, _input_layout(c, producer)) == _resolution(c.out, c.layout)

        def clashes(c: _Call) -> bool:
            return any(c.contains(o) or o.contains(c) or c is o for o in chosen + heads)

        for _res, cands, _ in reversed(groups[:-1]):
            if len(chosen) == n_stages:
                break
            for cand in sorted(cands, key=lambda c: (c.name.count("."), -c.end)):
                if not single_resolution(cand) or clashes(cand):
                    continue
                # name the stage by its outermost module returning this very tensor (layer2, not layer2.3)
                same = [a for a in trace.calls if a.contains(cand) and a.out is cand.out and not clashes(a)]
                best = min(same, key=lambda a: a.start) if same else cand
                chosen.append(best)
                picked.append(_spec_of(best, trace.counts, cand.layout or "channels_first"))
                break
        return [None, *picked]
    blocks = _token_blocks(trace)
    n = len(blocks)
    if n < 2 or n_stages < 1:
        return [None]
    indices = sorted({min(max(round(k * n / (n_stages + 1)) - 1, 0), n - 2) for k in range(1, n_stages + 1)})
    layout = "cls" if token_pool == "cls" else "channels_last"
    return [None, *(_spec_of(blocks[i], trace.counts, layout) for i in reversed(indices))]


def auto_layers(
    model: nn.Module,
    example: Any,
    n_stages: int = 2,
    *,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    token_pool: Literal["mean", "cls"] = "mean",
) -> list[str | None]:
    """``[None, …]``: the head's input plus ``n_stages`` earlier feature layers, found by one probe forward pass
    on ``example`` (a small batch; a tensor, a mapping of keyword arguments or :class:`ModelInputs`).

    Convolutional and channels-last models (ResNet, ConvNeXt, Swin, ...): a stage is a stretch of the forward
    pass at one spatial resolution; its end is the shallowest module whose output is the tensor fed to the
    next resolution drop (a strided block, a pooling, a patch merging) — e.g. ``layer3`` and ``layer2`` of a
    ResNet, ``stages.2`` and ``stages.1`` of a ConvNeXt. The last stage (which feeds the head) is left out, so
    are stages of extent 1, and no module is chosen together with its container or the head's. Every layer
    is returned with its layout (``"layer3:output#channels_first"``), so each block's width is a channel count.

    Token models (ViT, DeiT, BERT): the outputs of ``n_stages`` evenly spaced transformer blocks (the longest
    run of sibling modules mapping ``(N, T, C)`` to the same shape, the last one excluded), pooled by the mean
    token (``token_pool="mean"``, the default) or the first (``"cls"``). MLPs get ``[None]``.

    The model's mode is left as it was. The choice depends on the architecture, not on the input size, as long
    as no stage shrinks to 1×1.
    """
    trace = _probe(model, _head_rows(example), output_fn or default_output_fn)
    heads, _, _ = _find_heads(trace, model)
    return _auto_from_trace(trace, heads, n_stages, token_pool)


# ---- FeatureHook ----------------------------------------------------------------------------------------------


@dataclass
class _Block:
    spec: str | None  # as resolved (None = the head's input)
    captures: list[Capture]  # concrete: call set when the module runs more than once, layout set
    shapes: list[tuple[int, ...]] = field(default_factory=list)


class FeatureHook:
    """Capture features (and the logits) from any ``nn.Module`` classifier without editing it.

    By default the hook captures the **input of the classifier's head**, found on the first call by watching
    the forward pass (the module whose output is the logits; several averaged or summed heads are
    concatenated). ``layer=`` takes the specifications described in :mod:`featurefail.hooks` (``"name"``,
    ``"name:input"``, ``"name:output@1"``, ``"name#channels_last"``, a module of ``model``, ``None``, a list of
    these, or ``"auto"``). Every block is pooled to ``(N, D_l)`` by its layout and the blocks are concatenated
    in the listed order into ``(N, D_1 + … + D_L)``.

    Use it as a context manager (hooks are removed on exit, also when an exception escapes)::

        with FeatureHook(model) as hook:
            feats, logits = hook(x)          # (N, D), (N, C)

    The model runs in eval mode during each hooked forward pass, and every submodule's mode is restored right
    after; hooked passes of one model are serialised by a lock shared by all hooks on it, so two hooks (or
    detectors) on the same model may be used from several threads.

    Args:
        model: the classifier.
        layer: see above; ``"auto"`` = :func:`auto_layers` on the first batch.
        pool: ``"avg"`` (default, by layout), ``"flatten"`` or ``None``.
        output_fn: maps the model's output to logits ``(N, C)``; default handles tensors, tuples, dicts and
            objects with ``.logits``.
        capture_input: for named modules without ``:input``/``:output``: capture the input (True) or the
            output (False, the default).
        n_stages, token_pool: passed to :func:`auto_layers` for ``layer="auto"``.

    Attributes (after the first call):
        resolved_layers: one spec per block, with the layout recorded (``None`` = the head's input).
        heads: dotted names of the head module(s); head_combine: ``"single"``, ``"sum"``, ``"mean"`` or
            ``"scaled"`` (one head times the constant ``head_scale``).
        layer_names: one name per block (heads joined by ``"+"``); layer_name: all joined by ``"+"``.
        block_sizes: ``(D_1, …, D_L)``.
        head: the head ``nn.Linear`` when the features are exactly its input, else None (see :meth:`head_linear`).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | Sequence[LayerSpec] = None,
        pool: Pool = "avg",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        capture_input: bool | None = None,
        *,
        n_stages: int = 2,
        token_pool: Literal["mean", "cls"] = "mean",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if pool not in ("avg", "flatten", None):
            raise ValueError(f"pool must be 'avg', 'flatten' or None, got {pool!r}")
        if token_pool not in ("mean", "cls"):
            raise ValueError(f"token_pool must be 'mean' or 'cls', got {token_pool!r}")
        self.model = model
        self.pool = pool
        self.output_fn = output_fn or default_output_fn
        self.n_stages = n_stages
        self.token_pool = token_pool
        named = dict(model.named_modules())
        self._auto = isinstance(layer, str) and layer == "auto" and "auto" not in named

        def key_of(v: Any) -> Any:
            return find_layer_in(named, v)[0] if isinstance(v, nn.Module) else v

        self._layer_key = _plan_key([key_of(v) for v in layer] if isinstance(layer, list | tuple) else key_of(layer))
        self._requested: list[list[Capture] | None] = []
        if not self._auto:
            specs = list(layer) if isinstance(layer, list | tuple) else [layer]
            if not specs:
                raise ValueError("layer is an empty list; name at least one layer (None = the penultimate one)")
            for spec in specs:
                self._requested.append(self._parse(spec, named, capture_input))
            keys = [None if r is None else tuple(str(c) for c in r) for r in self._requested]
            names = [None if r is None else tuple((c.name, c.side, c.call) for c in r) for r in self._requested]
            if len(set(names)) != len(names):
                raise ValueError(f"layer lists a module twice: {keys}")
        self._blocks: list[_Block] | None = None
        self.heads: list[str] = []
        self.head_combine: str | None = None
        self.head_scale = 1.0
        self._head_modules: list[nn.Module] = []
        self.resolved_layers: list[str | None] | None = None
        self.block_sizes: tuple[int, ...] | None = None
        self.layer_names: list[str] = []
        self.layer_name = "auto" if self._auto else ""
        self.head: nn.Module | None = None
        self._handles: list[Any] = []
        self._active = False
        self._armed: int | None = None
        self._counts: dict[str, int] = {}
        self._captured: dict[tuple[str, int], tuple] = {}

    @staticmethod
    def _parse(spec: Any, named: dict[str, nn.Module], capture_input: bool | None) -> list[Capture] | None:
        if spec is None:
            return None
        if isinstance(spec, nn.Module):
            name, _ = find_layer_in(named, spec)
            return [Capture(name, "input" if capture_input else "output")]
        if not isinstance(spec, str):
            raise TypeError(f"layer must be None, a module name or an nn.Module, got {type(spec).__name__}")
        if spec in named and spec:
            return [Capture(spec, "input" if capture_input else "output")]
        explicit = ":" in spec
        captures = parse_layer(spec)
        out = []
        for c in captures:
            if c.name not in named:
                find_layer_in(named, c.name)
            side = c.side if explicit or capture_input is None else ("input" if capture_input else "output")
            out.append(Capture(c.name, side, c.call, c.layout))  # type: ignore[arg-type]
        return out

    # ---- resolution -------------------------------------------------------------------------------------------

    @property
    def resolved(self) -> bool:
        """True once the first batch has fixed the head, the layers and their layouts."""
        return self._blocks is not None

    @property
    def multi_layer(self) -> bool:
        """True when more than one block is captured."""
        return self._blocks is not None and len(self._blocks) > 1 if self.resolved else len(self._requested) > 1

    def _resolve(self, x: Any) -> _Trace:
        trace = _probe(self.model, _head_rows(x), self.output_fn)
        need_head = self._auto or any(r is None for r in self._requested)
        heads: list[_Call] = []
        if need_head:
            heads, self.head_combine, self.head_scale = _find_heads(trace, self.model)
        else:
            try:
                heads, self.head_combine, self.head_scale = _find_heads(trace, self.model)
            except ValueError:
                heads, self.head_combine, self.head_scale = [], None, 1.0
        self.heads = [h.name if trace.counts.get(h.name, 1) == 1 else f"{h.name}@{h.index}" for h in heads]
        self._head_modules = [h.module for h in heads]
        requested = self._requested
        if self._auto:
            specs = _auto_from_trace(trace, heads, self.n_stages, self.token_pool)
            requested = [None if s is None else parse_layer(s) for s in specs]
        blocks = []
        for req in requested:
            if req is None:
                caps = [Capture(h.name, "input", h.index if trace.counts.get(h.name, 1) > 1 else None) for h in heads]
                blocks.append(_Block(None, self._concrete(caps, trace)))
            else:
                caps = self._concrete(req, trace)
                blocks.append(_Block("+".join(str(c) for c in caps), caps))
        for block in blocks:
            block.shapes = [self._shape_of(c, trace) for c in block.captures]
        self._blocks = blocks
        self.resolved_layers = [b.spec for b in blocks]
        self.layer_names = [
            "+".join(self.heads) if b.spec is None else "+".join(c.name for c in b.captures) for b in blocks
        ]
        self.layer_name = "+".join(self.layer_names)
        single = len(blocks) == 1 and blocks[0].spec is None and len(heads) == 1
        self.head = heads[0].module if single and isinstance(heads[0].module, nn.Linear) else None
        _remember_plan(self.model, self._plan_keys(), _Plan(blocks, list(self.heads), self.head_combine,
                       list(self._head_modules), self.output_fn, self.head_scale))  # fmt: skip
        return trace

    def _adopt(self) -> bool:
        """Take the plan a hook with the same settings resolved on this model (no probe pass); False if none."""
        with _plans_lock:
            plan = _plans.get(self.model, {}).get(self._plan_keys()[0])
        if plan is None or plan.output_fn is not self.output_fn:
            return False
        self._blocks, self.heads, self.head_combine = plan.blocks, list(plan.heads), plan.how
        self.head_scale = plan.scale
        self._head_modules = list(plan.head_modules)
        self.resolved_layers = [b.spec for b in plan.blocks]
        self.layer_names = [
            "+".join(self.heads) if b.spec is None else "+".join(c.name for c in b.captures) for b in plan.blocks
        ]
        self.layer_name = "+".join(self.layer_names)
        single = len(plan.blocks) == 1 and plan.blocks[0].spec is None and len(self._head_modules) == 1
        head = self._head_modules[0] if single else None
        self.head = head if isinstance(head, nn.Linear) else None
        return True

    def _plan_keys(self) -> list[tuple]:
        settings = (self.n_stages, self.token_pool) if self._auto else ()
        return [(*self._layer_key, *settings), _plan_key(self.resolved_layers)]

    def _concrete(self, caps: list[Capture], trace: _Trace) -> list[Capture]:
        out = []
        for c in caps:
            runs = trace.counts.get(c.name, 0)
            if runs == 0:
                raise ValueError(f"the module {c.name!r} did not run during the forward pass; pick a module that runs")
            if c.call is None and runs > 1:
                raise ValueError(
                    f"the module {c.name!r} runs {runs} times in one forward pass; pick the call with "
                    f"'{c.name}:{c.side}@k', k in 0..{runs - 1}"
                )
            if c.call is not None and c.call >= runs:
                raise ValueError(f"the module {c.name!r} runs {runs} time(s); call @{c.call} does not exist")
            index = c.call if c.call is not None else 0
            call = next(k for k in trace.calls if k.name == c.name and k.index == index)
            t = call.inp if c.side == "input" else call.out
            if t is None:
                raise TypeError(f"the {c.side} of module {c.name!r} holds no tensor; hook another layer")
            layout = c.layout
            if layout is None:
                if c.side == "output":
                    layout = call.layout or "flat"
                else:
                    producer = {id(k.out): k for k in trace.calls if k.out is not None}
                    layout = _input_layout(call, producer) or "flat"
            out.append(Capture(c.name, c.side, c.call if runs > 1 else None, layout))
        return out

    @staticmethod
    def _shape_of(c: Capture, trace: _Trace) -> tuple[int, ...]:
        call = next(k for k in trace.calls if k.name == c.name and k.index == (c.call or 0))
        t = call.inp if c.side == "input" else call.out
        return tuple(t.shape[1:]) if t is not None else ()

    def head_linear(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The head as one linear map on the head's input block: ``(weight (C, D), bias (C,))``, or None.

        One ``nn.Linear`` head gives its weight and bias; several heads whose outputs are summed give
        ``[W_1 … W_k]`` and ``Σ b_i``, averaged ones ``[W_1 … W_k] / k`` and ``Σ b_i / k``, one whose output is
        multiplied by a constant ``c`` (``"scaled"``) ``c·W`` and ``c·b`` (``D`` = the sum of
        the heads' input widths, in call order, as captured). None before the first call, when a head is not an
        ``nn.Linear``, or when no block is the head's input.
        """
        if not self.resolved or not self._head_modules or not any(b.spec is None for b in self._blocks or []):
            return None
        if not all(isinstance(m, nn.Linear) for m in self._head_modules):
            return None
        k = len(self._head_modules)
        scale = (1.0 / k if self.head_combine == "mean" else 1.0) * self.head_scale
        weight = torch.cat([m.weight.detach() for m in self._head_modules], dim=1) * scale
        bias = sum(
            (m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, device=m.weight.device))
            for m in self._head_modules
        )
        return weight.float().cpu().clone(), (bias * scale).float().cpu().clone()

    # ---- running ----------------------------------------------------------------------------------------------

    def _register(self) -> None:
        assert self._blocks is not None
        named = dict(self.model.named_modules())
        wanted: dict[str, set[int]] = {}
        for block in self._blocks:
            for c in block.captures:
                wanted.setdefault(c.name, set()).add(c.call or 0)
        for name in wanted:
            module = named.get(name)
            if module is None:
                raise ValueError(f"the module {name!r} is no longer part of the model")
            self._handles.append(module.register_forward_hook(self._callback(name), with_kwargs=True))

    def _callback(self, name: str) -> Callable:
        key = name

        def on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._armed != threading.get_ident():
                return  # another hook's (or the user's) forward pass
            index = self._counts.get(key, 0)
            self._counts[key] = index + 1
            self._captured[(key, index)] = (args, kwargs, output)

        return on_forward

    def __enter__(self) -> FeatureHook:
        if self._active:
            raise RuntimeError("this FeatureHook is already active")
        self._active = True
        if self.resolved:
            self._register()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False
        self._captured = {}

    def __call__(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model on a batch (a tensor, a mapping of keyword arguments or :class:`ModelInputs`):
        returns features ``(N, D)`` and logits ``(N, C)``."""
        if not self._active:
            raise RuntimeError("use FeatureHook inside a `with` block (or call __enter__ first)")
        with model_lock(self.model):
            if not self.resolved:
                if not self._adopt():
                    self._resolve(x)
                self._register()
            self._counts, self._captured = {}, {}
            self._armed = threading.get_ident()
            try:
                with eval_mode(self.model):
                    try:
                        output = call_model(self.model, x)
                    except Exception as exc:
                        _forward_note(exc, x)
                        raise
            finally:
                self._armed = None
                captured, self._captured, self._counts = self._captured, {}, {}
        logits = self.output_fn(output)
        _check_logits(logits, x)
        blocks = []
        assert self._blocks is not None
        for block in self._blocks:
            parts = []
            for c in block.captures:
                got = captured.get((c.name, c.call or 0))
                if got is None:
                    raise RuntimeError(f"the hooked module {c.name!r} did not run during the forward pass")
                args, kwargs, output_value = got
                t = first_tensor((args, kwargs)) if c.side == "input" else first_tensor(output_value)
                if t is None:
                    raise TypeError(f"the hooked module {c.name!r} gave no tensor; hook another layer")
                parts.append(pool_features(t, self.pool, c.layout))
            blocks.append(parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].dtype) for p in parts], dim=1))
        self.block_sizes = tuple(b.shape[1] for b in blocks)
        feats = blocks[0] if len(blocks) == 1 else torch.cat([b.to(blocks[0].dtype) for b in blocks], dim=1)
        return feats, logits


def find_layer_in(named: dict[str, nn.Module], layer: str | nn.Module) -> tuple[str, nn.Module]:
    """:func:`find_layer` on a precomputed ``dict(model.named_modules())``."""
    if isinstance(layer, str):
        if layer not in named or not layer:
            close = [n for n in named if n and (layer in n or n in layer)][:8]
            hint = f"; did you mean one of: {', '.join(close)}" if close else ""
            raise ValueError(f"the model has no module named {layer!r}{hint}")
        return layer, named[layer]
    for name, m in named.items():
        if m is layer and name:
            return name, m
    raise ValueError("the given layer module is not part of the model")


# ---- resolved plans, for deployment ---------------------------------------------------------------------------

_plans_lock = threading.Lock()


@dataclass
class _Plan:
    blocks: list[_Block]
    heads: list[str]
    how: str | None
    head_modules: list[nn.Module]
    output_fn: Callable[[Any], torch.Tensor]
    scale: float = 1.0


_plans: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _Plan]] = weakref.WeakKeyDictionary()


def _plan_key(layer: Any) -> tuple:
    if isinstance(layer, list | tuple):
        return ("list", *[None if v is None else str(v) for v in layer])
    return ("one", None if layer is None else str(layer))


def _remember_plan(model: nn.Module, keys: list[tuple], plan: _Plan) -> None:
    with _plans_lock:
        store = _plans.setdefault(model, {})
        for key in keys:
            store[key] = plan


def resolved_captures(
    model: nn.Module,
    layer: Any,
    example: Any = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
) -> list[list[Capture]]:
    """The concrete captures of every block of ``layer`` on ``model``: from ``example`` (one probe forward
    pass) when given, else from the last :class:`FeatureHook` that resolved the same ``layer`` on this model.

    Raises:
        ValueError: when neither is available.
    """
    if example is not None:
        hook = FeatureHook(model, layer=layer, output_fn=output_fn)
        hook._resolve(example)
        assert hook._blocks is not None
        return [b.captures for b in hook._blocks]
    specs = list(layer) if isinstance(layer, list | tuple) else [layer]
    if all(isinstance(s, str) and s != "auto" and "#" in s for s in specs):
        return [parse_layer(s) for s in specs]  # fully resolved specs need no forward pass
    with _plans_lock:
        found = _plans.get(model, {}).get(_plan_key(layer))
    if found is None and layer == "auto":
        with _plans_lock:
            found = _plans.get(model, {}).get(("one", "auto", 2, "mean"))
    if found is not None:
        return [b.captures for b in found.blocks]
    heads = _static_heads(model)
    if heads is None:
        raise ValueError(
            "the hooked layers of this model are not resolved yet (the head and layouts are found by a forward "
            "pass): score one batch first, or pass example= a small input batch"
        )
    blocks = []
    for spec in specs:
        if spec is None:
            blocks.append([Capture(name, "input", None, "flat") for name in heads])
        elif isinstance(spec, str) and spec != "auto" and "#" in spec:
            blocks.append(parse_layer(spec))
        else:
            raise ValueError(
                f"layer {spec!r} has no recorded layout and this model has not been run with it yet: score one "
                "batch first, or pass example= a small input batch"
            )
    return blocks


def _static_heads(model: nn.Module) -> list[str] | None:
    """The head(s) read off the ``torch.fx`` graph without running the model: the ``nn.Linear`` whose result
    is returned (or the summed/averaged results of a few). None when the model cannot be traced or the
    logits are not such a result."""
    import torch.fx

    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception:
        return None
    named = dict(model.named_modules())
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    while isinstance(out, tuple | list) and out:
        out = out[0]

    def linear_calls(node: Any, depth: int = 0) -> list[str] | None:
        if not isinstance(node, torch.fx.Node) or depth > 3:
            return None
        if node.op == "call_module" and isinstance(named.get(str(node.target)), nn.Linear):
            return [str(node.target)]
        if node.op == "call_function" and node.target in (operator.add, operator.truediv, torch.add):
            found: list[str] = []
            for arg in node.args:
                if isinstance(arg, int | float):
                    continue
                sub = linear_calls(arg, depth + 1)
                if sub is None:
                    return None
                found += sub
            return found or None
        return None

    names = linear_calls(out)
    if names is None or len(names) != len(set(names)):
        return None
    if len(names) > 1:
        return None  # the sum/mean weights are known only from a forward pass
    return names


# ---- describe -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HookedBlock:
    """One feature block: its spec, the captured module(s), side, layout, raw shape (without N) and width."""

    spec: str | None
    modules: tuple[str, ...]
    side: str
    layout: str
    shape: tuple[tuple[int, ...], ...]
    width: int


@dataclass(frozen=True)
class HookPlan:
    """What a :class:`FeatureHook` with a given ``layer=`` captures on a model (see :func:`describe`)."""

    heads: tuple[str, ...]
    head_combine: str | None
    n_classes: int
    layers: tuple[str | None, ...]
    blocks: tuple[HookedBlock, ...]

    @property
    def widths(self) -> tuple[int, ...]:
        """``(D_1, …, D_L)``."""
        return tuple(b.width for b in self.blocks)

    def __str__(self) -> str:
        how = (
            ""
            if self.head_combine in (None, "single")
            else " (its output times a constant)"
            if self.head_combine == "scaled"
            else f" ({self.head_combine} of {len(self.heads)} heads)"
        )
        lines = [
            f"head: {' + '.join(self.heads) or '(none found)'}{how}, {self.n_classes} classes",
            f"features: {sum(self.widths)} dims in {len(self.blocks)} block(s)",
            "",
            "| block | module(s) | side | layout | activation (without N) | width |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for i, b in enumerate(self.blocks):
            label = "head input" if b.spec is None else b.spec
            shapes = ", ".join(str(s) for s in b.shape)
            lines.append(f"| {i} {label} | {', '.join(b.modules)} | {b.side} | {b.layout} | {shapes} | {b.width} |")
        return "\n".join(lines)


def describe(
    model: nn.Module,
    example: Any,
    layer: Any = "auto",
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    pool: Pool = "avg",
    **kwargs: Any,
) -> HookPlan:
    """What ``FeatureHook(model, layer)`` would capture, from one forward pass on ``example`` (a small batch):
    the head(s), every block's module(s), capture side, layout, activation shape and width. The model's
    state is left as it was. ``str(plan)`` is a Markdown table."""
    with FeatureHook(model, layer=layer, output_fn=output_fn, pool=pool, **kwargs) as hook:
        _, logits = hook(_head_rows(example))
    assert hook._blocks is not None and hook.block_sizes is not None
    blocks = tuple(
        HookedBlock(
            spec=b.spec,
            modules=tuple(c.name if c.call is None else f"{c.name}@{c.call}" for c in b.captures),
            side="+".join(sorted({c.side for c in b.captures})),
            layout="+".join(sorted({c.layout or "" for c in b.captures})),
            shape=tuple(b.shapes),
            width=int(width),
        )
        for b, width in zip(hook._blocks, hook.block_sizes, strict=True)
    )
    return HookPlan(
        tuple(hook.heads), hook.head_combine, int(logits.shape[1]), tuple(hook.resolved_layers or ()), blocks
    )
