"""The drift monitor on a real classifier: the digits demo model, its test stream, then noise."""

from __future__ import annotations

import torch

from featurefail import FailureDetector
from featurefail.demo import DigitsCNN, load_digits_splits, train_classifier
from featurefail.ood import gaussian_noise


def test_monitor_stays_quiet_on_digits_and_alarms_soon_after_a_switch_to_noise():
    data = load_digits_splits(0)
    torch.manual_seed(0)
    model = train_classifier(DigitsCNN(), data.x_train, data.y_train, epochs=5, seed=0)
    detector = FailureDetector.paper(n_components=6, progress=False).fit(model, [(data.x_train, data.y_train)])
    detector.calibrate([(data.x_val, data.y_val)], strategy="fpr", alpha=0.05)
    monitor = detector.monitor(window=100, false_alarm=0.01)
    alarms_on_digits = 0
    for batch in torch.split(data.x_test, 25):  # ~360 in-distribution inputs, 4 windows
        alarms_on_digits += monitor.update(detector.detect(batch)).alarm
    assert alarms_on_digits == 0  # P(any false alarm over 4 windows) <= 4%: a fixed seed that passes
    noise = gaussian_noise(data.x_train, 200, seed=1)
    alarms = [monitor.update(detector.detect(batch)).alarm for batch in torch.split(noise, 25)]
    assert any(alarms), "no alarm after 200 noise inputs"
    assert alarms.index(True) <= 4  # within the window the noise started in, or the next one
