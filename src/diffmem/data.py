"""Built-in data and nested training subsets (SCIENCE.md §8). Nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class ArrayDataset:
    """Flattened examples scaled to [-1, 1] with their labels and the shape of one image."""

    name: str
    x: Tensor  # (N, D)
    labels: Tensor  # (N,) int64
    image_shape: tuple[int, ...]  # e.g. (8, 8); prod == D

    def __len__(self) -> int:
        return self.x.shape[0]


def load_digits(*, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ArrayDataset:
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 images, D = 64, scaled from [0, 16] to [-1, 1]."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = torch.as_tensor(np.asarray(bunch.data, dtype=np.float64) / 8.0 - 1.0, dtype=dtype, device=device)
    labels = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64), device=device)
    return ArrayDataset("digits", x, labels, (8, 8))


def nested_order(n: int, seed: int) -> Tensor:
    """One seeded permutation of range(n): the training set of size K is its first K entries, so
    every smaller training set lies inside every larger one."""
    if n < 1:
        raise ValueError(f"a dataset needs at least one example, got n={n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def nested_subset(n: int, k: int, seed: int) -> Tensor:
    """Indices of the nested training set of size k (the first k of nested_order(n, seed))."""
    if not 1 <= k <= n:
        raise ValueError(f"training-set size K={k} must lie in [1, {n}] for a dataset of {n} examples")
    return nested_order(n, seed)[:k]
