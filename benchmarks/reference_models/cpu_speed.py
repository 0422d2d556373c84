"""Training throughput of the reference models on this CPU: bf16 autocast + channels-last vs float32.

    python benchmarks/reference_models/cpu_speed.py
    python benchmarks/reference_models/cpu_speed.py --compile   # also torch.compile (inductor), bf16 + CL
    python benchmarks/reference_models/cpu_speed.py --threads 1 2 4 --models 0   # bf16 + CL at each thread count

One SGD step (forward, backward, update) on a batch of 1,024 random images, one warm-up then 3 timed steps,
for each model and setting, in one run; prints images/s. With ``--compile`` the model is also wrapped in
``torch.compile`` and the warm-up step's seconds (the compilation) are printed beside its images/s. With
``--threads`` it times bf16 autocast + channels-last at each intra-op thread count instead (``train.py
--threads``), the process's own setting restored afterwards.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import make_model


def cpu_description(cpuinfo: str | None = None) -> dict:
    """The CPU a figure was measured on: ``{"model", "logical_cpus", "bf16_instructions"}`` from Linux's
    ``/proc/cpuinfo`` (or the text given), the instructions being those of ``amx_bf16`` / ``avx512_bf16`` it has
    (what makes bf16 autocast fast); ``{}`` where that file cannot be read. Machines lent under the same name
    have differed in training speed (benchmarks/README.md), so a card's wall time holds with its CPU."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    processors = [block for block in cpuinfo.split("\n\n") if block.strip()]
    if not processors:
        return {}
    fields = dict(
        (key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in processors[0].splitlines())
    )
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name", "unknown"),
        "logical_cpus": len(processors),
        "bf16_instructions": [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags],
    }


MODELS = [
    ("vgg", (96, 384, 384)),
    ("resnet9", None),
    ("vgg", (64, 256, 256)),
    ("resnet9-whitened", (96, 192, 384)),
    ("resnet9-whitened", (112, 224, 448)),
    ("resnet9-whitened", (128, 256, 384)),
    ("resnet9-whitened", (128, 256, 512)),
    ("resnet9-whitened", (144, 288, 576)),
    ("resnet9-whitened", (160, 320, 640)),
    ("vgg", (112, 448, 448)),
    ("vgg", (128, 512, 512)),
]


def images_per_second(
    arch: str, widths, bf16: bool, channels_last: bool, batch: int = 1024, steps: int = 3, compile_model: bool = False
) -> tuple[float, float]:
    """Images/s of the timed steps, and the seconds of the warm-up step (compilation included)."""
    torch.manual_seed(0)
    model = make_model(arch, widths)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if compile_model else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start), warm_up


def model_name(arch: str, widths) -> str:
    """``"vgg 96/384/384"``; the architecture alone where it runs on its default widths."""
    return f"{arch} {'/'.join(map(str, widths))}" if widths else arch


def thread_table(models: list[int], counts: list[int]) -> list[str]:
    """Markdown rows: bf16 + channels-last images/s of each model at each intra-op thread count, and each
    count's speed against the first."""
    before = torch.get_num_threads()
    lines = ["| model | " + " | ".join(f"{n} thread{'s' * (n > 1)}" for n in counts) + " |"]
    lines.append("|---|" + "---|" * len(counts))
    try:
        for arch, widths in (MODELS[i] for i in models):
            speeds = []
            for n in counts:
                torch.set_num_threads(n)
                speeds.append(images_per_second(arch, widths, bf16=True, channels_last=True)[0])
            name = model_name(arch, widths)
            cells = [f"{v:.0f} img/s" + (f" ({v / speeds[0]:.2f}×)" if i else "") for i, v in enumerate(speeds)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    finally:
        torch.set_num_threads(before)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile with bf16 + channels-last")
    parser.add_argument("--models", nargs="+", type=int, default=list(range(len(MODELS))), help="indices in MODELS")
    parser.add_argument("--threads", nargs="+", type=int, help="time bf16 + channels-last at these thread counts")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {cpu_description()}")
    if args.threads:
        if min(args.threads) < 1:
            parser.error("--threads: thread counts must be at least 1")
        print("\n".join(thread_table(args.models, args.threads)), flush=True)
        return
    head = "| model | bf16 autocast + channels-last | float32, contiguous | speed-up |"
    if args.compile:
        head += " compiled, bf16 + channels-last (first step) | compiled vs eager bf16 |"
    print(head + "\n|---|---|---|---|" + ("---|---|" if args.compile else ""))
    for arch, widths in (MODELS[i] for i in args.models):
        fast, _ = images_per_second(arch, widths, bf16=True, channels_last=True)
        slow, _ = images_per_second(arch, widths, bf16=False, channels_last=False)
        name = model_name(arch, widths)
        line = f"| {name} | {fast:.0f} img/s | {slow:.0f} img/s | {fast / slow:.2f}× |"
        if args.compile:
            compiled, first = images_per_second(arch, widths, bf16=True, channels_last=True, compile_model=True)
            line += f" {compiled:.0f} img/s ({first:.0f} s) | {compiled / fast:.2f}× |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
