"""bfloat16 against float32 k-means++ seeding on real network features (issue 19): final mean log-likelihood.

The default initialisation seeds float32 rows from bfloat16 distance products on CPUs with native bfloat16
(``featurefail.gmm.initialisation.bfloat16_seeding``). This script fits ``DiagonalGMM`` (K components, default
settings otherwise) on the penultimate features of a ``benchmarks/reproduce_cifar10.py`` cache, raw and
L2-normalised, once with each seeding precision per seed, and prints the final mean log-likelihoods side by side.
The cache is read as given: ``OUT/cache/<model>-weights.json`` names the weights it was built from.

Usage::

    python benchmarks/gmm_seeding_precision.py results/cache/resnet9-clean-train20000.safetensors --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from featurefail import DiagonalGMM
from featurefail.evaluate import EvalData
from featurefail.gmm import initialisation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "cache", help="an EvalData file written by reproduce_cifar10.py (OUT/cache/*-clean-*.safetensors)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--components", type=int, default=100)
    args = parser.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    train = EvalData.load(args.cache).train
    x = (train.select_blocks(0) if train.blocks else train).feats.float()
    native = initialisation.bfloat16_seeding(torch.device("cpu"), torch.float32)
    print(f"torch {torch.__version__}; {args.cache}: penultimate features {tuple(x.shape)}, K={args.components}")
    print(f"(this CPU seeds float32 rows in bfloat16 by default: {native})\n")
    print("| features | seed | float32 seeding: log-lik (EM it) | bfloat16 seeding: log-lik (EM it) | difference |")
    print("|---|---|---|---|---|")
    diffs: dict[str, list[float]] = {"raw": [], "l2": []}
    for name, rows in (("raw", x), ("l2", torch.nn.functional.normalize(x, dim=1))):
        for seed in args.seeds:
            fits = []
            for reduced in (False, True):
                initialisation.bfloat16_seeding = lambda device, dtype, on=reduced: on and dtype == torch.float32
                gmm = DiagonalGMM(args.components, random_state=seed).fit(rows)
                fits.append((gmm.score(rows), gmm.n_iter_))
            diffs[name].append(fits[1][0] - fits[0][0])
            print(
                f"| {name} | {seed} | {fits[0][0]:.3f} ({fits[0][1]}) | {fits[1][0]:.3f} ({fits[1][1]}) | "
                f"{diffs[name][-1]:+.3f} |"
            )
    for name, d in diffs.items():
        print(f"\n{name}: bfloat16 − float32 seeding, mean {np.mean(d):+.3f} nats/sample (min {min(d):+.3f})", end="")
    print()


if __name__ == "__main__":
    main()
