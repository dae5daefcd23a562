"""Patterns out of core: a memory of millions of patterns written once into .npy shards and read memory-mapped.

    store = PatternStore.create("xi", patterns)             # a tensor or array (K, *event), or batches of one
    store = PatternStore.from_dataset("xi", "mnist", root="data/mnist")
    store = PatternStore.from_image_folder("xi", "images/", size=32, mode="RGB")
    store = PatternStore.open("xi")                          # later: memory-mapped, nothing read yet
    den = EmpiricalDenoiser(store)                           # the exact denoiser, streamed over the shards

A store is a directory: manifest.json and shard-00000.npy, shard-00001.npy, ... Each shard is a plain
C-order .npy of shape (rows, D) in float32 or float16 (half the disk and page cache; values rounded to
11 significant bits) whose header is padded to 128 bytes. The manifest holds K, D, the event shape,
the storage dtype, each shard's rows and sha256 and a content hash of the whole set: sha256 over
"diffmem-patterns/1 STORAGE K D" and the sha256 of all data bytes in row order, so it does not depend
on how the rows are sharded. A store is written into a temporary directory and renamed into place
when complete: it is never seen half-written and never overwritten.

Reading: PatternStore implements the core's PatternSource protocol. chunks(n) yields (offset, (n, D))
blocks in the read dtype (float32 by default, float16 storage converted block by block, so sums
accumulate in float32 at least); a block that lies in one float32 shard is a zero-copy view of a
private (copy-on-write) mapping, and pages already read are released (madvise DONTNEED), so the
resident memory of a pass stays O(chunk) whatever K is. Nothing is unpickled: shard headers are
parsed and checked against the manifest, and an object dtype is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmem.core._checks import check_positive_int
from diffmem.io.data import load_dataset
from diffmem.io.files import VERSION, read_npy_header, write_json_atomic
from diffmem.io.images import iter_image_batches

STORE_FORMAT = "diffmem-pattern-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = ("float32", "float16")
READ_DTYPES = (torch.float32, torch.float64)
VERIFY_MODES = ("quick", "full")  # quick: manifest, files, headers and sizes; full: also every hash
SHARD_BYTES = 64 * 2**20  # default shard size: 64 MiB, e.g. 262,144 patterns of D = 64 in float32
_HEADER_BYTES = 128  # every shard's .npy header, padded: the data starts at a fixed, aligned offset
_WRITE_ELEMENTS = 2**22  # values converted at a time while writing (16 MiB of float32)
_HASH_BYTES = 2**24  # bytes hashed at a time
_DESCR = {"float32": "<f4", "float16": "<f2"}
_PAGE = mmap.PAGESIZE


def _content_hash(storage: str, k: int, d: int, data_sha256: str) -> str:
    return hashlib.sha256(f"diffmem-patterns/1 {storage} {k} {d} {data_sha256}".encode()).hexdigest()


def _npy_header(rows: int, dim: int, storage: str) -> bytes:
    """A .npy 1.0 header for a C-order (rows, dim) array, padded to exactly _HEADER_BYTES."""
    text = repr({"descr": _DESCR[storage], "fortran_order": False, "shape": (rows, dim)}).encode("latin1")
    pad = _HEADER_BYTES - 10 - len(text) - 1
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10) + text + b" " * pad + b"\n"


def _pickle_refused(path: Path, why: str) -> ValueError:
    return ValueError(
        f"{path} holds pickled data ({why}), which diffmem refuses to load because unpickling can execute code; "
        "rebuild the pattern store from its source"
    )


def _read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of a .npy file, parsed without unpickling anything."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            f.seek(0)
            if head[:1] == b"\x80":  # pickle protocol 2 and above
                raise _pickle_refused(path, "a pickle stream, not an .npy array")
            try:
                shape, fortran, dtype = read_npy_header(f)
            except ValueError as e:
                if "pickled data" in str(e):
                    raise
                raise ValueError(
                    f"shard {path} is corrupt: not a readable .npy file ({e}); rebuild the store"
                ) from None
            return shape, dtype, fortran, f.tell()
    except FileNotFoundError:
        raise ValueError(f"shard {path} is missing; the pattern store is incomplete: rebuild it") from None
    except IsADirectoryError:
        raise ValueError(f"shard {path} is a directory, not an .npy file; rebuild the pattern store") from None


@dataclass(frozen=True)
class PatternShard:
    """One shard: rows offset .. offset + num_patterns - 1 of its store, itself a PatternSource (offsets
    local to the shard). Plain data, so it pickles cheaply to a worker that sees the same filesystem."""

    path: str  # the .npy file
    offset: int  # its first row in the whole store
    num_patterns: int  # its rows
    dim: int
    storage: str  # 'float32' or 'float16' on disk
    sha256: str  # of its data bytes (the .npy payload after the header)
    read_dtype: str = "float32"  # the dtype of the blocks it hands out

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.read_dtype)

    def check(self) -> int:
        """Check the file against the manifest (header, dtype, shape, size); return the data's byte offset."""
        path = Path(self.path)
        shape, dtype, fortran, start = _read_header(path)
        if dtype.hasobject:
            raise _pickle_refused(path, f"dtype {dtype}")
        expected = np.dtype(_DESCR[self.storage])
        if dtype != expected or fortran or tuple(shape) != (self.num_patterns, self.dim):
            raise ValueError(
                f"shard {path} holds a {'Fortran-order ' if fortran else ''}{dtype} array of shape {tuple(shape)}, "
                f"but the manifest says {self.storage} ({self.num_patterns}, {self.dim}); the store is corrupt: "
                "rebuild it"
            )
        size, need = path.stat().st_size, start + self.num_patterns * self.dim * expected.itemsize
        if size != need:
            state = "truncated" if size < need else "longer than its header says"
            raise ValueError(
                f"shard {path} is {state} ({size} bytes, {need} expected); the store is corrupt: rebuild it"
            )
        return start

    def _open(self) -> tuple[mmap.mmap, np.ndarray, int]:
        """A private copy-on-write mapping of the shard (writes never reach the file), its (rows, D) array
        and the byte offset of the data in the file."""
        start = self.check()
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        mm.madvise(mmap.MADV_SEQUENTIAL)
        count = self.num_patterns * self.dim
        arr = np.frombuffer(mm, dtype=np.dtype(_DESCR[self.storage]), count=count, offset=start)
        return mm, arr.reshape(self.num_patterns, self.dim), start

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, Tensor]]:
        """(offset within the shard, (c, D) block) pairs, c = chunk_size except the last."""
        yield from _blocks([self], chunk_size, self.dtype)

    def _hash_into(self, *hashes) -> None:
        """Feed the shard's data bytes, read from disk now, to every hash."""
        mm, arr, start = self._open()
        flat = arr.reshape(-1).view(np.uint8)
        for a in range(0, len(flat), _HASH_BYTES):
            for h in hashes:
                h.update(flat[a : a + _HASH_BYTES])
            _release(mm, start + a, start + a + _HASH_BYTES)


def _to_block(parts: list[np.ndarray], dtype: torch.dtype, *, copy: bool = False) -> Tensor:
    """One (c, D) tensor from row ranges of mapped shards: a zero-copy view when possible (unless copy),
    else one copy (torch converts float16 to float32 or float64 exactly, and faster than numpy)."""
    views = [torch.from_numpy(p) for p in parts]
    if len(views) == 1 and views[0].dtype == dtype and not copy:
        return views[0]
    out = torch.empty(sum(len(v) for v in views), views[0].shape[1], dtype=dtype)
    row = 0
    for v in views:
        out[row : row + len(v)].copy_(v)
        row += len(v)
    return out


def _release(mm: mmap.mmap, start: int, stop: int) -> None:
    """Drop the whole pages inside bytes [start, stop) of a private mapping from this process's memory
    (MADV_DONTNEED): they were read and are unmodified, so a later access reads the file (page cache) again."""
    a = -(-start // _PAGE) * _PAGE
    b = min(stop, len(mm)) // _PAGE * _PAGE
    if b > a:
        mm.madvise(mmap.MADV_DONTNEED, a, b - a)


def _blocks(shards: list[PatternShard], chunk_size: int, dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    """(offset, (c, D) block) over consecutive shards, c = chunk_size except the last, blocks spanning shards."""
    check_positive_int(chunk_size, "chunk_size")
    emitted, parts, need = 0, [], chunk_size
    for shard in shards:
        mm, arr, base = shard._open()
        row_bytes = shard.dim * arr.itemsize
        pos = 0
        while pos < len(arr):
            take = min(need, len(arr) - pos)
            parts.append(arr[pos : pos + take])
            pos, need = pos + take, need - take
            if need == 0:
                block = _to_block(parts, dtype)
                parts, need = [], chunk_size
                yield emitted, block
                emitted += block.shape[0]
                del block
                _release(mm, base + (pos - take) * row_bytes, base + pos * row_bytes)
        del arr
    if parts:
        yield emitted, _to_block(parts, dtype)


class PatternStore:
    """K patterns of dimension D in .npy shards on disk, read memory-mapped (see the module docstring).

    Open one with PatternStore.open(path); write one with create, from_dataset or from_image_folder.
    It is a PatternSource: DenseAM(store), EmpiricalDenoiser(store) and knn(queries, store) stream it.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], dtype: torch.dtype):
        self.path = path
        self.num_patterns: int = manifest["num_patterns"]
        self.dim: int = manifest["dim"]
        self.event_shape: tuple[int, ...] = tuple(manifest["event_shape"])
        self.storage: str = manifest["storage"]  # 'float32' or 'float16' on disk
        self.dtype: torch.dtype = dtype  # of the blocks handed out
        self.content_hash: str = manifest["content_sha256"]
        self.source_info: dict = manifest.get("source", {})  # what the store was written from
        name = str(dtype).removeprefix("torch.")
        shards, offset = [], 0
        for s in manifest["shards"]:
            shards.append(
                PatternShard(str(path / s["file"]), offset, s["rows"], self.dim, self.storage, s["sha256"], name)
            )
            offset += s["rows"]
        self.shards: tuple[PatternShard, ...] = tuple(shards)

    def __repr__(self) -> str:
        return (
            f"PatternStore({str(self.path)!r}, K={self.num_patterns}, D={self.dim}, storage={self.storage}, "
            f"dtype={self.dtype}, shards={len(self.shards)})"
        )

    @property
    def nbytes(self) -> int:
        """Bytes of pattern data on disk."""
        return self.num_patterns * self.dim * np.dtype(_DESCR[self.storage]).itemsize

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, Tensor]]:
        """(offset, (c, D) block) in order, c = chunk_size except the last; blocks may span shards."""
        return _blocks(list(self.shards), chunk_size, self.dtype)

    def read(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows start..stop-1 as one (stop - start, D) tensor in the read dtype (for a few rows: a figure, a test)."""
        stop = self.num_patterns if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.num_patterns):
            raise ValueError(f"rows [{start}, {stop}) are not a non-empty range inside [0, {self.num_patterns})")
        parts = []
        for shard in self.shards:
            a, b = max(start, shard.offset), min(stop, shard.offset + shard.num_patterns)
            if a < b:
                _, arr, _ = shard._open()
                parts.append(arr[a - shard.offset : b - shard.offset])
        return _to_block(parts, self.dtype, copy=True)  # never a view of the mapping

    def verify(self) -> None:
        """Re-hash every shard and the whole set against the manifest (reads all data); ValueError on a mismatch."""
        data = hashlib.sha256()
        for shard in self.shards:
            h = hashlib.sha256()
            shard._hash_into(h, data)
            if h.hexdigest() != shard.sha256:
                raise ValueError(
                    f"shard {shard.path} does not match the hash in the manifest: the file was changed or is corrupt; "
                    "rebuild the pattern store from its source"
                )
        if _content_hash(self.storage, self.num_patterns, self.dim, data.hexdigest()) != self.content_hash:
            raise ValueError(
                f"the pattern store {self.path} does not match its content hash: the manifest was edited; rebuild it"
            )

    # -- opening ------------------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, verify: str = "quick"
    ) -> PatternStore:
        """Open a store memory-mapped. dtype: the blocks' dtype (float32 or float64). verify: 'quick' checks the
        manifest, every shard's presence, .npy header and size (no data read); 'full' also re-hashes all data."""
        if dtype not in READ_DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64 (the blocks' dtype), got {dtype}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"unknown verify mode {verify!r}; choose one of {VERIFY_MODES}")
        path = Path(path)
        manifest = _read_manifest(path)
        store = cls(path, manifest, dtype)
        for shard in store.shards:
            shard.check()
        if verify == "full":
            store.verify()
        return store

    # -- writing ------------------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        patterns: Tensor | np.ndarray | Iterable[Tensor | np.ndarray],
        *,
        storage: str = "float32",
        shard_rows: int | None = None,
        source: dict | None = None,
    ) -> PatternStore:
        """Write patterns once into a new store at path and open it (float32 blocks).

        patterns: a tensor or array (K, *event_shape), or an iterable of such batches (b, *event_shape)
        with one event shape, read one batch at a time (so K may exceed memory). storage: 'float32' or
        'float16' on disk. shard_rows: rows per shard (default: 64 MiB shards). source: a JSON-able
        description of where the patterns came from, kept in the manifest."""
        if storage not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage {storage!r}; choose one of {STORAGE_DTYPES}")
        if shard_rows is not None:
            check_positive_int(shard_rows, "shard_rows")
        try:
            json.dumps(source or {}, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"source must be plain JSON data (a description of the patterns' origin): {e}") from None
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"{path} already exists; a pattern store is written once: choose a new path or delete it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        except OSError as e:
            raise ValueError(f"cannot create the pattern store {path}: {e.strerror}") from None
        try:
            batches = [patterns] if isinstance(patterns, Tensor | np.ndarray) else patterns
            manifest = _write_shards(tmp, batches, storage, shard_rows)
            manifest["source"] = source or {}
            write_json_atomic(tmp / MANIFEST, manifest)
            _fsync_dir(tmp)
            try:
                os.replace(tmp, path)  # atomic; fails on a non-empty directory that appeared meanwhile
            except OSError as e:
                raise ValueError(
                    f"cannot move the finished store to {path}: {e.strerror}; nothing was written"
                ) from None
            _fsync_dir(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path)

    @classmethod
    def from_dataset(
        cls,
        path: str | os.PathLike,
        name: str,
        *,
        root: str | os.PathLike | None = None,
        storage: str = "float32",
        shard_rows: int | None = None,
        **options,
    ) -> PatternStore:
        """A store of the examples of diffmem.io.data.load_dataset(name, root=root, **options), with the
        dataset's image shape as event shape (the dataset itself is loaded in memory once, as load_dataset does)."""
        ds = load_dataset(name, root=root, **options)
        step = max(1, _WRITE_ELEMENTS // ds.x.shape[1])
        batches = (ds.x[a : a + step].reshape(-1, *ds.image_shape) for a in range(0, len(ds), step))
        info = {"dataset": name, "root": None if root is None else str(root), "options": options}
        return cls.create(path, batches, storage=storage, shard_rows=shard_rows, source=info)

    @classmethod
    def from_image_folder(
        cls,
        path: str | os.PathLike,
        images: str | os.PathLike,
        *,
        size: int | None = None,
        mode: str | None = None,
        storage: str = "float32",
        shard_rows: int | None = None,
        batch: int = 1024,
    ) -> PatternStore:
        """A store of the images of a folder (or .npz) as diffmem.io.images.iter_image_batches reads them:
        float32 in [-1, 1], (C, H, W) each, decoded `batch` images at a time (the folder never sits in memory)."""
        batches = (x for _, x in iter_image_batches(images, size=size, mode=mode, batch=batch))
        info = {"image_folder": str(images), "size": size, "mode": mode}
        return cls.create(path, batches, storage=storage, shard_rows=shard_rows, source=info)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_array(batch: Tensor | np.ndarray, index: int) -> np.ndarray:
    """A batch of patterns as a numpy array of real numbers, (b, *event)."""
    if isinstance(batch, Tensor):
        if batch.is_complex() or batch.dtype == torch.bool:
            raise ValueError(f"batch {index} of the patterns is a {batch.dtype} tensor; patterns must be real numbers")
        batch = batch.detach().to("cpu", torch.float32 if batch.dtype == torch.bfloat16 else batch.dtype).numpy()
    if not isinstance(batch, np.ndarray):
        raise ValueError(f"batch {index} of the patterns is a {type(batch).__name__}; pass tensors or numpy arrays")
    if batch.dtype.hasobject:
        raise ValueError(f"batch {index} of the patterns is an object array; patterns must be plain numbers")
    if batch.dtype.kind not in "fiu":
        raise ValueError(f"batch {index} of the patterns has dtype {batch.dtype}; patterns must be real numbers")
    if batch.ndim < 2 or 0 in batch.shape[1:]:
        raise ValueError(f"batch {index} of the patterns has shape {batch.shape}; expected (b, *event_shape), b >= 0")
    return batch


class _ShardWriter:
    """Appends rows to shard files of shard_rows rows, hashing as it goes; each header is written last."""

    def __init__(self, root: Path, dim: int, storage: str, shard_rows: int):
        self.root, self.dim, self.storage, self.shard_rows = root, dim, storage, shard_rows
        self.shards: list[dict] = []
        self.data = hashlib.sha256()
        self.file = None
        self.rows = 0  # in the open shard

    def add(self, rows: np.ndarray) -> None:
        while len(rows):
            if self.file is None:
                self.file = open(self.root / f"shard-{len(self.shards):05d}.npy", "wb")  # closed in _close
                self.file.write(b"\0" * _HEADER_BYTES)
                self.hash, self.rows = hashlib.sha256(), 0
            take = rows[: self.shard_rows - self.rows]
            data = np.ascontiguousarray(take).view(np.uint8).reshape(-1)
            self.file.write(data)
            self.hash.update(data)
            self.data.update(data)
            self.rows += len(take)
            rows = rows[len(take) :]
            if self.rows == self.shard_rows:
                self._close()

    def _close(self) -> None:
        name = Path(self.file.name).name
        self.file.seek(0)
        self.file.write(_npy_header(self.rows, self.dim, self.storage))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.shards.append({"file": name, "rows": self.rows, "sha256": self.hash.hexdigest()})
        self.file = None

    def finish(self) -> None:
        if self.file is not None:
            self._close()


def _write_shards(root: Path, batches: Iterable, storage: str, shard_rows: int | None) -> dict:
    """Write every batch into shards under root; the manifest without its source."""
    writer, event, k = None, None, 0
    target = np.dtype(_DESCR[storage])
    try:
        for i, batch in enumerate(batches):
            x = _as_array(batch, i)
            if event is None:
                event = tuple(int(s) for s in x.shape[1:])
                dim = math.prod(event)
                rows = shard_rows or max(1, SHARD_BYTES // (dim * target.itemsize))
                writer = _ShardWriter(root, dim, storage, rows)
            elif tuple(x.shape[1:]) != event:
                raise ValueError(
                    f"batch {i} of the patterns has event shape {tuple(x.shape[1:])}, the first had {event}"
                )
            flat = x.reshape(len(x), dim)
            step = max(1, _WRITE_ELEMENTS // dim)
            for a in range(0, len(flat), step):
                part = flat[a : a + step]
                with np.errstate(over="ignore"):  # values beyond float16 become inf: reported below
                    stored = part.astype(target)
                if not np.isfinite(stored).all():
                    bad = k + a + int(np.nonzero(~np.isfinite(stored).all(axis=1))[0][0])
                    if np.isfinite(part).all():
                        raise ValueError(
                            f"pattern {bad} has values beyond the float16 range (|x| > 65504); use storage='float32'"
                        )
                    raise ValueError(f"pattern {bad} contains NaN or Inf values; clean the data before storing it")
                writer.add(stored)
            k += len(x)
        if writer is None or k == 0:
            raise ValueError("there are no patterns to store (K = 0): a pattern store needs at least one")
        writer.finish()
    except BaseException:
        if writer is not None and writer.file is not None:
            writer.file.close()  # the temporary directory is removed by the caller
        raise
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "num_patterns": k,
        "dim": dim,
        "event_shape": list(event),
        "storage": storage,
        "content_sha256": _content_hash(storage, k, dim, writer.data.hexdigest()),
        "shards": writer.shards,
        "diffmem_version": VERSION,
    }


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at path, with its schema checked."""
    file = path / MANIFEST
    if not path.is_dir():
        raise ValueError(f"no pattern store at {path}: not a directory; create one with PatternStore.create")
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{path} is not a pattern store: {MANIFEST} is missing; create one with PatternStore.create"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}; the store is corrupt: rebuild it") from None

    def bad(what: str) -> ValueError:
        return ValueError(f"{file} is not a valid pattern-store manifest: {what}; rebuild the store")

    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise bad(f"its format is not {STORE_FORMAT!r}")
    if manifest.get("version") != STORE_VERSION:
        raise bad(f"version {manifest.get('version')!r}; this diffmem reads version {STORE_VERSION}")
    k, d, event = manifest.get("num_patterns"), manifest.get("dim"), manifest.get("event_shape")
    for key, value in (("num_patterns", k), ("dim", d)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(f"{key} = {value!r}")
    if not isinstance(event, list) or not all(isinstance(s, int) and s >= 1 for s in event) or math.prod(event) != d:
        raise bad(f"event_shape {event!r} does not hold D = {d} values")
    if manifest.get("storage") not in STORAGE_DTYPES:
        raise bad(f"storage {manifest.get('storage')!r}")
    if not isinstance(manifest.get("content_sha256"), str):
        raise bad("the content hash is missing")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("it lists no shards")
    for s in shards:
        ok = (
            isinstance(s, dict)
            and isinstance(s.get("rows"), int)
            and s["rows"] >= 1
            and isinstance(s.get("sha256"), str)
        )
        name = s.get("file") if isinstance(s, dict) else None
        if not ok or not isinstance(name, str) or Path(name).name != name or not name.endswith(".npy"):
            raise bad(f"shard entry {s!r}")
    if sum(s["rows"] for s in shards) != k:
        raise bad(f"its shards hold {sum(s['rows'] for s in shards)} rows, not num_patterns = {k}")
    return manifest
