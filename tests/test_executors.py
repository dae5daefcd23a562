"""Executors: local, process pool and Ray run the same synthetic study to byte-equal files, and report failed jobs."""

import os
import pickle
import sys
import types
from pathlib import Path

import pytest

import store_worker
from diffmem.study.executors import (
    EXECUTORS,
    ExecutorConfig,
    JobsFailedError,
    JobSpec,
    run_jobs,
)
from diffmem.study.store import StudyStore, fingerprint, study_status

# seed 1 fails in its second stage: its first stage stays done, the other jobs complete
CONFIG = {**store_worker.CONFIG, "ks": [2, 5], "seeds": [0, 1], "stage_seconds": 0.02, "fail_seeds": [1]}
FAILED = ["k-0002-seed-1", "k-0005-seed-1"]


def make_study(root: Path) -> list[JobSpec]:
    StudyStore.create_or_open(root, CONFIG, fingerprint(CONFIG))
    return store_worker.specs(root, CONFIG)


def executor_config(executor: str = "local", **kwargs) -> ExecutorConfig:
    return ExecutorConfig(kind=executor, **kwargs)


def run_with_failures(root: Path, **kwargs) -> JobsFailedError:
    with pytest.raises(JobsFailedError) as e:
        run_jobs(make_study(root), store_worker.run_job, executor_config(**kwargs), progress=False)
    return e.value


def files(root: Path) -> dict[str, bytes]:
    skip = {"manifest.json", ".lock", "metrics.jsonl", "study.json"}
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name not in skip
    }


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    return root, run_with_failures(root, executor="local")


def check_like_reference(root: Path, error: JobsFailedError, local_reference) -> None:
    ref_root, ref_error = local_reference
    assert [f.name for f in error.failures] == FAILED
    assert error.results == ref_error.results
    assert files(root) == files(ref_root)
    statuses = {(r.job, r.stage): r.status for r in study_status(root)}
    assert statuses == {(r.job, r.stage): r.status for r in study_status(ref_root)}


def test_local_runs_every_job_and_reports_the_failed_ones(local_reference):
    root, error = local_reference
    assert [f.name for f in error.failures] == FAILED
    assert all(f.error == "RuntimeError: synthetic failure of seed 1" for f in error.failures)
    assert "raise RuntimeError" in error.failures[0].traceback
    assert str(error).startswith("2 of 4 jobs failed (k-0002-seed-1: RuntimeError: synthetic failure of seed 1; ")
    assert "rerun the same command" in str(error)
    done = [r for r in error.results if r is not None]
    assert [r["name"] for r in done] == ["k-0002-seed-0", "k-0005-seed-0"]
    assert all(r["ran"] == list(store_worker.STAGES) for r in done)
    assert [error.results[i] for i in (1, 3)] == [None, None]
    statuses = {(r.job, r.stage): r.status for r in study_status(root)}
    assert statuses[("k-0005-seed-0", "classify")] == "done"
    assert statuses[("k-0005-seed-1", "train")] == "done" and statuses[("k-0005-seed-1", "sample")] == "failed"


def test_rerun_resumes_without_redoing_finished_stages(tmp_path):
    config = {**CONFIG, "fail_seeds": []}
    StudyStore.create_or_open(tmp_path, config, fingerprint(config))
    specs = store_worker.specs(tmp_path, config)
    first = run_jobs(specs[:1], store_worker.run_job, progress=False)
    results = run_jobs(specs, store_worker.run_job, progress=False)
    assert results[0] == {**first[0], "ran": []}
    assert [r["ran"] for r in results[1:]] == [list(store_worker.STAGES)] * 3


def test_pool_matches_local(tmp_path, local_reference):
    error = run_with_failures(tmp_path, executor="pool", workers=2)
    check_like_reference(tmp_path, error, local_reference)
    assert "synthetic failure of seed 1" in error.failures[0].traceback  # the worker's traceback came along


@pytest.mark.slow
def test_ray_matches_local(tmp_path, local_reference, monkeypatch):
    ray = pytest.importorskip("ray")
    # Ray workers inherit the environment of the instance started here, so they can import store_worker
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    error = run_with_failures(tmp_path, executor="ray", workers=2)
    check_like_reference(tmp_path, error, local_reference)
    assert not ray.is_initialized()  # the instance started for the call is shut down


def test_progress_lines(tmp_path, capsys):
    with pytest.raises(JobsFailedError):
        run_jobs(make_study(tmp_path), store_worker.run_job, progress=True)
    err = capsys.readouterr().err
    assert "job k-0002-seed-1 failed: RuntimeError: synthetic failure of seed 1" in err
    assert "jobs (local)" in err and "4/4" in err


def not_a_dict(job: JobSpec):
    return [job.name]


def test_a_job_must_return_a_dict(tmp_path):
    with pytest.raises(JobsFailedError, match="k-0003-seed-0: TypeError: the job function returned list, not a dict"):
        run_jobs([JobSpec(3, 0, str(tmp_path))], not_a_dict, progress=False)
    assert run_jobs([], not_a_dict) == []


def test_jobspec_defaults_and_pickles():
    spec = JobSpec(32, 1, "/data/study")
    assert spec.name == "k-0032-seed-1" and JobSpec(32, 1, name="mine").name == "mine"
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(ValueError, match="k must be a positive int"):
        JobSpec(0, 1)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        JobSpec(4, -1)


def test_bad_arguments(tmp_path):
    jobs = [JobSpec(2, 0, str(tmp_path))]
    fn = store_worker.run_job
    with pytest.raises(ValueError, match=r"executor.kind: unknown value 'slurm'; choose one of local, pool, ray"):
        run_jobs(jobs, fn, executor_config("slurm"))
    assert EXECUTORS == ("local", "pool", "ray")
    bad = [
        ({"executor": "pool", "workers": 0}, "executor.workers: must be >= 1, got 0"),
        ({"cpus_per_job": 0}, r"executor.cpus_per_job: must be > 0"),
        ({"gpus_per_job": float("nan")}, "executor.gpus_per_job: expected a finite number"),
        ({"address": "auto"}, "only executor.kind 'ray' connects to an address"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            run_jobs(jobs, fn, executor_config(**kwargs))
    with pytest.raises(ValueError, match="executor must be an ExecutorConfig"):
        run_jobs(jobs, fn, "pool")
    with pytest.raises(ValueError, match="share the name.*k-0002-seed-0"):
        run_jobs(jobs * 2, fn)
    with pytest.raises(ValueError, match="must be JobSpec instances"):
        run_jobs([(2, 0)], fn)
    with pytest.raises(ValueError, match=r"module-level job function.*<lambda>"):
        run_jobs(jobs, lambda job: {}, executor_config("pool"))
    with pytest.raises(ValueError, match="fn must be a function"):
        run_jobs(jobs, "run_job")


def test_missing_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'diffmem\[distributed\]'"):
        run_jobs([JobSpec(2, 0, str(tmp_path))], store_worker.run_job, executor_config("ray"), progress=False)


class FakeRay:
    """Records how the executor connects; its cluster has 2 CPUs and no GPU."""

    def __init__(self, initialized=False, fail=False):
        self.initialized, self.fail, self.calls = initialized, fail, []
        self.exceptions = types.SimpleNamespace(RayTaskError=RuntimeError, RayError=RuntimeError)

    def is_initialized(self):
        return self.initialized

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        if self.fail:
            raise ConnectionError("no cluster there")
        self.initialized = True

    def cluster_resources(self):
        return {"CPU": 2.0}

    def shutdown(self):
        self.calls.append(("shutdown", {}))
        self.initialized = False


def test_ray_refuses_requests_the_cluster_cannot_meet(tmp_path, monkeypatch):
    ray = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", ray)
    jobs = [JobSpec(2, 0, str(tmp_path))]
    with pytest.raises(ValueError, match=r"requests 1 GPU\(s\) but the Ray cluster has 0; lower gpus_per_job"):
        run_jobs(jobs, store_worker.run_job, executor_config("ray", gpus_per_job=1), progress=False)
    assert [c[0] for c in ray.calls] == ["init", "shutdown"]  # what it started, it shut down
    with pytest.raises(ValueError, match=r"requests 4 CPU\(s\) but the Ray cluster has 2"):
        run_jobs(jobs, store_worker.run_job, executor_config("ray", cpus_per_job=4), progress=False)
