"""purify(): the gradient, the effect of ν, monotone BPD, fixing mistakes, and no side effects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import mlp

from featurefail import FailureDetector, Features, purification_grid, purify
from featurefail.purify import bpd_gradient


def two_clusters(n: int = 2000, seed: int = 0):
    """Class 0 around (-2, 0), class 1 around (2, 0); the head's boundary sits at x = 1, inside class 1's tail."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    f = centers[y] + torch.randn(n, 2, generator=g) * 0.5
    return f, y


def detector_on(feats: torch.Tensor, k: int = 2) -> FailureDetector:
    head = (torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), torch.tensor([0.5, -0.5]))  # logit gap 2x - 1
    return FailureDetector.paper(n_components=k, progress=False, seed=0).fit_features(Features(feats), head=head)


def test_gradient_equals_finite_differences():
    f, _ = two_clusters()
    scorer = detector_on(f).scorer_
    gmm = scorer.gmm_
    probe = torch.tensor([[0.3, 0.2], [-1.0, 1.0], [2.5, -0.4]], dtype=torch.float64)
    _, grad = bpd_gradient(scorer.bpd_module(), probe)
    h = 1e-6
    for j in range(2):
        step = torch.zeros_like(probe)
        step[:, j] = h
        fd = (gmm.bpd(probe + step) - gmm.bpd(probe - step)) / (2 * h)
        torch.testing.assert_close(grad[:, j], fd, rtol=1e-5, atol=1e-8)


def test_large_nu_barely_moves_and_nu_zero_descends_monotonically():
    f, _ = two_clusters()
    det = detector_on(f)
    start = torch.tensor([[0.8, 0.3], [-0.5, -0.6], [3.5, 0.0]])
    free = purify(det, start, lr=0.01, nu=0.0, steps=50, as_features=True, history=True)
    held = purify(det, start, lr=0.0001, nu=1000.0, steps=50, as_features=True)
    assert (held.distance < 0.05 * free.distance).all()
    steps = free.bpd_history
    assert (steps[1:] <= steps[:-1] + 1e-9).all()
    assert (free.bpd_after < free.bpd_before).all()


def test_purification_fixes_mistakes_in_a_low_density_gap():
    f, _ = two_clusters()
    det = detector_on(f)
    # class-1 samples just left of the boundary (x = 0.5) but closer to class 1's mode than class 0's
    stragglers = torch.tensor([[0.35, 0.0], [0.4, 0.3], [0.45, -0.2]])
    labels = torch.ones(3, dtype=torch.int64)
    result = purify(det, Features(stragglers, labels=labels), lr=0.1, nu=0.0, steps=100)
    assert (result.original_predictions == 0).all()  # they start as mistakes
    assert int((result.predictions == labels).sum()) >= 2


def test_grid_reports_and_chooses_on_validation():
    f, y = two_clusters(600)
    det = detector_on(f)
    logits_pred = (2 * f[:, 0] - 1 > 0).long()
    val = Features(f[:300], labels=y[:300])
    test = Features(f[300:], labels=y[300:])
    grid = purification_grid(det, val, test, steps=10)
    assert len(grid.rows) == 8 and grid.chosen in grid.rows
    assert grid.chosen.val_after == max(r.val_after for r in grid.rows)
    before = float((logits_pred[300:] == y[300:]).float().mean())
    assert all(abs(r.test_before - before) < 1e-6 for r in grid.rows)
    assert "| 0.1 |" in grid.to_markdown()


def test_inputs_and_model_are_untouched_and_errors_are_clear(trained_mlp):
    model, s = trained_mlp
    x = s["test"][0].clone()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad(set_to_none=True)
    det = FailureDetector(n_components=3, progress=False).fit(model, [(s["train"][0],)])
    out = det.purify(x, steps=5)
    assert torch.equal(x, s["test"][0])
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert out.logits.shape == (300, 3) and out.features.shape == (300, 24)
    # the head reproduces the model's own logits before purification
    np.testing.assert_array_equal(out.original_predictions.numpy(), model(x).argmax(1).numpy())
    on_relu = FailureDetector.paper(n_components=3, layer="3", progress=False).fit(model, [(s["train"][0],)])
    assert on_relu.head_weight_ is None  # the output of a ReLU, not the input of the head
    with pytest.raises(ValueError, match="head=callable"):
        on_relu.purify(x, steps=1)
    assert on_relu.purify(x, steps=1, head=model[4]).logits.shape == (300, 3)
    with pytest.raises(ValueError, match="GMM scorer"):
        purify(FailureDetector(scorer="max_logit", progress=False).fit(mlp(), [(x,)]), x)
