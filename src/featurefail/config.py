"""The settings of a :class:`~featurefail.FailureDetector`: :class:`DetectorConfig` and the named presets.

A detector's config holds the scorer's name and settings plus the detector's own settings. The defaults of
``FailureDetector()`` are :data:`DEFAULT_DETECTOR`, written once here; a scorer's own defaults are its ``__init__``
defaults, filled into ``scorer_options`` when a detector is built, so ``detector.config`` shows every value in use.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .scorers.base import Scorer, available_scorers, build_scorer, scorer_class
from .scorers.per_layer import PerLayer

__all__ = ["DEFAULT_DETECTOR", "PAPER_DETECTOR", "DetectorConfig", "build_config"]

#: What ``FailureDetector()`` builds when no scorer is named (chosen by the study in ``docs/results.md``): one
#: mixture per layer on L2-normalised features of the penultimate layer and two earlier stage ends.
DEFAULT_DETECTOR: dict[str, Any] = {
    "scorer": "gmm",
    "scorer_options": {"preprocess": "l2"},
    "layer": "auto",
    "per_layer": True,
}
#: The paper's method exactly: one mixture on the raw penultimate features (``FailureDetector.paper()``).
PAPER_DETECTOR: dict[str, Any] = {"scorer": "gmm", "scorer_options": {}, "layer": None, "per_layer": False}

# detector settings that, when a scorer has a setting of the same role and the user gave none, become its default
_FORWARDED = {"seed": ("random_state", "seed"), "device": ("device",)}


class DetectorConfig(BaseModel):
    """Settings of a :class:`FailureDetector`: the scorer's name and settings, plus the detector's own.

    ``scorer_options`` are the scorer's settings (its ``__init__`` keyword arguments; a :class:`FailureDetector`
    stores all of them, defaults included, so the config shows every value in use). A setting the scorer does
    not take is a ``ValueError`` naming both.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    scorer: str = Field("gmm", description="registered scorer name")
    scorer_options: dict[str, Any] = Field(default_factory=dict, description="the scorer's settings")
    per_layer: bool = Field(False, description="one copy of the scorer per layer block, scores summed")
    layer: str | list[str | None] | None = Field(
        None,
        description="dotted module name; None = input of the classifier head; a list = several layers, pooled and "
        "concatenated (None in the list = the penultimate layer); 'auto' = the penultimate layer plus the ends of "
        "the two stages before the last (resolved at fit time into layers_)",
    )
    pool: Literal["avg", "flatten", "none"] = "avg"
    device: str | None = Field(None, description="where scorers run (default of a scorer's own device setting)")
    seed: int | None = Field(0, description="calibration folds; default of a scorer's random_state/seed setting")
    batch_size: int = Field(256, ge=1, description="batch size when scoring a tensor of inputs")
    progress: bool = True

    @field_validator("layer")
    @classmethod
    def _valid_layer(cls, value: str | list[str | None] | None) -> str | list[str | None] | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("layer is an empty list; name at least one layer (None = the penultimate one)")
            if len(set(value)) != len(value):
                raise ValueError(f"layer lists a module twice: {value}")
            if len(value) == 1:
                return value[0]
        return value

    @field_validator("device")
    @classmethod
    def _valid_device(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                device = torch.device(value)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"{value!r} is not a torch device") from exc
            if device.type == "meta":
                raise ValueError("device 'meta' holds no data; use 'cpu' or an accelerator")
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"device {value!r}: CUDA is not available in this torch ({torch.__version__}); use 'cpu' (a "
                    "detector saved on a GPU loads with FailureDetector.load(path, device='cpu'))"
                )
        return value

    @model_validator(mode="after")
    def _scorer_takes_its_settings(self) -> DetectorConfig:
        known = scorer_class(self.scorer).setting_names()
        unknown = [k for k in self.scorer_options if k not in known]
        if unknown:
            raise ValueError(
                f"scorer {self.scorer!r} has no setting {unknown[0]!r}; its settings are: {', '.join(known) or 'none'}"
            )
        if isinstance(self.scorer_options.get("device"), str):  # the scorer's own device: the same rules
            self._valid_device(self.scorer_options["device"])
        return self


def build_config(scorer: str | Scorer | None, kwargs: dict[str, Any]) -> DetectorConfig:
    """The config of ``FailureDetector(scorer=..., **kwargs)``: detector fields, then the scorer's settings, all
    explicit (the scorer's defaults filled in), so ``detector.config`` shows every value in use."""
    fields = set(DetectorConfig.model_fields) - {"scorer", "scorer_options"}
    own = {k: v for k, v in kwargs.items() if k in fields}
    settings = dict(kwargs.get("scorer_options") or {})
    settings |= {k: v for k, v in kwargs.items() if k not in fields and k not in ("scorer_options", "scorer")}
    if isinstance(scorer, Scorer):
        if settings:
            raise ValueError(
                f"settings {sorted(settings)} were given beside a scorer instance; give them to the scorer itself"
            )
        if isinstance(scorer, PerLayer):
            own.setdefault("per_layer", True)
            scorer = scorer.base
        name, settings = scorer.name, scorer.get_params()
        if name not in available_scorers() or scorer_class(name) is not type(scorer):
            raise ValueError(
                f"{type(scorer).__name__} is not registered: decorate it with @register_scorer('name') so that a "
                "detector can rebuild it (save/load find scorers by name)"
            )
    else:
        preset = DEFAULT_DETECTOR if scorer is None else {"scorer": scorer, "scorer_options": {}}
        name = preset["scorer"]
        if not isinstance(name, str):
            raise TypeError(f"scorer must be a registered name or a Scorer instance, got {type(name).__name__}")
        own = {k: v for k, v in preset.items() if k not in ("scorer", "scorer_options")} | own
        settings = preset["scorer_options"] | settings
        known = scorer_class(name).setting_names()
        for detector_field, roles in _FORWARDED.items():
            for role in roles:
                if role in known and role not in settings and own.get(detector_field) is not None:
                    settings[role] = own[detector_field]
        try:
            settings = build_scorer(name, settings).get_params()
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    try:
        return DetectorConfig(scorer=name, scorer_options=settings, **own)
    except ValidationError as exc:
        raise ValueError(f"invalid FailureDetector settings:\n{exc}") from None
