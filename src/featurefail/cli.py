"""The `featurefail` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, epochs=args.epochs, n_components=args.n_components, plot=not args.no_plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurefail",
        description="Flag the inputs a PyTorch classifier is likely to get wrong, from the likelihood of its "
        "penultimate features under a Gaussian mixture.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits and show the detector at work",
        description="Train a small CNN on scikit-learn's bundled digits (seeded), fit the "
        "detector, calibrate it, and print a table of detection metrics.",
    )
    demo.add_argument("--out", default="featurefail-demo", help="folder for the histogram PNG (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the split, training and GMM (default: 0)")
    demo.add_argument("--epochs", type=int, default=12, help="training epochs (default: %(default)s)")
    demo.add_argument("--n-components", type=int, default=10, help="GMM components (default: %(default)s)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the histogram")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
