"""Loading a user's classifier for the command line: ``module:factory`` + weights, or a TorchScript file."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_model"]


class _ScriptedWithFeatures(nn.Module):
    """Wraps a TorchScript model returning ``(logits, features)`` so the features pass through a hookable tap."""

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.scripted = scripted
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scripted(x)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ValueError("a TorchScript model for featurefail must return (logits, penultimate_features)")
        logits, feats = out
        self.features(feats)
        return logits


def _factory(spec: str):
    if ":" not in spec:
        raise ValueError(f"--model must be 'package.module:factory' or 'path/to/file.py:factory', got {spec!r}")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"no such model file: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{where} has no callable {name!r}")
    return factory


def load_model(
    model: str | None = None, weights: str | None = None, torchscript: str | None = None
) -> tuple[nn.Module, str | None]:
    """The classifier in eval mode, and the layer to hook (None = the default).

    ``weights`` may be a safetensors file or a ``torch.save``d state dict (read with ``weights_only=True``:
    no pickled code runs). A TorchScript model must return ``(logits, features)``; its features are hooked.
    """
    if torchscript is not None:
        try:
            scripted = torch.jit.load(torchscript, map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{torchscript} is not a readable TorchScript file: {str(exc).splitlines()[0]}") from None
        return _ScriptedWithFeatures(scripted).eval(), "features"
    if model is None:
        raise ValueError("give --model module:factory (with --weights) or --torchscript FILE")
    net = _factory(model)()
    if not isinstance(net, nn.Module):
        raise TypeError(f"{model} returned a {type(net).__name__}, not an nn.Module")
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"no such weights file: {weights}")
        try:
            if str(weights).endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(weights)
            else:
                state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # safetensors, zip and unpickler errors have no common base; none ran code
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"{weights} is not a readable state dict (tensors only, no pickled code): {first}"
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{weights} holds a {type(state).__name__}, not a state dict of tensors")
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"the weights in {weights} do not fit {model}: {exc}") from None
    return net.eval(), None
