"""ODIN (Liang et al., 2018): temperature-scaled maximum softmax after a small input perturbation."""

from __future__ import annotations

import contextlib
import itertools
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..distributed import all_gather_rows
from ..features import Features
from ..metrics import auroc
from .base import ModelContext, Scorer, ValidationUse, check_features, register_scorer
from .energy import check_keys, scalar
from .modules import LogitScoreModule

__all__ = ["ODIN"]


@register_scorer("odin")
class ODIN(Scorer):
    """``score(x) = max_c softmax(z(x̃) / T)_c`` with ``x̃ = x − ε · sign(−∇_x log max_c softmax(z(x) / T)_c)``.

    ``z`` are the model's logits; the perturbation raises the softmax score of the predicted class (one signed
    gradient step of size ``ε`` in the model's input space — the authors' code divides the step by the
    normalisation's per-channel std because it perturbs before normalising; here the model's own inputs are
    perturbed). With ``ε = 0`` the score is the temperature-scaled max softmax of the logits and needs no
    model. Computed in float64 from the logits. Higher = more normal.

    The defaults ``T = 1000``, ``ε = 0.0014`` are the paper's CIFAR-10 values, which Liang et al. **tuned on OOD
    data**. ``temperature="auto"`` and/or ``epsilon="auto"`` instead choose them in :meth:`fit_validation`
    (``FailureDetector.calibrate``/``fit_validation``) by the AUROC of telling the model's correct from its wrong
    predictions on the labelled **in-distribution** validation split, over ``TEMPERATURE_GRID`` ×
    ``EPSILON_GRID`` (ties go to the smaller ε, then the smaller T); until then an ``"auto"`` setting stands at
    ``T = 1`` / ``ε = 0`` (plain max softmax). Never tuned on OOD or adversarial samples here.

    Needs the model and the inputs when ``ε > 0`` (``requires_model``, ``requires_inputs``; through
    ``FailureDetector`` they are attached). ``as_module()`` exists only for ``ε = 0``: the perturbation needs
    the input gradient, which a module of ``(feats, logits)`` cannot take.

    Paper: Liang, Li & Srikant, "Enhancing the reliability of out-of-distribution image detection in neural
    networks", ICLR 2018.

    Args:
        temperature: ``T > 0`` or ``"auto"``.
        epsilon: ``ε ≥ 0`` or ``"auto"``.
        batch_size: inputs per forward/backward pass when perturbing.

    Attributes:
        temperature_, epsilon_: the values in use; search_: ``{(T, ε): validation AUROC}`` after an "auto" search.
    """

    supports_distributed = True  # the validation search ranks all ranks' scores together

    requires_logits = True
    TEMPERATURE_GRID: ClassVar[tuple[float, ...]] = (1.0, 10.0, 100.0, 1000.0)
    EPSILON_GRID: ClassVar[tuple[float, ...]] = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.004)

    def __init__(
        self,
        temperature: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | Literal["auto"] = 1000.0,
        epsilon: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | Literal["auto"] = 0.0014,
        batch_size: Annotated[int, Field(ge=1)] = 256,
    ) -> None:
        self.temperature = temperature
        self.epsilon = epsilon
        self.batch_size = batch_size
        self._context = ModelContext()

    @property
    def requires_inputs(self) -> bool:  # type: ignore[override]
        return self.epsilon != 0.0

    requires_model = requires_inputs

    def attach(self, context: ModelContext) -> None:
        """Receive the classifier and the detector's hook factory (used for the perturbation)."""
        self._context = context

    def fit(self, features: Features) -> ODIN:
        """Nothing to learn from the training features; sets the values in use (``"auto"``: T = 1, ε = 0)."""
        check_features(features, logits=True, who="odin")
        self.temperature_ = 1.0 if self.temperature == "auto" else float(self.temperature)
        self.epsilon_ = 0.0 if self.epsilon == "auto" else float(self.epsilon)
        return self

    def validation_use(self) -> ValidationUse:
        return "labels" if "auto" in (self.temperature, self.epsilon) else "nothing"

    def fit_validation(self, features: Features) -> ODIN:
        """With an ``"auto"`` setting: choose it on labelled validation data (correct vs wrong predictions)."""
        if self.temperature != "auto" and self.epsilon != "auto":
            return self
        self.check_fitted()
        check_features(features, labels=True, logits=True, who="odin")
        known = features.labels >= 0
        correct = all_gather_rows(features.correct[known])  # under torch.distributed: all ranks' rows
        if correct.all() or (~correct).all():
            return self  # one kind of prediction only: nothing to rank, keep the values in use
        temps = self.TEMPERATURE_GRID if self.temperature == "auto" else (float(self.temperature),)
        epsilons = self.EPSILON_GRID if self.epsilon == "auto" else (float(self.epsilon),)
        grid = list(itertools.product(temps, epsilons))
        scores = self.scores_for(features, grid)
        search = {}
        for setting, s in scores.items():
            s = all_gather_rows(s[known])
            search[setting] = auroc(s[correct], s[~correct])
        self.temperature_, self.epsilon_ = max(search, key=lambda te: (search[te], -te[1], -te[0]))
        self.search_ = search
        return self

    def scores_for(self, features: Features, settings: list[tuple[float, float]]) -> dict[tuple[float, float], Any]:
        """``{(T, ε): (N,) float64 scores}`` for every setting, one backward pass per ``T`` per batch."""
        out: dict[tuple[float, float], list[torch.Tensor]] = {s: [] for s in settings}
        if all(e == 0.0 for _, e in settings):
            if features.logits is None:
                raise ValueError("odin needs logits; these features have none")
            return {(t, e): _max_softmax(features.logits, t) for t, e in settings}
        temps = sorted({t for t, e in settings if e > 0.0})
        batches = self._context.input_batches(features, self.batch_size, "odin with epsilon > 0")
        with contextlib.closing(batches):
            for x, hook in batches:
                x_in = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    _, z = hook(x_in)
                    predicted = z.argmax(dim=1)
                    steps = {}
                    for i, t in enumerate(temps):
                        # −log softmax(z/T)_ŷ summed over the batch; its gradient sign is per input
                        loss = F.cross_entropy(z / t, predicted, reduction="sum")
                        (grad,) = torch.autograd.grad(loss, x_in, retain_graph=i + 1 < len(temps))
                        steps[t] = grad.sign()
                z = z.detach()
                for t, e in settings:
                    if e == 0.0:
                        out[(t, e)].append(_max_softmax(z, t).cpu())
                        continue
                    with torch.no_grad():
                        _, z_tilde = hook(x - e * steps[t])
                    out[(t, e)].append(_max_softmax(z_tilde, t).cpu())
        empty = torch.zeros(0, dtype=torch.float64)  # no input row (a rank's empty shard)
        return {s: torch.cat(v) if v else empty for s, v in out.items()}

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        setting = (self.temperature_, self.epsilon_)
        return self.scores_for(features, [setting])[setting].float()

    def as_module(self) -> nn.Module:
        """For ``ε = 0`` only: ``nn.Module(feats, logits) -> (N,)``, the temperature-scaled max softmax."""
        self.check_fitted()
        if self.epsilon_ != 0.0:
            raise TypeError(
                "scorer 'odin' with epsilon > 0 has no module form: its input perturbation needs the gradient "
                "with respect to the inputs, which as_module()'s (feats, logits) module cannot take; "
                "use epsilon=0 to deploy"
            )
        t = self.temperature_
        return LogitScoreModule(lambda logits: _max_softmax(logits, t).float())

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        return {"temperature": float(self.temperature_), "epsilon": float(self.epsilon_)}

    def load_state_dict(self, state: dict[str, Any]) -> ODIN:
        check_keys(state, {"temperature", "epsilon"}, "odin")
        temperature = scalar(state, "temperature", "odin")
        if not temperature > 0:
            raise ValueError(f"odin: the temperature must be > 0, got {temperature}")
        epsilon = scalar(state, "epsilon", "odin", low=0.0)
        for name, value, given in (("temperature", temperature, self.temperature), ("epsilon", epsilon, self.epsilon)):
            if given != "auto" and value != float(given):
                raise ValueError(f"odin: the saved {name} {value} differs from the setting {given}")
        self.temperature_, self.epsilon_ = temperature, epsilon
        return self


def _max_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=1).max(dim=1).values
