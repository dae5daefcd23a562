"""Built-in digits, nested subsets, numbered run directories, atomic writes, append-only logs and
the canonical JSON hash."""

import hashlib
import importlib.metadata
import json
import os
import pickle
import stat

import numpy as np
import pytest
import torch

from diffmem.io.data import circle_points, load_dataset, load_digits, load_patterns_npz, nested_order, nested_subset
from diffmem.io.files import (
    VERSION,
    append_jsonl,
    canonical_json_hash,
    new_run_dir,
    read_jsonl,
    write_csv_atomic,
    write_json_atomic,
)


def test_digits_are_scaled_to_unit_interval():
    d = load_digits()
    assert d.x.shape == (1797, 64) and d.x.dtype == torch.float32 and d.image_shape == (8, 8)
    assert float(d.x.min()) == -1.0 and float(d.x.max()) == 1.0
    assert set(d.labels.tolist()) == set(range(10))
    assert load_digits(dtype=torch.float64).x.dtype == torch.float64


def test_nested_subsets_are_nested_and_seeded():
    small, large = nested_subset(1797, 16, seed=3), nested_subset(1797, 128, seed=3)
    assert set(small.tolist()) <= set(large.tolist()) and len(set(large.tolist())) == 128
    assert torch.equal(small, nested_subset(1797, 16, seed=3))
    assert not torch.equal(small, nested_subset(1797, 16, seed=4))
    assert sorted(nested_order(10, 0).tolist()) == list(range(10))
    with pytest.raises(ValueError, match=r"K=0 must lie in \[1, 10\]"):
        nested_subset(10, 0, 0)
    with pytest.raises(ValueError, match="K=11"):
        nested_subset(10, 11, 0)


def test_run_dirs_are_numbered_and_never_reused(tmp_path):
    a = new_run_dir(tmp_path, "run")
    b = new_run_dir(tmp_path, "run")
    assert (a.name, b.name) == ("run-00001", "run-00002")
    (tmp_path / "run-00007").mkdir()
    assert new_run_dir(tmp_path, "run").name == "run-00008"


def test_atomic_json_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": [1, 2]})
    assert json.loads(path.read_text()) == {"b": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"ok": True})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("diffmem.io.files.os.fsync", disk_full)
    with pytest.raises(ValueError, match="No space left on device.*previous file.*unchanged"):
        write_json_atomic(path, {"new": "data"})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_files_get_ordinary_permissions(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_csv_rows_with_and_without_fixed_columns(tmp_path):
    path = tmp_path / "t.csv"
    rows = [{"K": 4, "loss": 0.5, "note": "a,b"}, {"K": 16, "loss": None, "note": ""}]
    write_csv_atomic(path, rows)  # the header from the first row, the csv module's \r\n
    assert path.read_bytes() == b'K,loss,note\r\n4,0.5,"a,b"\r\n16,,\r\n'
    write_csv_atomic(path, [])
    assert path.read_bytes() == b""
    with pytest.raises(ValueError, match="not in fieldnames"):
        write_csv_atomic(path, [{"K": 4}, {"K": 16, "extra": 1}])
    write_csv_atomic(path, rows, ["note", "K"], lineterminator="\n")  # these columns in this order, others left out
    assert path.read_bytes() == b'note,K\n"a,b",4\n,16\n'
    write_csv_atomic(path, [], ["K", "loss"], lineterminator="\n")
    assert path.read_bytes() == b"K,loss\n"
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_jsonl_log_appends_and_skips_a_line_cut_short(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"step": 1, "loss": 0.5})
    append_jsonl(path, {"step": 2})
    before = path.read_bytes()
    assert before == b'{"step": 1, "loss": 0.5}\n{"step": 2}\n'
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "lo')  # a crash in the middle of a line
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    append_jsonl(path, {"step": 4})
    assert path.read_bytes() == before + b'{"step": 3, "lo\n{"step": 4}\n'  # earlier bytes never rewritten
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 4]

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(ValueError, match=r"cannot append to .*metrics.jsonl: No space left on device; the lines"):
        append_jsonl(path, {"step": 5})
    monkeypatch.undo()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 4]
    with pytest.raises(ValueError, match="must be a dict"):
        append_jsonl(path, [1])


def test_canonical_json_hash_is_the_sha256_of_sorted_compact_ascii_json():
    obj = {"b": [1, 2.5, None, True], "a": {"y": "\u00e9", "x": 0}}
    text = '{"a":{"x":0,"y":"\\u00e9"},"b":[1,2.5,null,true]}'
    assert canonical_json_hash(obj) == hashlib.sha256(text.encode()).hexdigest()
    assert canonical_json_hash({"a": {"x": 0, "y": "\u00e9"}, "b": [1, 2.5, None, True]}) == canonical_json_hash(obj)
    assert canonical_json_hash({"x": 1}) != canonical_json_hash({"x": 1.5})
    with pytest.raises(ValueError, match="cannot fingerprint"):
        canonical_json_hash({"x": float("nan")})
    with pytest.raises(ValueError, match="plain JSON data"):
        canonical_json_hash({"x": object()})


def test_version_is_the_installed_package():
    assert VERSION == importlib.metadata.version("diffmem")


def test_npz_patterns_round_trip_and_refusals(tmp_path):
    good = tmp_path / "good.npz"
    arr = np.random.default_rng(0).normal(size=(12, 16)).astype(np.float32)
    np.savez(good, patterns=arr, labels=np.arange(12))
    ds = load_patterns_npz(good, dtype=torch.float64)
    assert ds.x.shape == (12, 16) and ds.x.dtype == torch.float64 and ds.image_shape == (4, 4)
    np.testing.assert_allclose(ds.x.numpy(), arr)

    pickled = tmp_path / "obj.npz"
    np.savez(pickled, patterns=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled data"):
        load_patterns_npz(pickled)
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"patterns": [1, 2]}))
    with pytest.raises(ValueError, match="pickled data|cannot read"):
        load_patterns_npz(raw)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot read"):
        load_patterns_npz(corrupt)
    two = tmp_path / "two.npz"
    np.savez(two, a=arr, b=arr)
    with pytest.raises(ValueError, match="exactly one float array"):
        load_patterns_npz(two)
    nan = tmp_path / "nan.npz"
    np.savez(nan, a=np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        load_patterns_npz(nan)
    flat = tmp_path / "flat.npz"
    np.savez(flat, a=np.zeros(5))
    with pytest.raises(ValueError, match=r"shape \(K, D\)"):
        load_patterns_npz(flat)
    with pytest.raises(ValueError, match="not found"):
        load_patterns_npz(tmp_path / "missing.npz")


def test_circle_points():
    even = circle_points(8, spacing="even", dtype=torch.float64)
    torch.testing.assert_close(even.norm(dim=1), torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(even[2], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(circle_points(5, seed=1), circle_points(5, seed=1))
    assert load_dataset("circle").x.shape == (2000, 2)
    with pytest.raises(ValueError, match="files you provide.*pass root="):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="spacing"):
        circle_points(3, spacing="grid")
