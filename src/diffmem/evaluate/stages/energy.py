"""Stage 'energy': -log p_sigma(x) relative to the training mean, by Gauss-Legendre quadrature of the
learned score along a straight path and a quarter arc, with the two paths' discrepancy (SCIENCE.md §6;
energy.csv, energy.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.core.energy import relative_energy
from diffmem.evaluate.run import RunContext, by_class, load_json
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import Section, in_range
from diffmem.io.files import write_csv_atomic, write_json_atomic
from diffmem.io.results import class_table
from diffmem.viz.html import ReportContext, class_columns, figure, table
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.study_figures import strip_figure


@dataclass(frozen=True)
class EnergyConfig(Section):
    """Relative energies by Gauss-Legendre quadrature of the learned score along paths (SCIENCE.md §6)."""

    _key = "analyses.energy"
    enabled: bool = False
    n_points: int = 32  # points per class
    n_nodes: int = 32  # Gauss-Legendre nodes per path
    sigma: float = 0.2  # noise level of the energy

    def _check(self) -> None:
        in_range(self._at("n_points"), self.n_points, low=1)
        in_range(self._at("n_nodes"), self.n_nodes, low=2)
        in_range(self._at("sigma"), self.sigma, low=0, closed=(False, True))


def run(ctx: RunContext, c: EnergyConfig) -> list[Path]:
    x, labels, index = ctx.points(c.n_points)
    anchor = ctx.train_x.mean(0, keepdim=True).expand_as(x)
    with torch.no_grad():
        r = relative_energy(ctx.denoiser, c.sigma, ctx.as_images(anchor), ctx.as_images(x), n_nodes=c.n_nodes)
    rows = [
        {
            "class": labels[i],
            "index": index[i],
            "energy_straight": float(r.straight[i]),
            "energy_arc": float(r.arc[i]),
            "discrepancy": float(r.discrepancy[i]),
        }
        for i in range(len(labels))
    ]
    write_csv_atomic(ctx.out / "energy.csv", rows)
    summary = {
        "sigma": c.sigma,
        "reference": "the training mean: values are -log p(x) + log p(mean) in nats",
        "energy": by_class(rows, "energy_straight"),
        "discrepancy": by_class(rows, "discrepancy"),
    }
    write_json_atomic(ctx.out / "energy.json", summary)
    return [ctx.out / "energy.csv", ctx.out / "energy.json"]


def energy_section(ctx: ReportContext) -> ReportSection | str:
    """Relative energy per class and K, and the disagreement of its two integration paths (analysis/energy.csv)."""
    energy = class_table(ctx.jobs, "energy.csv", ("energy_straight", "discrepancy"), ctx.notes, ctx.point_classes)
    if energy is None:
        return "no job has analysis/energy.csv (set analyses.energy.enabled: true)"
    ctx.add_table("energy_by_class.csv", list(energy.rows[0]), energy.rows)
    png = ctx.add_figure(
        "energy.png",
        strip_figure(
            energy,
            [("energy_straight", "-log p(x) + log p(training mean) [nats]")],
            ctx.point_classes,
            title="Relative energy per class (straight-path quadrature of the learned score)",
        ),
    )
    cols, rows = class_columns(energy, "discrepancy", ctx.point_classes)
    body = figure(
        png,
        "relative energy per class and K",
        "Look for memorized and spurious states lower in energy (deeper wells) than generalized samples.",
    )
    body += "<p>Disagreement of the two integration paths (a learned score is not exactly a gradient):</p>"
    return ReportSection("energy", "Energy", body + table(cols, rows))


STAGE = Stage(
    name="energy",
    title="Energy",
    help="-log p per class along two paths.",
    config=EnergyConfig,
    config_key="analyses.energy",
    inputs=(TRAIN, "sample", "classify"),
    run=run,
    optional=True,
    result=lambda out: load_json(out / "energy.json", "energy"),
    report=energy_section,
)
