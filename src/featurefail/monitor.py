"""Watch the flag rate in production and raise an alarm when it exceeds the calibrated rate beyond chance.

A threshold's guarantee (:mod:`featurefail.threshold`) holds only while production inputs are exchangeable with
the calibration data. A shift in the input distribution is what breaks it, and the first visible symptom is
usually a higher flag rate. :class:`DriftMonitor` counts flags in consecutive windows of ``window`` inputs and
tests each window against the rate seen at calibration.

The test. Under the null hypothesis (inputs exchangeable with the calibration data), the number ``X`` of flags in
a window of ``W`` inputs follows

* ``Binomial(W, p0)`` when the flag rate ``p0`` is known (``n_calibration=None``), or
* ``BetaBinomial(W, j + 1, n - j)`` when the rate was estimated from ``j`` flagged of ``n`` calibration inputs
  (``n_calibration=n``). This is the exact predictive law for a threshold set at an order statistic of the
  calibration scores (the conformal threshold flags ``j = k - 1``): the true rate is at most the ``(j + 1)``-th
  uniform order statistic, ``Beta(j + 1, n - j)``. Ignoring that uncertainty (plugging ``j / n`` into a binomial)
  would raise false alarms far more often than stated when ``n`` is not much larger than ``W``.

The alarm fires as soon as the running count of the current window reaches the critical value ``c``: the smallest
count with ``P(X >= c) <= false_alarm``. Because the count only grows within a window, "it reached ``c`` at some
batch" is the same event as "the full window has ``X >= c``", so testing after every batch costs nothing: the
false-alarm probability per window is exactly ``P(X >= c) <= false_alarm`` (stored as ``false_alarm_``), with no
Bonferroni or alpha-spending over batches. Over a stream of ``L`` in-distribution windows, about
``L * false_alarm_`` false alarms are expected. A conformal test martingale would instead bound the probability
of *ever* alarming on an endless stream, so it grows less sensitive the longer it runs and needs per-input
p-values; windows keep a constant sensitivity and need only the flags. Memory is O(1): counters only.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from .threshold import ThresholdResult

__all__ = ["DriftMonitor", "MonitorStatus"]

logger = logging.getLogger("featurefail.monitor")


@dataclass(frozen=True)
class MonitorStatus:
    """What :meth:`DriftMonitor.update` saw.

    Attributes:
        alarm: an alarm fired during this update (at most one per window).
        alarming: the current window has crossed the critical count (it stays True until the window ends).
        window_index: index of the current window (0-based; windows are ``window`` inputs long).
        window_seen, window_flagged: inputs and flags so far in the current window.
        critical_count: flags in one window that raise the alarm.
        p_value: ``P(X >= window_flagged)`` under the null for a full window (1.0 when nothing flagged yet).
        n_seen, n_flagged: totals since the start (or the last :meth:`~DriftMonitor.reset`).
        flag_rate: ``n_flagged / n_seen`` (NaN before any input).
        expected_rate: the calibrated in-distribution flag rate.
        n_alarms: alarms raised so far; alarmed_windows: indices of the last (at most 100) alarmed windows.
    """

    alarm: bool
    alarming: bool
    window_index: int
    window_seen: int
    window_flagged: int
    critical_count: int
    p_value: float
    n_seen: int
    n_flagged: int
    flag_rate: float
    expected_rate: float
    n_alarms: int
    alarmed_windows: tuple[int, ...]


class DriftMonitor:
    """Windowed exact test of the production flag rate against the calibrated rate (see the module docstring).

    Args:
        flag_rate: the in-distribution flag rate ``p0`` at calibration, in [0, 1): e.g. ``1 - coverage`` of a
            :class:`~featurefail.threshold.ThresholdResult` (see :meth:`from_calibration`), or ``alpha``.
        window: inputs per window ``W``.
        false_alarm: false-alarm probability per in-distribution window, in (0, 1).
        n_calibration: ``n`` when ``flag_rate = j / n`` was measured on ``n`` calibration inputs (beta-binomial
            null, guarantee on average over calibration sets); ``None`` when ``flag_rate`` is exact or an upper
            bound (binomial null; per-window guarantee given the calibration).
        threshold: flag when ``score < threshold``; needed to feed scores instead of flags.
        callback: called with the :class:`MonitorStatus` each time an alarm fires (outside the lock).

    Attributes:
        critical_count_: flags in a window that raise the alarm.
        false_alarm_: the exact false-alarm probability per in-distribution window (``<= false_alarm``).

    Thread-safe: :meth:`update` may be called from several threads.
    """

    def __init__(
        self,
        flag_rate: float,
        *,
        window: int = 1000,
        false_alarm: float = 0.01,
        n_calibration: int | None = None,
        threshold: float | None = None,
        callback: Callable[[MonitorStatus], Any] | None = None,
    ) -> None:
        self.flag_rate = flag_rate
        self.window = window
        self.false_alarm = false_alarm
        self.n_calibration = n_calibration
        self.threshold = threshold
        self.callback = callback
        for name, value, low in (("flag_rate", flag_rate, 0.0), ("false_alarm", false_alarm, 1e-300)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < 1.0:
                raise ValueError(f"{name} must be in {'[0' if low == 0 else '(0'}, 1), got {value!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        if n_calibration is None:
            null = stats.binom(window, flag_rate)
        else:
            if isinstance(n_calibration, bool) or not isinstance(n_calibration, int) or n_calibration < 1:
                raise ValueError(f"n_calibration must be a positive integer, got {n_calibration!r}")
            j = round(flag_rate * n_calibration)
            null = stats.betabinom(window, j + 1, n_calibration - j)
        pmf = null.pmf(np.arange(window + 1))
        tail = np.minimum(np.cumsum(pmf[::-1])[::-1], 1.0)  # tail[c] = P(X >= c), c = 0..window
        self._tail = tail
        above = np.flatnonzero(tail <= false_alarm)
        if above.size == 0:
            raise ValueError(
                f"a window of {window} inputs cannot show a flag rate above {flag_rate:g} at false-alarm probability "
                f"{false_alarm:g} (even {window} flags of {window} is not unusual enough); use a larger window"
            )
        self.critical_count_ = int(above[0])
        self.false_alarm_ = float(tail[self.critical_count_])
        self._lock = threading.Lock()
        self._reset_counts()

    @classmethod
    def from_calibration(cls, result: ThresholdResult, **kwargs: Any) -> DriftMonitor:
        """Monitor for a calibrated threshold: rate ``1 - result.coverage`` on ``result.n_calibration`` inputs.

        For the PAC strategy ``"fpr"`` with ``delta`` the rate is ``alpha`` with a binomial null (valid with
        probability ``1 - delta`` over the calibration draw); otherwise the beta-binomial predictive null.
        ``kwargs`` go to the constructor (``window``, ``false_alarm``, ``callback``).
        """
        if result.coverage is None or result.n_calibration < 1:
            raise ValueError("the calibration result lacks coverage and n_calibration; recalibrate")
        kwargs.setdefault("threshold", result.threshold)
        if result.strategy == "fpr" and result.delta is not None and result.alpha is not None:
            return cls(result.alpha, **kwargs)
        n = result.n_calibration
        flagged = n - round(result.coverage * n)
        return cls(flagged / n, n_calibration=n, **kwargs)

    def _reset_counts(self) -> None:
        self._n_seen = 0
        self._n_flagged = 0
        self._window_index = 0
        self._window_seen = 0
        self._window_flagged = 0
        self._window_alarmed = False
        self._n_alarms = 0
        self._alarmed: list[int] = []

    def reset(self) -> None:
        """Forget everything seen (e.g. after a retraining)."""
        with self._lock:
            self._reset_counts()

    def _flags(self, flags: Any, scores: Any) -> np.ndarray:
        if (flags is None) == (scores is None):
            raise ValueError("pass exactly one of flags or scores")
        if scores is not None:
            if self.threshold is None:
                raise ValueError("feeding scores needs the monitor's threshold (pass threshold=...)")
            s = np.asarray(scores.detach().cpu().numpy() if hasattr(scores, "detach") else scores, dtype=np.float64)
            if np.isnan(s).any():
                raise ValueError("scores hold NaN")
            return (s < self.threshold).ravel()
        f = np.asarray(flags.detach().cpu().numpy() if hasattr(flags, "detach") else flags).ravel()
        if f.dtype != bool:
            if f.dtype.kind not in "biuf" or not np.isin(f, (0, 1)).all():
                raise ValueError("flags must be booleans (True = flagged)")
            f = f.astype(bool)
        return f

    def update(self, flags: Any = None, *, scores: Any = None) -> MonitorStatus:
        """Feed one production batch: ``flags (N,)`` bool, or ``scores (N,)`` (flagged when ``< threshold``).

        Returns:
            The :class:`MonitorStatus` after the batch. When an alarm fires, a warning is logged on the
            ``featurefail.monitor`` logger and ``callback`` is called.
        """
        f = self._flags(flags, scores)
        fired: list[MonitorStatus] = []
        with self._lock:
            start = 0
            while True:
                take = min(self.window - self._window_seen, f.size - start)
                if take > 0:
                    count = int(f[start : start + take].sum())
                    start += take
                    self._window_seen += take
                    self._window_flagged += count
                    self._n_seen += take
                    self._n_flagged += count
                    if not self._window_alarmed and self._window_flagged >= self.critical_count_:
                        self._window_alarmed = True
                        self._n_alarms += 1
                        self._alarmed = [*self._alarmed[-99:], self._window_index]
                        fired.append(self._status(alarm=True))
                if start >= f.size:
                    break
                # window full and more inputs to come: start the next window
                self._window_index += 1
                self._window_seen = self._window_flagged = 0
                self._window_alarmed = False
            status = self._status(alarm=bool(fired))
        for event in fired:
            logger.warning(
                "featurefail drift alarm: window %d flagged %d of %d inputs (calibrated rate %.4g, critical count %d, "
                "p = %.3g)",
                event.window_index,
                event.window_flagged,
                event.window_seen,
                self.flag_rate,
                self.critical_count_,
                event.p_value,
            )
            if self.callback is not None:
                self.callback(event)
        return status

    def _status(self, alarm: bool) -> MonitorStatus:
        k = self._window_flagged
        return MonitorStatus(
            alarm=alarm,
            alarming=self._window_alarmed,
            window_index=self._window_index,
            window_seen=self._window_seen,
            window_flagged=k,
            critical_count=self.critical_count_,
            p_value=float(self._tail[min(k, self.window)]) if k > 0 else 1.0,
            n_seen=self._n_seen,
            n_flagged=self._n_flagged,
            flag_rate=self._n_flagged / self._n_seen if self._n_seen else float("nan"),
            expected_rate=float(self.flag_rate),
            n_alarms=self._n_alarms,
            alarmed_windows=tuple(self._alarmed),
        )

    @property
    def status(self) -> MonitorStatus:
        """The current status (``alarm`` False: it reports no new event)."""
        with self._lock:
            return self._status(alarm=False)

    def __repr__(self) -> str:
        return (
            f"DriftMonitor(flag_rate={self.flag_rate:g}, window={self.window}, false_alarm={self.false_alarm:g}, "
            f"critical_count={self.critical_count_})"
        )
