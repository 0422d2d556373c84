"""The bad-input suite (issue 17), in the spirit of scikit-learn's ``check_estimator``.

Every case feeds one bad input or one misuse through the public API and asserts its exact outcome class: a
clear error (the exception type and a message naming the problem) or a specific sensible result. Nothing may
end in a raw crash (an exception from deep inside torch/numpy/safetensors), a silent NaN or a silently wrong
result. Categories: loaders, data, models, settings, calibration, misuse, save/load tampering, GMM degenerate
data, statistics, purification, concurrency, deployment. docs/reliability.md summarises the outcomes.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from models import TinyResNet, blob_data, mlp, train
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from featurefail import DetectorConfig, DiagonalGMM, FailureDetector, Features, NotFittedError, mann_whitney, metrics
from featurefail.loading import load_model
from featurefail.ood import DatasetImages, NpzImages, gaussian_noise, uniform_noise
from featurefail.scorers import Scorer

NAN, INF = math.nan, math.inf


# ---- the shared environment (built once; cases that change a detector build their own) ----------------------------


def batches(x: torch.Tensor, y: torch.Tensor | None = None, size: int = 128) -> list:
    return [(x[i : i + size],) if y is None else (x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def paper(k: int = 3, **kwargs: Any) -> FailureDetector:
    return FailureDetector.paper(n_components=k, progress=False, **kwargs)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    x, y = blob_data(n=1000, seed=3)
    model = train(mlp(), x[:600], y[:600], epochs=15)
    e = SimpleNamespace(model=model, x=x[600:800], y=y[600:800], x_val=x[800:], y_val=y[800:])
    e.train = batches(x[:600], y[:600])
    e.val = batches(e.x_val, e.y_val)
    e.det = paper().fit(model, e.train).calibrate(e.val, folds=3)
    e.plain = paper().fit(model, e.train)  # fitted, never calibrated: for cases that must not change it
    e.default = FailureDetector(n_components=3, progress=False).fit(model, e.train)
    e.folder = tmp_path_factory.mktemp("bad_inputs")
    e.file = e.folder / "det.safetensors"
    e.det.save(e.file)
    with safe_open(str(e.file), framework="pt") as f:
        e.meta, e.tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    e.other_model = copy.deepcopy(model)
    with torch.no_grad():
        e.other_model[0].weight.mul_(1.01)  # same architecture, other weights
    e.counter = itertools.count()

    def fresh(**kwargs: Any) -> FailureDetector:
        return paper(**kwargs).fit(model, e.train)

    def tamper(meta: dict | None = None, tensors: dict | None = None, drop: tuple = (), **config: Any) -> Any:
        m, t = dict(e.meta), dict(e.tensors)
        if config:
            m["config"] = json.dumps(json.loads(m["config"]) | config)
        m.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()})
        t.update({k: v.contiguous() for k, v in (tensors or {}).items()})
        for key in drop:
            m.pop(key, None)
            t.pop(key, None)
        path = e.folder / f"tampered{next(e.counter)}.safetensors"
        save_file(t, str(path), metadata=m)
        return path

    def scorer_options(**changes: Any) -> dict:
        return {"scorer_options": json.loads(e.meta["config"])["scorer_options"] | changes}

    e.fresh, e.tamper, e.scorer_options = fresh, tamper, scorer_options
    e.cal = json.loads(e.meta["calibration"])
    e.scalars = json.loads(e.meta["scorer_scalars"])
    return e


@dataclass(frozen=True)
class Case:
    """One bad input: ``call(env)`` raises ``raises`` with a message matching ``match``, or returns a value for
    which ``check(value, env)`` is True."""

    name: str
    call: Callable[[SimpleNamespace], Any]
    raises: type[BaseException] | None = None
    match: str = ""
    check: Callable[[Any, SimpleNamespace], bool] | None = None
    xfail: str = ""


def err(name: str, call: Callable, raises: type[BaseException], match: str, xfail: str = "") -> Case:
    return Case(name, call, raises=raises, match=match, xfail=xfail)


def ok(name: str, call: Callable, check: Callable[[Any, SimpleNamespace], bool], xfail: str = "") -> Case:
    return Case(name, call, check=check, xfail=xfail)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True))


def empty_float(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.shape == (0,) and t.dtype == torch.float32


def with_nan_row(x: torch.Tensor, value: float = NAN, row: int = 1) -> torch.Tensor:
    x = x.clone()
    x[row, 0] = value
    return x


# ---- loaders: what fit/score/detect receive -----------------------------------------------------------------------


def _refit_with_nan_keeps_old(e: SimpleNamespace) -> bool:
    """Issue 17.1: a failed re-fit on another model leaves the detector exactly as it was."""
    det = e.fresh()
    det.threshold_ = float(det.score(e.x).median())
    before, flags = det.score(e.x), det.detect(e.x)
    try:
        det.fit(e.other_model, [(with_nan_row(e.x[:100]),)])
    except ValueError:
        pass
    else:
        return False
    return det.model_ is e.model and torch.equal(det.score(e.x), before) and torch.equal(det.detect(e.x), flags)


LOADERS = [
    err("fit/empty list", lambda e: paper().fit(e.model, []), ValueError, "no samples"),
    err("fit/only empty batches", lambda e: paper().fit(e.model, [(e.x[:0],)]), ValueError, "no samples"),
    err("fit/NaN row", lambda e: paper().fit(e.model, [(with_nan_row(e.x),)]), ValueError, r"1 row\(s\) with NaN"),
    err("fit/inf row", lambda e: paper().fit(e.model, [(with_nan_row(e.x, INF),)]), ValueError, r"1 row\(s\) with NaN"),
    err("fit/loader None", lambda e: paper().fit(e.model, None), TypeError, "loader must be an iterable.*NoneType"),
    err("fit/loader a number", lambda e: paper().fit(e.model, 7), TypeError, "loader must be an iterable.*int"),
    err("fit/loader a string", lambda e: paper().fit(e.model, "data/"), TypeError, "loader must be an iterable.*str"),
    err(
        "fit/labels on some batches only",
        lambda e: paper().fit(e.model, [(e.x[:50], e.y[:50]), (e.x[50:100],)]),
        ValueError,
        "some batches carry labels and others do not",
    ),
    err(
        "fit/fewer labels than inputs",
        lambda e: paper().fit(e.model, [(e.x[:50], e.y[:40])]),
        ValueError,
        "50 inputs but 40 labels",
    ),
    err(
        "fit/mapping with labels only",
        lambda e: paper().fit(e.model, [{"y": e.y[:50]}]),
        ValueError,
        "holds only labels",
    ),
    err(
        "fit/batch_fn returns a 3-tuple",
        lambda e: paper().fit(e.model, e.train, batch_fn=lambda b: (b[0], b[1], b[1])),
        TypeError,
        "batch_fn must return.*length 3",
    ),
    ok("fit/a failed re-fit on another model keeps the old fit (17.1)", _refit_with_nan_keeps_old, lambda r, e: r),
    ok(
        "fit/batch_fn returning only x",
        lambda e: paper().fit(e.model, e.train, batch_fn=lambda b: b[0]).score(e.x),
        lambda r, e: same(r, e.plain.score(e.x)),
    ),
    ok(
        "fit/a one-shot generator",
        lambda e: paper().fit(e.model, (b for b in e.train)).score(e.x),
        lambda r, e: same(r, e.plain.score(e.x)),
    ),
    ok("score/x[:0] is an empty tensor", lambda e: e.det.score(e.x[:0]), lambda r, e: empty_float(r)),
    ok(
        "detect/x[:0] is an empty bool tensor",
        lambda e: e.det.detect(e.x[:0]),
        lambda r, e: r.shape == (0,) and r.dtype == torch.bool,
    ),
    ok("score/empty mapping batch", lambda e: e.det.score({"x": e.x[:0]}), lambda r, e: empty_float(r)),
    err("score/one example without batch dim", lambda e: e.det.score(e.x[0]), ValueError, "batch dimension"),
    err("score/0-d tensor", lambda e: e.det.score(torch.tensor(1.0)), ValueError, "0-d tensor.*batch dimension"),
    err("score/None", lambda e: e.det.score(None), TypeError, "cannot score a NoneType"),
    err("score/a string", lambda e: e.det.score("image.png"), TypeError, "cannot score a str"),
    err("score/a number", lambda e: e.det.score(3.0), TypeError, "cannot score a float"),
    err("score/NumPy array", lambda e: e.det.score(e.x.numpy()), TypeError, "NumPy array.*torch.from_numpy"),
    ok(
        "score/mapping batch {'x': ...}",
        lambda e: e.det.score({"x": e.x[:7]}),
        lambda r, e: same(r, e.det.score(e.x[:7])),
    ),
    ok(
        "score/list of batches",
        lambda e: e.det.score([e.x[:3], (e.x[3:7],)]),
        lambda r, e: same(r, e.det.score(e.x[:7])),
    ),
    ok(
        "score/batch_fn returning only x",
        lambda e: e.det.score([(e.x[:9], e.y[:9])], batch_fn=lambda b: b[0]),
        lambda r, e: same(r, e.det.score(e.x[:9])),
    ),
    ok(
        "score/NaN input row is -inf, others unchanged",
        lambda e: e.det.score(with_nan_row(e.x[:6])),
        lambda r, e: r[1] == -INF and same(r[[0, 2, 3, 4, 5]], e.det.score(e.x[:6])[[0, 2, 3, 4, 5]]),
    ),
    ok(
        "detect/NaN input row is flagged",
        lambda e: e.det.detect(with_nan_row(e.x[:6], INF)),
        lambda r, e: bool(r[1]),
    ),
]


# ---- files: images (.npz) and model weights for the command line ---------------------------------------------------


def npz(e: SimpleNamespace, **arrays: Any) -> Any:
    path = e.folder / f"images{next(e.counter)}.npz"
    np.savez(path, **arrays)
    return path


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (print, ("a pickle ran code",))


def _npy(e: SimpleNamespace) -> Any:
    path = e.folder / "single.npy"
    np.save(path, IMAGES)
    return path


def _net_file(e: SimpleNamespace) -> str:
    path = e.folder / "net.py"
    path.write_text("from torch import nn\n\ndef make():\n    return nn.Linear(4, 2)\n")
    return f"{path}:make"


def _weights(e: SimpleNamespace, name: str, obj: Any) -> str:
    path = e.folder / name
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:
        torch.save(obj, path)
    return str(path)


IMAGES = np.zeros((3, 4, 4, 1), dtype=np.uint8)
FILES = [
    err(
        "npz/object array",
        lambda e: NpzImages(npz(e, x=np.array([object(), 1]))),
        ValueError,
        "not a readable .npz file.*allow_pickle=False",
    ),
    err(
        "npz/garbage bytes",
        lambda e: NpzImages(_weights(e, "g.npz", b"garbage")),
        ValueError,
        "not a readable .npz file of images",
    ),
    err(
        "npz/a single .npy array",
        lambda e: NpzImages(_npy(e)),
        ValueError,
        "holds a single array",
    ),
    err("npz/no array x", lambda e: NpzImages(npz(e, y=np.zeros(3))), ValueError, r"no array 'x' \(found \['y'\]\)"),
    err("npz/x of 2 axes", lambda e: NpzImages(npz(e, x=np.zeros((3, 4)))), ValueError, r"x must be \(N, H, W, C\)"),
    err(
        "npz/fewer labels than images",
        lambda e: NpzImages(npz(e, x=IMAGES, y=np.arange(2))),
        ValueError,
        "one label per image, got shape \\(2,\\) for 3 images",
    ),
    err(
        "npz/NaN pixels",
        lambda e: NpzImages(npz(e, x=np.full((3, 4, 4, 1), np.nan, np.float32))),
        ValueError,
        "x holds NaN",
    ),
    err("npz/size 0", lambda e: NpzImages(npz(e, x=IMAGES), size=0), ValueError, "size must be >= 1"),
    err(
        "npz/3 channels to 2",
        lambda e: NpzImages(npz(e, x=np.zeros((3, 4, 4, 3), np.uint8)), channels=2),
        ValueError,
        "cannot convert 3 channels to 2",
    ),
    ok("npz/no images: an empty set", lambda e: len(NpzImages(npz(e, x=IMAGES[:0]))), lambda r, e: r == 0),
    err("noise/n -1", lambda e: gaussian_noise(torch.rand(3, 1, 4, 4), -1), ValueError, "n must be >= 0"),
    err(
        "noise/empty reference (was NaN images)",
        lambda e: gaussian_noise(torch.rand(0, 1, 4, 4), 2),
        ValueError,
        "reference must be a non-empty batch",
    ),
    err("noise/uniform n -1", lambda e: uniform_noise((1, 4, 4), -1), ValueError, "n must be >= 0"),
    err(
        "load_model/no factory name",
        lambda e: load_model("torchvision.models.resnet18"),
        ValueError,
        "must be 'package.module:factory'",
    ),
    err(
        "load_model/missing weights",
        lambda e: load_model(_net_file(e), str(e.folder / "nope.pt")),
        FileNotFoundError,
        "no such weights file",
    ),
    err(
        "load_model/weights of other shapes",
        lambda e: load_model(_net_file(e), _weights(e, "w.pt", {"weight": torch.zeros(3, 4)})),
        ValueError,
        "(?s)do not fit.*size mismatch",
    ),
    err(
        "load_model/a pickle that runs code",
        lambda e: load_model(_net_file(e), _weights(e, "evil.pt", _RunsCode())),
        ValueError,
        "not a readable state dict",
    ),
    err(
        "load_model/garbage safetensors",
        lambda e: load_model(_net_file(e), _weights(e, "w.safetensors", b"xx")),
        ValueError,
        "not a readable state dict",
    ),
    err(
        "load_model/a list, not a state dict",
        lambda e: load_model(_net_file(e), _weights(e, "l.pt", [1, 2])),
        ValueError,
        "holds a list, not a state dict",
    ),
    err(
        "load_model/garbage TorchScript",
        lambda e: load_model(torchscript=_weights(e, "s.pt", b"garbage")),
        ValueError,
        "not a readable TorchScript file",
    ),
]


# ---- data: precomputed features -----------------------------------------------------------------------------------

DATA = [
    err(
        "score_features/wrong D",
        lambda e: e.det.score_features(torch.randn(4, 23)),
        ValueError,
        "dimension 23, expected 24",
    ),
    err(
        "score_features/empty of wrong D", lambda e: e.det.score_features(torch.randn(0, 5)), ValueError, "dimension 5"
    ),
    err("score_features/1-D", lambda e: e.det.score_features(torch.randn(24)), ValueError, r"must be \(N, D\)"),
    err("score_features/a list", lambda e: e.det.score_features([[0.0] * 24]), TypeError, "Features or an"),
    ok(
        "score_features/(0, D) is empty",
        lambda e: e.det.score_features(torch.randn(0, 24)),
        lambda r, e: empty_float(r),
    ),
    ok(
        "score_features/NaN and inf rows are -inf",
        lambda e: e.det.score_features(torch.tensor([[NAN] * 24, [INF] * 24, [-INF] * 24])),
        lambda r, e: bool((r == -INF).all()),
    ),
    ok(
        "score_features/1e30 (float32 overflow) is -inf, never NaN",
        lambda e: e.det.score_features(torch.full((2, 24), 1e30)),
        lambda r, e: bool((r == -INF).all()),
    ),
    ok(
        "score_features/NumPy array equals tensor",
        lambda e: e.det.score_features(np.ones((3, 24), dtype=np.float32)),
        lambda r, e: same(r, e.det.score_features(torch.ones(3, 24))),
    ),
    ok(
        "score_features/float64 equals float32",
        lambda e: e.det.score_features(e.det.features(e.x[:5]).feats.double()),
        lambda r, e: same(r, e.det.score(e.x[:5])),
    ),
    ok(
        "detect_features/NaN row flagged at any threshold",
        lambda e: e.det.detect_features(torch.tensor([[NAN] * 24]), threshold=-1e30),
        lambda r, e: bool(r.all()),
    ),
    err(
        "fit_features/inf rows",
        lambda e: paper().fit_features(Features(with_nan_row(torch.randn(50, 4), INF))),
        ValueError,
        r"1 row\(s\) with NaN or infinite",
    ),
    err(
        "fit_features/fewer rows than components",
        lambda e: paper(k=20).fit_features(Features(torch.randn(5, 4))),
        ValueError,
        r"n_components=20 is larger than the number of samples \(5\)",
    ),
    err(
        "fit_features/(N, 0)",
        lambda e: paper().fit_features(Features(torch.randn(50, 0))),
        ValueError,
        "0 features",
    ),
    err(
        "fit_features/head of another width",
        lambda e: paper().fit_features(torch.randn(40, 4), head=(torch.randn(3, 5), torch.randn(3))),
        ValueError,
        r"head must be weight \(C, 4\) and bias \(C,\)",
    ),
    err(
        "fit_features/head not a pair",
        lambda e: paper().fit_features(torch.randn(40, 4), head=torch.randn(3, 4)),
        TypeError,
        "head must be a pair of tensors",
    ),
    err(
        "fit_features/head with NaN",
        lambda e: paper().fit_features(torch.randn(40, 4), head=(torch.full((3, 4), NAN), torch.zeros(3))),
        ValueError,
        "head's weight or bias holds NaN",
    ),
    err(
        "fit_features/model not an nn.Module",
        lambda e: paper().fit_features(torch.randn(40, 4), model="m"),
        TypeError,
        "torch.nn.Module, got str",
    ),
    err("fit_features/a string", lambda e: paper().fit_features("feats.npy"), TypeError, "Features or an"),
    ok(
        "fit_features/a plain tensor",
        lambda e: paper().fit_features(torch.randn(60, 4)).score_features(torch.zeros(2, 4)),
        lambda r, e: r.shape == (2,) and bool(torch.isfinite(r).all()),
    ),
    ok(
        "fit_features/constant features give finite scores",
        lambda e: paper().fit_features(Features(torch.ones(60, 4))).score_features(torch.ones(2, 4)),
        lambda r, e: bool(torch.isfinite(r).all()),
    ),
    err(
        "Features/labels of another length",
        lambda e: Features(torch.randn(5, 3), labels=torch.zeros(4, dtype=torch.long)),
        ValueError,
        "labels has 4 rows but feats has 5",
    ),
]


# ---- models -------------------------------------------------------------------------------------------------------


class DictOutput(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict:
        return {"out": self.net(x)}


class NoHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def _nan_weights(e: SimpleNamespace) -> nn.Module:
    model = copy.deepcopy(e.model)
    with torch.no_grad():
        model[2].weight[0, 0] = NAN
    return model


def _fit_leaves_model_alone(e: SimpleNamespace) -> bool:
    model = copy.deepcopy(e.model).train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    det = paper().fit(model, e.train)
    det.score(e.x)
    hooks = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    return [m.training for m in model.modules()] == modes and unchanged and not hooks


MODELS = [
    err("model/not an nn.Module", lambda e: paper().fit("resnet18", e.train), TypeError, "torch.nn.Module, got str"),
    err(
        "model/no head and layer=None",
        lambda e: paper().fit(NoHead(), [(torch.rand(30, 1, 6, 6),)]),
        ValueError,
        "head cannot be found.*Pass layer=",
    ),
    err(
        "model/dict output without output_fn",
        lambda e: paper().fit(DictOutput(e.model), e.train),
        TypeError,
        "cannot find logits.*dict; pass output_fn",
    ),
    ok(
        "model/dict output with output_fn",
        lambda e: paper(output_fn=lambda o: o["out"]).fit(DictOutput(e.model), e.train).score(e.x),
        lambda r, e: same(r, e.plain.score(e.x)),
    ),
    err(
        "model/layer that does not exist",
        lambda e: paper(layer="nope").fit(e.model, e.train),
        ValueError,
        "no module named 'nope'",
    ),
    err(
        "model/inputs of the wrong width: the model's own error, unchanged",
        lambda e: e.det.score(torch.randn(4, 15)),
        RuntimeError,
        "shapes cannot be multiplied",
    ),
    err(
        "model/NaN in its weights: every row NaN",
        lambda e: paper().fit(_nan_weights(e), e.train),
        ValueError,
        r"600 row\(s\) with NaN",
    ),
    ok("model/fit and score leave modes, weights, hooks as they were", _fit_leaves_model_alone, lambda r, e: r),
]


# ---- settings -----------------------------------------------------------------------------------------------------


class Unregistered(Scorer):
    def fit(self, features: Features) -> Unregistered:
        return self


SETTINGS = [
    err("settings/unknown scorer", lambda e: FailureDetector(scorer="nope"), ValueError, "unknown scorer 'nope'"),
    err("settings/scorer a number", lambda e: FailureDetector(scorer=3), TypeError, "registered name or a Scorer"),
    err("settings/unknown setting", lambda e: FailureDetector(bogus=1), ValueError, "'gmm' has no setting 'bogus'"),
    err(
        "settings/setting of another scorer",
        lambda e: FailureDetector(scorer="max_softmax", n_components=5),
        ValueError,
        "'max_softmax' has no setting 'n_components'",
    ),
    err("settings/n_components 0", lambda e: FailureDetector(n_components=0), ValueError, "n_components"),
    err("settings/n_components 'a'", lambda e: FailureDetector(n_components="a"), ValueError, "n_components"),
    err("settings/n_components 2.5", lambda e: FailureDetector(n_components=2.5), ValueError, "n_components"),
    err("settings/score 'nats'", lambda e: FailureDetector(score="nats"), ValueError, "score"),
    err("settings/preprocess 'zca'", lambda e: FailureDetector(preprocess="zca"), ValueError, "preprocessing 'zca'"),
    err("settings/device 'gpu9'", lambda e: FailureDetector(device="gpu9"), ValueError, "'gpu9' is not a torch device"),
    err("settings/device 'meta'", lambda e: FailureDetector(device="meta"), ValueError, "device 'meta' holds no data"),
    err(
        "settings/scorer's own device 'meta'",
        lambda e: FailureDetector(scorer_options={"device": "meta"}),
        ValueError,
        "device 'meta' holds no data",
    ),
    err("settings/batch_size 0", lambda e: FailureDetector(batch_size=0), ValueError, "batch_size"),
    err("settings/pool 'max'", lambda e: FailureDetector(pool="max"), ValueError, "pool"),
    err("settings/layer []", lambda e: FailureDetector(layer=[]), ValueError, "layer is an empty list"),
    err("settings/layer twice", lambda e: FailureDetector(layer=["0", "0"]), ValueError, "lists a module twice"),
    err(
        "settings/config and keywords",
        lambda e: FailureDetector(DetectorConfig(), n_components=3),
        ValueError,
        "either a DetectorConfig or keyword settings",
    ),
    err(
        "settings/unregistered scorer instance",
        lambda e: FailureDetector(scorer=Unregistered()),
        ValueError,
        "not registered",
    ),
]


# ---- scorers: what each method needs ------------------------------------------------------------------------------


def labelled_features(n: int = 60, d: int = 4, classes: int = 3, feats: torch.Tensor | None = None) -> Features:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(n, d, generator=g) if feats is None else feats
    labels = torch.arange(n) % classes
    return Features(f, torch.randn(n, 3, generator=g), labels)


def scorer(name: str, **settings: Any) -> FailureDetector:
    return FailureDetector(scorer=name, progress=False, **settings)


def _constant_fit(name: str, **settings: Any) -> torch.Tensor:
    """Fit on constant features; score the training point and two others."""
    det = scorer(name, **settings).fit_features(labelled_features(feats=torch.ones(60, 4)))
    return det.score_features(torch.tensor([[1.0] * 4, [3.0] * 4, [-2.0, 1.0, 1.0, 1.0]]))


SCORERS = [
    err(
        "max_softmax/features without logits",
        lambda e: scorer("max_softmax").fit_features(torch.randn(20, 4)),
        ValueError,
        "MaxSoftmax needs logits",
    ),
    err(
        "fused/features without logits",
        lambda e: scorer("fused").fit_features(torch.randn(20, 4)),
        ValueError,
        "needs logits",
    ),
    err(
        "max_logit/score features without logits",
        lambda e: scorer("max_logit").fit_features(labelled_features()).score_features(torch.randn(2, 4)),
        ValueError,
        "MaxLogit needs logits",
    ),
    ok(
        "max_softmax/a NaN logit row is -inf",
        lambda e: (
            scorer("max_softmax")
            .fit_features(labelled_features())
            .score_features(Features(torch.randn(2, 4), torch.tensor([[NAN, 0.0, 0.0], [1.0, 2.0, 3.0]])))
        ),
        lambda r, e: r[0] == -INF and bool(torch.isfinite(r[1])),
    ),
    err(
        "temperature/score before fit_validation",
        lambda e: scorer("temperature").fit(e.model, e.train).score(e.x),
        NotFittedError,
        "needs labelled validation data: call detector.calibrate",
    ),
    err(
        "temperature/fit_validation without labels",
        lambda e: scorer("temperature").fit(e.model, e.train).fit_validation([(e.x_val,)]),
        ValueError,
        "need labels",
    ),
    err(
        "mahalanobis/fit without labels",
        lambda e: scorer("mahalanobis").fit(e.model, [(e.x,)]),
        ValueError,
        "'mahalanobis' needs labels to fit",
    ),
    err(
        "mahalanobis/one class",
        lambda e: scorer("mahalanobis").fit_features(labelled_features(classes=1)),
        ValueError,
        "at least two classes",
    ),
    err(
        "zheng_hong/one class",
        lambda e: scorer("zheng_hong").fit_features(labelled_features(classes=1)),
        ValueError,
        "at least two classes",
    ),
    ok(
        "mahalanobis/more dimensions than rows gives finite scores",
        lambda e: scorer("mahalanobis").fit_features(labelled_features(n=10, d=24)).score_features(torch.randn(3, 24)),
        lambda r, e: bool(torch.isfinite(r).all()),
    ),
    err(
        "mahalanobis/constant features: every distance would be 0",
        lambda e: _constant_fit("mahalanobis"),
        ValueError,
        "do not vary within their classes",
    ),
    ok(
        "gmm/standardize on constant features: the training point scores highest",
        lambda e: _constant_fit("gmm", n_components=2, preprocess="standardize"),
        lambda r, e: bool(torch.isfinite(r[0])) and bool(r[0] > r[1:].max()),
    ),
    err(
        "gmm/PCA whitening of constant features",
        lambda e: _constant_fit("gmm", n_components=2, preprocess="pca"),
        ValueError,
        "features are constant: PCA whitening",
    ),
    ok(
        "gmm/l2 preprocessing of all-zero features gives finite scores",
        lambda e: (
            scorer("gmm", n_components=2, preprocess="l2")
            .fit_features(torch.randn(40, 4))
            .score_features(torch.zeros(2, 4))
        ),
        lambda r, e: bool(torch.isfinite(r).all()),
    ),
]


# ---- calibration --------------------------------------------------------------------------------------------------


def _unlabelled_rows_ignored(e: SimpleNamespace) -> tuple[float, float]:
    """Issue 17.7: rows labelled -1 change nothing: the threshold equals calibrating on the labelled rows only."""
    y = e.y_val.clone()
    y[::3] = -1
    mixed = e.fresh().calibrate([(e.x_val, y)], folds=3)
    keep = y >= 0
    labelled = e.fresh().calibrate([(e.x_val[keep], y[keep])], folds=3)
    return mixed.threshold_, labelled.threshold_


def _failed_calibration_keeps_threshold(e: SimpleNamespace) -> bool:
    det = e.fresh().calibrate(e.val, folds=3)
    before = (det.threshold_, det.calibration_)
    try:
        det.calibrate(e.val, folds=1000)
    except ValueError:
        return (det.threshold_, det.calibration_) == before
    return False


CALIBRATION = [
    err(
        "calibrate/before fit says not fitted",
        lambda e: FailureDetector().calibrate(e.val),
        NotFittedError,
        "not fitted yet; call fit",
    ),
    err("calibrate/no labels", lambda e: e.plain.calibrate([(e.x_val,)]), ValueError, "needs labelled validation data"),
    err(
        "calibrate/every label -1",
        lambda e: e.plain.calibrate([(e.x_val, torch.full_like(e.y_val, -1))]),
        ValueError,
        "every label is < 0",
    ),
    ok("calibrate/labels -1 are ignored (17.7)", _unlabelled_rows_ignored, lambda r, e: r[0] == r[1]),
    err(
        "calibrate/labels beyond the classes",
        lambda e: e.plain.calibrate([(e.x_val, torch.full_like(e.y_val, 7))]),
        ValueError,
        r"labels must be class indices in \[0, 3\)",
    ),
    err(
        "calibrate/unknown strategy",
        lambda e: e.plain.calibrate(e.val, strategy="accuracy"),
        ValueError,
        "strategy must be",
    ),
    err("calibrate/folds 1", lambda e: e.plain.calibrate(e.val, folds=1), ValueError, "folds must be >= 2"),
    err(
        "calibrate/more folds than mistakes",
        lambda e: e.plain.calibrate(e.val, folds=1000),
        ValueError,
        "1000 folds needs at least 1000 failures",
    ),
    err(
        "calibrate/no mistakes at all",
        lambda e: e.plain.calibrate([(e.x_val, e.model(e.x_val).argmax(1))]),
        ValueError,
        "got 0 failures",
    ),
    err(
        "calibrate/Features without logits",
        lambda e: e.plain.calibrate(Features(torch.randn(50, 24), labels=torch.zeros(50, dtype=torch.long))),
        ValueError,
        "carry no logits",
    ),
    ok("calibrate/a failed calibration keeps the threshold", _failed_calibration_keeps_threshold, lambda r, e: r),
    err("detect/before calibrate", lambda e: e.plain.detect(e.x), NotFittedError, "no threshold yet.*calibrate"),
    err("detect/threshold NaN", lambda e: e.det.detect(e.x, threshold=NAN), ValueError, "threshold is NaN"),
    err("detect/threshold a string", lambda e: e.det.detect(e.x, threshold="0.5"), TypeError, "must be a number"),
    err("detect/threshold True", lambda e: e.det.detect(e.x, threshold=True), TypeError, "must be a number, got bool"),
    ok(
        "detect/explicit threshold -inf flags nothing (documented)",
        lambda e: e.det.detect(e.x, threshold=-INF),
        lambda r, e: not r.any(),
    ),
]


# ---- misuse: wrong order, wrong types -----------------------------------------------------------------------------


def _fit_features_failure_keeps_old(e: SimpleNamespace) -> bool:
    det = e.fresh()
    det.threshold_ = 0.0
    before = det.score(e.x)
    try:
        det.fit_features(Features(with_nan_row(torch.randn(50, 24))), model=e.other_model)
    except ValueError:
        return det.model_ is e.model and det.threshold_ == 0.0 and torch.equal(det.score(e.x), before)
    return False


MISUSE = [
    err("misuse/score before fit", lambda e: FailureDetector().score(e.x), NotFittedError, "not fitted"),
    err(
        "misuse/detect before fit says not fitted",
        lambda e: FailureDetector().detect(e.x),
        NotFittedError,
        "not fitted",
    ),
    err(
        "misuse/score_features before fit",
        lambda e: FailureDetector().score_features(torch.zeros(2, 3)),
        NotFittedError,
        "not fitted",
    ),
    err(
        "misuse/fit_validation before fit",
        lambda e: FailureDetector().fit_validation(e.val),
        NotFittedError,
        "not fitted",
    ),
    err(
        "misuse/save before fit",
        lambda e: FailureDetector().save(e.folder / "u.safetensors"),
        NotFittedError,
        "not fitted",
    ),
    err("misuse/purify before fit", lambda e: FailureDetector().purify(e.x), NotFittedError, "not fitted"),
    err(
        "misuse/as_module before fit",
        lambda e: FailureDetector().as_module(threshold=0.0),
        NotFittedError,
        "not fitted",
    ),
    ok(
        "misuse/hasattr(scorer_) before fit is False",
        lambda e: hasattr(FailureDetector(), "scorer_"),
        lambda r, e: r is False,
    ),
    err(
        "misuse/score inputs without a model",
        lambda e: paper().fit_features(e.det.features(e.x)).score(e.x),
        RuntimeError,
        "no model is attached",
    ),
    ok("misuse/a failed fit_features keeps the old fit", _fit_features_failure_keeps_old, lambda r, e: r),
    ok(
        "misuse/a second fit replaces the first and drops the threshold",
        lambda e: e.fresh().calibrate(e.val, folds=3).fit(e.model, e.train),
        lambda r, e: r.threshold_ is None and r.calibration_ is None and same(r.score(e.x), e.det.score(e.x)),
    ),
    err(
        "misuse/settings beside a scorer instance",
        lambda e: FailureDetector(scorer=e.det.new_scorer(), n_components=4),
        ValueError,
        "beside a scorer instance",
    ),
]


# ---- save/load tampering ------------------------------------------------------------------------------------------


def load(path: Any, **kwargs: Any) -> FailureDetector:
    return FailureDetector.load(path, **kwargs)


def _write(e: SimpleNamespace, name: str, data: bytes) -> Any:
    path = e.folder / name
    path.write_bytes(data)
    return path


def _zheng_hong_file(e: SimpleNamespace, classes: torch.Tensor) -> Any:
    """A saved Zheng-Hong detector (per-class mixtures) whose class labels are replaced by ``classes``."""
    if not hasattr(e, "zheng_hong_file"):
        det = scorer("zheng_hong", n_components=2).fit(e.model, e.train)
        e.zheng_hong_file = e.folder / "zheng_hong.safetensors"
        det.save(e.zheng_hong_file)
    with safe_open(str(e.zheng_hong_file), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    path = e.folder / f"zh{next(e.counter)}.safetensors"
    save_file(tensors | {"scorer.classes": classes}, str(path), metadata=meta)
    return load(path, model=e.model)


def _round_trip(e: SimpleNamespace, det: FailureDetector) -> bool:
    path = e.folder / f"round{next(e.counter)}.safetensors"
    det.save(path)
    back = load(path, model=e.model)
    return torch.equal(back.score(e.x), det.score(e.x)) and back.threshold_ == det.threshold_


DAMAGED = "has damaged detector metadata"
SAVE_LOAD = [
    ok(
        "load/round trip is exact",
        lambda e: load(e.file, model=e.model),
        lambda r, e: torch.equal(r.score(e.x), e.det.score(e.x)) and r.threshold_ == e.det.threshold_,
    ),
    ok(
        "load/round trip of the default detector (one mixture per layer)",
        lambda e: _round_trip(e, e.default),
        lambda r, e: r,
    ),
    ok(
        "load/round trip of max_logit",
        lambda e: _round_trip(e, scorer("max_logit").fit(e.model, e.train)),
        lambda r, e: r,
    ),
    ok(
        "load/round trip of calibrated temperature scaling",
        lambda e: _round_trip(e, scorer("temperature").fit(e.model, e.train).calibrate(e.val, folds=3)),
        lambda r, e: r,
    ),
    ok(
        "load/device='cpu' override",
        lambda e: load(e.file, model=e.model, device="cpu").score(e.x),
        lambda r, e: torch.equal(r, e.det.score(e.x)),
    ),
    err("load/threshold NaN", lambda e: load(e.tamper({"threshold": "NaN"})), ValueError, "threshold must be a finite"),
    err(
        "load/threshold -inf",
        lambda e: load(e.tamper({"threshold": "-Infinity"})),
        ValueError,
        "threshold must be a finite number or null, got -inf",
    ),
    err(
        "load/threshold +inf",
        lambda e: load(e.tamper({"threshold": "Infinity"})),
        ValueError,
        "threshold must be a finite",
    ),
    err(
        "load/threshold a string",
        lambda e: load(e.tamper({"threshold": '"abc"'})),
        ValueError,
        "threshold must be a finite number or null, got 'abc'",
    ),
    err("load/threshold true", lambda e: load(e.tamper({"threshold": True})), ValueError, "got True"),
    err("load/threshold broken JSON", lambda e: load(e.tamper({"threshold": "{"})), ValueError, DAMAGED),
    err(
        "load/calibration key 'evil'",
        lambda e: load(e.tamper({"calibration": e.cal | {"evil": 1}})),
        ValueError,
        r"unknown keys.*'evil'",
    ),
    err("load/calibration a list", lambda e: load(e.tamper({"calibration": [1, 2]})), ValueError, "calibration must"),
    err(
        "load/calibration threshold NaN",
        lambda e: load(e.tamper({"calibration": e.cal | {"threshold": NAN}})),
        ValueError,
        "calibration threshold must be finite",
    ),
    err(
        "load/calibration precision a string",
        lambda e: load(e.tamper({"calibration": e.cal | {"precision": "high"}})),
        ValueError,
        "'precision' must be",
    ),
    err(
        "load/device 'meta' in the file",
        lambda e: load(e.tamper(device="meta")),
        ValueError,
        f"(?s){DAMAGED}.*device 'meta' holds no data",
    ),
    err(
        "load/scorer device 'meta' in the file",
        lambda e: load(e.tamper(**e.scorer_options(device="meta"))),
        ValueError,
        "device 'meta' holds no data",
    ),
    err(
        "load/device 'gpu9' in the file",
        lambda e: load(e.tamper(device="gpu9")),
        ValueError,
        "'gpu9' is not a torch device",
    ),
    err(
        "load/device= argument 'gpu9' is not called damaged metadata",
        lambda e: load(e.file, device="gpu9"),
        ValueError,
        r"^device='gpu9' is not usable: .*not a torch device",
    ),
    err("load/device= argument 'meta'", lambda e: load(e.file, device="meta"), ValueError, r"^device='meta'"),
    err(
        "load/scorer settings that do not fit the scorer",
        lambda e: load(e.tamper(scorer="max_softmax")),
        ValueError,
        "'max_softmax' has no setting 'n_components'",
    ),
    err("load/unknown scorer", lambda e: load(e.tamper(scorer="evil")), ValueError, "unknown scorer 'evil'"),
    err(
        "load/scorer setting 'evil'",
        lambda e: load(e.tamper(**e.scorer_options(evil=1))),
        ValueError,
        "'gmm' has no setting 'evil'",
    ),
    err(
        "load/scorer setting n_components -1",
        lambda e: load(e.tamper(**e.scorer_options(n_components=-1))),
        ValueError,
        "n_components",
    ),
    err("load/config key 'evil'", lambda e: load(e.tamper(evil=1)), ValueError, f"(?s){DAMAGED}.*evil"),
    err("load/config not JSON", lambda e: load(e.tamper({"config": "{"})), ValueError, DAMAGED),
    err("load/config a list", lambda e: load(e.tamper({"config": "[]"})), ValueError, "config is not a JSON object"),
    err(
        "load/n_components 7 over mixtures of 3",
        lambda e: load(e.tamper(**e.scorer_options(n_components=7))),
        ValueError,
        r"damaged 'gmm' scorer state.*n_components=7",
    ),
    err(
        "load/n_components 7 in the state scalars",
        lambda e: load(e.tamper({"scorer_scalars": e.scalars | {"n_components": 7}})),
        ValueError,
        "'n_components' = 7, but the loaded scorer has 3",
    ),
    err(
        "load/scalar 'evil'",
        lambda e: load(e.tamper({"scorer_scalars": e.scalars | {"evil": 1}})),
        ValueError,
        r"entries that the 'gmm' scorer does not have: \['evil'\]",
    ),
    err(
        "load/tensor 'scorer.evil'",
        lambda e: load(e.tamper(tensors={"scorer.evil": torch.zeros(2)})),
        ValueError,
        r"does not have: \['evil'\]",
    ),
    err(
        "load/tensor outside the scorer",
        lambda e: load(e.tamper(tensors={"evil": torch.zeros(2)})),
        ValueError,
        "unexpected tensors",
    ),
    err(
        "load/mixture weights x10",
        lambda e: load(e.tamper(tensors={"scorer.weights": e.tensors["scorer.weights"] * 10})),
        ValueError,
        "weights.*sum to 1",
    ),
    err(
        "load/means NaN",
        lambda e: load(e.tamper(tensors={"scorer.means": e.tensors["scorer.means"] * NAN})),
        ValueError,
        "means.*NaN",
    ),
    err(
        "load/variances negative",
        lambda e: load(e.tamper(tensors={"scorer.covariances": -e.tensors["scorer.covariances"]})),
        ValueError,
        "covariances.*positive",
    ),
    err(
        "load/means of another D",
        lambda e: load(e.tamper(tensors={"scorer.means": e.tensors["scorer.means"][:, :5]})),
        ValueError,
        "damaged 'gmm' scorer state",
    ),
    err(
        "load/per-class labels NaN",
        lambda e: _zheng_hong_file(e, torch.tensor([0.0, NAN, 2.0])),
        ValueError,
        "classes must be integer labels",
    ),
    err(
        "load/per-class labels repeated",
        lambda e: _zheng_hong_file(e, torch.tensor([0, 0, 2])),
        ValueError,
        "distinct labels >= 0 in ascending order",
    ),
    err(
        "load/per-class labels one too many",
        lambda e: _zheng_hong_file(e, torch.tensor([0, 1, 2, 3])),
        ValueError,
        r"n_classes=3 labels, got shape \(4,\)",
    ),
    err(
        "load/head weights NaN",
        lambda e: load(e.tamper(tensors={"head.weight": e.tensors["head.weight"] * NAN})),
        ValueError,
        "damaged classifier head.*NaN",
    ),
    err("load/head bias missing", lambda e: load(e.tamper(drop=("head.bias",))), ValueError, "damaged classifier head"),
    err(
        "load/head of another width",
        lambda e: load(e.tamper(tensors={"head.weight": torch.zeros(3, 30)})),
        ValueError,
        "damaged classifier head",
    ),
    err("load/n_features 'abc'", lambda e: load(e.tamper({"n_features": "abc"})), ValueError, DAMAGED),
    err("load/n_features 0", lambda e: load(e.tamper({"n_features": "0"})), ValueError, "n_features must be positive"),
    err("load/format version 1", lambda e: load(e.tamper({"format_version": "1"})), ValueError, "format version 1"),
    err("load/format version 99", lambda e: load(e.tamper({"format_version": "99"})), ValueError, "version 99"),
    err("load/no format name", lambda e: load(e.tamper(drop=("format",))), ValueError, "not a featurefail detector"),
    err("load/layers a number", lambda e: load(e.tamper({"layers": 5})), ValueError, "layers must be a list"),
    err(
        "load/fingerprint a number",
        lambda e: load(e.tamper({"model_fingerprint": 5})),
        ValueError,
        "model_fingerprint must be a string",
    ),
    err("load/no config", lambda e: load(e.tamper(drop=("config",))), ValueError, f"{DAMAGED}: 'config'"),
    err(
        "load/a different model's weights",
        lambda e: load(e.file, model=e.other_model),
        ValueError,
        "fingerprint mismatch",
    ),
    ok(
        "load/a different model with check_model=False",
        lambda e: load(e.file, model=e.other_model, check_model=False).score(e.x),
        lambda r, e: r.shape == (200,) and bool(torch.isfinite(r).all()),
    ),
    err("load/model not an nn.Module", lambda e: load(e.file, model="resnet18"), TypeError, "torch.nn.Module"),
    err(
        "load/a pickle",
        lambda e: load(_write(e, "p.safetensors", pickle.dumps({"a": 1}))),
        ValueError,
        "not a readable featurefail detector",
    ),
    err(
        "load/truncated file",
        lambda e: load(_write(e, "t.safetensors", e.file.read_bytes()[:200])),
        ValueError,
        "not a readable featurefail detector",
    ),
    err("load/empty file", lambda e: load(_write(e, "e.safetensors", b"")), ValueError, "not a readable"),
    err("load/missing file", lambda e: load(e.folder / "nope.safetensors"), ValueError, "No such file"),
    err(
        "save/into a missing folder",
        lambda e: e.det.save(e.folder / "no" / "d.safetensors"),
        FileNotFoundError,
        "folder .* does not exist",
    ),
    ok(
        "load/without a model scores features, not inputs",
        lambda e: load(e.file).score_features(e.det.features(e.x).feats),
        lambda r, e: torch.equal(r, e.det.score(e.x)),
    ),
]


# ---- GMM degenerate data (public DiagonalGMM API) -----------------------------------------------------------------


def _gmm(k: int = 2, **kw: Any) -> DiagonalGMM:
    return DiagonalGMM(k, random_state=0, **kw)


def _tiny_variance(scale: float, mixed: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g) * scale
    if mixed:
        x[:, :2] = torch.randn(300, 2, generator=g)
    g2 = _gmm().fit(x)
    return g2.score_samples(x[:5])


def _gmm_state_case(change: Callable[[dict], dict]) -> Callable[[SimpleNamespace], Any]:
    def call(e: SimpleNamespace) -> Any:
        state = _gmm().fit(torch.randn(200, 3, generator=torch.Generator().manual_seed(1))).state_dict()
        return _gmm().load_state_dict(change(state))

    return call


GMM = [
    err("gmm/(100, 0) data", lambda e: _gmm().fit(torch.zeros(100, 0)), ValueError, "0 features"),
    err("gmm/(0, 3) data", lambda e: _gmm().fit(torch.zeros(0, 3)), ValueError, "no rows"),
    err("gmm/1-D data", lambda e: _gmm().fit(torch.zeros(10)), ValueError, "must be 2-D"),
    err("gmm/NaN data", lambda e: _gmm().fit(with_nan_row(torch.randn(20, 2))), ValueError, r"1 row\(s\) with NaN"),
    err("gmm/strings", lambda e: _gmm().fit([["a", "b"]]), TypeError, "must hold numbers"),
    err(
        "gmm/more components than rows",
        lambda e: _gmm(20).fit(torch.randn(5, 2)),
        ValueError,
        "n_components=20 is larger than the number of samples",
    ),
    err("gmm/unknown init", lambda e: _gmm(init="magic").fit(torch.randn(20, 2)), ValueError, "init must be one of"),
    err(
        "gmm/weights_init not summing to 1",
        lambda e: _gmm(weights_init=[0.9, 0.9]).fit(torch.randn(20, 2)),
        ValueError,
        "weights_init",
    ),
    err("gmm/score before fit", lambda e: _gmm().score_samples(torch.zeros(2, 2)), NotFittedError, "not fitted"),
    ok(
        "gmm/constant data gives finite scores",
        lambda e: _gmm().fit(torch.ones(50, 3)).score_samples(torch.ones(2, 3)),
        lambda r, e: bool(torch.isfinite(r).all()),
    ),
    ok(
        "gmm/columns of variance ~1e-38 (random-init GoogLeNet)",
        lambda e: _tiny_variance(1e-19, False),
        lambda r, e: bool(torch.isfinite(r).all()),
    ),
    ok(
        "gmm/half the columns of variance ~1e-38",
        lambda e: _tiny_variance(1e-19, True),
        lambda r, e: bool(torch.isfinite(r).all()),
    ),
    ok(
        "gmm/features of scale 1e30",
        lambda e: _tiny_variance(1e30, False),
        lambda r, e: bool(torch.isfinite(r).all()),
    ),
    ok(
        "gmm/3 distinct rows for 5 components",
        lambda e: _gmm(5).fit(torch.randn(3, 2).repeat(40, 1)).score_samples(torch.zeros(1, 2)),
        lambda r, e: bool(torch.isfinite(r).all()),
    ),
    err(
        "gmm/score of another D",
        lambda e: _gmm().fit(torch.randn(30, 3)).score_samples(torch.zeros(2, 5)),
        ValueError,
        "5 features, but this mixture was fitted on 3",
    ),
    ok(
        "gmm/score of a NaN row is -inf",
        lambda e: _gmm().fit(torch.randn(30, 3)).score_samples(torch.tensor([[NAN, 0.0, 0.0], [0.0, 0.0, 0.0]])),
        lambda r, e: r[0] == -INF and bool(torch.isfinite(r[1])),
    ),
    err(
        "gmm/load weights not summing to one",
        _gmm_state_case(lambda s: s | {"weights": s["weights"] * 3}),
        ValueError,
        "sum to 1",
    ),
    err(
        "gmm/load negative variances",
        _gmm_state_case(lambda s: s | {"covariances": -s["covariances"]}),
        ValueError,
        "positive",
    ),
    err("gmm/load NaN means", _gmm_state_case(lambda s: s | {"means": s["means"] * NAN}), ValueError, "NaN"),
    err("gmm/load missing entries", _gmm_state_case(lambda s: {"weights": s["weights"]}), ValueError, "missing"),
    err(
        "gmm/load K=2 state into K=3",
        lambda e: DiagonalGMM(3).load_state_dict(_gmm().fit(torch.randn(40, 3)).state_dict()),
        ValueError,
        "n_components=3",
    ),
]


# ---- statistics ---------------------------------------------------------------------------------------------------

STATISTICS = [
    err("mann_whitney/empty group", lambda e: mann_whitney([], [1.0]), ValueError, "0 correct, 1 wrong"),
    err("mann_whitney/NaN", lambda e: mann_whitney([1.0, NAN], [0.0]), ValueError, "NaN"),
    err("mann_whitney/strings", lambda e: mann_whitney(["a"], [1.0]), TypeError, "correct scores must be numbers"),
    ok(
        "mann_whitney/constant scores: p = 1, AUROC 0.5",
        lambda e: mann_whitney([1.0, 1.0], [1.0, 1.0]),
        lambda r, e: r.pvalue == 1.0 and r.auroc == 0.5,
    ),
    ok(
        "mann_whitney/-inf scores rank lowest",
        lambda e: mann_whitney([0.0, 1.0], [-INF]),
        lambda r, e: r.auroc == 1.0 and math.isfinite(r.pvalue),
    ),
    ok(
        "mann_whitney/column vectors equal 1-D",
        lambda e: mann_whitney([[0.3], [0.9]], [[0.1]]),
        lambda r, e: r == mann_whitney([0.3, 0.9], [0.1]),
    ),
    err("auroc/empty group", lambda e: metrics.auroc([], [1.0]), ValueError, "got 0 and 1"),
    err("auroc/NaN", lambda e: metrics.auroc([1.0, NAN], [0.0]), ValueError, "NaN"),
    ok("auroc/constant scores are 0.5", lambda e: metrics.auroc([2.0, 2.0], [2.0]), lambda r, e: r == 0.5),
    ok("auroc/±inf scores are ranked", lambda e: metrics.auroc([INF, 0.0], [-INF]), lambda r, e: r == 1.0),
    err("aupr_out/NaN", lambda e: metrics.aupr_out([1.0], [NAN]), ValueError, "NaN"),
    err("fpr_at_tpr/tpr 0", lambda e: metrics.fpr_at_tpr([1.0], [0.0], tpr=0), ValueError, r"tpr must be in \(0, 1\]"),
    ok(
        "aurc/constant scores: the failure rate",
        lambda e: metrics.aurc([1.0, 1.0], [1.0]),
        lambda r, e: r == pytest.approx(1 / 3),
    ),
    err("risk_at_coverage/coverage 0", lambda e: metrics.risk_at_coverage([1.0], [0.0], 0), ValueError, "coverage"),
    err("coverage_at_risk/risk 2", lambda e: metrics.coverage_at_risk([1.0], [0.0], 2), ValueError, "risk must be"),
    err("ece/no samples", lambda e: metrics.ece(torch.zeros(0, 3), torch.zeros(0)), ValueError, "at least one sample"),
    err(
        "ece/NaN logits",
        lambda e: metrics.ece(torch.full((2, 3), NAN), torch.zeros(2)),
        ValueError,
        r"NaN or infinite values in 2 row\(s\)",
    ),
    err("ece/1-D logits", lambda e: metrics.ece(torch.zeros(3), torch.zeros(3)), ValueError, r"logits \(N, C\)"),
]


# ---- purification -------------------------------------------------------------------------------------------------


def descends(r: Any) -> bool:
    """Purification never raises the BPD of a finite row, never produces NaN for one (issue 17.8)."""
    f = r.finite
    return (
        bool(torch.isfinite(r.features[f]).all())
        and bool(torch.isfinite(r.logits[f]).all())
        and bool((r.bpd_after[f] <= r.bpd_before[f] + 1e-9).all())
    )


PURIFICATION = [
    ok(
        "purify/default detector descends on every row",
        lambda e: e.default.purify(e.x[:30], steps=10),
        lambda r, e: bool(r.finite.all()) and descends(r),
    ),
    ok(
        "purify/nu=1e4, lr=0.01 stays finite and descends",
        lambda e: e.det.purify(e.x[:30], nu=1e4, lr=0.01, steps=10),
        lambda r, e: descends(r),
    ),
    ok(
        "purify/lr=1e6 stays finite and descends",
        lambda e: e.det.purify(e.x[:30], lr=1e6, steps=10),
        lambda r, e: descends(r),
    ),
    ok(
        "purify/nu=0: BPD never rises step to step",
        lambda e: e.det.purify(e.x[:30], nu=0.0, steps=10, history=True),
        lambda r, e: bool((r.bpd_history.diff(dim=0) <= 1e-9).all()),
    ),
    ok(
        "purify/steps=0 returns the features",
        lambda e: e.det.purify(e.x[:5], steps=0),
        lambda r, e: same(r.features.float(), e.det.features(e.x[:5]).feats),
    ),
    ok(
        "purify/NaN row: not purified, prediction -1, others fine",
        lambda e: e.det.purify(with_nan_row(e.x[:4], row=3), steps=5),
        lambda r, e: (
            r.finite.tolist() == [True, True, True, False]
            and r.predictions[3] == -1
            and bool((r.predictions[:3] >= 0).all())
            and descends(r)
        ),
    ),
    ok(
        "purify/inf row is not purified",
        lambda e: e.det.purify(with_nan_row(e.x[:3], INF, row=0), steps=5),
        lambda r, e: r.finite.tolist() == [False, True, True] and r.predictions[0] == -1,
    ),
    err("purify/lr NaN", lambda e: e.det.purify(e.x[:5], lr=NAN), ValueError, "finite lr > 0"),
    err("purify/lr 0", lambda e: e.det.purify(e.x[:5], lr=0.0), ValueError, "finite lr > 0"),
    err("purify/nu -1", lambda e: e.det.purify(e.x[:5], nu=-1.0), ValueError, "finite nu >= 0"),
    err("purify/nu inf", lambda e: e.det.purify(e.x[:5], nu=INF), ValueError, "finite nu >= 0"),
    err("purify/steps -1", lambda e: e.det.purify(e.x[:5], steps=-1), ValueError, "steps must be an integer >= 0"),
    err("purify/batch_size 0", lambda e: e.det.purify(e.x[:5], batch_size=0), ValueError, "batch_size must be"),
    err("purify/max_halvings -1", lambda e: e.det.purify(e.x[:5], max_halvings=-1), ValueError, "max_halvings"),
    err("purify/steps 2.5", lambda e: e.det.purify(e.x[:5], steps=2.5), ValueError, "steps must be an integer"),
    err(
        "purify/a head returning 1-D logits",
        lambda e: e.det.purify(e.x[:5], head=lambda f: f[:, 0]),
        ValueError,
        r"head must map features \(5, D\) to logits \(5, C\); got \(5,\)",
    ),
    ok(
        "purify/no inputs: an empty result",
        lambda e: e.det.purify(e.x[:0]),
        lambda r, e: r.features.shape == (0, 24) and r.logits.shape == (0, 3) and r.predictions.shape == (0,),
    ),
    ok(
        "purify/no features, with history",
        lambda e: e.det.purify(Features(torch.zeros(0, 24)), steps=3, history=True),
        lambda r, e: r.bpd_history.shape == (4, 0) and r.finite.shape == (0,),
    ),
    err(
        "purify/features of the wrong width",
        lambda e: e.det.purify(torch.randn(5, 7), as_features=True),
        ValueError,
        r"features must be \(N, 24\), got \(5, 7\)",
    ),
    err(
        "purify/a scorer without a density",
        lambda e: FailureDetector(scorer="mahalanobis", progress=False).fit(e.model, e.train).purify(e.x[:5]),
        ValueError,
        "needs a density of the features",
    ),
    err(
        "purify/a layer that is not the head's input",
        lambda e: paper(layer="0").fit(e.model, e.train).purify(e.x[:5]),
        ValueError,
        "no head to re-classify with; pass head=",
    ),
]


# ---- concurrency --------------------------------------------------------------------------------------------------


def _shared_model_stress(e: SimpleNamespace) -> int:
    """Issue 17.3: several detectors on one model (different layers/scorers), scored from 8 threads: the number of
    results that differ from the serial ones (must be 0)."""
    detectors = [
        e.fresh(),
        e.default,
        paper(layer="2").fit(e.model, e.train),
        FailureDetector(scorer="max_softmax", progress=False).fit(e.model, e.train),
    ]
    chunks = [e.x[i : i + 20] for i in range(0, 200, 20)]
    jobs = [(d, c) for d in range(len(detectors)) for c in range(len(chunks))] * 6
    serial = {(d, c): detectors[d].score(chunks[c]) for d, c in set(jobs)}

    def run(job: tuple[int, int]) -> bool:
        d, c = job
        return torch.equal(detectors[d].score(chunks[c]), serial[job])

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, jobs))
    return results.count(False)


def _score_during_refit(e: SimpleNamespace) -> bool:
    """While one thread re-fits a detector (on a model with other weights), every score another thread gets is
    wholly the old fit's or wholly the new one's."""
    det = e.fresh()
    x = e.x[:50]
    old = det.score(x)
    new = paper().fit(e.other_model, e.train).score(x)
    seen: list[torch.Tensor] = []
    done = threading.Event()

    def scorer() -> None:
        while not done.is_set():
            seen.append(det.score(x))

    worker = threading.Thread(target=scorer)
    worker.start()
    try:
        det.fit(e.other_model, e.train)
    finally:
        done.set()
        worker.join()
    return bool(seen) and all(torch.equal(s, old) or torch.equal(s, new) for s in seen)


def _module_threads(e: SimpleNamespace) -> bool:
    module = e.det.as_module()
    chunks = [e.x[i : i + 20] for i in range(0, 200, 20)] * 3
    serial = [module(c)[1] for c in chunks]
    with ThreadPoolExecutor(max_workers=6) as pool:
        threaded = list(pool.map(lambda c: module(c)[1], chunks))
    return all(torch.equal(a, b) for a, b in zip(serial, threaded, strict=True))


CONCURRENCY = [
    ok("threads/4 detectors sharing one model, 8 threads (17.3)", _shared_model_stress, lambda r, e: r == 0),
    ok("threads/scores during a re-fit are the old or the new", _score_during_refit, lambda r, e: r),
    ok("threads/as_module called from 6 threads equals serial", _module_threads, lambda r, e: r),
]


# ---- deployment ---------------------------------------------------------------------------------------------------


def _as_module_keeps_modes(e: SimpleNamespace) -> bool:
    """Issue 17.2: as_module on a model in train mode (one BatchNorm frozen in eval) changes no submodule's mode."""
    model = TinyResNet().train()
    model.layer1[0].bn.eval()
    modes = [m.training for m in model.modules()]
    x = torch.rand(40, 1, 8, 8)
    det = paper(k=2).fit(model, [(x,)])
    module = det.as_module(threshold=0.0)
    module(x)
    return [m.training for m in model.modules()] == modes and not any(m.training for m in module.modules())


def _as_module_equals_detector(e: SimpleNamespace) -> bool:
    logits, score, flag = e.det.as_module()(e.x)
    return same(logits, e.model(e.x)) and same(score, e.det.score(e.x)) and torch.equal(flag, score < e.det.threshold_)


DEPLOYMENT = [
    ok("as_module/train-mode model keeps every submodule's mode (17.2)", _as_module_keeps_modes, lambda r, e: r),
    err("as_module/before calibrate", lambda e: e.plain.as_module(), NotFittedError, "no threshold yet.*calibrate"),
    err("as_module/threshold NaN", lambda e: e.det.as_module(threshold=NAN), ValueError, "threshold is NaN"),
    err("as_module/threshold a string", lambda e: e.det.as_module(threshold="0"), TypeError, "must be a number"),
    err(
        "as_module/a scorer with no module form",
        lambda e: FailureDetector(scorer="mahalanobis", progress=False).fit(e.model, e.train).as_module(threshold=0.0),
        TypeError,
        "no module form",
    ),
    ok("as_module/equals score and detect", _as_module_equals_detector, lambda r, e: r),
    ok(
        "as_module/NaN input rows are flagged",
        lambda e: e.det.as_module()(with_nan_row(e.x[:4])),
        lambda r, e: r[1][1] == -INF and bool(r[2][1]),
    ),
    ok(
        "as_module/leaves no hook on the user's model",
        lambda e: e.det.as_module() and e.model,
        lambda r, e: not any(m._forward_hooks or m._forward_pre_hooks for m in r.modules()),
    ),
    ok(
        "as_module/threshold= does not change threshold_",
        lambda e: (e.det.as_module(threshold=0.0), e.det.threshold_),
        lambda r, e: r[1] == e.det.calibration_.threshold,
    ),
]


CASES = (
    LOADERS
    + FILES
    + DATA
    + MODELS
    + SETTINGS
    + SCORERS
    + CALIBRATION
    + MISUSE
    + SAVE_LOAD
    + GMM
    + STATISTICS
    + PURIFICATION
)
CASES += CONCURRENCY + DEPLOYMENT


class _NotTheGMM(Scorer):
    def fit(self, features: Features, **context: Any) -> _NotTheGMM:
        return self

    def score(self, features: Features) -> torch.Tensor:
        return torch.zeros(len(features))


def _register_as_gmm(e: SimpleNamespace) -> Any:
    from featurefail.scorers import base, register_scorer

    registry = dict(base._REGISTRY)
    try:
        return register_scorer("gmm")(_NotTheGMM)
    finally:  # a regression must not leave the built-in replaced for the rest of the session
        base._REGISTRY.clear()
        base._REGISTRY.update(registry)


def _register_twice(e: SimpleNamespace) -> Any:
    """The same class defined again (a reloaded module, a rerun test) replaces its earlier definition."""
    from featurefail.scorers import available_scorers, base, register_scorer

    registry = dict(base._REGISTRY)
    try:
        first = register_scorer("sweep_twice")(type("Twice", (_NotTheGMM,), {"__qualname__": "Twice"}))
        second = register_scorer("sweep_twice")(type("Twice", (_NotTheGMM,), {"__qualname__": "Twice"}))
        return first is not second and base._REGISTRY["sweep_twice"] is second and "sweep_twice" in available_scorers()
    finally:
        base._REGISTRY.clear()
        base._REGISTRY.update(registry)


def _ids_model_two_batches(e: SimpleNamespace) -> Any:
    """A model on integer IDs (N,): a list of two 1-D integer batches is two batches, not one (x, y) batch."""
    model = nn.Sequential(nn.Embedding(50, 8), nn.ReLU(), nn.Linear(8, 3))
    ids = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0))
    det = paper(k=2).fit(model, [ids[:150], ids[150:]])
    a, b = ids[:16], ids[16:32]
    return det.score([a, b]).shape, det.score(torch.cat([a, b])).shape


def _multi_block_round_trip(e: SimpleNamespace) -> Any:
    """fit_features on two blocks with a head of the first block's width saves and loads back."""
    g = torch.Generator().manual_seed(0)
    features = Features(torch.randn(200, 6, generator=g), blocks=(4, 2))
    det = FailureDetector(n_components=1, progress=False).fit_features(
        features, head=(torch.randn(3, 4, generator=g), torch.zeros(3))
    )
    path = e.folder / f"multi{next(e.counter)}.safetensors"
    det.save(path)
    return FailureDetector.load(path).score_features(features), det.score_features(features)


def _evaluate(e: SimpleNamespace, **kwargs: Any) -> Any:
    from featurefail.evaluate import evaluate

    return evaluate(e.model, (e.x, e.y), (e.x_val, e.y_val), (e.x, e.y), **kwargs)


def _grid(e: SimpleNamespace, **kwargs: Any) -> Any:
    from featurefail.purify import purification_grid

    val = e.det.features(e.val)
    return purification_grid(e.det, val, val, steps=1, **kwargs)


def _fgsm(e: SimpleNamespace, eps: float) -> Any:
    from featurefail.attacks import fgsm

    return fgsm(e.model, e.x[:4].clamp(0, 1), e.y[:4], eps)


def _refitted_k(e: SimpleNamespace) -> Any:
    gmm = DiagonalGMM(2, random_state=0).fit(torch.randn(100, 3, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(5, 3)
    before = gmm.score_samples(x)
    gmm.set_params(n_components=5)  # applies to the next fit only, as in scikit-learn
    return before, gmm.score_samples(x), gmm.state_dict()["n_components"]


# found by a sweep of ~560 bad inputs on 2026-12-05 (each failed before its fix)
SWEEP = [
    err("attacks/fgsm eps NaN", lambda e: _fgsm(e, float("nan")), ValueError, "eps must be a finite number"),
    err(
        "evaluate/attack spec with eps NaN",
        lambda e: _evaluate(e, attacks=("fgsm:nan",)),
        ValueError,
        "a finite eps > 0",
    ),
    err("evaluate/no seeds", lambda e: _evaluate(e, seeds=()), ValueError, "seeds is empty"),
    err(
        "evaluate/options for a row not run (typo)",
        lambda e: _evaluate(e, scorers=("default",), scorer_options={"defualt": {"layer": None}}),
        ValueError,
        "'defualt', which is not one of the rows",
    ),
    err("scorers/register a name taken by a built-in", _register_as_gmm, ValueError, "'gmm' is taken by"),
    err(
        "metrics/ece label outside the classes",
        lambda e: metrics.ece(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([-1])),
        ValueError,
        r"labels must lie in \[0, 3\)",
    ),
    err("npz/negative limit", lambda e: NpzImages(npz(e, x=IMAGES), limit=-1), ValueError, "limit must be"),
    err(
        "npz/float images in 0-255",
        lambda e: NpzImages(npz(e, x=np.full((3, 4, 4, 3), 200.0, np.float32))),
        ValueError,
        r"must lie in \[0, 1\]",
    ),
    err(
        "npz/channels first",
        lambda e: NpzImages(npz(e, x=np.zeros((3, 3, 8, 8), np.uint8))),
        ValueError,
        "channels first",
    ),
    err(
        "npz/int64 images",
        lambda e: NpzImages(npz(e, x=np.zeros((3, 4, 4, 3), np.int64))),
        ValueError,
        "must be uint8",
    ),
    err("purify/grid of no learning rate", lambda e: _grid(e, lrs=()), ValueError, "at least one value"),
    err(
        "dataset images/float pixels in 0-255",
        lambda e: DatasetImages([torch.full((3, 4, 4), 200.0)]),
        ValueError,
        r"must lie in \[0, 1\]",
    ),
    err(
        "dataset images/int64 pixels",
        lambda e: DatasetImages([np.zeros((4, 4, 3), np.int64)]),
        ValueError,
        "must be uint8",
    ),
    ok(
        "dataset images/uint8, float in [0, 1] and 1-bit images read alike",
        lambda e: (
            DatasetImages([np.full((4, 4, 1), 255, np.uint8), torch.ones(1, 4, 4), np.ones((4, 4, 1), bool)]).images
        ),
        lambda r, e: r.shape == (3, 1, 4, 4) and bool((r == 1).all()),
    ),
    ok(
        "gmm/set_params after fit: scoring keeps the fitted K",
        _refitted_k,
        lambda r, e: same(r[0], r[1]) and r[2] == 2,
    ),
    ok(
        "score/one (x, y) batch is that batch, not two batches",
        lambda e: (e.det.score((e.x[:20], e.y[:20])), e.det.score(e.x[:20])),
        lambda r, e: same(r[0], r[1]),
    ),
    ok(
        "score/one [x, y] batch (a DataLoader's default collate) is that batch too",
        lambda e: (e.det.score([e.x[:20], e.y[:20]]), e.det.score(e.x[:20]), e.det.score([e.x[:0], e.y[:0]])),
        lambda r, e: same(r[0], r[1]) and r[2].shape == (0,),
    ),
    ok(
        "score/two 1-D integer batches of a model on IDs stay two batches",
        _ids_model_two_batches,
        lambda r, e: r[0] == r[1] == (32,),
    ),
    ok(
        "fit/one (x, y) batch is that batch",
        lambda e: (paper().fit(e.model, (e.x, e.y)).score(e.x[:10]), paper().fit(e.model, [e.x]).score(e.x[:10])),
        lambda r, e: same(r[0], r[1]),
    ),
    ok("scorers/the same class registered again replaces itself", _register_twice, lambda r, e: r is True),
    ok(
        "save/fit_features on two blocks with the first block's head loads back",
        _multi_block_round_trip,
        lambda r, e: same(r[0], r[1]),
    ),
    ok(
        "as_module/an empty batch gives empty outputs",
        lambda e: e.det.as_module(threshold=0.0)(e.x[:0]),
        lambda r, e: r[1].shape == (0,) and r[2].shape == (0,),
    ),
    err("save/to a folder", lambda e: e.det.save(e.folder), IsADirectoryError, "it is a folder"),
    ok(
        "purify/head as (weight, bias), as fit_features takes it",
        lambda e: (
            e.det.purify(e.x[:5], steps=2, head=(e.det.head_weight_, e.det.head_bias_)).logits,
            e.det.purify(e.x[:5], steps=2).logits,
        ),
        lambda r, e: same(r[0], r[1]),
    ),
    err("purify/head of another type", lambda e: e.det.purify(e.x[:5], steps=2, head=3), TypeError, "head must be"),
]
CASES += SWEEP


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, env: SimpleNamespace) -> None:
    if case.raises is not None:
        with pytest.raises(case.raises, match=case.match):
            case.call(env)
    else:
        result = case.call(env)
        assert case.check(result, env), f"{case.name}: unexpected result {result!r}"[:2000]


def test_the_suite_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 100
    assert len({c.name for c in CASES}) == len(CASES)
