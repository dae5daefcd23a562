"""Stage 'collapse': along each sampling trajectory, the noise level from which its nearest training
example stays final and from which that example's posterior weight stays >= 1/2 (SCIENCE.md §4, §6;
collapse.csv, collapse.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.core import initial_noise, seeded_generators
from diffmem.core.collapse import collapse_times
from diffmem.evaluate.classify import CLASSES
from diffmem.evaluate.run import RunContext, by_class, load_json, summary
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import Section, in_range
from diffmem.io.files import write_csv_atomic, write_json_atomic
from diffmem.io.results import class_table
from diffmem.viz.html import ReportContext, class_columns, figure, table
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.study_figures import strip_figure


@dataclass(frozen=True)
class CollapseConfig(Section):
    """Noise level at which sampling trajectories commit to one training example (SCIENCE.md §4)."""

    _key = "analyses.collapse"
    enabled: bool = False
    n_samples: int = 256

    def _check(self) -> None:
        in_range(self._at("n_samples"), self.n_samples, low=1)


def run(ctx: RunContext, c: CollapseConfig) -> list[Path]:
    s = ctx.sampling
    n = min(c.n_samples, s.n_samples)
    sigmas = ctx.schedule.sampling_sigmas(s.steps)
    seeds = [s.seed * 1_000_003 + i for i in range(n)]  # the first n samples' own seeds
    gens = seeded_generators(seeds, "cpu")
    x = initial_noise((n, *ctx.event_shape), float(sigmas[0]), generator=gens, like=torch.zeros(0))
    kw = {"eta": s.eta} if s.sampler == "ddim" else {}
    with torch.no_grad():
        res = collapse_times(
            ctx.denoiser, x.to(ctx.device), sigmas, ctx.train_x.to(ctx.device), sampler=s.sampler, generator=gens, **kw
        )
    labels = ctx.labels()[:n]
    rows = [
        {
            "index": i,
            "class": labels[i],
            "sigma_nearest": float(res.sigma_nearest[i]),
            "sigma_posterior": float(res.sigma_posterior[i]),
            "final_nearest": int(res.final_index[i]),
        }
        for i in range(n)
    ]
    write_csv_atomic(ctx.out / "collapse.csv", rows)
    result = {
        "n": n,
        "sigma_nearest": by_class(rows, "sigma_nearest", CLASSES),
        "sigma_posterior": by_class(rows, "sigma_posterior", CLASSES),
        "all": {
            "sigma_nearest": summary([r["sigma_nearest"] for r in rows]),
            "sigma_posterior": summary([r["sigma_posterior"] for r in rows]),
        },
    }
    write_json_atomic(ctx.out / "collapse.json", result)
    return [ctx.out / "collapse.csv", ctx.out / "collapse.json"]


def collapse_section(ctx: ReportContext) -> ReportSection | str:
    """Collapse levels of the sampling trajectories per class of the end point and K (analysis/collapse.csv)."""
    collapse = class_table(ctx.jobs, "collapse.csv", ("sigma_nearest", "sigma_posterior"), ctx.notes, ctx.classes)
    if collapse is None:
        return "no job has analysis/collapse.csv (set analyses.collapse.enabled: true)"
    ctx.add_table("collapse_by_class.csv", list(collapse.rows[0]), collapse.rows)
    png = ctx.add_figure(
        "collapse.png",
        strip_figure(
            collapse,
            [
                ("sigma_nearest", "collapse level (nearest example final)"),
                ("sigma_posterior", "collapse level (top posterior weight >= 1/2)"),
            ],
            ctx.classes,
            title="Collapse levels along the sampling trajectories, per class of the end point",
        ),
    )
    cols, rows = class_columns(collapse, "sigma_nearest", ctx.classes)
    body = figure(
        png,
        "collapse levels per class and K",
        "Look for memorized trajectories committing to one training example early (large sigma) and "
        "generalized ones late or never.",
    )
    body += "<p>Nearest-example collapse level: median [q25, q75] (n trajectories).</p>"
    return ReportSection("collapse", "Collapse levels", body + table(cols, rows))


STAGE = Stage(
    name="collapse",
    title="Collapse levels",
    help="Collapse levels along sampling trajectories.",
    config=CollapseConfig,
    config_key="analyses.collapse",
    inputs=(TRAIN, "classify"),
    run=run,
    optional=True,
    result=lambda out: load_json(out / "collapse.json", "collapse"),
    report=collapse_section,
)
