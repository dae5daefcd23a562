"""Stage 'basins': the critical noise level of each point, per class and for training examples
(SCIENCE.md §6): noise the point, denoise it back, and find the largest sigma from which it is still
recovered within delta with probability p (basins.csv, basins.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffmem.core.basins import BasinEstimator, KarrasGrid
from diffmem.evaluate.run import WITH_TRAINING, RunContext, by_class, load_json
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import Section, in_range
from diffmem.io.files import write_csv_atomic, write_json_atomic
from diffmem.io.results import class_table
from diffmem.viz.html import ReportContext, class_columns, figure, table
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.study_figures import strip_figure


@dataclass(frozen=True)
class BasinsConfig(Section):
    """Critical noise level of each point: noise it, denoise back, recovered within delta (SCIENCE.md §6)."""

    _key = "analyses.basins"
    enabled: bool = False
    n_points: int = 32  # points per class
    n_trials: int = 10  # noise draws per point and level
    p: float = 0.9  # recovery probability that defines the basin
    delta: float = 0.1  # recovered iff distance(result, x) <= delta, in the metric's units
    steps: int = 20  # DDIM steps of one recovery
    sigma_min: float = 0.01  # search range of the critical level
    sigma_max: float = 80.0
    rtol: float = 0.02  # relative resolution of the critical level

    def _check(self) -> None:
        for name in ("n_points", "n_trials", "steps"):
            in_range(self._at(name), getattr(self, name), low=1)
        in_range(self._at("p"), self.p, low=0, high=1, closed=(False, False))
        in_range(self._at("delta"), self.delta, low=0, closed=(False, True))
        in_range(self._at("sigma_min"), self.sigma_min, low=0, closed=(False, True))
        in_range(self._at("sigma_max"), self.sigma_max, low=self.sigma_min, closed=(False, True))
        in_range(self._at("rtol"), self.rtol, low=0, closed=(False, True))


def run(ctx: RunContext, c: BasinsConfig) -> list[Path]:
    x, labels, index = ctx.points(c.n_points)
    metric = ctx.metric

    def distance(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ey, et = metric.embed(y.reshape(y.shape[0], -1)), metric.embed(target.reshape(target.shape[0], -1))
        return metric.value((ey.double() - et.double()).norm(dim=1), ey.shape[1]).to(y.dtype)

    floor = float(ctx.schedule.sigmas.min())  # below it the network was never trained
    est = BasinEstimator(
        ctx.denoiser,
        sigma_grid=KarrasGrid(sigma_floor=floor),
        n_trials=c.n_trials,
        p=c.p,
        delta=c.delta,
        steps=c.steps,
        sigma_min=c.sigma_min,
        sigma_max=c.sigma_max,
        rtol=c.rtol,
        distance=None if metric.name == "l2" else distance,
    )
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    with torch.no_grad():
        res = est.critical_times(ctx.as_images(x), generator=g)
    rows = [{"class": labels[i], "index": index[i], **_flat(r)} for i, r in enumerate(res)]
    write_csv_atomic(ctx.out / "basins.csv", rows)
    no_basin = {cls: sum(r["status"] == "no_basin" for r in rows if r["class"] == cls) for cls in WITH_TRAINING}
    options = {
        "n_trials": c.n_trials,
        "p": c.p,
        "delta": c.delta,
        "steps": c.steps,
        "sigma_range": [c.sigma_min, c.sigma_max],
        "rtol": c.rtol,
    }
    summary = {
        "sigma_c": by_class(rows, "sigma_c"),
        "radius_normalized": by_class(rows, "radius_normalized"),
        "no_basin": no_basin,
        "denoiser_calls": sum(int(r["n_calls"]) for r in rows),
        "options": options,
    }
    write_json_atomic(ctx.out / "basins.json", summary)
    return [ctx.out / "basins.csv", ctx.out / "basins.json"]


def _flat(result) -> dict:
    """A basin result as a flat CSV row (the recovery curve, if any, left out)."""
    d = asdict(result) if hasattr(result, "__dataclass_fields__") else dict(result)
    skip = {"curve_sigmas", "curve_p_hat"}
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in d.items() if k not in skip}


def basins_section(ctx: ReportContext) -> ReportSection | str:
    """Critical noise levels sigma_c and basin radii per class and K (analysis/basins.csv)."""
    basins = class_table(
        ctx.jobs,
        "basins.csv",
        ("sigma_c", "radius"),
        ctx.notes,
        ctx.point_classes,
        count=("status", ("no_basin", "censored")),
    )
    if basins is None:
        return "no job has analysis/basins.csv (set analyses.basins.enabled: true in the study config)"
    ctx.add_table("basins_by_class.csv", list(basins.rows[0]), basins.rows)
    png = ctx.add_figure(
        "basins.png",
        strip_figure(
            basins,
            [("sigma_c", "critical noise level sigma_c"), ("radius", "basin radius ||x_sigma - x|| at sigma_c")],
            ctx.point_classes,
            title="Critical times per class: the largest sigma from which a point is still recovered",
        ),
    )
    cols, rows = class_columns(basins, "sigma_c", ctx.point_classes)
    body = figure(
        png,
        "critical noise levels per class and K",
        "Look for memorized and spurious samples (like training examples) keeping a basin up to a "
        "clearly non-zero sigma_c, and generalized samples near zero (no basin of their own).",
    )
    body += "<p>sigma_c: median [q25, q75] (n points); points with no basin count as sigma_c = 0.</p>"
    return ReportSection("basins", "Critical times", body + table(cols, rows))


STAGE = Stage(
    name="basins",
    title="Critical times",
    help="Critical noise levels per class.",
    config=BasinsConfig,
    config_key="analyses.basins",
    inputs=(TRAIN, "sample", "classify"),
    run=run,
    optional=True,
    result=lambda out: load_json(out / "basins.json", "basins"),
    report=basins_section,
)
