"""``torch.distributed`` helpers of EM: every rank passes its own rows; statistics are summed over ranks.

Thin names over :mod:`featurefail.distributed` (the one place of the collectives). Outside an initialised
process group (or with one rank) every helper is a no-op.
"""

from __future__ import annotations

import torch

from ..distributed import all_gather_rows, all_reduce_sum, broadcast, distributed_info, row_offset

__all__ = ["all_gather_rows", "all_reduce_", "broadcast_", "distributed_info", "row_offset"]


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op outside ``torch.distributed``)."""
    return all_reduce_sum(t)


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """Overwrite ``t`` with rank 0's value on every rank."""
    return broadcast(t, 0)
