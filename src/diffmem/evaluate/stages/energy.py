"""Stage 'energy': -log p_sigma(x) relative to the training mean, by Gauss-Legendre quadrature of the
learned score along a straight path and a quarter arc, with the two paths' discrepancy (SCIENCE.md §6;
energy.csv, energy.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.core.energy import relative_energy
from diffmem.evaluate.run import RunContext, by_class, point_rows
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import AT_LEAST_1, POSITIVE, Bound, Section
from diffmem.viz.html import ReportContext
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.sections import ClassStrips, strip_section


@dataclass(frozen=True)
class EnergyConfig(Section):
    """Relative energies by Gauss-Legendre quadrature of the learned score along paths (SCIENCE.md §6)."""

    _key = "analyses.energy"
    enabled: bool = False
    n_points: int = 32  # points per class
    n_nodes: int = 32  # Gauss-Legendre nodes per path
    sigma: float = 0.2  # noise level of the energy

    _bounds = {"n_points": AT_LEAST_1, "n_nodes": Bound(2), "sigma": POSITIVE}


def run(ctx: RunContext, c: EnergyConfig) -> list[Path]:
    x, labels, index = ctx.points(c.n_points)
    anchor = ctx.train_x.mean(0, keepdim=True).expand_as(x)
    with torch.no_grad():
        r = relative_energy(ctx.denoiser, c.sigma, ctx.as_images(anchor), ctx.as_images(x), n_nodes=c.n_nodes)
    rows = point_rows(labels, index, energy_straight=r.straight, energy_arc=r.arc, discrepancy=r.discrepancy)
    summary = {
        "sigma": c.sigma,
        "reference": "the training mean: values are -log p(x) + log p(mean) in nats",
        "energy": by_class(rows, "energy_straight"),
        "discrepancy": by_class(rows, "discrepancy"),
    }
    return ctx.write_results("energy", rows, summary)


REPORT = ClassStrips(
    key="energy",
    title="Energy",
    columns=("energy_straight", "discrepancy"),
    panels=(("energy_straight", "-log p(x) + log p(training mean) [nats]"),),
    figure_title="Relative energy per class (straight-path quadrature of the learned score)",
    alt="relative energy per class and K",
    caption="Look for memorized and spurious states lower in energy (deeper wells) than generalized samples.",
    table_column="discrepancy",
    table_note="Disagreement of the two integration paths (a learned score is not exactly a gradient):",
)


def report_section(ctx: ReportContext) -> ReportSection | str:
    return strip_section(ctx, REPORT)


STAGE = Stage(
    "energy", "Energy", EnergyConfig, run, (TRAIN, "sample", "classify"), optional=True, report=report_section
)
