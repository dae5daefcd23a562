"""HTML fragments of the study report, and what a report section is built from.

A section is a function `section(ctx: ReportContext) -> Section | str`: it reads what it needs through
ctx (the study's jobs and notes), registers the tables and figures it shows as files of the report
(`ctx.add_table`, `ctx.add_figure`), and returns its Section, or a one-line reason when there is nothing
to show (which the page lists as an omission). Every fragment escapes its text; images are embedded as
base64 PNG, so a page built from these needs no external resource.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.io.results import ClassTable, Job, Notes

CSS = """
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
.galleries { display: grid; grid-template-columns: 1fr; gap: 1em; }
pre { background: #f6f8fb; padding: 0.8em; overflow-x: auto; font-size: 0.82em; }
nav a { margin-right: 1em; }
"""


@dataclass(frozen=True)
class Section:
    """One section of the page: its anchor, its heading and the HTML below the heading."""

    key: str
    title: str
    body: str


@dataclass(frozen=True)
class ReportContext:
    """What a section reads (the study), and where it puts the tables and figures it shows."""

    root: Path  # the study directory
    jobs: list[Job]
    transitions: dict  # phase.json's transition points (SCIENCE.md §5)
    notes: Notes  # problems met reading optional files
    classes: tuple[str, ...]  # classes of generated samples: memorized, spurious, generalized
    point_classes: tuple[str, ...]  # those and 'training': the classes of points a per-point analysis measures
    tables: dict[str, tuple[list[str], list[dict]]] = field(default_factory=dict)  # {file name: (columns, rows)}
    figures: dict[str, bytes] = field(default_factory=dict)  # {file name: PNG}

    def add_table(self, name: str, columns: Sequence[str], rows: Sequence[dict]) -> None:
        """Write rows as the report's CSV file `name`, with these columns."""
        if name in self.tables:
            raise ValueError(f"two sections write the table {name}; give each table its own file name")
        self.tables[name] = (list(columns), list(rows))

    def add_figure(self, name: str, png: bytes) -> bytes:
        """Write png as the report's file `name`; returns png, to embed it."""
        if name in self.figures:
            raise ValueError(f"two sections write the figure {name}; give each figure its own file name")
        self.figures[name] = png
        return png


SectionFunction = Callable[[ReportContext], Section | str]  # a section: its Section, or why it is omitted


def escape(value) -> str:
    """str(value) as HTML text or attribute value."""
    return html.escape(str(value), quote=True)


def fmt(v, digits: int = 3) -> str:
    """A table cell: '-' for None, integers as they are, floats to `digits` places (significant digits
    when very large or small)."""
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{escape(alt)}">'


def figure(png: bytes, alt: str, caption: str) -> str:
    """An embedded image with a caption (which says what to look for)."""
    return f"<figure>{img(png, alt)}<figcaption>{escape(caption)}</figcaption></figure>"


def table(columns: Sequence[str], rows: Sequence[Sequence], text_columns: int = 0) -> str:
    """An HTML table; the first text_columns columns are left-aligned text, the others right-aligned numbers."""

    def cell(tag: str, i: int, v) -> str:
        cls = ' class="text"' if i < text_columns else ""
        return f"<{tag}{cls}>{escape(v)}</{tag}>"

    head = "".join(cell("th", i, c) for i, c in enumerate(columns))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def class_columns(pooled: ClassTable, column: str, classes: Sequence[str]) -> tuple[list[str], list[list]]:
    """The columns and rows of an HTML table of one column of a ClassTable: K, then 'median [q25, q75] (n)'
    per class present."""
    present = [c for c in classes if any((k, c) in pooled.values for k in pooled.ks)]
    by = {(r["K"], r["class"]): r for r in pooled.rows}
    rows = []
    for k in pooled.ks:
        row: list = [k]
        for c in present:
            r = by.get((k, c))
            if r is None or r[f"{column}_n"] == 0:
                row.append("-")
            else:
                q = (r[f"{column}_median"], r[f"{column}_q25"], r[f"{column}_q75"])
                row.append(f"{fmt(q[0])} [{fmt(q[1])}, {fmt(q[2])}] (n = {r[f'{column}_n']})")
        rows.append(row)
    return ["K", *present], rows


__all__ = [
    "CSS",
    "ReportContext",
    "Section",
    "SectionFunction",
    "class_columns",
    "escape",
    "figure",
    "fmt",
    "img",
    "table",
]
