"""The study commands: demo, sweep, report, status, analyze, memorization, two-model."""

import json
import re

import yaml
from typer.testing import CliRunner

from diffmem.cli.app import app
from diffmem.experiments.demo import circle_toy

runner = CliRunner()


def _table(output: str) -> list[str]:
    """The rows of the printed phase table."""
    return [line for line in output.splitlines() if re.match(r"^\s+\d+\s+\d+\s+0\.|^\s+\d+\s+\d+\s+1\.", line)]


TINY_ARGS = ["--samples", "16", "--train-steps", "30", "--executor", "local", "--circle", "skip"]


def test_demo_runs_the_study_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--k", "4", "--k", "64", *TINY_ARGS, "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out / "report" / "report.html"
    assert res.output.strip().splitlines()[-1] == f"results written to {page}"
    html = page.read_text()
    assert "data:image/png;base64," in html
    phase = json.loads((out / "phase.json").read_text())
    assert [r["K"] for r in phase["rows"]] == [4, 64]
    # the transitions in words, each announced only where its intervals support it
    assert re.search(r"Most samples are memorized|At no K are most samples memorized|f_M exceeds 1/2", res.output)
    for job in ("k-0004-seed-0", "k-0064-seed-0"):
        manifest = json.loads((out / job / "manifest.json").read_text())
        assert {"train", "classify", "basins", "census"} <= set(manifest["stages"])
    # rerun: everything is done already, the same table comes back
    again = runner.invoke(app, ["demo", "--k", "4", "--k", "64", *TINY_ARGS, "--out", str(out)])
    assert again.exit_code == 0 and _table(again.output) == _table(res.output) and len(_table(res.output)) == 2


def test_circle_toy_writes_panels(tmp_path):
    toy = circle_toy(tmp_path, ks=(2, 9), train_steps=20, n_starts=30, progress=False)
    titles = [p["title"] for p in toy["panels"]]
    assert titles == ["K = 2", "K = 9", "continuum (K = inf)", "trained, K = 2", "trained, K = 9"]
    assert toy["panels"][0]["counts"] == {"memory": 2, "spurious": 0, "saddle": 1, "maximum": 0}
    assert (tmp_path / "landscape.png").stat().st_size > 10_000


def _tiny_config(tmp_path, **changes):
    cfg = {
        "name": "tiny",
        "ks": [4, 16],
        "n_held_out": 50,
        "network": {"kind": "mlp", "mlp": {"hidden": 16, "depth": 1, "emb_dim": 8}},
        "train": {"steps": 10, "batch_size": 8, "warmup_steps": 2},
        "sampling": {"steps": 4, "n_samples": 8},
        "classify": {"n_bootstrap": 50},
        **changes,
    }
    path = tmp_path / f"tiny-{len(list(tmp_path.glob('tiny-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sweep_dry_run_prints_the_resolved_config(tmp_path):
    res = runner.invoke(app, ["sweep", str(_tiny_config(tmp_path)), "--dry-run", "--executor", "pool"])
    assert res.exit_code == 0, res.output
    body = yaml.safe_load(res.output)
    assert body["ks"] == [4, 16] and body["executor"]["kind"] == "pool"
    assert body["sampling"]["sampler"] == "ddim"  # defaults filled in


def test_sweep_status_report_and_analyze(tmp_path):
    out = tmp_path / "study"
    res = runner.invoke(app, ["sweep", str(_tiny_config(tmp_path)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1].startswith(f"results written to {out / 'report' / 'report.html'}")
    status = runner.invoke(app, ["status", str(out)])
    assert status.exit_code == 0 and "k-0016-seed-0" in status.output and "done" in status.output
    rep = runner.invoke(app, ["report", str(out)])
    assert rep.exit_code == 0 and (out / "report" / "phase.csv").is_file()
    run = out / "k-0016-seed-0" / "run"
    ana = runner.invoke(app, ["analyze", str(run), "--samples", "8", "--steps", "4", "--collapse"])
    assert ana.exit_code == 0, ana.output
    assert "memorized" in ana.output and "spurious" in ana.output and "generalized" in ana.output
    assert (run / "analysis" / "collapse.json").is_file()


def test_study_commands_refuse_bad_input_with_a_message(tmp_path):
    cases = [
        (["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")], "missing.yaml"),
        (["sweep", str(_tiny_config(tmp_path, ks=[16, 4])), "--out", str(tmp_path / "o")], "sorted ascending"),
        (["sweep", str(_tiny_config(tmp_path, ks=[])), "--out", str(tmp_path / "o")], "ks"),
        (["sweep", str(_tiny_config(tmp_path, samples=3)), "--out", str(tmp_path / "o")], "samples: unknown key"),
        (["sweep", str(_tiny_config(tmp_path))], "--out"),
        (["sweep", str(_tiny_config(tmp_path)), "--dry-run", "--executor", "slurm"], "slurm"),
        (["report", str(tmp_path)], "phase.json"),
        (["analyze", str(tmp_path / "nope")], "run directory not found"),
        (["analyze", str(tmp_path), "--metric", "ssim"], "Invalid value for '--metric'"),
        (["two-model", "--out", str(tmp_path / "t"), "--k", "0"], "training-set sizes must be >= 1"),
        (["two-model", "--out", str(tmp_path / "t"), "--k", "8", "--delta", "-1"], "delta"),
        (["memorization", "--out", str(tmp_path / "m"), "--k", "5000"], "K=5000"),
        (["memorization", "--out", str(tmp_path / "m"), "--samples", "1"], "n_samples"),
        (["memorization", "--out", str(tmp_path / "m"), "--n-held-out", "0"], "held-out"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output
    assert not (tmp_path / "t").exists() and not (tmp_path / "m").exists()  # refused before any work


def test_sweep_into_an_unwritable_or_foreign_directory(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["sweep", str(_tiny_config(tmp_path)), "--out", str(foreign)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert (foreign / "notes.txt").read_text() == "mine"


STUDY_ARGS = ["--train-steps", "10", "--hidden", "16", "--depth", "1", "--n-held-out", "50", "--samples", "8"]


def test_memorization_writes_the_study_layout_and_resumes(tmp_path):
    out = tmp_path / "m"
    args = ["memorization", "--k", "64", "--k", "4", *STUDY_ARGS, "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "phase.json").read_text())["rows"]
    assert [r["K"] for r in rows] == [4, 64] and all(r["f_M_low"] <= r["f_M"] <= r["f_M_high"] for r in rows)
    assert all(r["n_samples"] == 8 and r["delta_m"] > 0 for r in rows)  # delta_m calibrated on held-out images
    assert (out / "phase.csv").read_text().startswith("K,n_samples")
    assert (out / "report" / "report.html").is_file() and (out / "k-0064-seed-0" / "run" / "checkpoint.json").is_file()
    printed = [line.split() for line in res.output.splitlines() if re.match(r"^\s+\d+\s+[01]\.\d{3} \[", line)]
    assert [int(p[0]) for p in printed] == [4, 64]
    assert [float(p[1]) for p in printed] == [round(r["f_M"], 3) for r in rows]
    assert (
        res.output.strip().splitlines()[-1] == f"results written to {out} (phase.json, phase.csv, report/report.html)"
    )
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.stdout == res.stdout  # resumes: every job is done already


def test_two_model_writes_agreement_and_figure(tmp_path):
    out = tmp_path / "t"
    res = runner.invoke(app, ["two-model", "--k", "4", "--k", "16", *STUDY_ARGS, "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "two_model.json").read_text())["rows"]
    assert [r["K"] for r in rows] == [4, 16]
    assert all(0 <= r["agreement"] <= 1 and r["mean_distance"] > 0 and r["n_samples"] == 8 for r in rows)
    assert (out / "two_model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = [line.split() for line in res.output.splitlines() if re.match(r"^\s+\d+\s+[01]\.\d{3}\s", line)]
    assert [(int(p[0]), float(p[1])) for p in printed] == [(r["K"], round(r["agreement"], 3)) for r in rows]
    assert res.output.strip().splitlines()[-1] == f"results written to {out} (two_model.json, two_model.png)"


def test_a_device_on_the_command_line_sets_the_gpus_each_job_asks_for(monkeypatch):
    """A study written for a CPU runs on a Ray cluster of GPUs with --device cuda (one GPU per job), and one
    written for GPUs runs on a CPU with --device cpu (none), without editing the file."""
    from pathlib import Path

    from diffmem.cli import study as cli_study
    from diffmem.study.config import load_study_config

    monkeypatch.setattr(cli_study, "check_device", lambda device: device)  # no GPU here
    examples = Path(__file__).resolve().parents[1] / "examples"
    mnist = load_study_config(examples / "mnist-capacity.yaml")
    on_gpus = cli_study._override(mnist, "ray", None, "auto", "cuda")
    assert (on_gpus.device, on_gpus.executor.kind, on_gpus.executor.gpus_per_job) == ("cuda", "ray", 1.0)
    assert cli_study._override(mnist, None, None, None, "cuda").executor.gpus_per_job == 0.0  # a pool: no Ray
    cifar = load_study_config(examples / "cifar10-study.yaml")
    assert cifar.executor.gpus_per_job == 1.0
    on_cpu = cli_study._override(cifar, None, None, None, "cpu")
    assert (on_cpu.device, on_cpu.executor.kind, on_cpu.executor.gpus_per_job) == ("cpu", "ray", 0.0)
    assert cli_study._override(cifar, None, 2, None, None).executor.gpus_per_job == 1.0  # no device: kept
