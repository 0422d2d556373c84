"""The held-out protocol: fixed source groups, fits that cannot see a failure sample, holistic stream metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from featurefail import metrics
from featurefail.corruptions import CORRUPTIONS
from featurefail.evaluate import (
    DESIGN_SOURCES,
    HELD_OUT_SOURCES,
    EvalData,
    FitData,
    Source,
    evaluate_features,
    fit_detector,
    protocol_group,
)
from featurefail.features import Features
from featurefail.scorers import Scorer, register_scorer

MARK = 777.0  # every failure row carries this value; no fit may ever see it
FITTED: list[torch.Tensor] = []


@register_scorer("protocol_spy")
class ProtocolSpy(Scorer):
    """Records every feature matrix it is fitted on (fit and fit_validation)."""

    def fit(self, features: Features) -> ProtocolSpy:
        FITTED.append(features.feats.clone())
        self.mean_ = features.feats.mean(0)
        return self

    def fit_validation(self, features: Features) -> ProtocolSpy:
        FITTED.append(features.feats.clone())
        return self

    def score(self, features: Features) -> torch.Tensor:
        return -(features.feats - self.mean_).norm(dim=1)


def _data(seed: int = 0) -> EvalData:
    g = torch.Generator().manual_seed(seed)

    def feats(n: int, shift: float = 0.0, mark: bool = False) -> Features:
        f = torch.randn(n, 4, generator=g) + shift
        if mark:
            f[:, 0] = MARK
        logits = torch.randn(n, 3, generator=g)
        return Features(f, logits, logits.argmax(1) if not mark else torch.randint(0, 3, (n,), generator=g))

    train, val = feats(200), feats(80)
    test = feats(120)
    test.labels[::4] = (test.labels[::4] + 1) % 3  # a quarter are mistakes
    correct = test.correct
    sources = [
        Source("test mistakes", "mistakes", test.subset(~correct), correct),
        Source("ood: far", "ood", feats(50, 3.0, mark=True), torch.ones_like(correct)),
        Source("corruption: blur", "corruption", feats(30, 1.0, mark=True), correct, normals=feats(40, 0.5)),
        Source("fgsm ε=1/255", "adversarial", feats(20, 2.0, mark=True), correct),
    ]
    return EvalData(train, val, test, sources)


def test_groups_are_disjoint_and_cover_every_source_of_the_cifar10_runner():
    assert not DESIGN_SOURCES & HELD_OUT_SOURCES
    runner = (
        ["test mistakes", "ood: gaussian-noise", "ood: fashion-mnist", "ood: mnist"]
        + [f"{kind} ε={eps}/255" for kind in ("fgsm", "bim") for eps in (1, 2, 4, 8)]
        + [f"corruption: {name}" for name in CORRUPTIONS]
    )
    assert set(runner) == DESIGN_SOURCES | HELD_OUT_SOURCES
    assert {protocol_group(s) for s in runner} == {"design", "held-out"}
    assert protocol_group("bim ε=8/255") == "held-out" and protocol_group("test mistakes") == "design"
    with pytest.raises(ValueError, match="neither"):
        protocol_group("ood: svhn")


def test_fit_data_holds_only_train_and_validation():
    assert [f.name for f in dataclasses.fields(FitData)] == ["train", "val", "head"]
    data = _data()
    fit = data.fit_data()
    assert fit.train is data.train and fit.val is data.val
    with pytest.raises(TypeError, match="FitData"):
        fit_detector("protocol_spy", data)  # the whole EvalData (with its sources) is refused
    with pytest.raises(TypeError, match="Features"):
        FitData(data.train, data.sources)  # type: ignore[arg-type]


def test_no_failure_sample_reaches_any_fit():
    FITTED.clear()
    data = _data()
    result = evaluate_features(
        data, scorers=["protocol_spy", "max_softmax"], seeds=[0, 1], streams={"all": [s.name for s in data.sources]}
    )
    assert len(FITTED) == 4  # fit + fit_validation, two seeds
    for seen in FITTED:
        assert not (seen == MARK).any()
        assert any(torch.equal(seen, part.feats) for part in (data.train, data.val))
    assert {r.source for r in result.rows} == {s.name for s in data.sources}


def test_holistic_stream_metrics_equal_a_brute_force_mix():
    data = _data(3)
    streams = {"shift": ["test mistakes", "corruption: blur", "ood: far"], "clean": ["test mistakes"]}
    result = evaluate_features(data, scorers=["protocol_spy"], seeds=[0], streams=streams, coverage=0.7)
    det = fit_detector("protocol_spy", data.fit_data())
    s_test = det.score_features(data.test)
    correct = data.test.correct
    blur, far = data.sources[2], data.sources[1]
    # the FD-Shifts stream: clean test (right = normal, wrong = failure), corrupted inputs (the same), OOD (failure)
    scores = torch.cat(
        [s_test, det.score_features(blur.normals), det.score_features(blur.failures), det.score_features(far.failures)]
    ).numpy()
    failure = np.concatenate([~correct.numpy(), np.zeros(40, bool), np.ones(30, bool), np.ones(50, bool)])
    order = np.argsort(-scores, kind="stable")
    risks = np.cumsum(failure[order]) / np.arange(1, len(order) + 1)  # continuous scores: no ties
    brute_aurc = float(np.mean(risks))  # mean selective risk over coverages k/n (the trapezoid sum + tail)
    row = {r.stream: r for r in result.holistic}
    assert row["shift"].n == 120 + 40 + 30 + 50 and row["shift"].n_failure == int(failure.sum())
    normal, failed = scores[~failure], scores[failure]
    assert row["shift"].aurc == pytest.approx(metrics.aurc(normal, failed), abs=1e-12)
    assert row["shift"].aurc == pytest.approx(brute_aurc, abs=2 / len(scores))
    assert row["shift"].eaurc == pytest.approx(metrics.eaurc(normal, failed), abs=1e-12)
    assert row["shift"].risk == pytest.approx(metrics.risk_at_coverage(normal, failed, 0.7), abs=1e-12)
    clean = s_test.numpy()
    assert row["clean"].aurc == pytest.approx(metrics.aurc(clean[correct], clean[~correct]), abs=1e-12)
    # per-source row of the corruption: its own normals against its failures
    blur_row = next(r for r in result.rows if r.source == "corruption: blur")
    assert blur_row.n_normal == 40 and blur_row.n_failure == 30
    assert blur_row.auroc == pytest.approx(
        metrics.auroc(det.score_features(blur.normals), det.score_features(blur.failures))
    )


def test_unknown_stream_source_is_refused_and_cache_keeps_normals(tmp_path):
    data = _data()
    with pytest.raises(ValueError, match="do not hold"):
        evaluate_features(data, scorers=["protocol_spy"], streams={"x": ["ood: nowhere"]})
    back = EvalData.load(data.save(tmp_path / "d.safetensors"))
    assert torch.equal(back.sources[2].normals.feats, data.sources[2].normals.feats)
    assert back.sources[1].normals is None


def test_derived_rows_score_the_fitted_detector_without_a_refit():
    FITTED.clear()
    data = _data(5)
    negated = {"spy negated": ("protocol_spy", lambda det: lambda f: -det.score_features(f))}
    result = evaluate_features(data, scorers=["protocol_spy"], seeds=[0], derived=negated)
    assert len(FITTED) == 2  # one fit + one fit_validation: the derived row refits nothing
    by = {(r.scorer, r.source): r.auroc for r in result.rows}
    for src in data.sources:
        assert by[("spy negated", src.name)] == pytest.approx(1 - by[("protocol_spy", src.name)])
    with pytest.raises(ValueError, match="derived row"):
        evaluate_features(data, scorers=["max_softmax"], derived=negated)
