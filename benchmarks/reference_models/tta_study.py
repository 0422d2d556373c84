"""Test-time augmentation of the reference models, chosen on the validation split.

    python benchmarks/reference_models/tta_study.py --data-dir ../shared/data \\
        benchmarks/reference_models/weights/{resnet9,vgg,vgg-tanh}.safetensors [--write-cards]

Three views (``train.test_time_views``): the plain forward, the flip average, and the flip-and-translate average (the
airbench speed runs' test-time augmentation). First every model's validation accuracy of every view; the view
with the best mean validation accuracy over the models is chosen (ties go to the cheaper view); only then the
test accuracies, printed for every view (reported, not used to choose). ``--write-cards`` writes all these
figures into each model's JSON card under ``tta_study`` (with the command, device and torch that measured them)
and, when the chosen view is flip-and-translate, its test figure as ``test_accuracy_flip_translate_tta`` — the
field ``train.py`` cards carry from training; a card written by ``train.py`` with these views is refused.
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
from train import VIEWS, view_accuracies


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
    paths = [Path(p) for p in args.models]
    cards = {path: json.loads(path.with_suffix(".json").read_text()) for path in paths}
    if args.write_cards:
        trained = [p.name for p, c in cards.items() if "val_accuracy_flip_translate_tta" in c]  # train.py's cards
        if trained:
            raise SystemExit(f"{trained}: the card has the flip-and-translate figure from training; not overwritten")
    _, val, test = cifar10_splits(args.data_dir)
    models = {path: load_reference_model(path).to(device) for path in paths}

    def accuracies(split: tuple[torch.Tensor, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
        return {view: round(v, 4) for view, v in view_accuracies(model, *split, device, bf16=bf16).items()}

    val_accuracy = {path: accuracies(val, model) for path, model in models.items()}
    mean = {view: round(sum(v[view] for v in val_accuracy.values()) / len(paths), 6) for view in VIEWS}
    chosen = max(VIEWS, key=lambda view: (mean[view], -VIEWS.index(view)))
    print(json.dumps({"chosen_on_validation": chosen, "mean_val_accuracy": mean}), flush=True)
    for path, model in models.items():
        test_accuracy = accuracies(test, model)
        record = {
            "val_accuracy": val_accuracy[path],
            "test_accuracy": test_accuracy,
            "chosen_on_validation": chosen,
            "command": command,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "bf16_autocast": bf16,
            "torch": torch.__version__,
        }
        print(json.dumps({"model": path.stem, "val": val_accuracy[path], "test": test_accuracy}), flush=True)
        if args.write_cards:
            stale = ("test_accuracy_flip_translate_tta", "flip_translate_tta_measured")  # the latter: an older study
            card = {k: v for k, v in cards[path].items() if k not in stale}
            card["tta_study"] = record
            if chosen == "flip+translate":
                card["test_accuracy_flip_translate_tta"] = test_accuracy[chosen]
            path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
