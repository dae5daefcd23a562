"""The crash-safe run store of a study: one directory per study, one per (K, seed) job, a manifest per job.

    ROOT/study.json           the resolved config, its fingerprint, the creation time, the diffmem version
    ROOT/metrics.jsonl        append-only log of the driver, one JSON object per line
    ROOT/JOB/manifest.json    per stage: status, outputs (path, sha256, bytes), inputs, parameters, timing
    ROOT/JOB/metrics.jsonl    append-only log of the job (one writer: the job's lock holder, also on NFS)
    ROOT/JOB/.lock            held (flock) by the process running the job; names its pid while held
    ROOT/JOB/...              the stages' own files

Every file is written atomically (temporary file, fsync, rename), so a crash at any moment leaves each
file old or new, never half-written. A stage counts as done only if its manifest entry says so, its
parameters fingerprint matches, every output still has its recorded hash, and every input (the outputs
of the stages it read) still has the hash it had when the stage ran. A resumed run therefore redoes
exactly the stages that did not finish or whose inputs changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from diffmem.io import files
from diffmem.io.files import _FILE_MODE, VERSION, canonical_json_hash, write_bytes_atomic, write_json_atomic

STUDY_FILE = "study.json"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
FORMAT = 1
STAGE_STATUSES = ("done", "changed", "running", "interrupted", "failed")
RECORDED_STATUSES = ("done", "running", "failed")  # what a manifest holds; the others are derived when read

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TEMP_FILE = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # what write_bytes_atomic's mkstemp leaves after a crash
_MISSING = object()


class StoreError(ValueError):
    """A study directory that cannot be used as asked: made by another configuration, not a study,
    unwritable, full, or a job already being run by another process."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    outputs: tuple[Path, ...]  # absolute paths of the files the stage wrote
    seconds: float  # how long the stage took when it ran
    ran: bool  # False when it was already done and was skipped


@dataclass(frozen=True)
class StatusRow:
    job: str
    stage: str
    status: str  # one of STAGE_STATUSES
    seconds: float | None  # duration of the finished stage


fingerprint = canonical_json_hash  # sha256 of the canonical JSON of plain data: equal data, equal fingerprint


def job_name(k: int, seed: int) -> str:
    """The directory name of the job training on K examples with this seed, e.g. k-0032-seed-0."""
    return f"k-{k:04d}-seed-{seed}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )


def _write_json(path: Path, obj: Any) -> None:
    try:
        write_json_atomic(path, obj)
    except ValueError as e:  # write_bytes_atomic names the path and the reason; the old file is unchanged
        raise StoreError(str(e)) from e


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); {fix}") from e


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """diffmem.io.files.append_jsonl, failing with a StoreError."""
    try:
        files.append_jsonl(path, record)
    except ValueError as e:
        raise StoreError(str(e)) from e


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """diffmem.io.files.read_jsonl, failing with a StoreError."""
    try:
        return files.read_jsonl(path)
    except ValueError as e:
        raise StoreError(str(e)) from e


def _record_problem(record: Any) -> str | None:
    """What is wrong with one stage record of a manifest, or None."""
    if not isinstance(record, dict):
        return "not an object"
    if record.get("status") not in RECORDED_STATUSES:
        return f"status {record.get('status')!r} is none of {', '.join(RECORDED_STATUSES)}"
    if not isinstance(record.get("params_fingerprint", ""), str):
        return "params_fingerprint is not a string"
    if not isinstance(record.get("seconds", 0.0), int | float) or isinstance(record.get("seconds"), bool):
        return "seconds is not a number"
    for key in ("outputs", "inputs"):
        files = record.get(key, [])
        if not isinstance(files, list):
            return f"{key} is not a list"
        for f in files:
            if not (
                isinstance(f, dict)
                and isinstance(f.get("path"), str)
                and isinstance(f.get("sha256"), str)
                and isinstance(f.get("bytes"), int)
            ):
                return f"{key} holds {f!r}, not a {{path, sha256, bytes}} record"
    return None


class StudyStore:
    """A study directory. Use create_or_open (the driver) or open (a worker of an existing study)."""

    def __init__(self, root: Path, record: dict):
        self.root = root
        self.config: dict = record["config"]
        self.fingerprint: str = record["fingerprint"]
        self.created: str = record.get("created", "")
        self.version: str = record.get("diffmem_version", "")

    @classmethod
    def create_or_open(
        cls,
        root: str | os.PathLike,
        config: dict,
        fingerprint: str,
        *,
        fingerprint_of: Callable[[dict], str] | None = None,
    ) -> StudyStore:
        """Create the study in root (missing or empty), or reopen it to resume when it was made with
        the same fingerprint. Anything else is a StoreError: results of two configurations are never mixed.
        fingerprint_of(config) recomputes a stored config's fingerprint (see open)."""
        if not isinstance(config, dict):
            raise ValueError(f"config must be a dict of the resolved options, got {type(config).__name__}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("fingerprint must be a non-empty string, e.g. diffmem.study.store.fingerprint(config)")
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config must be plain JSON data to be stored in {STUDY_FILE}: {e}") from None
        root = Path(root).resolve()  # job paths and the outputs stages return are absolute from here on
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the study directory {root}: {e.strerror}; choose another --out") from e
        if not os.access(root, os.W_OK | os.X_OK):
            raise StoreError(f"the study directory {root} is not writable; choose another --out")
        study_file = root / STUDY_FILE
        if not study_file.exists():
            others = sorted(n for n in os.listdir(root) if n != STUDY_FILE and not _TEMP_FILE.fullmatch(n))
            if others and not study_file.exists():
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                raise StoreError(
                    f"{root} is not empty ({shown}) and holds no {STUDY_FILE}, so it is not a diffmem study; "
                    "choose a new or empty --out directory"
                )
            record = {
                "format": FORMAT,
                "fingerprint": fingerprint,
                "created": _now(),
                "diffmem_version": VERSION,
                "config": config,
            }
            _create_exclusive(study_file, (json.dumps(record, indent=2) + "\n").encode())
        store = cls.open(root, fingerprint_of=fingerprint_of)
        if store.fingerprint != fingerprint:
            new = json.loads(json.dumps(config))  # the form it would have been stored in (tuples become lists)
            keys = sorted(
                k for k in store.config.keys() | new.keys() if store.config.get(k, _MISSING) != new.get(k, _MISSING)
            )
            what = f"differing keys: {', '.join(keys)}" if keys else "equal configs, but the fingerprints differ"
            raise StoreError(
                f"{root} holds a study made by a different configuration (fingerprint {store.fingerprint[:12]}, "
                f"now {fingerprint[:12]}; {what}); results are never mixed: pick a new --out directory, "
                "or rerun with the original configuration to resume it"
            )
        return store

    @classmethod
    def open(cls, root: str | os.PathLike, *, fingerprint_of: Callable[[dict], str] | None = None) -> StudyStore:
        """An existing study, as it was created. With fingerprint_of, the stored config must still have
        the stored fingerprint: a study.json edited by hand is refused, never silently obeyed."""
        root = Path(root).resolve()
        study_file = root / STUDY_FILE
        if not study_file.is_file():
            raise StoreError(f"{root} holds no {STUDY_FILE}: it is not a study directory (create it first)")
        record = _read_json(study_file, "the study directory is damaged; start the study in a new --out directory")
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or "fingerprint" not in record:
            raise StoreError(f"{study_file} has no config or fingerprint: it was not written by diffmem")
        if fingerprint_of is not None:
            try:
                actual = fingerprint_of(record["config"])
            except ValueError as e:
                actual = f"none: the stored configuration is invalid ({e})"
            if actual != record["fingerprint"]:
                raise StoreError(
                    f"{study_file} was changed after the study was created: its configuration no longer has its "
                    f"fingerprint {str(record['fingerprint'])[:12]} (it has {actual[:80]}); restore the file, or start "
                    "a new study in another --out directory"
                )
        return cls(root, record)

    def job(self, name: str) -> JobStore:
        """The job directory ROOT/name (created when the job is first locked)."""
        _check_name("job", name)
        return JobStore(self, name)

    def job_names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))

    def log_metrics(self, record: dict) -> None:
        """Append to the study's own log (the driver's; jobs log into their directories)."""
        append_jsonl(self.root / METRICS_FILE, {"time": _now(), **record})

    def read_metrics(self) -> list[dict]:
        """The study's log and every job's log, merged in time order."""
        records = read_jsonl(self.root / METRICS_FILE)
        for name in self.job_names():
            records += read_jsonl(self.root / name / METRICS_FILE)
        return sorted(records, key=lambda r: str(r.get("time", "")))


def _create_exclusive(path: Path, data: bytes) -> None:
    """Write path complete or not at all, and only if it does not exist yet: when another process
    created the study first, create_or_open compares fingerprints next."""
    try:
        write_bytes_atomic(path, data, exclusive=True)
    except ValueError as e:
        raise StoreError(f"{e}; choose another --out") from e


class JobStore:
    """One job's directory and manifest. Stages run through run_stage under the job's lock."""

    def __init__(self, study: StudyStore, name: str):
        self.study = study
        self.name = name
        self.path = study.root / name
        self._lock_fd: int | None = None
        self._lock_depth = 0

    def __repr__(self) -> str:
        return f"JobStore({str(self.path)!r})"

    # manifest

    def manifest(self) -> dict:
        path = self.path / MANIFEST_FILE
        if not path.exists():
            return {"format": FORMAT, "job": self.name, "stages": {}}
        manifest = _read_json(path, f"delete {self.path} to redo this job")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
            raise StoreError(
                f"{path} has no stages: it was not written by diffmem; delete {self.path} to redo this job"
            )
        for stage, record in manifest["stages"].items():
            problem = _record_problem(record)
            if problem:
                raise StoreError(
                    f"{path} is damaged (stage {stage!r}: {problem}); nothing was read or deleted; "
                    f"delete {self.path} to redo this job"
                )
            for f in record.get("outputs", []) + record.get("inputs", []):
                self.file(f["path"])  # refuses a path out of the job before anything reads or deletes it
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        _write_json(self.path / MANIFEST_FILE, manifest)

    def file(self, rel: str) -> Path:
        """The job's file at the manifest path rel: a relative path that stays inside the job directory
        (no '..', not absolute, no link out of it). Anything else is refused, so the store never reads,
        hashes or deletes a file outside its study."""
        path = Path(rel)
        base = self.path.resolve()
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise StoreError(f"{self.path / MANIFEST_FILE} lists {rel!r}, which is not a path inside the job; refused")
        if not (self.path / path).resolve().is_relative_to(base):
            raise StoreError(
                f"{self.path / MANIFEST_FILE} lists {rel!r}, which leads out of the job directory {self.path}; refused"
            )
        return self.path / path

    def _files_match(self, records: Iterable[dict]) -> bool:
        for r in records:
            path = self.file(r["path"])
            try:
                if path.stat().st_size != r["bytes"] or _sha256(path) != r["sha256"]:
                    return False
            except OSError:
                return False
        return True

    def _valid(self, record: dict | None) -> bool:
        return (
            record is not None
            and record.get("status") == "done"
            and self._files_match(record["outputs"])
            and self._files_match(record["inputs"])
        )

    def is_done(self, stage: str, params_fingerprint: str) -> bool:
        """Done with these parameters, with every output and input file as it was when the stage ran."""
        record = self.manifest()["stages"].get(stage)
        return self._valid(record) and record["params_fingerprint"] == params_fingerprint

    # running stages

    def run_stage(
        self,
        stage: str,
        fn: Callable[[JobStore], Sequence[str | os.PathLike]],
        params_fingerprint: str,
        *,
        inputs: Sequence[str] | None = None,
    ) -> StageResult:
        """Run fn(job) unless the stage is done (is_done); fn writes its files under job.path with
        diffmem.io.files.write_bytes_atomic and returns their paths (absolute or relative to job.path).

        inputs names the stages whose outputs fn reads (default: every stage recorded before this
        one); their hashes are recorded, so redoing one of them with a different result invalidates
        this stage. A stage that is redone first deletes its previous outputs."""
        _check_name("stage", stage)
        if not isinstance(params_fingerprint, str):
            raise ValueError(f"params_fingerprint must be a string, got {type(params_fingerprint).__name__}")
        with self.lock():
            manifest = self.manifest()
            stages = manifest["stages"]
            old = stages.get(stage)
            if self._valid(old) and old["params_fingerprint"] == params_fingerprint:
                return StageResult(stage, tuple(self.file(o["path"]) for o in old["outputs"]), old["seconds"], False)
            input_records = self._input_records(stages, stage, inputs)
            stale = [self.file(o["path"]) for o in old["outputs"]] if old else []  # checked before anything changes
            started = _now()
            # the old outputs stay listed until the new ones are recorded, so a crash in between deletes them next time
            stages[stage] = {
                "status": "running",
                "params_fingerprint": params_fingerprint,
                "started": started,
                "outputs": old["outputs"] if old else [],
            }
            self._write_manifest(manifest)
            for path in stale:
                path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            try:
                returned = fn(self)
                seconds = time.perf_counter() - t0
                outputs = self._output_records(stages, stage, returned)
            except Exception as e:  # an interrupt leaves the stage "running": its status reads "interrupted"
                stages[stage] = {**stages[stage], "status": "failed", "error": f"{type(e).__name__}: {e}"}
                with contextlib.suppress(StoreError):  # a full disk: the original error matters, "running" is kept
                    self._write_manifest(manifest)
                if isinstance(e, OSError):
                    raise StoreError(
                        f"stage {stage!r} of job {self.name} cannot write {e.filename}: {e.strerror}"
                    ) from e
                raise
            stages[stage] = {
                "status": "done",
                "params_fingerprint": params_fingerprint,
                "outputs": outputs,
                "inputs": input_records,
                "started": started,
                "finished": _now(),
                "seconds": seconds,
            }
            # logged before the commit, like the stage's own metrics: a done stage always has its record (a
            # crash in between logs it twice)
            self.log_metrics({"stage": stage, "event": "stage_done", "seconds": seconds, "outputs": len(outputs)})
            self._write_manifest(manifest)
            return StageResult(stage, tuple(self.file(o["path"]) for o in outputs), seconds, True)

    def _input_records(self, stages: dict, stage: str, inputs: Sequence[str] | None) -> list[dict]:
        if inputs is None:
            names = list(stages)
            inputs = names[: names.index(stage)] if stage in stages else names
        elif isinstance(inputs, str):
            raise ValueError(f"inputs must be a list of stage names, got the string {inputs!r}; write [{inputs!r}]")
        records = []
        for name in inputs:
            if name == stage:
                raise ValueError(f"stage {stage!r} cannot be its own input")
            record = stages.get(name)
            if not self._valid(record):
                status = "missing" if record is None else record.get("status", "?")
                if status == "done":
                    status = "done, but its files changed"
                raise StoreError(
                    f"stage {stage!r} of job {self.name} reads the outputs of stage {name!r}, which is not done "
                    f"({status}); run {name!r} first"
                )
            records += record["outputs"]
        return records

    def _output_records(self, stages: dict, stage: str, returned: Any) -> list[dict]:
        if isinstance(returned, (str, os.PathLike)) or not isinstance(returned, Iterable):
            raise StoreError(
                f"stage {stage!r} must return the list of files it wrote, got {type(returned).__name__}; "
                "return [] for a stage without files"
            )
        owned = {o["path"]: s for s, r in stages.items() if s != stage for o in r.get("outputs", [])}
        base = self.path.resolve()
        records: list[dict] = []
        seen = set()
        for item in returned:
            path = Path(item)
            path = (path if path.is_absolute() else self.path / path).resolve()
            if not path.is_relative_to(base):
                raise StoreError(f"stage {stage!r} returned {item}, which is outside the job directory {self.path}")
            rel = path.relative_to(base).as_posix()
            if rel in (MANIFEST_FILE, LOCK_FILE, METRICS_FILE) or _TEMP_FILE.fullmatch(path.name):
                raise StoreError(f"stage {stage!r} returned {rel}, a name the store reserves for itself")
            if not path.is_file():
                raise StoreError(f"stage {stage!r} returned {rel}, which is not a file it wrote")
            if rel in owned:
                raise StoreError(f"stage {stage!r} returned {rel}, an output of stage {owned[rel]!r}")
            if rel not in seen:
                seen.add(rel)
                records.append({"path": rel, "sha256": _sha256(path), "bytes": path.stat().st_size})
        return records

    # locking

    @contextlib.contextmanager
    def lock(self, timeout: float = 0.0) -> Iterator[JobStore]:
        """Hold the job for this process (reentrant). Another holder gives a StoreError after timeout
        seconds. flock is released by the kernel when its process dies, so a dead runner's lock is
        taken over; on acquiring, temporary files left by a crashed write are removed."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        self._acquire(timeout)
        self._lock_depth = 1
        try:
            yield self
        finally:
            self._lock_depth = 0
            self._release()

    def _acquire(self, timeout: float) -> None:
        path = self.path / LOCK_FILE
        if self.path.is_symlink() or (self.path.exists() and self.path.resolve().parent != self.study.root):
            raise StoreError(
                f"the job directory {self.path} is a link out of the study {self.study.root}; refused "
                "(the store writes only inside its study directory)"
            )
        try:
            self.path.mkdir(exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as e:
            raise StoreError(f"cannot create the job lock {path}: {e.strerror}") from e
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    holder = self._holder()
                    by = (
                        f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
                        if holder
                        else "another process"
                    )
                    raise StoreError(
                        f"job {self.name} in {self.study.root} is being run by {by}; wait for it to finish or stop "
                        "that process (the lock of a process that died is taken over automatically)"
                    ) from None
                time.sleep(0.05)
            except OSError as e:
                os.close(fd)
                raise StoreError(f"cannot lock {path}: {e.strerror}") from e
        try:
            os.ftruncate(fd, 0)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
            os.pwrite(fd, json.dumps(info).encode(), 0)
            self._remove_temp_files()
        except OSError as e:
            os.close(fd)
            raise StoreError(f"cannot write the job lock {path}: {e.strerror}") from e
        self._lock_fd = fd

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a pid left in the file means its process died holding the job
        os.close(fd)

    def _holder(self) -> dict | None:
        try:
            info = json.loads((self.path / LOCK_FILE).read_bytes() or b"null")
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and {"pid", "host", "since"} <= info.keys() else None

    def _remove_temp_files(self) -> None:
        for folder, _, names in os.walk(self.path):
            for name in names:
                if _TEMP_FILE.fullmatch(name):
                    Path(folder, name).unlink(missing_ok=True)

    def _holder_alive(self) -> bool:
        """Whether some process holds the job's lock, asked of the lock itself (a pid may have been
        reused, and a holder on another machine has no pid here)."""
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            return False
        except OSError:
            return self._holder() is not None  # unreadable: trust what the lock file says
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return self._holder() is not None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    # metrics and status

    def log_metrics(self, record: dict) -> None:
        """Append to the job's metrics log, tagged with the time and this job's name."""
        self.path.mkdir(exist_ok=True)
        append_jsonl(self.path / METRICS_FILE, {"time": _now(), "job": self.name, **record})

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.path / METRICS_FILE)

    def status(self) -> list[StatusRow]:
        rows = []
        for stage, record in self.manifest()["stages"].items():
            status = record.get("status")
            if status == "done":
                status = "done" if self._valid(record) else "changed"
            elif status == "running" and not self._holder_alive():
                status = "interrupted"
            rows.append(StatusRow(self.name, stage, status, record.get("seconds")))
        return rows


def study_status(root: str | os.PathLike) -> list[StatusRow]:
    """One row per (job, stage) recorded in the study at root. Status: done; changed (an output or
    input file changed since, so it will be redone); running; interrupted (its process died); failed."""
    store = StudyStore.open(root)
    return [row for name in store.job_names() for row in store.job(name).status()]


def format_status(rows: Sequence[StatusRow]) -> str:
    """A job x stage table of statuses, stages in the order they first appear."""
    if not rows:
        return "no stages recorded yet"
    stages = list(dict.fromkeys(r.stage for r in rows))
    jobs = list(dict.fromkeys(r.job for r in rows))
    cell = {(r.job, r.stage): r.status for r in rows}
    width = max(11, *(len(s) for s in stages))
    first = max(3, *(len(j) for j in jobs))
    lines = [f"{'job':<{first}}  " + "  ".join(f"{s:<{width}}" for s in stages)]
    for j in jobs:
        lines.append(f"{j:<{first}}  " + "  ".join(f"{cell.get((j, s), '-'):<{width}}" for s in stages))
    return "\n".join(line.rstrip() for line in lines)
