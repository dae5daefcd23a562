"""The report section every per-point analysis shares: a strip figure of some columns of its CSV per
class and K, and a table of one column's quartiles (critical times, energies, curvature, collapse)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from diffmem.io.results import class_table
from diffmem.viz.html import ReportContext, Section, class_columns, figure, table
from diffmem.viz.study_figures import strip_figure


@dataclass(frozen=True)
class ClassStrips:
    key: str  # the stage: reads analysis/<key>.csv, writes report/<key>.png and <key>_by_class.csv
    title: str  # the section's heading
    columns: tuple[str, ...]  # CSV columns pooled per (K, class)
    panels: tuple[tuple[str, str], ...]  # (column, y label) of each strip panel
    figure_title: str
    alt: str
    caption: str  # what to look for
    table_column: str  # the column whose quartiles the HTML table shows
    table_note: str  # the paragraph above that table
    with_training: bool = True  # training examples as a class of their own
    count: tuple[str, tuple[str, ...]] | None = None  # (column, values) counted per group, e.g. basin status


def strip_section(
    ctx: ReportContext, spec: ClassStrips, *, reference: Callable | None = None, figure_title: str | None = None
) -> Section | str:
    """The section of spec, or why it is omitted; reference(ax, column) may draw a guide line."""
    classes = ctx.point_classes if spec.with_training else ctx.classes
    pooled = class_table(ctx.jobs, f"{spec.key}.csv", spec.columns, ctx.notes, classes, count=spec.count)
    if pooled is None:
        return f"no job has analysis/{spec.key}.csv (set analyses.{spec.key}.enabled: true)"
    ctx.add_table(f"{spec.key}_by_class.csv", list(pooled.rows[0]), pooled.rows)
    title = figure_title or spec.figure_title
    png = ctx.add_figure(
        f"{spec.key}.png", strip_figure(pooled, spec.panels, classes, title=title, reference=reference)
    )
    cols, rows = class_columns(pooled, spec.table_column, classes)
    body = figure(png, spec.alt, spec.caption) + f"<p>{spec.table_note}</p>" + table(cols, rows)
    return Section(spec.key, spec.title, body)


__all__ = ["ClassStrips", "strip_section"]
