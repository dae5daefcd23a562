"""Safe checkpoints: tensors in safetensors, everything else in JSON. Loading never executes code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from diffmem.io.files import write_bytes_atomic

MAX_HEADER_BYTES = 100_000_000  # a safetensors header's length; the library's own limit (100 MB) is the same
MAX_JSON_BYTES = 2**30  # checkpoint.json lists the training indices: 10^7 of them take about 90 MB
PICKLE_MESSAGE = (
    "is a pickle-based file (torch.save / pickle). diffmem refuses to load it because unpickling can "
    "execute arbitrary code; convert the weights to safetensors"
)


def looks_like_pickle(head: bytes) -> bool:
    """pickle protocol 2-5 starts with 0x80 and the protocol number; torch.save writes a zip of pickles."""
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file on the CPU, refusing pickles and reporting truncation or corruption."""
    return load_tensors_and_metadata(path)[0]


def load_tensors_and_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, string metadata) of a safetensors file, with the checks of load_tensors.

    The 8-byte header length is checked against the file and MAX_HEADER_BYTES before anything else is
    read; the safetensors library then checks every tensor's offsets against the file's size, so what
    is allocated is bounded by the file itself."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not (0 < n <= MAX_HEADER_BYTES and 8 + n <= size and head[8:9] == b"{"):
        if looks_like_pickle(head):
            raise ValueError(f"{path} {PICKLE_MESSAGE}")
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt header)")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
        return load_file(path, device="cpu"), metadata
    except (SafetensorError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # one line
        raise ValueError(f"{path} is truncated or corrupt: {reason}") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_bytes_atomic(path, data)


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict, refusing a key given twice (json.loads would keep the last silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_json(path: str | os.PathLike) -> dict:
    """The JSON object in path (checkpoint.json and the like). A missing file, one over MAX_JSON_BYTES, a
    pickle, malformed or too deeply nested JSON, a key repeated in one object, or a top level that is not an
    object is a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ValueError(
                f"{path} holds {size:,} bytes, more than the {MAX_JSON_BYTES:,} a JSON file may hold (MAX_JSON_BYTES)"
            )
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if looks_like_pickle(data[:4]):
        raise ValueError(
            f"{path} is a pickle, not JSON; diffmem refuses to load it because unpickling can execute arbitrary code"
        )
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise ValueError(f"{path} repeats the key {e.key!r} in one object; which one counts would be a guess") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (corrupt or truncated?): {e}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        raise ValueError(f"{path} holds {kind} at the top level; expected a JSON object (a mapping of keys to values)")
    return obj


__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
    "PICKLE_MESSAGE",
    "load_json",
    "load_tensors",
    "load_tensors_and_metadata",
    "looks_like_pickle",
    "save_tensors",
]
