"""Covariate shift as a failure source: CIFAR-10-C-style corruptions of images in [0, 1], in pure torch.

Six corruption families (Hendrycks & Dietterich, ICLR 2019, "CIFAR-10-C"), each at severities 1–5 with the
parameters of the CIFAR-10-C generation code (32×32 images; other sizes get the same per-pixel parameters):

* ``gaussian_noise``: ``x + N(0, σ²)``, σ ∈ (0.04, 0.06, 0.08, 0.09, 0.10);
* ``gaussian_blur``: Gaussian filter, σ ∈ (0.4, 0.6, 0.7, 0.8, 1.0) pixels (reflect padding);
* ``defocus_blur``: a disk of radius r smoothed by a 3×3 Gaussian of σ_a, (r, σ_a) ∈ ((0.3, 0.4), (0.4, 0.5),
  (0.5, 0.6), (1, 0.2), (1.5, 0.1));
* ``contrast``: ``(x − m)·c + m`` with ``m`` the per-image, per-channel mean, c ∈ (0.75, 0.5, 0.4, 0.3, 0.15);
* ``brightness``: add b ∈ (0.05, 0.1, 0.15, 0.2, 0.3) to the HSV value channel (clipped), hue and saturation kept;
* ``jpeg``: baseline JPEG at quality (80, 65, 58, 50, 40): YCbCr, 4:2:0 chroma subsampling, 8×8 DCT quantised
  with the standard (IJG) tables scaled by the quality, decoded (triangular "fancy" chroma upsampling, as
  libjpeg) and rounded to 8 bits;
* ``pixelate``: box-average down to ``round(s·H) × round(s·W)`` and nearest-neighbour back up,
  s ∈ (0.95, 0.9, 0.85, 0.75, 0.65).

Inputs and outputs are ``(N, C, H, W)`` float tensors in [0, 1] (C = 1 or 3); the result is clamped to [0, 1].
Only ``gaussian_noise`` is random; it draws from a ``torch.Generator`` seeded by ``seed`` (same seed, same
output). Labels stay valid: a corrupted image shows the same object, so the failures of this source are the
model's own mistakes on the corrupted inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "brightness",
    "contrast",
    "corrupt",
    "defocus_blur",
    "gaussian_blur",
    "gaussian_noise",
    "jpeg",
    "pixelate",
]

SEVERITIES = (1, 2, 3, 4, 5)
_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)
_DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
_QUALITY = (80, 65, 58, 50, 40)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)

# the IJG standard quantisation tables (JPEG standard, Annex K)
_LUMA = [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
]
_CHROMA = [
    [17, 18, 24, 47, 99, 99, 99, 99],
    [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99],
    [47, 66, 99, 99, 99, 99, 99, 99],
    *[[99] * 8 for _ in range(4)],
]


def _check(x: torch.Tensor, severity: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor of images, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C = 1 or 3, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype}")
    if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise ValueError("images must be finite and in [0, 1]")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    return severity - 1


def gaussian_noise(x: torch.Tensor, severity: int = 1, seed: int = 0) -> torch.Tensor:
    """``x + N(0, σ²)`` (σ per severity, see the module docstring), clamped; seeded."""
    i = _check(x, severity)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    return (x + _NOISE[i] * noise).clamp_(0.0, 1.0)


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _filter2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-D filtering with reflect padding (as scipy.ndimage / OpenCV's default border)."""
    kh, kw = kernel.shape
    c = x.shape[1]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    weight = kernel.to(x.dtype).to(x.device).expand(c, 1, kh, kw)
    return F.conv2d(padded, weight, groups=c)


def gaussian_blur(x: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """Gaussian filter of σ per severity (radius ⌊4σ + ½⌋ as scipy.ndimage, mirror padding), clamped."""
    i = _check(x, severity)
    sigma = _BLUR[i]
    k = _gaussian_kernel(sigma, min(int(4 * sigma + 0.5), min(x.shape[-2:]) - 1))
    return _filter2d(x, torch.outer(k, k)).clamp_(0.0, 1.0)


def defocus_blur(x: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """Filter by a disk of radius r (pixels with ``dx² + dy² ≤ r²``, normalised) smoothed by a 3×3 Gaussian of
    σ_a (the CIFAR-10-C aliased disk), reflect padding, clamped."""
    i = _check(x, severity)
    radius, alias = _DEFOCUS[i]
    half = math.ceil(radius) + 1
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk = disk / disk.sum()
    g = _gaussian_kernel(alias, 1)
    kernel = F.conv2d(disk[None, None], torch.outer(g, g)[None, None], padding=1)[0, 0]
    return _filter2d(x, kernel / kernel.sum()).clamp_(0.0, 1.0)


def contrast(x: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """``(x − m)·c + m``, ``m`` the per-image, per-channel mean; clamped."""
    i = _check(x, severity)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * _CONTRAST[i] + mean).clamp_(0.0, 1.0)


def brightness(x: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """Add b to the HSV value ``V = max_c x`` (clipped to 1), keeping hue and saturation: every channel is scaled
    by ``V'/V`` (a black pixel, whose saturation is 0, becomes grey ``V'``)."""
    i = _check(x, severity)
    value = x.amax(dim=1, keepdim=True)
    new = (value + _BRIGHTNESS[i]).clamp(max=1.0)
    scaled = x * (new / value.clamp(min=torch.finfo(x.dtype).tiny))
    return torch.where(value > 0, scaled, new.expand_as(x)).clamp_(0.0, 1.0)


def _quant_table(table: list[list[int]], quality: int) -> torch.Tensor:
    """The IJG scaling of a base table to ``quality`` (libjpeg ``jpeg_quality_scaling``), entries in 1..255."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    q = (torch.tensor(table, dtype=torch.float64) * scale + 50) // 100
    return q.clamp(1, 255)


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m  # orthonormal DCT-II: coefficients = M @ block @ M.T


def _code_plane(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Level-shifted 8×8 DCT, quantise, dequantise, inverse DCT of ``(N, H, W)`` in 0..255 (H, W multiples of 8)."""
    n, h, w = plane.shape
    m = _dct_matrix()
    blocks = (plane - 128).reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = m @ blocks @ m.T
    coef = torch.round(coef / table) * table
    back = m.T @ coef @ m
    return back.permute(0, 1, 3, 2, 4).reshape(n, h, w) + 128


def jpeg(x: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """Baseline JPEG encode/decode at the severity's quality (see the module docstring), in float64; images whose
    sides are not multiples of 16 are edge-padded for coding and cropped back."""
    i = _check(x, severity)
    quality = _QUALITY[i]
    _, c, h, w = x.shape
    ph, pw = -h % 16, -w % 16
    img = torch.round(x.double() * 255)
    img = F.pad(img, (0, pw, 0, ph), mode="replicate") if ph or pw else img
    luma_q, chroma_q = _quant_table(_LUMA, quality), _quant_table(_CHROMA, quality)
    if c == 1:
        out = _code_plane(img[:, 0], luma_q)[:, None]
    else:
        r, g, b = img.unbind(1)
        y = 0.299 * r + 0.587 * g + 0.114 * b
        cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
        cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
        y = _code_plane(y, luma_q)
        small = F.avg_pool2d(torch.stack([cb, cr], 1), 2)
        coded = torch.stack([_code_plane(small[:, k], chroma_q) for k in range(2)], 1)
        cb, cr = F.interpolate(coded, scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
        out = torch.stack(
            [
                y + 1.402 * (cr - 128),
                y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                y + 1.772 * (cb - 128),
            ],
            1,
        )
    out = torch.round(out.clamp(0, 255))[:, :, :h, :w] / 255
    return out.to(x.dtype)


def pixelate(x: torch.Tensor, severity: int = 1) -> torch.Tensor:
    """Box-average down to ``round(s·H) × round(s·W)``, nearest-neighbour back to ``H × W``."""
    i = _check(x, severity)
    h, w = x.shape[-2:]
    small = (max(1, round(_PIXELATE[i] * h)), max(1, round(_PIXELATE[i] * w)))
    down = F.adaptive_avg_pool2d(x, small)
    return F.interpolate(down, size=(h, w), mode="nearest").clamp_(0.0, 1.0)


_FUNCTIONS = {
    "gaussian_noise": gaussian_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "contrast": contrast,
    "brightness": brightness,
    "jpeg": jpeg,
    "pixelate": pixelate,
}
#: the corruption names accepted by :func:`corrupt`
CORRUPTIONS = tuple(_FUNCTIONS)


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0, batch_size: int = 1024) -> torch.Tensor:
    """Corrupt images ``x (N, C, H, W)`` in [0, 1] with corruption ``name`` (one of :data:`CORRUPTIONS`) at
    ``severity`` 1–5; ``seed`` seeds the random ones (the whole tensor is one draw, so the output does not depend
    on ``batch_size``, which only bounds the memory of the deterministic ones). Returns the same shape and dtype."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if name == "gaussian_noise":
        return gaussian_noise(x, severity, seed=seed)
    _check(x, severity)
    fn = _FUNCTIONS[name]
    return torch.cat([fn(x[i : i + batch_size], severity) for i in range(0, len(x), batch_size)]) if len(x) else x
