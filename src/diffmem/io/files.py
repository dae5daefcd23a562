"""Run directories and safe writes: every run gets a new numbered directory, files are written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target."""
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
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ValueError(f"cannot write {path}: {e.strerror} (the previous file, if any, is unchanged)") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
