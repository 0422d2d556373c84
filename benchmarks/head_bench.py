"""The GMM scoring head alone: unfused (one ``GMMScoreModule`` per layer, summed) vs ``StackedGMMScoreModule``.

Fits ``PerLayer(GMMScorer(preprocess="l2"))`` (the default detector's head) on random features of a
ResNet-20's three hooked layers (widths 16, 32, 64), or with ``--widths 64 --preprocess none`` the paper's
head, and times both modules on the same batch: eager and, on CUDA, captured in a CUDA graph. Median of repeated calls.

    python benchmarks/head_bench.py --device cuda [--widths 64 --preprocess none]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from featurefail.features import Features
from featurefail.scorers import GMMScorer, PerLayer
from featurefail.scorers.modules import BlockSumScoreModule, GMMScoreModule, TransformedScoreModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead_bench import cuda_graphed, median_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--components", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--preprocess", choices=["l2", "none"], default="l2")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device, widths = args.device, tuple(args.widths)
    torch.manual_seed(0)
    train = torch.relu(torch.randn(4096, sum(widths)))
    x = torch.relu(torch.randn(args.batch, sum(widths))).to(device)
    graphs = device.startswith("cuda")
    print(
        f"torch {torch.__version__}, {device}; blocks {widths}, preprocess {args.preprocess}, "
        f"batch {args.batch}, median of {args.repeats}"
    )
    graph_head = " unfused, CUDA graph | stacked, CUDA graph | speed-up |"
    print("\n| K | unfused | stacked | speed-up |" + graph_head * graphs)
    print("|---|---|---|---|" + "---|---|---|" * graphs)
    for k in args.components:
        scorer = PerLayer(GMMScorer(n_components=k, preprocess=args.preprocess, max_iter=5, device=device))
        scorer.fit(Features(train.to(device), blocks=widths))
        parts = [
            GMMScoreModule(p.gmm_)
            if p.transform_ is None
            else TransformedScoreModule(p.transform_, GMMScoreModule(p.gmm_))
            for p in scorer.parts_
        ]
        unfused = BlockSumScoreModule(widths, parts).to(device)
        stacked = scorer.as_module().to(device)
        with torch.inference_mode():
            torch.testing.assert_close(stacked(x), unfused(x), rtol=1e-4, atol=1e-3)  # both ~1e-5 relative off float64
            a = median_time(lambda m=unfused: m(x), device, args.repeats)
            b = median_time(lambda m=stacked: m(x), device, args.repeats)
            line = f"| {k} | {a * 1e3:.3f} ms | {b * 1e3:.3f} ms | {a / b:.2f}× |"
            if graphs:
                ga = median_time(cuda_graphed(unfused, x), device, args.repeats)
                gb = median_time(cuda_graphed(stacked, x), device, args.repeats)
                line += f" {ga * 1e3:.3f} ms | {gb * 1e3:.3f} ms | {ga / gb:.2f}× |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
