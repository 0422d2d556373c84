"""A custom scorer in 30 lines: it plugs into FailureDetector, save/load and as_module()."""

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from featurefail.scorers import Scorer, register_scorer


class CosineModule(nn.Module):
    def __init__(self, mean: torch.Tensor, power: float) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.power = power

    def forward(self, feats: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.cosine_similarity(feats, self.mean[None], dim=1) ** self.power


@register_scorer("cosine_to_mean")
class CosineToMean(Scorer):
    """``score = cos(f, μ)^p`` with ``μ`` the mean training feature; higher = more normal. (Illustration only.)"""

    def __init__(self, power: Annotated[int, Field(ge=1)] = 1) -> None:
        self.power = power  # a setting: validated, saved, shown in FailureDetector.config

    def fit(self, features):
        self.mean_ = features.feats.double().mean(0).float()  # fitted state ends with "_"
        return self

    def score(self, features):
        return self.as_module()(features.feats)

    def state_dict(self):
        return {"mean": self.mean_}

    def load_state_dict(self, state):
        self.mean_ = state["mean"]
        return self

    def as_module(self):
        return CosineModule(self.mean_, self.power)


if __name__ == "__main__":
    import tempfile

    from featurefail import FailureDetector

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(256, 8)
    detector = FailureDetector(scorer="cosine_to_mean", power=3, progress=False).fit(model, [x])
    detector.calibrate([(x, model(x).argmax(1))], strategy="fpr", alpha=0.1)
    with tempfile.TemporaryDirectory() as folder:
        detector.save(f"{folder}/d.safetensors")
        loaded = FailureDetector.load(f"{folder}/d.safetensors", model=model)
    _, scores, flags = loaded.as_module()(x)
    assert torch.allclose(scores, detector.score(x)) and torch.equal(flags, detector.detect(x))
    print(detector.config.scorer_options, f"flag rate {flags.float().mean():.3f}")
