"""The diffmem command line, through Typer's CLI runner."""

import json

import pytest
import torch
from typer.testing import CliRunner

from diffmem.cli import app

runner = CliRunner()


def test_demo_writes_summary_and_figure(tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--k", "4", "--k", "32", "--samples", "24", "--steps", "20", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["k"] for r in summary["results"]] == [4, 32]
    for r in summary["results"]:
        assert r["frac_memorized"] == 1.0  # the exact denoiser memorizes (SCIENCE.md §4)
        assert r["n_samples"] == 24 and 1 <= r["distinct_patterns"] <= r["k"]
    png = (out / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert f"results written to {out}" in res.output


def test_demo_default_out_is_a_new_numbered_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--k", "3", "--samples", "4", "--steps", "5"]
    for expected in ("diffmem-demo-00001", "diffmem-demo-00002"):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert (tmp_path / expected / "summary.json").exists()
        assert expected in res.stdout.strip().splitlines()[-1]


def test_demo_is_reproducible(tmp_path):
    args = ["demo", "--k", "50", "--samples", "16", "--steps", "10", "--seed", "7"]
    for name in ("a", "b"):
        assert runner.invoke(app, [*args, "--out", str(tmp_path / name)]).exit_code == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())["results"][0]
    b = json.loads((tmp_path / "b" / "summary.json").read_text())["results"][0]
    assert a["distinct_patterns"] == b["distinct_patterns"] and a["max_distance"] == b["max_distance"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--k", "0"], "positive"),
        (["demo", "--k", "5000"], "exceeds the 1797 digits"),
        (["demo", "--k", "8", "--k", "8"], "distinct"),
        (["demo", "--samples", "0"], "--samples"),
        (["demo", "--steps", "2000"], "--steps"),
        (["demo", "--device", "tpu9"], "device"),
        (["bench", "--only", "nope"], "unknown benchmark"),
        (["bench", "--size", "huge"], "unknown benchmark size"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["bench", "--out", "/nonexistent-dir/b.json"], "does not exist"),
    ],
)
def test_bad_arguments_give_a_message_not_a_traceback(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_cuda():
    res = runner.invoke(app, ["demo", "--device", "cuda"])
    assert res.exit_code == 2 and "CUDA is not available" in res.output


def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    res = runner.invoke(app, ["demo", "--k", "3", "--samples", "2", "--out", str(blocker / "x")])
    assert res.exit_code == 2 and "cannot create the output directory" in res.output
    assert blocker.read_text() == "keep me"


def test_bench_quick_writes_entries(tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "--size", "quick", "--repeats", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    entries = json.loads(out.read_text())
    names = [e["name"] for e in entries]
    assert names[:2] == ["matmul_float32", "exact_step_gflops"]
    assert "ddim_digits_seconds" in names and "exact_step_workspace_mb" in names
    for e in entries:
        assert set(e) >= {"name", "value", "unit", "reference", "ratio"}
        assert e["value"] > 0
        if e["reference"] is not None:
            assert e["ratio"] == pytest.approx(e["value"] / e["reference"])
    step = next(e for e in entries if e["name"] == "exact_step_gflops")
    assert step["reference"] == entries[0]["value"]  # compared with the matmul rate of the same run
    workspace = next(e for e in entries if e["name"] == "exact_step_workspace_mb")
    assert workspace["ratio"] < 1  # never the size of a (B, K, D) tensor
    assert "exact_step_gflops" in res.output


def test_help_shows_examples():
    for cmd in ("demo", "bench"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Examples" in res.output and f"diffmem {cmd}" in res.output
