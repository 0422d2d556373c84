"""``torch.distributed`` helpers: every rank passes its own rows; statistics are summed over ranks.

Outside an initialised process group (or with one rank) every helper is a no-op.
"""

from __future__ import annotations

import torch

__all__ = ["all_reduce_", "broadcast_", "distributed_info"]


def distributed_info() -> tuple[bool, int, int]:
    """``(active, rank, world_size)``; ``active`` is False outside a process group of two or more ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        return world > 1, torch.distributed.get_rank(), world
    return False, 0, 1


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op outside ``torch.distributed``)."""
    active, _, _ = distributed_info()
    if not active:
        return t
    if torch.distributed.get_backend() == "gloo" and t.is_cuda:
        host = t.cpu()
        torch.distributed.all_reduce(host)
        t.copy_(host)
    else:
        torch.distributed.all_reduce(t)
    return t


def broadcast_(t: torch.Tensor) -> torch.Tensor:
    """Overwrite ``t`` with rank 0's value on every rank."""
    active, _, _ = distributed_info()
    if not active:
        return t
    if torch.distributed.get_backend() == "gloo" and t.is_cuda:
        host = t.cpu()
        torch.distributed.broadcast(host, src=0)
        t.copy_(host)
    else:
        torch.distributed.broadcast(t, src=0)
    return t
