"""Tolerant readers of what a study wrote: the jobs of a K sweep and their optional result files.

A missing optional file reads as None; a file that exists but cannot be used also reads as None and leaves
a one-line note naming it (`Notes`), so a report can say what it skipped instead of silently dropping it.
Jobs are the folders DIR/<job>/analysis that a sweep writes (or DIR/jobs/<job>/analysis when there is a
DIR/jobs folder); K of a job is read from its classification.json.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SEED = re.compile(r"seed-(\d+)$")


@dataclass
class Notes:
    """Problems met while reading optional inputs; shown on the page and in summary.json."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.items.append(text)


@dataclass(frozen=True)
class Job:
    """One (K, seed) run of the study with its analysis folder."""

    name: str
    k: int
    seed: int | None  # from the job name (k-0008-seed-0); None when it does not say
    analysis: Path


def is_number(v) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _number(text) -> float | None:
    """A CSV cell as a float; None for empty, 'None' or unparsable cells."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_json(path: Path, notes: Notes) -> dict | None:
    """An optional JSON object: None when absent; None and a note when unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.add(f"{path} skipped: not valid JSON ({e})")
        return None
    if not isinstance(data, dict):
        notes.add(f"{path} skipped: expected a JSON object, got {type(data).__name__}")
        return None
    return data


def read_csv(path: Path, needed: Sequence[str], notes: Notes) -> list[dict] | None:
    """An optional CSV table: None when absent; None and a note when unreadable or lacking columns."""
    if not path.is_file():
        return None
    try:
        reader = csv.DictReader(io.StringIO(path.read_text()))
        rows = list(reader)
        columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        notes.add(f"{path} skipped: not a readable CSV table ({e})")
        return None
    missing = [c for c in needed if c not in columns]
    if missing:
        notes.add(f"{path} skipped: it lacks the columns {missing}")
        return None
    return rows


def read_png(path: Path, notes: Notes) -> bytes | None:
    """An optional PNG image's bytes: None when absent; None and a note when unreadable or not a PNG."""
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as e:
        notes.add(f"{path} skipped: {e.strerror}")
        return None
    if not data.startswith(PNG_SIGNATURE):
        notes.add(f"{path} skipped: not a PNG image")
        return None
    return data


def find_jobs(study_dir: str | Path, notes: Notes | None = None) -> list[Job]:
    """The jobs with a readable analysis/classification.json, sorted by (K, seed): the folders of DIR/jobs,
    or, for a study written without that level, the folders of DIR itself that hold an analysis folder."""
    notes = notes if notes is not None else Notes()
    root = Path(study_dir)
    jobs_dir = root / "jobs" if (root / "jobs").is_dir() else root
    jobs = []
    for job_dir in sorted(p for p in jobs_dir.iterdir() if p.is_dir()):
        analysis = job_dir / "analysis"
        if not analysis.is_dir():
            continue
        c = read_json(analysis / "classification.json", notes)
        if c is None:
            if not (analysis / "classification.json").exists():
                notes.add(f"job {job_dir.name} left out: {analysis / 'classification.json'} is missing")
            continue
        k = c.get("K")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            notes.add(f"job {job_dir.name} left out: classification.json has no positive integer K (got {k!r})")
            continue
        m = _SEED.search(job_dir.name)
        jobs.append(Job(job_dir.name, k, int(m.group(1)) if m else None, analysis))
    jobs.sort(key=lambda j: (j.k, -1 if j.seed is None else j.seed, j.name))
    return jobs


def _quartiles(values: Sequence[float | None]) -> dict:
    """Count, median and quartiles of the finite values (linear interpolation, as in analysis.py)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "median": None, "q25": None, "q75": None}
    q25, q50, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"n": int(v.size), "median": float(q50), "q25": float(q25), "q75": float(q75)}


@dataclass(frozen=True)
class ClassTable:
    """Per-point values of one analysis pooled over the seeds of each K, and their per-class quartiles."""

    values: dict  # {(K, class): {column: [float | None, ...]}}
    rows: list[dict]  # one per (K, class): K, class, n_jobs, then n and quartiles per column
    columns: tuple[str, ...]

    @property
    def ks(self) -> list[int]:
        return sorted({k for k, _ in self.values})


def class_table(
    jobs: Sequence[Job],
    filename: str,
    columns: Sequence[str],
    notes: Notes,
    classes: Sequence[str],
    *,
    count: tuple[str, Sequence[str]] | None = None,
) -> ClassTable | None:
    """Pool the per-point rows of analysis/<filename> by (K, class); None when no job has the file.

    classes: the order of the classes in the rows (others follow by name).
    count: (column, values) to also count per group, as n_<value> (e.g. basins' status 'no_basin')."""
    values: dict = {}
    n_jobs: dict = {}
    counted: dict = {}
    for job in jobs:
        rows = read_csv(job.analysis / filename, ("class", *columns), notes)
        if rows is None:
            continue
        for cls in {r["class"] for r in rows}:
            n_jobs[(job.k, cls)] = n_jobs.get((job.k, cls), 0) + 1
        for r in rows:
            group = values.setdefault((job.k, r["class"]), {c: [] for c in columns})
            for c in columns:
                group[c].append(_number(r[c]))
            if count is not None and r.get(count[0]) in count[1]:
                key = (job.k, r["class"], r[count[0]])
                counted[key] = counted.get(key, 0) + 1
    if not values:
        return None
    order = {c: i for i, c in enumerate(classes)}
    out = []
    for k, cls in sorted(values, key=lambda kc: (kc[0], order.get(kc[1], len(order)), kc[1])):
        row = {"K": k, "class": cls, "n_jobs": n_jobs[(k, cls)]}
        for c in columns:
            q = _quartiles(values[(k, cls)][c])
            row.update({f"{c}_n": q["n"], f"{c}_median": q["median"], f"{c}_q25": q["q25"], f"{c}_q75": q["q75"]})
        for value in count[1] if count is not None else ():
            row[f"n_{value}"] = counted.get((k, cls, value), 0)
        out.append(row)
    return ClassTable(values, out, tuple(columns))


__all__ = [
    "PNG_SIGNATURE",
    "ClassTable",
    "Job",
    "Notes",
    "class_table",
    "find_jobs",
    "is_number",
    "read_csv",
    "read_json",
    "read_png",
]
