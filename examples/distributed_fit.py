"""Fit, calibrate and save one failure detector across processes with ``torch.distributed``.

    torchrun --nproc_per_node=2 examples/distributed_fit.py --out digits_detector.safetensors
    OMP_NUM_THREADS=1 python examples/distributed_fit.py --out one.safetensors  # the same detector, one process

Every rank extracts the features of its own shard of the training and validation sets (gloo on CPUs, NCCL on
GPUs, one GPU per rank); ``fit`` reduces every statistic over the ranks, so all ranks end with **one** detector,
the one a single process fits on all rows. ``calibrate`` pools the validation scores of all ranks before it
chooses the threshold, ``save`` checks that the ranks agree and lets rank 0 alone write, and every rank can
``load`` the file. Both commands above print the same threshold and test scores up to float rounding
(measured on a CPU: threshold 168.72812 with two ranks, 168.72808 in one process; in float64 both 168.72813).
``OMP_NUM_THREADS=1`` matters only for the comparison: torchrun runs each rank on one thread, and the classifier
trained here rounds differently on more threads, which changes its weights and so every feature.

The shards here are contiguous blocks of rows in rank order, so their union is the dataset in its own order and
the detector equals the one-process detector with the same seed. ``DistributedSampler`` instead deals rows out
in turn and pads the last shard with repeated rows: the detector is then fitted on the same distribution but is
not bit-for-bit the one-process one (the seeded initialisation sees the rows in another order).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset, TensorDataset

from featurefail import FailureDetector
from featurefail.demo import DigitsCNN, load_digits_splits, train_classifier


def shard(x: torch.Tensor, y: torch.Tensor, rank: int, world: int, batch_size: int = 128) -> DataLoader:
    """This rank's contiguous block of rows (shards may differ in size by one row)."""
    rows = np.array_split(np.arange(len(y)), world)[rank]
    return DataLoader(Subset(TensorDataset(x, y), rows.tolist()), batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="digits_detector.safetensors", help="where rank 0 writes the detector")
    parser.add_argument("--components", type=int, default=10)
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    data = load_digits_splits(seed=0)
    # the classifier: every rank needs the same weights (as after DDP training, or loading one checkpoint);
    # the detector checks their fingerprint. Here rank 0 trains it and sends it to the others.
    torch.manual_seed(0)
    model = DigitsCNN()
    if rank == 0:
        train_classifier(model, data.x_train, data.y_train, epochs=12)
    model = model.to(device).eval()
    if distributed:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)

    detector = FailureDetector(n_components=args.components, device=str(device), progress=False)
    detector.fit(model, shard(data.x_train, data.y_train, rank, world))
    detector.calibrate(shard(data.x_val, data.y_val, rank, world), strategy="recall@0.8", folds=3)
    detector.save(args.out)  # every rank calls it; rank 0 writes, the others wait until the file exists

    loaded = FailureDetector.load(args.out, model=model)
    scores = loaded.score(data.x_test.to(device))
    flags = scores < loaded.threshold_
    print(
        f"rank {rank} of {world}: threshold {loaded.threshold_:.5f}, mean test score {scores.double().mean():.5f}, "
        f"flagged {int(flags.sum())} of {len(flags)} test images",
        flush=True,
    )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
