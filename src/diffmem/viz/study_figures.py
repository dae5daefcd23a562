"""The figures of the study report, as PNG bytes to embed: the phase diagram, per-class strip plots,
the fixed-point census, the two-model test against K, and for a study over network sizes the K x size
phase map and the transition points against size (SCIENCE.md §5-§7).

Each figure is drawn without random jitter and saved without a timestamp, so the same inputs give the
same bytes. K axes are labelled with the sweep's K values; no text is below diffmem.viz.figures.MIN_FONT_PT
and no figure is wider than the report's column, so the page never shrinks the text.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from diffmem.io.results import ClassTable, is_number  # noqa: E402
from diffmem.viz.figures import CLASS_COLORS, KIND_STYLE, floor_fonts, k_axis  # noqa: E402

# phase.json's name of each class; f_O only where the manifold test ran (classify.quality 'manifold')
FRACTIONS = {"memorized": "f_M", "spurious": "f_S", "generalized": "f_G", "off_manifold": "f_O"}


PAGE_WIDTH_IN = 11.0  # the report's column at 100 dpi (1,100 px): wider figures would be shrunk, and their text


def _png(fig) -> bytes:
    floor_fonts(fig)
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


def phase_figure(rows: Sequence[dict], transitions: dict, *, metric: str, level: str) -> bytes:
    """f_M, f_S, f_G (and f_O) against K on a log axis, intervals as bands and error bars.

    rows: phase.json's rows sorted by K; metric: the distance that classified the samples; level: the
    confidence level of the intervals, as text ('95%')."""
    ks = np.array([r["K"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(9.0, 4.2), layout="constrained")
    for cls, f in FRACTIONS.items():
        if not all(f in r for r in rows):
            continue
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
    _mark_transitions(ax, transitions)
    peak_k, peak_f = transitions.get("spurious_peak_K"), transitions.get("spurious_peak_fraction")
    if peak_k is not None and is_number(peak_f):
        ax.plot([peak_k], [peak_f], marker="*", ms=16, color=CLASS_COLORS["spurious"], mec="k", ls="none")
        ax.annotate(
            f"spurious peak\nK = {peak_k}, f_S = {peak_f:.2f}",
            (peak_k, peak_f),
            textcoords="offset points",
            xytext=(8, 10),
            fontsize=9,
            color=CLASS_COLORS["spurious"],
        )
    k_axis(ax, ks)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training-set size K (log scale)")
    ax.set_ylabel("fraction of the N generated samples")
    ns = sorted({r["n_samples"] for r in rows})
    n_text = f"N = {ns[0]} per K" if len(ns) == 1 else f"N = {ns[0]}..{ns[-1]} per K"
    ax.set_title(f"Phase diagram ({metric} distance, {n_text}, {level} bootstrap intervals)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))
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
    turned = len(ks) > 8
    ax.set_xticks(
        range(len(ks)), [f"K = {k}" for k in ks], rotation=45 if turned else 0, ha="right" if turned else "center"
    )
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
    """One panel per (column, y label), side by side, or one above the other when side by side would be
    wider than the report's column; reference(ax, column) may draw a guide line."""
    width = max(5.0, 0.9 * len(table.ks) + 2.5)  # inches per panel
    side_by_side = width * len(panels) <= PAGE_WIDTH_IN
    shape = (1, len(panels)) if side_by_side else (len(panels), 1)
    size = (width * len(panels), 3.8) if side_by_side else (min(width, PAGE_WIDTH_IN), 3.4 * len(panels) + 0.6)
    fig, axes = plt.subplots(*shape, figsize=size, squeeze=False, layout="constrained")
    for ax, (column, ylabel) in zip(axes.flat, panels, strict=True):
        _strip_axes(ax, table, column, classes, ylabel=ylabel)
        if reference is not None:
            reference(ax, column)
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=len(legend), fontsize=9)
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
        k_axis(a, ks)
        a.set_xlabel("training-set size K (log scale)")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3, which="both")
        _mark_transitions(a, transitions, neutral=True)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=5, fontsize=9)
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
    k_axis(ax, ks)
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
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle("Two models, same noise: agreement rises from 0 (own copies) to 1 (the same image)", fontsize=9)
    return _png(fig)


# --- the capacity axis: K x network size ----------------------------------------------------------------------------
# transition_table rows (diffmem.study.runner.transition_table) carry, per size, A (f_M falls through 1/2), B (f_G
# rises through 1/2) and the spurious peak, each as {P}_K, {P}_low, {P}_high, {P}_where, with the sweep's K_min, K_max.

TRANSITION_MARKS = {  # prefix -> (marker, colour, label, offset from a phase-map row's centre, in rows)
    "A": ("v", CLASS_COLORS["memorized"], "A: f_M = 1/2", 0.3),
    "B": ("^", CLASS_COLORS["generalized"], "B: f_G = 1/2", 0.3),
    "peak": ("*", CLASS_COLORS["spurious"], "spurious peak", -0.3),
}


def _grid_position(k: float, ks: Sequence[int]) -> float:
    """A K between grid values as a position on a grid whose cells are the sweep's Ks (linear in log K)."""
    return float(np.interp(math.log(k), np.log(np.asarray(ks, dtype=float)), np.arange(len(ks))))


def phase_map_figure(rows: Sequence[dict], table: Sequence[dict], *, size_axis: str, level: str) -> bytes:
    """One panel per class fraction over the grid of K (columns) x network size (rows), each cell annotated
    with its value, and per size the interpolated A, B and spurious peak with their intervals (those inside the
    sweep). rows: phase rows with a size column; table: transition_table rows; level: the intervals' level."""
    ks = sorted({r["K"] for r in rows})
    sizes = sorted({r["size"] for r in rows})
    present = [(c, f) for c, f in FRACTIONS.items() if all(f in r for r in rows)]
    by = {(r["size"], r["K"]): r for r in rows}
    height = 0.42 * len(sizes) + 1.25
    fig, axes = plt.subplots(
        len(present), 1, figsize=(9.5, height * len(present) + 0.6), squeeze=False, layout="constrained"
    )
    for ax, (cls, f) in zip(axes[:, 0], present, strict=True):
        grid = np.full((len(sizes), len(ks)), np.nan)  # (sizes, K); NaN where a (size, K) has no row
        for i, size in enumerate(sizes):
            for j, k in enumerate(ks):
                if (size, k) in by:
                    grid[i, j] = by[size, k][f]
        cmap = LinearSegmentedColormap.from_list(f, ["white", CLASS_COLORS[cls]])
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9, color="white" if v > 0.6 else "k")
        for i, size in enumerate(sizes):
            row = next((t for t in table if t.get("size") == size), None)
            for prefix, (marker, color, label, offset) in TRANSITION_MARKS.items():
                if row is None or row[f"{prefix}_where"] != "inside":
                    continue
                x = _grid_position(row[f"{prefix}_K"], ks)
                low, high = row[f"{prefix}_low"], row[f"{prefix}_high"]
                lo = -0.5 if low is None else _grid_position(low, ks)
                hi = len(ks) - 0.5 if high is None else _grid_position(high, ks)
                ax.errorbar(
                    [x], [i + offset], xerr=[[max(x - lo, 0)], [max(hi - x, 0)]], marker=marker, ms=9, color=color,
                    mec="k", capsize=3, lw=1.2, ls="none", label=label,
                )  # fmt: skip
        ax.set_xticks(range(len(ks)), [f"{k:g}" for k in ks], rotation=45 if len(ks) > 8 else 0)
        ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_ylabel("size")
        ax.set_title(f"{f} ({cls.replace('_', '-')})", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("training-set size K (one column per K of the sweep: log-spaced)")
    handles = {}
    for ax in axes[:, 0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles), fontsize=9)
    fig.suptitle(
        f"Class fractions over K and network size: {size_axis}\n"
        f"markers: transition points interpolated in log K; bars: their intervals from the {level} bands",
        fontsize=9,
    )
    return _png(fig)


def capacity_figure(table: Sequence[dict], *, size_axis: str) -> bytes:
    """A, B and the spurious peak against network size on log axes, with their intervals: the capacity law
    (SCIENCE.md §6-§7: smaller networks stop memorizing and start generalizing at smaller K). A point past an
    end of the sweep is drawn hollow at that end (K_max for 'above', K_min for 'below')."""
    fig, ax = plt.subplots(figsize=(7.5, 4.0), layout="constrained")
    sizes = [t["size"] for t in table]
    for prefix, (marker, color, label, _) in TRANSITION_MARKS.items():
        inside = [t for t in table if t[f"{prefix}_where"] == "inside"]
        if inside:
            x = np.array([t["size"] for t in inside], dtype=float)
            k = np.array([t[f"{prefix}_K"] for t in inside])
            low = np.array([t["K_min"] if t[f"{prefix}_low"] is None else t[f"{prefix}_low"] for t in inside])
            high = np.array([t["K_max"] if t[f"{prefix}_high"] is None else t[f"{prefix}_high"] for t in inside])
            err = np.vstack([np.maximum(k - low, 0), np.maximum(high - k, 0)])  # (2, n_sizes)
            ax.errorbar(x, k, yerr=err, marker=marker, ms=9, color=color, mec="k", capsize=3, label=label)
        outside = [t for t in table if t[f"{prefix}_where"] in ("below", "above")]
        if outside:
            ax.plot(
                [t["size"] for t in outside],
                [t["K_max"] if t[f"{prefix}_where"] == "above" else t["K_min"] for t in outside],
                marker=marker, ms=9, mfc="none", mec=color, ls="none", label=f"{label}, past the sweep's end",
            )  # fmt: skip
    ks = sorted({t["K_min"] for t in table} | {t["K_max"] for t in table})
    for k in (ks[0], ks[-1]):
        ax.axhline(k, color="0.6", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel(f"network size: {size_axis}")
    ax.set_ylabel("training-set size K")
    ax.grid(alpha=0.3, which="both")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9)
    fig.suptitle("Transition points against network size (dotted: the ends of the K sweep)", fontsize=9)
    return _png(fig)


__all__ = [
    "FRACTIONS",
    "TRANSITION_MARKS",
    "capacity_figure",
    "census_figure",
    "phase_figure",
    "phase_map_figure",
    "strip_figure",
    "two_model_figure",
]
