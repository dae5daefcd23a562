"""Hostile use of the study machinery: relative paths, manifests that point outside the study, a
study.json edited by hand, data that moved, executors that must agree bit for bit, and pool workers
whose driver was killed."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from diffmem.cli import app
from diffmem.study.config import StudyConfig
from diffmem.study.runner import run_study
from diffmem.study.store import StoreError, StudyStore, fingerprint, study_status

SMALL = {"kind": "mlp", "mlp": {"hidden": 16, "depth": 1, "emb_dim": 8}}
TINY = {
    "ks": [4, 8],
    "n_held_out": 40,
    "network": SMALL,
    "train": {"steps": 12, "batch_size": 8, "warmup_steps": 2, "log_every": 4},
    "sampling": {"steps": 4, "n_samples": 10},
    "classify": {"n_bootstrap": 20},
}
runner = CliRunner()


def tiny(**over) -> StudyConfig:
    return StudyConfig.from_dict({**TINY, **over})


def write_yaml(path: Path, d: dict) -> Path:
    path.write_text(json.dumps(d))  # JSON is YAML
    return path


# --- relative paths -------------------------------------------------------------------------------------------


def test_sweep_with_a_relative_out_runs_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path / "study.yaml", TINY)
    result = runner.invoke(app, ["sweep", "study.yaml", "--out", "studies/tiny", "--no-report"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "studies/tiny/phase.json").is_file()
    assert "results written to studies/tiny" in result.output
    again = runner.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "studies/tiny"), "--no-report"])
    assert again.exit_code == 0, again.output  # the same study by its absolute path: resumed


# --- the run store stays inside its study ---------------------------------------------------------------------


def _store_with_job(tmp_path):
    config = {"k": 1}
    store = StudyStore.create_or_open(tmp_path / "study", config, fingerprint(config))
    job = store.job("k-0001-seed-0")

    def stage(j):
        (j.path / "out.txt").write_text("result")
        return ["out.txt"]

    job.run_stage("train", stage, "p1", inputs=())
    return store, job, stage


@pytest.mark.parametrize("where", ["../../victim.txt", "ABSOLUTE", "../k-0002-seed-0/x.txt"])
@pytest.mark.parametrize("status", ["running", "done"])
def test_manifest_paths_outside_the_job_are_refused_and_nothing_is_deleted(tmp_path, where, status):
    store, job, stage = _store_with_job(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    path = str(victim) if where == "ABSOLUTE" else where
    manifest = json.loads((job.path / "manifest.json").read_text())
    manifest["stages"]["train"]["status"] = status
    manifest["stages"]["train"]["outputs"] = [{"path": path, "sha256": "0" * 64, "bytes": 7}]
    (job.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="refused"):
        job.run_stage("train", stage, "p2", inputs=())
    assert victim.read_text() == "keep me"
    with pytest.raises(StoreError, match="refused"):
        job.is_done("train", "p1")


def test_a_link_out_of_the_job_is_refused(tmp_path):
    store, job, stage = _store_with_job(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (job.path / "link.txt").symlink_to(outside)
    manifest = json.loads((job.path / "manifest.json").read_text())
    manifest["stages"]["train"]["outputs"] = [{"path": "link.txt", "sha256": "0" * 64, "bytes": 7}]
    (job.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="leads out of the job directory"):
        job.run_stage("train", stage, "p2", inputs=())
    assert outside.read_text() == "keep me"


def test_a_symlinked_job_directory_is_not_written_through(tmp_path):
    config = {"k": 1}
    store = StudyStore.create_or_open(tmp_path / "study", config, fingerprint(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (store.root / "k-0001-seed-0").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StoreError, match="link out of the study"):
        store.job("k-0001-seed-0").run_stage("train", lambda j: [], "p", inputs=())
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    "record",
    [
        "done",
        {"status": "finished"},
        {"status": "done", "params_fingerprint": "p", "outputs": "out.txt"},
        {"status": "done", "params_fingerprint": "p", "outputs": [{"path": 3, "sha256": "x", "bytes": 1}]},
        {"status": "done", "params_fingerprint": "p", "outputs": [], "seconds": "fast"},
    ],
)
def test_status_of_a_badly_typed_manifest_is_a_message(tmp_path, record):
    store, job, _ = _store_with_job(tmp_path)
    manifest = json.loads((job.path / "manifest.json").read_text())
    manifest["stages"]["train"] = record
    (job.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="is damaged"):
        study_status(store.root)
    result = runner.invoke(app, ["status", str(store.root)])
    assert result.exit_code == 2 and "is damaged" in result.output and "Traceback" not in result.output


# --- study.json and the data location -------------------------------------------------------------------------


def test_an_edited_study_json_is_refused_not_obeyed(tmp_path):
    out = tmp_path / "s"
    run_study(tiny(ks=[4]), out, progress=False)
    record = json.loads((out / "study.json").read_text())
    record["config"]["train"]["steps"] = 500  # edited by hand, fingerprint left as it was
    (out / "study.json").write_text(json.dumps(record))
    with pytest.raises(StoreError, match="was changed after the study was created"):
        run_study(tiny(ks=[4]), out, progress=False)
    with pytest.raises(StoreError, match="was changed after the study was created"):
        run_study(tiny(ks=[4, 8]), out, progress=False)


def _image_folder(root: Path, n: int) -> None:
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(root / f"{i:03d}.png")


def test_a_study_resumes_after_its_data_moved(tmp_path):
    first = tmp_path / "data-a"
    first.mkdir()
    _image_folder(first, 60)
    out = tmp_path / "s"
    run_study(tiny(data={"name": "image_folder", "options": {"root": str(first), "size": 8}}), out, progress=False)
    before = (out / "phase.json").read_bytes()
    moved = tmp_path / "data-b"
    first.rename(moved)
    (out / "k-0004-seed-0" / "analysis" / "samples.csv").unlink()  # classify reruns on the trained K = 4 model
    for p in sorted((out / "k-0008-seed-0").rglob("*"), reverse=True):  # K = 8 trains again from scratch
        p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
    data = {"name": "image_folder", "options": {"root": str(moved), "size": 8}}
    result = run_study(tiny(data=data), out, progress=False)
    assert [r["K"] for r in result.rows] == [4, 8]
    assert (out / "phase.json").read_bytes() == before  # the same data, found where it is now


# --- executors agree bit for bit ------------------------------------------------------------------------------


def _bits(out: Path, job: str) -> tuple[dict, bytes]:
    tensors = load_file(out / job / "run" / "checkpoint.safetensors")
    return tensors, (out / job / "analysis" / "samples.npz").read_bytes()


def test_local_pool_and_ray_executors_give_identical_bits(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what a 2-core machine gives a plain process; workers use cpus_per_job = 1
    try:
        run_study(tiny(ks=[4], executor={"kind": "local"}), tmp_path / "local", progress=False)
        assert torch.get_num_threads() == 2  # the job's thread count was its own
    finally:
        torch.set_num_threads(threads)
    run_study(tiny(ks=[4], executor={"kind": "pool", "workers": 2}), tmp_path / "pool", progress=False)
    kinds = ["pool"]
    if importlib.util.find_spec("ray") is not None:
        run_study(tiny(ks=[4], executor={"kind": "ray", "workers": 1}), tmp_path / "ray", progress=False)
        kinds.append("ray")
    weights, samples = _bits(tmp_path / "local", "k-0004-seed-0")
    for kind in kinds:
        other_weights, other_samples = _bits(tmp_path / kind, "k-0004-seed-0")
        assert weights.keys() == other_weights.keys()
        differ = [k for k in weights if not torch.equal(weights[k], other_weights[k])]
        assert not differ, (kind, differ)
        assert samples == other_samples, kind


# --- pool workers die with their driver -----------------------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import sys
    from diffmem.study.executors import ExecutorConfig, JobSpec, run_jobs
    import store_worker
    root = sys.argv[1]
    jobs = [JobSpec(k, 0, root) for k in (1, 2)]
    run_jobs(jobs, store_worker.sleep_job, ExecutorConfig(kind="pool", workers=2), progress=False)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_pool_workers_exit_when_their_driver_is_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("pid-*"))) < 2:
            assert time.monotonic() < deadline, "the pool workers never started their jobs"
            assert driver.poll() is None, "the driver ended early"
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
        assert all(_alive(p) for p in pids)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "pool workers outlived their killed driver"
    finally:
        if driver.poll() is None:
            driver.kill()


# --- one error path for the command line ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(
        app, ["train", "--k", "8", "--steps", "3", "--hidden", "16", "--depth", "1", "--out", str(run)]
    )
    assert result.exit_code == 0, result.output
    return run


def _corrupt_checkpoint(run: Path, tmp_path: Path, change) -> Path:
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    meta = json.loads((copy / "checkpoint.json").read_text())
    change(meta)
    (copy / "checkpoint.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["config"].update(steps="many"), "steps: expected an integer"),
        (lambda m: m["config"].update(network=[1, 2]), "network: expected a mapping"),
        (lambda m: m["config"]["network"]["mlp"].update(hidden=10_000_000), "hidden"),
        (lambda m: m["config"]["schedule"].update(num_train_timesteps=2_000_000_000), "num_train_timesteps"),
        (lambda m: m.update(train_indices="all"), "malformed"),
        (lambda m: m.pop("config"), "malformed"),
    ],
)
def test_sample_with_a_malformed_checkpoint_json_is_a_message(trained_run, tmp_path, change, message):
    run = _corrupt_checkpoint(trained_run, tmp_path, change)
    result = runner.invoke(app, ["sample", str(run), "--samples", "4"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["census", "--data", "circle", "--k", "9", "--sigma", "1e-300"], "--sigma must be >= 1e-12"),
        (["census", "--data", "circle", "--k", "9", "--sigma", "1e300"], "--sigma must be <= 1000000000000.0"),
        (["census-sweep", "--data", "circle", "--sigma-min", "1e-300", "--sigma-max", "1"], "--sigma-min must be"),
        (["landscape", "--sigma", "1e300"], "--sigma must be <= 1000000000000.0"),
        (["train", "--k", "8", "--lr", "1e308", "--out", "r"], "lr: must lie in (0, 10]"),
        (["status", "nowhere"], "holds no study.json"),
    ],
)
def test_extreme_arguments_are_one_line_messages(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
