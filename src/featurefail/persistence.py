"""Saving and loading a :class:`~featurefail.FailureDetector`: one safetensors file, versioned, validated.

The file holds tensors (the scorer's fitted state, the classifier head) and JSON metadata (format name and
version, the config, scalars, threshold, calibration, hooked layers, the model's fingerprint). Loading executes
nothing (no pickle) and validates every field: a hostile or damaged file gets a ``ValueError`` naming the problem.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from torch import nn

from .threshold import ThresholdResult

if TYPE_CHECKING:
    from .detector import FailureDetector

__all__ = ["load_detector", "save_detector"]


def save_detector(detector: FailureDetector, fitted: Any, path: str | Path) -> None:
    """Write ``detector`` (its fitted state ``fitted``) to ``path``."""
    from safetensors.torch import save_file

    from .detector import FORMAT_NAME, FORMAT_VERSION

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for key, value in fitted.scorer.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[f"scorer.{key}"] = value.detach().cpu().contiguous()
        elif isinstance(value, bool | int | float | str) or value is None:
            scalars[key] = value
        else:
            raise TypeError(f"scorer state {key!r} is a {type(value).__name__}; only tensors and numbers")
    if detector.threshold_ is not None and not math.isfinite(detector.threshold_):
        raise ValueError(f"threshold_ is {detector.threshold_}; a saved detector keeps a finite threshold or none")
    folder = Path(path).parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save the detector to {path}: the folder {folder} does not exist")
    if Path(path).is_dir():
        raise IsADirectoryError(f"cannot save the detector to {path}: it is a folder; give a file name in it")
    if fitted.head_weight is not None and fitted.head_bias is not None:
        tensors["head.weight"] = fitted.head_weight.contiguous()
        tensors["head.bias"] = fitted.head_bias.contiguous()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": detector.config.model_dump_json(),
        "scorer_scalars": json.dumps(scalars),
        "n_features": str(fitted.n_features),
        "threshold": json.dumps(detector.threshold_),
        "calibration": json.dumps(detector.calibration_.as_dict() if detector.calibration_ else None),
        "layers": json.dumps(fitted.layers),
        "model_fingerprint": json.dumps(fitted.fingerprint),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_detector(
    cls: type[FailureDetector],
    path: str | Path,
    model: nn.Module | None,
    *,
    output_fn: Callable[[Any], Any] | None,
    device: str | None,
    check_model: bool,
) -> FailureDetector:
    """Read a detector written by :func:`save_detector` (see ``FailureDetector.load``)."""
    from safetensors import SafetensorError, safe_open

    from .detector import FORMAT_NAME, FORMAT_VERSION, DetectorConfig, FittedState, model_fingerprint

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if device is not None:
        try:
            DetectorConfig(device=device)
        except ValidationError as exc:
            raise ValueError(f"device={device!r} is not usable: {exc.errors()[0]['msg']}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable featurefail detector (safetensors) file: {exc}") from None
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is a safetensors file but not a featurefail detector")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has detector format version {version}; this featurefail reads version {FORMAT_VERSION} "
            "(files of version 1 were written by featurefail 0.1: fit the detector again)"
        )
    try:
        raw = json.loads(metadata["config"])
        if not isinstance(raw, dict):
            raise ValueError("config is not a JSON object")
        if device is not None:
            raw["device"] = device
            if "device" in scorer_setting_names(raw):
                raw.setdefault("scorer_options", {})["device"] = device
        config = DetectorConfig.model_validate(raw)
        scalars = _json_object(metadata["scorer_scalars"], "scorer_scalars")
        threshold = _threshold(json.loads(metadata["threshold"]))
        calibration = _calibration(json.loads(metadata["calibration"]))
        n_features = int(metadata["n_features"])
        if n_features < 1:
            raise ValueError(f"n_features must be positive, got {n_features}")
        layers = json.loads(metadata.get("layers", "null"))
        if layers is not None and not (
            isinstance(layers, list) and layers and all(isinstance(v, str) or v is None for v in layers)
        ):
            raise ValueError(f"layers must be a list of module names, got {layers!r}")
        fingerprint = json.loads(metadata.get("model_fingerprint", "null"))
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ValueError("model_fingerprint must be a string")
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise ValueError(f"{path} has damaged detector metadata: {exc}") from None
    allowed = {"head.weight", "head.bias"}
    strange = [k for k in tensors if k not in allowed and not k.startswith("scorer.")]
    if strange:
        raise ValueError(f"{path} holds unexpected tensors {strange[:5]}")
    head_weight, head_bias = tensors.get("head.weight"), tensors.get("head.bias")
    if (head_weight is None) != (head_bias is None) or (
        head_weight is not None
        and (head_weight.ndim != 2 or head_bias.shape != (head_weight.shape[0],) or head_weight.shape[1] > n_features)
    ):
        raise ValueError(f"{path} has a damaged classifier head (weight and bias shapes do not fit)")
    if head_weight is not None and not (torch.isfinite(head_weight).all() and torch.isfinite(head_bias).all()):
        raise ValueError(f"{path} has a damaged classifier head (NaN or infinite weights)")
    if model is not None and check_model and fingerprint is not None and model_fingerprint(model) != fingerprint:
        raise ValueError(
            "the model's weights differ from those the detector was fitted on (fingerprint mismatch): its features "
            "would be scored against another model's statistics. Fit the detector on this model, or pass "
            "check_model=False if you know the features are unchanged"
        )
    detector = cls(config, output_fn=output_fn)
    scorer = detector.new_scorer()
    state = {k[len("scorer.") :]: v for k, v in tensors.items() if k.startswith("scorer.")}
    clash = set(state) & set(scalars)
    if clash:
        raise ValueError(f"{path} has scorer entries both as tensor and as number: {sorted(clash)[:5]}")
    state.update(scalars)
    try:
        scorer.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ValueError(f"{path} has a damaged {config.scorer!r} scorer state: {exc}") from None
    _check_state_used(path, config.scorer, state, scorer.state_dict())
    fitted = FittedState(scorer, model, layers, n_features, head_weight, head_bias, fingerprint)
    detector.restore(fitted, threshold, calibration)
    return detector


def _check_state_used(path: str | Path, name: str, given: dict[str, Any], loaded: dict[str, Any]) -> None:
    """Every entry of the file's scorer state was used, and its numbers are those the loaded scorer holds."""
    unknown = sorted(set(given) - set(loaded))
    if unknown:
        raise ValueError(f"{path} has scorer state entries that the {name!r} scorer does not have: {unknown[:5]}")
    for key, value in given.items():
        if isinstance(value, torch.Tensor):
            continue
        held = loaded[key]
        both_nan = isinstance(value, float) and isinstance(held, float) and math.isnan(value) and math.isnan(held)
        if held != value and not both_nan:
            raise ValueError(f"{path} has scorer state {key!r} = {value!r}, but the loaded scorer has {held!r}")


def scorer_setting_names(raw_config: dict[str, Any]) -> list[str]:
    from .scorers.base import scorer_class

    return scorer_class(raw_config.get("scorer", "gmm")).setting_names()


def _json_object(text: str, what: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def _threshold(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"threshold must be a finite number or null, got {value!r}")
    return float(value)


def _calibration(value: Any) -> ThresholdResult | None:
    return None if value is None else ThresholdResult.from_dict(value)
