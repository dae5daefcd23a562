"""Run directories and safe writes: every run gets a new numbered directory, files are written
atomically (CSV, JSON, bytes), logs are append-only JSON lines, and settings are fingerprinted by
the hash of their canonical JSON. npz archives are read back by read_npz, which bounds what it
allocates before allocating it and never unpickles."""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import io
import json
import math
import os
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _installed_version() -> str:
    try:
        return importlib.metadata.version("diffmem")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _installed_version()  # the installed diffmem, recorded with what a study writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp alone gives 0600


def new_run_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """Create and return parent/prefix-NNNNN with the next free number; existing runs are never reused."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output directory {parent}: {e.strerror}") from None
    taken = [int(p.name.rsplit("-", 1)[1]) for p in parent.glob(f"{prefix}-*") if p.name.rsplit("-", 1)[1].isdigit()]
    number = max(taken, default=0) + 1
    while True:
        path = parent / f"{prefix}-{number:05d}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1
        except OSError as e:
            raise ValueError(f"cannot create a run directory in {parent}: {e.strerror}") from None


def prepare_out_dir(out: str | os.PathLike | None, prefix: str) -> Path:
    """The user's --out directory (created if needed, must be writable), or a new numbered one here."""
    if out is None:
        return new_run_dir(Path.cwd(), prefix)
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output directory {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"the output directory {path} is not writable")
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> bool:
    """Write to a temporary file in the same directory, fsync, then rename over the target: the file
    is complete or unchanged, whatever happens. exclusive=True links instead, so an existing file is
    never replaced; returns whether the file was written (False: it existed)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        if not exclusive:
            os.replace(tmp, path)
            return True
        os.link(tmp, path)  # fails on an existing name
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror} (the previous file, if any, is unchanged)") from e
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_npz_atomic(path: str | os.PathLike, **arrays: Any) -> None:
    """Arrays as an uncompressed npz (no object arrays: it loads with allow_pickle=False), written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(a) for name, a in arrays.items()})
    write_bytes_atomic(path, buf.getvalue())


MAX_ARRAY_BYTES = 8 * 2**30  # read_npz's default limit on the bytes of all arrays of one archive (8 GiB)
_CHUNK = 2**24  # array data is copied out of the zip 16 MiB at a time, so reading never holds it twice
_NATIVE, _SWAPPED = ("<", ">") if sys.byteorder == "little" else (">", "<")


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from the .npy header at f's position (versions 1.0 and 2.0), leaving
    f at the array's data; nothing is unpickled. A malformed header is a ValueError."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")


class PickledArrayError(ValueError):
    """An npz member holding Python objects (dtype object), which only unpickling could read."""


def _size(n: int) -> str:
    """n bytes in a readable unit (e.g. 7.28 TiB)."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def read_npz(
    path: str | os.PathLike, *, max_bytes: int = MAX_ARRAY_BYTES, what: str = "npz file"
) -> dict[str, np.ndarray]:
    """The arrays of an .npz archive (numpy.savez or savez_compressed), in native byte order.

    Each member's .npy header is read before its data, and nothing is allocated unless the header
    declares a plain (non-object) dtype whose shape x itemsize is exactly the member's size in the
    zip and, summed over the archive, at most max_bytes (default MAX_ARRAY_BYTES, 8 GiB). So a
    300-byte file declaring a 7 TiB array, a pickle, or a compressed bomb is refused with a one-line
    ValueError (PickledArrayError for object arrays) instead of a MemoryError or an unpickle; a
    missing, truncated or corrupt file, or a .npy passed as an .npz, gets a message too. `what`
    names the file in the message for a missing one (e.g. 'patterns file')."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(6)
            archive = zipfile.ZipFile(f)
            with archive:
                return _read_members(path, archive, max_bytes)
    except FileNotFoundError:
        raise ValueError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory, not an .npz archive") from None
    except zipfile.BadZipFile as e:
        if head.startswith(b"\x93NUMPY"):
            raise ValueError(f"{path} is a .npy file, not an .npz archive; save it with numpy.savez") from None
        if head[:1] == b"\x80":  # pickle protocol 2 and above
            raise ValueError(
                f"{path} holds pickled data, not an .npz archive; diffmem refuses to load it because unpickling "
                "can execute code; save plain numeric arrays with numpy.savez"
            ) from None
        raise _unreadable(path, str(e)) from None
    except (OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as e:
        # truncated or corrupt member data, an unsupported zip feature, an encrypted member
        raise _unreadable(path, f"{type(e).__name__}: {e}") from None


def _unreadable(path: Path, reason: str) -> ValueError:
    return ValueError(f"cannot read {path}: not a readable npz file ({reason})")


def _read_members(path: Path, archive: zipfile.ZipFile, max_bytes: int) -> dict[str, np.ndarray]:
    budget, arrays = max_bytes, {}
    for info in archive.infolist():
        name = info.filename.removesuffix(".npy")
        if not info.filename.endswith(".npy"):
            raise _unreadable(path, f"member {info.filename!r} is not a .npy array")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # bzip2 and lzma members could decompress without bound in one read; numpy never writes them
            raise _unreadable(path, f"member {info.filename!r} is compressed with zip method {info.compress_type}")
        with archive.open(info) as f:
            try:
                shape, fortran, dtype = read_npy_header(f)
            except ValueError as e:
                raise _unreadable(path, f"array {name!r}: {e}") from None
            if dtype.hasobject:
                raise PickledArrayError(
                    f"{path} holds pickled data (array {name!r} has dtype {dtype}), which diffmem refuses to load "
                    "because unpickling can execute code; save plain numeric arrays with numpy.savez"
                )
            count = math.prod(shape)
            nbytes = count * dtype.itemsize  # what the header declares, before anything is allocated
            if min(shape, default=0) < 0 or (dtype.itemsize == 0 and count):
                raise _unreadable(path, f"array {name!r} declares shape {shape} of {dtype}")
            if nbytes > budget:
                raise ValueError(
                    f"{path}: array {name!r} declares shape {shape} of {dtype}, {_size(nbytes)}, more than the "
                    f"{_size(max_bytes)} read_npz allows for one archive (MAX_ARRAY_BYTES, or max_bytes)"
                )
            held = info.file_size - f.tell()
            if held != nbytes:
                state = "truncated" if held < nbytes else "longer than its header says"
                raise _unreadable(
                    path, f"array {name!r} is {state}: shape {shape} of {dtype} needs {nbytes} bytes, it holds {held}"
                )
            budget -= nbytes
            buf = np.empty(nbytes, dtype=np.uint8)
            done = 0
            while done < nbytes:
                chunk = f.read(min(_CHUNK, nbytes - done))
                if not chunk:
                    raise _unreadable(path, f"array {name!r} is truncated")
                buf[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                done += len(chunk)
            f.read(1)  # reach the member's end, where zipfile checks its CRC
        flat = buf.view(dtype) if nbytes else np.empty(count, dtype=dtype)
        arr = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
        if dtype.byteorder == _SWAPPED:  # big-endian data on a little-endian machine, or the reverse
            arr = arr.byteswap(inplace=True).view(dtype.newbyteorder(_NATIVE))
        elif not dtype.isnative:  # a structured dtype with swapped fields
            arr = arr.astype(dtype.newbyteorder(_NATIVE))
        arrays[name] = arr
    return arrays


def write_csv_atomic(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    lineterminator: str = "\r\n",
) -> None:
    """Rows as CSV with a header, written atomically.

    columns=None: the first row's keys, every row must have exactly those, and no rows give an empty
    file. columns given: the header in that order even without rows; keys not in columns are left out.
    lineterminator: CRLF (the csv module's default) or LF, as the file's readers expect."""
    buf = io.StringIO()
    if columns is not None or rows:
        writer = csv.DictWriter(
            buf,
            fieldnames=list(rows[0] if columns is None else columns),
            extrasaction="raise" if columns is None else "ignore",
            lineterminator=lineterminator,
        )
        writer.writeheader()
        writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line with O_APPEND and fsync. The line goes out in a single write, so
    concurrent writers do not interleave; a line cut short by a crash is ended before the new one."""
    path = Path(path)
    if not isinstance(record, dict):
        raise ValueError(f"a metrics record must be a dict, got {type(record).__name__}")
    data = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, _FILE_MODE)
    except OSError as e:
        raise ValueError(f"cannot append to {path}: {e.strerror}") from e
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # the fragment stays as it is (lines are never rewritten) and read_jsonl skips it
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except OSError as e:
        raise ValueError(f"cannot append to {path}: {e.strerror}; the lines already there are unchanged") from e
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of an append-only log, oldest first; [] when the file does not exist.

    Each complete line is written whole, so a line that does not parse is the fragment of a line
    cut short by a crash (the last one, or one that a later append ended); it is skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    records = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def canonical_json_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of obj (sorted keys, no spaces, ASCII): equal data, equal hash."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"cannot fingerprint {type(obj).__name__}: {e}; pass plain JSON data "
            "(dict, list, str, int, finite float, bool, None)"
        ) from None
    return hashlib.sha256(text.encode()).hexdigest()
