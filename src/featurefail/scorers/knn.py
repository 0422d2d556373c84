"""Deep nearest neighbours (Sun et al., 2022): distance to the k-th nearest normalised training feature."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..distributed import all_gather_rows, broadcast_json, row_offset, total_rows
from ..features import Features
from .base import Scorer, check_features, register_scorer
from .energy import check_keys, check_width
from .modules import KNNScoreModule

__all__ = ["KNN"]


@register_scorer("knn")
class KNN(Scorer):
    """``score(f) = −‖f/‖f‖ − b_(k)(f)‖``: minus the Euclidean distance of the L2-normalised features to their
    ``k``-th nearest neighbour among the L2-normalised training features (the bank). Higher = more normal.

    The search is exact: chunked matrix products with a running top-k (memory ``O(chunk_size²)``, never
    ``N_queries × N_bank``; a 50k × 512 bank needs its own 100 MB plus ~64 MB of work space), and the
    candidates' distances recomputed in float64 (see :func:`~featurefail.scorers.modules.kth_neighbour_distance`).
    Labels are not used. Scoring the training rows themselves counts each row as its own nearest neighbour.
    Under ``torch.distributed`` the bank is drawn from the union of all ranks' rows (in rank order) and every
    rank holds all of it (only the drawn rows are sent).

    ``k=50`` is the paper's CIFAR-10 choice (1000 on ImageNet with 1% of the bank). Sun et al. tuned ``k`` with
    outlier (OOD) validation data; here that default is kept and ``k`` may be chosen on in-distribution data
    only.

    Paper: Sun, Ming, Zhu & Li, "Out-of-distribution detection with deep nearest neighbors", ICML 2022.

    Args:
        k: the neighbour rank (``1 ≤ k ≤`` bank size).
        max_bank: keep at most this many training rows in the bank, drawn uniformly without replacement with
            ``random_state`` (the paper's ImageNet setting keeps 1%); None = all.
        random_state: seed of the bank subsample.
        chunk_size: rows of queries and of the bank per matrix product.
        device: where the search runs (``"cuda"``, ...); None = CPU.

    Attributes:
        bank_: ``(M, D)`` float32 normalised training features, on ``device``.
    """

    supports_distributed = True  # the bank is drawn from all ranks' rows, with one seed

    def __init__(
        self,
        k: Annotated[int, Field(ge=1)] = 50,
        max_bank: Annotated[int, Field(ge=1)] | None = None,
        random_state: int | None = 0,
        chunk_size: Annotated[int, Field(ge=1)] = 4096,
        device: str | None = None,
    ) -> None:
        self.k = k
        self.max_bank = max_bank
        self.random_state = random_state
        self.chunk_size = chunk_size
        self.device = device
        self._device()  # validates the device name now

    def _device(self) -> torch.device:
        try:
            return torch.device(self.device) if self.device else torch.device("cpu")
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r} is not a torch device") from exc

    def fit(self, features: Features) -> KNN:
        check_features(features, who="knn")
        n_local = len(features.feats)
        n_total = total_rows(n_local)
        if self.max_bank is not None and self.max_bank < n_total:
            seed = self.random_state
            if seed is None:
                seed = broadcast_json(torch.Generator().seed())  # rank 0's fresh seed on every rank
            g = torch.Generator().manual_seed(seed)
            drawn = torch.randperm(n_total, generator=g)[: self.max_bank].sort().values  # indices in the union
            offset = row_offset(n_local)
            local = drawn[(drawn >= offset) & (drawn < offset + n_local)] - offset
            feats = all_gather_rows(features.feats[local])  # only the drawn rows travel
        else:
            feats = all_gather_rows(features.feats)
        if not self.k <= len(feats):
            raise ValueError(f"knn: k={self.k} exceeds the {len(feats)} rows of the bank")
        self.bank_ = F.normalize(feats.double(), dim=1).float().to(self._device())
        return self

    def as_module(self) -> nn.Module:
        """``nn.Module(feats, logits) -> (N,)`` with the bank as a buffer (chunked top-k in ``forward``)."""
        self.check_fitted()
        return KNNScoreModule(self.bank_, self.k, self.chunk_size)

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        check_width(features, self.bank_.shape[1], "knn")
        return self.as_module()(features.feats).cpu()

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        return {"bank": self.bank_}

    def load_state_dict(self, state: dict[str, Any]) -> KNN:
        check_keys(state, {"bank"}, "knn")
        bank = state["bank"]
        if not isinstance(bank, torch.Tensor) or bank.ndim != 2 or bank.shape[0] < 1 or bank.shape[1] < 1:
            raise ValueError("knn: the bank must be a non-empty (M, D) tensor")
        if not torch.isfinite(bank).all():
            raise ValueError("knn: the bank holds NaN or infinite values")
        norms = torch.linalg.vector_norm(bank.double(), dim=1)
        if not bool((((norms - 1).abs() < 1e-3) | (norms == 0)).all()):
            raise ValueError("knn: the bank rows must be L2-normalised")
        if not self.k <= bank.shape[0]:
            raise ValueError(f"knn: k={self.k} exceeds the {bank.shape[0]} rows of the saved bank")
        self.bank_ = bank.detach().float().clone().to(self._device())
        return self
