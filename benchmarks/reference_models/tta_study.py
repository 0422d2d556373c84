"""Test-time augmentation of the reference models, chosen on the validation split.

    python benchmarks/reference_models/tta_study.py --data-dir ../shared/data \\
        benchmarks/reference_models/weights/{resnet9,vgg,vgg-tanh}.safetensors [--write-cards]

For each model: validation and test accuracy of the plain forward, the flip average and the flip-and-translate
average (``train.predict``; the airbench speed runs' test-time augmentation). The validation columns are the
ones the choice may look at; the test columns are reported. ``--write-cards`` adds the test accuracy of the
flip-and-translate average to each model's JSON card as ``test_accuracy_flip_translate_tta``, with
``flip_translate_tta_measured`` (this command, device, torch) — cards written by ``train.py`` since this script
carry the field from training already.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import load_reference_model
from cifar_data import cifar10_splits
from train import accuracy

VIEWS = {"plain": dict(tta=False), "flip": dict(tta=True), "flip+translate": dict(tta=True, translate=True)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="<name>.safetensors files with their <name>.json cards")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--write-cards", action="store_true")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/reference_models/tta_study.py", *argv])
    device, bf16 = torch.device(args.device), not args.no_bf16
    _, val, test = cifar10_splits(args.data_dir)
    for path in map(Path, args.models):
        model = load_reference_model(path).to(device)
        row = {"model": path.stem}
        for split, (x, y) in (("val", val), ("test", test)):
            for view, options in VIEWS.items():
                row[f"{split} {view}"] = round(100 * accuracy(model, x, y, device, bf16=bf16, **options), 2)
        print(json.dumps(row), flush=True)
        if args.write_cards:
            card_path = path.with_suffix(".json")
            card = json.loads(card_path.read_text())
            card["test_accuracy_flip_translate_tta"] = round(row["test flip+translate"] / 100, 4)
            card["flip_translate_tta_measured"] = {
                "command": command,
                "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                "bf16_autocast": bf16,
                "torch": torch.__version__,
            }
            card_path.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
