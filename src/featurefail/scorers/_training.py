"""Shared pieces of the neural density scorers: feature standardisation and a seeded Adam loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._tensor import progress
from ..distributed import require_single_process
from ..preprocess import floored_std


class Standardizer:
    """Per-dimension ``(f − mean) / std`` fitted on training features; ``log_det`` corrects log-likelihoods."""

    def __init__(self, feats: torch.Tensor) -> None:
        f = feats.double()
        self.mean = f.mean(0)
        self.std = floored_std(f.std(0))
        self.log_det = -torch.log(self.std).sum()  # log |d z / d f|

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats.double() - self.mean.to(feats.device)) / self.std.to(feats.device)).float()

    def state(self) -> dict[str, torch.Tensor]:
        return {"std_mean": self.mean, "std_std": self.std}

    @classmethod
    def from_state(cls, state: dict) -> Standardizer:
        obj = cls.__new__(cls)
        obj.mean = torch.as_tensor(state["std_mean"]).double()
        obj.std = torch.as_tensor(state["std_std"]).double()
        obj.log_det = -torch.log(obj.std).sum()
        return obj


def resolve_device(device: str | None) -> torch.device:
    """The scorer's ``device`` setting as a ``torch.device`` (CPU when unset)."""
    return torch.device(device) if device else torch.device("cpu")


def network_state(module: nn.Module, extra: dict | None = None) -> dict:
    """A network's parameters under ``net.`` (CPU tensors), plus ``extra`` entries."""
    state = {f"net.{k}": v.detach().cpu() for k, v in module.state_dict().items()}
    state.update(extra or {})
    return state


def load_network(module: nn.Module, state: dict, device: str | None) -> nn.Module:
    """Load the ``net.`` entries of ``state`` into ``module``, move it to ``device`` and set eval mode."""
    module.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    return module.to(resolve_device(device)).eval()


def train_density(
    module: nn.Module,
    data: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    desc: str,
    show_progress: bool,
    clip: float = 10.0,
) -> list[float]:
    """Minimise the mean of ``loss_fn(batch)`` with Adam; returns the mean loss of every epoch.

    Raises:
        RuntimeError: under ``torch.distributed`` with two or more ranks (each would train its own network).
    """
    require_single_process(desc)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    module.to(device).train()
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    history = []
    for _ in progress(range(epochs), enabled=show_progress, desc=desc, total=epochs):
        order = torch.randperm(data.shape[0], generator=g)
        total, count = 0.0, 0
        for start in range(0, data.shape[0], batch_size):
            batch = data[order[start : start + batch_size]].to(device)
            opt.zero_grad()
            loss = loss_fn(batch).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the training loss became {loss.item()}; lower lr")
            loss.backward()
            nn.utils.clip_grad_norm_(module.parameters(), clip)
            opt.step()
            total += float(loss.detach()) * batch.shape[0]
            count += batch.shape[0]
        history.append(total / count)
    module.eval()
    return history
