"""The fused GMM head of as_module() (StackedGMMScoreModule) against scikit-learn's float64 log-densities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featurefail.features import Features
from featurefail.scorers import GMMScorer, PerLayer
from featurefail.scorers.modules import (
    BlockSumScoreModule,
    GMMScoreModule,
    StackedGMMScoreModule,
    TransformedScoreModule,
)


def blocks_data(n: int = 1500, widths: tuple[int, ...] = (5, 9, 3), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (n, 1), generator=g).float()
    return torch.cat([torch.randn(n, w, generator=g) * 0.3 + label * torch.rand(w, generator=g) + 1 for w in widths], 1)


def sklearn_block_sum(scorer: PerLayer, x: np.ndarray, l2: bool) -> np.ndarray:
    """Σ_l log p_l(g(x_l)) by scikit-learn in float64, the independent reference."""
    total = np.zeros(len(x))
    start = 0
    for part, width in zip(scorer.parts_, scorer.blocks_, strict=True):
        block = x[:, start : start + width]
        if l2:
            block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
        total += part.gmm_.to_sklearn().score_samples(block)
        start += width
    return total


@pytest.mark.parametrize("preprocess", [None, "l2"])
def test_stacked_blocks_equal_sklearn(preprocess):
    widths = (5, 9, 3)
    x = blocks_data(widths=widths)
    scorer = PerLayer(GMMScorer(n_components=6, preprocess=preprocess, max_iter=30)).fit(Features(x, blocks=widths))
    module = scorer.as_module()
    assert isinstance(module, StackedGMMScoreModule)
    probe = blocks_data(n=300, widths=widths, seed=1)
    probe[:10] *= 3.0  # some rows far from every component
    ref = sklearn_block_sum(scorer, probe.double().numpy(), preprocess == "l2")
    with torch.no_grad():
        ours = module(probe).double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=2e-4)
    np.testing.assert_allclose(
        ours, scorer.score(Features(probe, blocks=widths)).double().numpy(), rtol=2e-6, atol=2e-4
    )
    with torch.no_grad():  # a batch of zero rows (an empty shard, an empty request) scores to zero scores
        assert module(probe[:0]).shape == (0,)


def test_rescoring_fixes_the_float32_product_on_far_apart_components():
    # clusters 400σ apart: the product form's terms reach ~1e5 per dimension and float32 loses ~0.1 nat to them
    g = torch.Generator().manual_seed(2)
    centres = torch.tensor([[-200.0] * 8, [0.0] * 8, [200.0] * 8])
    x = centres[torch.randint(0, 3, (3000,), generator=g)] + torch.randn(3000, 8, generator=g) * 0.5
    scorer = GMMScorer(n_components=3, max_iter=50).fit(Features(x))
    module = scorer.as_module()
    assert isinstance(module, StackedGMMScoreModule)
    ref = scorer.gmm_.to_sklearn().score_samples(x.double().numpy())
    with torch.no_grad():
        ours = module(x).double().numpy()
        module.top = 0  # what the product form alone gives: the test must be able to see that error
        product_only = (
            torch.logsumexp(
                torch.addmm(module.bias, torch.cat([x - module.center, (x - module.center) ** 2], 1), module.weight), 1
            )
            .double()
            .numpy()
        )
    assert np.abs(product_only - ref).max() > 1e-2
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-4)


def test_bpd_non_finite_rows_and_gradient_match_the_unfused_module():
    x = blocks_data(n=800, widths=(7,))
    scorer = GMMScorer(n_components=5, score="bpd", preprocess="l2", max_iter=20).fit(Features(x))
    module = scorer.as_module()
    assert isinstance(module, StackedGMMScoreModule)
    unfused = TransformedScoreModule(scorer.transform_, GMMScoreModule(scorer.gmm_, bpd=True))
    probe = x[:50].clone().requires_grad_(True)
    ours, ref = module(probe), unfused(probe)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours, scorer.score(Features(x[:50].detach())), rtol=1e-6, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.sum(), probe)
    (g_ref,) = torch.autograd.grad(ref.sum(), probe)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-4)
    bad = x[:4].clone()
    bad[1, 0], bad[2, 3] = float("nan"), float("inf")
    out = module(bad)
    assert out[1] == -math.inf and out[2] == -math.inf and torch.isfinite(out[[0, 3]]).all()


def test_unstackable_mixtures_keep_the_unfused_modules():
    x = blocks_data(n=600, widths=(4, 6))
    feats = Features(x, blocks=(4, 6))
    standardized = PerLayer(GMMScorer(n_components=3, preprocess="standardize", max_iter=10)).fit(feats)
    assert isinstance(standardized.as_module(), BlockSumScoreModule)
    float64 = GMMScorer(n_components=3, dtype="float64", max_iter=10).fit(Features(x))
    assert isinstance(float64.as_module(), GMMScoreModule)
    torch.testing.assert_close(standardized.as_module()(x), standardized.score(feats), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="n_components"):
        StackedGMMScoreModule([float64.gmm_, GMMScorer(n_components=2, max_iter=5).fit(Features(x)).gmm_])
