"""Conformal fusion: component scores turned into conformal p-values on in-distribution data, then combined."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..distributed import all_gather_rows, split_union, total_rows
from ..features import Features
from .base import Scorer, ValidationUse, build_scorer, check_features, register_scorer
from .gmm import GMMScorer
from .mahalanobis import TiedGaussians
from .per_layer import PerLayer

__all__ = ["COMBINE_RULES", "ConformalFusion", "ConformalFusionModule", "combine_p_values", "conformal_p_values"]

#: the p-value combination rules :class:`ConformalFusion` offers (``combine=``)
COMBINE_RULES = ("fisher", "bonferroni", "simes", "mean", "harmonic")


def conformal_p_values(calibration: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``p(s) = (1 + #{c ∈ calibration : c ≤ s}) / (n + 1)`` for every score (higher score = more normal).

    Args:
        calibration: ``(n,)`` in-distribution scores, **sorted ascending**.
        scores: ``(N,)`` scores of new inputs.

    Returns:
        ``(N,)`` float64 p-values in ``[1/(n+1), 1]``. If ``s`` and the calibration scores are exchangeable (and
        continuous), ``P(p(s) ≤ k/(n+1)) = k/(n+1)``: a small p-value means an unusually low score.
    """
    n = calibration.shape[0]
    below = torch.searchsorted(calibration, scores.to(calibration.dtype).contiguous(), right=True)
    return (1.0 + below.double()) / (n + 1.0)


def combine_p_values(p: torch.Tensor, rule: str) -> torch.Tensor:
    """Combine per-component p-values ``p (N, K)`` into one score ``(N,)``, higher = more normal.

    The score is the log of the combined p-value (monotone transforms dropped, they do not change a ranking):

    * ``"fisher"``: ``Σ_k log p_k`` (Fisher's statistic is ``−2 Σ log p_k``);
    * ``"bonferroni"``: ``log(K · min_k p_k)`` (min-p with Bonferroni);
    * ``"simes"``: ``log min_i (K · p_(i) / i)`` over the sorted p-values;
    * ``"mean"``: ``log mean_k p_k``;
    * ``"harmonic"``: ``log(K / Σ_k 1/p_k)`` (the harmonic mean p-value).
    """
    k = p.shape[1]
    if rule == "fisher":
        return torch.log(p).sum(1)
    if rule == "bonferroni":
        return torch.log(k * p.min(1).values)
    if rule == "simes":
        ranks = torch.arange(1, k + 1, dtype=p.dtype, device=p.device)
        return torch.log((k * p.sort(1).values / ranks).min(1).values)
    if rule == "mean":
        return torch.log(p.mean(1))
    if rule == "harmonic":
        return torch.log(k / (1.0 / p).sum(1))
    raise ValueError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {rule!r}")


class MaxSoftmaxModule(nn.Module):
    """``max_c softmax(z)_c`` in float64: ``(N, C) -> (N,)``."""

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.double(), dim=1).max(dim=1).values


class EnergyModule(nn.Module):
    """``logsumexp(z)`` in float64 (the negative free energy at T = 1): ``(N, C) -> (N,)``."""

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits.double(), dim=1)


class ClassMahalanobisModule(nn.Module):
    """``max_c −½ (f − μ_c)ᵀ P (f − μ_c)`` on the first ``D`` columns of ``feats`` (class means, tied precision
    ``P``), float64: ``(N, ≥D) -> (N,)``; the arithmetic of ``TiedGaussians.squared_distances``."""

    def __init__(self, means: torch.Tensor, precision: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("means", means.detach().double().cpu().clone())
        self.register_buffer("precision", precision.detach().double().cpu().clone())
        self.register_buffer("mean_terms", ((self.means @ self.precision) * self.means).sum(1))

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        f = feats[:, : self.means.shape[1]].double()
        fp = f @ self.precision
        d2 = ((fp * f).sum(1, keepdim=True) - 2.0 * fp @ self.means.T + self.mean_terms).clamp_min(0.0)
        return -0.5 * d2.min(dim=1).values


class ConformalFusionModule(nn.Module):
    """``(feats (N, D), logits (N, C)) -> (N,)``: component scores -> conformal p-values against sorted
    calibration buffers (``calibration{k}``) -> the combination rule. Rows with a non-finite feature or logit
    score ``-inf``."""

    def __init__(self, components: list[nn.Module], calibration: list[torch.Tensor], combine: str) -> None:
        super().__init__()
        if len(components) != len(calibration):
            raise ValueError(f"{len(components)} components but {len(calibration)} calibration sets")
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")
        self.components = nn.ModuleList(components)
        for i, cal in enumerate(calibration):
            self.register_buffer(f"calibration{i}", cal.detach().double().cpu().contiguous().clone())
        self.combine = combine

    def component_scores(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` float64 component scores (non-finite rows zeroed first)."""
        finite = torch.isfinite(feats).all(1) & torch.isfinite(logits).all(1)
        f = torch.where(finite[:, None], feats, torch.zeros_like(feats))
        z = torch.where(finite[:, None], logits, torch.zeros_like(logits))
        return torch.stack([c(f, z).double() for c in self.components], 1)

    def p_values(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` conformal p-values of the components."""
        scores = self.component_scores(feats, logits)
        return torch.stack(
            [conformal_p_values(getattr(self, f"calibration{i}"), scores[:, i]) for i in range(scores.shape[1])], 1
        )

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(feats).all(1) & torch.isfinite(logits).all(1)
        out = combine_p_values(self.p_values(feats, logits), self.combine)
        return torch.where(finite, out, torch.full_like(out, -math.inf))


@register_scorer("conformal_fusion")
class ConformalFusion(Scorer):
    """Fuse a logit confidence, the per-layer feature likelihood and a class-conditional Mahalanobis term through
    conformal p-values on held-out in-distribution data. Higher = more normal.

    Components (each higher = more normal):

    1. ``logit_score``: ``max_c softmax(z)_c`` (default) or the energy ``logsumexp(z)`` of the logits;
    2. ``density``: ``Σ_l log p_l(F_l)``, one diagonal GMM per layer block (``n_components``, ``preprocess``; as
       the per-layer GMM of ``FailureDetector()``), fitted without labels;
    3. ``mahalanobis``: ``max_c −½ d²_c(F_0)`` on the first layer block (the penultimate layer with
       ``layer="auto"``), class means and a tied covariance (pseudo-inverted) grouped by the model's **predicted**
       class, so no label is needed.

    Each component score ``s_k`` becomes a conformal p-value ``p_k = (1 + #{c ∈ C_k : c ≤ s_k}) / (n + 1)``
    against in-distribution calibration scores ``C_k``; the p-values are combined by ``combine`` (see
    :func:`combine_p_values`; ``"fisher"`` was fixed in advance as the default — no failure sample chose it).

    Calibration data: ``fit`` holds out a seeded ``calibration_fraction`` of the training rows, fits the
    components on the rest and calibrates on the held-out rows. ``fit_validation`` (called by
    ``FailureDetector.calibrate``/``fit_validation``) replaces the calibration sets by the component scores of
    the validation features — data the classifier was not trained on, so the logit confidence is calibrated
    as on test data; validation labels are not used. Nothing else is learned from any data: no weight, no
    choice, and never a failure sample. ``FailureDetector.calibrate`` gives ``fit_validation`` a seeded half of
    the validation rows and chooses the threshold on the other half: a row in its own calibration sets scores
    above a new input, and with the same 50 rows for both an ``alpha = 0.1`` threshold flagged 12.4% of new
    in-distribution inputs (``benchmarks/conformal_fusion_slack.py``).

    Args:
        combine: the p-value combination rule.
        logit_score: the logit component.
        density, mahalanobis: include those components (at least one component in all).
        n_components, preprocess, max_iter: the per-layer GMM's settings.
        calibration_fraction: training rows held out for calibration in ``fit``.
        random_state: seeds the held-out split and the GMMs.
        device: where the GMMs are fitted.

    Attributes:
        components_: component names, in p-value column order. module_: the fitted
        :class:`ConformalFusionModule` (what :meth:`score` and :meth:`as_module` run). calibrated_on_:
        ``"train-split"`` or ``"validation"``. n_calibration_: calibration scores per component.

    Under ``torch.distributed`` the held-out split is drawn over the union of all ranks' rows, the components
    are fitted on all ranks' kept rows and the calibration scores of every rank are pooled.
    """

    requires_logits = True
    supports_distributed = True  # split over the union, components reduce over ranks, calibration scores gathered

    def __init__(
        self,
        combine: Literal["fisher", "bonferroni", "simes", "mean", "harmonic"] = "fisher",
        logit_score: Literal["max_softmax", "energy"] | None = "max_softmax",
        density: bool = True,
        mahalanobis: bool = True,
        n_components: Annotated[int, Field(ge=1)] = 100,
        preprocess: str | None = "l2",
        max_iter: Annotated[int, Field(ge=1)] = 100,
        calibration_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1,
        random_state: int | None = 0,
        device: str | None = None,
    ) -> None:
        if logit_score is None and not density and not mahalanobis:
            raise ValueError("conformal_fusion needs at least one component (logit_score, density or mahalanobis)")
        self.combine = combine
        self.logit_score = logit_score
        self.density = density
        self.mahalanobis = mahalanobis
        self.n_components = n_components
        self.preprocess = preprocess
        self.max_iter = max_iter
        self.calibration_fraction = calibration_fraction
        self.random_state = random_state
        self.device = device
        self.new_density()  # validates the GMM settings now

    def new_density(self) -> PerLayer:
        """An unfitted per-layer GMM with this scorer's settings."""
        return PerLayer(
            GMMScorer(
                n_components=self.n_components,
                preprocess=self.preprocess,
                max_iter=self.max_iter,
                random_state=self.random_state,
                device=self.device,
            )
        )

    def component_names(self) -> list[str]:
        """The components in p-value column order."""
        names = [self.logit_score] if self.logit_score is not None else []
        return names + (["gmm"] if self.density else []) + (["mahalanobis"] if self.mahalanobis else [])

    # ---- fitting ----------------------------------------------------------------------------------------------

    def _split(self, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's kept and held-out rows (sorted), the held-out ones drawn over the union of all ranks."""
        n = total_rows(n_local)
        n_cal = max(1, round(self.calibration_fraction * n))
        if n - n_cal < 2:
            raise ValueError(f"conformal_fusion needs at least {n_cal + 2} training rows, got {n}")
        held_out, kept = split_union(n_local, n_cal, self.random_state or 0)
        return kept, held_out

    def _logit_module(self) -> nn.Module:
        return MaxSoftmaxModule() if self.logit_score == "max_softmax" else EnergyModule()

    def fit(self, features: Features) -> ConformalFusion:
        """Fit the components on the training rows not held out; calibrate on the held-out rows."""
        check_features(features, logits=True, who="conformal_fusion")
        fit_rows, cal_rows = self._split(len(features))
        train, held_out = features.subset(fit_rows), features.subset(cal_rows)
        components: list[nn.Module] = []
        density = None
        if self.logit_score is not None:
            components.append(self._logit_module())
        if self.density:
            density = self.new_density().fit(train)
            components.append(density.as_module())
        if self.mahalanobis:
            first = train.select_blocks(0) if train.blocks else train
            gaussians = TiedGaussians(first.feats, first.logits.argmax(1))
            components.append(ClassMahalanobisModule(gaussians.means, gaussians.precision))
        probe = ConformalFusionModule(components, [torch.zeros(1)] * len(components), self.combine)
        calibration = self._calibration(probe, held_out)
        self.density_, self.blocks_ = density, tuple(features.blocks or (features.feats.shape[1],))
        self.module_ = ConformalFusionModule(components, calibration, self.combine)
        self.components_, self.calibrated_on_ = self.component_names(), "train-split"
        self.n_calibration_ = len(calibration[0])
        return self

    @staticmethod
    def _calibration(module: ConformalFusionModule, features: Features) -> list[torch.Tensor]:
        finite = torch.isfinite(features.feats).all(1) & torch.isfinite(features.logits).all(1)
        if not total_rows(int(finite.sum())):
            raise ValueError("conformal_fusion: no calibration row has finite features and logits")
        with torch.no_grad():
            scores = module.component_scores(features.feats[finite], features.logits[finite])
        scores = all_gather_rows(scores)  # under torch.distributed: every rank's calibration scores
        return [scores[:, k].sort().values for k in range(scores.shape[1])]

    def validation_use(self) -> ValidationUse:
        return "features"

    def fit_validation(self, features: Features) -> ConformalFusion:
        """Calibrate the p-values on the validation features instead (labels unused)."""
        self.check_fitted()
        check_features(features, logits=True, who="conformal_fusion")
        self._check_width(features)
        calibration = self._calibration(self.module_, features)
        self.module_ = ConformalFusionModule(list(self.module_.components), calibration, self.combine)
        self.calibrated_on_, self.n_calibration_ = "validation", len(calibration[0])
        return self

    # ---- scoring ----------------------------------------------------------------------------------------------

    def _check_width(self, features: Features) -> None:
        if features.feats.shape[1] != sum(self.blocks_):
            raise ValueError(f"features have dimension {features.feats.shape[1]}, expected {sum(self.blocks_)}")
        if features.logits is None:
            raise ValueError("conformal_fusion needs logits; these features have none")

    def p_values(self, features: Features) -> torch.Tensor:
        """``(N, K)`` conformal p-values of the components (columns: :attr:`components_`)."""
        self.check_fitted()
        self._check_width(features)
        with torch.no_grad():
            return self.module_.p_values(features.feats, features.logits)

    def score(self, features: Features) -> torch.Tensor:
        self.check_fitted()
        self._check_width(features)
        with torch.no_grad():
            return self.module_(features.feats, features.logits).float()

    def as_module(self) -> nn.Module:
        """The :class:`ConformalFusionModule` itself (a copy): components and sorted calibration scores as
        buffers, ``searchsorted`` in ``forward``."""
        self.check_fitted()
        components = []
        if self.logit_score is not None:
            components.append(self._logit_module())
        if self.density:
            components.append(self.density_.as_module())
        if self.mahalanobis:
            maha = self.module_.components[-1]
            components.append(ClassMahalanobisModule(maha.means, maha.precision))
        calibration = [getattr(self.module_, f"calibration{i}") for i in range(len(components))]
        return ConformalFusionModule(components, calibration, self.combine)

    def with_combine(self, combine: str) -> ConformalFusion:
        """A fitted copy that combines the same p-values (same components, same calibration) by another rule —
        the rule plays no part in fitting, so comparing rules needs no refit."""
        self.check_fitted()
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_RULES)}, got {combine!r}")
        other = build_scorer(self.name, {**self.get_params(), "combine": combine})
        other.density_, other.blocks_ = self.density_, self.blocks_
        calibration = [getattr(self.module_, f"calibration{i}") for i in range(len(self.components_))]
        other.module_ = ConformalFusionModule(list(self.module_.components), calibration, combine)
        other.components_, other.calibrated_on_ = list(self.components_), self.calibrated_on_
        other.n_calibration_ = self.n_calibration_
        return other

    # ---- state ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.check_fitted()
        state: dict[str, Any] = {"blocks": torch.tensor(self.blocks_, dtype=torch.int64)}
        if self.density:
            state.update({f"density.{k}": v for k, v in self.density_.state_dict().items()})
        if self.mahalanobis:
            maha = self.module_.components[-1]
            state["mahalanobis.means"], state["mahalanobis.precision"] = maha.means.clone(), maha.precision.clone()
        for i, name in enumerate(self.components_):
            state[f"calibration.{name}"] = getattr(self.module_, f"calibration{i}").clone()
        state["calibrated_on_validation"] = int(self.calibrated_on_ == "validation")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> ConformalFusion:
        names = self.component_names()
        expected = {"blocks", "calibrated_on_validation", *(f"calibration.{n}" for n in names)}
        if self.mahalanobis:
            expected |= {"mahalanobis.means", "mahalanobis.precision"}
        density_keys = {k for k in state if k.startswith("density.")}
        unknown = set(state) - expected - (density_keys if self.density else set())
        missing = expected - set(state)
        if unknown or missing:
            raise ValueError(
                f"conformal_fusion state: unexpected keys {sorted(unknown)[:5]}, missing keys {sorted(missing)[:5]}"
            )
        blocks = tuple(int(b) for b in torch.as_tensor(state["blocks"]).reshape(-1).tolist())
        if not blocks or any(b <= 0 for b in blocks):
            raise ValueError(f"conformal_fusion state: blocks must be positive widths, got {blocks}")
        components: list[nn.Module] = []
        density = None
        if self.logit_score is not None:
            components.append(self._logit_module())
        if self.density:
            density = self.new_density().load_state_dict({k[8:]: v for k, v in state.items() if k in density_keys})
            if tuple(density.blocks_) != blocks:
                raise ValueError(f"conformal_fusion state: density blocks {density.blocks_} but blocks {blocks}")
            components.append(density.as_module())
        if self.mahalanobis:
            means = torch.as_tensor(state["mahalanobis.means"])
            precision = torch.as_tensor(state["mahalanobis.precision"])
            d = means.shape[1] if means.ndim == 2 else -1
            if means.ndim != 2 or means.shape[0] < 1 or precision.shape != (d, d) or d > sum(blocks):
                raise ValueError(
                    f"conformal_fusion state: Mahalanobis means {tuple(means.shape)} and precision "
                    f"{tuple(precision.shape)} do not fit features of width {sum(blocks)}"
                )
            if not (torch.isfinite(means).all() and torch.isfinite(precision).all()):
                raise ValueError("conformal_fusion state: the Mahalanobis term holds NaN or infinite values")
            components.append(ClassMahalanobisModule(means, precision))
        calibration = []
        for name in names:
            cal = torch.as_tensor(state[f"calibration.{name}"])
            if cal.ndim != 1 or cal.numel() < 1 or not cal.is_floating_point() or not torch.isfinite(cal).all():
                raise ValueError(f"conformal_fusion state: calibration.{name} must be a non-empty finite 1-D tensor")
            if (cal[1:] < cal[:-1]).any():
                raise ValueError(f"conformal_fusion state: calibration.{name} must be sorted ascending")
            calibration.append(cal.double())
        if len({c.numel() for c in calibration}) != 1:
            raise ValueError("conformal_fusion state: the calibration sets differ in size")
        flag = state["calibrated_on_validation"]
        flag = flag.item() if isinstance(flag, torch.Tensor) and flag.numel() == 1 else flag
        if flag not in (0, 1):
            raise ValueError(f"conformal_fusion state: calibrated_on_validation must be 0 or 1, got {flag!r}")
        self.density_, self.blocks_ = density, blocks
        self.module_ = ConformalFusionModule(components, calibration, self.combine)
        self.components_, self.calibrated_on_ = names, "validation" if flag else "train-split"
        self.n_calibration_ = calibration[0].numel()
        return self
