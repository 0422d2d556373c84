"""Out-of-distribution input sources: noise matched to the training data, and images from .npz files."""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DatasetImages", "ImageFolder", "NpzImages", "gaussian_noise", "load_images", "uniform_noise"]


def gaussian_noise(reference: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images of Gaussian noise with the per-channel mean and std of ``reference``, clipped to [0, 1].

    Args:
        reference: ``(N, C, H, W)`` (or ``(N, ...)``) in-distribution inputs in [0, 1].
        n: number of samples.

    Returns:
        ``(n, *reference.shape[1:])`` float32 tensor.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if reference.ndim < 2 or reference.shape[0] == 0:
        raise ValueError(f"reference must be a non-empty batch (N, ...), got shape {tuple(reference.shape)}")
    ref = reference.float()
    dims = [0, *range(2, ref.ndim)] if ref.ndim > 2 else [0]
    mean = ref.mean(dim=dims, keepdim=True)[0]
    std = ref.std(dim=dims, keepdim=True)[0]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *ref.shape[1:]), generator=g) * std + mean
    return noise.clamp_(0.0, 1.0)


def uniform_noise(shape: tuple[int, ...], n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images of uniform noise in [0, 1] with per-sample shape ``shape``: ``(n, *shape)``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g)


class NpzImages:
    """uint8 images ``x (N, H, W, C)`` (and optional labels ``y``) from an ``.npz`` file, as float [0, 1] tensors.

    Loaded without pickle. ``size`` resizes (bilinear, antialiased) to ``size × size``; ``channels`` converts
    grey to colour by repetition (1 → 3) or colour to grey by the mean (3 → 1).

    Args:
        path: the ``.npz`` file.
        size: output height and width, or None to keep.
        channels: output channels, or None to keep.
        limit: keep only the first ``limit`` images (an int >= 0).

    ``x`` must be uint8 (0–255), boolean or float in [0, 1] (±10⁻³ of rounding, clamped), channels last with at
    most 4 channels; anything else is refused, not rescaled.

    Attributes:
        images: ``(N, C, H, W)`` float32 in [0, 1].
        labels: ``(N,)`` int64 or None.
    """

    def __init__(
        self, path: str | Path, size: int | None = None, channels: int | None = None, limit: int | None = None
    ) -> None:
        if limit is not None:
            if isinstance(limit, bool) or not hasattr(type(limit), "__index__") or operator.index(limit) < 0:
                raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
            limit = operator.index(limit)
        try:
            data = np.load(path, allow_pickle=False)
        except ValueError as exc:  # numpy calls any non-zip file "pickled data"; nothing is unpickled here
            raise ValueError(f"{path} is not a readable .npz file of images: {exc}") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} holds a single array, not an .npz file with an array 'x' (and 'y')")
        with data:
            if "x" not in data:
                raise ValueError(f"{path} has no array 'x' (found {sorted(data.files)})")
            try:
                x = data["x"][:limit]
                y = data["y"][:limit] if "y" in data else None
            except ValueError as exc:  # object arrays, refused without pickle
                raise ValueError(f"{path} is not a readable .npz file of images: {exc}") from None
        if y is not None and (y.ndim != 1 or len(y) != len(x)):
            raise ValueError(f"{path}: y must hold one label per image, got shape {y.shape} for {len(x)} images")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError(f"{path}: x holds NaN or infinite values")
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] > 4:
            raise ValueError(
                f"{path}: x must be (N, H, W, C) with C <= 4 or (N, H, W), got shape {x.shape}"
                + (" (channels first? move the channel axis last)" if x.ndim == 4 and x.shape[1] <= 4 else "")
            )
        if x.dtype.kind not in "biuf":
            raise ValueError(f"{path}: x must be uint8 (0-255) or float in [0, 1], got {x.dtype}")
        source = torch.from_numpy(np.ascontiguousarray(x))
        try:
            images = _unit_pixels(source.permute(0, 3, 1, 2).float(), source)
        except ValueError as exc:
            raise ValueError(f"{path}: x: {exc}") from None
        self.images = to_format(images, size=size, channels=channels)
        self.labels = torch.from_numpy(y.astype(np.int64)) if y is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: Any) -> Any:
        return self.images[i] if self.labels is None else (self.images[i], self.labels[i])


def to_format(images: torch.Tensor, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` images to ``size × size`` and repeat/average channels to ``channels``."""
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if channels is not None and channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if channels is not None and channels != images.shape[1]:
        if images.shape[1] == 1:
            images = images.repeat(1, channels, 1, 1)
        elif channels == 1:
            images = images.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {images.shape[1]} channels to {channels}")
    if size is not None and images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images.clamp_(0.0, 1.0)


def _unit_pixels(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``t`` (float copy of ``source``) on the [0, 1] scale: uint8 divided by 255, floats checked to lie in [0, 1]
    (±10⁻³ of rounding, clamped later); anything else refused, as :class:`NpzImages` does."""
    if source.dtype == torch.uint8:
        return t / 255.0
    if source.dtype == torch.bool:  # a 1-bit image: already 0 and 1
        return t
    if not source.is_floating_point():
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1], got {source.dtype}")
    if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
        raise ValueError(
            f"float images must lie in [0, 1], got values in [{float(t.min()):.4g}, {float(t.max()):.4g}] "
            "(0-255 values: give uint8 or divide by 255)"
        )
    return t


def _to_chw(item: Any) -> torch.Tensor:
    """A PIL image, ``(H, W[, C])`` array or ``(C, H, W)`` tensor as a float ``(C, H, W)`` tensor in [0, 1]."""
    if isinstance(item, torch.Tensor):
        t = item.float()
        if t.ndim == 2:
            t = t[None]
        return _unit_pixels(t, item)
    arr = np.array(item)  # a copy: PIL exposes read-only buffers
    if arr.ndim == 2:
        arr = arr[..., None]
    source = torch.from_numpy(arr)
    return _unit_pixels(source.permute(2, 0, 1).float(), source)


class DatasetImages:
    """Images (and labels) from any map-style dataset yielding ``image`` or ``(image, label)`` — torchvision
    datasets (``pip install torchvision``) included; images may be PIL images, arrays or tensors.

    Attributes:
        images: ``(N, C, H, W)`` float32 in [0, 1], resized to ``size`` and converted to ``channels``.
        labels: ``(N,)`` int64, or None when the dataset yields images only.
    """

    def __init__(
        self, dataset: Any, size: int | None = None, channels: int | None = None, limit: int | None = None
    ) -> None:
        n = len(dataset) if limit is None else min(limit, len(dataset))
        images, labels = [], []
        for i in range(n):
            item = dataset[i]
            if isinstance(item, tuple | list):
                image, label = item[0], item[1] if len(item) > 1 else None
            else:
                image, label = item, None
            one = _to_chw(image)[None]
            images.append(to_format(one, size=size, channels=channels))
            if label is not None:
                labels.append(int(label))
        if not images:
            raise ValueError("the dataset is empty")
        self.images = torch.cat(images)
        self.labels = torch.tensor(labels, dtype=torch.int64) if len(labels) == n else None

    def __len__(self) -> int:
        return self.images.shape[0]


class ImageFolder(DatasetImages):
    """Images from a folder: ``root/<class>/*.png|jpg`` (labels = sorted class folders) or ``root/*.png|jpg``
    (no labels). Needs Pillow (``pip install 'featurefail[demo]'``)."""

    _SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

    def __init__(
        self, root: str | Path, size: int | None = None, channels: int | None = None, limit: int | None = None
    ) -> None:
        try:
            from PIL import Image
        except ImportError as exc:
            raise ImportError("ImageFolder needs Pillow: pip install 'featurefail[demo]'") from exc
        root = Path(root)
        classes = sorted(p for p in root.iterdir() if p.is_dir())
        if classes:
            files = [
                (f, label)
                for label, c in enumerate(classes)
                for f in sorted(c.iterdir())
                if f.suffix.lower() in self._SUFFIXES
            ]
        else:
            files = [(f, None) for f in sorted(root.iterdir()) if f.suffix.lower() in self._SUFFIXES]
        if not files:
            raise ValueError(f"no images found in {root}")
        self.classes = [c.name for c in classes]

        def read(path: Path) -> np.ndarray:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)

        items = [(read(f), label) if label is not None else read(f) for f, label in files]
        super().__init__(items, size=size, channels=channels, limit=limit)


def load_images(
    path: str | Path, size: int | None = None, channels: int | None = None, limit: int | None = None
) -> NpzImages | ImageFolder:
    """An ``.npz`` file (:class:`NpzImages`) or a folder of images (:class:`ImageFolder`)."""
    return ImageFolder(path, size, channels, limit) if Path(path).is_dir() else NpzImages(path, size, channels, limit)
