"""One scorer per layer block, scores summed: the one way to score features of several layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..features import Features
from .base import ModelContext, Scorer, ValidationUse, build_scorer, validation_use_of
from .gmm import stacked_gmm_module
from .modules import BlockSumScoreModule

__all__ = ["PerLayer"]


class PerLayer(Scorer):
    """``score(F) = Σ_l s_l(F_l)``: a copy of ``base`` fitted on each layer block ``F_l`` of the features.

    Features of several layers (``FailureDetector(layer=[...])`` or ``layer="auto"``) are the concatenation of
    one pooled block per layer (``Features.blocks``); each block gets its own copy of the base scorer (its own
    preprocessing and mixture for the GMM, its own class Gaussians for Mahalanobis). Single-layer features are
    one block, so ``PerLayer(s)`` then scores exactly as ``s``. For the GMM the sum is the log-likelihood of a
    product of per-layer densities (layers treated as independent).

    ``FailureDetector(per_layer=True)`` wraps its scorer in ``PerLayer``; it is not a registered name.

    Args:
        base: the (unfitted) scorer to copy per block; its settings are the settings of every copy.

    Attributes:
        blocks_: the block widths ``(D_1, …, D_L)`` fitted on; parts_: the fitted scorer of every block.
    """

    def __init__(self, base: Scorer) -> None:  # not validated by pydantic: base is an object
        if not isinstance(base, Scorer) or isinstance(base, PerLayer):
            raise TypeError("PerLayer needs a (non-PerLayer) Scorer to copy per layer block")
        self.base = base
        self.name = base.name
        self._context = ModelContext()

    @property
    def requires_labels(self) -> bool:  # type: ignore[override]
        return self.base.requires_labels

    @property
    def requires_logits(self) -> bool:  # type: ignore[override]
        return self.base.requires_logits

    @property
    def requires_inputs(self) -> bool:  # type: ignore[override]
        return self.base.requires_inputs

    @property
    def requires_model(self) -> bool:  # type: ignore[override]
        return self.base.requires_model

    def distributable(self) -> bool:
        """As the base scorer: every block's copy fits alike."""
        return self.base.distributable()

    def get_params(self) -> dict[str, Any]:
        """The base scorer's settings (every block's copy has them)."""
        return self.base.get_params()

    def new_part(self) -> Scorer:
        """A fresh, unfitted copy of the base scorer."""
        return build_scorer(self.base.name, self.base.get_params())

    def attach(self, context: ModelContext) -> None:
        self._context = context
        if self.is_fitted():
            for part, block in zip(self.parts_, self.block_slices(), strict=True):
                part.attach(context.with_block(block))

    def block_slices(self) -> list[slice]:
        """The column slice of every fitted block."""
        self.check_fitted()
        return Features(torch.zeros(0, sum(self.blocks_)), blocks=self.blocks_).block_slices()

    def _parts_for(self, features: Features) -> list[Features]:
        fitted = self.blocks_
        if features.blocks is not None and features.blocks != fitted and len(fitted) > 1:
            raise ValueError(f"features have layer blocks {features.blocks}; the scorer was fitted on {fitted}")
        if features.feats.shape[1] != sum(fitted):
            raise ValueError(f"features have dimension {features.feats.shape[1]}, expected {sum(fitted)}")
        shaped = Features(
            features.feats, features.logits, features.labels, features.inputs, fitted if len(fitted) > 1 else None
        )
        return [shaped.select_blocks(i) for i in range(len(fitted))]

    def fit(self, features: Features) -> PerLayer:
        blocks = features.blocks or (features.feats.shape[1],)
        slices = features.block_slices()
        parts = []
        for i, block in enumerate(slices):
            part = self.new_part()
            part.attach(self._context.with_block(block))
            part.fit(features.select_blocks(i))
            parts.append(part)
        self.blocks_, self.parts_ = tuple(blocks), parts
        return self

    def validation_use(self) -> ValidationUse:
        """As the base scorer (:func:`validation_use_of`): every block's copy has its settings."""
        return validation_use_of(self.base)

    def fit_validation(self, features: Features) -> PerLayer:
        self.check_fitted()
        for part, block in zip(self.parts_, self._parts_for(features), strict=True):
            part.fit_validation(block)
        return self

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        scores = [
            part.score(block).double().cpu() for part, block in zip(self.parts_, self._parts_for(features), strict=True)
        ]
        return torch.stack(scores).sum(0).float()

    def as_module(self) -> nn.Module:
        self.check_fitted()
        stacked = stacked_gmm_module(self.parts_)  # GMM blocks: one fused module, a few kernels for all layers
        if stacked is not None:
            return stacked
        return BlockSumScoreModule(self.blocks_, [part.as_module() for part in self.parts_])

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        state: dict[str, Any] = {"blocks": torch.tensor(self.blocks_, dtype=torch.int64)}
        for i, part in enumerate(self.parts_):
            state.update({f"block{i}.{k}": v for k, v in part.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> PerLayer:
        if "blocks" not in state:
            raise ValueError("a per-layer scorer state needs 'blocks'")
        blocks = tuple(int(b) for b in torch.as_tensor(state["blocks"]).reshape(-1).tolist())
        if not blocks or any(b <= 0 for b in blocks):
            raise ValueError(f"per-layer blocks must be positive widths, got {blocks}")
        known = {"blocks"} | {k for k in state if any(k.startswith(f"block{i}.") for i in range(len(blocks)))}
        if set(state) - known:
            raise ValueError(f"unexpected per-layer state keys {sorted(set(state) - known)[:5]}")
        parts = []
        for i in range(len(blocks)):
            prefix = f"block{i}."
            parts.append(
                self.new_part().load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            )
        self.blocks_, self.parts_ = blocks, parts
        self.attach(self._context)
        return self

    def __repr__(self) -> str:
        return f"PerLayer({self.base!r})"
