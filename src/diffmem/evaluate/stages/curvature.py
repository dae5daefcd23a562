"""Stage 'curvature': the spectrum of the Hessian of -log p_sigma, (I - sym J_D) / sigma^2, at
samples of each class and at training examples (SCIENCE.md §6; curvature.csv, curvature.json)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.core.curvature import hessian_spectrum, summarize_by_class
from diffmem.evaluate.run import RunContext, load_json
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import Section, in_range
from diffmem.io.files import write_csv_atomic, write_json_atomic
from diffmem.io.results import Job, Notes, class_table, is_number, read_json
from diffmem.viz.html import ReportContext, class_columns, figure, table
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.study_figures import strip_figure


@dataclass(frozen=True)
class CurvatureConfig(Section):
    """Spectrum of the Hessian of -log p, (I - J_D) / sigma^2 (SCIENCE.md §6)."""

    _key = "analyses.curvature"
    enabled: bool = False
    n_points: int = 32  # points per class
    k: int = 16  # top and bottom eigenvalues when D is too large for the full spectrum
    sigma: float = 0.2

    def _check(self) -> None:
        in_range(self._at("n_points"), self.n_points, low=1)
        in_range(self._at("k"), self.k, low=1)
        in_range(self._at("sigma"), self.sigma, low=0, closed=(False, True))


def run(ctx: RunContext, c: CurvatureConfig) -> list[Path]:
    x, labels, index = ctx.points(c.n_points)
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    spec = hessian_spectrum(ctx.denoiser, ctx.as_images(x), c.sigma, k=c.k, generator=g, event_shape=ctx.event_shape)
    rows = [
        {
            "class": labels[i],
            "index": index[i],
            "lambda_min": float(spec.lambda_min[i]),
            "lambda_max": float(spec.lambda_max[i]),
            "asymmetry": float(spec.asymmetry[i]),
        }
        for i in range(len(labels))
    ]
    write_csv_atomic(ctx.out / "curvature.csv", rows)
    summary = {
        "sigma": c.sigma,
        "exact": bool(spec.exact),
        "isotropic_curvature": 1 / c.sigma**2,
        "by_class": summarize_by_class(spec, labels),
    }
    write_json_atomic(ctx.out / "curvature.json", summary)
    return [ctx.out / "curvature.csv", ctx.out / "curvature.json"]


def curvature_section(ctx: ReportContext) -> ReportSection | str:
    """Extreme Hessian eigenvalues of -log p per class and K (analysis/curvature.csv), against the
    isotropic well 1/sigma^2."""
    curvature = class_table(
        ctx.jobs, "curvature.csv", ("lambda_min", "lambda_max", "asymmetry"), ctx.notes, ctx.point_classes
    )
    if curvature is None:
        return "no job has analysis/curvature.csv (set analyses.curvature.enabled: true)"
    ctx.add_table("curvature_by_class.csv", list(curvature.rows[0]), curvature.rows)
    iso = _isotropic_curvature(ctx.jobs, ctx.notes)

    def reference(ax, column):
        if iso is not None and column == "lambda_max":
            ax.axhline(iso, color="k", ls=":", lw=1, label=f"1/sigma^2 = {iso:g}")

    png = ctx.add_figure(
        "curvature.png",
        strip_figure(
            curvature,
            [("lambda_max", "largest Hessian eigenvalue of -log p"), ("lambda_min", "smallest eigenvalue")],
            ctx.point_classes,
            title="Curvature of -log p per class"
            + (f" (dotted: the isotropic well 1/sigma^2 = {iso:g})" if iso is not None else ""),
            reference=reference,
        ),
    )
    cols, rows = class_columns(curvature, "lambda_min", ctx.point_classes)
    body = figure(
        png,
        "Hessian extreme eigenvalues per class and K",
        "Look for memories with large, nearly isotropic curvature (near the dotted line), spurious states "
        "positive but smaller, and generalized samples with near-zero smallest eigenvalues (flat manifold).",
    )
    body += "<p>Smallest eigenvalue: median [q25, q75] (n points).</p>"
    return ReportSection("curvature", "Curvature", body + table(cols, rows))


def _isotropic_curvature(jobs: Sequence[Job], notes: Notes) -> float | None:
    """1/sigma^2 of the curvature stage, when every job that ran it used the same sigma."""
    values = set()
    for job in jobs:
        c = read_json(job.analysis / "curvature.json", notes)
        if c is not None and is_number(c.get("isotropic_curvature")):
            values.add(float(c["isotropic_curvature"]))
    return values.pop() if len(values) == 1 else None


STAGE = Stage(
    name="curvature",
    title="Curvature",
    help="Hessian spectra of -log p per class.",
    config=CurvatureConfig,
    config_key="analyses.curvature",
    inputs=(TRAIN, "sample", "classify"),
    run=run,
    optional=True,
    result=lambda out: load_json(out / "curvature.json", "curvature"),
    report=curvature_section,
)
