"""Stage 'curvature': the spectrum of the Hessian of -log p_sigma, (I - sym J_D) / sigma^2, at
samples of each class and at training examples (SCIENCE.md §6; curvature.csv, curvature.json)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.core.curvature import hessian_spectrum, summarize_by_class
from diffmem.evaluate.run import RunContext, point_rows
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import AT_LEAST_1, POSITIVE, Section
from diffmem.io.results import Job, Notes, is_number, read_json
from diffmem.viz.html import ReportContext
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.sections import ClassStrips, strip_section


@dataclass(frozen=True)
class CurvatureConfig(Section):
    """Spectrum of the Hessian of -log p, (I - J_D) / sigma^2 (SCIENCE.md §6)."""

    _key = "analyses.curvature"
    enabled: bool = False
    n_points: int = 32  # points per class
    k: int = 16  # top and bottom eigenvalues when D is too large for the full spectrum
    sigma: float = 0.2

    _bounds = {"n_points": AT_LEAST_1, "k": AT_LEAST_1, "sigma": POSITIVE}


def run(ctx: RunContext, c: CurvatureConfig) -> list[Path]:
    x, labels, index = ctx.points(c.n_points)
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    spec = hessian_spectrum(ctx.denoiser, ctx.as_images(x), c.sigma, k=c.k, generator=g, event_shape=ctx.event_shape)
    rows = point_rows(labels, index, lambda_min=spec.lambda_min, lambda_max=spec.lambda_max, asymmetry=spec.asymmetry)
    summary = {
        "sigma": c.sigma,
        "exact": bool(spec.exact),
        "isotropic_curvature": 1 / c.sigma**2,
        "by_class": summarize_by_class(spec, labels),
    }
    return ctx.write_results("curvature", rows, summary)


REPORT = ClassStrips(
    key="curvature",
    title="Curvature",
    columns=("lambda_min", "lambda_max", "asymmetry"),
    panels=(("lambda_max", "largest Hessian eigenvalue of -log p"), ("lambda_min", "smallest eigenvalue")),
    figure_title="Curvature of -log p per class",
    alt="Hessian extreme eigenvalues per class and K",
    caption="Look for memories with large, nearly isotropic curvature (near the dotted line), spurious states "
    "positive but smaller, and generalized samples with near-zero smallest eigenvalues (flat manifold).",
    table_column="lambda_min",
    table_note="Smallest eigenvalue: median [q25, q75] (n points).",
)


def report_section(ctx: ReportContext) -> ReportSection | str:
    """The strips, with the isotropic well 1/sigma^2 dotted when every job used the same sigma."""
    iso = _isotropic_curvature(ctx.jobs, ctx.notes)
    if iso is None:
        return strip_section(ctx, REPORT)

    def reference(ax, column):
        if column == "lambda_max":
            ax.axhline(iso, color="k", ls=":", lw=1, label=f"1/sigma^2 = {iso:g}")

    title = f"{REPORT.figure_title} (dotted: the isotropic well 1/sigma^2 = {iso:g})"
    return strip_section(ctx, REPORT, reference=reference, figure_title=title)


def _isotropic_curvature(jobs: Sequence[Job], notes: Notes) -> float | None:
    """1/sigma^2 of the curvature stage, when every job that ran it used the same sigma."""
    values = set()
    for job in jobs:
        c = read_json(job.analysis / "curvature.json", notes)
        if c is not None and is_number(c.get("isotropic_curvature")):
            values.add(float(c["isotropic_curvature"]))
    return values.pop() if len(values) == 1 else None


STAGE = Stage(
    "curvature", "Curvature", CurvatureConfig, run, (TRAIN, "sample", "classify"), optional=True, report=report_section
)
