"""Untargeted L∞ adversarial attacks in [0, 1] pixel space: FGSM and BIM.

The paper's text speaks of an ℓ1 ball, but FGSM and BIM are L∞ methods (a step of ``ε · sign(∇)`` moves every
pixel by the same amount): both are implemented in L∞, as in Goodfellow et al. (2015) and Kurakin et al. (2017).
Normalisation belongs inside the model; the attacked inputs stay in [0, 1]. The model runs in eval mode during
the attack and gets its mode back afterwards; its parameters receive no gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["bim", "fgsm"]


@contextlib.contextmanager
def _attack_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def _loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _check(x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("attacks work in [0, 1] pixel space: put normalisation inside the model")


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``clip_[0,1](x + ε · sign(∇_x CE(model(x), y)))``.

    Args:
        model: classifier taking inputs in [0, 1].
        x: ``(N, ...)`` inputs in [0, 1].
        y: ``(N,)`` true labels.
        eps: L∞ radius.

    Returns:
        ``(N, ...)`` adversarial inputs with ``‖x_adv − x‖∞ ≤ ε``, in [0, 1].
    """
    _check(x, y, eps)
    with _attack_mode(model):
        return (x + eps * _loss_gradient(model, x, y).sign()).clamp(0.0, 1.0).detach()


def bim(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float | None = None, steps: int = 10
) -> torch.Tensor:
    """Basic iterative method: ``steps`` FGSM steps of size ``alpha``, each followed by projection onto the
    L∞ ball of radius ``eps`` around ``x`` and onto [0, 1].

    Args:
        alpha: step size; default ``max(ε / steps, 1/255)``, at most ``ε`` (Kurakin et al. use 1/255).
        steps: iterations.
    """
    _check(x, y, eps)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    step = alpha if alpha is not None else min(eps, max(eps / steps, 1.0 / 255))
    lo, hi = (x - eps).clamp_min(0.0), (x + eps).clamp_max(1.0)
    adv = x.detach().clone()
    with _attack_mode(model):
        for _ in range(steps):
            adv = adv + step * _loss_gradient(model, adv, y).sign()
            adv = torch.maximum(torch.minimum(adv, hi), lo).detach()
    return adv
