"""ViM (Wang et al., 2022): the energy penalised by the feature residual off the principal subspace."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from ..distributed import all_reduce_sum, total_rows
from ..features import Features
from .base import ModelContext, Scorer, check_features, register_scorer
from .energy import check_head_state, check_keys, check_width, classifier_head, scalar
from .modules import ViMScoreModule

__all__ = ["ViM", "default_vim_dim"]


def default_vim_dim(width: int) -> int:
    """The principal dimension used when ``dim=None``: 1000 for ``D ≥ 1500``, 512 for ``768 ≤ D < 1500``,
    else ``D // 2`` (at least 1)."""
    if width >= 1500:
        return 1000
    if width >= 768:
        return 512
    return max(1, width // 2)


@register_scorer("vim")
class ViM(Scorer):
    """Virtual-logit matching: ``score = logsumexp(W f + b) − α ‖(f − u) R‖``. Higher = more normal.

    * ``u = −W⁺ b`` (``W⁺`` the pseudo-inverse): the origin at which the logits vanish;
    * ``R (D, D − dim)``: the eigenvectors of ``(1/N) Σ (f − u)(f − u)ᵀ`` over the training features beyond
      the ``dim`` largest eigenvalues (the residual space);
    * ``α = mean_n max_c (W f_n + b)_c / mean_n ‖(f_n − u) R‖`` on the training features.

    Sign: the paper scores OOD-ness as the virtual logit's softmax probability
    ``p_v = e^v / (Σ_c e^{z_c} + e^v)`` with ``v = α ‖(f − u) R‖``; ``−log(p_v / (1 − p_v)) = logsumexp(z) − v``
    is this score, a decreasing function of ``p_v`` (the authors' code, ``-vlogit + energy``).

    Needs the classifier head ``(W (C, D), b (C,))``: hook the head's input (``layer=None``) or pass ``head=``
    to ``FailureDetector.fit_features``. Learns only from in-distribution training features.

    Paper: Wang, Li, Feng & Zhang, "ViM: Out-of-distribution with virtual-logit matching", CVPR 2022.

    Args:
        dim: the principal dimension (``1 ≤ dim < D``). ``None`` = :func:`default_vim_dim`: 1000 for
            ``D ≥ 1500``, 512 for ``768 ≤ D < 1500`` (the authors' code uses 1000 for their 2048-d and 512 for
            their 768/1024-d models), ``D // 2`` below (OpenOOD's 256 for the 512-d CIFAR ResNet-18; 32 for
            the 64-d ResNet-20).

    Attributes:
        dim_, origin_ (``u``), residual_ (``R``), alpha_, head_weight_, head_bias_.
    """

    supports_distributed = True  # the covariance and both means are sums over all ranks' rows

    def __init__(self, dim: Annotated[int, Field(ge=1)] | None = None) -> None:
        self.dim = dim
        self._context = ModelContext()

    def attach(self, context: ModelContext) -> None:
        """Receive the classifier head (``context.head_weight``, ``context.head_bias``)."""
        self._context = context

    def fit(self, features: Features) -> ViM:
        check_features(features, who="vim")
        width = features.feats.shape[1]
        n = total_rows(features.feats.shape[0])  # under torch.distributed: every statistic over all ranks' rows
        weight, bias = classifier_head(self._context, width, "vim")
        dim = self.dim if self.dim is not None else default_vim_dim(width)
        if not 1 <= dim < width:
            raise ValueError(f"vim: dim={dim} must be between 1 and D - 1 = {width - 1}")
        f = features.feats.double()
        origin = -torch.linalg.pinv(weight) @ bias
        centred = f - origin
        eigenvalues, eigenvectors = torch.linalg.eigh(all_reduce_sum(centred.T @ centred) / n)
        residual = eigenvectors[:, torch.argsort(eigenvalues, descending=True)[dim:]].contiguous()
        norms = torch.linalg.vector_norm(centred @ residual, dim=1)
        max_logit = (f @ weight.T + bias).max(dim=1).values
        norm_sum, max_logit_sum = all_reduce_sum(torch.stack([norms.sum(), max_logit.sum()])).tolist()
        if not norm_sum > 0:
            raise ValueError(f"vim: the training features have no residual off their top {dim} dimensions; lower dim")
        alpha = max_logit_sum / norm_sum  # mean max-logit over mean residual norm
        self.dim_, self.origin_, self.residual_, self.alpha_ = dim, origin, residual, alpha
        self.head_weight_, self.head_bias_ = weight, bias
        return self

    def as_module(self) -> nn.Module:
        """``nn.Module(feats, logits) -> (N,)`` with the head, ``u``, ``R`` and ``α`` as buffers."""
        self.check_fitted()
        return ViMScoreModule(self.head_weight_, self.head_bias_, self.origin_, self.residual_, self.alpha_)

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        check_width(features, self.head_weight_.shape[1], "vim")
        with torch.no_grad():
            return self.as_module()(features.feats)

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        return {
            "head_weight": self.head_weight_,
            "head_bias": self.head_bias_,
            "origin": self.origin_,
            "residual": self.residual_,
            "alpha": self.alpha_,
        }

    def load_state_dict(self, state: dict[str, Any]) -> ViM:
        check_keys(state, {"head_weight", "head_bias", "origin", "residual", "alpha"}, "vim")
        weight, bias = check_head_state(state["head_weight"], state["head_bias"], "vim")
        width = weight.shape[1]
        origin, residual = state["origin"], state["residual"]
        if not (isinstance(origin, torch.Tensor) and isinstance(residual, torch.Tensor)):
            raise ValueError("vim: origin and residual must be tensors")
        if origin.shape != (width,) or residual.ndim != 2 or residual.shape[0] != width:
            raise ValueError(
                f"vim: origin must be ({width},) and residual ({width}, R), got {tuple(origin.shape)} and "
                f"{tuple(residual.shape)}"
            )
        if not 1 <= residual.shape[1] < width:
            raise ValueError(f"vim: the residual space must have between 1 and {width - 1} directions")
        if not (torch.isfinite(origin).all() and torch.isfinite(residual).all()):
            raise ValueError("vim: origin or residual holds NaN or infinite values")
        self.alpha_ = scalar(state, "alpha", "vim")
        self.dim_ = width - residual.shape[1]
        self.origin_, self.residual_ = origin.detach().double().clone(), residual.detach().double().clone()
        self.head_weight_, self.head_bias_ = weight, bias
        return self
