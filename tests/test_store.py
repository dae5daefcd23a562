"""The run store: study identity, stage bookkeeping with hashes, invalidation, locks, full disks, crashes."""

import errno
import hashlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import diffmem
import store_worker
from diffmem.io.files import write_bytes_atomic
from diffmem.study.store import (
    StatusRow,
    StoreError,
    StudyStore,
    append_jsonl,
    fingerprint,
    format_status,
    job_name,
    read_jsonl,
    study_status,
)

WORKER = Path(__file__).parent / "store_worker.py"
CONFIG = {"ks": [4, 8], "lr": 1e-3, "model": {"width": 32}}


@pytest.fixture
def store(tmp_path):
    return StudyStore.create_or_open(tmp_path / "study", CONFIG, fingerprint(CONFIG))


def writer(name: str, data: bytes, calls: list | None = None):
    """A stage writing one file; calls records each run."""

    def stage(job):
        if calls is not None:
            calls.append(name)
        write_bytes_atomic(job.path / name, data)
        return [name]

    return stage


def manifest(job) -> dict:
    return json.loads((job.path / "manifest.json").read_bytes())


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# study identity


def test_fingerprint_is_canonical_json_sha256():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1, "b": [1, 2]}) == hashlib.sha256(b'{"a":1,"b":[1,2]}').hexdigest()
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    with pytest.raises(ValueError, match="cannot fingerprint.*plain JSON"):
        fingerprint({"a": float("nan")})
    with pytest.raises(ValueError, match="cannot fingerprint set"):
        fingerprint({1, 2})


def test_job_name_sorts_by_k():
    assert job_name(32, 0) == "k-0032-seed-0"
    assert sorted([job_name(100, 1), job_name(8, 1)]) == [job_name(8, 1), job_name(100, 1)]


def test_create_writes_study_json_and_reopens(tmp_path):
    root = tmp_path / "a" / "study"
    store = StudyStore.create_or_open(root, CONFIG, fingerprint(CONFIG))
    record = json.loads((root / "study.json").read_text())
    assert record["config"] == CONFIG
    assert record["fingerprint"] == fingerprint(CONFIG)
    assert record["diffmem_version"] == diffmem.__version__
    assert record["created"].startswith("20")
    again = StudyStore.create_or_open(root, dict(reversed(CONFIG.items())), fingerprint(CONFIG))
    assert again.config == CONFIG and again.created == store.created
    assert StudyStore.open(root).fingerprint == fingerprint(CONFIG)
    assert sorted(os.listdir(root)) == ["study.json"]


def test_other_configuration_is_refused_naming_the_keys(store):
    other = {**CONFIG, "lr": 1e-2, "extra": True}
    with pytest.raises(StoreError, match=r"different configuration.*differing keys: extra, lr.*new --out") as e:
        StudyStore.create_or_open(store.root, other, fingerprint(other))
    assert isinstance(e.value, ValueError)
    with pytest.raises(StoreError, match="equal configs, but the fingerprints differ"):
        StudyStore.create_or_open(store.root, CONFIG, "code-v2")


def test_non_study_directories_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"not empty \(notes.txt\).*not a diffmem study.*--out"):
        StudyStore.create_or_open(tmp_path, CONFIG, fingerprint(CONFIG))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    with pytest.raises(StoreError, match="holds no study.json"):
        StudyStore.open(tmp_path)
    (tmp_path / "study.json").write_text('{"config": ')
    with pytest.raises(StoreError, match="study.json is not valid JSON"):
        StudyStore.open(tmp_path)
    (tmp_path / "study.json").write_text("[1]")
    with pytest.raises(StoreError, match="no config or fingerprint"):
        StudyStore.open(tmp_path)


def test_unwritable_locations_are_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match=r"cannot create the study directory .*file/study: Not a directory"):
        StudyStore.create_or_open(tmp_path / "file" / "study", CONFIG, fingerprint(CONFIG))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_read_only_directory_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            StudyStore.create_or_open(tmp_path, CONFIG, fingerprint(CONFIG))
    finally:
        tmp_path.chmod(0o700)


def test_bad_arguments(tmp_path, store):
    with pytest.raises(ValueError, match="config must be a dict"):
        StudyStore.create_or_open(tmp_path / "x", [1], "fp")
    with pytest.raises(ValueError, match="config must be plain JSON data to be stored in study.json"):
        StudyStore.create_or_open(tmp_path / "x", {"path": Path("/data")}, "fp")
    with pytest.raises(ValueError, match="fingerprint must be a non-empty string"):
        StudyStore.create_or_open(tmp_path / "x", {}, "")
    for name in ("../up", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="invalid job name"):
            store.job(name)
    with pytest.raises(ValueError, match="invalid stage name"):
        store.job("j").run_stage("a b", writer("x", b""), "1")
    with pytest.raises(ValueError, match="params_fingerprint must be a string"):
        store.job("j").run_stage("a", writer("x", b""), 1)


# stages


def test_run_stage_records_hashes_and_skips_when_done(store):
    job = store.job(job_name(4, 0))
    calls = []
    data = b"weights" * 1000
    result = job.run_stage("train", writer("w.bin", data, calls), "p1")
    assert result.ran and result.outputs == (job.path / "w.bin",) and result.seconds >= 0
    record = manifest(job)["stages"]["train"]
    assert record["status"] == "done" and record["params_fingerprint"] == "p1"
    assert record["outputs"] == [{"path": "w.bin", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}]
    assert record["inputs"] == [] and record["seconds"] == result.seconds
    assert job.is_done("train", "p1") and not job.is_done("train", "p2") and not job.is_done("sample", "p1")
    again = job.run_stage("train", writer("w.bin", data, calls), "p1")
    assert not again.ran and again.outputs == result.outputs and calls == ["w.bin"]
    job.run_stage("train", writer("w.bin", data, calls), "p2")  # new parameters: redone
    assert calls == ["w.bin", "w.bin"] and job.is_done("train", "p2")
    done = [r for r in store.read_metrics() if r.get("event") == "stage_done"]
    assert [(r["job"], r["stage"], r["outputs"]) for r in done] == [(job.name, "train", 1)] * 2


def test_changed_or_missing_output_is_redone(store):
    job = store.job("j")
    calls = []
    job.run_stage("train", writer("w.bin", b"abc", calls), "p")
    (job.path / "w.bin").write_bytes(b"abd")  # same size, other bytes: only the hash tells
    assert not job.is_done("train", "p")
    assert study_status(store.root) == [StatusRow("j", "train", "changed", manifest(job)["stages"]["train"]["seconds"])]
    job.run_stage("train", writer("w.bin", b"abc", calls), "p")
    assert calls == ["w.bin"] * 2 and (job.path / "w.bin").read_bytes() == b"abc"
    (job.path / "w.bin").unlink()
    assert not job.is_done("train", "p")
    job.run_stage("train", writer("w.bin", b"abc", calls), "p")
    assert len(calls) == 3 and job.is_done("train", "p")


def test_redone_stage_leaves_no_stale_outputs(store):
    job = store.job("j")

    def two_files(j):
        (j.path / "sub").mkdir(exist_ok=True)
        write_bytes_atomic(j.path / "sub" / "a.bin", b"a")
        write_bytes_atomic(j.path / "b.bin", b"b")
        return ["sub/a.bin", j.path / "b.bin"]

    job.run_stage("sample", two_files, "v1")
    assert [o["path"] for o in manifest(job)["stages"]["sample"]["outputs"]] == ["sub/a.bin", "b.bin"]
    job.run_stage("sample", writer("c.bin", b"c"), "v2")
    assert [o["path"] for o in manifest(job)["stages"]["sample"]["outputs"]] == ["c.bin"]
    assert not (job.path / "b.bin").exists() and not (job.path / "sub" / "a.bin").exists()


def test_redoing_an_earlier_stage_invalidates_later_ones_when_its_bytes_change(store):
    job = store.job("j")
    calls = []

    def sample(j):
        calls.append("sample")
        write_bytes_atomic(j.path / "s.bin", (j.path / "w.bin").read_bytes()[::-1])
        return ["s.bin"]

    job.run_stage("train", writer("w.bin", b"w1"), "t1")
    job.run_stage("sample", sample, "s")
    inputs = manifest(job)["stages"]["sample"]["inputs"]
    assert inputs == [{"path": "w.bin", "sha256": hashlib.sha256(b"w1").hexdigest(), "bytes": 2}]
    job.run_stage("train", writer("w.bin", b"w1"), "t2")  # other parameters, same bytes: sample stays valid
    assert job.is_done("sample", "s")
    job.run_stage("train", writer("w.bin", b"w2"), "t3")
    assert not job.is_done("sample", "s")
    assert [r.status for r in study_status(store.root)] == ["done", "changed"]
    job.run_stage("sample", sample, "s")
    assert calls == ["sample"] * 2 and (job.path / "s.bin").read_bytes() == b"2w"
    (job.path / "w.bin").write_bytes(b"w9")  # a damaged input invalidates both
    assert not job.is_done("train", "t3") and not job.is_done("sample", "s")


def test_explicit_inputs_must_be_done(store):
    job = store.job("j")
    job.run_stage("a", writer("a.bin", b"a"), "1")
    with pytest.raises(
        StoreError, match=r"reads the outputs of stage 'b', which is not done \(missing\); run 'b' first"
    ):
        job.run_stage("c", writer("c.bin", b"c"), "1", inputs=["b"])
    (job.path / "a.bin").write_bytes(b"A")
    with pytest.raises(StoreError, match="stage 'a', which is not done .done, but its files changed."):
        job.run_stage("c", writer("c.bin", b"c"), "1", inputs=["a"])
    with pytest.raises(ValueError, match=r"list of stage names, got the string 'a'; write \['a'\]"):
        job.run_stage("c", writer("c.bin", b"c"), "1", inputs="a")
    with pytest.raises(ValueError, match="cannot be its own input"):
        job.run_stage("c", writer("c.bin", b"c"), "1", inputs=["c"])
    job.run_stage("b", writer("b.bin", b"b"), "1", inputs=[])  # independent of the damaged stage a
    assert manifest(job)["stages"]["b"]["inputs"] == []


def test_stage_outputs_are_checked(store, tmp_path):
    job = store.job("j")
    job.run_stage("a", writer("a.bin", b"a"), "1")
    (tmp_path / "outside.bin").write_bytes(b"x")
    cases = [
        (lambda j: [tmp_path / "outside.bin"], "outside the job directory"),
        (lambda j: ["../study.json"], "outside the job directory"),
        (lambda j: ["never-written.bin"], "never-written.bin, which is not a file it wrote"),
        (lambda j: ["manifest.json"], "reserves for itself"),
        (lambda j: ["a.bin"], "an output of stage 'a'"),
        (lambda j: "a.bin", "must return the list of files it wrote, got str"),
        (lambda j: None, "got NoneType"),
    ]
    for fn, message in cases:
        with pytest.raises(StoreError, match=message):
            job.run_stage("b", fn, "1")
        assert job.is_done("a", "1") and not job.is_done("b", "1")
        assert manifest(job)["stages"]["b"]["status"] == "failed"
    assert job.run_stage("b", lambda j: [], "1").outputs == ()


def test_failing_stage_is_recorded_and_reraised(store):
    job = store.job("j")

    def boom(j):
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        job.run_stage("train", boom, "1")
    record = manifest(job)["stages"]["train"]
    assert record["status"] == "failed" and record["error"] == "RuntimeError: diverged"
    assert [r.status for r in job.status()] == ["failed"]

    def full(j):
        raise OSError(errno.ENOSPC, "No space left on device", str(j.path / "big.bin"))

    with pytest.raises(StoreError, match=r"stage 'train' of job j cannot write .*big.bin: No space left on device"):
        job.run_stage("train", full, "1")
    job.run_stage("train", writer("w.bin", b"w"), "1")
    assert job.is_done("train", "1")


@pytest.mark.parametrize(
    "full, message",  # full: how the name of the file being written begins
    [
        (".manifest.json.", r"manifest.json: No space left on device .the previous file.*unchanged"),
        ("metrics.jsonl", r"metrics.jsonl: No space left on device; the lines already there are unchanged"),
    ],
)
def test_full_disk_while_recording_keeps_the_old_manifest(store, monkeypatch, full, message):
    job = store.job("j")
    job.run_stage("train", writer("w.bin", b"w"), "1")
    fsync = os.fsync

    def fsync_on_a_full_disk(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(full):
            enospc()
        fsync(fd)

    def sample_then_disk_full(j):
        write_bytes_atomic(j.path / "s.bin", b"s")
        monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
        return ["s.bin"]

    with pytest.raises(StoreError, match=message):
        job.run_stage("sample", sample_then_disk_full, "1")
    monkeypatch.undo()
    stages = manifest(job)["stages"]  # still valid JSON: the write went to a temporary file
    assert stages["train"]["status"] == "done" and stages["sample"]["status"] == "running"
    assert job.is_done("train", "1") and not job.is_done("sample", "1")
    assert [r.status for r in job.status()] == ["done", "interrupted"]
    assert not [p for p in job.path.iterdir() if p.name.endswith(".tmp")]
    job.run_stage("sample", writer("s.bin", b"s"), "1")
    assert job.is_done("sample", "1")


# metrics log


def test_metrics_log_appends_and_skips_a_line_cut_short(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"step": 1, "loss": 0.5})
    append_jsonl(path, {"step": 2, "loss": float("nan")})
    before = path.read_bytes()
    assert before.count(b"\n") == 2 and before.endswith(b"\n")
    with open(path, "ab") as f:
        f.write(b'{"step": 3, "lo')  # a crash in the middle of a line
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] != records[1]["loss"]
    append_jsonl(path, {"step": 4})
    after = path.read_bytes()
    assert after.startswith(before + b'{"step": 3, "lo\n')  # earlier lines are never rewritten
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 4]
    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(StoreError, match=r"cannot append to .*metrics.jsonl: No space left on device"):
        append_jsonl(path, {"step": 5})
    monkeypatch.undo()
    assert path.read_bytes() == after
    with pytest.raises(ValueError, match="must be a dict"):
        append_jsonl(path, [1])


def test_jobs_log_into_their_directories_and_the_study_merges(store):
    store.job("j").log_metrics({"loss": 0.25})
    store.log_metrics({"note": "all"})
    store.job("i").log_metrics({"loss": 0.5})
    assert [r["loss"] for r in read_jsonl(store.root / "j" / "metrics.jsonl")] == [0.25]
    assert store.job("i").read_metrics()[0]["job"] == "i"
    records = store.read_metrics()
    assert [(r.get("job"), r.get("loss"), r.get("note")) for r in records] == [
        ("j", 0.25, None),
        (None, None, "all"),
        ("i", 0.5, None),
    ]
    assert all(r["time"].startswith("20") for r in records)


# locks


def test_second_runner_is_refused_and_lock_is_reentrant(store):
    job, other = store.job("j"), store.job("j")
    with job.lock():
        with job.lock():  # reentrant for the holder
            job.run_stage("a", writer("a.bin", b"a"), "1")
        with pytest.raises(StoreError, match=rf"job j in .* is being run by pid {os.getpid()} on .*wait for it"):
            other.run_stage("a", writer("a.bin", b"a"), "1")
        with pytest.raises(StoreError, match="being run by"):
            with other.lock(timeout=0.1):
                pass
    assert (job.path / ".lock").read_bytes() == b""  # released: no pid left behind
    with other.lock():
        assert json.loads((job.path / ".lock").read_bytes())["pid"] == os.getpid()


HOLDER = textwrap.dedent(
    """
    import fcntl, json, os, socket, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}).encode())
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_lock_of_a_killed_runner_is_taken_over(store):
    job = store.job("j")
    job.path.mkdir()
    running = {"status": "running", "params_fingerprint": "1", "started": "t", "outputs": []}
    (job.path / "manifest.json").write_text(json.dumps({"format": 1, "job": "j", "stages": {"train": running}}))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(job.path / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=f"being run by pid {holder.pid} "):
            job.run_stage("train", writer("w.bin", b"w"), "1")
        assert [r.status for r in job.status()] == ["running"]
    finally:
        holder.kill()
        holder.wait()
    assert [r.status for r in job.status()] == ["interrupted"]  # its pid is left in the lock file, and dead
    assert job.run_stage("train", writer("w.bin", b"w"), "1").ran
    assert [r.status for r in job.status()] == ["done"]


def test_lock_removes_temporary_files_of_crashed_writes(store):
    job = store.job("j")
    (job.path / "sub").mkdir(parents=True)
    stray = [job.path / ".w.bin.k2j4_x9a.tmp", job.path / "sub" / ".s.npz.abcdefgh.tmp"]
    kept = [job.path / ".keep", job.path / "notes.tmp"]
    for p in stray + kept:
        p.write_bytes(b"partial")
    with job.lock():
        assert [p.exists() for p in stray + kept] == [False, False, True, True]


# status


def test_study_status_rows_and_table(store):
    for name in ("k-0004-seed-0", "k-0008-seed-0"):
        store.job(name).run_stage("train", writer("w.bin", b"w"), "1")
    store.job("k-0004-seed-0").run_stage("sample", writer("s.bin", b"s"), "1")
    rows = study_status(store.root)
    assert [(r.job, r.stage, r.status) for r in rows] == [
        ("k-0004-seed-0", "train", "done"),
        ("k-0004-seed-0", "sample", "done"),
        ("k-0008-seed-0", "train", "done"),
    ]
    assert all(r.seconds >= 0 for r in rows)
    table = format_status(rows).splitlines()
    assert table[0].split() == ["job", "train", "sample"]
    assert table[2].split() == ["k-0008-seed-0", "done", "-"]
    assert format_status([]) == "no stages recorded yet"


def test_damaged_manifest_is_reported(store):
    job = store.job("j")
    job.path.mkdir()
    (job.path / "manifest.json").write_text("{")
    with pytest.raises(StoreError, match=r"manifest.json is not valid JSON .*delete .*j to redo this job"):
        job.is_done("a", "1")


# crashes


def _result_files(root: Path) -> dict[str, bytes]:
    skip = {"manifest.json", ".lock", "metrics.jsonl", "study.json"}
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name not in skip
    }


def _check_readable(root: Path) -> None:
    for p in root.rglob("*.json"):
        json.loads(p.read_bytes())  # atomic writes: never a half-written JSON file
    assert {r.status for r in study_status(root)} <= {"done", "interrupted"}
    StudyStore.open(root).read_metrics()


@pytest.mark.slow
def test_study_killed_at_random_moments_resumes_to_identical_files(tmp_path):
    """Forked runs (no interpreter start-up, so the kills land in the stages) are killed with SIGKILL at
    seeded random moments; a fresh interpreter running the worker script then completes the study."""
    reference = tmp_path / "reference"
    t0 = time.perf_counter()
    store_worker.run_study(reference)
    seconds = time.perf_counter() - t0  # kill within a fifth of this, so that eight runs do not finish the study
    crashed = tmp_path / "crashed"
    rng = random.Random(0)
    fork = multiprocessing.get_context("fork")
    kills = 0
    for _ in range(8):
        proc = fork.Process(target=store_worker.run_study, args=(crashed,))
        proc.start()
        proc.join(timeout=rng.uniform(0.02, 0.2) * seconds)
        if proc.exitcode is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            kills += 1
        _check_readable(crashed)
    assert kills >= 6
    assert {r.status for r in study_status(crashed)} != {"done"}  # the kills left work to do
    subprocess.run([sys.executable, str(WORKER), str(crashed)], check=True, capture_output=True, timeout=60)

    assert _result_files(crashed) == _result_files(reference)  # byte-equal, and no stray temporary files
    for name in store_worker.CONFIG["ks"]:
        a, b = (json.loads((r / job_name(name, 0) / "manifest.json").read_bytes()) for r in (reference, crashed))
        assert {s: (r["outputs"], r["inputs"]) for s, r in a["stages"].items()} == {
            s: (r["outputs"], r["inputs"]) for s, r in b["stages"].items()
        }
    assert {r.status for r in study_status(crashed)} == {"done"}
    done = {(r["job"], r["stage"]) for r in StudyStore.open(crashed).read_metrics() if r.get("event") == "stage_done"}
    assert len(done) == len(store_worker.CONFIG["ks"]) * len(store_worker.STAGES)
    assert [r["ran"] for r in store_worker.run_study(crashed)] == [[]] * 3  # nothing left to redo
    # a line of a metrics log can only be cut short by a kill landing in its write
    lines = [line for p in crashed.rglob("metrics.jsonl") for line in p.read_text().splitlines() if line]
    assert sum(not _parses(line) for line in lines) <= kills


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True
