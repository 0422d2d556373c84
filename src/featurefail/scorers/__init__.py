"""Detection methods behind one :class:`Scorer` protocol (higher score = more normal)."""

from .base import Scorer, available_scorers, get_scorer, register_scorer
from .gmm import GMMScorer
from .max_logit import MaxLogit
from .max_softmax import MaxSoftmax

__all__ = ["GMMScorer", "MaxLogit", "MaxSoftmax", "Scorer", "available_scorers", "get_scorer", "register_scorer"]
