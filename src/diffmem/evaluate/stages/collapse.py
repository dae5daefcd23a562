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
from diffmem.evaluate.run import RunContext, by_class, summary
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import AT_LEAST_1, Section
from diffmem.viz.html import ReportContext
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.sections import ClassStrips, strip_section


@dataclass(frozen=True)
class CollapseConfig(Section):
    """Noise level at which sampling trajectories commit to one training example (SCIENCE.md §4)."""

    _key = "analyses.collapse"
    enabled: bool = False
    n_samples: int = 256

    _bounds = {"n_samples": AT_LEAST_1}


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
    result = {
        "n": n,
        "sigma_nearest": by_class(rows, "sigma_nearest", CLASSES),
        "sigma_posterior": by_class(rows, "sigma_posterior", CLASSES),
        "all": {
            "sigma_nearest": summary([r["sigma_nearest"] for r in rows]),
            "sigma_posterior": summary([r["sigma_posterior"] for r in rows]),
        },
    }
    return ctx.write_results("collapse", rows, result)


REPORT = ClassStrips(
    key="collapse",
    title="Collapse levels",
    columns=("sigma_nearest", "sigma_posterior"),
    panels=(
        ("sigma_nearest", "collapse level (nearest example final)"),
        ("sigma_posterior", "collapse level (top posterior weight >= 1/2)"),
    ),
    figure_title="Collapse levels along the sampling trajectories, per class of the end point",
    alt="collapse levels per class and K",
    caption="Look for memorized trajectories committing to one training example early (large sigma) and "
    "generalized ones late or never.",
    table_column="sigma_nearest",
    table_note="Nearest-example collapse level: median [q25, q75] (n trajectories).",
    with_training=False,
)


def report_section(ctx: ReportContext) -> ReportSection | str:
    return strip_section(ctx, REPORT)


STAGE = Stage(
    "collapse", "Collapse levels", CollapseConfig, run, (TRAIN, "classify"), optional=True, report=report_section
)
