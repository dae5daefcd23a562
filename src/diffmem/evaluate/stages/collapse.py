"""Stage 'collapse': along each sampling trajectory, the noise level from which its nearest training
example stays final and from which that example's posterior weight stays >= 1/2 (SCIENCE.md §4, §6;
collapse.csv, collapse.json), read against the speciation level of the training data (Biroli et al. 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffmem.core import initial_noise, seeded_generators
from diffmem.core.collapse import collapse_times
from diffmem.core.theory import covariance_top_eigenvalue, speciation_level
from diffmem.evaluate.classify import CLASSES
from diffmem.evaluate.run import RunContext, by_class, summary
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import AT_LEAST_1, Section
from diffmem.io.results import Job, Notes, is_number, read_csv, read_json
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
    # the level where the backward dynamics splits the training data into classes (theory.speciation_level)
    top = covariance_top_eigenvalue(ctx.train_x.reshape(ctx.train_x.shape[0], -1))
    result = {
        "n": n,
        "covariance_top_eigenvalue": top,
        "speciation_sigma": speciation_level(top),  # null: Lambda <= 1, no speciation level
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
    """The strips, with the speciation level sigma_S of each K's training data dashed: one line when
    every job has the same level, else a segment over each K whose jobs agree on it."""
    levels = _speciation_levels(ctx.jobs, ctx.notes)
    if not levels:
        return strip_section(ctx, REPORT)
    ks = _figure_ks(ctx.jobs)
    values = set(levels.values())
    # one line across the figure only where it holds at every K shown
    only = values.pop() if len(values) == 1 and set(ks) <= set(levels) else None

    def reference(ax, column):
        label = "speciation level sigma_S"
        if only is not None:
            ax.axhline(only, color="k", ls="--", lw=1, label=label)
            return
        for i, k in enumerate(ks):  # the strips stand at x = 0, 1, ... in K order
            if k in levels:
                ax.hlines(levels[k], i - 0.45, i + 0.45, color="k", ls="--", lw=1, label=label)
                label = None  # one legend entry

    if only is not None:
        what = f"sigma_S = {only:.3g}"
    else:
        what = "sigma_S per K: " + ", ".join(f"K={k}: {v:.3g}" for k, v in sorted(levels.items()))
        missing = [k for k in ks if k not in levels]
        if missing:
            what += f"; none at K = {', '.join(map(str, missing))} (Lambda <= 1, or not recorded)"
    spec = replace(
        REPORT,
        figure_title=f"{REPORT.figure_title} (dashed: the speciation level)",
        caption=f"{REPORT.caption} Dashed: the speciation level of the training data, sigma_S = sqrt(Lambda - 1) "
        f"with Lambda the top eigenvalue of its covariance (Biroli, Bonnaire, de Bortoli & Mezard 2024), where "
        f"the backward dynamics starts to split into classes; {what}. It is a large-dimension asymptotic, a guide "
        "rather than a sharp threshold.",
    )
    return strip_section(ctx, spec, reference=reference)


def _speciation_levels(jobs: Sequence[Job], notes: Notes) -> dict[int, float]:
    """{K: sigma_S} from the jobs' collapse.json, for each K whose jobs that recorded one agree on it
    (the nested training set of a K does not depend on the training seed)."""
    found: dict[int, set[float]] = {}
    for job in jobs:
        c = read_json(job.analysis / "collapse.json", notes)
        if c is not None and is_number(c.get("speciation_sigma")):
            found.setdefault(job.k, set()).add(float(c["speciation_sigma"]))
    return {k: v.pop() for k, v in found.items() if len(v) == 1}


def _figure_ks(jobs: Sequence[Job]) -> list[int]:
    """The Ks along the strip figure's axis, in order: those of the jobs with collapse.csv rows, as
    class_table pools them (its problems are noted once, by strip_section)."""
    return sorted(
        {job.k for job in jobs if read_csv(job.analysis / "collapse.csv", ("class", *REPORT.columns), Notes())}
    )


STAGE = Stage(
    "collapse", "Collapse levels", CollapseConfig, run, (TRAIN, "classify"), optional=True, report=report_section
)
