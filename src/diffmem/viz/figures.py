"""Figures. Matplotlib with the Agg backend; images are written atomically as PNG.

Conventions every diffmem figure keeps (a reader should not have to guess):

- images are shown as they are: colormap 'gray' (black = the data's low value, white = its high value),
  with one fixed value range for every cell of a figure (no per-image autoscaling); colour images as RGB;
- no text is smaller than MIN_FONT_PT points (raised when the figure is saved, see floor_fonts).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any, Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from diffmem.io.files import write_bytes_atomic  # noqa: E402

MIN_FONT_PT = 9.0  # smallest text in any figure: 15 px at 120 dpi, 12.5 px at 100 dpi
IMAGE_CMAP = "gray"  # low values black, high values white: the data as stored, never inverted


def floor_fonts(fig, minimum: float = MIN_FONT_PT) -> None:
    """Raise every text of fig (titles, labels, tick labels, legends, annotations) to at least `minimum` points."""
    for text in fig.findobj(Text):
        if text.get_fontsize() < minimum:
            text.set_fontsize(minimum)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    floor_fonts(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def k_axis(ax, ks: Sequence[float], *, log: bool = True) -> None:
    """A K axis whose tick labels are exactly the sweep's K values ('4', '16', '64'), no minor labels.

    Matplotlib's log formatter labels 4, 6, 20 as '4x10^0', '6x10^0', '2x10^1'; a reader wants the K
    that was trained. Crowded labels are turned, never dropped."""
    values = sorted({float(k) for k in ks})
    if log:
        ax.set_xscale("log")
    labels = [f"{k:g}" for k in values]
    turned = len(values) > 8 or sum(len(t) for t in labels) > 40
    ax.set_xticks(values, labels, rotation=45 if turned else 0, ha="right" if turned else "center")
    ax.xaxis.set_minor_locator(NullLocator())


def image_range(*arrays: np.ndarray) -> tuple[float, float]:
    """The smallest and largest finite value over arrays: the fixed (vmin, vmax) of every image cell."""
    values = [np.asarray(a, dtype=np.float64) for a in arrays]
    finite = [v[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    if not finite:
        raise ValueError("no finite value to show: the images are empty or all NaN/inf")
    lo, hi = min(float(a.min()) for a in finite), max(float(a.max()) for a in finite)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)  # a constant image shows as mid-grey


def _checked_range(vrange: tuple[float, float] | None, *arrays: np.ndarray) -> tuple[float, float]:
    if vrange is None:
        return image_range(*arrays)
    pair = tuple(vrange)
    lo, hi = (float(pair[0]), float(pair[1])) if len(pair) == 2 else (np.nan, np.nan)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be two finite numbers (low, high) with low < high, got {vrange!r}")
    return lo, hi


def _as_image(vec: np.ndarray, vrange: tuple[float, float] = (-1.0, 1.0)) -> tuple[np.ndarray, dict]:
    """An example of shape (H, W), (1, H, W) or (3, H, W) with values in vrange as what imshow shows:
    grey images through IMAGE_CMAP with vmin, vmax = vrange; colour images as RGB, vrange mapped to [0, 1]."""
    lo, hi = vrange
    if vec.ndim == 3 and vec.shape[0] == 3:
        return np.clip((vec.transpose(1, 2, 0) - lo) / (hi - lo), 0, 1), {}
    img = vec[0] if vec.ndim == 3 else vec
    return img, {"cmap": IMAGE_CMAP, "vmin": lo, "vmax": hi}


def _bare(ax):
    """An image cell: no ticks, no frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return ax


def sample_neighbour_grid(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    *,
    title: str,
    value_range: tuple[float, float] | None = None,
) -> None:
    """One block per panel: a row of samples above a row of their nearest training images.

    panels: (label, samples (n, H, W), neighbours (n, H, W)); (n, 1, H, W) and colour (n, 3, H, W) work too.
    value_range: the (low, high) shown black and white in every cell; None: the range of the training
    images (the neighbours) of all panels."""
    lo, hi = _checked_range(value_range, *(p[2] for p in panels))
    n_cols = max(p[1].shape[0] for p in panels)
    fig, axes = plt.subplots(
        2 * len(panels), n_cols, figsize=(0.7 * n_cols + 1.5, 1.6 * len(panels) + 0.7), squeeze=False
    )
    for p, (label, samples, neighbours) in enumerate(panels):
        for row, images, name in ((2 * p, samples, "sample"), (2 * p + 1, neighbours, "nearest\ntraining")):
            for c in range(n_cols):
                ax = _bare(axes[row, c])
                if c < images.shape[0]:
                    img, kw = _as_image(images[c], (lo, hi))
                    ax.imshow(img, interpolation="nearest", **kw)
            axes[row, 0].set_ylabel(
                f"{label}\n{name}" if row % 2 == 0 else name, fontsize=MIN_FONT_PT, rotation=0, ha="right", va="center"
            )
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


KIND_STYLE = {
    "memory": {"color": "tab:blue", "marker": "o"},
    "spurious": {"color": "tab:red", "marker": "*"},
    "saddle": {"color": "tab:green", "marker": "x"},
    "maximum": {"color": "tab:orange", "marker": "^"},
}


def landscape_figure(panels, path: str | os.PathLike, *, sigma: float) -> None:
    """Heatmaps of -log p_sigma with the patterns and every attractor marked by kind and basin share."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        grid = panel.grid - np.nanmin(panel.grid)
        im = ax.imshow(
            np.minimum(grid, np.nanpercentile(grid, 95)),
            origin="lower",
            cmap="viridis_r",
            extent=(-panel.lim, panel.lim, -panel.lim, panel.lim),
        )
        if len(panel.patterns) and len(panel.patterns) <= 200:
            ax.scatter(
                panel.patterns[:, 0],
                panel.patterns[:, 1],
                s=8,
                c="white",
                edgecolors="k",
                linewidths=0.4,
                label="patterns",
                zorder=3,
            )
        if panel.ring_radius:
            t = np.linspace(0, 2 * np.pi, 200)
            ax.plot(
                panel.ring_radius * np.cos(t),
                panel.ring_radius * np.sin(t),
                color="tab:red",
                lw=1.5,
                label=f"ring of minima r*={panel.ring_radius:.3f}",
            )
        for kind, style in KIND_STYLE.items():
            pts = [a for a in panel.attractors if a["kind"] == kind]
            if not pts:
                continue
            xy = np.array([a["x"] for a in pts])
            size = 20 + 200 * np.array([a["share"] for a in pts])
            ax.scatter(
                xy[:, 0],
                xy[:, 1],
                s=size,
                c=style["color"],
                marker=style["marker"],
                label=kind,
                zorder=4,
                edgecolors="k" if style["marker"] != "x" else None,
                linewidths=0.5,
            )
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        ax.legend(fontsize=9, loc="lower left")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="-log p (shifted, clipped)")
    fig.suptitle(
        f"Energy landscape -log p at sigma = {sigma:g}: attractors by kind, marker size = basin share", fontsize=10
    )
    fig.tight_layout()
    save_figure(fig, path)


def phase_heatmap(diagram, path: str | os.PathLike, *, title: str) -> None:
    """Basin share held by spurious states over (K, sigma), beside the counts of each kind."""
    share = diagram.grid("share_spurious")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    im = ax.imshow(share, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(range(len(diagram.sigmas)), [f"{s:.3g}" for s in diagram.sigmas], rotation=60, fontsize=9)
    ax.set_yticks(range(len(diagram.ks)), [str(k) for k in diagram.ks])
    ax.set_xlabel("noise level sigma")
    ax.set_ylabel("training-set size K")
    ax.set_title("basin share of spurious states", fontsize=9)
    fig.colorbar(im, ax=ax, label="share of starts")
    for i, k in enumerate(diagram.ks):
        for kind, style in KIND_STYLE.items():
            counts = diagram.grid(f"n_{kind}")[i]
            ax2.plot(
                diagram.sigmas,
                counts,
                color=style["color"],
                alpha=0.3 + 0.7 * (i + 1) / len(diagram.ks),
                marker=style["marker"],
                ms=3,
                lw=1,
                label=f"{kind}, K={k}" if i == len(diagram.ks) - 1 else None,
            )
    ax2.set_xscale("log")
    ax2.set_yscale("symlog", linthresh=1)
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("noise level sigma")
    ax2.set_ylabel("number of attractors")
    ax2.set_title("counts per kind (darker = larger K)", fontsize=9)
    ax2.legend(fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def attractor_gallery(
    census_dict: dict, patterns: np.ndarray, image_shape, path: str | os.PathLike, *, max_items: int = 24
) -> None:
    """Attractors (top row) beside their nearest patterns (bottom row), spurious and saddles first."""
    order = {"spurious": 0, "saddle": 1, "maximum": 1, "memory": 2}
    atts = sorted(census_dict["attractors"], key=lambda a: (order[a["kind"]], -a["share"]))[:max_items]
    n = max(1, len(atts))
    fig, axes = plt.subplots(2, n, figsize=(0.9 * n + 1.2, 2.9), squeeze=False)
    lo, hi = image_range(patterns)  # the patterns' range, fixed for every cell
    for c in range(n):
        for r in range(2):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
        if c >= len(atts):
            continue
        a = atts[c]
        for r, vec in enumerate((np.asarray(a["x"]), patterns[a["nearest_pattern"]])):
            if len(image_shape) in (2, 3):  # (H, W), (1, H, W) or (3, H, W): an image
                img, kw = _as_image(vec.reshape(image_shape), (lo, hi))
                axes[r, c].imshow(img, interpolation="nearest", **kw)
            else:  # vectors: one row of values
                axes[r, c].imshow(vec[None, :], cmap=IMAGE_CMAP, vmin=lo, vmax=hi, aspect="auto")
        axes[0, c].set_title(f"{a['kind'][:4]}\n{a['share']:.2f}", fontsize=9, color=KIND_STYLE[a["kind"]]["color"])
    axes[0, 0].set_ylabel("attractor", fontsize=9)
    axes[1, 0].set_ylabel("nearest\npattern", fontsize=9)
    fig.suptitle(
        f"Census at sigma = {census_dict['sigma']:g}, K = {census_dict['K']}: kind and basin share", fontsize=9
    )
    save_figure(fig, path)


def hopfield_capacity_plot(result: dict, path: str | os.PathLike) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for n, curve in result["curves"].items():
        ax.errorbar(
            result["alphas"],
            curve["overlap"],
            yerr=curve["sem"],
            marker="o",
            ms=3,
            capsize=2,
            label=f"N = {n} ({curve['n_networks']} networks)",
        )
    ax.axhline(0.9, color="grey", ls=":", lw=1)
    ax.axvline(0.138, color="k", ls="--", lw=1, label="alpha_c = 0.138 (N -> inf)")
    ax.set_xlabel("load alpha = P / N")
    ax.set_ylabel("mean overlap after retrieval")
    ax.set_title("Hopfield retrieval from a stored pattern collapses near alpha = 0.14", fontsize=9)
    ax.legend(fontsize=9)
    save_figure(fig, path)


def merging_plot(result: dict, path: str | os.PathLike) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ks = np.array(result["K"], dtype=float)
    ax.loglog(ks, result["sigma_merge"], "o", label=f"measured (barrier = {result['threshold_nats']:g} nat)")
    ax.loglog(
        ks,
        result["constant"] * ks ** (-result["exponent"]),
        "-",
        label=f"fit {result['constant']:.3f} K^-{result['exponent']:.3f}",
    )
    k_axis(ax, ks)
    ax.set_xlabel("K (equally spaced points on the circle)")
    ax.set_ylabel("sigma at which neighbours merge")
    ax.set_title("Neighbouring memories merge at sigma ~ 1/K", fontsize=9)
    ax.legend(fontsize=9)
    save_figure(fig, path)


def memorization_plot(rows: list[dict], path: str | os.PathLike, *, quantile: float, title: str) -> None:
    ks = [r["K"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.semilogx(ks, [r["fraction"] for r in rows], "o-", label="samples closer than held-out data")
    ax.axhline(quantile, color="grey", ls=":", lw=1, label=f"held-out level ({quantile:g})")
    ax.set_ylim(-0.03, 1.03)
    k_axis(ax, ks)
    ax.set_xlabel("training-set size K")
    ax.set_ylabel("fraction of samples")
    ax.set_title(title + " (high: memorized, near the dotted line: new images)", fontsize=9)
    ax.legend(fontsize=9)
    save_figure(fig, path)


CLASS_COLORS = {
    "memorized": "tab:blue",
    "spurious": "tab:red",
    "generalized": "tab:green",
    "off_manifold": "tab:purple",
    "training": "0.5",
}


def _class_scatter(
    labels: Sequence[str], samples: np.ndarray, train: np.ndarray, path, *, classes: Sequence[str], title: str
) -> None:
    """2D samples (N, 2) coloured by class over the training points (K, 2)."""
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.scatter(train[:, 0], train[:, 1], s=10, c=CLASS_COLORS["training"], label="training", marker="x")
    for cls in classes:
        idx = [i for i, c in enumerate(labels) if c == cls]
        if idx:
            ax.scatter(samples[idx, 0], samples[idx, 1], s=6, c=CLASS_COLORS[cls], label=f"{cls} ({len(idx)})")
    ax.set_xlabel("x_1")
    ax.set_ylabel("x_2")
    ax.set_aspect("equal")
    ax.legend(fontsize=9)
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


class ClassifiedSamples(Protocol):
    """What class_gallery reads of a classification (diffmem.evaluate.classify.Classification)."""

    labels: list[str]  # (N,) the class of each sample
    distances: Any  # .m and .s (N,): the distances shown; .train_index and .gen_index (N,): the neighbours shown

    def typical(self, cls: str, n: int, *, most: bool = True) -> list[int]: ...


def class_gallery(
    classification: ClassifiedSamples,
    samples: np.ndarray,
    train: np.ndarray,
    path,
    *,
    classes: Sequence[str],
    title: str,
    n: int = 6,
    value_range: tuple[float, float] | None = None,
) -> None:
    """Per class, in the order of `classes`, the n most typical (left) and n least typical (right)
    samples, each above its nearest training example and its nearest other generated sample. Vector
    data (e.g. 2D toys) get a scatter plot of the samples coloured by class instead.

    Classes without samples get no rows; the title names them. value_range: the (low, high) shown
    black and white in every cell; None: the range of the training examples (the data the samples imitate)."""
    labels = classification.labels
    d = classification.distances
    if samples.ndim == 2:
        _class_scatter(labels, samples, train, path, classes=classes, title=title)
        return
    lo, hi = _checked_range(value_range, train)
    shown = [cls for cls in classes if labels.count(cls) > 0]
    empty = [cls for cls in classes if cls not in shown]
    if not shown:
        fig = plt.figure(figsize=(6.0, 1.0))
        fig.suptitle(f"{title}\nno samples in any class", fontsize=10)
        save_figure(fig, path)
        return
    heading = f"{title}\nleft: most typical, right: least typical"
    if empty:
        heading += f"\nno samples (no rows): {', '.join(empty)}"
    blocks = []
    for cls in shown:
        most = classification.typical(cls, n, most=True)
        least = [i for i in classification.typical(cls, n, most=False) if i not in most]
        blocks.append((cls, most, least[::-1]))
    n_cols = 2 * n + 1  # most typical, a gap, least typical
    cell, gap, head = 0.72, 0.3, 0.25 * heading.count("\n") + 0.55  # inches; a 9 pt 'm=0.123' fits a cell
    rows = 3 * len(blocks)
    height = head + 1.25 * cell * rows + gap * (len(blocks) - 1) + 0.1
    fig = plt.figure(figsize=(cell * n_cols + 1.6, height))
    # three image rows per class, a thin empty row between classes
    ratios = [r for b in range(len(blocks)) for r in ([gap / cell] if b else []) + [1.0, 1.0, 1.0]]
    grid = fig.add_gridspec(
        len(ratios), n_cols, height_ratios=ratios, top=1 - head / height, bottom=0.1 / height, hspace=0.3, wspace=0.12
    )
    image_rows = [i for i, r in enumerate(ratios) if r == 1.0]  # (3 * classes,) grid rows that hold images
    axes = np.array([[fig.add_subplot(grid[g, c]) for c in range(n_cols)] for g in image_rows])  # (rows, n_cols)
    for b, (cls, most, least) in enumerate(blocks):
        cols = list(most) + [None] * (n - len(most)) + [None] + list(least)
        for r, (name, source) in enumerate((("sample", None), ("nearest\ntraining", "t"), ("nearest\ngenerated", "g"))):
            row = 3 * b + r
            for c in range(n_cols):
                ax = _bare(axes[row, c])
                i = cols[c] if c < len(cols) else None
                if i is None:
                    continue
                vec = (
                    samples[i]
                    if source is None
                    else (train[int(d.train_index[i])] if source == "t" else samples[int(d.gen_index[i])])
                )
                img, kw = _as_image(vec, (lo, hi))
                ax.imshow(img, interpolation="nearest", **kw)
                if r == 0:
                    value = float(d.s[i]) if cls == "spurious" else float(d.m[i])
                    ax.set_title(f"{'s' if cls == 'spurious' else 'm'}={value:.3f}", fontsize=MIN_FONT_PT)
            label = f"{cls} ({labels.count(cls)})\n{name}" if r == 0 else name
            axes[row, 0].set_ylabel(
                label, fontsize=MIN_FONT_PT, rotation=0, ha="right", va="center", color=CLASS_COLORS.get(cls, "k")
            )
    fig.suptitle(heading, fontsize=10)
    save_figure(fig, path, dpi=100)


def two_model_plot(rows: list[dict], path, *, title: str) -> None:
    """Agreement fraction and mean distance of two models' samples from the same noise, against K."""
    ks = [r["K"] for r in rows]
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(ks, [r["agreement"] for r in rows], "o-", color="tab:purple", label="agreement (within delta)")
    k_axis(ax, ks)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training-set size K (each model)")
    ax.set_ylabel("agreement fraction")
    ax2 = ax.twinx()
    ax2.plot(ks, [r["mean_distance"] for r in rows], "s--", color="0.4", label="mean distance")
    ax2.set_ylabel("mean distance between the two samples")
    ax.legend(loc="upper left", fontsize=9)
    ax2.legend(loc="lower right", fontsize=9)
    ax.set_title(title + "\nrises from 0 (own copies) towards 1 (same image) as the models generalize", fontsize=9)
    save_figure(fig, path)
