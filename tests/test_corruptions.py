"""CIFAR-10-C-style corruptions against independent references (scipy, colorsys, closed forms, PIL if present)."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from scipy import ndimage

from featurefail.corruptions import CORRUPTIONS, SEVERITIES, brightness, contrast, corrupt, gaussian_blur


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=size)
    return (0.7 * smooth + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_keeps_shape_dtype_range_and_is_deterministic(name):
    x = _images()
    previous = None
    for severity in SEVERITIES:
        out = corrupt(x, name, severity, seed=3)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
        assert torch.equal(out, corrupt(x, name, severity, seed=3))
        assert not torch.equal(out, x)
        distortion = float((out - x).abs().mean())
        if name not in ("pixelate", "jpeg") and previous is not None:  # monotone in the severity
            assert distortion > previous
        previous = distortion
    assert torch.equal(x, _images())  # the input is untouched
    grey = corrupt(x[:, :1], name, 3)
    assert grey.shape == (len(x), 1, 32, 32)


def test_noise_has_the_cifar10c_standard_deviation_and_depends_on_the_seed():
    x = torch.full((64, 3, 32, 32), 0.5)  # far from the clipping bounds
    for severity, sigma in zip(SEVERITIES, (0.04, 0.06, 0.08, 0.09, 0.10), strict=True):
        delta = corrupt(x, "gaussian_noise", severity, seed=severity) - x
        assert abs(float(delta.std()) / sigma - 1) < 0.01 and abs(float(delta.mean())) < 1e-3
    assert not torch.equal(corrupt(x, "gaussian_noise", 1, seed=0), corrupt(x, "gaussian_noise", 1, seed=1))
    # the output does not depend on batching
    assert torch.equal(corrupt(x, "gaussian_noise", 2, seed=5, batch_size=7), corrupt(x, "gaussian_noise", 2, seed=5))


def test_gaussian_blur_matches_scipy():
    x = _images()
    for severity, sigma in zip(SEVERITIES, (0.4, 0.6, 0.7, 0.8, 1.0), strict=True):
        ref = ndimage.gaussian_filter(x.double().numpy(), sigma=(0, 0, sigma, sigma), mode="mirror", truncate=4.0)
        np.testing.assert_allclose(gaussian_blur(x.double(), severity).numpy(), ref.clip(0, 1), atol=1e-12)


def test_defocus_blur_preserves_constant_images_and_the_mean():
    flat = torch.full((2, 3, 16, 16), 0.3)
    x = _images(2, 16)
    for severity in SEVERITIES:
        torch.testing.assert_close(corrupt(flat, "defocus_blur", severity), flat)
        out = corrupt(x, "defocus_blur", severity)
        assert abs(float(out.mean() - x.mean())) < 0.01 and float(out.std()) < float(x.std())


def test_contrast_is_the_closed_form():
    x = _images()
    for severity, c in zip(SEVERITIES, (0.75, 0.5, 0.4, 0.3, 0.15), strict=True):
        m = x.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(contrast(x, severity), ((x - m) * c + m).clamp(0, 1))


def test_brightness_matches_colorsys_hsv():
    x = _images(2, 8).double()
    x[0, :, 0, 0] = 0.0  # a black pixel
    for severity, b in zip(SEVERITIES, (0.05, 0.1, 0.15, 0.2, 0.3), strict=True):
        out = brightness(x, severity)
        for n in range(2):
            for i in range(8):
                for j in range(8):
                    h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
                    ref = colorsys.hsv_to_rgb(h, s, min(v + b, 1.0))
                    np.testing.assert_allclose(out[n, :, i, j].numpy(), ref, atol=1e-12)


def test_jpeg_is_close_to_libjpeg():
    image = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(16, 3, 8, 8, generator=g), size=32, mode="bilinear")
    x = (smooth * 255).round() / 255
    for severity, quality in zip(SEVERITIES, (80, 65, 58, 50, 40), strict=True):
        ours = corrupt(x, "jpeg", severity)
        assert torch.equal(ours, (ours * 255).round() / 255)  # decoded to 8 bits
        ref = []
        for im in (x * 255).round().byte().permute(0, 2, 3, 1).numpy():
            buffer = io.BytesIO()
            image.fromarray(im).save(buffer, "JPEG", quality=quality)
            ref.append(np.array(image.open(buffer)))
        ref = torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2).float() / 255
        assert float((ours - ref).abs().mean()) < 2 / 255  # libjpeg's integer DCT rounds differently
        ours_loss, ref_loss = float((ours - x).abs().mean()), float((ref - x).abs().mean())
        assert abs(ours_loss / ref_loss - 1) < 0.03


def test_pixelate_has_the_block_structure():
    x = _images(3)
    for severity, s in zip(SEVERITIES, (0.95, 0.9, 0.85, 0.75, 0.65), strict=True):
        out = corrupt(x, "pixelate", severity)
        k = round(s * 32)
        rows = out[:, :, :, 0]
        assert torch.unique(rows[0, 0]).numel() <= k  # at most k distinct rows per column
        assert abs(float(out.mean() - x.mean())) < 0.01
    flat = torch.full((1, 3, 32, 32), 0.25)
    torch.testing.assert_close(corrupt(flat, "pixelate", 5), flat)


def test_bad_inputs_are_refused():
    x = _images(1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "fog", 1)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "contrast", severity)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x * 2, "contrast", 1)
    with pytest.raises(ValueError, match="shape"):
        corrupt(x[0], "contrast", 1)
    with pytest.raises(TypeError, match="float"):
        corrupt((x * 255).byte(), "contrast", 1)
    with pytest.raises(TypeError):
        corrupt(x.numpy(), "contrast", 1)
