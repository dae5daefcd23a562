"""Stage 'energy': -log p_sigma(x) relative to the training mean, by Gauss-Legendre quadrature of the
learned score along a straight path and a quarter arc, with each path's quadrature error and the two
paths' discrepancy (SCIENCE.md §6; energy.csv, energy.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.core.energy import DEFAULT_MAX_NODES, DEFAULT_TOLERANCE, MIN_ADAPTIVE_NODES, relative_energy
from diffmem.evaluate.run import RunContext, by_class, point_rows
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import AT_LEAST_1, POSITIVE, Bound, Section
from diffmem.io.results import Notes, class_table
from diffmem.viz.html import ReportContext, class_columns, table
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.sections import ClassStrips, strip_section


@dataclass(frozen=True)
class EnergyConfig(Section):
    """Relative energies by Gauss-Legendre quadrature of the learned score along paths (SCIENCE.md §6)."""

    _key = "analyses.energy"
    enabled: bool = False
    n_points: int = 32  # points per class
    sigma: float = 0.2  # noise level of the energy
    tolerance: float = DEFAULT_TOLERANCE  # target quadrature error per path [nats] of the adaptive rule
    max_nodes: int = DEFAULT_MAX_NODES  # most denoiser calls per point and path of the adaptive rule
    n_nodes: int | None = None  # a fixed Gauss-Legendre rule of this many nodes instead (null: adaptive)

    _bounds = {
        "n_points": AT_LEAST_1,
        "sigma": POSITIVE,
        "tolerance": POSITIVE,
        "max_nodes": Bound(MIN_ADAPTIVE_NODES),
        "n_nodes": Bound(2),
    }


def run(ctx: RunContext, c: EnergyConfig) -> list[Path]:
    x, labels, index = ctx.points(c.n_points)
    anchor = ctx.train_x.mean(0, keepdim=True).expand_as(x)
    with torch.no_grad():
        r = relative_energy(
            ctx.denoiser,
            c.sigma,
            ctx.as_images(anchor),
            ctx.as_images(x),
            tolerance=c.tolerance,
            max_nodes=c.max_nodes,
            n_nodes=c.n_nodes,
        )
    rows = point_rows(
        labels,
        index,
        energy_straight=r.straight,
        energy_arc=r.arc,
        discrepancy=r.discrepancy,
        energy_straight_error=r.straight_error,
        energy_arc_error=r.arc_error,
        discrepancy_error=r.discrepancy_error,
        nodes_straight=r.straight_nodes,
        nodes_arc=r.arc_nodes,
    )
    within = r.discrepancy_error <= 2 * c.tolerance if c.n_nodes is None else None
    summary = {
        "sigma": c.sigma,
        "reference": "the training mean: values are -log p(x) + log p(mean) in nats",
        "quadrature": {
            "rule": "fixed" if c.n_nodes is not None else "adaptive",
            "n_nodes": c.n_nodes,
            "tolerance": None if c.n_nodes is not None else c.tolerance,
            "max_nodes": None if c.n_nodes is not None else c.max_nodes,
            "note": "estimated quadrature errors in nats; the discrepancy's own error is their sum",
            "denoiser_calls": int((r.straight_nodes + r.arc_nodes).sum()),
            "n_points": len(rows),
            "n_within_tolerance": None if within is None else int(within.sum()),
        },
        "energy": by_class(rows, "energy_straight"),
        "discrepancy": by_class(rows, "discrepancy"),
        "energy_straight_error": by_class(rows, "energy_straight_error"),
        "energy_arc_error": by_class(rows, "energy_arc_error"),
        "discrepancy_error": by_class(rows, "discrepancy_error"),
    }
    return ctx.write_results("energy", rows, summary)


REPORT = ClassStrips(
    key="energy",
    title="Energy",
    columns=("energy_straight", "discrepancy"),
    panels=(("energy_straight", "-log p(x) + log p(training mean) [nats]"),),
    figure_title="Relative energy per class (straight-path quadrature of the learned score)",
    alt="relative energy per class and K",
    caption=(
        "Look for memorized and spurious states lower in energy (deeper wells) than generalized samples. "
        "Each energy is integrated to an estimated quadrature error (energy.csv: energy_straight_error)."
    ),
    table_column="discrepancy",
    table_note=(
        "Disagreement of the two integration paths (a learned score is not exactly a gradient), shown with its "
        "quadrature error in the table below it: a discrepancy within its quadrature error is no evidence of a "
        "non-conservative score."
    ),
)


ERROR_NOTE = (
    "Quadrature error of the discrepancy (the sum of the estimated errors of both paths, energy.csv: "
    "discrepancy_error):"
)


def report_section(ctx: ReportContext) -> ReportSection | str:
    section = strip_section(ctx, REPORT)
    if isinstance(section, str):
        return section
    # runs analysed before the error estimate lack the column: their table is simply not shown (no note)
    errors = class_table(ctx.jobs, "energy.csv", ("discrepancy_error",), Notes(), ctx.point_classes)
    if errors is None:
        return ReportSection(section.key, section.title, section.body + "<p>No quadrature error was recorded.</p>")
    cols, rows = class_columns(errors, "discrepancy_error", ctx.point_classes)
    return ReportSection(section.key, section.title, section.body + f"<p>{ERROR_NOTE}</p>" + table(cols, rows))


STAGE = Stage(
    "energy", "Energy", EnergyConfig, run, (TRAIN, "sample", "classify"), optional=True, report=report_section
)
