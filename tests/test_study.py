"""A study end to end: jobs in the run store, resume, refusal of a changed config, phase table, kill -9."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from diffmem.io.checkpoint import load_tensors
from diffmem.study.config import StudyConfig
from diffmem.study.runner import aggregate, job_stages, run_study
from diffmem.study.store import StoreError

TINY = {
    "name": "tiny",
    "data": {"name": "digits", "options": {}},
    "ks": [4, 32],
    "seeds": [0],
    "n_held_out": 100,
    "network": {"kind": "mlp", "mlp": {"hidden": 32, "depth": 2, "emb_dim": 16}},
    "train": {"steps": 40, "batch_size": 16, "warmup_steps": 5, "log_every": 20, "checkpoint_every": 10},
    "sampling": {"sampler": "ddim", "steps": 8, "n_samples": 24},
    "classify": {"n_bootstrap": 100},
    "analyses": {
        "basins": {"enabled": True, "n_points": 2, "n_trials": 3, "steps": 4},
        "census": {"enabled": True, "n_starts": 6},
    },
}


def tiny(**kw) -> StudyConfig:
    return StudyConfig.from_dict({**TINY, **kw})


def _file_digest(p: Path) -> str:
    """sha256 of a result file; a checkpoint pair carries a random nonce, so its tensors and step are hashed."""
    if p.name == "checkpoint.safetensors":
        tensors = load_tensors(p)
        h = hashlib.sha256()
        for name in sorted(tensors):
            h.update(name.encode() + tensors[name].numpy().tobytes())
        return h.hexdigest()
    if p.name == "checkpoint.json":
        meta = json.loads(p.read_text())
        meta.pop("nonce")
        return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _digest(root: Path) -> dict[str, str]:
    """Digests of every result file of a study (logs, manifests and locks carry times and are left out)."""
    skip = {"metrics.jsonl", "manifest.json", ".lock", "study.json"}
    return {
        str(p.relative_to(root)): _file_digest(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip and "report" not in p.parts
    }


def test_study_runs_resumes_and_refuses_another_config(tmp_path):
    out = tmp_path / "study"
    config = tiny()
    result = run_study(config, out, progress=False)
    assert [r["K"] for r in result.rows] == [4, 32]
    for r in result.rows:
        assert r["n_samples"] == 24 and r["n_seeds"] == 1
        assert r["f_M"] + r["f_S"] + r["f_G"] + r["f_O"] == pytest.approx(1.0)
        assert r["f_G3"] == pytest.approx(r["f_G"] + r["f_O"])  # the three-class view
        assert r["f_M_low"] <= r["f_M"] <= r["f_M_high"]
    phase = json.loads((out / "phase.json").read_text())
    assert phase["rows"] == result.rows and phase["transitions"] == result.transitions
    job = out / "k-0004-seed-0"
    manifest = json.loads((job / "manifest.json").read_text())
    assert list(manifest["stages"]) == list(job_stages(config))
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert (job / "analysis" / "basins.csv").is_file() and (job / "analysis" / "census.json").is_file()

    before = _digest(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    run_study(config, out, progress=False)  # everything is done: nothing is recomputed
    assert _digest(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")} == mtimes

    # executor and device are not part of the results: another executor resumes the same study
    run_study(tiny(executor={"kind": "pool", "workers": 2}), out, progress=False)
    assert _digest(out) == before

    with pytest.raises(StoreError, match="different configuration"):
        run_study(tiny(sampling={"sampler": "ddim", "steps": 9, "n_samples": 24}), out, progress=False)
    assert _digest(out) == before  # nothing was touched


def test_aggregate_pools_seeds(tmp_path):
    out = tmp_path / "study"
    config = tiny(ks=[4], seeds=[0, 1], analyses={})
    run_study(config, out, progress=False)
    rows, _, _ = aggregate(out, config)
    assert rows[0]["n_samples"] == 48 and rows[0]["n_seeds"] == 2


def test_bad_studies(tmp_path):
    with pytest.raises(ValueError, match="K=2000 exceeds"):
        run_study(tiny(ks=[4, 2000]), tmp_path / "a", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError):
        run_study(tiny(), blocker, progress=False)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real `diffmem sweep` in a subprocess, killed with SIGKILL several times, then resumed."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "analyses": {"basins": TINY["analyses"]["basins"]}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffmem", "sweep", str(cfg), "--no-report", "--out"]

    reference = tmp_path / "reference"
    subprocess.run([*cmd, str(reference)], env=env, check=True, capture_output=True, timeout=300)
    expected = _digest(reference)

    crashed = tmp_path / "crashed"
    rng = random.Random(7)
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen([*cmd, str(crashed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 9.0))  # importing torch takes a few seconds; then the study runs
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += (crashed / "study.json").is_file()  # killed inside the study, not while importing
        proc.wait()
        for path in crashed.rglob("*.json"):  # every JSON file parses after every kill
            json.loads(path.read_text())
    assert kills >= 2
    subprocess.run([*cmd, str(crashed)], env=env, check=True, capture_output=True, timeout=300)
    assert _digest(crashed) == expected
    assert not list(crashed.rglob("*.tmp"))


def test_intervals_include_the_variation_between_seeds():
    from diffmem.evaluate.classify import THREE_CLASSES, ClassifyConfig
    from diffmem.study.runner import _pooled_fractions

    c = ClassifyConfig(n_bootstrap=400)
    same = _pooled_fractions([["memorized"] * 50 + ["generalized"] * 50] * 2, THREE_CLASSES, c)
    split = _pooled_fractions([["memorized"] * 100, ["generalized"] * 100], THREE_CLASSES, c)
    assert same["f_M"] == split["f_M"] == 0.5
    assert same["f_M_high"] - same["f_M_low"] < 0.2  # 200 samples from one kind of model
    assert split["f_M_low"] == 0.0 and split["f_M_high"] == 1.0  # two models that disagree completely


def test_jobs_take_the_execution_settings_of_the_command(tmp_path):
    from diffmem.study.runner import _job_config, execution_settings
    from diffmem.study.store import StudyStore

    first = tiny()
    store = StudyStore.create_or_open(tmp_path / "s", first.to_dict(), first.fingerprint())
    later = tiny(
        executor={"kind": "pool", "workers": 2, "cpus_per_job": 1.0}, sampling={**TINY["sampling"], "batch_size": 7}
    )
    assert later.fingerprint() == first.fingerprint()
    job = _job_config(store, execution_settings(later))
    assert job.executor.kind == "pool" and job.sampling.batch_size == 7
    assert _job_config(store, None).executor.kind == "local"


def test_unfinished_training_shows_its_step_loss_and_time_left(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from diffmem.cli.app import app
    from diffmem.study import executors
    from diffmem.study.runner import training_progress

    out = tmp_path / "study"
    notes = []
    monkeypatch.setattr(executors, "MONITOR_SECONDS", 0.05)
    real = executors.run_jobs

    def watched(*args, monitor=None, **kw):  # what the jobs bar would show, recorded at every poll
        return real(*args, monitor=lambda: notes.append(monitor()) or notes[-1], **kw)

    monkeypatch.setattr("diffmem.study.runner.run_jobs", watched)
    run_study(tiny(ks=[4], analyses={}), out, progress=True)
    assert any(n.startswith("k-0004-seed-0 step ") and " loss " in n for n in notes), notes[:5]
    assert training_progress(out) == []  # every training finished
    job = out / "k-0004-seed-0"
    manifest = json.loads((job / "manifest.json").read_text())
    manifest["stages"]["train"]["status"] = "running"  # as a killed training leaves it
    (job / "manifest.json").write_text(json.dumps(manifest))
    metrics = (job / "run" / "metrics.jsonl").read_text().splitlines()
    (job / "run" / "metrics.jsonl").write_text(metrics[0] + "\n")  # its first record: step 20 of 40
    (p,) = training_progress(out)
    assert (p.job, p.stage, p.status, p.step, p.steps) == ("k-0004-seed-0", "train", "interrupted", 20, 40)
    assert p.loss == json.loads(metrics[0])["loss"] and p.eta_seconds == pytest.approx(p.seconds)
    res = CliRunner().invoke(app, ["status", str(out)])
    assert res.exit_code == 0 and "k-0004-seed-0 train: step 20/40, loss " in res.output
    assert "(interrupted)" in res.output
