"""Zheng & Hong (2018): one Gaussian mixture per class on the hidden features, scored for the predicted class."""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field

from ..distributed import total_rows, union_labels
from ..features import Features
from ..gmm import DiagonalGMM
from ..threshold import cross_validate_threshold
from .base import Scorer, check_features, register_scorer

__all__ = ["ZhengHong"]


@register_scorer("zheng_hong")
class ZhengHong(Scorer):
    """``score = log p(h | ĉ)`` where ``ĉ = argmax logits`` and ``p(· | c)`` is a diagonal GMM fitted on the
    training features of class ``c`` (labels needed).

    Paper: Zheng & Hong, "Robust detection of adversarial attacks by modeling the intrinsic properties of deep
    neural networks", NeurIPS 2018.

    Args:
        n_components: components per class (capped at half the class's sample count).
        random_state, max_iter, reg_covar, device: those of each :class:`~featurefail.DiagonalGMM`.

    Attributes:
        class_gmms_: one fitted mixture per class, in class order.
        classes_: ``(C,)`` the class labels.
    """

    requires_labels = True
    requires_logits = True
    supports_distributed = True  # classes, class sizes and every class mixture over all ranks

    def __init__(
        self,
        n_components: Annotated[int, Field(ge=1)] = 5,
        random_state: int | None = 0,
        max_iter: Annotated[int, Field(ge=1)] = 100,
        reg_covar: Annotated[float, Field(gt=0.0)] = 1e-6,
        device: str | None = None,
    ) -> None:
        self.n_components = n_components
        self.random_state = random_state
        self.max_iter = max_iter
        self.reg_covar = reg_covar
        self.device = device

    def new_mixture(self, k: int) -> DiagonalGMM:
        """An unfitted class mixture with ``k`` components and this scorer's settings."""
        return DiagonalGMM(
            k, random_state=self.random_state, max_iter=self.max_iter, reg_covar=self.reg_covar, device=self.device
        )

    def fit(self, features: Features) -> ZhengHong:
        check_features(features, labels=True, logits=True, who="ZhengHong")
        known = features.labels >= 0
        features = features.subset(known)
        # under torch.distributed: the classes and class sizes of all ranks; each mixture reduces over ranks
        self.classes_ = union_labels(features.labels)
        self.class_gmms_ = []
        for c in self.classes_.tolist():
            rows = features.feats[features.labels == c]
            k = max(1, min(self.n_components, total_rows(rows.shape[0]) // 2))
            self.class_gmms_.append(self.new_mixture(k).fit(rows))
        return self

    def class_log_likelihoods(self, feats: torch.Tensor) -> torch.Tensor:
        """``(N, D) -> (N, C)``: ``log p(h | c)`` under every class's mixture."""
        return torch.stack([g.score_samples(feats).float().cpu() for g in self.class_gmms_], dim=1)

    def score(self, features: Features) -> torch.Tensor:
        if features.logits is None:
            check_features(features, logits=True, who="ZhengHong")
        all_classes = self.class_log_likelihoods(features.feats)
        predicted = features.logits.argmax(dim=1)
        column = torch.searchsorted(self.classes_, predicted).clamp_max(len(self.classes_) - 1)
        known = self.classes_[column] == predicted
        score = all_classes.gather(1, column[:, None]).squeeze(1)
        return torch.where(known, score, torch.full_like(score, -float("inf")))

    def per_class_thresholds(self, features: Features, strategy: str = "f1", folds: int = 5) -> dict[int, float]:
        """A threshold per predicted class, by cross-validation on labelled validation features.

        Classes with too few mistakes for ``folds`` folds fall back to the threshold of all samples pooled.
        """
        check_features(features, labels=True, logits=True, who="ZhengHong")
        scores = self.score(features)
        predicted = features.predictions
        wrong = predicted != features.labels
        pooled = cross_validate_threshold(scores, wrong, strategy, folds).threshold
        out = {}
        for c in self.classes_.tolist():
            mask = predicted == c
            try:
                out[c] = cross_validate_threshold(scores[mask], wrong[mask], strategy, folds).threshold
            except ValueError:
                out[c] = pooled
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"classes": self.classes_.clone(), "n_classes": len(self.class_gmms_)}
        for i, g in enumerate(self.class_gmms_):
            for key, value in g.state_dict().items():
                state[f"class{i}.{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> ZhengHong:
        classes = torch.as_tensor(state["classes"])
        n_classes = int(state["n_classes"])
        if classes.shape != (n_classes,) or n_classes < 1:
            raise ValueError(f"classes must hold n_classes={n_classes} labels, got shape {tuple(classes.shape)}")
        if classes.is_floating_point() and not bool((torch.isfinite(classes) & (classes == classes.round())).all()):
            raise ValueError("classes must be integer labels")
        classes = classes.long()
        if bool((classes < 0).any()) or not bool((classes[1:] > classes[:-1]).all()):
            raise ValueError(f"classes must be distinct labels >= 0 in ascending order, got {classes.tolist()[:10]}")
        gmms = []
        for i in range(n_classes):
            sub = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"class{i}.")}
            if "n_components" not in sub:
                raise ValueError(f"the state has no mixture for class {i}")
            gmms.append(self.new_mixture(int(sub["n_components"])).load_state_dict(sub))
        if len({g.n_features_in_ for g in gmms}) != 1:
            raise ValueError("the class mixtures model features of different dimensions")
        self.classes_, self.class_gmms_ = classes, gmms
        return self
