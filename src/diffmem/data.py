"""Built-in data and nested training subsets (SCIENCE.md §8). Nothing is downloaded."""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

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


def circle_points(n: int, *, spacing: str = "uniform", seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """n points on the unit circle, (n, 2): 'uniform' draws angles uniformly at random (seeded),
    'even' spaces them equally starting at angle 0."""
    if n < 1:
        raise ValueError(f"need at least one point on the circle, got n={n}")
    if spacing == "uniform":
        theta = torch.rand(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64) * 2 * math.pi
    elif spacing == "even":
        theta = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    else:
        raise ValueError(f"unknown circle spacing {spacing!r}; choose 'uniform' or 'even'")
    return torch.stack([theta.cos(), theta.sin()], dim=1).to(dtype)


def load_circle(n: int = 2000, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> ArrayDataset:
    """Points drawn uniformly on the unit circle (the 2D toy of SCIENCE.md §7)."""
    x = circle_points(n, spacing="uniform", seed=seed, dtype=dtype).to(device)
    return ArrayDataset("circle", x, torch.zeros(n, dtype=torch.int64, device=device), (2,))


DATASETS = {"digits": load_digits, "circle": load_circle}


def load_dataset(name: str, *, dtype: torch.dtype = torch.float32, device="cpu") -> ArrayDataset:
    """A built-in dataset by name ('digits', 'circle'); nothing is downloaded."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; built in: {sorted(DATASETS)}") from None
    return loader(dtype=dtype, device=device)


def load_patterns_npz(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu") -> ArrayDataset:
    """Patterns from an .npz file holding exactly one float array of shape (K, D).

    Pickled content is refused (loading it would execute code); a missing, corrupt or ambiguous
    file gets a message saying what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"patterns file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError(f"{path} is a single .npy array, not an .npz archive; save it with numpy.savez")
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise ValueError(
                f"{path} holds pickled data, which diffmem refuses to load because unpickling can execute "
                "code; save plain numeric arrays with numpy.savez"
            ) from None
        raise ValueError(f"cannot read {path}: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"cannot read {path} as an .npz archive (corrupt or truncated?): {e}") from None
    floats = {k: a for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating)}
    if len(floats) != 1:
        raise ValueError(
            f"{path} must hold exactly one float array of shape (K, D); found {len(floats)} float arrays "
            f"among {sorted(arrays)}"
        )
    ((key, arr),) = floats.items()
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"array {key!r} in {path} has shape {arr.shape}; patterns need shape (K, D)")
    if not np.isfinite(arr).all():
        raise ValueError(f"array {key!r} in {path} contains NaN or Inf values")
    x = torch.as_tensor(np.ascontiguousarray(arr), dtype=dtype, device=device)
    side = math.isqrt(arr.shape[1])
    shape = (side, side) if side * side == arr.shape[1] and arr.shape[1] > 4 else (arr.shape[1],)
    return ArrayDataset(path.stem, x, torch.zeros(arr.shape[0], dtype=torch.int64, device=device), shape)
