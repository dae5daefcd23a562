"""Stage 'energy': -log p_sigma(x) relative to the training mean, by Gauss-Legendre quadrature of the
learned score along a straight path and a quarter arc, with each path's quadrature error and the two
paths' discrepancy (SCIENCE.md §6; energy.csv, energy.json).

With absolute: 'ode' it also gives -log p_sigma(x) itself by the probability-flow ODE
(core.likelihood.log_likelihood; exact divergence for D <= 64, Hutchinson's estimator above), with its
error: columns nll_ode, nll_ode_error, and energy_ode = nll_ode - nll_ode(training mean) with its error
energy_ode_error, directly comparable with energy_straight. The two agree only where the model's noise levels
belong to one diffused density (core.consistency): energy_gap = energy_ode - energy_straight with its error, and
consistency, the heat equation's residual sigma d/dsigma [E(x) - E(mean)] (line) - (heat), with its error, say
whether and why they do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.core.consistency import level_consistency
from diffmem.core.energy import DEFAULT_MAX_NODES, DEFAULT_TOLERANCE, MIN_ADAPTIVE_NODES, relative_energy
from diffmem.core.likelihood import DEFAULT_RTOL, PRIOR_CHECK, log_likelihood
from diffmem.evaluate.run import RunContext, by_class, point_rows
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import AT_LEAST_1, POSITIVE, Bound, Section, choice, error
from diffmem.io.results import Notes, class_table
from diffmem.viz.html import ReportContext, class_columns, table
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.sections import ClassStrips, strip_section

ABSOLUTE = ("none", "ode")
EXACT_DIVERGENCE_MAX_DIM = 64  # above it the ODE's divergence is Hutchinson's estimate (n copies per call below)


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
    absolute: str = "none"  # 'ode': also -log p_sigma(x) by the probability-flow ODE, with its error
    ode_sigma_max: float | None = None  # the ODE's prior level N(0, sigma_max^2 I) (null: the schedule's largest)
    ode_tolerance: float = DEFAULT_RTOL  # the ODE solver's rtol and atol (its error: against tolerance / 10)
    n_probes: int = 8  # Hutchinson probes of the divergence when D > 64

    _bounds = {
        "n_points": AT_LEAST_1,
        "sigma": POSITIVE,
        "tolerance": POSITIVE,
        "max_nodes": Bound(MIN_ADAPTIVE_NODES),
        "n_nodes": Bound(2),
        "ode_sigma_max": POSITIVE,
        "ode_tolerance": POSITIVE,
        "n_probes": Bound(2),
    }

    def _check(self) -> None:
        choice(self._at("absolute"), self.absolute, ABSOLUTE)
        if self.ode_sigma_max is not None and self.ode_sigma_max < PRIOR_CHECK**2 * self.sigma:
            raise error(
                self._at("ode_sigma_max"),
                f"must be >= {PRIOR_CHECK**2:g} * sigma = {PRIOR_CHECK**2 * self.sigma:g} (the prior's error is "
                f"estimated from sigma_max / 4 and / 2), got {self.ode_sigma_max}",
            )


def absolute_nll(ctx: RunContext, c: EnergyConfig, x: torch.Tensor, anchor: torch.Tensor):
    """-log p_sigma of the anchor (row 0) and the points x (n, D) by the probability-flow ODE."""
    sigma_max = c.ode_sigma_max if c.ode_sigma_max is not None else float(ctx.schedule.sigmas.max())
    if sigma_max < PRIOR_CHECK**2 * c.sigma:
        raise ValueError(
            f"analyses.energy: the schedule's largest sigma {sigma_max:g} is below {PRIOR_CHECK**2:g} * sigma = "
            f"{PRIOR_CHECK**2 * c.sigma:g}; lower analyses.energy.sigma or set analyses.energy.ode_sigma_max"
        )
    return log_likelihood(
        ctx.denoiser,
        ctx.as_images(torch.cat([anchor, x])),
        c.sigma,
        sigma_max=sigma_max,
        divergence=divergence_for(x),
        n_probes=c.n_probes,
        generator=torch.Generator().manual_seed(ctx.seed),
        rtol=c.ode_tolerance,
        atol=c.ode_tolerance,
    )


def divergence_for(x: torch.Tensor) -> str:
    """'exact' for points (n, D) with D <= EXACT_DIVERGENCE_MAX_DIM, else 'hutchinson'."""
    return "exact" if x.shape[1] <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"


def ode_columns(ctx: RunContext, c: EnergyConfig, x: torch.Tensor, anchor: torch.Tensor, r) -> tuple[dict, dict]:
    """The ODE's columns and summary beside the line integral r: -log p, its energy, the gap to energy_straight,
    and the heat equation's residual that explains a gap (core.consistency)."""
    lik = absolute_nll(ctx, c, x, anchor[:1])
    energy_ode, energy_ode_error = (v[1:] for v in lik.difference(0))
    gap, gap_error = energy_ode - r.straight.double(), energy_ode_error + r.straight_error.double()
    lc = level_consistency(
        ctx.denoiser,
        c.sigma,
        ctx.as_images(anchor),
        ctx.as_images(x),
        tolerance=c.tolerance,
        max_nodes=c.max_nodes,
        divergence=divergence_for(x),
        n_probes=c.n_probes,
        generator=torch.Generator().manual_seed(ctx.seed + 1),
    )
    columns = {
        "nll_ode": lik.nll[1:],
        "nll_ode_error": lik.error[1:],
        "energy_ode": energy_ode,
        "energy_ode_error": energy_ode_error,
        "energy_gap": gap,
        "energy_gap_error": gap_error,
        "consistency": lc.residual,
        "consistency_error": lc.error,
        "consistency_scale": torch.maximum(lc.line.abs(), lc.heat.abs()),
    }
    summary = {
        "method": "probability-flow ODE (dopri5), prior N(0, sigma_max^2 I)",
        "divergence": lik.divergence_method,
        "n_probes": lik.n_probes,
        "sigma_max": lik.sigma_max,
        "tolerance": c.ode_tolerance,
        "note": "nll_ode = -log p_sigma(x) in nats; errors add the Hutchinson standard error, the ODE's and the "
        "prior's estimated errors; energy_ode = nll_ode - nll_ode(training mean), its error with the prior's "
        "term estimated on the difference (core.likelihood.LikelihoodResult.difference)",
        "reference_nll": lik.nll[0].item(),
        "reference_nll_error": lik.error[0].item(),
        "ode_evaluations": int(lik.n_calls.sum()),  # each: D and its divergence at one point
        "n_converged": int(lik.converged[1:].sum()),
        "n_agree": int((gap.abs() <= gap_error).sum()),  # energy_ode = energy_straight within both errors
        "consistency_note": "the heat equation's residual on E(x) - E(training mean) in nats per unit log sigma, "
        "sigma d/dsigma by the line integral minus the heat equation's value; zero for a model whose noise levels "
        "belong to one diffused density, which the ODE and the line integral need to agree (core.consistency)",
        "n_consistent": int((lc.residual.abs() <= lc.error).sum()),
        "consistency_eps": lc.eps,
    }
    return columns, summary


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
    columns, absolute = ode_columns(ctx, c, x, anchor, r) if c.absolute == "ode" else ({}, {})
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
        **columns,
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
    if c.absolute == "ode":
        summary["absolute"] = absolute
        for key in ("nll_ode", "nll_ode_error", "energy_gap", "consistency"):
            summary[key] = by_class(rows, key)
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
