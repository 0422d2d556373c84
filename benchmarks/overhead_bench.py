"""What the detector adds to inference: plain forward vs ``as_module()`` forward vs ``detector.score``.

A CIFAR-style ResNet-20 (3 stages × 3 basic blocks, widths 16/32/64, 64-d penultimate features, 32×32×3
inputs; or ``--model wrn``) with a GMM of K = 100 and K = 1000 components, at batch sizes 1, 64 and 256. Each
figure is the median of repeated timed calls after warm-up, all in one run. The plain forward and the
``as_module()`` forward are timed **interleaved** (plain, module, plain, module, ...), and the overhead is the
median of the per-pair ratios with its interquartile range: a slow spell of a shared machine then hits both
sides alike instead of whichever was being timed. The load average before and after is printed.

Usage::

    python benchmarks/overhead_bench.py --device cpu [--detector paper|default]
    python benchmarks/overhead_bench.py --device cuda [--cuda-graphs] [--model wrn]
    python benchmarks/overhead_bench.py --device cpu --model wrn --quick   # a smoke run: K=10, batches 1 and 4

``--model wrn`` times a WideResNet-28-10 (36.5M parameters, 640-d penultimate features) instead: a forward
that takes several milliseconds at batch 256 on a GPU, where the detector's fixed cost should vanish. The
models are built with random weights (nothing is downloaded); the detector is fitted on uniform noise images,
which is enough to time it. The last table gives the ratios ``as_module()/plain`` (eager and, with
``--cuda-graphs``, both captured in CUDA graphs).

``--detector paper`` (default) times the paper's single-layer GMM; ``--detector default`` the
``FailureDetector()`` defaults (``layer="auto"``: three layers, one L2-normalised mixture each);
``--detector conformal_fusion`` the conformal fusion on the same three layers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from sklearn.exceptions import ConvergenceWarning

from featurefail import FailureDetector

sys.path.insert(0, str(Path(__file__).resolve().parent / "cifar10"))
from models import ResNet20, WideResNet


def timed(fn, device: str) -> float:
    """Seconds of one call of ``fn`` (synchronised on CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_time(fn, device: str, repeats: int) -> float:
    for _ in range(3):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def interleaved_times(fn_a, fn_b, device: str, repeats: int) -> tuple[float, float, list[float]]:
    """Median seconds of ``fn_a`` and ``fn_b`` timed alternately, and the quartiles of the per-pair ratio b/a."""
    for _ in range(3):
        fn_a()
        fn_b()
    pairs = [(timed(fn_a, device), timed(fn_b, device)) for _ in range(repeats)]
    times_a, times_b = zip(*pairs, strict=True)
    ratios = [b / a for a, b in pairs]
    return statistics.median(times_a), statistics.median(times_b), statistics.quantiles(ratios, n=4)


def cuda_graphed(fn, x: torch.Tensor):
    """Capture ``fn(static_x)`` in a CUDA graph; the returned callable replays it (same shapes every call)."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static_x)

    def replay():
        graph.replay()
        return out

    return replay


MODELS = {"resnet20": ("ResNet-20", ResNet20), "wrn": ("WideResNet-28-10", lambda: WideResNet(depth=28, k=10))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--detector", choices=["paper", "default", "conformal_fusion"], default="paper")
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time both forwards captured in CUDA graphs")
    parser.add_argument("--components", type=int, nargs="+", default=[100, 1000], help="K values")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256], help="batch sizes")
    parser.add_argument("--fit-images", type=int, default=4096, help="noise images the detector is fitted on")
    parser.add_argument("--quick", action="store_true", help="smoke run: K=10, batches 1 and 4, 64 images, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.components, args.batches, args.fit_images, args.repeats = [10], [1, 4], 64, 3
    device = args.device
    torch.manual_seed(0)
    model_name, build = MODELS[args.model]
    model = build().to(device).eval()
    fit_x = torch.rand(args.fit_images, 3, 32, 32, device=device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {device} ({name}); {model_name} on 32×32×3, median of {args.repeats}; "
        f"{args.detector} detector; load average {os.getloadavg()[0]:.2f} at the start"
    )
    graphs = args.cuda_graphs and device.startswith("cuda")
    head = "| K | batch | plain forward | as_module() | extra (IQR of paired ratios) | detector.score() | extra |"
    rule = "|---|---|---|---|---|---|---|"
    if graphs:
        head += " plain, CUDA graph | as_module(), CUDA graph | extra |"
        rule += "---|---|---|"
    print("\n" + head)
    print(rule)
    ratios = []
    for k in args.components:
        settings = dict(n_components=k, max_iter=5, device=device, progress=False, batch_size=256)
        if args.detector == "conformal_fusion":
            det = FailureDetector(scorer="conformal_fusion", layer="auto", **settings)
        else:
            det = FailureDetector.paper(**settings) if args.detector == "paper" else FailureDetector(**settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # 5 EM iterations on noise: timing only
            det.fit(model, [(fit_x[i : i + 256],) for i in range(0, len(fit_x), 256)])
        det.threshold_ = 0.0
        module = det.as_module().to(device)
        for batch in args.batches:
            x = torch.rand(batch, 3, 32, 32, device=device)
            with torch.inference_mode():
                plain, fused, (q1, ratio, q3) = interleaved_times(
                    lambda x=x: model(x), lambda x=x, m=module: m(x), device, args.repeats
                )
            scored = median_time(lambda x=x, d=det: d.score(x), device, args.repeats)
            line = (
                f"| {k} | {batch} | {plain * 1e3:.2f} ms | {fused * 1e3:.2f} ms | {100 * (ratio - 1):+.1f}% "
                f"({100 * (q1 - 1):+.1f} to {100 * (q3 - 1):+.1f}) "
                f"| {scored * 1e3:.2f} ms | {100 * (scored / plain - 1):+.1f}% |"
            )
            g_ratio = None
            if graphs:
                with torch.inference_mode():
                    g_plain, g_fused, (_, g_ratio, _) = interleaved_times(
                        cuda_graphed(model, x), cuda_graphed(module, x), device, args.repeats
                    )
                line += f" {g_plain * 1e3:.3f} ms | {g_fused * 1e3:.3f} ms | {100 * (g_ratio - 1):+.1f}% |"
            print(line, flush=True)
            ratios.append((k, batch, plain, ratio, g_ratio))
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    print(f"\nRatios as_module()/plain forward (median of paired calls), {model_name}, {args.detector}, {device}:\n")
    print("| model | detector | K | batch | plain forward | eager ratio | CUDA-graph ratio |")
    print("|---|---|---|---|---|---|---|")
    for k, batch, plain, ratio, g_ratio in ratios:
        graph = f"{g_ratio:.3f}" if g_ratio is not None else "–"
        print(f"| {args.model} | {args.detector} | {k} | {batch} | {plain * 1e3:.2f} ms | {ratio:.3f} | {graph} |")


if __name__ == "__main__":
    main()
