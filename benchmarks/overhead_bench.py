"""What the detector adds to inference: plain forward vs ``as_module()`` forward vs ``detector.score``.

A CIFAR-style ResNet-20 (3 stages × 3 basic blocks, widths 16/32/64, 64-d penultimate features, 32×32×3
inputs) with a GMM of K = 100 and K = 1000 components, at batch sizes 1, 64 and 256. Each figure is the median
of repeated timed calls after warm-up, all in one run, so the ratios compare like with like.

Usage::

    python benchmarks/overhead_bench.py --device cpu [--detector paper|default]
    python benchmarks/overhead_bench.py --device cuda

``--detector paper`` (default) times the paper's single-layer GMM; ``--detector default`` the
``FailureDetector()`` defaults (``layer="auto"``: three layers, one L2-normalised mixture each);
``--detector conformal_fusion`` the conformal fusion on the same three layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from featurefail import FailureDetector

sys.path.insert(0, str(Path(__file__).resolve().parent / "cifar10"))
from models import ResNet20


def median_time(fn, device: str, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--detector", choices=["paper", "default", "conformal_fusion"], default="paper")
    parser.add_argument("--cuda-graphs", action="store_true", help="also time both forwards captured in CUDA graphs")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    model = ResNet20().to(device).eval()
    fit_x = torch.rand(4096, 3, 32, 32, device=device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {device} ({name}); ResNet-20 on 32×32×3, median of {args.repeats}; "
        f"{args.detector} detector"
    )
    graphs = args.cuda_graphs and device.startswith("cuda")
    head = "| K | batch | plain forward | as_module() | extra | detector.score() | extra |"
    rule = "|---|---|---|---|---|---|---|"
    if graphs:
        head += " plain, CUDA graph | as_module(), CUDA graph | extra |"
        rule += "---|---|---|"
    print("\n" + head)
    print(rule)
    for k in (100, 1000):
        settings = dict(n_components=k, max_iter=5, device=device, progress=False, batch_size=256)
        if args.detector == "conformal_fusion":
            det = FailureDetector(scorer="conformal_fusion", layer="auto", **settings)
        else:
            det = FailureDetector.paper(**settings) if args.detector == "paper" else FailureDetector(**settings)
        det.fit(model, [(fit_x[i : i + 512],) for i in range(0, len(fit_x), 512)])
        det.threshold_ = 0.0
        module = det.as_module().to(device)
        for batch in (1, 64, 256):
            x = torch.rand(batch, 3, 32, 32, device=device)
            with torch.inference_mode():
                plain = median_time(lambda x=x: model(x), device, args.repeats)
                fused = median_time(lambda x=x, m=module: m(x), device, args.repeats)
            scored = median_time(lambda x=x, d=det: d.score(x), device, args.repeats)
            line = (
                f"| {k} | {batch} | {plain * 1e3:.2f} ms | {fused * 1e3:.2f} ms | {100 * (fused / plain - 1):+.1f}% "
                f"| {scored * 1e3:.2f} ms | {100 * (scored / plain - 1):+.1f}% |"
            )
            if graphs:
                with torch.inference_mode():
                    g_plain = median_time(cuda_graphed(model, x), device, args.repeats)
                    g_fused = median_time(cuda_graphed(module, x), device, args.repeats)
                line += f" {g_plain * 1e3:.3f} ms | {g_fused * 1e3:.3f} ms | {100 * (g_fused / g_plain - 1):+.1f}% |"
            print(line)


if __name__ == "__main__":
    main()
