"""Figures a person reads: images shown as stored, no empty rows, readable text, K axes labelled with K."""

import io
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text
from PIL import Image

from diffmem.io.results import ClassTable
from diffmem.viz.figures import (
    MIN_FONT_PT,
    attractor_gallery,
    class_gallery,
    floor_fonts,
    hopfield_capacity_plot,
    landscape_figure,
    memorization_plot,
    merging_plot,
    phase_heatmap,
    sample_neighbour_grid,
    two_model_plot,
)
from diffmem.viz.study_figures import PAGE_WIDTH_IN, census_figure, phase_figure, strip_figure, two_model_figure

CLASSES = ("memorized", "spurious", "generalized", "off_manifold")
PAGE_PX = 100 * PAGE_WIDTH_IN  # the report's column in pixels at the 100 dpi of its figures


@pytest.fixture
def drawn(monkeypatch):
    """The figures closed while the test runs (every diffmem figure is closed once saved), in order."""
    figures = []
    close = plt.close

    def keep(fig=None):
        figures.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    return figures


def png(path) -> np.ndarray:
    """A saved PNG as (H, W, 3) uint8."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class Labelled:
    """What class_gallery reads of a classification: labels, distances, typical()."""

    def __init__(self, labels: list[str]):
        n = len(labels)
        self.labels = labels
        self.distances = SimpleNamespace(
            m=np.linspace(0.1, 0.9, n), s=np.linspace(0.2, 0.8, n), train_index=np.arange(n) % 2, gen_index=np.arange(n)
        )

    def typical(self, cls: str, n: int, *, most: bool = True) -> list[int]:
        idx = [i for i, c in enumerate(self.labels) if c == cls]
        return (idx if most else idx[::-1])[:n]


def bands() -> np.ndarray:
    """A (6, 6) image: two columns at the data minimum -1, two at 0, two at the maximum 1."""
    return np.repeat(np.array([-1.0, -1.0, 0.0, 0.0, 1.0, 1.0])[None, :], 6, axis=0)


def neighbours_of_grey(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels just left and right of a band of mid-grey (the 0 band of bands()) in the image."""
    grey = np.all(np.abs(rgb.astype(int) - 128) <= 3, axis=2)
    y = int(np.argmax(grey.sum(axis=1)))  # a row through the grey bands (text has few grey pixels per row)
    runs = np.split(np.flatnonzero(grey[y]), np.flatnonzero(np.diff(np.flatnonzero(grey[y])) > 1) + 1)
    band = max(runs, key=len)  # the widest run of grey in that row: a band, not an edge of text
    assert len(band) >= 5, "no grey band found"
    return rgb[y, band[0] - 2], rgb[y, band[-1] + 2]


# --- 1. images as they are --------------------------------------------------------------------------------


def test_sample_grid_shows_the_minimum_black_and_the_maximum_white(tmp_path):
    samples = np.stack([bands(), np.full((6, 6), 0.5)])  # (2, 6, 6); the second is uniformly 0.5
    path = tmp_path / "grid.png"
    sample_neighbour_grid([("K=4", samples, np.stack([bands(), bands()]))], path, title="grid")
    rgb = png(path)
    left, right = neighbours_of_grey(rgb)
    assert left.tolist() == [0, 0, 0]  # -1, the data minimum, is black (gray_r would make it white)
    assert right.tolist() == [255, 255, 255]  # 1, the maximum, is white
    # one fixed range for every cell: a uniform 0.5 is 3/4 grey, not autoscaled to black or white
    assert np.any(np.all(np.abs(rgb.astype(int) - 191) <= 2, axis=2))


def test_gallery_uses_the_data_range_not_each_image_s_own(tmp_path):
    train = np.stack([bands(), bands()])  # the data range is [-1, 1]
    samples = np.stack([bands(), bands() * 0.5])  # the second spans only [-0.5, 0.5]
    path = tmp_path / "gallery.png"
    class_gallery(Labelled(["memorized", "generalized"]), samples, train, path, classes=CLASSES, title="t", n=1)
    rgb = png(path)
    left, right = neighbours_of_grey(rgb)
    assert left.tolist() == [0, 0, 0] and right.tolist() == [255, 255, 255]
    # -0.5 and 0.5 in the range [-1, 1]: 1/4 and 3/4 grey; per-image autoscaling would stretch them to 0 and 255
    for level in (64, 191):
        assert np.any(np.all(np.abs(rgb.astype(int) - level) <= 2, axis=2)), level
    # an explicit range wins: in [-2, 2], -1 is 1/4 grey and 1 is 3/4 grey
    class_gallery(
        Labelled(["memorized", "generalized"]),
        samples,
        train,
        path,
        classes=CLASSES,
        title="t",
        n=1,
        value_range=(-2, 2),
    )
    left, right = neighbours_of_grey(png(path))
    assert np.abs(left.astype(int) - 64).max() <= 2 and np.abs(right.astype(int) - 191).max() <= 2


def test_colour_images_are_shown_as_rgb(tmp_path):
    red = np.stack([np.ones((6, 6)), -np.ones((6, 6)), -np.ones((6, 6))])  # (3, 6, 6): pure red in [-1, 1]
    train = np.stack([-red, red])  # the nearest training example shown is the first: cyan
    path = tmp_path / "rgb.png"
    class_gallery(Labelled(["memorized"]), red[None], train, path, classes=CLASSES, title="rgb", n=1)
    rgb = png(path).astype(int)
    assert np.sum((rgb[..., 0] == 255) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0)) >= 100  # a red cell
    assert np.sum((rgb[..., 0] == 0) & (rgb[..., 1] == 255) & (rgb[..., 2] == 255)) >= 100  # its neighbour, cyan


def test_a_bad_value_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="value_range must be two finite numbers"):
        sample_neighbour_grid([("a", bands()[None], bands()[None])], tmp_path / "x.png", title="t", value_range=(1, 1))
    assert not (tmp_path / "x.png").exists()


# --- 2. no rows for empty classes ---------------------------------------------------------------------------


def test_gallery_has_no_rows_for_empty_classes(tmp_path, drawn):
    train = np.stack([bands(), -bands()])
    samples = np.stack([bands()] * 4)
    full = Labelled(["memorized", "spurious", "generalized", "off_manifold"])
    class_gallery(full, samples, train, tmp_path / "full.png", classes=CLASSES, title="t", n=2)
    half = Labelled(["memorized", "memorized", "generalized", "generalized"])
    class_gallery(half, samples, train, tmp_path / "half.png", classes=CLASSES, title="t", n=2)
    rows = [len({round(ax.get_position().y0, 6) for ax in fig.axes}) for fig in drawn]
    assert rows == [12, 6]  # three rows (sample, nearest training, nearest generated) per class with samples
    assert [len(fig.axes) for fig in drawn] == [12 * 5, 6 * 5]  # 2n + 1 columns
    heights = [fig.get_figheight() for fig in drawn]
    assert heights[1] < 0.6 * heights[0]
    assert png(tmp_path / "half.png").shape[0] < 0.6 * png(tmp_path / "full.png").shape[0]
    assert "no samples (no rows): spurious, off_manifold" in drawn[1].get_suptitle()
    assert "no samples" not in drawn[0].get_suptitle()
    class_gallery(Labelled([]), samples[:0], train, tmp_path / "none.png", classes=CLASSES, title="t", n=2)
    assert drawn[2].axes == [] and "no samples in any class" in drawn[2].get_suptitle()


# --- 3. no tiny text ---------------------------------------------------------------------------------------


def small_texts(fig, minimum: float = 9.0) -> list[tuple[str, float]]:
    """Visible, non-empty texts of a drawn figure below `minimum` points."""
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert texts, "a figure with no text"
    return [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < minimum]


def test_floor_fonts_raises_small_text_only():
    fig, ax = plt.subplots()
    small = ax.set_title("small", fontsize=5)
    big = ax.set_xlabel("big", fontsize=14)
    floor_fonts(fig)
    assert (small.get_fontsize(), big.get_fontsize()) == (MIN_FONT_PT, 14)
    plt.close(fig)


def every_figure(tmp_path) -> list[str]:
    """Draw each figure of diffmem.viz once, with small inputs; returns their names in drawing order."""
    rng = np.random.default_rng(0)
    ks = [4, 16, 64]
    phase = [
        {"K": k, "n_samples": 32, "f_M": m, "f_S": s, "f_G": 1 - m - s, "f_S_low": s / 2, "f_S_high": s + 0.1}
        for k, m, s in ((4, 0.8, 0.1), (16, 0.4, 0.3), (64, 0.1, 0.1))
    ]
    transitions = {"last_memorizing_K": 4, "first_generalizing_K": 64, "spurious_peak_K": 16}
    images = rng.uniform(-1, 1, (4, 6, 6))
    sample_neighbour_grid([("K=4", images, images)], tmp_path / "a.png", title="grid")
    attractors = [{"kind": "memory", "x": [0.5, 0.1], "share": 0.6}, {"kind": "spurious", "x": [0, 0], "share": 0.4}]
    panel = SimpleNamespace(
        grid=rng.uniform(0, 5, (20, 20)), lim=1.5, patterns=rng.normal(size=(3, 2)), ring_radius=0.9,
        attractors=attractors, title="K = 3",
    )  # fmt: skip
    landscape_figure([panel], tmp_path / "b.png", sigma=0.2)
    grids = {"share_spurious": rng.uniform(0, 1, (3, 4))} | {f"n_{k}": np.ones((3, 4)) for k in ("memory", "spurious")}
    grids |= {f"n_{k}": np.zeros((3, 4)) for k in ("saddle", "maximum")}
    diagram = SimpleNamespace(ks=ks, sigmas=[0.05, 0.1, 0.2, 0.4], grid=lambda name: grids[name])
    phase_heatmap(diagram, tmp_path / "c.png", title="heatmap")
    census = {
        "sigma": 0.2,
        "K": 2,
        "attractors": [{"kind": "memory", "share": 1.0, "x": images[0].ravel(), "nearest_pattern": 0}],
    }
    attractor_gallery(census, images.reshape(4, -1), (6, 6), tmp_path / "d.png")
    curves = {50: {"overlap": [1, 0.9, 0.3], "sem": [0, 0.01, 0.05], "n_networks": 4}}
    hopfield_capacity_plot({"alphas": [0.05, 0.1, 0.2], "curves": curves}, tmp_path / "e.png")
    merge = {"K": ks, "sigma_merge": [0.3, 0.08, 0.02], "threshold_nats": 0.1, "constant": 1.2, "exponent": 1.0}
    merging_plot(merge, tmp_path / "f.png")
    memorization_plot(
        [{"K": k, "fraction": f} for k, f in zip(ks, (0.9, 0.5, 0.1), strict=True)],
        tmp_path / "g.png",
        quantile=0.05,
        title="m",
    )
    class_gallery(
        Labelled(["memorized", "spurious"] * 2), images, images, tmp_path / "h.png", classes=CLASSES, title="g"
    )
    points = rng.normal(size=(4, 2))
    class_gallery(
        Labelled(["memorized", "generalized"] * 2), points, points, tmp_path / "i.png", classes=CLASSES, title="2d"
    )
    two = [{"K": k, "agreement": a, "mean_distance": 1 - a} for k, a in zip(ks, (0.0, 0.4, 0.9), strict=True)]
    two_model_plot(two, tmp_path / "j.png", title="two")
    phase_figure(phase, transitions, metric="l2", level="95%")
    values = {(k, c): {"sigma_c": list(rng.uniform(0.1, 1, 5))} for k in ks for c in ("memorized", "training")}
    strip_figure(ClassTable(values, [], ("sigma_c",)), [("sigma_c", "sigma_c")], CLASSES, title="strips")
    kinds = ("memory", "spurious", "saddle", "maximum")
    census_rows = [
        {"K": k, "sigma": 0.2} | {f"n_{x}": 1 for x in kinds} | {f"share_{x}": 0.25 for x in kinds} for k in ks
    ]
    census_figure(census_rows, transitions)
    two_model_figure(two, transitions)
    return ["grid", "landscape", "heatmap", "attractors", "hopfield", "merging", "memorization", "gallery", "scatter",
            "two-model plot", "phase", "strips", "census", "two-model"]  # fmt: skip


def test_no_text_in_any_figure_is_below_9_points(tmp_path, drawn):
    names = every_figure(tmp_path)
    assert len(drawn) == len(names)
    assert MIN_FONT_PT >= 9
    for name, fig in zip(names, drawn, strict=True):
        assert small_texts(fig) == [], name


# --- 4. K axes are labelled with K ------------------------------------------------------------------------


def phase_rows(ks) -> list[dict]:
    return [{"K": k, "n_samples": 64, "f_M": 0.5, "f_S": 0.2, "f_G": 0.3} for k in ks]


def tick_texts(ax) -> tuple[list[str], list[str]]:
    """The major and the (non-empty) minor x tick labels of an axis, as drawn."""
    major = [t.get_text() for t in ax.get_xticklabels()]
    minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    return major, minor


def test_phase_diagram_ticks_are_the_study_s_k_values(drawn):
    phase_figure(phase_rows([4, 6, 20]), {}, metric="l2", level="95%")
    ax = drawn[0].axes[0]
    assert ax.get_xscale() == "log"
    assert tick_texts(ax) == (["4", "6", "20"], [])  # not 4x10^0, 6x10^0, 2x10^1
    phase_figure(phase_rows([2**i for i in range(12)]), {}, metric="l2", level="95%")
    major, minor = tick_texts(drawn[1].axes[0])
    assert major == [str(2**i) for i in range(12)] and minor == []


def test_census_and_two_model_ticks_are_the_k_values(drawn):
    kinds = ("memory", "spurious", "saddle", "maximum")
    rows = [{"K": k, "sigma": 0.2} | {f"n_{x}": 1 for x in kinds} | {f"share_{x}": 0.2 for x in kinds} for k in (3, 30)]
    census_figure(rows, {})
    two_model_figure([{"K": k, "agreement": 0.5, "mean_distance": 0.1} for k in (5, 50, 500)], {})
    assert [tick_texts(ax) for ax in drawn[0].axes] == [(["3", "30"], [])] * 2
    assert tick_texts(drawn[1].axes[0]) == (["5", "50", "500"], [])


# --- figures fit the report's column, so the page does not shrink their text ------------------------------


def test_report_figures_fit_the_page_column(tmp_path):
    ks = [2**i for i in range(10)]
    values = {(k, "memorized"): {"a": [1.0, 2.0], "b": [3.0, 4.0]} for k in ks}
    wide = strip_figure(ClassTable(values, [], ("a", "b")), [("a", "a"), ("b", "b")], CLASSES, title="two panels")
    with Image.open(io.BytesIO(wide)) as img:
        assert img.width <= PAGE_PX and img.height > img.width / 2  # the panels are stacked, not side by side
    labels = ["memorized", "spurious", "generalized"] * 6
    samples = np.stack([bands()] * 18)
    class_gallery(Labelled(labels), samples, samples, tmp_path / "g.png", classes=CLASSES, title="six per side")
    assert png(tmp_path / "g.png").shape[1] <= PAGE_PX
