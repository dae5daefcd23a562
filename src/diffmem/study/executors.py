"""Executors: run a study's (K, seed) jobs one after another, in a local process pool, or as Ray tasks.

Every job writes into the study's run store (diffmem.study.store), which must sit on a filesystem all
workers see; a job resumes wherever an earlier run stopped. A failing job never costs the others:
all jobs run to the end, then one JobsFailedError lists every failure.

    results = run_jobs(specs, run_job, ExecutorConfig(kind="pool", workers=4))

fn must be a module-level function (worker processes import it by name) taking a JobSpec and
returning a small dict.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from diffmem.evaluate.sharded_knn import ray_connect
from diffmem.io.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Section, choice, error
from diffmem.study.store import job_name

EXECUTORS = ("local", "pool", "ray")
RAY_INSTALL_HINT = "pip install 'diffmem[distributed]'"


@dataclass(frozen=True)
class JobSpec:
    k: int  # training-set size
    seed: int
    root: str = ""  # the study directory, on a filesystem every worker sees
    name: str = ""  # the job's directory name; default job_name(k, seed)

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int (a training-set size), got {self.k!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if not self.name:
            object.__setattr__(self, "name", job_name(self.k, self.seed))


@dataclass(frozen=True)
class JobFailure:
    name: str
    error: str  # "ExceptionType: message"
    traceback: str


class JobsFailedError(RuntimeError):
    """Some jobs failed after all jobs ran; .failures lists them, .results holds the others' dicts (None if failed)."""

    def __init__(self, failures: Sequence[JobFailure], results: list[dict | None]):
        self.failures = tuple(failures)
        self.results = results
        listed = "; ".join(f"{f.name}: {f.error}" for f in self.failures)
        super().__init__(
            f"{len(self.failures)} of {len(results)} jobs failed ({listed}); the other jobs finished and their "
            "results are in the store; rerun the same command to retry the failed jobs (finished stages are kept)"
        )


@dataclass(frozen=True)
class ExecutorConfig(Section):
    """Where jobs run: 'local' (one after another in this process), 'pool' (local worker processes)
    or 'ray' (a Ray cluster; address null starts a local one)."""

    _key = "executor"
    kind: str = "local"
    workers: int = 1  # jobs at once (pool, ray)
    address: str | None = None  # Ray cluster address (ray only)
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0  # fractions share a GPU (ray)

    _bounds = {"workers": AT_LEAST_1, "cpus_per_job": POSITIVE, "gpus_per_job": NON_NEGATIVE}

    def _check(self) -> None:
        choice(self._at("kind"), self.kind, EXECUTORS)
        if self.kind == "local" and self.workers != 1:
            raise error(
                self._at("workers"),
                f"executor.kind 'local' runs one job at a time; set workers: 1 or kind: pool, got {self.workers}",
            )
        if self.address is not None and self.kind != "ray":
            raise error(self._at("address"), f"only executor.kind 'ray' connects to an address, got {self.kind!r}")


def _failure(job: JobSpec, e: BaseException, trace: str | None = None) -> JobFailure:
    return JobFailure(job.name, f"{type(e).__name__}: {e}", trace or "".join(traceback.format_exception(e)))


def _outcome(job: JobSpec, result: Any) -> dict | JobFailure:
    if not isinstance(result, dict):
        return JobFailure(job.name, f"TypeError: the job function returned {type(result).__name__}, not a dict", "")
    return result


def run_jobs(
    jobs: Sequence[JobSpec],
    fn: Callable[[JobSpec], dict],
    executor: ExecutorConfig | None = None,
    *,
    progress: bool = True,
    monitor: Callable[[], str] | None = None,
) -> list[dict]:
    """fn(job) for every job, results in the order of jobs.

    monitor: polled every MONITOR_SECONDS while jobs run (in a thread of this process), its text shown
    beside the jobs bar, e.g. the step and loss of every job that is training.

    executor.kind: 'local' runs the jobs one after another in this process; 'pool' in `workers`
    spawned processes (spawn, not fork: forking a process that has started torch threads is unsafe);
    'ray' as Ray tasks, each requesting cpus_per_job CPUs and gpus_per_job GPUs, on the cluster at
    `address` ('auto', 'ray://HOST:10001') or on a local Ray instance with ceil(workers * cpus_per_job)
    CPUs started for this call and shut down after it. A connection this call made is closed
    afterwards; a cluster is never stopped. Default: ExecutorConfig() (local).
    Raises JobsFailedError after every job has run if any failed."""
    jobs = list(jobs)
    ex = ExecutorConfig() if executor is None else executor
    if not isinstance(ex, ExecutorConfig):
        raise ValueError(f"executor must be an ExecutorConfig, got {type(ex).__name__}")
    if not all(isinstance(j, JobSpec) for j in jobs):
        raise ValueError("jobs must be JobSpec instances")
    names = [j.name for j in jobs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"two jobs share the name(s) {', '.join(duplicated)}: each job needs its own directory")
    if not callable(fn):
        raise ValueError(f"fn must be a function of a JobSpec, got {type(fn).__name__}")
    executor = ex.kind
    if executor == "pool":
        try:
            pickle.dumps(fn)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ValueError(
                f"the 'pool' executor needs a module-level job function that worker processes can import; "
                f"{getattr(fn, '__qualname__', fn)!r} cannot be pickled ({e})"
            ) from None
    if not jobs:
        return []

    if executor == "local":
        outcomes = _run_local(jobs, fn)
    elif executor == "pool":
        outcomes = _run_pool(jobs, fn, ex.workers)
    else:
        outcomes = _run_ray(jobs, fn, ex.workers, ex.address, ex.cpus_per_job, ex.gpus_per_job)
    results: list[dict | None] = [None] * len(jobs)
    failures: dict[int, JobFailure] = {}
    with (
        tqdm(total=len(jobs), desc=f"jobs ({executor})", unit="job", disable=not progress) as bar,
        _polling(monitor if progress else None, bar),
    ):
        for i, outcome in outcomes:
            if isinstance(outcome, JobFailure):
                failures[i] = outcome
                bar.write(f"job {outcome.name} failed: {outcome.error}", file=sys.stderr)
            else:
                results[i] = outcome
            bar.set_postfix_str(f"{jobs[i].name} {'failed' if i in failures else 'done'}", refresh=False)
            bar.update(1)
    if failures:
        raise JobsFailedError([failures[i] for i in sorted(failures)], results)
    return results  # type: ignore[return-value]


MONITOR_SECONDS = 5.0


@contextlib.contextmanager
def _polling(monitor: Callable[[], str] | None, bar) -> Iterator[None]:
    """While the block runs, show monitor()'s text beside the bar every MONITOR_SECONDS."""
    if monitor is None:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(MONITOR_SECONDS):
            try:
                text = monitor()
            except Exception:  # a progress note must never stop the jobs
                continue
            if text:
                bar.set_postfix_str(text)

    thread = threading.Thread(target=poll, name="jobs-monitor", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _run_local(jobs: list[JobSpec], fn: Callable[[JobSpec], dict]) -> Iterator[tuple[int, dict | JobFailure]]:
    for i, job in enumerate(jobs):
        try:
            result = fn(job)
        except Exception as e:
            yield i, _failure(job, e)
        else:
            yield i, _outcome(job, result)


def _run_pool(jobs: list[JobSpec], fn: Callable[[JobSpec], dict], workers: int) -> Iterator[tuple[int, Any]]:
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                result = future.result()
            except Exception as e:  # the worker's traceback comes along as e.__cause__
                yield i, _failure(jobs[i], e)
            else:
                yield i, _outcome(jobs[i], result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an interrupt, the jobs not yet started never start


def _exit_with_parent(parent: int, poll: float = 0.5) -> None:
    """In a pool worker: exit as soon as the driver that started it is gone (killed with -9, say),
    instead of finishing its job for nobody and then waiting forever for the next."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(3)

    threading.Thread(target=watch, name="diffmem-parent-watch", daemon=True).start()


def _call(fn: Callable[[JobSpec], dict], job: JobSpec) -> dict:
    return fn(job)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(f"the 'ray' executor needs Ray, which is not installed: {RAY_INSTALL_HINT}") from None
    return ray


def _run_ray(
    jobs: list[JobSpec],
    fn: Callable[[JobSpec], dict],
    workers: int,
    address: str | None,
    cpus_per_job: float,
    gpus_per_job: float,
) -> Iterator[tuple[int, Any]]:
    ray = _import_ray()
    started = ray_connect(ray, address, num_cpus=math.ceil(workers * cpus_per_job))
    pending: list = []
    try:
        available = ray.cluster_resources()
        for resource, need in (("CPU", cpus_per_job), ("GPU", gpus_per_job)):
            if need > available.get(resource, 0):
                raise ValueError(
                    f"each job requests {need:g} {resource}(s) but the Ray cluster has {available.get(resource, 0):g}; "
                    f"lower {resource.lower()}s_per_job or add nodes (a task that never fits would wait forever)"
                )
        # a plain function as the task, fn its argument: fn may be a functools.partial, which ray.remote refuses
        task = ray.remote(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=0)(_call)
        index = {task.options(name=job.name).remote(fn, job): i for i, job in enumerate(jobs)}
        pending = list(index)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayTaskError as e:  # the job raised: report its own exception
                cause = e.cause if isinstance(e.cause, BaseException) else e
                yield i, _failure(jobs[i], cause, str(e))
            except ray.exceptions.RayError as e:  # the worker died or the task could not run
                yield i, _failure(jobs[i], e)
            else:
                yield i, _outcome(jobs[i], result)
    finally:
        for ref in pending:  # interrupted: the jobs not yet finished should not keep the cluster busy
            ray.cancel(ref)
        if started:
            ray.shutdown()
