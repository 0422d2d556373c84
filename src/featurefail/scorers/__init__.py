"""Detection methods behind one :class:`Scorer` protocol (higher score = more normal)."""

from .base import Scorer, available_scorers, get_scorer, register_scorer
from .fused import FusedScorer
from .gmm import GMMScorer
from .maf import MAFScorer
from .mahalanobis import Mahalanobis
from .max_logit import MaxLogit
from .max_softmax import MaxSoftmax
from .pixelcnn import PixelCNNScorer
from .temperature import TemperatureScaling
from .vae import VAEScorer
from .zheng_hong import ZhengHong

__all__ = [
    "FusedScorer",
    "GMMScorer",
    "MAFScorer",
    "Mahalanobis",
    "MaxLogit",
    "MaxSoftmax",
    "PixelCNNScorer",
    "Scorer",
    "TemperatureScaling",
    "VAEScorer",
    "ZhengHong",
    "available_scorers",
    "get_scorer",
    "register_scorer",
]
