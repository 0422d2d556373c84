"""Thresholds with guarantees and the drift monitor on real data (MNIST in-distribution, Fashion-MNIST as shift).

A small CNN is trained on 54,000 MNIST training images; the detector is fitted on the same images; 6,000 held-out
training images are the validation (calibration) set and the 10,000 MNIST test images play production traffic.
The script prints the numbers of the README's "In production" section:

    nice -n 10 python benchmarks/production_guarantees.py --data /work/shared/data --out /tmp/production.json

1. the F1 (cross-validated), conformal false-alarm (alpha) and selective-risk thresholds, their stated guarantees and
   what they do on the test set;
2. the same guarantees checked over 500 random calibration/test re-splits of the pooled validation + test scores;
3. the drift monitor on an MNIST stream that switches to Fashion-MNIST.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featurefail import FailureDetector, metrics
from featurefail.evaluate import holdout_split
from featurefail.monitor import DriftMonitor
from featurefail.ood import NpzImages
from featurefail.threshold import calibrate_threshold

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def batches(x: torch.Tensor, y: torch.Tensor | None = None, size: int = 512) -> list:
    return [(x[i : i + size], y[i : i + size]) if y is not None else x[i : i + size] for i in range(0, len(x), size)]


def train(images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
    import sys

    sys.path.insert(0, str(EXAMPLES))
    from mnist_model import make_model

    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    for i in range(0, len(order), 128):
        idx = order[i : i + 128]
        opt.zero_grad()
        F.cross_entropy(model(images[idx]), labels[idx]).backward()
        opt.step()
    return model.eval()


def summary(name: str, result, scores: np.ndarray, wrong: np.ndarray) -> dict:
    flagged = scores < result.threshold
    accepted = ~flagged
    row = {
        "strategy": name,
        "threshold": result.threshold,
        "guarantee": result.guarantee,
        "validation_coverage": result.coverage,
        "test_flag_rate": float(flagged.mean()),
        "test_coverage": float(accepted.mean()),
        "test_selective_risk": float(wrong[accepted].mean()) if accepted.any() else float("nan"),
        "test_mistakes_caught": f"{int((flagged & wrong).sum())} of {int(wrong.sum())}",
    }
    print(
        f"{name:28s} T={result.threshold:10.3f}  flag rate {row['test_flag_rate']:.4f}  "
        f"risk among accepted {row['test_selective_risk']:.4f}  caught {row['test_mistakes_caught']}"
    )
    if result.guarantee:
        print(f"{'':28s} {result.guarantee}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", required=True, help="folder with mnist_train.npz, mnist_test.npz and fashion_mnist_test.npz"
    )
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = Path(args.data)
    t0 = time.perf_counter()
    mnist = NpzImages(str(data / "mnist_train.npz"))
    train_idx, val_idx = holdout_split(len(mnist.labels), 0.1, seed=args.seed)
    x_train, y_train = mnist.images[train_idx], mnist.labels[train_idx]
    x_val, y_val = mnist.images[val_idx], mnist.labels[val_idx]
    test = NpzImages(str(data / "mnist_test.npz"))
    fashion = NpzImages(str(data / "fashion_mnist_test.npz"))
    model = train(x_train, y_train, args.seed)
    detector = FailureDetector(progress=False).fit(model, batches(x_train, y_train))
    print(f"trained and fitted in {time.perf_counter() - t0:.0f} s ({detector!r})")

    with torch.no_grad():
        wrong_val = (model(x_val).argmax(1) != y_val).numpy()
        wrong_test = (model(test.images).argmax(1) != test.labels).numpy()
    s_val = detector.score(x_val).numpy().astype(np.float64)
    s_test = detector.score(test.images).numpy().astype(np.float64)
    s_ood = detector.score(fashion.images).numpy().astype(np.float64)
    print(
        f"validation n={len(s_val)} (error {wrong_val.mean():.4f}), test n={len(s_test)} "
        f"(error {wrong_test.mean():.4f}), Fashion-MNIST n={len(s_ood)}"
    )

    alpha, delta, target = 0.05, 0.05, 0.005
    results = {
        "f1 (5-fold CV)": calibrate_threshold(s_val, wrong_val, "f1", seed=args.seed),
        f"fpr alpha={alpha} (marginal)": calibrate_threshold(s_val, None, "fpr", alpha=alpha),
        f"fpr alpha={alpha} delta={delta}": calibrate_threshold(s_val, None, "fpr", alpha=alpha, delta=delta),
        f"risk {target} delta={delta}": calibrate_threshold(s_val, wrong_val, "risk", target_risk=target, delta=delta),
    }
    rows = [summary(name, r, s_test, wrong_test) for name, r in results.items()]
    for row, name in zip(rows, results, strict=True):
        row["fashion_flag_rate"] = float((s_ood < results[name].threshold).mean())
        print(f"{name:28s} flags {row['fashion_flag_rate']:.4f} of Fashion-MNIST")

    # 2. re-splits of the pooled in-distribution scores: the guarantees over calibration draws
    pooled_s, pooled_w = np.r_[s_val, s_test], np.r_[wrong_val, wrong_test]
    rng = np.random.default_rng(args.seed)
    n_cal = len(s_val)
    marginal, pac, risk, risk_cov = [], [], [], []
    for _ in range(args.splits):
        perm = rng.permutation(len(pooled_s))
        cal, held = perm[:n_cal], perm[n_cal:]
        t = calibrate_threshold(pooled_s[cal], None, "fpr", alpha=alpha).threshold
        marginal.append((pooled_s[held] < t).mean())
        t = calibrate_threshold(pooled_s[cal], None, "fpr", alpha=alpha, delta=delta).threshold
        pac.append((pooled_s[held] < t).mean())
        r = calibrate_threshold(pooled_s[cal], pooled_w[cal], "risk", target_risk=target, delta=delta)
        accepted = pooled_s[held] >= r.threshold
        risk.append(pooled_w[held][accepted].mean())
        risk_cov.append(accepted.mean())
    noise = 2 * np.sqrt(alpha * (1 - alpha) / (len(pooled_s) - n_cal))  # two standard errors of a held-out rate
    resplits = {
        "splits": args.splits,
        "pac_fraction_above_alpha_plus_2se": float(np.mean(np.array(pac) > alpha + noise)),
        "oracle_coverage_at_target_risk": metrics.coverage_at_risk(pooled_s[~pooled_w], pooled_s[pooled_w], target),
        "marginal_mean_flag_rate": float(np.mean(marginal)),
        "pac_fraction_above_alpha": float(np.mean(np.array(pac) > alpha)),
        "pac_mean_flag_rate": float(np.mean(pac)),
        "risk_fraction_above_target": float(np.mean(np.array(risk) > target)),
        "risk_mean_selective_risk": float(np.mean(risk)),
        "risk_mean_coverage": float(np.mean(risk_cov)),
    }
    print(f"{args.splits} re-splits (calibration {n_cal}, test {len(pooled_s) - n_cal}): {resplits}")

    # 3. the drift monitor: 5,000 MNIST test inputs, then Fashion-MNIST, batches of 100
    chosen = results[f"fpr alpha={alpha} (marginal)"]
    monitor = DriftMonitor.from_calibration(chosen, window=1000, false_alarm=0.01)
    stream = np.r_[s_test[:5000], s_ood[:5000]]
    first_alarm = None
    for i in range(0, len(stream), 100):
        status = monitor.update(scores=stream[i : i + 100])
        if status.alarm and first_alarm is None:
            first_alarm = (i + 100, status)
    seen, status = first_alarm if first_alarm else (None, monitor.status)
    drift = {
        "window": monitor.window,
        "critical_count": monitor.critical_count_,
        "false_alarm_per_window": monitor.false_alarm_,
        "first_alarm_after_inputs": seen,
        "first_alarm_window_flagged": status.window_flagged,
        "first_alarm_window_seen": status.window_seen,
        "alarms_in_mnist_part": sum(w < 5 for w in monitor.status.alarmed_windows),
        "alarms_total": monitor.status.n_alarms,
    }
    print(f"monitor: {monitor!r}; {drift}")
    if args.out:
        out = {
            "n_validation": len(s_val),
            "validation_error": float(wrong_val.mean()),
            "test_error": float(wrong_test.mean()),
            "thresholds": rows,
            "resplits": resplits,
            "monitor": drift,
        }
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
