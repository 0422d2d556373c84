"""The exceptions featurefail raises beyond Python's own."""

from __future__ import annotations

__all__ = ["NotFittedError"]


class NotFittedError(ValueError, AttributeError):
    """Raised when an estimator, scorer or detector is used before ``fit``.

    Subclasses both ``ValueError`` and ``AttributeError``, as scikit-learn's ``NotFittedError`` does, so
    ``except ValueError`` and ``hasattr``-style checks keep working.
    """
