"""Features: what every scorer consumes, and the one extraction path that produces them."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._tensor import progress
from .hooks import FeatureHook, ModelInputs, batch_rows, map_tensors

__all__ = ["Features", "extract_features", "from_batch_fn", "is_xy_batch", "iter_batches", "n_rows", "split_batch"]

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
_LABEL_KEYS = ("y", "label", "labels", "target", "targets")


@dataclass(frozen=True)
class Features:
    """Penultimate features of a set of inputs, with the model's logits and (optional) labels.

    Attributes:
        feats: ``(N, D)`` float32 features (CPU, possibly memory-mapped).
        logits: ``(N, C)`` float32 logits, or None.
        labels: ``(N,)`` int64 labels, or None (never needed to fit the class-agnostic GMM).
        inputs: ``(N, ...)`` float32 inputs, kept only for scorers that model the input space.
        blocks: for features of several layers, the widths ``(D_1, …, D_L)`` of the consecutive column blocks
            (one per layer, summing to ``D``); None for one layer.
    """

    feats: torch.Tensor
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    blocks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.feats.ndim != 2:
            raise ValueError(f"feats must be (N, D), got shape {tuple(self.feats.shape)}")
        n = self.feats.shape[0]
        for name in ("logits", "labels", "inputs"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"{name} has {value.shape[0]} rows but feats has {n}")
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
            if any(b <= 0 for b in self.blocks) or sum(self.blocks) != self.feats.shape[1]:
                raise ValueError(f"blocks {self.blocks} must be positive widths summing to D={self.feats.shape[1]}")

    def __len__(self) -> int:
        return self.feats.shape[0]

    @property
    def predictions(self) -> torch.Tensor:
        """``(N,)`` predicted classes ``argmax logits``."""
        if self.logits is None:
            raise ValueError("these features carry no logits")
        return self.logits.argmax(dim=1)

    @property
    def correct(self) -> torch.Tensor:
        """``(N,)`` bool, True where the prediction equals the label."""
        if self.labels is None:
            raise ValueError("these features carry no labels; pass a loader that yields (x, y)")
        return self.predictions == self.labels

    def subset(self, index: torch.Tensor | np.ndarray | slice) -> Features:
        """The rows selected by ``index`` (a bool mask, integer indices or a slice)."""
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return Features(take(self.feats), take(self.logits), take(self.labels), take(self.inputs), self.blocks)

    def block_slices(self) -> list[slice]:
        """The column slice of every layer block (one slice covering all of ``D`` for single-layer features)."""
        sizes = self.blocks or (self.feats.shape[1],)
        starts = np.cumsum((0, *sizes))
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(starts)]

    def select_blocks(self, indices: int | list[int]) -> Features:
        """Features of the chosen layer blocks only (a contiguous copy; logits, labels and inputs shared)."""
        wanted = [indices] if isinstance(indices, int) else list(indices)
        slices = self.block_slices()
        for i in wanted:
            if not -len(slices) <= i < len(slices):
                raise IndexError(f"block {i} does not exist; these features have {len(slices)} block(s)")
        feats = torch.cat([self.feats[:, slices[i]] for i in wanted], dim=1).contiguous()
        sizes = tuple(slices[i].stop - slices[i].start for i in wanted)
        return Features(feats, self.logits, self.labels, self.inputs, sizes if len(sizes) > 1 else None)

    @classmethod
    def from_tensors(cls, feats: Any, logits: Any = None, labels: Any = None) -> Features:
        """Wrap precomputed arrays or tensors (float32 features/logits, int64 labels)."""

        def tensor(v: Any, dtype: torch.dtype) -> torch.Tensor | None:
            return (
                None
                if v is None
                else torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v, dtype=dtype)
            )

        f = tensor(feats, torch.float32)
        assert f is not None
        return cls(f, tensor(logits, torch.float32), tensor(labels, torch.int64))


def _labels(y: Any) -> torch.Tensor | None:
    return None if y is None else torch.as_tensor(y)


def split_batch(batch: Any, label_key: str | None = None) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels or None)`` from one batch.

    Accepted batches: a tensor ``x``; ``(x,)``, ``(x, y, ...)``; a mapping with an input key
    (``x``, ``input``, ``inputs``, ``image``, ``images``, ``pixel_values``: that value is the input, a label key
    ``y``/``label``/``labels``/``target``/``targets`` the labels); any other mapping is the model's **keyword
    arguments** (``input_ids``, ``attention_mask``, ...): the label entry (``label_key``, default the first of
    the label keys present) is removed and returned as the labels, the rest is passed as ``model(**kwargs)``;
    :class:`~featurefail.hooks.ModelInputs` (``model(*args, **kwargs)``).
    """
    if isinstance(batch, torch.Tensor | ModelInputs):
        return batch, None
    if isinstance(batch, Mapping):
        keys = (label_key,) if label_key is not None else _LABEL_KEYS
        found = next((k for k in keys if k in batch), None)
        y = batch[found] if found is not None else None
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        if x is None:
            x = {k: v for k, v in batch.items() if k != found}
            if not x:
                raise ValueError(f"a batch mapping holds only labels ({found!r}); it needs the model's inputs")
        return x, _labels(y)
    if isinstance(batch, list | tuple):
        if len(batch) == 0:
            raise ValueError("empty batch")
        y = batch[1] if len(batch) > 1 else None
        return batch[0], _labels(y)
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}; pass batch_fn=")


def from_batch_fn(result: Any, label_key: str | None = None) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` from what a ``batch_fn`` returned: ``x`` alone, a mapping (as :func:`split_batch`),
    ``(inputs, labels)``, ``(args, kwargs)`` (a tuple/list and a mapping: ``model(*args, **kwargs)``, no labels),
    ``((args, kwargs), labels)`` or :class:`~featurefail.hooks.ModelInputs`.

    Raises:
        TypeError: for anything else.
    """
    if isinstance(result, torch.Tensor | ModelInputs | Mapping):
        return split_batch(result, label_key)
    if isinstance(result, tuple | list):
        if len(result) == 2 and isinstance(result[0], tuple | list) and isinstance(result[1], Mapping):
            return ModelInputs(tuple(result[0]), dict(result[1])), None
        if len(result) == 1:
            return result[0], None
        if len(result) == 2:
            inputs, labels = result
            if isinstance(inputs, tuple | list) and len(inputs) == 2 and isinstance(inputs[1], Mapping):
                inputs = ModelInputs(tuple(inputs[0]), dict(inputs[1]))
            return inputs, _labels(labels)
    raise TypeError(
        "batch_fn must return x, (x, y), a mapping of model keyword arguments, (args, kwargs) or "
        f"((args, kwargs), y); got {type(result).__name__}"
        + (f" of length {len(result)}" if isinstance(result, tuple | list) else "")
    )


def n_rows(x: Any) -> int | None:
    """Rows of a tensor batch or of a mapping batch (its first tensor); None for an iterable of batches."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.ndim > 0 else None
    if isinstance(x, Mapping | ModelInputs):
        return batch_rows(x)
    if is_xy_batch(x):
        return int(x[0].shape[0])
    return None


def is_xy_batch(x: Any) -> bool:
    """True for one ``(x, y)`` batch as ``next(iter(loader))`` gives it — a tuple or list of an input tensor
    ``(N, ...)`` and one integer label per row ``(N,)`` — rather than a list of two batches. Two 1-D integer
    tensors (a model on integer IDs ``(N,)``) stay two batches."""
    return (
        isinstance(x, tuple | list)
        and len(x) == 2
        and all(isinstance(t, torch.Tensor) for t in x)
        and (x[0].ndim >= 2 or (x[0].ndim == 1 and (x[0].is_floating_point() or x[0].is_complex())))
        and x[1].ndim == 1
        and not (x[1].is_floating_point() or x[1].is_complex())
        and x[1].shape[0] == x[0].shape[0]
    )


def iter_batches(x: Any, batch_size: int) -> Iterable:
    """Batches for :func:`extract_features` from what ``score()``/``detect()`` receive.

    A tensor ``(N, ...)`` is split into chunks of ``batch_size`` rows; a mapping batch (keyword arguments, possibly
    with labels) or :class:`~featurefail.hooks.ModelInputs` has every tensor whose first axis is ``N`` split alike
    (other values repeated in every chunk); one ``(x, y)`` batch (:func:`is_xy_batch`) has both split alike; anything
    else is taken as an iterable of batches (a DataLoader, a list) and returned as it is. An empty tensor or mapping
    gives no batch (check :func:`n_rows` first to return an empty result).

    Raises:
        TypeError: for a value that is neither a batch nor an iterable (a string, a number).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            raise ValueError("a 0-d tensor is not a batch; inputs need a batch dimension (N, ...)")
        return [(chunk,) for chunk in torch.split(x, batch_size)] if x.shape[0] else []
    if isinstance(x, Mapping | ModelInputs):
        rows = batch_rows(x)
        if rows is None:
            raise ValueError("a mapping batch needs at least one tensor with a batch dimension")
        if rows == 0:
            return []

        def chunk(start: int) -> Any:
            return map_tensors(x, lambda t: t[start : start + batch_size] if t.ndim and t.shape[0] == rows else t)

        return [chunk(start) for start in range(0, rows, batch_size)]
    if is_xy_batch(x):
        return list(zip(torch.split(x[0], batch_size), torch.split(x[1], batch_size), strict=True))
    if isinstance(x, str | bytes | int | float) or not isinstance(x, Iterable):
        raise TypeError(f"cannot score a {type(x).__name__}: pass a tensor, a batch mapping or an iterable of batches")
    return x


def _keep(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError("this scorer models the inputs, so they must be one tensor per batch, not keyword arguments")
    return x.float().cpu()


def extract_features(
    model: nn.Module,
    loader: Iterable,
    hook: FeatureHook | None = None,
    *,
    layer: Any = None,
    pool: Any = "avg",
    device: str | torch.device | None = None,
    batch_fn: Callable[[Any], Any] | None = None,
    label_key: str | None = None,
    keep_inputs: bool = False,
    memmap_path: str | Path | None = None,
    progress_bar: bool = True,
) -> Features:
    """Run ``model`` over ``loader`` under ``torch.inference_mode`` and collect features, logits and labels.

    Args:
        model: the classifier (left unmodified; it runs in eval mode during each pass, then every submodule's
            mode is restored).
        loader: an iterable of batches: ``x``, ``(x,)``, ``(x, y)``, mappings (image-style keys, or the
            model's keyword arguments such as ``input_ids``/``attention_mask`` with a ``labels`` entry; see
            :func:`split_batch`). ``batch_fn(batch)`` may map other shapes to ``x``, ``(x, y)``, a mapping,
            ``(args, kwargs)`` or ``((args, kwargs), y)`` (:func:`from_batch_fn`). Under
            ``torch.distributed`` with a ``DistributedSampler`` each rank extracts its own shard.
        hook: a :class:`FeatureHook` (made from ``layer`` and ``pool`` when None).
        device: where the model runs; default: the device of the model's first parameter (CPU if none).
        label_key: the label entry of mapping batches (default: the first of ``y``, ``label``, ``labels``,
            ``target``, ``targets`` present).
        keep_inputs: also keep the inputs (float32, CPU), for input-space scorers (tensor inputs only).
        memmap_path: write features to this ``.npy`` file as a memory map instead of RAM (needs
            ``len(loader.dataset)``), for sets larger than memory.
        progress_bar: show a tqdm bar on a terminal.

    Returns:
        :class:`Features` with ``feats (N, D)`` float32 on the CPU.

    Raises:
        ValueError: when the loader yields no sample (use :func:`n_rows` to handle an empty input first).
    """
    hook = hook or FeatureHook(model, layer=layer, pool=pool)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    total = len(loader) if hasattr(loader, "__len__") else None
    feats: list[torch.Tensor] = []
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []
    mm: np.ndarray | None = None
    offset = 0
    saw_labels: bool | None = None
    with hook, torch.inference_mode():
        for batch in progress(loader, enabled=progress_bar, desc="extracting features", total=total):
            x, y = from_batch_fn(batch_fn(batch), label_key) if batch_fn is not None else split_batch(batch, label_key)
            if n_rows(x) == 0:
                continue
            x = map_tensors(x, lambda t: t.to(device))
            f, lg = hook(x)
            f = f.float().cpu()
            if y is not None and torch.as_tensor(y).reshape(-1).shape[0] != f.shape[0]:
                raise ValueError(f"a batch has {f.shape[0]} inputs but {torch.as_tensor(y).numel()} labels")
            if memmap_path is not None:
                if mm is None:
                    n_total = len(loader.dataset)  # type: ignore[attr-defined]
                    mm = np.lib.format.open_memmap(
                        str(memmap_path), mode="w+", dtype=np.float32, shape=(n_total, f.shape[1])
                    )
                mm[offset : offset + f.shape[0]] = f.numpy()
            else:
                feats.append(f)
            offset += f.shape[0]
            logits.append(lg.float().cpu())
            if saw_labels is None:
                saw_labels = y is not None
            if (y is not None) != saw_labels:
                raise ValueError("some batches carry labels and others do not")
            if y is not None:
                labels.append(torch.as_tensor(y).long().cpu().reshape(-1))
            if keep_inputs:
                inputs.append(_keep(x))
    if offset == 0:
        raise ValueError("the loader yielded no samples")
    if mm is not None:
        mm.flush()
        feat_tensor = torch.from_numpy(mm[:offset])
    else:
        feat_tensor = torch.cat(feats)
    return Features(
        feats=feat_tensor,
        logits=torch.cat(logits),
        labels=torch.cat(labels) if labels else None,
        inputs=torch.cat(inputs) if keep_inputs else None,
        blocks=hook.block_sizes if hook.multi_layer else None,
    )
