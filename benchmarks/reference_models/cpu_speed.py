"""Training throughput of the reference models on this CPU: bf16 autocast + channels-last vs float32.

    python benchmarks/reference_models/cpu_speed.py

One SGD step (forward, backward, update) on a batch of 1,024 random images, one warm-up then 3 timed steps,
for each model and setting, in one run; prints images/s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import make_model

MODELS = [("vgg", (96, 384, 384)), ("resnet9", None), ("vgg", (64, 256, 256))]


def images_per_second(arch: str, widths, bf16: bool, channels_last: bool, batch: int = 1024, steps: int = 3) -> float:
    torch.manual_seed(0)
    model = make_model(arch, widths)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | bf16 autocast + channels-last | float32, contiguous | speed-up |\n|---|---|---|---|")
    for arch, widths in MODELS:
        fast = images_per_second(arch, widths, bf16=True, channels_last=True)
        slow = images_per_second(arch, widths, bf16=False, channels_last=False)
        name = f"{arch} {'/'.join(map(str, widths))}" if widths else arch
        print(f"| {name} | {fast:.0f} img/s | {slow:.0f} img/s | {fast / slow:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
