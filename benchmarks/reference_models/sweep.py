"""Choose the reference models' schedules on the validation split, the way the committed weights were chosen.

    python benchmarks/reference_models/sweep.py --data-dir ../shared/data --out /tmp/sweep --device cuda

Trains the candidates below with ``train.py`` (same process, ``train.main``), keeps for each family the one with
the highest **validation** accuracy (the test accuracy is recorded, never used), trains the tanh twin of the
chosen VGG, and the semi-supervised run. Every candidate was sized to fit 90 minutes on the 2-core CPU at the
images/s measured then (bf16 autocast, channels-last; ``benchmarks/README.md`` records those of the chosen ones).
Cards of every candidate land in ``--out``;
``sweep/cards.jsonl`` holds those of the run behind the committed weights (an H200, 2 minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import main as train_main

STRONG_AUGMENTATION = ["--translate", "4", "--cutout", "12"]
VGG_CANDIDATES = {
    "vgg-e40": ["--arch", "vgg", "--widths", "64", "256", "256", "--epochs", "40", "--translate", "2", "--cutout", "0"],
    "vgg-e40-cut": ["--arch", "vgg", "--widths", "64", "256", "256", "--epochs", "40", *STRONG_AUGMENTATION],
    "vgg96-e25": [
        "--arch",
        "vgg",
        "--widths",
        "96",
        "384",
        "384",
        "--epochs",
        "25",
        "--translate",
        "2",
        "--cutout",
        "0",
    ],
    "vgg96-e25-cut": ["--arch", "vgg", "--widths", "96", "384", "384", "--epochs", "25", *STRONG_AUGMENTATION],
}
RESNET_CANDIDATES = {
    "resnet9-e30-cut": ["--arch", "resnet9", "--epochs", "30", *STRONG_AUGMENTATION],
    "resnet9w64-e18-cut": [
        "--arch",
        "resnet9",
        "--widths",
        "64",
        "128",
        "256",
        "512",
        "--epochs",
        "18",
        *STRONG_AUGMENTATION,
    ],
}
SEMI = ["--arch", "vgg", "--widths", "64", "256", "256", "--semi", "--epochs", "10", *STRONG_AUGMENTATION]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="appended to every train.py call")
    args = parser.parse_args()

    def run(name: str, options: list[str]) -> dict | None:
        common = ["--device", args.device, "--data-dir", args.data_dir, "--out", args.out, "--name", name]
        train_main([*common, *options, *args.extra])
        card = Path(args.out) / f"{name}.json"  # a --semi run writes <name>-labelled<N> and <name>-semi<N>
        return json.loads(card.read_text()) if card.exists() else None

    def best(candidates: dict[str, list[str]]) -> str:
        val = {name: run(name, options)["val_accuracy"] for name, options in candidates.items()}
        print(json.dumps({"validation_accuracy": val}), flush=True)
        return max(val, key=val.get)

    chosen = best(VGG_CANDIDATES)
    options = VGG_CANDIDATES[chosen]
    run(chosen.replace("vgg", "vgg-tanh", 1), ["--arch", "vgg-tanh", *options[2:]])
    chosen_resnet = best(RESNET_CANDIDATES)
    run("vggsemi-cut", SEMI)
    print(json.dumps({"vgg": chosen, "resnet": chosen_resnet}))


if __name__ == "__main__":
    main()
