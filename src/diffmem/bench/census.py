"""Benchmark of the census of the exact memory of the digits (memories, spurious states, saddles)."""

from __future__ import annotations

import torch

from diffmem.bench.harness import BenchContext, BenchEntry
from diffmem.core import DenseAM
from diffmem.core.census import make_starts, split_starts
from diffmem.experiments.attractors import exact_census
from diffmem.io.data import load_digits

CENSUS_PROBLEM = {"full": (10_000, 1.0), "quick": (400, 1.0)}  # (starts, sigma) on all 1,797 digits


def bench_census_digits(ctx: BenchContext) -> list[BenchEntry]:
    """Census of the exact memory of the digits with exact stability (float64), against the time of
    one retrieval step over all starts measured in the same run."""
    n, sigma = CENSUS_PROBLEM[ctx.size]
    pats = load_digits(dtype=torch.float64, device=ctx.device).x
    g = torch.Generator(device=ctx.device).manual_seed(0)
    starts, _ = make_starts(pats, sigma, split_starts(n), generator=g)
    am = DenseAM(pats)
    step = ctx.best_time(lambda: am.retrieve(starts, sigma**-2))
    result, seconds = ctx.timed(lambda: exact_census(pats, sigma, n, seed=0))
    c = result.counts
    return [
        BenchEntry(
            "census_digits_seconds",
            seconds,
            "s",
            step,
            "one retrieval step over all starts",
            seconds / step,
            "< 30 s (full size)",
            seconds < 30 if ctx.size == "full" else None,
            f"{result.n_starts} starts, K={pats.shape[0]}, sigma={sigma}: {c['memory']} memories, "
            f"{c['spurious']} spurious, {c['saddle']} saddles; {result.settings['saddle_search']}",
        )
    ]
