"""Stage 'census': the fixed points of x <- D(x, sigma) of the trained denoiser from many starts,
labelled memory / spurious / saddle / maximum (SCIENCE.md §6; census.json)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.core.census import DenoiserLandscape, census, make_starts, split_starts
from diffmem.evaluate.run import RunContext
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.config import AT_LEAST_1, POSITIVE, Section
from diffmem.io.files import write_json_atomic
from diffmem.io.results import Job, Notes, read_json
from diffmem.viz.figures import KIND_STYLE
from diffmem.viz.html import ReportContext, figure, fmt, table
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.study_figures import census_figure

KINDS = tuple(KIND_STYLE)  # census kinds: memory, spurious, saddle, maximum


@dataclass(frozen=True)
class CensusConfig(Section):
    """Fixed points of x <- D(x, sigma) from many starts: memories, spurious minima, saddles, maxima (SCIENCE.md §6)."""

    _key = "analyses.census"
    enabled: bool = False
    sigma: float = 0.2
    n_starts: int = 200

    _bounds = {"sigma": POSITIVE, "n_starts": AT_LEAST_1}


def run(ctx: RunContext, c: CensusConfig) -> list[Path]:
    pats = ctx.train_x.to(ctx.device)
    g = torch.Generator().manual_seed(ctx.seed)
    land = DenoiserLandscape(
        ctx.denoiser,
        c.sigma,
        pats.shape[1],
        event_shape=ctx.event_shape,
        generator=torch.Generator().manual_seed(ctx.seed),
    )
    starts, labels = make_starts(pats.cpu(), c.sigma, split_starts(c.n_starts), generator=g)
    result = census(
        land, pats, starts.to(ctx.device), start_labels=labels, tol=1e-5, max_iter=2000, saddle_search="none"
    )
    write_json_atomic(ctx.out / "census.json", result.to_dict())
    return [ctx.out / "census.json"]


def census_section(ctx: ReportContext) -> ReportSection | str:
    """Counts and basin shares of memories, spurious minima, saddles and maxima per job (analysis/census.json)."""
    census = _census_rows(ctx.jobs, ctx.notes)
    if not census:
        return "no job has analysis/census.json (set analyses.census.enabled: true)"
    ctx.add_table("census_by_job.csv", list(census[0]), census)
    png = ctx.add_figure("census.png", census_figure(census, ctx.transitions))
    body = figure(
        png,
        "fixed-point census against K",
        "Look for spurious minima appearing between the memorization and generalization transitions, "
        "while the number of memories stops growing with K.",
    )
    body += table(
        ["job", "K", "sigma", *(f"n_{k}" for k in KINDS), *(f"share_{k}" for k in KINDS)],
        [
            [r["job"], r["K"], fmt(r["sigma"]), *(fmt(r[f"n_{k}"]) for k in KINDS)]
            + [fmt(r[f"share_{k}"]) for k in KINDS]
            for r in census
        ],
        text_columns=1,
    )
    return ReportSection("census", "Fixed-point census", body)


def _census_rows(jobs: Sequence[Job], notes: Notes) -> list[dict]:
    """One row per job with a usable census.json: job, K, seed, sigma, n_<kind>, share_<kind>, n_starts."""
    rows = []
    for job in jobs:
        c = read_json(job.analysis / "census.json", notes)
        if c is None:
            continue
        counts, shares = c.get("counts"), c.get("shares")
        if not isinstance(counts, dict):
            notes.add(f"{job.analysis / 'census.json'} skipped: it has no 'counts' object")
            continue
        shares = shares if isinstance(shares, dict) else {}
        row = {"job": job.name, "K": job.k, "seed": job.seed, "sigma": c.get("sigma")}
        row.update({f"n_{kind}": counts.get(kind) for kind in KINDS})
        row.update({f"share_{kind}": shares.get(kind) for kind in KINDS})
        row["n_starts"] = c.get("n_starts")
        rows.append(row)
    return rows


STAGE = Stage(
    "census",
    "Fixed-point census",
    CensusConfig,
    run,
    (TRAIN,),
    optional=True,
    result_key="counts",
    report=census_section,
)
