import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from models import blob_data, mlp, train


@pytest.fixture(scope="session")
def trained_mlp():
    """An MLP trained on 3 noisy blobs (makes some mistakes), with train/val/test splits."""
    x, y = blob_data(n=1500, seed=0)
    model = train(mlp(), x[:900], y[:900])
    splits = {"train": (x[:900], y[:900]), "val": (x[900:1200], y[900:1200]), "test": (x[1200:], y[1200:])}
    return model, splits


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
