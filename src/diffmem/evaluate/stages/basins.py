"""Stage 'basins': the critical noise level of each point, per class and for training examples
(SCIENCE.md §6): noise the point, denoise it back, and estimate the sigma at which its recovery
probability (within delta) crosses p, with a confidence interval (basins.csv, basins.json).

basins.csv has one row per point: sigma_c and its interval (sigma_c_low, sigma_c_high at confidence
interval_level), the fit ('probit', 'separated' or 'none'), its slope, the search's bracket and status,
the denoiser calls, the radius. basins.json summarizes each class: quartiles of sigma_c, of the interval
ends and of the interval's width (high / low), and the counts of statuses and fits."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffmem.core.basins import LINKS, BasinEstimator, KarrasGrid
from diffmem.evaluate.run import WITH_TRAINING, RunContext, by_class
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import AT_LEAST_1, NON_NEGATIVE, OPEN_UNIT, POSITIVE, Section, choice, error
from diffmem.viz.html import ReportContext
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.sections import ClassStrips, strip_section


@dataclass(frozen=True)
class BasinsConfig(Section):
    """Critical noise level of each point: noise it, denoise back, recovered within delta (SCIENCE.md §6)."""

    _key = "analyses.basins"
    enabled: bool = False
    n_points: int = 32  # points per class
    n_trials: int = 10  # search trials per point (the same noise at every search level)
    design_rounds: int = 2  # rounds of fresh trials around the fitted level after the search (0: none)
    design_trials: int = 32  # fresh trials per level of a round (5 levels a round)
    interval: float = 0.9  # confidence level of the interval for the critical level
    link: str = "inverse"  # the fitted recovery curve: 'inverse' Phi(b0 + c / sigma), 'log' Phi(b0 + b1 log sigma)
    p: float = 0.9  # recovery probability that defines the basin
    delta: float = 0.1  # recovered iff distance(result, x) <= delta, in the metric's units
    steps: int = 20  # DDIM steps of one recovery
    sigma_min: float = 0.01  # search range of the critical level
    sigma_max: float = 80.0
    rtol: float = 0.02  # relative resolution of the critical level

    _bounds = {
        **dict.fromkeys(("n_points", "n_trials", "steps", "design_trials"), AT_LEAST_1),
        **dict.fromkeys(("delta", "sigma_min", "rtol"), POSITIVE),
        **dict.fromkeys(("p", "interval"), OPEN_UNIT),
        "design_rounds": NON_NEGATIVE,
    }

    def _check(self) -> None:
        choice(self._at("link"), self.link, LINKS)
        if not self.sigma_min < self.sigma_max:  # the search range of the critical level
            raise error(
                self._at("sigma_min"), f"must be below {self._at('sigma_max')} = {self.sigma_max}, got {self.sigma_min}"
            )


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
        design_rounds=c.design_rounds,
        design_trials=c.design_trials,
        interval=c.interval,
        link=c.link,
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
    for r in rows:  # the interval's width as a ratio; inf where one side is open (or sigma_c_low is 0)
        r["interval_ratio"] = r["sigma_c_high"] / r["sigma_c_low"] if r["sigma_c_low"] > 0 else math.inf

    def counts(key: str, values: tuple[str, ...]) -> dict:
        return {cls: {v: sum(r[key] == v for r in rows if r["class"] == cls) for v in values} for cls in WITH_TRAINING}

    no_basin = {cls: sum(r["status"] == "no_basin" for r in rows if r["class"] == cls) for cls in WITH_TRAINING}
    options = {
        "n_trials": c.n_trials,
        "design_rounds": c.design_rounds,
        "design_levels": est.design_levels,
        "design_trials": c.design_trials,
        "design_width": est.design_width,
        "interval": c.interval,
        "link": c.link,
        "p": c.p,
        "delta": c.delta,
        "steps": c.steps,
        "sigma_range": [c.sigma_min, c.sigma_max],
        "rtol": c.rtol,
    }
    summary = {
        "sigma_c": by_class(rows, "sigma_c"),
        # quartiles over points of each end of the interval, and of its width high / low (finite ones only)
        "sigma_c_low": by_class(rows, "sigma_c_low"),
        "sigma_c_high": by_class(rows, "sigma_c_high"),
        "interval_ratio": by_class(rows, "interval_ratio"),
        "interval_level": c.interval,
        "radius_normalized": by_class(rows, "radius_normalized"),
        "no_basin": no_basin,
        "status": counts("status", ("bracketed", "no_basin", "censored")),
        "fit": counts("fit", ("probit", "separated", "none")),
        "denoiser_calls": sum(int(r["n_calls"]) for r in rows),
        "options": options,
    }
    return ctx.write_results("basins", rows, summary)


def _flat(result) -> dict:
    """A basin result as a flat CSV row (the recovery curve, if any, left out)."""
    d = asdict(result) if hasattr(result, "__dataclass_fields__") else dict(result)
    skip = {"curve_sigmas", "curve_p_hat"}
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in d.items() if k not in skip}


REPORT = ClassStrips(
    key="basins",
    title="Critical times",
    columns=("sigma_c", "radius"),
    panels=(("sigma_c", "critical noise level sigma_c"), ("radius", "basin radius ||x_sigma - x|| at sigma_c")),
    figure_title="Critical times per class: the largest sigma from which a point is still recovered",
    alt="critical noise levels per class and K",
    caption="Look for memorized and spurious samples (like training examples) keeping a basin up to a clearly "
    "non-zero sigma_c, and generalized samples near zero (no basin of their own).",
    table_column="sigma_c",
    table_note="sigma_c: median [q25, q75] (n points); points with no basin count as sigma_c = 0. Each point's "
    "confidence interval for its critical level (sigma_c_low, sigma_c_high) and the fit are in basins.csv.",
    count=("status", ("no_basin", "censored")),
)


def report_section(ctx: ReportContext) -> ReportSection | str:
    return strip_section(ctx, REPORT)


STAGE = Stage(
    "basins", "Critical times", BasinsConfig, run, (TRAIN, "sample", "classify"), optional=True, report=report_section
)
