"""featurefail: flag the inputs a PyTorch classifier is likely to get wrong.

Fit a class-agnostic Gaussian mixture on the classifier's penultimate features and flag inputs whose
features get a low likelihood (Understanding classifier mistakes with generative models).
"""

from . import metrics, scorers
from .detector import DetectorConfig, FailureDetector, detect, score
from .exceptions import NotFittedError
from .features import Features, extract_features
from .gmm import DiagonalGMM
from .hooks import FeatureHook
from .monitor import DriftMonitor, MonitorStatus
from .purify import PurifyResult, purification_grid, purify
from .stats import MannWhitneyResult, mann_whitney
from .threshold import ThresholdResult, calibrate_threshold, cross_validate_threshold

__version__ = "0.1.0"
__all__ = [
    "DetectorConfig",
    "DiagonalGMM",
    "DriftMonitor",
    "FailureDetector",
    "FeatureHook",
    "Features",
    "MannWhitneyResult",
    "MonitorStatus",
    "NotFittedError",
    "PurifyResult",
    "ThresholdResult",
    "__version__",
    "calibrate_threshold",
    "cross_validate_threshold",
    "detect",
    "extract_features",
    "mann_whitney",
    "metrics",
    "purification_grid",
    "purify",
    "score",
    "scorers",
]
