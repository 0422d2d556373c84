"""The `featurefail` command."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, epochs=args.epochs, n_components=args.n_components, plot=not args.no_plot)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, holdout_split, parse_attack
    from .loading import load_model
    from .ood import load_images
    from .plots import write_report

    def say(message: str) -> None:
        print(f"[featurefail] {message}", file=sys.stderr, flush=True)

    for spec in args.attack:
        parse_attack(spec)
    model, hooked = load_model(args.model, args.weights, args.torchscript)
    say("loading data")
    train = load_images(args.train, limit=args.limit_train)
    test = load_images(args.test, limit=args.limit_test)
    if train.labels is None or test.labels is None:
        raise SystemExit("--train and --test need labels (an array 'y' in the .npz, or class sub-folders)")
    if args.val:
        val = load_images(args.val)
        x_train, y_train, x_val, y_val = train.images, train.labels, val.images, val.labels
    else:
        train_idx, val_idx = holdout_split(len(train), args.val_fraction)
        x_train, y_train = train.images[train_idx], train.labels[train_idx]
        x_val, y_val = train.images[val_idx], train.labels[val_idx]
    shape = test.images.shape[1:]
    ood = {}
    for item in args.ood:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--ood needs name=path, got {item!r}")
        ood[name] = load_images(path, size=shape[-1], channels=shape[0], limit=args.limit_test).images
    rows = args.scorers.split(",")
    options: dict[str, dict] = {row: {} for row in rows}
    for row in rows:
        if args.n_components is not None and row in ("default", "paper", "gmm"):
            options[row]["n_components"] = args.n_components
        if args.layer or hooked:
            options[row]["layer"] = args.layer or hooked
    for item in args.option:
        key, _, raw = item.partition("=")
        scorer, _, name = key.partition(".")
        if not raw or not name:
            raise SystemExit(f"--option needs scorer.key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(scorer, {})[name] = value
    result = evaluate(
        model,
        (x_train, y_train),
        (x_val, y_val),
        (test.images, test.labels),
        scorers=rows,
        scorer_options=options,
        ood=ood,
        attacks=args.attack,
        seeds=list(range(args.seeds)),
        batch_size=args.batch_size,
        device=args.device,
        progress=say,
    )
    report = write_report(result, args.out, histogram_scorer=rows[0])
    print(result.to_markdown())
    say(f"report written to {report}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import torch

    from .hooks import describe
    from .loading import load_model

    model, hooked = load_model(args.model, args.weights, args.torchscript)
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        raise SystemExit(f"--input-shape needs integers such as 3,32,32, got {args.input_shape!r}") from None
    generator = torch.Generator().manual_seed(0)
    if args.vocab_size:
        example = torch.randint(0, args.vocab_size, (2, *shape), generator=generator)
    else:
        example = torch.randn(2, *shape, generator=generator)
    layer = args.layer if args.layer is not None else hooked if hooked is not None else "auto"
    if isinstance(layer, str) and layer.lower() == "none":
        layer = None
    print(describe(model, example, layer=layer))
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

    ev = sub.add_parser(
        "evaluate",
        help="evaluate scorers on your model: test mistakes, FGSM/BIM attacks and OOD sets",
        description="Fit every scorer on the training set of YOUR classifier and report AUROC, AUPR-in, "
        "AUPR-out and FPR@95%%TPR for its test-set mistakes, adversarial inputs and out-of-distribution "
        "sets, with a Markdown report, CSV, JSON and figures.",
        epilog="example: featurefail evaluate --model net.py:make_model --weights net.pt --train train.npz "
        "--test test.npz --ood fashion=fashion_test.npz --attack fgsm:0.1 --attack bim:0.05 --out results/",
    )
    src = ev.add_argument_group("model (one of)")
    src.add_argument("--model", help="'package.module:factory' or 'file.py:factory' returning the nn.Module")
    src.add_argument("--weights", help="state dict for --model (.pt read with weights_only=True, or .safetensors)")
    src.add_argument("--torchscript", help="a TorchScript file whose forward returns (logits, features)")
    data = ev.add_argument_group(
        "data (.npz files with x: uint8 (N,H,W,C) and y: int (N,), or image folders root/<class>/*.png)"
    )
    data.add_argument("--train", required=True, help="training set (fits the scorers)")
    data.add_argument("--test", required=True, help="test set (mistakes, attacks, normal samples)")
    data.add_argument("--val", help="labelled validation set (default: --val-fraction of --train)")
    data.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="held out of --train by featurefail.evaluate.holdout_split (default: %(default)s)",
    )
    data.add_argument(
        "--ood",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an out-of-distribution set, resized to the test images (repeatable)",
    )
    data.add_argument("--limit-train", type=int, help="use only the first N training images")
    data.add_argument("--limit-test", type=int, help="use only the first N test (and OOD) images")
    ev.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="KIND:EPS",
        help="fgsm:EPS or bim:EPS on the test set, EPS in [0,1] pixels or like 8/255 (repeatable)",
    )
    ev.add_argument(
        "--scorers",
        default="default,paper,max_softmax,temperature,mahalanobis",
        help="comma-separated rows: 'default' = FailureDetector(), 'paper' = FailureDetector.paper(), or scorer "
        "names = FailureDetector(scorer=name) (default: %(default)s)",
    )
    ev.add_argument("--n-components", type=int, default=None, help="GMM components of the default, paper and gmm rows")
    ev.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="ROW.KEY=VALUE",
        help='a setting of a row\'s detector or scorer, e.g. vae.epochs=10, mahalanobis.epsilon="auto" or '
        "default.per_layer=false (repeatable)",
    )
    ev.add_argument("--seeds", type=int, default=1, help="independent fits per scorer (default: %(default)s)")
    ev.add_argument(
        "--layer", help="hook this layer in every row (default: each row's own: the head's input, or 'auto')"
    )
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model is)")
    ev.add_argument("--out", default="featurefail-report", help="output folder (default: %(default)s)")
    ev.set_defaults(func=_evaluate)

    ins = sub.add_parser(
        "inspect",
        help="show what the detector would hook on your model: head, layers, capture side, layouts, widths",
        description="Run one forward pass of YOUR classifier on a random batch of two inputs and print the head "
        "found from the logits and the feature blocks that layer= selects, before any fitting.",
        epilog="example: featurefail inspect --model net.py:make_model --input-shape 3,32,32",
    )
    ins_src = ins.add_argument_group("model (one of)")
    ins_src.add_argument("--model", help="'package.module:factory' or 'file.py:factory' returning the nn.Module")
    ins_src.add_argument("--weights", help="state dict for --model (.pt read with weights_only=True, or .safetensors)")
    ins_src.add_argument("--torchscript", help="a TorchScript file whose forward returns (logits, features)")
    ins.add_argument("--input-shape", required=True, help="one input without the batch axis, e.g. 3,32,32")
    ins.add_argument(
        "--vocab-size", type=int, default=0, help="integer token inputs in [0, VOCAB) instead of Gaussian noise"
    )
    ins.add_argument("--layer", default=None, help="layer= setting to show (default: auto; 'none' = the head's input)")
    ins.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
