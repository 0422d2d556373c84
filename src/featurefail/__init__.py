"""featurefail: flag the inputs a PyTorch classifier is likely to get wrong."""

from .gmm import DiagonalGMM, NotFittedError

__version__ = "0.1.0"
__all__ = ["DiagonalGMM", "NotFittedError", "__version__"]
