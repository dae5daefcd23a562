"""The report of a K sweep (SCIENCE.md §5-§7): one self-contained HTML page and the tables behind it.

`write_report(DIR)` reads what a study wrote and writes DIR/report/:

  report.html              every figure embedded as a base64 PNG; no scripts, no external resources
  phase.csv                f_M, f_S, f_G with their bootstrap intervals and N per K (from DIR/phase.json)
  basins_by_class.csv      per K and class: quartiles of the critical level sigma_c and the basin radius
  energy_by_class.csv      per K and class: quartiles of the relative energy and of the path discrepancy
  curvature_by_class.csv   per K and class: quartiles of the extreme Hessian eigenvalues of -log p
  collapse_by_class.csv    per K and class: quartiles of the collapse levels
  census_by_job.csv        per job: counts and basin shares of memories, spurious minima and saddles
  two_model.csv            agreement of two models on disjoint training sets, per K
  summary.json             transitions, the sections shown and the reasons any were left out
  *.png                    the figures of the page, also as files

Only DIR/phase.json is required (written by `diffmem sweep CONFIG --out DIR`). Every other part is
optional: a section whose inputs are missing is left out, with a one-line note saying what would
produce it, and a file that cannot be read is named in the notes rather than silently dropped.
Jobs are the folders DIR/<job>/analysis that a sweep writes (or DIR/jobs/<job>/analysis when there is
a DIR/jobs folder); K of a job is read from its classification.json.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffmem.evaluate.classify import CLASSES, transition_points  # noqa: E402
from diffmem.viz.figures import CLASS_COLORS, KIND_STYLE  # noqa: E402
from diffmem.io.files import write_bytes_atomic, write_json_atomic  # noqa: E402

POINT_CLASSES = (*CLASSES, "training")  # basins, energy and curvature also measure training examples
KINDS = tuple(KIND_STYLE)  # census kinds: memory, spurious, saddle
FRACTIONS = {"memorized": "f_M", "spurious": "f_S", "generalized": "f_G"}
SWEEP_HINT = "produce it with `diffmem sweep CONFIG --out {root}`"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_GALLERIES = 6  # galleries shown; with more K, the ends, the transitions and a spread over the sweep

SECTIONS = {
    "phase": "Phase diagram",
    "galleries": "Galleries",
    "basins": "Critical times",
    "energy": "Energy and curvature",
    "census": "Fixed-point census",
    "two_model": "Two-model test",
    "collapse": "Collapse levels",
    "landscape": "2D landscape",
}


# --- reading ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One (K, seed) run of the study with its analysis folder."""

    name: str
    k: int
    seed: int | None  # from the job name (k-0008-seed-0); None when it does not say
    analysis: Path


@dataclass(frozen=True)
class Phase:
    """The contents of DIR/phase.json, validated; rows sorted by K."""

    metric: str
    rows: tuple[dict, ...]
    transitions: dict
    transitions_computed: bool  # True when phase.json had none and they were derived from the rows
    confidence: float = 0.95  # level of the intervals

    @property
    def level(self) -> str:
        return f"{100 * self.confidence:g}%"


@dataclass
class _Notes:
    """Problems met while reading optional inputs; shown on the page and in summary.json."""

    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.items.append(text)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def load_phase(study_dir: str | Path) -> Phase:
    """Read and validate DIR/phase.json; a missing or malformed file is a ValueError that says how to make it."""
    root = Path(study_dir)
    path = root / "phase.json"
    hint = SWEEP_HINT.format(root=root)
    if not path.is_file():
        raise ValueError(f"{path} is missing: the report needs the phase diagram of the study; {hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {hint}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
        raise ValueError(f"{path} holds no per-K rows (expected an object with a non-empty 'rows' list); {hint}")
    rows = []
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: rows[{i}] is not an object; {hint}")
        missing = [key for key in ("K", "n_samples", *FRACTIONS.values()) if key not in row]
        if missing:
            raise ValueError(
                f"{path}: rows[{i}] lacks {missing} (a phase row needs K, n_samples, f_M, f_S, f_G); {hint}"
            )
        for key in ("K", "n_samples"):
            if isinstance(row[key], bool) or not isinstance(row[key], int) or row[key] < 1:
                raise ValueError(f"{path}: rows[{i}].{key} must be a positive integer, got {row[key]!r}; {hint}")
        for f in FRACTIONS.values():
            for key in (f, f"{f}_low", f"{f}_high"):
                v = row.get(key)
                if key != f and v is None:
                    continue
                if not _is_number(v) or not 0 <= v <= 1:
                    raise ValueError(f"{path}: rows[{i}].{key} must be a fraction in [0, 1], got {v!r}; {hint}")
        rows.append(dict(row))
    ks = [r["K"] for r in rows]
    if len(set(ks)) != len(ks):
        raise ValueError(f"{path}: K values repeat ({sorted(ks)}); one row per K is expected; {hint}")
    rows.sort(key=lambda r: r["K"])
    transitions = data.get("transitions")
    computed = transitions is None
    if computed:
        transitions = transition_points(rows)
    elif not isinstance(transitions, dict):
        raise ValueError(f"{path}: 'transitions' must be an object, got {type(transitions).__name__}; {hint}")
    for key in ("last_memorizing_K", "first_generalizing_K", "spurious_peak_K"):
        v = transitions.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{path}: transitions.{key} must be an integer K or null, got {v!r}; {hint}")
    metric = data.get("metric", "unknown")
    confidence = data.get("confidence", 0.95)
    if not (_is_number(confidence) and 0 < confidence < 1):
        raise ValueError(f"{path}: 'confidence' must be a number in (0, 1), got {confidence!r}; {hint}")
    return Phase(str(metric), tuple(rows), dict(transitions), computed, float(confidence))


def _read_json(path: Path, notes: _Notes) -> dict | None:
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


def _number(text) -> float | None:
    """A CSV cell as a float; None for empty, 'None' or unparsable cells."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _read_csv(path: Path, needed: Sequence[str], notes: _Notes) -> list[dict] | None:
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


def _read_png(path: Path, notes: _Notes) -> bytes | None:
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


_SEED = re.compile(r"seed-(\d+)$")


def find_jobs(study_dir: str | Path, notes: _Notes | None = None) -> list[Job]:
    """The jobs with a readable analysis/classification.json, sorted by (K, seed): the folders of DIR/jobs,
    or, for a study written without that level, the folders of DIR itself that hold an analysis folder."""
    notes = notes if notes is not None else _Notes()
    root = Path(study_dir)
    jobs_dir = root / "jobs" if (root / "jobs").is_dir() else root
    jobs = []
    for job_dir in sorted(p for p in jobs_dir.iterdir() if p.is_dir()):
        analysis = job_dir / "analysis"
        if not analysis.is_dir():
            continue
        c = _read_json(analysis / "classification.json", notes)
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


# --- aggregation --------------------------------------------------------------------------------------------


def _quartiles(values: Sequence[float]) -> dict:
    """Count, median and quartiles of the finite values (linear interpolation, as in analysis.py)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "median": None, "q25": None, "q75": None}
    q25, q50, q75 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"n": int(v.size), "median": float(q50), "q25": float(q25), "q75": float(q75)}


@dataclass(frozen=True)
class ClassTable:
    """Per-point values of one analysis pooled over the seeds of each K, and their per-class quartiles."""

    values: dict  # {(K, class): {column: [float, ...]}}
    rows: list[dict]  # one per (K, class): K, class, n_jobs, then n and quartiles per column
    columns: tuple[str, ...]

    @property
    def ks(self) -> list[int]:
        return sorted({k for k, _ in self.values})


def _class_table(
    jobs: Sequence[Job],
    filename: str,
    columns: Sequence[str],
    notes: _Notes,
    classes: Sequence[str],
    *,
    count: tuple[str, Sequence[str]] | None = None,
) -> ClassTable | None:
    """Pool the per-point rows of analysis/<filename> by (K, class); None when no job has the file.

    count: (column, values) to also count per group, as n_<value> (e.g. basins' status 'no_basin')."""
    values: dict = {}
    n_jobs: dict = {}
    counted: dict = {}
    for job in jobs:
        rows = _read_csv(job.analysis / filename, ("class", *columns), notes)
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


# --- figures ------------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _mark_transitions(ax, transitions: dict, *, neutral: bool = False) -> None:
    """Vertical lines at the memorization and generalization transitions (SCIENCE.md §5); neutral: grey
    lines, for figures whose colours already stand for something else."""
    for key, color, style, text in (
        ("last_memorizing_K", CLASS_COLORS["memorized"], "--", "last memorizing K"),
        ("first_generalizing_K", CLASS_COLORS["generalized"], "-.", "first generalizing K"),
    ):
        k = transitions.get(key)
        if k is not None:
            ax.axvline(k, color="0.3" if neutral else color, ls=style, lw=1.2, label=f"{text} = {k}")


def phase_figure(phase: Phase) -> bytes:
    """f_M, f_S, f_G against K on a log axis, bootstrap intervals as bands and error bars."""
    rows = phase.rows
    ks = np.array([r["K"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(9.0, 4.2), layout="constrained")
    for cls, f in FRACTIONS.items():
        value = np.array([r[f] for r in rows])
        color = CLASS_COLORS[cls]
        has_ci = all(r.get(f"{f}_low") is not None and r.get(f"{f}_high") is not None for r in rows)
        if has_ci:
            low = np.array([r[f"{f}_low"] for r in rows])
            high = np.array([r[f"{f}_high"] for r in rows])
            ax.fill_between(ks, low, high, color=color, alpha=0.15, lw=0)
            err = np.vstack([np.maximum(value - low, 0), np.maximum(high - value, 0)])  # (2, n_K)
            ax.errorbar(ks, value, yerr=err, color=color, marker="o", ms=4, capsize=3, label=f"{f} ({cls})")
        else:
            ax.plot(ks, value, color=color, marker="o", ms=4, label=f"{f} ({cls}, no interval)")
    _mark_transitions(ax, phase.transitions)
    peak_k, peak_f = phase.transitions.get("spurious_peak_K"), phase.transitions.get("spurious_peak_fraction")
    if peak_k is not None and _is_number(peak_f):
        ax.plot([peak_k], [peak_f], marker="*", ms=16, color=CLASS_COLORS["spurious"], mec="k", ls="none")
        ax.annotate(
            f"spurious peak\nK = {peak_k}, f_S = {peak_f:.2f}",
            (peak_k, peak_f),
            textcoords="offset points",
            xytext=(8, 10),
            fontsize=8,
            color=CLASS_COLORS["spurious"],
        )
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training-set size K (log scale)")
    ax.set_ylabel("fraction of the N generated samples")
    ns = sorted({r["n_samples"] for r in rows})
    n_text = f"N = {ns[0]} per K" if len(ns) == 1 else f"N = {ns[0]}..{ns[-1]} per K"
    ax.set_title(f"Phase diagram ({phase.metric} distance, {n_text}, {phase.level} bootstrap intervals)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def _axis_scale(values: Sequence[float]) -> str:
    """'log' for positive values spread over more than a decade and a half, else 'linear'."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if v and min(v) > 0 and max(v) / min(v) > 30:
        return "log"
    return "linear"


def _strip_axes(ax, table: ClassTable, column: str, classes: Sequence[str], *, ylabel: str) -> None:
    """Per K (one slot each) and class (side by side in the slot): every point over a bar from the first to
    the third quartile, the median marked."""
    ks = table.ks
    present = [c for c in classes if any((k, c) in table.values for k in ks)]
    width = 0.8 / max(1, len(present))
    everything = []
    for j, cls in enumerate(present):
        color = CLASS_COLORS.get(cls, "k")
        pos, q25, q50, q75, points_x, points_y = [], [], [], [], [], []
        for i, k in enumerate(ks):
            raw = table.values.get((k, cls), {}).get(column, [])
            v = np.array([x for x in raw if x is not None and math.isfinite(x)], dtype=float)
            if v.size == 0:
                continue
            p = i - 0.4 + width * (j + 0.5)
            q = np.quantile(v, [0.25, 0.5, 0.75])
            pos.append(p)
            q25.append(q[0])
            q50.append(q[1])
            q75.append(q[2])
            # evenly spread offsets (no random jitter, so the figure is reproducible)
            points_x += (p + np.linspace(-0.3, 0.3, v.size) * width if v.size > 1 else np.full(1, p)).tolist()
            points_y += v.tolist()
        if not pos:
            continue
        everything += points_y
        # one call per class for all K keeps the figure cheap to draw
        height = np.array(q75) - np.array(q25)
        ax.bar(pos, height, width=0.8 * width, bottom=q25, color=color, alpha=0.25, edgecolor=color, label=cls)
        ax.hlines(q50, np.array(pos) - 0.4 * width, np.array(pos) + 0.4 * width, color=color, lw=1.5)
        ax.scatter(points_x, points_y, s=8, color=color, alpha=0.8, zorder=3, lw=0)
    ax.set_xticks(range(len(ks)), [f"K = {k}" for k in ks], fontsize=8)
    ax.set_xlim(-0.6, len(ks) - 0.4)
    ax.set_xlabel("training-set size K (all seeds pooled)")
    ax.set_ylabel(ylabel)
    ax.set_yscale(_axis_scale(everything))
    ax.grid(axis="y", alpha=0.3)


def strip_figure(
    table: ClassTable,
    panels: Sequence[tuple[str, str]],
    classes: Sequence[str],
    *,
    title: str,
    reference: Callable | None = None,
) -> bytes:
    """One panel per (column, y label); reference(ax, column) may draw a guide line."""
    width = max(5.0, 1.1 * len(table.ks) + 2.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8), squeeze=False, layout="constrained")
    for ax, (column, ylabel) in zip(axes[0], panels, strict=True):
        _strip_axes(ax, table, column, classes, ylabel=ylabel)
        if reference is not None:
            reference(ax, column)
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=len(legend), fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def census_figure(rows: Sequence[dict], transitions: dict) -> bytes:
    """Counts and basin shares of memories, spurious minima and saddles against K, one point per job."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    ks = sorted({r["K"] for r in rows})
    for kind, style in KIND_STYLE.items():
        for a, prefix in ((ax, "n_"), (ax2, "share_")):
            per_job = [(r["K"], r[prefix + kind]) for r in rows if r[prefix + kind] is not None]
            if not per_job:
                continue
            a.scatter(*zip(*per_job, strict=True), color=style["color"], marker=style["marker"], s=18, alpha=0.6)
            mean = [
                float(np.mean([v for kk, v in per_job if kk == k])) for k in ks if any(kk == k for kk, _ in per_job)
            ]
            mean_ks = [k for k in ks if any(kk == k for kk, _ in per_job)]
            a.plot(mean_ks, mean, color=style["color"], lw=1.2, label=kind)
    for a, ylabel in ((ax, "number of attractors"), (ax2, "share of starts captured")):
        a.set_xscale("log")
        a.set_xlabel("training-set size K (log scale)")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3, which="both")
        _mark_transitions(a, transitions, neutral=True)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=5, fontsize=7)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax2.set_ylim(-0.02, 1.02)
    sigmas = sorted({r["sigma"] for r in rows if r["sigma"] is not None})
    at = ", ".join(f"{s:g}" for s in sigmas) or "?"
    fig.suptitle(f"Fixed points of the trained denoiser at sigma = {at} (lines: mean over seeds)", fontsize=9)
    return _png(fig)


def two_model_figure(rows: Sequence[dict], transitions: dict) -> bytes:
    """Agreement of two models on disjoint training sets, sampled from the same noise, against K."""
    ks = [r["K"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 3.8), layout="constrained")
    ax.plot(ks, [r["agreement"] for r in rows], "o-", color="tab:purple", label="agreement (distance <= delta)")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training-set size K of each model (log scale)")
    ax.set_ylabel("agreement fraction")
    _mark_transitions(ax, transitions)
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    distances = [(r["K"], r["mean_distance"]) for r in rows if r.get("mean_distance") is not None]
    if distances:
        ax2 = ax.twinx()
        ax2.plot(*zip(*distances, strict=True), "s--", color="0.4", label="mean distance")
        ax2.set_ylabel("mean distance between the two samples")
        handles += ax2.get_legend_handles_labels()[0]
        labels += ax2.get_legend_handles_labels()[1]
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=7)
    fig.suptitle("Two models, same noise: agreement rises from 0 (own copies) to 1 (the same image)", fontsize=9)
    return _png(fig)


# --- HTML ---------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #ffffff; line-height: 1.45; }
main { max-width: 1180px; margin: 0 auto; padding: 1.5em 2em 4em; }
h1 { font-size: 1.7em; margin: 0.2em 0; }
h2 { border-bottom: 2px solid #d5dae3; padding-bottom: 0.2em; margin-top: 2em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ec; }
figcaption { font-size: 0.92em; color: #4a5263; margin-top: 0.3em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.8em 0; }
th, td { border: 1px solid #d5dae3; padding: 0.25em 0.6em; text-align: right; }
th { background: #f1f3f7; }
td.text, th.text { text-align: left; }
.meta { color: #4a5263; }
.transitions { background: #f6f8fb; border-left: 4px solid #5470c6; padding: 0.6em 1em; }
.notes { font-size: 0.9em; color: #6b5b00; }
.galleries { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 1em; }
pre { background: #f6f8fb; padding: 0.8em; overflow-x: auto; font-size: 0.82em; }
nav a { margin-right: 1em; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def _img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{_e(alt)}">'


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{_img(png, alt)}<figcaption>{_e(caption)}</figcaption></figure>"


def _table(columns: Sequence[str], rows: Sequence[Sequence], text_columns: int = 0) -> str:
    def cell(tag: str, i: int, v) -> str:
        cls = ' class="text"' if i < text_columns else ""
        return f"<{tag}{cls}>{_e(v)}</{tag}>"

    head = "".join(cell("th", i, c) for i, c in enumerate(columns))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def transitions_text(transitions: dict) -> str:
    """The transition points in words (SCIENCE.md §5)."""
    last_m = transitions.get("last_memorizing_K")
    first_g = transitions.get("first_generalizing_K")
    peak_k = transitions.get("spurious_peak_K")
    peak_f = transitions.get("spurious_peak_fraction")
    parts = [
        f"Most samples are memorized up to K = {last_m} (the largest such K)."
        if last_m is not None
        else "At no K are most samples memorized.",
        f"Most samples are generalized from K = {first_g} on (the smallest such K)."
        if first_g is not None
        else "At no K are most samples generalized.",
    ]
    if peak_k is not None:
        frac = f" (f_S = {peak_f:.3f})" if _is_number(peak_f) else ""
        between = ""
        if last_m is not None and first_g is not None:
            inside = last_m <= peak_k <= first_g
            between = ", between the two transitions" if inside else ", outside the two transitions"
        parts.append(f"The spurious fraction peaks at K = {peak_k}{frac}{between}.")
    return " ".join(parts)


def _config_summary(config: dict) -> list[tuple[str, str]]:
    """The few settings a reader looks for first; the full configuration is in the collapsible block."""

    def get(*path):
        v = config
        for p in path:
            if not isinstance(v, dict) or p not in v:
                return None
            v = v[p]
        return v

    items = [
        ("data", get("data", "name")),
        ("training-set sizes K", get("ks")),
        ("training seeds", get("seeds")),
        ("held-out examples", get("n_held_out")),
        ("network", get("network", "kind")),
        ("training steps", get("train", "steps")),
        ("samples per K", get("sampling", "n_samples")),
        ("classification", get("classify", "rule")),
    ]
    return [(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in items if v is not None]


@dataclass(frozen=True)
class Section:
    key: str
    body: str  # HTML below the heading


@dataclass(frozen=True)
class _Built:
    sections: list[Section]
    omitted: dict  # {key: reason}
    tables: dict  # {file name: (columns, rows)}
    figures: dict  # {file name: png bytes}


def _gallery_ks(ks: Sequence[int], transitions: dict, n_max: int = MAX_GALLERIES) -> list[int]:
    """All K when there are at most n_max; else the smallest and largest K, the transition Ks, then Ks
    evenly spread in sweep order, up to n_max."""
    ks = sorted(set(ks))
    if len(ks) <= n_max:
        return ks
    keys = ("last_memorizing_K", "spurious_peak_K", "first_generalizing_K")
    wanted = [ks[0], ks[-1], *(transitions.get(key) for key in keys)]
    wanted += [ks[i] for i in np.linspace(0, len(ks) - 1, n_max).round().astype(int)]
    chosen = list(dict.fromkeys(k for k in wanted if k in ks))[:n_max]
    return sorted(chosen)


def _class_columns(table: ClassTable, column: str, classes: Sequence[str]) -> tuple[list[str], list[list]]:
    """An HTML table: K, then 'median [q25, q75] (n)' per class."""
    present = [c for c in classes if any((k, c) in table.values for k in table.ks)]
    by = {(r["K"], r["class"]): r for r in table.rows}
    rows = []
    for k in table.ks:
        row: list = [k]
        for c in present:
            r = by.get((k, c))
            if r is None or r[f"{column}_n"] == 0:
                row.append("-")
            else:
                q = (r[f"{column}_median"], r[f"{column}_q25"], r[f"{column}_q75"])
                row.append(f"{_fmt(q[0])} [{_fmt(q[1])}, {_fmt(q[2])}] (n = {r[f'{column}_n']})")
        rows.append(row)
    return ["K", *present], rows


def _build(root: Path, phase: Phase, jobs: list[Job], notes: _Notes) -> _Built:
    sections: list[Section] = []
    omitted: dict = {}
    tables: dict = {}
    figures: dict = {}
    t = phase.transitions

    # 1. phase diagram
    phase_columns = ["K", "n_samples", "n_seeds"]
    for f in FRACTIONS.values():
        phase_columns += [f, f"{f}_low", f"{f}_high"]
    phase_columns += ["delta_m", "delta_s"]
    tables["phase.csv"] = (phase_columns, [{c: r.get(c) for c in phase_columns} for r in phase.rows])
    figures["phase.png"] = phase_figure(phase)

    def frac(r, f):
        low, high = r.get(f"{f}_low"), r.get(f"{f}_high")
        ci = f" [{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else ""
        return f"{_fmt(r[f])}{ci}"

    html_rows = [
        [r["K"], r["n_samples"], _fmt(r.get("n_seeds")), *(frac(r, f) for f in FRACTIONS.values())]
        + [_fmt(r.get("delta_m"), 4), _fmt(r.get("delta_s"), 4)]
        for r in phase.rows
    ]
    computed = " (computed from the rows: phase.json gives none)" if phase.transitions_computed else ""
    sections.append(
        Section(
            "phase",
            _figure(
                figures["phase.png"],
                "phase diagram: f_M, f_S and f_G against K",
                "Look for f_M falling and f_G rising with K, and f_S peaking between the dashed transition lines "
                f"(bands and bars: {phase.level} bootstrap intervals over the N samples).",
            )
            + f"<p>Transition points{_e(computed)}: {_e(transitions_text(t))}</p>"
            + _table(
                [
                    "K",
                    "N samples",
                    "seeds",
                    *(f"{f} [{phase.level} CI]" for f in ("f_M", "f_S", "f_G")),
                    "delta_m",
                    "delta_s",
                ],
                html_rows,
            ),
        )
    )

    # 2. galleries
    with_gallery = [(j, png) for j in jobs if (png := _read_png(j.analysis / "gallery.png", notes)) is not None]
    if with_gallery:
        shown_ks = _gallery_ks([j.k for j, _ in with_gallery], t)
        items = []
        for k in shown_ks:
            of_k = [(j, png) for j, png in with_gallery if j.k == k]
            job, png = of_k[0]
            seeds = f", seed {job.seed}" if job.seed is not None else ""
            more = f" ({len(of_k) - 1} more seeds not shown)" if len(of_k) > 1 else ""
            items.append(_figure(png, f"gallery of samples at K = {k}", f"K = {k}{seeds}, job {job.name}{more}"))
        all_ks = sorted({j.k for j, _ in with_gallery})
        subset = (
            f"<p>Showing K = {', '.join(map(str, shown_ks))} of {len(all_ks)} values with a gallery "
            "(the transition points and an even spread).</p>"
            if len(shown_ks) < len(all_ks)
            else ""
        )
        sections.append(
            Section(
                "galleries",
                "<p>Per class, the most typical (left) and least typical (right) samples, each above its nearest "
                "training example and its nearest other sample. Look for memorized samples that repeat a training "
                "image, spurious samples that repeat each other but no training image, and generalized samples "
                "unlike both.</p>" + subset + '<div class="galleries">' + "".join(items) + "</div>",
            )
        )
    else:
        omitted["galleries"] = "no job has analysis/gallery.png (written by the classify stage)"

    # 3. critical times
    basins = _class_table(
        jobs, "basins.csv", ("sigma_c", "radius"), notes, POINT_CLASSES, count=("status", ("no_basin", "censored"))
    )
    if basins is not None:
        tables["basins_by_class.csv"] = (list(basins.rows[0]), basins.rows)
        figures["basins.png"] = strip_figure(
            basins,
            [("sigma_c", "critical noise level sigma_c"), ("radius", "basin radius ||x_sigma - x|| at sigma_c")],
            POINT_CLASSES,
            title="Critical times per class: the largest sigma from which a point is still recovered",
        )
        cols, rows = _class_columns(basins, "sigma_c", POINT_CLASSES)
        sections.append(
            Section(
                "basins",
                _figure(
                    figures["basins.png"],
                    "critical noise levels per class and K",
                    "Look for memorized and spurious samples (like training examples) keeping a basin up to a "
                    "clearly non-zero sigma_c, and generalized samples near zero (no basin of their own).",
                )
                + "<p>sigma_c: median [q25, q75] (n points); points with no basin count as sigma_c = 0.</p>"
                + _table(cols, rows),
            )
        )
    else:
        omitted["basins"] = "no job has analysis/basins.csv (set analyses.basins.enabled: true in the study config)"

    # 4. energy and curvature
    energy = _class_table(jobs, "energy.csv", ("energy_straight", "discrepancy"), notes, POINT_CLASSES)
    curvature = _class_table(jobs, "curvature.csv", ("lambda_min", "lambda_max", "asymmetry"), notes, POINT_CLASSES)
    if energy is not None or curvature is not None:
        body = ""
        if energy is not None:
            tables["energy_by_class.csv"] = (list(energy.rows[0]), energy.rows)
            figures["energy.png"] = strip_figure(
                energy,
                [("energy_straight", "-log p(x) + log p(training mean) [nats]")],
                POINT_CLASSES,
                title="Relative energy per class (straight-path quadrature of the learned score)",
            )
            cols, rows = _class_columns(energy, "discrepancy", POINT_CLASSES)
            body += _figure(
                figures["energy.png"],
                "relative energy per class and K",
                "Look for memorized and spurious states lower in energy (deeper wells) than generalized samples.",
            )
            body += "<p>Disagreement of the two integration paths (a learned score is not exactly a gradient):</p>"
            body += _table(cols, rows)
        else:
            body += "<p class='notes'>No energy.csv in any job (analyses.energy).</p>"
        if curvature is not None:
            tables["curvature_by_class.csv"] = (list(curvature.rows[0]), curvature.rows)
            iso = _isotropic_curvature(jobs, notes)

            def reference(ax, column):
                if iso is not None and column == "lambda_max":
                    ax.axhline(iso, color="k", ls=":", lw=1, label=f"1/sigma^2 = {iso:g}")

            figures["curvature.png"] = strip_figure(
                curvature,
                [("lambda_max", "largest Hessian eigenvalue of -log p"), ("lambda_min", "smallest eigenvalue")],
                POINT_CLASSES,
                title="Curvature of -log p per class"
                + (f" (dotted: the isotropic well 1/sigma^2 = {iso:g})" if iso is not None else ""),
                reference=reference,
            )
            cols, rows = _class_columns(curvature, "lambda_min", POINT_CLASSES)
            body += _figure(
                figures["curvature.png"],
                "Hessian extreme eigenvalues per class and K",
                "Look for memories with large, nearly isotropic curvature (near the dotted line), spurious states "
                "positive but smaller, and generalized samples with near-zero smallest eigenvalues (flat manifold).",
            )
            body += "<p>Smallest eigenvalue: median [q25, q75] (n points).</p>" + _table(cols, rows)
        else:
            body += "<p class='notes'>No curvature.csv in any job (analyses.curvature).</p>"
        sections.append(Section("energy", body))
    else:
        omitted["energy"] = (
            "no job has analysis/energy.csv or curvature.csv (enable analyses.energy or analyses.curvature)"
        )

    # 5a. census
    census_rows = []
    for job in jobs:
        c = _read_json(job.analysis / "census.json", notes)
        if c is None:
            continue
        counts, shares = c.get("counts"), c.get("shares")
        if not isinstance(counts, dict):
            notes.add(f"{job.analysis / 'census.json'} skipped: it has no 'counts' object")
            continue
        shares = shares if isinstance(shares, dict) else {}
        row = {"job": job.name, "K": job.k, "seed": job.seed, "sigma": c.get("sigma")}
        row.update({f"n_{kind}": counts.get(kind) for kind in KINDS})
        row.update({f"share_{kind}": shares.get(kind) for kind in KINDS})
        row["n_starts"] = c.get("n_starts")
        census_rows.append(row)
    if census_rows:
        tables["census_by_job.csv"] = (list(census_rows[0]), census_rows)
        figures["census.png"] = census_figure(census_rows, t)
        sections.append(
            Section(
                "census",
                _figure(
                    figures["census.png"],
                    "fixed-point census against K",
                    "Look for spurious minima appearing between the memorization and generalization transitions, "
                    "while the number of memories stops growing with K.",
                )
                + _table(
                    ["job", "K", "sigma", *(f"n_{k}" for k in KINDS), *(f"share_{k}" for k in KINDS)],
                    [
                        [r["job"], r["K"], _fmt(r["sigma"]), *(_fmt(r[f"n_{k}"]) for k in KINDS)]
                        + [_fmt(r[f"share_{k}"]) for k in KINDS]
                        for r in census_rows
                    ],
                    text_columns=1,
                ),
            )
        )
    else:
        omitted["census"] = "no job has analysis/census.json (set analyses.census.enabled: true)"

    # 5b. two-model test
    two = _read_json(root / "two_model.json", notes)
    two_rows = _two_model_rows(two, root, notes) if two is not None else []
    if two_rows:
        columns = ["K", "agreement", "mean_distance", "median_distance", "delta", "n_samples"]
        tables["two_model.csv"] = (columns, [{c: r.get(c) for c in columns} for r in two_rows])
        figures["two_model.png"] = two_model_figure(two_rows, t)
        sections.append(
            Section(
                "two_model",
                _figure(
                    figures["two_model.png"],
                    "two-model agreement against K",
                    "Look for the agreement rising from 0 to 1 across the same K range as f_G (no thresholds on "
                    "the training set involved).",
                )
                + _table(
                    ["K", "agreement", "mean distance", "median distance", "delta", "N samples"],
                    [[_fmt(r.get(c)) for c in columns] for r in two_rows],
                ),
            )
        )
    else:
        omitted["two_model"] = "no usable DIR/two_model.json (set analyses.two_model.enabled: true)"

    # 5c. collapse levels
    collapse = _class_table(jobs, "collapse.csv", ("sigma_nearest", "sigma_posterior"), notes, CLASSES)
    if collapse is not None:
        tables["collapse_by_class.csv"] = (list(collapse.rows[0]), collapse.rows)
        figures["collapse.png"] = strip_figure(
            collapse,
            [
                ("sigma_nearest", "collapse level (nearest example final)"),
                ("sigma_posterior", "collapse level (top posterior weight >= 1/2)"),
            ],
            CLASSES,
            title="Collapse levels along the sampling trajectories, per class of the end point",
        )
        cols, rows = _class_columns(collapse, "sigma_nearest", CLASSES)
        sections.append(
            Section(
                "collapse",
                _figure(
                    figures["collapse.png"],
                    "collapse levels per class and K",
                    "Look for memorized trajectories committing to one training example early (large sigma) and "
                    "generalized ones late or never.",
                )
                + "<p>Nearest-example collapse level: median [q25, q75] (n trajectories).</p>"
                + _table(cols, rows),
            )
        )
    else:
        omitted["collapse"] = "no job has analysis/collapse.csv (set analyses.collapse.enabled: true)"

    # 6. the 2D landscape
    landscape = _read_png(root / "landscape.png", notes)
    if landscape is not None:
        body = _figure(
            landscape,
            "energy landscape panels of the 2D circle toy",
            "Look for separate wells on the patterns at small K, merged (spurious) wells between neighbours at "
            "intermediate K, and a continuous ring of minima at large K.",
        )
        info = _read_json(root / "landscape.json", notes)
        panels = info.get("panels") if info else None
        if isinstance(panels, list) and all(isinstance(p, dict) for p in panels):
            rows = []
            for p in panels:
                counts = p.get("counts")  # `diffmem demo` writes counts, `diffmem landscape` the attractors
                if not isinstance(counts, dict):
                    kinds = [a.get("kind") for a in p.get("attractors", []) if isinstance(a, dict)]
                    counts = {k: kinds.count(k) for k in KINDS}
                rows.append([p.get("title", "?"), *(counts.get(k, 0) for k in KINDS), _fmt(p.get("ring_radius"), 4)])
            body += _table(["panel", *KINDS, "ring radius r*"], rows, text_columns=1)
        sections.append(Section("landscape", body))
    else:
        omitted["landscape"] = "no DIR/landscape.png (written by `diffmem demo` or `diffmem landscape --out DIR`)"

    return _Built(sections, omitted, tables, figures)


def _isotropic_curvature(jobs: Sequence[Job], notes: _Notes) -> float | None:
    """1/sigma^2 of the curvature stage, when every job that ran it used the same sigma."""
    values = set()
    for job in jobs:
        c = _read_json(job.analysis / "curvature.json", notes)
        if c is not None and _is_number(c.get("isotropic_curvature")):
            values.add(float(c["isotropic_curvature"]))
    return values.pop() if len(values) == 1 else None


def _two_model_rows(data: dict, root: Path, notes: _Notes) -> list[dict]:
    rows = data.get("rows")
    path = root / "two_model.json"
    if not isinstance(rows, list):
        notes.add(f"{path} skipped: it has no 'rows' list")
        return []
    good = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("K"), int) or not _is_number(r.get("agreement")):
            notes.add(f"{path}: rows[{i}] skipped: it needs an integer K and a numeric agreement")
            continue
        good.append(r)
    return sorted(good, key=lambda r: r["K"])


def _csv_bytes(columns: Sequence[str], rows: Sequence[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _render_html(
    root: Path, name: str, record: dict, phase: Phase, jobs: Sequence[Job], built: _Built, notes: Sequence[str]
) -> str:
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    meta = [("study directory", str(root)), ("distance", phase.metric), ("jobs with an analysis", str(len(jobs)))]
    if record.get("fingerprint"):
        meta.append(("fingerprint", str(record["fingerprint"])[:16]))
    meta += _config_summary(config)
    nav = "".join(f'<a href="#{s.key}">{_e(SECTIONS[s.key])}</a>' for s in built.sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(f'diffmem report: {name}')}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_e(f'Study report: {name}')}</h1>",
        "<p class='meta'>" + "<br>".join(f"<b>{_e(k)}</b>: {_e(v)}" for k, v in meta) + "</p>",
        f"<p class='transitions'><b>Transitions.</b> {_e(transitions_text(phase.transitions))}</p>",
    ]
    if config:
        parts.append(
            "<details><summary>Resolved study configuration (JSON)</summary><pre>"
            + _e(json.dumps(config, indent=2, sort_keys=True))
            + "</pre></details>"
        )
    elif not record:
        parts.append("<p class='notes'>No study.json: the configuration of this study is unknown.</p>")
    if built.omitted or notes:
        items = [f"{SECTIONS[k]} omitted: {why}" for k, why in built.omitted.items()] + list(notes)
        parts.append("<ul class='notes'>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>")
    parts.append(f"<nav>{nav}</nav>")
    for s in built.sections:
        parts.append(f'<section id="{s.key}"><h2>{_e(SECTIONS[s.key])}</h2>{s.body}</section>')
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def write_report(study_dir: str | Path) -> Path:
    """Write DIR/report/ (the HTML page, its tables and figures, summary.json; see the module docstring)
    and return the path of report.html."""
    root = Path(study_dir)
    if not root.is_dir():
        raise ValueError(f"study directory not found: {root}; {SWEEP_HINT.format(root=root)}")
    phase = load_phase(root)
    notes = _Notes()
    record = _read_json(root / "study.json", notes) or {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    name = str(config.get("name") or root.resolve().name)
    jobs = find_jobs(root, notes)
    built = _build(root, phase, jobs, notes)
    out = root / "report"
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {out}: {e.strerror}") from None
    for filename, (columns, rows) in built.tables.items():
        write_bytes_atomic(out / filename, _csv_bytes(columns, rows))
    for filename, png in built.figures.items():
        write_bytes_atomic(out / filename, png)
    summary = {
        "study": name,
        "fingerprint": record.get("fingerprint"),
        "metric": phase.metric,
        "ks": [r["K"] for r in phase.rows],
        "transitions": phase.transitions,
        "transitions_computed": phase.transitions_computed,
        "jobs": [{"name": j.name, "K": j.k, "seed": j.seed} for j in jobs],
        "sections": [s.key for s in built.sections],
        "omitted": built.omitted,
        "notes": notes.items,
        "tables": sorted(built.tables),
        "figures": sorted(built.figures),
    }
    write_json_atomic(out / "summary.json", summary)
    path = out / "report.html"
    write_bytes_atomic(path, _render_html(root, name, record, phase, jobs, built, notes.items).encode())
    return path


__all__ = [
    "SECTIONS",
    "ClassTable",
    "Job",
    "Phase",
    "find_jobs",
    "load_phase",
    "phase_figure",
    "transitions_text",
    "write_report",
]
