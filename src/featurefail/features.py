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
from .hooks import FeatureHook

__all__ = ["Features", "extract_features", "split_batch"]

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


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels or None)`` from a batch given as ``x``, ``(x,)``, ``(x, y, ...)`` or a mapping."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        if x is None:
            raise ValueError(f"a batch mapping needs one of the keys {_INPUT_KEYS}; pass batch_fn= for others")
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        return x, (torch.as_tensor(y) if y is not None else None)
    if isinstance(batch, list | tuple):
        if len(batch) == 0:
            raise ValueError("empty batch")
        y = batch[1] if len(batch) > 1 else None
        return batch[0], (torch.as_tensor(y) if y is not None else None)
    raise TypeError(f"cannot read a batch of type {type(batch).__name__}; pass batch_fn=")


def extract_features(
    model: nn.Module,
    loader: Iterable,
    hook: FeatureHook | None = None,
    *,
    layer: Any = None,
    pool: Any = "avg",
    device: str | torch.device | None = None,
    batch_fn: Callable[[Any], tuple[Any, Any]] | None = None,
    keep_inputs: bool = False,
    memmap_path: str | Path | None = None,
    progress_bar: bool = True,
) -> Features:
    """Run ``model`` over ``loader`` under ``torch.inference_mode`` and collect features, logits and labels.

    Args:
        model: the classifier (left unmodified; its training mode is restored afterwards).
        loader: an iterable of batches ``x``, ``(x,)``, ``(x, y)`` or mappings; ``batch_fn(batch)`` may map
            other shapes to ``(x, y)``. Under ``torch.distributed`` with a ``DistributedSampler`` each rank
            extracts its own shard (the sampler pads shards to equal length).
        hook: a :class:`FeatureHook` (made from ``layer`` and ``pool`` when None).
        device: where the model runs; default: the device of the model's first parameter (CPU if none).
        keep_inputs: also keep the inputs (float32, CPU), for input-space scorers.
        memmap_path: write features to this ``.npy`` file as a memory map instead of RAM (needs
            ``len(loader.dataset)``), for sets larger than memory.
        progress_bar: show a tqdm bar on a terminal.

    Returns:
        :class:`Features` with ``feats (N, D)`` float32 on the CPU.

    Raises:
        ValueError: when the loader yields nothing.
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
            x, y = batch_fn(batch) if batch_fn is not None else split_batch(batch)
            if isinstance(x, torch.Tensor):
                x = x.to(device)
            f, lg = hook(x)
            f = f.float().cpu()
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
                inputs.append(torch.as_tensor(x).float().cpu())
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
