"""A variational autoencoder on the features, scored by an importance-weighted log-likelihood bound."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..exceptions import NotFittedError
from ..features import Features
from ._training import Standardizer, load_network, network_state, resolve_device, train_density
from .base import Scorer, check_features, register_scorer

__all__ = ["VAEScorer"]


class _FeatureVAE(nn.Module):
    def __init__(self, d: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 2 * d))
        self.latent = latent

    def log_weights(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        """``log p(x|z) + log p(z) − log q(z|x)`` for ``samples`` draws ``z ~ q(z|x)``: ``(N, D) -> (S, N)``."""
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        log_var = log_var.clamp(-12, 8)
        std = torch.exp(0.5 * log_var)
        eps = torch.randn(samples, *mu.shape, device=x.device, dtype=x.dtype)
        z = mu + std * eps
        x_mu, x_log_var = self.decoder(z).chunk(2, dim=-1)
        x_log_var = x_log_var.clamp(-12, 8)
        log_px = -0.5 * (((x - x_mu) ** 2) / x_log_var.exp() + x_log_var + math.log(2 * math.pi)).sum(-1)
        log_pz = -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps**2 + log_var + math.log(2 * math.pi)).sum(-1)
        return log_px + log_pz - log_qz


@register_scorer("vae")
class VAEScorer(Scorer):
    """``score = log p(F)`` estimated by the importance-weighted bound ``log (1/S) Σ_s p(F, z_s) / q(z_s | F)``.

    A Gaussian-decoder VAE (one hidden layer of 512 ReLU units, 128-d latent, Adam 1e-3, as in the paper's
    appendix C) on standardised features; the log-likelihood is reported in the original feature space.
    Training maximises the ELBO (``S = 1``); scoring uses ``S = importance_samples``.

    Papers: Kingma & Welling, "Auto-encoding variational Bayes", 2014; Burda, Grosse & Salakhutdinov,
    "Importance weighted autoencoders", 2016.
    """

    def __init__(
        self,
        hidden: int = 512,
        latent: int = 128,
        epochs: int = 100,
        lr: float = 1e-3,
        batch_size: int = 128,
        importance_samples: int = 32,
        seed: int = 0,
        device: str | None = None,
        progress: bool = False,
    ) -> None:
        self.hidden, self.latent, self.epochs, self.lr = hidden, latent, epochs, lr
        self.batch_size, self.importance_samples, self.seed = batch_size, importance_samples, seed
        self.device, self.progress = device, progress

    def fit(self, features: Features) -> VAEScorer:
        check_features(features, who="VAEScorer")
        dev = resolve_device(self.device)
        self.standardizer_ = Standardizer(features.feats)
        z = self.standardizer_(features.feats)
        self.model_ = _FeatureVAE(z.shape[1], self.hidden, self.latent)
        self.loss_history_ = train_density(
            self.model_,
            z,
            lambda b: -self.model_.log_weights(b, 1)[0],
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            device=dev,
            desc="VAE",
            show_progress=self.progress,
        )
        return self

    def score(self, features: Features) -> torch.Tensor:
        if not hasattr(self, "model_"):
            raise NotFittedError("VAEScorer is not fitted")
        dev = next(self.model_.parameters()).device
        torch.manual_seed(self.seed)
        out = []
        with torch.no_grad():
            for chunk in torch.split(self.standardizer_(features.feats), 1024):
                w = self.model_.log_weights(chunk.to(dev), self.importance_samples)
                out.append((torch.logsumexp(w, 0) - math.log(self.importance_samples)).double().cpu())
        return (torch.cat(out) + self.standardizer_.log_det).float()

    def state_dict(self) -> dict[str, Any]:
        return network_state(self.model_, self.standardizer_.state())

    def load_state_dict(self, state: dict[str, Any]) -> VAEScorer:
        self.standardizer_ = Standardizer.from_state(state)
        d = int(self.standardizer_.mean.shape[0])
        self.model_ = _FeatureVAE(d, self.hidden, self.latent)
        load_network(self.model_, state, self.device)
        return self
