"""A synthetic study for the run-store and executor tests: deterministic stages that take a little time.

Each stage derives its bytes from the job's seed and the bytes of the stages before it, so a run that
was killed and resumed must end with files byte-equal to an uninterrupted run.

    python tests/store_worker.py ROOT    runs the study in ROOT, printing "ready" once it is open
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from pathlib import Path

from diffmem.io.files import write_bytes_atomic, write_json_atomic
from diffmem.study.executors import JobSpec
from diffmem.study.store import StudyStore, fingerprint

CONFIG = {"ks": [2, 5, 9], "seeds": [0], "stage_seconds": 0.12, "fail_seeds": []}
STAGES = ("train", "sample", "distances", "classify")


def _derived(key: bytes, n: int) -> bytes:
    return random.Random(hashlib.sha256(key).digest()).randbytes(n)


def _train(job, spec: JobSpec, seconds: float):
    out = job.path / "train"
    out.mkdir(exist_ok=True)
    write_bytes_atomic(out / "weights.bin", _derived(f"train {spec.k} {spec.seed}".encode(), 400_000 + spec.k))
    time.sleep(seconds)
    write_json_atomic(out / "train.json", {"k": spec.k, "seed": spec.seed})
    job.log_metrics({"stage": "train", "loss": 1.0 / spec.k})
    return [out / "weights.bin", "train/train.json"]


def _sample(job, spec: JobSpec, seconds: float):
    if spec.seed in job.study.config["fail_seeds"]:
        raise RuntimeError(f"synthetic failure of seed {spec.seed}")
    weights = (job.path / "train" / "weights.bin").read_bytes()
    time.sleep(seconds)
    write_bytes_atomic(job.path / "samples.bin", _derived(b"sample" + weights, 300_000))
    return ["samples.bin"]


def _distances(job, spec: JobSpec, seconds: float):
    samples = (job.path / "samples.bin").read_bytes()
    time.sleep(seconds / 2)
    write_bytes_atomic(job.path / "distances.bin", _derived(b"distances" + samples, 200_000))
    time.sleep(seconds / 2)
    return ["distances.bin"]


def _classify(job, spec: JobSpec, seconds: float):
    distances = (job.path / "distances.bin").read_bytes()
    time.sleep(seconds)
    digest = hashlib.sha256(distances).hexdigest()
    write_json_atomic(job.path / "classify.json", {"digest": digest, "memorized": int(digest[:2], 16) / 255})
    return ["classify.json"]


STAGE_FNS = {"train": _train, "sample": _sample, "distances": _distances, "classify": _classify}


def run_job(spec: JobSpec) -> dict:
    """The job function of the executors: every stage in order, each skipped when done."""
    store = StudyStore.open(spec.root)
    seconds = store.config["stage_seconds"]
    job = store.job(spec.name)
    ran = []
    with job.lock():
        for stage in STAGES:
            result = job.run_stage(
                stage, lambda j, f=STAGE_FNS[stage]: f(j, spec, seconds), fingerprint({"stage": stage, "k": spec.k})
            )
            if result.ran:
                ran.append(stage)
                print(f"ran {spec.name} {stage}", flush=True)
    classify = (job.path / "classify.json").read_bytes()
    return {"name": spec.name, "k": spec.k, "digest": hashlib.sha256(classify).hexdigest(), "ran": ran}


def specs(root: str | Path, config: dict = CONFIG) -> list[JobSpec]:
    return [JobSpec(k, seed, str(root)) for k in config["ks"] for seed in config["seeds"]]


def run_study(root: str | Path, config: dict = CONFIG) -> list[dict]:
    StudyStore.create_or_open(root, config, fingerprint(config))
    return [run_job(spec) for spec in specs(root, config)]


if __name__ == "__main__":
    root = sys.argv[1]
    StudyStore.create_or_open(root, CONFIG, fingerprint(CONFIG))
    print("ready", flush=True)
    run_study(root)


def sleep_job(spec: JobSpec) -> dict:
    """A job that records its process id and then runs far longer than any test waits."""
    Path(spec.root, f"pid-{spec.name}").write_text(str(os.getpid()))
    time.sleep(120)
    return {"name": spec.name}
