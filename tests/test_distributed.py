"""One detector fitted across processes (torch.distributed, gloo on localhost) equals the one-process detector.

Each spawned rank fits, calibrates, saves and loads a detector on its own shard of the training and validation
rows (unequal shards, one of them empty with three ranks); the parent fits the same detectors in one process on
all rows (the shards concatenated in rank order) with the same seed and compares scores and thresholds.

Tolerances: scores are float32 (the detector's output), so ``rtol=1e-4`` is float32 rounding of float64
statistics summed in a different order. The mixtures are fitted in float64 where the scorer has a ``dtype``
setting. ZhengHong's class mixtures and the fused and conformal-fusion scorers' GMMs have none and run EM in
float32, whose products round differently for chunks of other shapes, so a split fit follows another path
(measured: a class mixture with 2 components reached 19.644 nats on two ranks against 19.654 in one process;
float64: equal). The ranks still agree bit for bit; only the comparison with one process is affected, so these
three are compared with one
component per mixture, fitted with ``fit_features`` on features extracted once so that the rows are
bit-identical (the model's float32 products also differ in the last bit between batch compositions).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from featurefail import FailureDetector, Features
from featurefail.distributed import (
    DistributedError,
    all_gather_json,
    all_gather_rows,
    all_reduce_sum,
    broadcast_json,
    extract_shard,
    state_digest,
    total_rows,
    union_labels,
)

F64 = {"dtype": "float64"}
# name -> (FailureDetector keywords, relative tolerance of the scores against one process); FEATURE_CASES are
# fitted and calibrated on precomputed penultimate features (fit_features), the others on the model (fit)
FEATURE_CASES = ("zheng_hong", "fused", "conformal_fusion")
CASES: dict[str, tuple[dict, float]] = {
    "default_l2_auto": ({"n_components": 3, **F64}, 1e-4),  # FailureDetector(): per layer, "auto" layers
    "gmm_pca": ({"scorer": "gmm", "n_components": 4, "preprocess": "pca:0.95", **F64}, 1e-4),
    "gmm_standardize_bpd": (
        {"scorer": "gmm", "n_components": 3, "preprocess": "standardize", "score": "bpd", **F64},
        1e-4,
    ),
    "gmm_tanh_random_init": (
        {"scorer": "gmm", "n_components": 3, "preprocess": "tanh", "init": "random_from_data", **F64},
        1e-4,
    ),
    "mahalanobis_layers": (
        {"scorer": "mahalanobis", "shrinkage": 0.1, "layer": ["0", None], "per_layer": True},
        1e-4,
    ),
    "mahalanobis_auto_eps": ({"scorer": "mahalanobis", "epsilon": "auto"}, 1e-4),
    "zheng_hong": ({"scorer": "zheng_hong", "n_components": 1}, 1e-4),
    "fused": ({"scorer": "fused", "n_components": 1, "preprocess": "l2"}, 1e-4),
    "temperature": ({"scorer": "temperature"}, 1e-4),
    "max_softmax": ({"scorer": "max_softmax"}, 1e-4),
    "max_logit": ({"scorer": "max_logit"}, 1e-4),
    "energy": ({"scorer": "energy"}, 1e-4),
    "relative_mahalanobis": ({"scorer": "relative_mahalanobis", "shrinkage": 0.01}, 1e-4),
    "knn": ({"scorer": "knn", "k": 5, "max_bank": 700, "random_state": 3}, 1e-4),
    "vim": ({"scorer": "vim", "dim": 8}, 1e-4),
    "react": ({"scorer": "react"}, 1e-4),
    "ash": ({"scorer": "ash"}, 1e-4),
    "odin_auto": ({"scorer": "odin", "temperature": "auto", "epsilon": "auto"}, 1e-4),
    "conformal_fusion": ({"scorer": "conformal_fusion", "n_components": 1}, 1e-4),
}
THREE_RANK_CASES = (
    "default_l2_auto",
    "gmm_pca",
    "mahalanobis_layers",
    "mahalanobis_auto_eps",
    "zheng_hong",
    "fused",
    "temperature",
    "relative_mahalanobis",
    "knn",
    "vim",
    "react",
    "odin_auto",
    "conformal_fusion",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _detector(name: str) -> FailureDetector:
    return FailureDetector(**CASES[name][0], progress=False)


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += 1


def _collectives(world: int, rank: int, out: str) -> None:
    """The helpers themselves, with unequal sizes (rank 1 of 3 holds nothing)."""
    rows = torch.arange(rank * 10, rank * 10 + [3, 0, 2][rank] * 2, dtype=torch.float64).reshape(-1, 2)
    gathered = all_gather_rows(rows)
    labels = torch.tensor([[0, 4], [], [4, 7, 7]][rank], dtype=torch.int64)
    checks = {
        "gathered": gathered.tolist(),
        "bools": all_gather_rows(torch.tensor([True, False][: 2 - rank % 2])).tolist(),
        "total": total_rows(len(rows)),
        "sum": all_reduce_sum(torch.tensor([float(rank)])).item(),
        "labels": union_labels(labels).tolist(),
        "json": all_gather_json({"rank": rank}),
        "broadcast": broadcast_json({"from": rank, "x": [1.5, None]} if rank == 2 else None, src=2),
    }

    def extract():  # rank 2 fails while the others succeed: nobody may wait forever
        if rank == 2:
            raise KeyError("boom on rank 2")
        return Features(torch.ones(2, 3)), {}

    try:
        extract_shard(extract)
        checks["error"] = None
    except DistributedError as exc:
        checks["error"] = f"DistributedError: {exc}"
    except KeyError as exc:
        checks["error"] = f"KeyError: {exc}"
    with open(os.path.join(out, f"collectives{rank}.json"), "w") as f:
        json.dump(checks, f)


def _unsupported(rank: int, model, train, out: str) -> None:
    from featurefail.scorers import GMMScorer, VAEScorer, register_scorer

    @register_scorer("undeclared_gmm")  # only in this child process
    class UndeclaredGMM(GMMScorer):  # inherits fit, but does not declare supports_distributed itself
        def fit(self, features):
            return super().fit(features)

    messages = {}
    for name, make in (
        ("vae", lambda: FailureDetector(scorer="vae", epochs=1, progress=False).fit(model, train)),
        (
            "undeclared",
            lambda: FailureDetector(scorer="undeclared_gmm", n_components=2, progress=False).fit(model, train),
        ),
        ("vae_direct", lambda: VAEScorer(epochs=1).fit(Features(torch.randn(40 + rank, 4)))),
    ):
        try:
            make()
            messages[name] = None
        except RuntimeError as exc:
            messages[name] = str(exc)
    with open(os.path.join(out, f"unsupported{rank}.json"), "w") as f:
        json.dump(messages, f)


def _worker(rank: int, world: int, port: int, out: str, payload: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    counter = _Count()
    logging.getLogger("featurefail.distributed").addHandler(counter)
    logging.getLogger("featurefail.distributed").setLevel(logging.INFO)
    try:
        from models import mlp

        model = mlp()
        model.load_state_dict(payload["model"])
        (x_tr, y_tr), (x_val, y_val), x_test = payload["train"], payload["val"], payload["test"]
        lo, hi = payload["train_bounds"][rank], payload["train_bounds"][rank + 1]
        train = _batches(x_tr[lo:hi], y_tr[lo:hi])
        lo, hi = payload["val_bounds"][rank], payload["val_bounds"][rank + 1]
        val = _batches(x_val[lo:hi], y_val[lo:hi])
        results = {}
        for name in payload["cases"]:
            if name in FEATURE_CASES:
                tr, va = payload["features"]
                tr = tr.subset(slice(*payload["train_bounds"][rank : rank + 2]))
                va = va.subset(slice(*payload["val_bounds"][rank : rank + 2]))
                det = _detector(name).fit_features(tr, model=model).calibrate(va)
            else:
                det = _detector(name).fit(model, train).calibrate(val)
            path = os.path.join(out, f"{name}.safetensors")
            det.save(path)
            loaded = FailureDetector.load(path, model=model)
            results[name] = {
                "scores": det.score(x_test).tolist(),
                "loaded_scores": loaded.score(x_test).tolist(),
                "threshold": det.threshold_,
                "loaded_threshold": loaded.threshold_,
                "digest": state_digest(det.scorer_.state_dict()),
            }
        results["adopted"] = counter.n
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        if world == 2:
            _unsupported(rank, model, train, out)
        else:
            _collectives(world, rank, out)
        torch.distributed.barrier()  # leave together: a rank tearing gloo down while another still talks aborts
        with open(os.path.join(out, f"done{rank}"), "w") as f:
            f.write("every step of this rank finished")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def single(trained_mlp):
    """One-process detectors on all rows (scores of the test inputs, threshold), fitted once per case."""
    model, splits = trained_mlp
    train, val = _batches(*splits["train"]), _batches(*splits["val"])
    x_test = splits["test"][0]
    tr, va = _features(trained_mlp)
    out = {}
    for name in CASES:
        if name in FEATURE_CASES:
            det = _detector(name).fit_features(tr, model=model).calibrate(va)
        else:
            det = _detector(name).fit(model, train).calibrate(val)
        out[name] = (det.score(x_test).double().numpy(), det.threshold_)
    return out


def _features(trained_mlp) -> tuple[Features, Features]:
    """Penultimate training and validation features, extracted once."""
    model, splits = trained_mlp
    det = FailureDetector(scorer="max_logit", progress=False).fit(model, _batches(*splits["train"]))
    out = []
    for x, y in (splits["train"], splits["val"]):
        f = det.features(x)
        out.append(Features(f.feats, f.logits, y))
    return out[0], out[1]


def _spawn(tmp_path, trained_mlp, world: int, train_bounds: list[int], val_bounds: list[int], cases) -> list[dict]:
    model, splits = trained_mlp
    payload = {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "train": splits["train"],
        "val": splits["val"],
        "test": splits["test"][0],
        "train_bounds": train_bounds,
        "val_bounds": val_bounds,
        "cases": list(cases),
        "features": _features(trained_mlp),
    }
    try:
        mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), payload), nprocs=world, join=True)
    except mp.ProcessExitedException as exc:
        # gloo sometimes aborts in its C++ teardown ("terminate called without an active exception") after every
        # rank has finished and passed the final barrier: accept that, and only that
        finished = all((tmp_path / f"done{r}").exists() for r in range(world))
        if not (finished and exc.signal_name == "SIGABRT"):
            raise
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _check(results: list[dict], single: dict, cases) -> None:
    # every rank computed bit-identical fitted states by itself: none had to adopt rank 0's
    assert [r["adopted"] for r in results] == [0] * len(results)
    for name in cases:
        ranks = [r[name] for r in results]
        for r in ranks[1:]:
            assert r["digest"] == ranks[0]["digest"], name
            assert r["scores"] == ranks[0]["scores"], name
            assert r["threshold"] == ranks[0]["threshold"], name
        for r in ranks:
            assert r["loaded_scores"] == r["scores"] and r["loaded_threshold"] == r["threshold"], name
        scores, threshold = single[name]
        rtol = CASES[name][1]
        got = np.asarray(ranks[0]["scores"])
        assert np.isfinite(got).all(), name
        scale = np.abs(scores).max()
        np.testing.assert_allclose(got, scores, rtol=rtol, atol=rtol * scale, err_msg=name)
        assert threshold == pytest.approx(ranks[0]["threshold"], rel=rtol, abs=rtol * scale), name


@pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32", reason="needs gloo")
def test_two_ranks_fit_the_one_process_detector_and_unsupported_scorers_refuse(tmp_path, trained_mlp, single):
    results = _spawn(tmp_path, trained_mlp, 2, [0, 550, 900], [0, 100, 300], CASES)
    _check(results, single, CASES)
    for rank in range(2):
        messages = json.loads((tmp_path / f"unsupported{rank}.json").read_text())
        for name in ("vae", "undeclared", "vae_direct"):
            assert messages[name] is not None and "cannot be fitted across processes" in messages[name], name
        assert "'undeclared_gmm'" in messages["undeclared"] and "world size 2" in messages["vae"]


@pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32", reason="needs gloo")
def test_three_unequal_ranks_one_empty(tmp_path, trained_mlp, single):
    # rank 1 holds no training row and no validation row
    results = _spawn(tmp_path, trained_mlp, 3, [0, 420, 420, 900], [0, 120, 120, 300], THREE_RANK_CASES)
    _check(results, single, THREE_RANK_CASES)
    checks = [json.loads((tmp_path / f"collectives{r}.json").read_text()) for r in range(3)]
    expected_rows = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [20.0, 21.0], [22.0, 23.0]]
    for rank, c in enumerate(checks):
        assert c["gathered"] == expected_rows
        assert c["bools"] == [True, False, True, True, False]
        assert c["total"] == 5 and c["sum"] == 3.0
        assert c["labels"] == [0, 4, 7]
        assert c["json"] == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
        assert c["broadcast"] == {"from": 2, "x": [1.5, None]}
        if rank == 2:
            assert c["error"].startswith("KeyError") and "boom" in c["error"]
        else:
            assert c["error"].startswith("DistributedError") and "rank 2 failed" in c["error"] and "boom" in c["error"]
