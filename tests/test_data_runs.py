"""Built-in digits, nested subsets, numbered run directories and atomic writes."""

import json

import pytest
import torch

from diffmem.data import load_digits, nested_order, nested_subset
from diffmem.runs import new_run_dir, write_json_atomic


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

    monkeypatch.setattr("diffmem.runs.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(path, {"new": "data"})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    path = tmp_path / "a.json"
    write_json_atomic(path, {})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
