"""``torch.distributed`` collectives for fitting one detector on data split across processes.

Every rank passes its own rows (its shard); statistics are reduced over ranks, so all ranks end with the
detector that one process would fit on the union of the shards (rows in rank order). Outside an initialised
process group, or in a group of one rank, every helper is a no-op and single-process results are unchanged.

Tensors travel on the device the backend needs (CUDA for NCCL, the host for gloo) and come back on their own
device and dtype. Metadata travel as JSON bytes, never as pickles. Every helper is a collective: all ranks must
call it, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .features import Features
    from .scorers.base import Scorer

__all__ = [
    "DistributedError",
    "all_gather_json",
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "broadcast",
    "broadcast_json",
    "distributed_info",
    "extract_shard",
    "is_distributed",
    "rank",
    "require_distributable",
    "require_identical",
    "require_single_process",
    "row_offset",
    "run_on_rank_zero",
    "state_digest",
    "synchronise_scorer",
    "total_rows",
    "union_labels",
    "world_size",
]

logger = logging.getLogger(__name__)

_EMPTY_LOADER = "the loader yielded no samples"  # featurefail.features.extract_features's message


class DistributedError(RuntimeError):
    """Another rank failed, or the ranks disagree (raised on every rank so none waits in a collective)."""


def distributed_info() -> tuple[bool, int, int]:
    """``(active, rank, world_size)``; ``active`` is False outside a process group of two or more ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        return world > 1, torch.distributed.get_rank(), world
    return False, 0, 1


def is_distributed() -> bool:
    """True inside an initialised process group of two or more ranks."""
    return distributed_info()[0]


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return distributed_info()[1]


def world_size() -> int:
    """The number of ranks (1 outside a process group)."""
    return distributed_info()[2]


def _comm_device(t: torch.Tensor) -> torch.device:
    backend = str(torch.distributed.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return t.device  # a device-dispatching backend ("cpu:gloo,cuda:nccl") takes tensors where they are


def _to_wire(t: torch.Tensor) -> torch.Tensor:
    wire = t.to(_comm_device(t))
    return wire.to(torch.uint8) if wire.dtype == torch.bool else wire.contiguous()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks **in place** and return it (every rank gets the same bits)."""
    if not is_distributed():
        return t
    wire = _to_wire(t)
    torch.distributed.all_reduce(wire)
    if wire is not t:
        t.copy_(wire.to(t.device, t.dtype))
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` **in place** with rank ``src``'s value on every rank and return it."""
    if not is_distributed():
        return t
    wire = _to_wire(t)
    torch.distributed.broadcast(wire, src=src)
    if wire is not t:
        t.copy_(wire.to(t.device, t.dtype))
    return t


def barrier() -> None:
    """Wait until every rank gets here (a no-op outside a process group)."""
    if is_distributed():
        torch.distributed.barrier()


def _gather_pieces(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same dtype and trailing shape; any number of rows, zero included), in rank order."""
    _, _, world = distributed_info()
    wire = _to_wire(t)
    n = torch.tensor([wire.shape[0]], dtype=torch.int64, device=wire.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    rows = [int(s.item()) for s in sizes]
    longest = max(rows)
    padded = torch.zeros((longest, *wire.shape[1:]), dtype=wire.dtype, device=wire.device)
    padded[: wire.shape[0]] = wire
    out = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return [piece[:r].to(t.device, t.dtype) for piece, r in zip(out, rows, strict=True)]


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of every rank's ``t (n_r, ...)`` concatenated in rank order (``n_r`` may differ, or be 0).

    The trailing shape and dtype must be the same on every rank. Outside a process group: ``t`` itself.
    """
    if not is_distributed():
        return t
    return torch.cat(_gather_pieces(t))


def total_rows(n: int) -> int:
    """``n`` summed over ranks."""
    if not is_distributed():
        return n
    return int(all_reduce_sum(torch.tensor([n], dtype=torch.int64)).item())


def union_labels(labels: torch.Tensor) -> torch.Tensor:
    """The sorted distinct values of ``labels`` over all ranks (``torch.unique`` of the union)."""
    return torch.unique(all_gather_rows(torch.unique(labels).long().cpu())).to(labels.device)


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (``[obj]`` outside a process group)."""
    if not is_distributed():
        return [obj]
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    return [json.loads(bytes(p.tolist()).decode()) for p in _gather_pieces(payload)]


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-serialisable ``obj`` on every rank (the others' ``obj`` is ignored)."""
    if not is_distributed():
        return obj
    payload = json.dumps(obj).encode() if rank() == src else b""
    size = broadcast(torch.tensor([len(payload)], dtype=torch.int64), src)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8)
    if rank() == src:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    return json.loads(bytes(broadcast(buffer, src).tolist()).decode())


def _broadcast_mixed(values: dict[str, Any], src: int) -> dict[str, Any]:
    """Rank ``src``'s dict of tensors and JSON values on every rank."""
    spec = {
        k: {"tensor": [list(v.shape), str(v.dtype).removeprefix("torch.")]}
        if isinstance(v, torch.Tensor)
        else {"json": v}
        for k, v in values.items()
    }
    spec = broadcast_json(spec if rank() == src else None, src)
    out: dict[str, Any] = {}
    for key, entry in spec.items():
        if "json" in entry:
            out[key] = entry["json"]
            continue
        shape, dtype = entry["tensor"]
        local = values.get(key)
        if rank() == src:
            buffer = local.detach().clone()
        else:  # on this rank's device for the value when it has one
            device = local.device if isinstance(local, torch.Tensor) else torch.device("cpu")
            buffer = torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
        out[key] = broadcast(buffer, src)
    return out


def _raise_if_any_failed(error: BaseException | None) -> None:
    """Collective: every rank learns whether any rank failed; the failing rank re-raises its own error."""
    messages = all_gather_json(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise DistributedError(f"rank {r} failed, so this rank stops too: {m}")


def row_offset(n_local: int) -> int:
    """Index of this rank's first row in the union of the shards (rows in rank order): ranks below it hold that many."""
    active, rank_, _ = distributed_info()
    if not active:
        return 0
    counts = all_gather_rows(torch.tensor([n_local], dtype=torch.int64))
    return int(counts[:rank_].sum().item())


def split_union(n_local: int, n_drawn: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's row indices (sorted) among ``n_drawn`` rows drawn by a seeded permutation of the union of all
    ranks' rows (rows in rank order), and of the rest: the split one process would draw on the concatenated
    shards. Outside a process group, a seeded split of ``n_local`` rows."""
    n = total_rows(n_local)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    drawn = torch.zeros(n, dtype=torch.bool)
    drawn[order[:n_drawn]] = True
    offset = row_offset(n_local)
    mine = drawn[offset : offset + n_local]
    return torch.nonzero(mine).flatten(), torch.nonzero(~mine).flatten()


def require_single_process(what: str) -> None:
    """Raise a clear ``RuntimeError`` when called inside a process group of two or more ranks."""
    active, _, world = distributed_info()
    if active:
        raise RuntimeError(
            f"{what} cannot be fitted across processes: under torch.distributed (world size {world}) each rank "
            "would train its own network on its shard. Fit it in one process (gather the features first), or "
            "use a scorer that supports torch.distributed (every scorer but vae, maf and pixelcnn)"
        )


def require_distributable(scorer: Scorer, validation: bool = False) -> None:
    """Under a process group, raise unless ``scorer.distributable()`` (its fit reduces over ranks).

    With ``validation``: only when the scorer learns from validation data (``validation_use_of`` is not
    ``"nothing"``); a scorer that does not (a VAE loaded from a file, say) can be calibrated across ranks, its
    scores pooled.
    """
    from .scorers.base import validation_use_of

    if not is_distributed() or scorer.distributable():
        return
    if validation and validation_use_of(scorer) == "nothing":
        return
    require_single_process(f"scorer {scorer.name!r} ({type(scorer).__name__})")


# ---- features of a shard -------------------------------------------------------------------------------------


def _describe(features: Features) -> dict[str, Any]:
    return {
        "d": int(features.feats.shape[1]),
        "logits": None if features.logits is None else int(features.logits.shape[1]),
        "labels": features.labels is not None,
        "inputs": None if features.inputs is None else list(features.inputs.shape[1:]),
        "blocks": None if features.blocks is None else list(features.blocks),
    }


def _empty_like(meta: dict[str, Any]) -> Features:
    from .features import Features

    return Features(
        torch.zeros(0, meta["d"]),
        None if meta["logits"] is None else torch.zeros(0, meta["logits"]),
        torch.zeros(0, dtype=torch.int64) if meta["labels"] else None,
        None if meta["inputs"] is None else torch.zeros(0, *meta["inputs"]),
        None if meta["blocks"] is None else tuple(meta["blocks"]),
    )


def extract_shard(
    extract: Callable[[], tuple[Features, dict[str, Any]]],
) -> tuple[Features, dict[str, Any]]:
    """Run ``extract()`` (features of this rank's shard plus a dict of tensors and JSON values) on every rank.

    Outside a process group this is ``extract()``. Inside one it is a collective that lets a rank's shard be
    empty: that rank gets zero-row features shaped like the others', and the dict (e.g. resolved layers, the
    classifier head: what only a forward pass reveals) of the lowest rank holding rows, which every rank adopts.
    An error on any rank is raised on every rank (a :class:`DistributedError` on the others), so none waits
    forever in a later collective.

    Raises:
        ValueError: when every rank's loader is empty, or the ranks' features disagree in shape or content
            (feature width, logits, labels, layer blocks).
    """
    if not is_distributed():
        return extract()
    features: Features | None = None
    extra: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        features, extra = extract()
    except ValueError as exc:
        if str(exc) != _EMPTY_LOADER:
            error = exc
    except Exception as exc:  # re-raised below, after telling the other ranks
        error = exc
    _raise_if_any_failed(error)
    metas = all_gather_json(None if features is None else _describe(features))
    holding = [r for r, m in enumerate(metas) if m is not None]
    if not holding:
        raise ValueError(f"the loaders of all {len(metas)} ranks yielded no samples")
    source = holding[0]
    for r in holding[1:]:
        if metas[r] != metas[source]:
            raise ValueError(
                f"rank {r}'s features disagree with rank {source}'s: {metas[r]} vs {metas[source]} "
                "(feature width, logits, labels, inputs, layer blocks)"
            )
    if features is None:
        features = _empty_like(metas[source])
    return features, _broadcast_mixed(extra, source)


# ---- one fitted detector on every rank -----------------------------------------------------------------------


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a state dict (keys, tensor dtypes, shapes and bytes; plain values as JSON)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(f"{key}|{json.dumps(value)}|".encode())
    return digest.hexdigest()


def _schema(state: dict[str, Any]) -> dict[str, Any]:
    return {
        k: [list(v.shape), str(v.dtype)] if isinstance(v, torch.Tensor) else type(v).__name__
        for k, v in sorted(state.items())
    }


def synchronise_scorer(scorer: Scorer) -> bool:
    """Make every rank hold rank 0's fitted state, bit for bit; returns True when a rank had to adopt it.

    The reductions give every rank the same statistics, so the fitted states normally agree exactly (the
    SHA-256 of the states is compared); when floating-point nondeterminism (GPU kernels, different devices)
    makes them differ in the last bits, the other ranks load rank 0's state.

    Raises:
        DistributedError: when the ranks' states differ in structure (keys, shapes, dtypes): a scorer whose fit
            does not reduce over ranks.
    """
    if not is_distributed():
        return False
    state = scorer.state_dict()
    digests = all_gather_json([state_digest(state), _schema(state)])
    if all(d[0] == digests[0][0] for d in digests):
        return False
    if any(d[1] != digests[0][1] for d in digests):
        raise DistributedError(
            f"the ranks fitted {type(scorer).__name__} states of different structure; its fit does not reduce over "
            "ranks (declare supports_distributed only for scorers whose fit does)"
        )
    synced = _broadcast_mixed(state, 0)
    if rank() != 0:
        scorer.load_state_dict(synced)
    logger.info("fitted states differed in the last bits across ranks; every rank now holds rank 0's")
    return True


def run_on_rank_zero(action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0 only (e.g. writing a file), then wait for it on every rank; an error on rank 0
    is raised on every rank. Outside a process group: ``action()``."""
    if not is_distributed():
        action()
        return
    error: BaseException | None = None
    if rank() == 0:
        try:
            action()
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    _raise_if_any_failed(error)


def require_identical(values: dict[str, Any], what: str) -> None:
    """Raise a :class:`DistributedError` on every rank unless every rank's ``values`` (tensors and JSON values)
    are bit-identical (their :func:`state_digest` is compared)."""
    if not is_distributed():
        return
    digests = all_gather_json(state_digest(values))
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise DistributedError(f"{what} differs between rank 0 and rank(s) {differing}")
