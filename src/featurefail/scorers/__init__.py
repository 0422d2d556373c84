"""Detection methods, each a :class:`Scorer` subclass in its own file (higher score = more normal)."""

from .ash import ASH
from .base import ModelContext, Scorer, available_scorers, build_scorer, get_scorer, register_scorer
from .conformal_fusion import ConformalFusion
from .energy import Energy
from .fused import FusedScorer
from .gmm import GMMScorer
from .knn import KNN
from .logit_scorer import LogitScorer
from .maf import MAFScorer
from .mahalanobis import Mahalanobis
from .max_logit import MaxLogit
from .max_softmax import MaxSoftmax
from .odin import ODIN
from .per_layer import PerLayer
from .pixelcnn import PixelCNNScorer
from .react import ReAct
from .relative_mahalanobis import RelativeMahalanobis
from .temperature import TemperatureScaling
from .vae import VAEScorer
from .vim import ViM
from .zheng_hong import ZhengHong

__all__ = [
    "ASH",
    "KNN",
    "ODIN",
    "ConformalFusion",
    "Energy",
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
    "ReAct",
    "RelativeMahalanobis",
    "Scorer",
    "TemperatureScaling",
    "VAEScorer",
    "ViM",
    "ZhengHong",
    "available_scorers",
    "build_scorer",
    "get_scorer",
    "register_scorer",
]
