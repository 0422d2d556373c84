"""DriftMonitor: exact critical counts, its stated false-alarm rate on exchangeable streams, detection after a shift."""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import pytest
from scipy import stats

from featurefail.monitor import DriftMonitor
from featurefail.threshold import conformal_threshold, selective_risk_threshold


@pytest.mark.parametrize(("rate", "window", "fa", "n_cal"), [(0.05, 500, 0.01, None), (0.1, 200, 0.05, 1000)])
def test_critical_count_is_the_exact_tail_quantile(rate, window, fa, n_cal):
    m = DriftMonitor(rate, window=window, false_alarm=fa, n_calibration=n_cal)
    if n_cal is None:
        null = stats.binom(window, rate)
    else:
        j = round(rate * n_cal)
        null = stats.betabinom(window, j + 1, n_cal - j)
    brute = next(c for c in range(window + 1) if null.sf(c - 1) <= fa)
    assert m.critical_count_ == brute and m.false_alarm_ == pytest.approx(null.sf(brute - 1))
    assert m.false_alarm_ <= fa < null.sf(brute - 2)  # the smallest such count


def test_false_alarm_rate_on_exchangeable_streams_is_as_stated():
    """Fresh calibration set + one in-distribution window per run: alarms happen at the stated rate, not more."""
    rng = np.random.default_rng(0)
    runs, n_cal, window, batch = 2000, 1000, 500, 125
    ours, plugin = 0, 0
    stated = stated_plugin = None
    for _ in range(runs):
        result = conformal_threshold(rng.normal(size=n_cal), 0.05)
        monitor = DriftMonitor.from_calibration(result, window=window, false_alarm=0.05)
        naive = DriftMonitor(1 - result.coverage, window=window, false_alarm=0.05, threshold=result.threshold)
        stated = monitor.false_alarm_  # the same for every run: j = k - 1 flagged of n
        stated_plugin = naive.false_alarm_
        stream = rng.normal(size=window)
        for start in range(0, window, batch):
            monitor.update(scores=stream[start : start + batch])
            naive.update(scores=stream[start : start + batch])
        ours += monitor.status.n_alarms
        plugin += naive.status.n_alarms
    slack = 3 * math.sqrt(stated * (1 - stated) / runs)
    assert abs(ours / runs - stated) < slack  # exact, neither above (invalid) nor far below (blunt)
    # plugging the calibration rate into a binomial ignores its uncertainty and alarms far more often
    assert plugin / runs > stated_plugin + 3 * math.sqrt(stated_plugin * (1 - stated_plugin) / runs)


@pytest.mark.parametrize("shift", [2.0, 0.6])
def test_alarm_within_bounded_batches_after_a_shift(shift):
    rng = np.random.default_rng(1)
    window, batch, delays = 500, 100, []
    for _ in range(100):
        result = conformal_threshold(rng.normal(size=2000), 0.05)
        monitor = DriftMonitor.from_calibration(result, window=window, false_alarm=0.01)
        for _ in range(int(rng.integers(5, 25))):  # in-distribution traffic first, switch at a random point
            monitor.update(scores=rng.normal(size=batch))
        before = monitor.status.n_alarms
        delay = 1
        while not monitor.update(scores=rng.normal(-shift, 1, size=batch)).alarm and delay < 100:
            delay += 1
        assert monitor.status.n_alarms == before + 1
        delays.append(delay)
    # strong shift (flag rate 0.64): the next batch; mild shift (0.15 vs 0.05): within two windows
    assert max(delays) <= (1 if shift == 2.0 else 2 * window // batch)


def test_batches_spanning_windows_equal_one_input_at_a_time():
    rng = np.random.default_rng(2)
    flags = np.r_[rng.uniform(size=1500) < 0.05, rng.uniform(size=2500) < 0.2]
    whole, single = DriftMonitor(0.05, window=300), DriftMonitor(0.05, window=300)
    status = whole.update(flags)
    for f in flags:
        single.update([f])
    assert status.alarmed_windows == single.status.alarmed_windows and status.n_alarms == single.status.n_alarms
    assert status.n_alarms >= 8 and min(status.alarmed_windows) >= 4  # windows 5.. hold the shifted inputs
    assert status.n_flagged == int(flags.sum()) and status.window_index == (4000 - 1) // 300
    assert status.flag_rate == pytest.approx(flags.mean())


def test_alarm_logs_and_calls_back_once_per_window(caplog):
    events = []
    monitor = DriftMonitor(0.05, window=100, false_alarm=0.01, callback=events.append, threshold=0.0)
    with caplog.at_level(logging.WARNING, logger="featurefail.monitor"):
        for _ in range(5):
            status = monitor.update(scores=-np.ones(20))  # everything flagged
    assert len(events) == 1 and events[0].alarm and events[0].window_index == 0
    assert status.alarming and not status.alarm and status.window_seen == 100
    assert len([r for r in caplog.records if "drift alarm" in r.message]) == 1
    monitor.update(scores=-np.ones(20))  # a new window, a new alarm
    assert len(events) == 2 and events[1].window_index == 1
    monitor.reset()
    assert monitor.status.n_seen == 0 and monitor.status.n_alarms == 0


def test_concurrent_updates_lose_nothing():
    rng = np.random.default_rng(3)
    batches = [rng.uniform(size=37) < 0.1 for _ in range(800)]
    monitor = DriftMonitor(0.1, window=250)

    def feed(part):
        for b in part:
            monitor.update(b)

    threads = [threading.Thread(target=feed, args=(batches[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = monitor.status
    assert status.n_seen == 800 * 37 and status.n_flagged == int(sum(b.sum() for b in batches))
    assert status.window_index == (800 * 37 - 1) // 250


def test_from_calibration_uses_the_guarantee():
    rng = np.random.default_rng(4)
    s = rng.normal(size=3000)
    pac = DriftMonitor.from_calibration(conformal_threshold(s, 0.05, delta=0.05), window=400)
    assert pac.n_calibration is None and pac.flag_rate == 0.05  # PAC: alpha bounds the rate, binomial null
    wrong = rng.uniform(size=3000) < 1 / (1 + np.exp(3 * s))
    risk = selective_risk_threshold(s, wrong, 0.1)
    monitor = DriftMonitor.from_calibration(risk, window=400)
    assert monitor.n_calibration == 3000 and monitor.flag_rate == pytest.approx((s < risk.threshold).mean())
    assert monitor.threshold == risk.threshold


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="flag_rate"):
        DriftMonitor(1.5)
    with pytest.raises(ValueError, match="window"):
        DriftMonitor(0.1, window=0)
    with pytest.raises(ValueError, match="larger window"):
        DriftMonitor(0.5, window=3, false_alarm=0.01)
    monitor = DriftMonitor(0.1, window=100)
    with pytest.raises(ValueError, match="threshold"):
        monitor.update(scores=[0.0])
    with pytest.raises(ValueError, match="exactly one"):
        monitor.update()
    with pytest.raises(ValueError, match="booleans"):
        monitor.update([0.5, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        DriftMonitor(0.1, threshold=0.0).update(scores=[np.nan])
    assert monitor.update([]).n_seen == 0
