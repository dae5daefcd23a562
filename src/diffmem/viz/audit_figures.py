"""Figures of an audit (diffmem.evaluate.audit): the closest sample / training pairs side by side (the
extraction figure) and the nearest-distance distributions of samples and of unseen real images."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffmem.viz.figures import CLASS_COLORS  # noqa: E402

FONT = 9  # points: the smallest text of these figures


def png_bytes(fig, dpi: int = 120) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def show_image(ax, image: np.ndarray) -> None:
    """One image (C, H, W) in [-1, 1] as it is: grey with black at -1 and white at 1, or RGB."""
    ax.set_xticks([])
    ax.set_yticks([])
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.clip((image.transpose(1, 2, 0) + 1) / 2, 0, 1), interpolation="nearest")


def extraction_figure(
    samples: np.ndarray,
    train: np.ndarray,
    distances: Sequence[float],
    classes: Sequence[str],
    *,
    delta_m: float,
    metric: str,
    columns: int = 8,
) -> bytes:
    """Closest pairs first: each generated sample above its nearest training image, with their distance;
    a pair framed in the memorized colour is a copy (distance <= delta_m)."""
    n = len(samples)
    if n == 0:
        raise ValueError("the extraction figure needs at least one pair")
    columns = min(columns, n)
    blocks = -(-n // columns)
    fig, axes = plt.subplots(2 * blocks, columns, figsize=(1.25 * columns + 0.8, 2.6 * blocks + 0.6), squeeze=False)
    for b in range(blocks):
        for c in range(columns):
            i = b * columns + c
            top, bottom = axes[2 * b, c], axes[2 * b + 1, c]
            if i >= n:
                top.axis("off")
                bottom.axis("off")
                continue
            show_image(top, samples[i])
            show_image(bottom, train[i])
            color = CLASS_COLORS.get(classes[i], "black")
            for ax in (top, bottom):
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(3 if classes[i] == "memorized" else 1)
            top.set_title(f"{metric} {distances[i]:.3f}", fontsize=FONT, color=color)
        axes[2 * b, 0].set_ylabel("sample", fontsize=FONT)
        axes[2 * b + 1, 0].set_ylabel("nearest\ntraining", fontsize=FONT)
    fig.suptitle(
        f"Closest generated / training pairs (copies framed: {metric} distance <= delta_m = {delta_m:.3g})",
        fontsize=FONT + 1,
    )
    return png_bytes(fig)


def distance_figure(
    sample_m: np.ndarray, reference_m: np.ndarray, *, delta_m: float, metric: str, reference: str
) -> bytes:
    """Histograms of the nearest training distance of generated samples and of unseen real images
    (held-out, or training images leave-one-out), with the copy threshold delta_m."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    both = np.concatenate([sample_m, reference_m])
    positive = both[both > 0]
    low = max(float(positive.min()) if positive.size else 1e-6, 1e-6)
    bins = np.geomspace(low / 1.5, max(float(both.max()), low) * 1.5, 50)
    ax.hist(
        np.maximum(sample_m, low),
        bins=bins,
        alpha=0.6,
        label=f"generated samples ({len(sample_m)})",
        color=CLASS_COLORS["memorized"],
    )
    ax.hist(np.maximum(reference_m, low), bins=bins, alpha=0.6, label=f"{reference} ({len(reference_m)})", color="0.5")
    ax.axvline(delta_m, color="black", linestyle="--", label=f"delta_m = {delta_m:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"distance to the nearest training image ({metric}, log scale)", fontsize=FONT + 1)
    ax.set_ylabel("images", fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT)
    ax.legend(fontsize=FONT)
    ax.set_title("Copies sit left of delta_m; unseen real images show where real novelty lies", fontsize=FONT + 1)
    return png_bytes(fig)


__all__ = ["FONT", "distance_figure", "extraction_figure", "png_bytes", "show_image"]
