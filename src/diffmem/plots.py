"""Figures. Matplotlib with the Agg backend; images are written atomically as PNG."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from diffmem.runs import write_bytes_atomic  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def sample_neighbour_grid(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | os.PathLike, *, title: str
) -> None:
    """One block per panel: a row of samples above a row of their nearest training images.

    panels: (label, samples (n, H, W), neighbours (n, H, W)) with values in [-1, 1].
    """
    n_cols = max(p[1].shape[0] for p in panels)
    fig, axes = plt.subplots(
        2 * len(panels), n_cols, figsize=(0.6 * n_cols + 1.2, 1.3 * len(panels) + 0.6), squeeze=False
    )
    for p, (label, samples, neighbours) in enumerate(panels):
        for row, images, name in ((2 * p, samples, "sample"), (2 * p + 1, neighbours, "nearest\ntraining")):
            for c in range(n_cols):
                ax = axes[row, c]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c < images.shape[0]:
                    ax.imshow(images[c], cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
            axes[row, 0].set_ylabel(
                f"{label}\n{name}" if row % 2 == 0 else name, fontsize=7, rotation=0, ha="right", va="center"
            )
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
