"""Detection methods, each a :class:`Scorer` subclass in its own file (higher score = more normal)."""

from .base import ModelContext, Scorer, available_scorers, build_scorer, get_scorer, register_scorer
from .fused import FusedScorer
from .gmm import GMMScorer
from .logit_scorer import LogitScorer
from .maf import MAFScorer
from .mahalanobis import Mahalanobis
from .max_logit import MaxLogit
from .max_softmax import MaxSoftmax
from .per_layer import PerLayer
from .pixelcnn import PixelCNNScorer
from .temperature import TemperatureScaling
from .vae import VAEScorer
from .zheng_hong import ZhengHong

__all__ = [
    "FusedScorer",
    "GMMScorer",
    "LogitScorer",
    "MAFScorer",
    "Mahalanobis",
    "MaxLogit",
    "MaxSoftmax",
    "ModelContext",
    "PerLayer",
    "PixelCNNScorer",
    "Scorer",
    "TemperatureScaling",
    "VAEScorer",
    "ZhengHong",
    "available_scorers",
    "build_scorer",
    "get_scorer",
    "register_scorer",
]
