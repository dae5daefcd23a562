"""The report of a K sweep (SCIENCE.md §5-§7): one self-contained HTML page and the tables behind it.

`write_report(DIR)` reads what a study wrote and writes DIR/report/:

  report.html              every figure embedded as a base64 PNG; no scripts, no external resources
  phase.csv                f_M, f_S, f_G with their bootstrap intervals and N per K (per size and K in a study
                           over network sizes; from DIR/phase.json)
  transitions.csv          A, B and the spurious peak interpolated in log K, per size, with their intervals
  basins_by_class.csv      per K and class: quartiles of the critical level sigma_c and the basin radius
  energy_by_class.csv      per K and class: quartiles of the relative energy and of the path discrepancy
  curvature_by_class.csv   per K and class: quartiles of the extreme Hessian eigenvalues of -log p
  collapse_by_class.csv    per K and class: quartiles of the collapse levels
  census_by_job.csv        per job: counts and basin shares of memories, spurious minima and saddles
  two_model.csv            agreement of two models on disjoint training sets, per K
  summary.json             transitions (as in phase.json, and which of them the intervals resolve), the
                           sections shown and the reasons any were left out
  *.png                    the figures of the page, also as files

Only DIR/phase.json is required (written by `diffmem sweep CONFIG --out DIR`). Every other part is
optional: a section whose inputs are missing is left out, with a one-line note saying what would
produce it, and a file that cannot be read is named in the notes rather than silently dropped.

The page announces a transition point or a spurious peak only where the bootstrap intervals support it
(see transition_claims), and each section's caption counts and explains the anomalies its figure shows
(ANOMALY_NOTES: large two-path energy discrepancies, basins on generalized samples).

A study over network sizes (StudyConfig.sizes) gets a size column in the phase table, the K x size phase map
in place of the phase diagram, and a Capacity section: the transition points against size beside the original
study's (SCIENCE.md §7). Its galleries and per-job sections show the jobs of the largest size.

The page runs the study-level sections defined here (phase diagram, galleries, two-model test, 2D
landscape) around the sections of the per-job analysis stages (`stage_sections`, see diffmem.viz.html
for what a section function is).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffmem.evaluate.classify import CLASSES, transition_points
from diffmem.evaluate.stages import STAGES
from diffmem.io.files import write_bytes_atomic, write_json_atomic
from diffmem.io.results import Job, Notes, find_jobs, is_number, read_csv, read_json, read_png
from diffmem.study.config import job_size
from diffmem.study.runner import (
    format_k,
    format_transition_table,
    phase_transitions,
    rows_by_size,
    transition_cell,
    transition_table,
)
from diffmem.viz.figures import KIND_STYLE
from diffmem.viz.html import CSS, ReportContext, Section, SectionFunction, escape, figure, fmt, table
from diffmem.viz.study_figures import FRACTIONS, capacity_figure, phase_figure, phase_map_figure, two_model_figure

KINDS = tuple(KIND_STYLE)  # census kinds: memory, spurious, saddle
SWEEP_HINT = "produce it with `diffmem sweep CONFIG --out {root}`"
MAX_GALLERIES = 6  # galleries shown; with more K, the ends, the transitions and a spread over the sweep

# the study-level sections and their titles; each stage section carries its own title
SECTIONS = {
    "phase": "Phase diagram",
    "capacity": "Capacity",  # only in a study over network sizes
    "galleries": "Galleries",
    "two_model": "Two-model test",
    "landscape": "2D landscape",
}

# (key, title, function) of each stage's section, in the registry's order (diffmem.evaluate.stages);
# the title names the section when it is omitted
STAGE_SECTIONS: tuple[tuple[str, str, SectionFunction], ...] = tuple(
    (name, stage.title, stage.report) for name, stage in STAGES.items() if stage.report is not None
)


# --- the phase diagram --------------------------------------------------------------------------------------


# SCIENCE.md §7: the original study's transitions, in training images (DDPM U-Nets, the same iterations at every K):
# (data, network, end of memorization A, onset of generalization B)
ORIGINAL_TRANSITIONS = (
    ("CIFAR-10", "U-Net width 64", 500, 8_000),
    ("CIFAR-10", "U-Net widths 96 and 128", 2_000, 16_000),
    ("LSUN Church", "U-Net width 64", 1_000, 8_000),
    ("LSUN Church", "U-Net width 128", 4_000, 16_000),
)


def original_transitions_text() -> str:
    """The original study's A and B in one line, for the text beside a transition table."""
    items = [f"{data} {net}: A {a:,} / B {b:,}" for data, net, a, b in ORIGINAL_TRANSITIONS]
    return "The original study (SCIENCE.md §7): " + "; ".join(items) + "."


@dataclass(frozen=True)
class Phase:
    """The contents of DIR/phase.json, validated; rows sorted by (size,) K. In a study over network sizes every
    row has a size and transitions maps str(size) to that size's transition points."""

    metric: str
    rows: tuple[dict, ...]
    transitions: dict
    transitions_computed: bool  # True when phase.json had none and they were derived from the rows
    confidence: float = 0.95  # level of the intervals
    sizes: tuple[int, ...] = ()  # the network sizes; () for a single-size study
    size_axis: str = "network size"  # what a size sets, in words
    table: tuple[dict, ...] = ()  # runner.transition_table of the rows: A, B, peak interpolated, per size

    @property
    def level(self) -> str:
        return f"{100 * self.confidence:g}%"

    def of_size(self, size: int) -> Phase:
        """The single-size phase of one network size: its rows and transition points (without the size column)."""
        rows = tuple({k: v for k, v in r.items() if k != "size"} for r in self.rows if r["size"] == size)
        table = tuple({k: v for k, v in t.items() if k != "size"} for t in self.table if t["size"] == size)
        points = self.transitions[str(size)]
        return Phase(self.metric, rows, points, self.transitions_computed, self.confidence, table=table)


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
    rows = [_checked_row(row, i, path, hint) for i, row in enumerate(data["rows"])]
    sized = _check_sizes(rows, path, hint)
    keys = [(r.get("size"), r["K"]) for r in rows]
    if len(set(keys)) != len(keys):
        if sized:
            raise ValueError(f"{path}: (size, K) pairs repeat ({sorted(keys)}); one row per size and K; {hint}")
        raise ValueError(f"{path}: K values repeat ({sorted(k for _, k in keys)}); one row per K is expected; {hint}")
    rows.sort(key=lambda r: (r.get("size", 0), r["K"]))
    transitions = data.get("transitions")
    computed = transitions is None
    if computed:
        transitions = phase_transitions(rows)
    elif not isinstance(transitions, dict):
        raise ValueError(f"{path}: 'transitions' must be an object, got {type(transitions).__name__}; {hint}")
    sizes = tuple(sorted({r["size"] for r in rows})) if sized else ()
    for size in sizes:
        if not isinstance(transitions.get(str(size)), dict):
            raise ValueError(f"{path}: transitions.{size} must be the object of size {size}'s transitions; {hint}")
    groups = {f"transitions.{s}": transitions[str(s)] for s in sizes} if sized else {"transitions": transitions}
    for where, points in groups.items():
        for key in ("last_memorizing_K", "first_generalizing_K", "spurious_peak_K"):
            v = points.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{path}: {where}.{key} must be an integer K or null, got {v!r}; {hint}")
    metric = data.get("metric", "unknown")
    confidence = data.get("confidence", 0.95)
    if not (is_number(confidence) and 0 < confidence < 1):
        raise ValueError(f"{path}: 'confidence' must be a number in (0, 1), got {confidence!r}; {hint}")
    axis = data.get("size_axis")
    axis = axis if isinstance(axis, str) and axis else "network size"
    table = tuple(transition_table(rows))  # from the validated rows, whatever phase.json's own copy says
    return Phase(str(metric), tuple(rows), dict(transitions), computed, float(confidence), sizes, axis, table)


def _check_sizes(rows: list[dict], path: Path, hint: str) -> bool:
    """Whether the rows are those of a study over network sizes (each with a positive integer size)."""
    with_size = [i for i, r in enumerate(rows) if "size" in r]
    if not with_size:
        return False
    if len(with_size) != len(rows):
        i = next(i for i, r in enumerate(rows) if "size" not in r)
        raise ValueError(f"{path}: rows[{i}] has no size while other rows have one; {hint}")
    for i, r in enumerate(rows):
        if isinstance(r["size"], bool) or not isinstance(r["size"], int) or r["size"] < 1:
            raise ValueError(f"{path}: rows[{i}].size must be a positive integer, got {r['size']!r}; {hint}")
    return True


def _checked_row(row, i: int, path: Path, hint: str) -> dict:
    """rows[i] of phase.json, as a new dict, or a ValueError naming what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"{path}: rows[{i}] is not an object; {hint}")
    missing = [key for key in ("K", "n_samples", "f_M", "f_S", "f_G") if key not in row]
    if missing:
        raise ValueError(f"{path}: rows[{i}] lacks {missing} (a phase row needs K, n_samples, f_M, f_S, f_G); {hint}")
    for key in ("K", "n_samples"):
        if isinstance(row[key], bool) or not isinstance(row[key], int) or row[key] < 1:
            raise ValueError(f"{path}: rows[{i}].{key} must be a positive integer, got {row[key]!r}; {hint}")
    for f in (f for f in FRACTIONS.values() if f in row):  # f_O only where the manifold test ran
        for key in (f, f"{f}_low", f"{f}_high"):
            v = row.get(key)
            if key != f and v is None:
                continue
            if not is_number(v) or not 0 <= v <= 1:
                raise ValueError(f"{path}: rows[{i}].{key} must be a fraction in [0, 1], got {v!r}; {hint}")
    return dict(row)


# --- what the intervals support ----------------------------------------------------------------------------
# phase.json's transition points are point estimates (diffmem.evaluate.classify.transition_points). The
# report announces one only where the bootstrap intervals support it (SCIENCE.md §5):
#   last memorizing K:    f_M's interval lies above 1/2 there and below 1/2 at the next larger K;
#   first generalizing K: f_G's interval lies above 1/2 there and below 1/2 at the next smaller K;
#   spurious peak:        at least 3 K values, the peak strictly inside the sweep, and the lower end of its
#                         f_S interval above the upper ends at the smallest and at the largest K.
# Otherwise the text says that the data do not resolve the point, and no figure marks it.

TRANSITION_KEYS = ("last_memorizing_K", "first_generalizing_K", "spurious_peak_K")
MIN_KS_FOR_PEAK = 3  # a peak needs a K on each side of it


@dataclass(frozen=True)
class Claim:
    """One transition point in words, and whether the intervals support announcing it."""

    key: str  # one of TRANSITION_KEYS
    k: int | None  # phase.json's point estimate
    resolved: bool  # True: announced; False: the sentence says the data do not resolve it
    sentence: str


def _interval(row: dict | None, f: str) -> tuple[float, float] | None:
    """(low, high) of fraction f in a phase row; None when the row or either end is missing."""
    if row is None:
        return None
    low, high = row.get(f"{f}_low"), row.get(f"{f}_high")
    return (float(low), float(high)) if is_number(low) and is_number(high) else None


def _ci(iv: tuple[float, float] | None) -> str:
    return "no interval" if iv is None else f"[{iv[0]:.2f}, {iv[1]:.2f}]"


def _crossing(rows: Sequence[dict], key: str, k: int | None, level: str) -> Claim:
    """The memorization (f_M, the next larger K) or generalization (f_G, the next smaller K) transition."""
    memorized = key == "last_memorizing_K"
    f, word = ("f_M", "memorized") if memorized else ("f_G", "generalized")
    if k is None:
        return Claim(key, None, False, f"At no K are most samples {word}.")
    by_k = {r["K"]: r for r in rows}
    if k not in by_k:
        return Claim(key, k, False, f"phase.json names K = {k} for the {word} transition, but has no row for it.")
    beyond = [r for r in rows if (r["K"] > k if memorized else r["K"] < k)]
    other = (beyond[0] if memorized else beyond[-1]) if beyond else None
    here, there = _interval(by_k[k], f), _interval(other, f)
    inside = here is not None and here[0] > 0.5
    crosses = other is None or (there is not None and there[1] < 0.5)
    if inside and crosses and other is not None:
        side = f"up to K = {k} (the largest such K" if memorized else f"from K = {k} on (the smallest such K"
        return Claim(
            key,
            k,
            True,
            f"Most samples are {word} {side}; the {level} intervals of {f} lie above 1/2 there and below 1/2 "
            f"at K = {other['K']}).",
        )
    if inside and other is None:
        end = "largest" if memorized else "smallest"
        return Claim(
            key,
            k,
            True,
            f"Most samples are {word} at K = {k}, the {end} K of the sweep ({f} {_ci(here)}, {level}): "
            f"the transition lies outside the sweep.",
        )
    if here is None or (other is not None and there is None):
        why = "phase.json gives no intervals"
    elif not inside:
        why = f"its {level} interval at K = {k}, {_ci(here)}, reaches 1/2"
    else:
        why = f"its {level} interval at K = {other['K']}, {_ci(there)}, reaches 1/2"
    where = "memorization ends" if memorized else "generalization begins"
    return Claim(
        key,
        k,
        False,
        f"{f} exceeds 1/2 {'up to' if memorized else 'from'} K = {k} as a point estimate, but {why}: "
        f"the data do not resolve where {where}.",
    )


def _peak(rows: Sequence[dict], transitions: dict, level: str, between: bool) -> Claim:
    """The spurious peak, announced only when its interval clears those at both ends of the sweep."""
    key = "spurious_peak_K"
    k = transitions.get(key)
    if k is None:
        return Claim(key, None, False, "No sample is spurious at any K.")
    if len(rows) < MIN_KS_FOR_PEAK:
        return Claim(
            key, k, False, f"With {len(rows)} values of K no peak of the spurious fraction is claimed (it needs 3)."
        )
    by_k = {r["K"]: r for r in rows}
    if k not in by_k:
        return Claim(key, k, False, f"phase.json names a spurious peak at K = {k}, but has no row for it.")
    f_s = by_k[k]["f_S"]
    first, last = rows[0], rows[-1]
    if k in (first["K"], last["K"]):
        return Claim(
            key, k, False, f"f_S is largest at K = {k} (f_S = {f_s:.3f}), an end of the sweep: no peak inside it."
        )
    here, lo_end, hi_end = _interval(by_k[k], "f_S"), _interval(first, "f_S"), _interval(last, "f_S")
    if here is None or lo_end is None or hi_end is None:
        return Claim(
            key,
            k,
            False,
            f"f_S is largest at K = {k} (f_S = {f_s:.3f}), but phase.json gives no intervals: "
            "the data do not resolve a peak.",
        )
    ends = f"K = {first['K']}: {_ci(lo_end)}, K = {last['K']}: {_ci(hi_end)}"
    if here[0] > lo_end[1] and here[0] > hi_end[1]:
        where = ", between the two transitions" if between else ""
        return Claim(
            key,
            k,
            True,
            f"The spurious fraction peaks at K = {k} (f_S = {f_s:.3f}){where}. Its {level} interval "
            f"{_ci(here)} lies above those at the ends of the sweep ({ends}).",
        )
    return Claim(
        key,
        k,
        False,
        f"f_S is largest at K = {k} (f_S = {f_s:.3f}), but its {level} interval {_ci(here)} does not lie above "
        f"those at both ends of the sweep ({ends}): the data do not resolve a peak.",
    )


def transition_claims(rows: Sequence[dict], transitions: dict, level: str = "95%") -> dict[str, Claim]:
    """The three transition points of phase.json (rows sorted by K) with what their intervals support."""
    claims = {key: _crossing(rows, key, transitions.get(key), level) for key in TRANSITION_KEYS[:2]}
    last_m, first_g = claims["last_memorizing_K"], claims["first_generalizing_K"]
    both = last_m.resolved and first_g.resolved and last_m.k is not None and first_g.k is not None
    peak_k = transitions.get("spurious_peak_K")
    between = both and peak_k is not None and last_m.k <= peak_k <= first_g.k
    claims["spurious_peak_K"] = _peak(rows, transitions, level, between)
    return claims


def resolved_transitions(rows: Sequence[dict], transitions: dict, level: str = "95%") -> dict:
    """transitions with every point its intervals do not support set to None: what the figures mark."""
    claims = transition_claims(rows, transitions, level)
    out = dict(transitions)
    for key, claim in claims.items():
        if not claim.resolved:
            out[key] = None
    if out.get("spurious_peak_K") is None:
        out["spurious_peak_fraction"] = None
    return out


def transitions_text(transitions: dict, rows: Sequence[dict], level: str = "95%") -> str:
    """The transition points in words (SCIENCE.md §5), each announced only where its intervals support it.

    For the rows of a study over network sizes (each with a size; transitions keyed by str(size), computed from
    the rows where missing): one line per size, then the transition table interpolated in log K
    (runner.format_transition_table) and the original study's numbers."""
    groups = rows_by_size(list(rows))
    if None in groups:
        return " ".join(c.sentence for c in transition_claims(rows, transitions, level).values())
    lines = []
    for size, group in groups.items():
        points = transitions.get(str(size)) or transition_points(group)
        lines.append(f"size {size}: " + " ".join(c.sentence for c in transition_claims(group, points, level).values()))
    lines += ["Transition points interpolated in log K (intervals from the fraction bands):"]
    lines += [format_transition_table(transition_table(list(rows))), original_transitions_text()]
    return "\n".join(lines)


# --- the study-level sections -------------------------------------------------------------------------------


def phase_section(ctx: ReportContext, phase: Phase) -> Section:
    """f_M, f_S, f_G per K with their intervals, and the transition points (DIR/phase.json); over network sizes,
    per size and K, drawn as the K x size phase map."""
    present = _fractions(phase.rows)
    sized = ["size"] if phase.sizes else []
    columns = [*sized, "K", "n_samples", "n_seeds"]
    for f in present:
        columns += [f, f"{f}_low", f"{f}_high"]
    columns += ["delta_m", "delta_s"]
    ctx.add_table("phase.csv", columns, [{c: r.get(c) for c in columns} for r in phase.rows])
    header = [*sized, "K", "N samples", "seeds", *(f"{f} [{phase.level} CI]" for f in present), "delta_m", "delta_s"]
    cells = table(header, _phase_cells(phase.rows))
    if phase.sizes:
        png = ctx.add_figure(
            "phase_map.png",
            phase_map_figure(phase.rows, phase.table, size_axis=phase.size_axis, level=phase.level),
        )
        body = figure(
            png,
            "phase map: the class fractions over K and network size",
            "Each cell is the fraction of one class at one (size, K) (N samples per cell in the table below). "
            "Look for the memorized region ending and the generalized region beginning at larger K for larger "
            "networks, with the spurious fraction largest between them; the markers are the transition points of "
            "the Capacity section.",
        )
        return Section("phase", SECTIONS["phase"], body + cells)
    png = ctx.add_figure("phase.png", phase_figure(phase.rows, ctx.transitions, metric=phase.metric, level=phase.level))
    body = figure(
        png,
        "phase diagram: the class fractions against K",
        "Look for f_M falling and f_G rising with K, and f_S peaking between the dashed transition lines; "
        "f_O (off-manifold: novel samples unlike any real image) should stay near zero for a working model "
        f"(bands and bars: {phase.level} intervals, never empty at 0 or 1). Lines and the star mark only the "
        "transition points the intervals resolve (see Transitions above).",
    )
    return Section("phase", SECTIONS["phase"], body + cells + transition_table_html(ctx, phase))


def transition_table_html(ctx: ReportContext, phase: Phase) -> str:
    """The transition points interpolated in log K (one row per size) beside the original study's, also written
    to transitions.csv."""
    sized = ["size"] if phase.sizes else []
    columns = [*sized, "K_min", "K_max", "n_K"]
    for prefix in ("A", "B", "peak"):
        columns += [f"{prefix}_K", f"{prefix}_low", f"{prefix}_high", f"{prefix}_where"]
    ctx.add_table("transitions.csv", [*columns, "peak_f_S"], list(phase.table))
    points = [[transition_cell(t, p) for p in ("A", "B", "peak")] + [fmt(t.get("peak_f_S"))] for t in phase.table]
    rows = [[t["size"], *cells] if sized else cells for t, cells in zip(phase.table, points, strict=True)]
    ours = table([*sized, "A: f_M = 1/2", "B: f_G = 1/2", "spurious peak K", "peak f_S"], rows, text_columns=0)
    original = table(
        ["data", "network", "A", "B"],
        [[data, net, f"{a:,}", f"{b:,}"] for data, net, a, b in ORIGINAL_TRANSITIONS],
        text_columns=2,
    )
    return (
        "<p><b>Transition points between grid values.</b> A is where f_M falls through 1/2 (after the largest K "
        "at which most samples are memorized), B where f_G rises through 1/2 (before the smallest K at which most "
        "are generalized), both interpolated linearly in log K; the spurious peak is the top of a parabola in "
        f"log K through the largest f_S and its neighbours. Brackets: for A and B, where the {phase.level} band's "
        "edges cross 1/2; for the peak, the K around it where f_S's upper bound reaches the peak's lower bound. "
        "'&lt; K' and '&gt; K' mark a point or an end past the sweep.</p>"
        + ours
        + "<p>The original study's transitions (SCIENCE.md §7; DDPM U-Nets, training images), for comparison: "
        "other data and networks, so compare how A and B move with the network, not their values.</p>" + original
    )


def capacity_section(ctx: ReportContext, phase: Phase, shown: int) -> Section:
    """A, B and the spurious peak against network size (SCIENCE.md §6-§7's capacity law), beside the original
    study's, and which size the galleries and per-job sections show."""
    png = ctx.add_figure("capacity.png", capacity_figure(phase.table, size_axis=phase.size_axis))
    body = figure(
        png,
        "transition points against network size",
        "Look for A and B growing with the network (the original study: smaller networks stop memorizing and "
        "start generalizing at smaller K) and the spurious peak between them. Hollow markers lie past an end of "
        "the sweep: widen the K range to place them.",
    )
    grow = _growth_sentence(phase.table)
    note = (
        f"<p>The galleries and the per-job sections below show the jobs of size {shown}, the largest; the other "
        f"sizes' jobs are in their w-SIZE-... folders.</p>"
    )
    return Section(
        "capacity", SECTIONS["capacity"], body + f"<p>{escape(grow)}</p>" + transition_table_html(ctx, phase) + note
    )


def _growth_sentence(table_rows: Sequence[dict]) -> str:
    """Whether A and B grow with the network size, in words, from the points inside the sweep."""
    words = []
    for prefix, name in (("A", "The end of memorization A"), ("B", "The onset of generalization B")):
        inside = [(t["size"], t[f"{prefix}_K"]) for t in table_rows if t[f"{prefix}_where"] == "inside"]
        past = [t["size"] for t in table_rows if t[f"{prefix}_where"] == "above"]
        if len(inside) < 2:
            where = f" (past the largest K at sizes {', '.join(map(str, past))})" if past else ""
            words.append(f"{name} lies inside the sweep at fewer than two sizes{where}: no trend to read.")
            continue
        ks = [k for _, k in inside]
        trend = "grows" if all(b > a for a, b in itertools.pairwise(ks)) else "does not grow monotonically"
        steps = ", ".join(f"{format_k(k)} at {s}" for s, k in inside)
        more = f"; past the largest K at sizes {', '.join(map(str, past))}" if past else ""
        words.append(f"{name} {trend} with the network size ({steps}{more}).")
    return " ".join(words)


def _fractions(rows: Sequence[dict]) -> list[str]:
    """The fraction columns every row has: f_M, f_S, f_G, and f_O where the manifold test ran."""
    return [f for f in FRACTIONS.values() if all(f in r for r in rows)]


def _phase_cells(rows: Sequence[dict]) -> list[list]:
    """The HTML rows of the phase table: each fraction with its interval beside it."""

    def frac(r, f):
        low, high = r.get(f"{f}_low"), r.get(f"{f}_high")
        ci = f" [{fmt(low)}, {fmt(high)}]" if low is not None and high is not None else ""
        return f"{fmt(r[f])}{ci}"

    return [
        [*([r["size"]] if "size" in r else []), r["K"], r["n_samples"], fmt(r.get("n_seeds"))]
        + [frac(r, f) for f in _fractions(rows)]
        + [fmt(r.get("delta_m"), 4), fmt(r.get("delta_s"), 4)]
        for r in rows
    ]


def galleries_section(ctx: ReportContext) -> Section | str:
    """One gallery of samples per K, at most MAX_GALLERIES of them (analysis/gallery.png)."""
    with_gallery = [(j, png) for j in ctx.jobs if (png := read_png(j.analysis / "gallery.png", ctx.notes)) is not None]
    if not with_gallery:
        return "no job has analysis/gallery.png (written by the classify stage)"
    shown_ks = _gallery_ks([j.k for j, _ in with_gallery], ctx.transitions)
    items = []
    for k in shown_ks:
        of_k = [(j, png) for j, png in with_gallery if j.k == k]
        job, png = of_k[0]
        seeds = f", seed {job.seed}" if job.seed is not None else ""
        more = f" ({len(of_k) - 1} more seeds not shown)" if len(of_k) > 1 else ""
        items.append(figure(png, f"gallery of samples at K = {k}", f"K = {k}{seeds}, job {job.name}{more}"))
    all_ks = sorted({j.k for j, _ in with_gallery})
    subset = (
        f"<p>Showing K = {', '.join(map(str, shown_ks))} of {len(all_ks)} values with a gallery "
        "(the transition points and an even spread).</p>"
        if len(shown_ks) < len(all_ks)
        else ""
    )
    intro = (
        "<p>Per class, the most typical (left) and least typical (right) samples, each above its nearest "
        "training example and its nearest other sample. Look for memorized samples that repeat a training "
        "image, spurious samples that repeat each other but no training image, and generalized samples "
        "unlike both.</p>"
    )
    return Section(
        "galleries", SECTIONS["galleries"], intro + subset + '<div class="galleries">' + "".join(items) + "</div>"
    )


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


def two_model_section(ctx: ReportContext) -> Section | str:
    """Agreement of two models trained on disjoint sets, per K (DIR/two_model.json)."""
    data = read_json(ctx.root / "two_model.json", ctx.notes)
    rows = _two_model_rows(data, ctx.root, ctx.notes) if data is not None else []
    if not rows:
        return "no usable DIR/two_model.json (set analyses.two_model.enabled: true)"
    columns = ["K", "agreement", "mean_distance", "median_distance", "delta", "n_samples"]
    ctx.add_table("two_model.csv", columns, [{c: r.get(c) for c in columns} for r in rows])
    png = ctx.add_figure("two_model.png", two_model_figure(rows, ctx.transitions))
    body = figure(
        png,
        "two-model agreement against K",
        "Look for the agreement rising from 0 to 1 across the same K range as f_G (no thresholds on "
        "the training set involved).",
    )
    body += table(
        ["K", "agreement", "mean distance", "median distance", "delta", "N samples"],
        [[fmt(r.get(c)) for c in columns] for r in rows],
    )
    return Section("two_model", SECTIONS["two_model"], body)


def _two_model_rows(data: dict, root: Path, notes: Notes) -> list[dict]:
    """The usable rows of two_model.json sorted by K; a note for each one left out."""
    rows = data.get("rows")
    path = root / "two_model.json"
    if not isinstance(rows, list):
        notes.add(f"{path} skipped: it has no 'rows' list")
        return []
    good = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("K"), int) or not is_number(r.get("agreement")):
            notes.add(f"{path}: rows[{i}] skipped: it needs an integer K and a numeric agreement")
            continue
        good.append(r)
    return sorted(good, key=lambda r: r["K"])


def landscape_section(ctx: ReportContext) -> Section | str:
    """The energy landscape panels of the 2D circle toy (DIR/landscape.png, with DIR/landscape.json's counts)."""
    landscape = read_png(ctx.root / "landscape.png", ctx.notes)
    if landscape is None:
        return "no DIR/landscape.png (written by `diffmem demo` or `diffmem landscape --out DIR`)"
    body = figure(
        landscape,
        "energy landscape panels of the 2D circle toy",
        "Look for separate wells on the patterns at small K, merged (spurious) wells between neighbours at "
        "intermediate K, and a continuous ring of minima at large K.",
    )
    info = read_json(ctx.root / "landscape.json", ctx.notes)
    panels = info.get("panels") if info else None
    if isinstance(panels, list) and all(isinstance(p, dict) for p in panels):
        rows = [
            [p.get("title", "?"), *(_landscape_counts(p).get(k, 0) for k in KINDS), fmt(p.get("ring_radius"), 4)]
            for p in panels
        ]
        body += table(["panel", *KINDS, "ring radius r*"], rows, text_columns=1)
    return Section("landscape", SECTIONS["landscape"], body)


def _landscape_counts(panel: dict) -> dict:
    """Attractors per kind of one panel: `diffmem demo` writes the counts, `diffmem landscape` the attractors."""
    counts = panel.get("counts")
    if isinstance(counts, dict):
        return counts
    kinds = [a.get("kind") for a in panel.get("attractors", []) if isinstance(a, dict)]
    return {k: kinds.count(k) for k in KINDS}


# --- anomalies, flagged in the captions of the sections that show them -----------------------------------

DISCREPANCY_NATS = 10.0  # a two-path discrepancy above this many nats is large whatever the energy
DISCREPANCY_FRACTION = 0.1  # ... as is one above this fraction of |E|
DISCREPANCY_FLOOR_NATS = 1.0  # ... and above 1 nat: near E = 0 a relative test would flag quadrature noise
GENERALIZED = ("generalized", "off_manifold")  # classes expected to have no basin of their own (SCIENCE.md §6)


def _float(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def large_discrepancy(energy: float, discrepancy: float) -> bool:
    """Whether two integration paths disagree by much against the energy (SCIENCE.md §6): |d| > 10 nats,
    or |d| > 10% of |E| and > 1 nat."""
    d = abs(discrepancy)
    return d > DISCREPANCY_NATS or (d > DISCREPANCY_FRACTION * abs(energy) and d > DISCREPANCY_FLOOR_NATS)


def _by_class(items: Sequence[str]) -> str:
    counts = {c: items.count(c) for c in dict.fromkeys(items)}
    return ", ".join(f"{c} {n}" for c, n in counts.items())


def energy_anomalies(ctx: ReportContext) -> str:
    """The caption note of the energy section: points whose two paths disagree by much, and non-finite ones."""
    flagged, broken, n = [], [], 0  # flagged: (|d|, E, K, class)
    for job in ctx.jobs:
        rows = read_csv(job.analysis / "energy.csv", ("class", "energy_straight", "discrepancy"), Notes())
        for r in rows or ():
            e, d = _float(r["energy_straight"]), _float(r["discrepancy"])
            if e is None or d is None:
                continue
            n += 1
            if not (np.isfinite(e) and np.isfinite(d)):
                broken.append(r["class"])
            elif large_discrepancy(e, d):
                flagged.append((abs(d), e, job.k, r["class"]))
    if n == 0:
        return ""
    rule = (
        f"a two-path discrepancy above {DISCREPANCY_NATS:g} nats, or above {100 * DISCREPANCY_FRACTION:g}% of |E| "
        f"and {DISCREPANCY_FLOOR_NATS:g} nat"
    )
    if not flagged and not broken:
        return f"No point of {n} has {rule}."
    parts = []
    if flagged:
        d, e, k, cls = max(flagged)
        parts.append(
            f"Anomaly: {len(flagged)} of {n} points have {rule} ({_by_class([f[3] for f in flagged])}; the "
            f"largest, {d:,.1f} nats against E = {e:,.1f} nats, at K = {k}, {cls}). A learned score is not a "
            "gradient: where the straight and arc paths disagree this much, the energy depends on the path "
            "taken and is not a property of the point; do not compare those energies."
        )
    if broken:
        parts.append(
            f"Anomaly: {len(broken)} of {n} points have a non-finite energy or discrepancy "
            f"({_by_class(broken)}): the integration diverged; they are left out of the figure."
        )
    return " ".join(parts)


def basin_anomalies(ctx: ReportContext) -> str:
    """The caption note of the basins section: generalized and off-manifold points with a finite critical
    level (a basin), which SCIENCE.md §6 expects only of memorized and spurious states."""
    flagged, n = [], 0
    for job in ctx.jobs:
        for r in read_csv(job.analysis / "basins.csv", ("class", "sigma_c"), Notes()) or ():
            if r["class"] not in GENERALIZED:
                continue
            n += 1
            sigma_c = _float(r["sigma_c"])
            has_basin = r.get("status", "bracketed") != "no_basin"
            if has_basin and sigma_c is not None and np.isfinite(sigma_c) and sigma_c > 0:
                flagged.append(r["class"])
    if n == 0:
        return ""
    if not flagged:
        return f"No generalized or off-manifold point of {n} has a finite critical level."
    return (
        f"Anomaly: {len(flagged)} of {n} generalized and off-manifold points have a finite critical level "
        f"({_by_class(flagged)}). A basin on a generalized sample means the trained denoiser pulls noised "
        "copies of that new image back to it, as it does for a memory: the model stores it as an attractor "
        "(a spurious state that only one sample fell into, which the classifier cannot see), or the recovery "
        "tolerance delta is loose against the distances between images. Either way, read it with care: a "
        "generalized sample should have no basin of its own (SCIENCE.md §6)."
    )


ANOMALY_NOTES = {"energy": energy_anomalies, "basins": basin_anomalies}  # section key -> its caption note


def with_caption_note(section: Section, note: str) -> Section:
    """section with note appended to its first figure caption (or as a paragraph when it has none)."""
    if not note:
        return section
    end = section.body.find("</figcaption>")
    if end < 0:
        return Section(section.key, section.title, section.body + f"<p>{escape(note)}</p>")
    body = section.body[:end] + " " + escape(note) + section.body[end:]
    return Section(section.key, section.title, body)


# --- the page -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Omission:
    """A section left out, and why: what would produce it."""

    key: str
    title: str
    reason: str


@dataclass(frozen=True)
class BuiltReport:
    sections: list[Section]  # in page order
    omitted: list[Omission]
    context: ReportContext  # with the tables and figures the sections wrote


def build_sections(
    root: Path,
    phase: Phase,
    jobs: Sequence[Job],
    notes: Notes,
    stage_sections: Sequence[tuple[str, str, SectionFunction]] = STAGE_SECTIONS,
) -> BuiltReport:
    """Run the sections in page order: phase diagram, (capacity, over network sizes,) galleries, each (key, title,
    function) of stage_sections, two-model test, 2D landscape. Over network sizes the sections after the capacity
    section show the jobs and transitions of the largest size."""
    shown = phase.sizes[-1] if phase.sizes else None
    one = phase.of_size(shown) if shown is not None else phase
    resolved = resolved_transitions(one.rows, one.transitions, phase.level)
    if shown is not None:
        jobs = [j for j in jobs if job_size(j.name) == shown]
    ctx = ReportContext(root, list(jobs), resolved, notes, tuple(CLASSES), (*CLASSES, "training"))
    capacity = [("capacity", SECTIONS["capacity"], lambda c: capacity_section(c, phase, shown))] if shown else []
    plan = [
        ("phase", SECTIONS["phase"], lambda c: phase_section(c, phase)),
        *capacity,
        ("galleries", SECTIONS["galleries"], galleries_section),
        *stage_sections,
        ("two_model", SECTIONS["two_model"], two_model_section),
        ("landscape", SECTIONS["landscape"], landscape_section),
    ]
    keys = [key for key, _, _ in plan]
    if len(set(keys)) != len(keys):
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"section keys repeat: {repeated}; each section needs its own key (its anchor on the page)")
    sections, omitted = [], []
    for key, title, function in plan:
        result = function(ctx)
        if isinstance(result, str):
            omitted.append(Omission(key, title, result))
            continue
        if not isinstance(result, Section) or result.key != key:
            got = f"a Section keyed {result.key!r}" if isinstance(result, Section) else type(result).__name__
            raise ValueError(
                f"the section function for {key!r} returned {got}; "
                f"it must return a Section keyed {key!r} or, when it has nothing to show, the reason (a str)"
            )
        if key in ANOMALY_NOTES:
            result = with_caption_note(result, ANOMALY_NOTES[key](ctx))
        sections.append(result)
    return BuiltReport(sections, omitted, ctx)


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
        ("network sizes", get("sizes")),
        ("training seeds", get("seeds")),
        ("held-out examples", get("n_held_out")),
        ("network", get("network", "kind")),
        ("training steps", get("train", "steps")),
        ("samples per K", get("sampling", "n_samples")),
        ("classification", get("classify", "rule")),
    ]
    return [(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in items if v is not None]


def _csv_bytes(columns: Sequence[str], rows: Sequence[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _render_html(
    root: Path, name: str, record: dict, phase: Phase, jobs: Sequence[Job], built: BuiltReport, notes: Sequence[str]
) -> str:
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    meta = [("study directory", str(root)), ("distance", phase.metric), ("jobs with an analysis", str(len(jobs)))]
    if record.get("fingerprint"):
        meta.append(("fingerprint", str(record["fingerprint"])[:16]))
    meta += _config_summary(config)
    nav = "".join(f'<a href="#{s.key}">{escape(s.title)}</a>' for s in built.sections)
    computed = " (computed from the rows: phase.json gives none)" if phase.transitions_computed else ""
    if phase.sizes:
        sentences = [
            f"<li><b>size {size}</b>: {escape(transitions_text(one.transitions, one.rows, phase.level))}</li>"
            for size, one in ((size, phase.of_size(size)) for size in phase.sizes)
        ]
        said = "<ul>" + "".join(sentences) + "</ul>"
    else:
        said = escape(transitions_text(phase.transitions, phase.rows, phase.level))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(f'diffmem report: {name}')}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{escape(f'Study report: {name}')}</h1>",
        "<p class='meta'>" + "<br>".join(f"<b>{escape(k)}</b>: {escape(v)}" for k, v in meta) + "</p>",
        f"<div class='transitions'><b>Transitions{escape(computed)}.</b> {said}</div>"
        if phase.sizes
        else f"<p class='transitions'><b>Transitions{escape(computed)}.</b> {said}</p>",
    ]
    if config:
        parts.append(
            "<details><summary>Resolved study configuration (JSON)</summary><pre>"
            + escape(json.dumps(config, indent=2, sort_keys=True))
            + "</pre></details>"
        )
    elif not record:
        parts.append("<p class='notes'>No study.json: the configuration of this study is unknown.</p>")
    if built.omitted or notes:
        items = [f"{o.title} omitted: {o.reason}" for o in built.omitted] + list(notes)
        parts.append("<ul class='notes'>" + "".join(f"<li>{escape(i)}</li>" for i in items) + "</ul>")
    parts.append(f"<nav>{nav}</nav>")
    for s in built.sections:
        parts.append(f'<section id="{s.key}"><h2>{escape(s.title)}</h2>{s.body}</section>')
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _job_entry(job: Job, sized: bool) -> dict:
    """A job in summary.json: its name, K and seed, and its network size in a study over sizes."""
    return {"name": job.name, "K": job.k, "seed": job.seed, **({"size": job_size(job.name)} if sized else {})}


def _resolved_flags(phase: Phase) -> dict:
    """Which transition points the intervals support: per key, or per size and key over network sizes."""

    def flags(one: Phase) -> dict:
        return {key: c.resolved for key, c in transition_claims(one.rows, one.transitions, one.level).items()}

    return {str(size): flags(phase.of_size(size)) for size in phase.sizes} if phase.sizes else flags(phase)


def write_report(
    study_dir: str | Path, *, stage_sections: Sequence[tuple[str, str, SectionFunction]] | None = None
) -> Path:
    """Write DIR/report/ (the HTML page, its tables and figures, summary.json; see the module docstring)
    and return the path of report.html. stage_sections: (key, title, function) of the sections between
    the galleries and the two-model test; None for STAGE_SECTIONS."""
    root = Path(study_dir)
    if not root.is_dir():
        raise ValueError(f"study directory not found: {root}; {SWEEP_HINT.format(root=root)}")
    phase = load_phase(root)
    notes = Notes()
    record = read_json(root / "study.json", notes) or {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    name = str(config.get("name") or root.resolve().name)
    jobs = find_jobs(root, notes)
    built = build_sections(root, phase, jobs, notes, STAGE_SECTIONS if stage_sections is None else stage_sections)
    out = root / "report"
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {out}: {e.strerror}") from None
    for filename, (columns, rows) in built.context.tables.items():
        write_bytes_atomic(out / filename, _csv_bytes(columns, rows))
    for filename, png in built.context.figures.items():
        write_bytes_atomic(out / filename, png)
    summary = {
        "study": name,
        "fingerprint": record.get("fingerprint"),
        "metric": phase.metric,
        "ks": sorted({r["K"] for r in phase.rows}),
        "transitions": phase.transitions,
        "transitions_computed": phase.transitions_computed,
        # which transition points the intervals support (the text and the figures announce only these)
        "transitions_resolved": _resolved_flags(phase),
        "transition_table": list(phase.table),
        "jobs": [_job_entry(j, bool(phase.sizes)) for j in jobs],
        "sections": [s.key for s in built.sections],
        "omitted": {o.key: o.reason for o in built.omitted},
        "notes": notes.items,
        "tables": sorted(built.context.tables),
        "figures": sorted(built.context.figures),
    }
    if phase.sizes:
        summary.update(sizes=list(phase.sizes), size_axis=phase.size_axis, shown_size=phase.sizes[-1])
    write_json_atomic(out / "summary.json", summary)
    path = out / "report.html"
    write_bytes_atomic(path, _render_html(root, name, record, phase, jobs, built, notes.items).encode())
    return path


__all__ = [
    "ANOMALY_NOTES",
    "SECTIONS",
    "STAGE_SECTIONS",
    "BuiltReport",
    "Claim",
    "Omission",
    "Phase",
    "basin_anomalies",
    "build_sections",
    "energy_anomalies",
    "find_jobs",
    "large_discrepancy",
    "load_phase",
    "phase_figure",
    "resolved_transitions",
    "transition_claims",
    "transitions_text",
    "with_caption_note",
    "write_report",
]
