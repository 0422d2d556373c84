"""Minimal serving: load a saved detector and its model, score a batch file, print one line per input.

    python examples/serve.py --model examples/mnist_model.py:make_model --weights mnist_cnn.safetensors \\
        --detector mnist_detector.safetensors --batch batch.npz [--device cuda] [--json]

The batch file is an .npz with ``x``: uint8 ``(N, H, W, C)`` images. The classifier and the detector run as one
module (``detector.as_module()``: logits, score and flag from one forward pass, no hooks).
Make a detector file with, for example::

    FailureDetector(n_components=100).fit(model, train_loader).calibrate(val_loader).save("mnist_detector.safetensors")
"""

from __future__ import annotations

import argparse
import json

import torch

from featurefail import FailureDetector
from featurefail.loading import load_model
from featurefail.ood import NpzImages


def serve(model_spec: str, weights: str | None, detector_path: str, batch_path: str, device: str = "cpu") -> list[dict]:
    model, _ = load_model(model_spec, weights)
    detector = FailureDetector.load(detector_path, model=model, device=device)
    module = detector.as_module().to(device).eval()
    x = NpzImages(batch_path).images.to(device)
    with torch.inference_mode():
        logits, score, flag = module(x)
    return [
        {"index": i, "prediction": int(p), "score": float(s), "likely_failure": bool(f)}
        for i, (p, s, f) in enumerate(zip(logits.argmax(1).tolist(), score.tolist(), flag.tolist(), strict=True))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="module:factory or file.py:factory")
    parser.add_argument("--weights", help="state dict of the model")
    parser.add_argument("--detector", required=True, help="file written by FailureDetector.save")
    parser.add_argument("--batch", required=True, help=".npz with x: uint8 (N, H, W, C)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args()
    for row in serve(args.model, args.weights, args.detector, args.batch, args.device):
        if args.json:
            print(json.dumps(row))
        else:
            flag = "LIKELY FAILURE" if row["likely_failure"] else "ok"
            print(f"{row['index']:5d}  class {row['prediction']}  score {row['score']:10.3f}  {flag}")


if __name__ == "__main__":
    main()
