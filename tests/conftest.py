import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # small problems run faster on one thread; benchmarks set their own


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def random_patterns(k: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=dtype)
