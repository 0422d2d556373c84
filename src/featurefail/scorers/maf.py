"""A masked autoregressive flow on the features (via zuko), scored by its exact log-likelihood."""

from __future__ import annotations

from typing import Any

import torch

from ..exceptions import NotFittedError
from ..features import Features
from ._training import Standardizer, load_network, network_state, resolve_device, train_density
from .base import Scorer, check_features, register_scorer

__all__ = ["MAFScorer"]


def _zuko():
    try:
        import zuko
    except ImportError as exc:
        raise ImportError(
            "MAFScorer needs zuko, a normalizing-flows library: pip install 'featurefail[flows]'"
        ) from exc
    return zuko


@register_scorer("maf")
class MAFScorer(Scorer):
    """``score = log p(F)`` under a masked autoregressive flow trained by maximum likelihood.

    The flow is ``zuko.flows.MAF`` (5 autoregressive transforms, MADE conditioners with hidden layers of 128
    units, as in the paper's appendix C) on standardised features; the log-likelihood is reported in the
    original feature space. We use zuko rather than a hand-written flow: it is maintained, small (pure
    PyTorch) and tested; it is the optional extra ``flows``.

    The paper trains with Adam at 1e-2; the default here is the more conservative 1e-3 with clipped
    gradients (pass ``lr=1e-2`` for the paper's setting; it was not compared here).

    Paper: Papamakarios, Pavlakou & Murray, "Masked autoregressive flow for density estimation", NeurIPS 2017.
    """

    def __init__(
        self,
        transforms: int = 5,
        hidden: int = 128,
        epochs: int = 100,
        lr: float = 1e-3,
        batch_size: int = 256,
        seed: int = 0,
        device: str | None = None,
        progress: bool = False,
    ) -> None:
        self.transforms, self.hidden, self.epochs, self.lr = transforms, hidden, epochs, lr
        self.batch_size, self.seed, self.device, self.progress = batch_size, seed, device, progress

    def _flow(self, d: int):
        torch.manual_seed(self.seed)
        return _zuko().flows.MAF(features=d, transforms=self.transforms, hidden_features=(self.hidden, self.hidden))

    def fit(self, features: Features) -> MAFScorer:
        check_features(features, who="MAFScorer")
        dev = resolve_device(self.device)
        self.standardizer_ = Standardizer(features.feats)
        z = self.standardizer_(features.feats)
        self.flow_ = self._flow(z.shape[1])
        self.loss_history_ = train_density(
            self.flow_,
            z,
            lambda b: -self.flow_().log_prob(b),
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            device=dev,
            desc="MAF",
            show_progress=self.progress,
        )
        return self

    def score(self, features: Features) -> torch.Tensor:
        if not hasattr(self, "flow_"):
            raise NotFittedError("MAFScorer is not fitted")
        dev = next(self.flow_.parameters()).device
        out = []
        with torch.no_grad():
            dist = self.flow_()
            for chunk in torch.split(self.standardizer_(features.feats), 4096):
                out.append(dist.log_prob(chunk.to(dev)).double().cpu())
        return (torch.cat(out) + self.standardizer_.log_det).float()

    def state_dict(self) -> dict[str, Any]:
        return network_state(self.flow_, self.standardizer_.state())

    def load_state_dict(self, state: dict[str, Any]) -> MAFScorer:
        self.standardizer_ = Standardizer.from_state(state)
        self.flow_ = self._flow(int(self.standardizer_.mean.shape[0]))
        load_network(self.flow_, state, self.device)
        return self
