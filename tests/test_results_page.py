"""The results page's bookkeeping (benchmarks/reproduce_cifar10.py): cache build times and the regeneration time
in the header, and the "what the held-out data support" table, on hand-made results."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest

from featurefail.evaluate import EvalResult, EvalRow, HolisticRow


def _import_page():
    """``benchmarks/reproduce_cifar10.py`` imports the benchmark's own ``models`` module, a name this test suite's
    ``tests/models.py`` also has: import the script with the benchmark's module in place, then put ours back."""
    ours = sys.modules.pop("models", None)
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        return importlib.import_module("reproduce_cifar10")
    finally:
        sys.path.remove(benchmarks)
        sys.modules.pop("models", None)
        if ours is not None:
            sys.modules["models"] = ours


page = _import_page()


def test_cache_build_seconds_are_summed_only_when_every_part_was_timed(tmp_path):
    args = argparse.Namespace(out=str(tmp_path))
    (tmp_path / "cache").mkdir()
    assert page.cache_build_seconds(args, "m") is None
    page.record_build(args, "m", "clean", 100.0)
    page.record_build(args, "m", "attacks", 20.0)
    assert page.cache_build_seconds(args, "m") is None  # corruptions not timed: no total claimed
    page.record_build(args, "m", "corruptions", 40.0)
    page.record_build(args, "m", "clean", 90.0)  # a rebuild replaces the part's time
    assert page.cache_build_seconds(args, "m") == pytest.approx(150.0)


def test_cache_is_rebuilt_when_the_weights_change_and_only_that_models(tmp_path):
    args = argparse.Namespace(out=str(tmp_path))
    cache, weights, neighbour_weights = tmp_path / "cache", tmp_path / "resnet9.st", tmp_path / "resnet9-whitened.st"
    cache.mkdir()
    parts = ("clean", "clean-train20000", "attacks200", "corruptions500")

    def build(name: str) -> list:
        files = [cache / f"{name}-{part}.safetensors" for part in parts]
        for f in files:
            f.write_bytes(b"features")
        for part in ("clean", "attacks", "corruptions"):
            page.record_build(args, name, part, 1.0)
        return [*files, cache / f"{name}-build-seconds.json"]

    messages = []
    neighbour = build("resnet9-whitened")  # a name that merely starts with the other's
    neighbour_weights.write_bytes(b"other model")
    page.match_cache_to_weights(args, "resnet9-whitened", neighbour_weights, messages.append)
    neighbour = [*build("resnet9-whitened"), cache / "resnet9-whitened-weights.json"]
    own = build("resnet9")
    weights.write_bytes(b"weights v1")
    messages.clear()
    digest = page.match_cache_to_weights(args, "resnet9", weights, messages.append)
    assert digest == hashlib.sha256(b"weights v1").hexdigest()
    assert not any(f.exists() for f in own) and "did not record" in messages[-1]  # unknown origin: never reused
    assert all(f.exists() for f in neighbour)
    own = build("resnet9")
    page.match_cache_to_weights(args, "resnet9", weights, messages.append)
    assert all(f.exists() for f in own) and len(messages) == 1  # same weights: the cache serves
    weights.write_bytes(b"weights v2")  # retrained
    page.match_cache_to_weights(args, "resnet9", weights, messages.append)
    assert not any(f.exists() for f in own) and "other weights" in messages[-1]
    assert all(f.exists() for f in neighbour)
    page.match_cache_to_weights(args, "resnet9-whitened", neighbour_weights, messages.append)
    assert all(f.exists() for f in neighbour) and len(messages) == 2  # its record survived: nothing rebuilt


def test_a_saved_run_is_rendered_only_for_the_weights_it_was_made_from(tmp_path):
    weights, summary = tmp_path / "vgg.safetensors", tmp_path / "vgg"
    summary.mkdir()
    EvalResult().to_json(summary / "result.json")
    weights.write_bytes(b"weights v1")
    run = {"name": "vgg", "seconds": 1.0}
    (summary / "run.json").write_text(json.dumps(run))
    assert page.load_run(summary) is not None  # no weights to check against: as saved
    assert page.load_run(summary, weights=weights) is None  # made before runs recorded their weights
    (summary / "run.json").write_text(json.dumps({**run, "weights_sha256": page.weights_sha256(weights)}))
    assert page.load_run(summary, weights=weights)["seconds"] == 1.0
    weights.write_bytes(b"weights v2")  # retrained, page not rerun
    assert page.load_run(summary, weights=weights) is None


def test_regeneration_time_adds_up_or_says_what_is_missing():
    runs = [
        {"name": "a", "seconds": 700.0, "collect_seconds": 100.0, "cache_build_seconds": 300.0},
        {"name": "b", "seconds": 1250.0, "collect_seconds": 50.0, "cache_build_seconds": 333.0},
    ]
    text = page.regeneration_time(runs)
    # cache 633 s = 10.6 min, scoring 600 + 1200 s = 30.0 min; the total is the sum of the printed parts
    assert "takes 40.6 min" in text and "10.6 min to build the cache" in text and "30.0 min of scoring" in text
    runs[1]["cache_build_seconds"] = None
    text = page.regeneration_time(runs)
    assert "not recorded for b" in text and "takes" not in text


def _result(means: dict[str, float], aurc: dict[str, float]) -> EvalResult:
    """Every row scores ``means[row]`` AUROC on both held-out sources used here, and ``aurc[row]`` on the stream."""
    rows = [
        EvalRow(row, source, "ood", 10, 5, auroc, 0.0, 0.5, 0.0, 0.5, 0.0, 0.5, 0.0, 1)
        for row, auroc in means.items()
        for source in ("ood: mnist", "fgsm ε=8/255")
    ]
    holistic = [
        HolisticRow(row, "held-out", 20, 5, value, 0.0, 0.0, 0.0, 0.8, 0.1, 0.0, 1) for row, value in aurc.items()
    ]
    return EvalResult(rows=rows, holistic=holistic)


def test_support_table_counts_models_where_a_row_beats_the_default():
    runs = [
        {
            "name": "m1",
            "result": _result(
                {"default": 0.80, "knn": 0.90, "energy": 0.70}, {"default": 0.10, "knn": 0.08, "energy": 0.12}
            ),
        },
        {
            "name": "m2",
            "result": _result(
                {"default": 0.80, "knn": 0.85, "energy": 0.90}, {"default": 0.10, "knn": 0.09, "energy": 0.11}
            ),
        },
    ]
    lines = page.support_table(runs)
    row = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    # knn: mean (0.90 + 0.85) / 2 = 87.5, AURC (80 + 90) / 2 = 85.0 ‰, beats default on both models for both
    assert row["knn"] == "| knn | **87.5** | **85.0** | 2/2 | 2/2 |"
    assert row["energy"] == "| energy | 80.0 | 115.0 | 1/2 | 0/2 |"
    assert row["default"] == "| default | 80.0 | 100.0 | – | – |"
    assert any("Beating `default` on both on every model: `knn`." in line for line in lines)


def test_semi_supervised_model_is_described_with_its_labelled_only_baseline():
    info = {
        "method": "curriculum labelling",
        "labelled_images": 1000,
        "test_accuracy": 0.6612,
        "bf16_autocast": True,
        "labelled_only": {"name": "vgg-labelled1000", "test_accuracy": 0.551},
    }
    text = page.describe_training(info)
    assert (
        "its card (bf16 autocast): 66.12% test" in text
        and "1000 labelled images alone 55.10%" in text
        and "(+11.0 points)" in text
    )
    del info["labelled_only"]  # older cards: no baseline claimed
    assert page.describe_training(info) == ", curriculum labelling (1000 labelled images, the rest unlabelled)"


def test_test_time_augmentation_is_described_only_where_the_card_has_it():
    info = {
        "device": "NVIDIA H200",
        "bf16_autocast": True,
        "test_accuracy": 0.9011,
        "test_accuracy_flip_tta": 0.9089,
        "test_accuracy_flip_translate_tta": 0.9112,
    }
    assert page.describe_test_time_augmentation(info) == (
        "; test accuracy on its card: 90.11% with one view (what the detector sees), 90.89% flip-averaged, "
        "91.12% flip-and-translate-averaged (NVIDIA H200, bf16 autocast)"
    )
    info["tta_study"] = {
        "device": "cpu",
        "bf16_autocast": True,
        "test_accuracy": {"plain": 0.901, "flip": 0.909, "flip+translate": 0.9112},
    }
    assert page.describe_test_time_augmentation(info) == (
        "; test accuracy on its card: 90.11% with one view (what the detector sees), 90.89% flip-averaged "
        "(NVIDIA H200, bf16 autocast), 91.12% flip-and-translate-averaged (cpu, bf16 autocast: 90.10 / 90.90 / "
        "91.12% one view / flip / flip and translate; view chosen on validation)"
    )
    del info["test_accuracy_flip_translate_tta"]
    assert page.describe_test_time_augmentation(info) == ""


def _row(scorer: str, source: str, auroc: float) -> EvalRow:
    return EvalRow(scorer, source, "ood", 10, 5, auroc, 0.0, 0.5, 0.0, 0.5, 0.0, 0.5, 0.0, 1)


def test_sign_test_matches_a_brute_force_binomial_sum():
    from math import comb

    def brute(fixed: int, broken: int) -> float:  # two-sided: every split no more likely than the observed one
        n = fixed + broken
        pmf = [comb(n, k) / 2**n for k in range(n + 1)]
        return min(1.0, sum(p for p in pmf if p <= pmf[fixed] * (1 + 1e-12)))

    for fixed, broken in [(14, 11), (3, 17), (0, 9), (25, 25), (1, 0)]:
        assert page.sign_test(fixed, broken) == pytest.approx(brute(fixed, broken), rel=1e-9)
    assert page.sign_test(0, 0) == 1.0


def test_every_claim_short_of_a_tick_gets_a_reason_read_from_the_same_run():
    rows = [
        _row("paper", "ood: mnist", 0.95),
        _row("paper", "ood: gaussian-noise", 0.40),  # the paper row misses this set ...
        _row("default", "ood: gaussian-noise", 0.99),  # ... the default row does not: a features reason
        _row("knn", "ood: gaussian-noise", 0.97),
        _row("paper", "fgsm ε=1/255", 0.60),
        _row("paper", "bim ε=1/255", 0.45),  # short of 50, and the default misses it too
        _row("default", "bim ε=1/255", 0.48),
        _row("knn", "bim ε=1/255", 0.70),
    ]
    purification = [
        {"nu": 0.0, "images": 5000, "accuracy_before": 0.9024, "accuracy_after": 0.9010, "changed": 0.005,
         "fixed": 9, "broken": 16, "sign_test_p": page.sign_test(9, 16)},
    ]  # fmt: skip
    runs = [{"name": "m", "result": EvalResult(rows=rows), "purification": purification}]
    text = "\n".join(page.paper_claims_section(runs))
    assert "| FGSM adversarial inputs have lower likelihood (AUROC > 50 at every ε) | ✓ AUROC 60.0–60.0" in text
    ood = next(line for line in text.splitlines() if line.startswith("- **OOD, m**"))
    assert "gaussian-noise: `paper` 40.0, `default` 99.0, best row `default` 99.0" in ood
    assert "the features" in ood and "mnist" not in ood  # mnist passed: not a shortfall
    bim = next(line for line in text.splitlines() if line.startswith("- **BIM, m**"))
    assert "bim 1/255: `paper` 45.0, `default` 48.0, best row `knn` 70.0" in bim and "misses it too" in bim
    assert "- **FGSM, m**" not in text
    assert "9 fixed, 16 broken, sign test p = 0.23" in text  # binomial(25, 1/2): P(≤ 9) twice = 0.2295
    purify_reason = next(line for line in text.splitlines() if line.startswith("- **Purification, m**"))
    assert "no loss beyond chance" in purify_reason
    purification[0].update(fixed=2, broken=20, sign_test_p=page.sign_test(2, 20))
    text = "\n".join(page.paper_claims_section(runs))
    assert "breaks significantly more predictions than it fixes" in text


def test_a_shortfall_with_no_other_row_on_its_source_still_gets_a_reason():
    auroc = {"paper": {"ood: mnist": 0.60}}
    reason = page.shortfall_reason(auroc, ["ood: mnist"], 0.9, inclusive=True)
    assert reason.startswith("mnist: `paper` 60.0 — ") and "misses it too" in reason


def _purified(before: float, after: float, fixed: int, broken: int, nu: float = 0.0) -> dict:
    return {"nu": nu, "images": 5000, "accuracy_before": before, "accuracy_after": after, "changed": 0.01,
            "fixed": fixed, "broken": broken, "sign_test_p": page.sign_test(fixed, broken)}  # fmt: skip


def test_purification_counts_as_a_gain_only_beyond_chance():
    # +0.10 from 15 fixed against 10 broken: p = 0.42, a gain within chance
    mark, why = page.purification_verdict([_purified(0.9102, 0.9112, 15, 10)])
    assert mark == "~" and "within chance (sign test p = 0.42)" in why
    # +0.40 from 30 fixed against 10 broken: p = 0.0022
    assert page.purification_verdict([_purified(0.90, 0.904, 30, 10), _purified(0.90, 0.899, 5, 10, 0.01)]) == (
        "✓",
        "",
    )
    assert page.purification_verdict([_purified(0.90, 0.91, 60, 10)])[0] == "~"  # +1.0: above the paper's bound
    mark, why = page.purification_verdict([_purified(0.90, 0.8986, 9, 16)])
    assert mark == "✗" and "no loss beyond chance" in why
    old = {key: value for key, value in _purified(0.90, 0.901, 6, 1).items() if key in ("nu", "accuracy_before",
           "accuracy_after", "changed")}  # fmt: skip
    assert page.purification_verdict([old]) == ("✓", "")  # runs saved before the counts: the gain alone


def test_the_header_names_the_cpus_the_runs_recorded():
    amx = {"model": "Xeon", "logical_cpus": 2, "bf16_instructions": ["amx_bf16", "avx512_bf16"]}
    plain = {"model": "EPYC", "logical_cpus": 2, "bf16_instructions": []}
    runs = [{"cpu": amx}, {"cpu": amx}, {"cpu": plain}, {}]
    assert page.machines_of(runs) == (
        "runs on Xeon with amx_bf16, avx512_bf16 / EPYC with no bf16 instructions / CPU not recorded"
    )
