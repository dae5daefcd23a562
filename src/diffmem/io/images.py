"""Image sets read from a folder of PNG/JPEG files or from an .npz array, for the memorization audit
(is a generated image a copy of a training image?), and their embeddings, cached by content.

diffmem's image convention: float32 pixels in [-1, 1], shape (N, C, H, W), C = 1 (grey, PIL mode 'L')
or 3 ('RGB'). A folder is read as load_image_folder reads it: PIL converts each image to the mode, resizes
it (Lanczos) so its shorter side is `size` and centre-crops it, and the uint8 pixel p becomes p / 127.5 - 1
in float32 arithmetic (io.data._images). Every image's header is checked before it is decoded (size,
decompression bombs, aspect ratio). A folder larger than memory is streamed: iter_image_batches and
embed_images hold one batch of images at a time.

A folder's content key is the sha256 over its sorted (relative path, sha256 of the file's bytes) pairs, so
it changes when any file is changed, added, removed or renamed, and not when the folder is moved. The
embedding cache files an embedding under the hash of that key, the embedding's id, the output size and
mode, and CACHE_FORMAT: a second run on unchanged files reads a memory-mapped .npy and decodes nothing.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import re
import secrets
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from diffmem.io.data import (
    GREY_MODES,
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    _choice,
    _count,
    _image_size_problem,
    _sized,
    image_files,
    image_header,
    pil_errors,
    square_resize,
)
from diffmem.io.files import (
    MAX_ARRAY_BYTES,
    VERSION,
    PickledArrayError,
    canonical_json_hash,
    read_npy_header,
    read_npz,
    write_json_atomic,
)

MAX_IMAGE_SET_BYTES = 4 * 2**30  # float32 bytes read_images (and convert_images) may return: 4 GiB, e.g.
# 50,000 RGB images of 128 x 128; beyond it, stream with iter_image_batches or embed_images
MAX_IMAGE_FILE_BYTES = 2**30  # bytes of one image file: an image at MAX_IMAGE_PIXELS in RGBA is 256 MiB raw
CACHE_FORMAT = 1  # part of every cache key: raise it when what a cache entry holds changes
MODES = ("L", "RGB")
_HASH_CHUNK = 2**20  # files are hashed 1 MiB at a time
_SCAN_CHUNK = 2**24  # float arrays are range-checked 16 MiB at a time

# what `conversion` records; the luma weights are ITU-R 601-2, those of PIL's convert('L')
VALUES_UINT8 = "uint8 p -> p / 127.5 - 1 in float32 (0 -> -1, 255 -> 1)"
VALUES_UNIT = "float, every value in [0, 1] (diffusers' output_type='np'): v -> 2 v - 1"
VALUES_SYMMETRIC = "float in [-1, 1] (diffmem's and diffusers' model space): kept"
MODE_PIL = "PIL Image.convert: RGB -> L is the luma 0.299 R + 0.587 G + 0.114 B (rounded), L -> RGB replicates"
MODE_FLOAT = "on floats: RGB -> L is the luma 0.299 R + 0.587 G + 0.114 B, L -> RGB replicates the channel"
RESIZE_PIL = "shorter side to size (PIL Lanczos on the uint8 image), centre crop to size x size"
RESIZE_FLOAT = "shorter side to size (PIL Lanczos on each channel as a float image), centre crop, clip to [-1, 1]"
RESIZE_NONE = "none: the native size is kept"


@dataclass(frozen=True)
class ImageListing:
    """What scan_images found, from file headers only: one entry per image, in order."""

    source: Path
    kind: str  # 'folder' or 'npz'
    names: tuple[str, ...]  # relative paths (posix), or 'npz[i]'
    sizes: tuple[tuple[int, int], ...]  # (H, W) of each image
    modes: tuple[str, ...]  # PIL mode of each file; for an npz 'L' or 'RGB' (its channels)
    native_size: tuple[int, int] | None  # (H, W) shared by every image, None when they differ
    native_mode: str  # 'L' if every image is grey-type (GREY_MODES), else 'RGB'
    key: str  # the content key (module docstring)
    digests: tuple[str, ...] = ()  # sha256 of each file (folders)
    array: str | None = None  # the npz member read
    layout: str | None = None  # the npz array's layout: 'NHW', 'NHWC' or 'NCHW'
    stamp: tuple[int, int] | None = None  # the npz file's (size, mtime_ns) when it was hashed

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class ImageSet:
    """Images in diffmem's convention, with what was done to them."""

    x: np.ndarray  # (N, C, H, W) float32 in [-1, 1]
    names: tuple[str, ...]
    source: str
    native_size: tuple[int, int] | None  # (H, W), None for a folder of mixed sizes
    native_mode: str
    conversion: dict  # layout, value rule, mode from/to, resize from/to (JSON-ready)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Embedded:
    """The embeddings of an image set, one row per image, in the listing's order."""

    vectors: np.ndarray  # (N, E) float32, read-only (an np.memmap when it comes from or went to the cache)
    names: tuple[str, ...]
    key: str  # the cache key (content, embedding id, size, mode, format)
    cached: bool  # True when read from the cache, nothing decoded or embedded
    seconds: float  # wall time of the call
    native_size: tuple[int, int] | None = None  # (H, W) of the files, None when they differ
    native_mode: str = ""  # 'L' or 'RGB'
    conversion: dict = field(default_factory=dict)  # read_images' record of what was done to the images


class CacheWarning(UserWarning):
    """A cache entry was unreadable and is recomputed."""


# --- scanning ------------------------------------------------------------------------------------------------------


def scan_images(path: str | os.PathLike) -> ImageListing:
    """List the images of a folder (recursively, sorted relative paths, hidden files and folders skipped,
    .png/.jpg/.jpeg in any case) or of an .npz file, reading headers only, and compute the content key.

    For a folder, each file is hashed in 1 MiB chunks and its size and PIL mode come from its header;
    an image beyond MAX_IMAGE_PIXELS is refused here, before anything is decoded. For an .npz, the array
    read is the only one, or the one named 'images' or 'samples' (see read_images for its layouts)."""
    path = Path(path)
    if path.is_dir():
        return _scan_folder(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist: pass a folder of PNG/JPEG images or an .npz file")
    if path.is_file() and path.suffix.lower() == ".npz":
        return _scan_npz(path)
    raise ValueError(f"{path} is neither a folder nor an .npz file: pass a folder of PNG/JPEG images or an .npz file")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest()


def _header_problem(w: int, h: int, size: int | None) -> str | None:
    """Why a w x h image is refused before decoding: its pixel count always, its aspect ratio when it is
    to be resized to size (the centre crop would keep little of it)."""
    if size is not None:
        return _image_size_problem(w, h, size)
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
        return _image_size_problem(w, h, max(w, h, 1))
    return None


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """((H, W), PIL mode) of the image file at path, from its header."""
    (w, h), mode = image_header(path)
    return (h, w), mode


def _native_mode(modes: Sequence[str]) -> str:
    return "L" if all(m in GREY_MODES for m in modes) else "RGB"


def _scan_folder(root: Path) -> ImageListing:
    paths = image_files(root)
    if not paths:
        if not any(root.iterdir()):
            raise ValueError(f"folder {root} is empty: put the PNG/JPEG images there, or pass another folder")
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}, any case) found under {root}")
    sizes, modes, digests = [], [], []
    key = hashlib.sha256(b"diffmem image folder\n")
    for rel in paths:
        size, mode = _header(root / rel)
        digest = _file_sha256(root / rel)
        sizes.append(size)
        modes.append(mode)
        digests.append(digest)
        key.update(rel.as_posix().encode("utf-8", "surrogateescape") + b"\0" + digest.encode() + b"\n")
    return ImageListing(
        source=root,
        kind="folder",
        names=tuple(p.as_posix() for p in paths),
        sizes=tuple(sizes),
        modes=tuple(modes),
        native_size=sizes[0] if len(set(sizes)) == 1 else None,
        native_mode=_native_mode(modes),
        key=key.hexdigest(),
        digests=tuple(digests),
    )


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of an npz from the .npy headers alone; the data is read by read_npz."""
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename!r} is not a .npy array")
                with archive.open(info) as f:
                    shape, _, dtype = read_npy_header(f)
                name = info.filename.removesuffix(".npy")
                if dtype.hasobject:
                    raise PickledArrayError(
                        f"{path} holds pickled data (array {name!r} has dtype {dtype}), which diffmem refuses to "
                        "load because unpickling can execute code; save plain numeric arrays with numpy.savez"
                    )
                out[name] = (tuple(shape), dtype)
    except PickledArrayError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, NotImplementedError, RuntimeError) as e:
        raise ValueError(f"cannot read {path}: not a readable npz file ({e})") from None
    return out


def _npz_layout(shape: tuple[int, ...], path: Path, name: str) -> tuple[str, int, int, int]:
    """(layout, C, H, W) of an image array. (N, H, W) is grey; a 4D array is (N, C, H, W) when its second
    axis is 1 or 3 (diffmem's and torch's layout, preferred when both readings fit), else (N, H, W, C)."""
    if len(shape) == 3:
        layout, (c, h, w) = "NHW", (1, *shape[1:])
    elif len(shape) == 4 and shape[1] in (1, 3):
        layout, (c, h, w) = "NCHW", shape[1:]
    elif len(shape) == 4 and shape[3] in (1, 3):
        layout, (h, w, c) = "NHWC", shape[1:]
    else:
        raise ValueError(
            f"array {name!r} in {path} has shape {shape}; images need shape (N, H, W), (N, H, W, C) or "
            "(N, C, H, W) with C = 1 or 3"
        )
    if shape[0] == 0 or h == 0 or w == 0:
        raise ValueError(f"array {name!r} in {path} has shape {shape}: it holds no image or empty images")
    return layout, c, h, w


def _scan_npz(path: Path) -> ImageListing:
    headers = _npz_headers(path)
    if len(headers) == 1:
        (name,) = headers
    else:
        named = [k for k in ("images", "samples") if k in headers]
        if len(named) != 1:
            raise ValueError(
                f"{path} holds arrays {sorted(headers)}; it must hold exactly one array, or one named "
                "'images' or 'samples'"
            )
        (name,) = named
    shape, dtype = headers[name]
    if not (dtype == np.uint8 or dtype.kind == "f"):
        raise ValueError(
            f"array {name!r} in {path} has dtype {dtype}; images must be uint8 (0..255) or float ([0, 1] or [-1, 1])"
        )
    layout, c, h, w = _npz_layout(shape, path, name)
    stat = path.stat()
    key = hashlib.sha256(f"diffmem image npz\n{name}\n{_file_sha256(path)}".encode()).hexdigest()
    return ImageListing(
        source=path,
        kind="npz",
        names=tuple(f"npz[{i}]" for i in range(shape[0])),
        sizes=((h, w),) * shape[0],
        modes=("L" if c == 1 else "RGB",) * shape[0],
        native_size=(h, w),
        native_mode="L" if c == 1 else "RGB",
        key=key,
        array=name,
        layout=layout,
        stamp=(stat.st_size, stat.st_mtime_ns),
    )


# --- conversion ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """The resolved output of a read: mode, (C, H, W), and size (None: native)."""

    mode: str
    shape: tuple[int, int, int]
    size: int | None


def _mode(mode) -> str | None:
    return None if mode is None else _choice(mode, "image mode", MODES)


def _size(size) -> int | None:
    return None if size is None else _sized(size, "size")


def _target(listing: ImageListing, size, mode) -> _Target:
    """Check size and mode against the listing (headers only): mixed sizes need a size, and with a size
    every image's aspect ratio must allow the centre crop."""
    size, mode = _size(size), _mode(mode) or listing.native_mode
    channels = 1 if mode == "L" else 3
    if size is None:
        if listing.native_size is None:
            first = listing.sizes[0]
            j = next(j for j, s in enumerate(listing.sizes) if s != first)
            raise ValueError(
                f"the images in {listing.source} differ in size: {listing.names[0]} is {first[1]} x {first[0]}, "
                f"{listing.names[j]} is {listing.sizes[j][1]} x {listing.sizes[j][0]} (width x height); pass a "
                "size to resize each image to size x size (shorter side, centre crop)"
            )
        return _Target(mode, (channels, *listing.native_size), None)
    seen = set()
    for name, (h, w) in zip(listing.names, listing.sizes, strict=True):
        if (h, w) not in seen:
            seen.add((h, w))
            problem = _header_problem(w, h, size)
            if problem is not None:
                raise ValueError(f"image {listing.source / name} {problem}")
    return _Target(mode, (channels, size, size), size)


def _record(kind: str, layout, values: str, modes, target: _Target, sizes, resize_rule: str, mode_rule: str) -> dict:
    """The conversion record: what was read and what was done to it."""
    distinct = sorted({tuple(s) for s in sizes})
    return {
        "source": kind,
        "layout": layout,
        "values": values,
        "mode": {"from": sorted(set(modes)), "to": target.mode, "rule": mode_rule},
        "resize": {
            "from": [list(s) for s in distinct[:20]],  # (H, W); at most 20 listed
            "distinct_sizes": len(distinct),
            "to": list(target.shape[1:]),
            "rule": RESIZE_NONE if target.size is None else resize_rule,
        },
    }


def _bounded(n: int, shape: tuple[int, int, int], what: str) -> None:
    nbytes = n * math.prod(shape) * 4
    if nbytes > MAX_IMAGE_SET_BYTES:
        raise ValueError(
            f"{what}: {n:,} images of {shape[0]} x {shape[1]} x {shape[2]} take {nbytes / 2**30:.3g} GiB as float32, "
            f"more than MAX_IMAGE_SET_BYTES = {MAX_IMAGE_SET_BYTES / 2**30:g} GiB; stream them with "
            "iter_image_batches or embed_images, or pass a smaller size"
        )


def _uint8_to_float(pixels: np.ndarray) -> np.ndarray:
    """p / 127.5 - 1 in float32, the arithmetic of io.data._images (so the two agree bit for bit)."""
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _convert_uint8(pixels: np.ndarray, target: _Target) -> np.ndarray:
    """uint8 images (n, C, H, W) through PIL: convert to the mode, resize and crop; uint8 (n, C', H', W')."""
    out = np.empty((len(pixels), *target.shape), dtype=np.uint8)
    for i, p in enumerate(pixels):
        im = Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)).convert(target.mode)
        if target.size is not None:
            im = square_resize(im, target.size)
        a = np.asarray(im, dtype=np.uint8)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, PIL's RGB -> L weights


def _convert_float(x: np.ndarray, target: _Target) -> np.ndarray:
    """float32 images (n, C, H, W) in [-1, 1] to the target. The luma weights sum to 1, so RGB -> L
    commutes with the affine map to [-1, 1]; Lanczos can overshoot, so resized values are clipped."""
    if x.shape[1] == 3 and target.mode == "L":
        x = np.tensordot(x, _LUMA, axes=([1], [0]))[:, None].astype(np.float32)  # (n, 1, H, W)
    if target.size is not None and x.shape[2:] != (target.size, target.size):
        out = np.empty((*x.shape[:2], target.size, target.size), dtype=np.float32)
        for i in range(x.shape[0]):
            for c in range(x.shape[1]):
                out[i, c] = np.asarray(square_resize(Image.fromarray(np.ascontiguousarray(x[i, c])), target.size))
        x = np.clip(out, -1.0, 1.0, out=out)
    if x.shape[1] == 1 and target.mode == "RGB":
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x, dtype=np.float32)


def _decode(path: Path, target: _Target, digest: str | None = None) -> np.ndarray:
    """One image file as uint8 (C, H, W) in the target's mode and size. The bytes are read once, checked
    against the digest the scan recorded (so the cache never files pixels under another content's key),
    and decoded from memory after the header check."""
    try:
        nbytes = path.stat().st_size
        if nbytes > MAX_IMAGE_FILE_BYTES:
            raise ValueError(
                f"image {path} is {nbytes:,} bytes, more than MAX_IMAGE_FILE_BYTES = {MAX_IMAGE_FILE_BYTES:,}"
            )
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e.strerror}") from None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"image {path} changed after it was scanned; run again once nothing writes to the folder")
    problem = None
    with pil_errors(path), Image.open(io.BytesIO(data)) as im:
        problem = _header_problem(*im.size, target.size)
        if problem is None:
            im = im.convert(target.mode)  # decodes the whole file
    if problem is not None:
        raise ValueError(f"image {path} {problem}")
    if target.size is not None:
        im = square_resize(im, target.size)
    pixels = np.asarray(im, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
    if pixels.shape != target.shape:  # size None: every image must have the native size
        raise ValueError(f"image {path} decodes to shape {pixels.shape}, expected {target.shape}")
    return pixels


def _value_rule(a: np.ndarray, path: Path, name: str) -> str:
    """Which value rule an npz array follows (module constants VALUES_*); NaN, inf or floats outside
    [-1, 1] are refused. Checked a chunk of rows at a time, so no full-size temporary is made."""
    if a.dtype == np.uint8:
        return VALUES_UINT8
    rows = max(1, _SCAN_CHUNK // max(1, a[0].nbytes))
    lo, hi = math.inf, -math.inf
    for start in range(0, len(a), rows):
        part = a[start : start + rows]
        if not np.isfinite(part).all():
            raise ValueError(f"array {name!r} in {path} holds NaN or infinite values; images must be finite")
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    if 0 <= lo and hi <= 1:
        return VALUES_UNIT
    if -1 <= lo and hi <= 1:
        return VALUES_SYMMETRIC
    raise ValueError(
        f"array {name!r} in {path} holds floats in [{lo:.4g}, {hi:.4g}]; float images must lie in [0, 1] "
        "(read as v -> 2 v - 1) or in [-1, 1] (kept): clip or rescale them"
    )


@dataclass(frozen=True)
class _Plan:
    """A read under way: the listing, its target, the conversion record and, for an npz, its array."""

    listing: ImageListing
    target: _Target
    conversion: dict
    array: np.ndarray | None = None  # the npz array in its file layout
    values: str = VALUES_UINT8


def _load_npz(listing: ImageListing) -> tuple[np.ndarray, str]:
    path, name = listing.source, listing.array
    arrays = read_npz(path, max_bytes=MAX_ARRAY_BYTES, what="images file")
    stat = path.stat()
    a = arrays.get(name)
    if a is None or a.shape[0] != len(listing) or (stat.st_size, stat.st_mtime_ns) != listing.stamp:
        raise ValueError(f"{path} changed after it was scanned; run again once nothing writes to it")
    return a, _value_rule(a, path, name)


def _plan(listing: ImageListing, target: _Target) -> _Plan:
    if listing.kind == "folder":
        conversion = _record("folder", None, VALUES_UINT8, listing.modes, target, listing.sizes, RESIZE_PIL, MODE_PIL)
        return _Plan(listing, target, conversion)
    a, values = _load_npz(listing)
    pil = values == VALUES_UINT8  # uint8 arrays go through PIL as files do, so both agree exactly
    conversion = _record(
        "npz",
        listing.layout,
        values,
        listing.modes[:1],
        target,
        listing.sizes[:1],
        RESIZE_PIL if pil else RESIZE_FLOAT,
        MODE_PIL if pil else MODE_FLOAT,
    )
    return _Plan(listing, target, conversion, a, values)


def _npz_rows(plan: _Plan, rows) -> np.ndarray:
    """The npz images at rows (a slice or index array) in the target: float32 (n, C, H, W)."""
    a = plan.array[rows]
    layout = plan.listing.layout
    a = a[:, None] if layout == "NHW" else a.transpose(0, 3, 1, 2) if layout == "NHWC" else a  # (n, C, H, W)
    native = (1 if plan.listing.native_mode == "L" else 3, *plan.listing.native_size)
    if plan.values == VALUES_UINT8:
        return _uint8_to_float(a if native == plan.target.shape else _convert_uint8(a, plan.target))
    x = a.astype(np.float32)
    if plan.values == VALUES_UNIT:
        x = x * np.float32(2.0) - np.float32(1.0)
    return _convert_float(x, plan.target)


def _batches(plan: _Plan, batch: int) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    listing = plan.listing
    for start in range(0, len(listing), batch):
        stop = min(len(listing), start + batch)
        if plan.array is not None:
            x = _npz_rows(plan, slice(start, stop))
        else:
            pixels = np.empty((stop - start, *plan.target.shape), dtype=np.uint8)
            for i in range(start, stop):
                pixels[i - start] = _decode(listing.source / listing.names[i], plan.target, listing.digests[i])
            x = _uint8_to_float(pixels)
        yield listing.names[start:stop], x


# --- reading -------------------------------------------------------------------------------------------------------


def read_images(path: str | os.PathLike, *, size: int | None = None, mode: str | None = None) -> ImageSet:
    """A folder of PNG/JPEG images or an .npz array as float32 (N, C, H, W) in [-1, 1].

    size=None keeps the native size (a folder of mixed sizes is then an error); with a size, each image is
    resized so its shorter side is size and centre-cropped (load_image_folder's rule). mode=None keeps the
    native mode ('L' if every image is grey, else 'RGB'); 'L' or 'RGB' converts as PIL does (RGB -> L is
    the ITU-R 601-2 luma, L -> RGB replicates).

    An .npz holds exactly one array, or one named 'images' or 'samples', of shape (N, H, W), (N, H, W, C)
    or (N, C, H, W) with C = 1 or 3 (a 4D shape that fits both is read as (N, C, H, W)). Its values:
    uint8 is 0..255 and maps to p / 127.5 - 1; a float array whose every value lies in [0, 1] is read as
    [0, 1] images (diffusers' output_type='np') and maps to 2 v - 1; any other float array must lie in
    [-1, 1] (diffmem's and diffusers' model space) and is kept; beyond [-1, 1], NaN or inf is an error.
    uint8 arrays are converted through PIL as files are; float arrays with the same luma and a Lanczos
    resize of each channel as a float image, clipped to [-1, 1]. `conversion` records which rules applied.

    At most MAX_IMAGE_SET_BYTES of float32 are returned; stream larger sets with iter_image_batches."""
    listing = scan_images(path)
    target = _target(listing, size, mode)
    _bounded(len(listing), target.shape, str(listing.source))
    plan = _plan(listing, target)
    x = np.empty((len(listing), *target.shape), dtype=np.float32)
    row = 0
    for names, part in _batches(plan, 1024):
        x[row : row + len(names)] = part
        row += len(names)
    return ImageSet(x, listing.names, str(listing.source), listing.native_size, listing.native_mode, plan.conversion)


def iter_image_batches(
    path: str | os.PathLike, *, size: int | None, mode: str | None, batch: int = 1024
) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(names, float32 (b, C, H, W)) batches of read_images(path, size=size, mode=mode), in order, holding
    one batch of a folder at a time (an .npz is loaded whole, within read_npz's bound). The folder is
    scanned and size and mode are checked now; images are decoded as the batches are drawn."""
    batch = _count(batch, "batch")
    listing = scan_images(path)
    return _batches(_plan(listing, _target(listing, size, mode)), batch)


_NPZ_NAME = re.compile(r"npz\[(\d+)\]")


def read_image_files(
    root: str | os.PathLike, names: Sequence[str], *, size: int | None, mode: str | None
) -> np.ndarray:
    """Just the listed images of a folder (names relative to it, as scan_images gives them) or of an .npz
    ('npz[i]'), as float32 (n, C, H, W) converted by read_images' rules: for a few images of a large set,
    e.g. a figure. mode=None is the native mode of the listed images, size=None their shared size."""
    root = Path(root)
    if isinstance(names, str) or not len(names):
        raise ValueError("names must be a non-empty list of image names, e.g. ['cat/0001.png'] or ['npz[3]']")
    if root.is_file() and root.suffix.lower() == ".npz":
        listing = scan_images(root)
        rows = []
        for name in names:
            m = _NPZ_NAME.fullmatch(str(name))
            if m is None or int(m.group(1)) >= len(listing):
                raise ValueError(f"{name!r} names no image of {root}: use 'npz[i]' with 0 <= i < {len(listing)}")
            rows.append(int(m.group(1)))
        return _npz_rows(_plan(listing, _target(listing, size, mode)), np.array(rows))
    if not root.is_dir():
        raise ValueError(f"{root} is neither a folder nor an .npz file: pass the folder the names are relative to")
    top, paths = root.resolve(), []
    for name in names:
        p = root / str(name)
        if (
            Path(str(name)).is_absolute()
            or not p.resolve().is_relative_to(top)
            or p.suffix.lower() not in IMAGE_SUFFIXES
            or not p.is_file()
        ):
            raise ValueError(f"{name!r} is not an image file inside {root}: pass paths relative to the folder")
        paths.append(p)
    headers = [_header(p) for p in paths]
    listing = ImageListing(
        source=root,
        kind="folder",
        names=tuple(str(n) for n in names),
        sizes=tuple(s for s, _ in headers),
        modes=tuple(m for _, m in headers),
        native_size=headers[0][0] if len({s for s, _ in headers}) == 1 else None,
        native_mode=_native_mode([m for _, m in headers]),
        key="",
    )
    target = _target(listing, size, mode)
    _bounded(len(paths), target.shape, str(root))
    return _uint8_to_float(np.stack([_decode(p, target) for p in paths]))


def convert_images(x, *, size: int | None, mode: str | None) -> tuple[np.ndarray, dict]:
    """In-memory float images (N, C, H, W) in [-1, 1] (a numpy array or CPU tensor, e.g. samples of a model
    whose resolution differs from its training images) converted by read_images' rules for floats: RGB -> L
    by the luma 0.299 R + 0.587 G + 0.114 B, L -> RGB replicated, resize of the shorter side to size
    (Lanczos on each channel) with a centre crop, clipped to [-1, 1]. Returns float32 and the record."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape, default=0) < 1:
        raise ValueError(
            f"convert_images needs a float array of shape (N, C, H, W) with C = 1 or 3, got {x.dtype} {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError("convert_images: the images hold NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 or hi > 1:
        raise ValueError(f"convert_images: values lie in [{lo:.4g}, {hi:.4g}], outside [-1, 1]; clip them first")
    size, mode = _size(size), _mode(mode) or ("L" if x.shape[1] == 1 else "RGB")
    if size is not None:
        problem = _header_problem(x.shape[3], x.shape[2], size)
        if problem is not None:
            raise ValueError(f"convert_images: each image {problem}")
    c, h, w = (1 if mode == "L" else 3), *(x.shape[2:] if size is None else (size, size))
    target = _Target(mode, (c, h, w), size)
    _bounded(len(x), target.shape, "convert_images")
    record = _record(
        "array",
        "NCHW",
        VALUES_SYMMETRIC,
        ["L" if x.shape[1] == 1 else "RGB"],
        target,
        [x.shape[2:]],
        RESIZE_FLOAT,
        MODE_FLOAT,
    )
    return _convert_float(x.astype(np.float32), target), record


# --- embeddings and their cache ------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """$DIFFMEM_CACHE if set, else ~/.cache/diffmem."""
    env = os.environ.get("DIFFMEM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "diffmem"


def embedding_key(content_key: str, embedding_id: str, shape: tuple[int, int, int], mode: str) -> str:
    """The cache key of an embedding: the images' content key, the embedding's id, the (C, H, W) and mode
    the images were converted to, and CACHE_FORMAT."""
    return canonical_json_hash(
        {"format": CACHE_FORMAT, "content": content_key, "embedding": embedding_id, "shape": list(shape), "mode": mode}
    )


class EmbeddingCache:
    """Embeddings on disk under root/embeddings: <key>.npy (float32 (N, E), opened memory-mapped and
    read-only) and <key>.json (names, shape, embedding id, size, mode, created). The .npy is written
    through a memory map into a temporary file and renamed when complete, then the .json; an entry
    exists once its .json does. An unreadable or inconsistent entry is recomputed with a CacheWarning."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_root()
        self.directory = self.root / "embeddings"

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    def paths(self, key: str) -> tuple[Path, Path]:
        """(<key>.npy, <key>.json)."""
        return self.directory / f"{key}.npy", self.directory / f"{key}.json"

    def load(self, key: str, names: Sequence[str] | None = None) -> tuple[np.memmap, dict] | None:
        """(vectors, record) of key: the vectors read-only and memory-mapped, the record its .json; None when
        there is no entry. An entry whose .json or .npy is unreadable, or disagrees with itself or with
        names, warns (CacheWarning) and gives None."""
        npy, meta_path = self.paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = _read_meta(meta_path)
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                raise ValueError("it was written for another key or format")
            shape = tuple(meta["shape"])
            if not isinstance(meta.get("conversion"), dict):
                raise ValueError("its .json lacks the conversion record")
            if names is not None and meta["names"] != list(names):
                raise ValueError("its names differ from the images'")
            vectors = np.load(npy, mmap_mode="r", allow_pickle=False)
            if vectors.dtype != np.float32 or vectors.shape != shape:
                raise ValueError(f".npy holds {vectors.dtype} {vectors.shape}, the .json says float32 {shape}")
        except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            entry = meta_path.with_suffix("")
            warnings.warn(f"embedding cache entry {entry} is unreadable ({reason}); recomputing it", CacheWarning, 3)
            return None
        return vectors, meta

    def writable(self) -> None:
        """Create the cache directory, or raise a ValueError saying why it cannot be written."""
        hint = "pass another cache root or set DIFFMEM_CACHE"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"cannot create the embedding cache directory {self.directory}: {e.strerror}; {hint}"
            ) from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ValueError(f"the embedding cache directory {self.directory} is not writable; {hint}")


def _read_meta(path: Path) -> dict:
    meta = json.loads(path.read_bytes())
    if not isinstance(meta, dict):
        raise ValueError("its .json is not an object")
    return meta


def _create(cache: EmbeddingCache, key: str, n: int, dim: int) -> tuple[np.memmap, Path]:
    """A float32 (n, dim) .npy memory map in a temporary file of the cache directory, named so that
    concurrent writers never share one."""
    tmp = cache.directory / f".{key}.{secrets.token_hex(8)}.npy.tmp"
    try:
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim)), tmp
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write the embedding cache entry {tmp}: {e.strerror}") from None


def _commit(cache: EmbeddingCache, key: str, vectors: np.memmap, tmp: Path, meta: dict) -> np.memmap:
    """Flush the finished .npy, rename it into place, then write its .json; the entry read back."""
    npy, meta_path = cache.paths(key)
    try:
        vectors.flush()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, npy)
    except OSError as e:
        raise ValueError(f"cannot write the embedding cache entry {npy}: {e.strerror}") from None
    write_json_atomic(meta_path, meta)
    return np.load(npy, mmap_mode="r", allow_pickle=False)


def _rows(out, b: int, dim: int | None, embedding_id: str) -> np.ndarray:
    """embed's output for a batch of b images as float32 (b, E), checked."""
    if isinstance(out, Tensor):
        v = out.detach().to("cpu", torch.float32).numpy()
    else:
        v = np.asarray(out, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] != b or v.shape[1] < 1 or (dim is not None and v.shape[1] != dim):
        raise ValueError(
            f"embed ({embedding_id}) returned shape {tuple(v.shape)} for a batch of {b} images; it must return "
            "(b, E) with the same E >= 1 for every batch"
        )
    if not np.isfinite(v).all():
        raise ValueError(f"embed ({embedding_id}) returned NaN or infinite values")
    return v


def embed_images(
    path: str | os.PathLike,
    embed: Callable[[Tensor], Tensor],
    embedding_id: str,
    *,
    size: int | None,
    mode: str | None,
    cache: EmbeddingCache | None = None,
    batch: int = 1024,
    progress: bool = True,
) -> Embedded:
    """embed applied to the images of a folder or .npz (read as read_images(path, size=size, mode=mode)),
    batch images at a time: float32 (N, E), one row per image in the listing's order.

    embed maps a float32 CPU tensor (b, C, H, W) in [-1, 1] to (b, E) (it moves data to its device
    itself) and runs under torch.no_grad(); embedding_id names it (e.g. 'pixel', 'lpips-vgg-<weights
    sha>') and enters the cache key with the content key, the output shape and mode, and CACHE_FORMAT.
    With a cache, an unchanged set is read back memory-mapped without decoding or embedding anything
    (cached=True); otherwise the rows are written straight into the cache's memory map, so a folder is
    embedded in O(batch) memory. Without a cache the vectors are an in-memory array."""
    start = time.perf_counter()
    if not callable(embed):
        raise ValueError("embed must be a callable mapping a float32 tensor (b, C, H, W) to a tensor (b, E)")
    if not isinstance(embedding_id, str) or not embedding_id.strip():
        raise ValueError(f"embedding_id must be a non-empty string naming the embedding, got {embedding_id!r}")
    if cache is not None and not isinstance(cache, EmbeddingCache):
        raise ValueError(f"cache must be an EmbeddingCache or None, got {type(cache).__name__}")
    batch = _count(batch, "batch")
    listing = scan_images(path)
    target = _target(listing, size, mode)
    key = embedding_key(listing.key, embedding_id, target.shape, target.mode)
    native = (listing.native_size, listing.native_mode)
    if cache is not None:
        hit = cache.load(key, listing.names)
        if hit is not None:
            vectors, meta = hit
            seconds = time.perf_counter() - start
            return Embedded(vectors, listing.names, key, True, seconds, *native, meta["conversion"])
        cache.writable()  # before any work
    plan = _plan(listing, target)
    n, out, tmp, row = len(listing), None, None, 0
    try:
        bar = tqdm(total=n, desc=f"embed {embedding_id}", unit="img", disable=not progress)
        with bar, torch.no_grad():
            for names, x in _batches(plan, batch):
                dim = None if out is None else out.shape[1]
                v = _rows(embed(torch.from_numpy(x)), len(names), dim, embedding_id)  # (b, E)
                if out is None and cache is None:
                    out = np.empty((n, v.shape[1]), np.float32)
                elif out is None:
                    out, tmp = _create(cache, key, n, v.shape[1])
                out[row : row + len(names)] = v
                row += len(names)
                bar.update(len(names))
        if cache is None:
            out.setflags(write=False)
        else:
            meta = {
                "format": CACHE_FORMAT,
                "key": key,
                "content": listing.key,
                "source": str(listing.source),
                "names": list(listing.names),
                "shape": list(out.shape),
                "dtype": "float32",
                "embedding_id": embedding_id,
                "size": list(target.shape[1:]),
                "mode": target.mode,
                "conversion": plan.conversion,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "diffmem": VERSION,
            }
            out = _commit(cache, key, out, tmp, meta)
            tmp = None
    finally:
        if tmp is not None:  # an error (or an interrupt) part-way: no entry is left behind
            tmp.unlink(missing_ok=True)
    return Embedded(out, listing.names, key, False, time.perf_counter() - start, *native, plan.conversion)
