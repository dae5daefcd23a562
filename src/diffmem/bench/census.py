"""Benchmark of the census of the exact memory of the digits (memories, spurious states, saddles)."""

from __future__ import annotations

import torch

from diffmem.bench.harness import BenchContext, BenchEntry, Goal
from diffmem.core import DenseAM
from diffmem.core.census import make_starts, split_starts
from diffmem.experiments.attractors import exact_census
from diffmem.io.data import load_digits

CENSUS_PROBLEM = {"full": (10_000, 1.0), "quick": (150, 1.0)}  # (starts, sigma) on all 1,797 digits


def bench_census_digits(ctx: BenchContext) -> list[BenchEntry]:
    """Census of the exact memory of the digits with exact stability (float64), against one
    retrieval step over all starts, timed interleaved with it (HEAVY_ROUNDS rounds of one census)."""
    n, sigma = CENSUS_PROBLEM[ctx.size]
    pats = load_digits(dtype=torch.float64, device=ctx.device).x
    g = torch.Generator(device=ctx.device).manual_seed(0)
    starts, _ = make_starts(pats, sigma, split_starts(n), generator=g)
    am = DenseAM(pats)
    results = []
    t = ctx.interleave(
        {
            "step": ctx.clock(lambda: am.retrieve(starts, sigma**-2), best_of=ctx.repeats),
            "census": ctx.clock(lambda: results.append(exact_census(pats, sigma, n, seed=0))),
        },
        rounds=ctx.heavy_rounds,
        repeats=1,
        warmup=False,
    )
    result = results[-1]  # seeded: every round finds the same census
    c = result.counts
    return [
        BenchEntry.timed(
            "census_digits_seconds",
            "s",
            t["census"],
            t["step"],
            "one retrieval step over all starts",
            Goal("<", 30, on="value", unit="s", full_only=True),
            ctx.size,
            f"{result.n_starts} starts, K={pats.shape[0]}, sigma={sigma}: {c['memory']} memories, "
            f"{c['spurious']} spurious, {c['saddle']} saddles; {result.settings['saddle_search']}",
        )
    ]
