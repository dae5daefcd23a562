"""Benchmark of the critical-level estimate (SCIENCE.md §6): its search (bisection) against a linear
scan, and what the design rounds of the probit fit add to it.

All run on the exact memory of the digits with the same search noise (the same generator seed). The
scan evaluates every level of the bisection's own search grid, whose neighbours are 1 + rtol apart
across [sigma_min, sigma_max], so both locate the transition to the same relative resolution; the
full estimate (search, edge check, design rounds and fit) is then timed and counted beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem.bench.harness import BenchContext, BenchEntry, Goal
from diffmem.core import EmpiricalDenoiser
from diffmem.core.basins import BasinEstimator
from diffmem.io.data import load_dataset


@dataclass(frozen=True)
class _BasinProblem:
    k: int  # digits in the memory
    points: int  # training digits whose critical time is measured
    sigma_min: float
    sigma_max: float
    rtol: float


BASIN_PROBLEM = {
    "full": _BasinProblem(1_797, 12, 0.05, 5.0, 0.02),
    "quick": _BasinProblem(300, 3, 0.05, 5.0, 0.05),
}
BATCH_ROWS = 4_096  # rows per denoiser call, the same for both searches


def bench_basins(ctx: BenchContext) -> list[BenchEntry]:
    """Denoiser calls and wall time of the bisection against the scan, and their agreement on sigma_c."""
    prob = BASIN_PROBLEM[ctx.size]
    train = load_dataset("digits", device=ctx.device).x[: prob.k]
    points = train[: prob.points]
    kw = dict(sigma_min=prob.sigma_min, sigma_max=prob.sigma_max, rtol=prob.rtol, batch_size=BATCH_ROWS)
    est = BasinEstimator(EmpiricalDenoiser(train), design_rounds=0, **kw)  # the search alone
    full = BasinEstimator(EmpiricalDenoiser(train), **kw)  # the default estimate: search, design, fit
    levels = est.search_levels()

    def seeded() -> torch.Generator:  # the same trial noise for both searches
        return torch.Generator(device=ctx.device).manual_seed(0)

    curves = []  # seeded: every round's scan finds the same curve, and every bisection the same levels
    t = ctx.interleave(
        {
            "scan": ctx.clock(lambda: curves.append(est.recovery_curve(points, levels, generator=seeded()))),
            "bisection": ctx.clock(lambda: est.fit(points, generator=seeded())),
        },
        rounds=ctx.heavy_rounds,
        repeats=1,
        warmup=False,
    )
    curve = curves[-1]
    _, t_full = ctx.timed(lambda: full.fit(points, generator=seeded()))
    calls_bisect = est.n_calls_ / prob.points
    calls_scan = float(curve.n_calls.sum()) / prob.points
    calls_full = full.n_calls_ / prob.points
    setting = (
        f"K={prob.k} digits, {prob.points} points, {est.n_trials} trials, {est.steps} DDIM steps, "
        f"sigma in [{prob.sigma_min}, {prob.sigma_max}], {levels.numel()} levels (rtol={prob.rtol})"
    )
    statuses = ", ".join(
        f"{sum(r.status == s for r in est.results_)} {s}" for s in ("bracketed", "no_basin", "censored")
    )
    return [
        BenchEntry.measured(
            "basin_bisection_calls",
            calls_bisect,
            "denoiser rows per point",
            calls_scan,
            "linear scan over the same log grid",
            Goal("<=", 0.2),
            ctx.size,
            f"{calls_scan / calls_bisect:.1f}x fewer calls; {setting}",
        ),
        BenchEntry.timed(
            "basin_bisection_seconds",
            "s",
            t["bisection"],
            t["scan"],
            "linear scan over the same log grid",
            None,
            ctx.size,
            f"scan and bisection timed in turn, one run each per round; points: {statuses}",
        ),
        _agreement_entry(
            curve.scan_critical_sigma(est.p),
            torch.tensor([r.lo for r in est.results_], dtype=torch.float64),
            levels,
            ctx.size,
        ),
        BenchEntry.measured(
            "basin_estimate_calls",
            calls_full,
            "denoiser rows per point",
            calls_bisect,
            "the search alone",
            None,
            ctx.size,
            f"{full.design_rounds} design rounds x {full.design_levels} levels x {full.design_trials} trials, "
            f"{t_full:.2f} s; {_interval_note(full)}",
        ),
    ]


def _interval_note(est: BasinEstimator) -> str:
    """The median width of the estimate's intervals for sigma*, as a ratio high / low, over fitted points."""
    fitted = [r for r in est.results_ if r.fit == "probit"]
    if not fitted:
        return "no probit fit"
    ratio = torch.tensor([r.sigma_c_high / r.sigma_c_low for r in fitted], dtype=torch.float64)
    level = fitted[0].interval_level
    return f"median {level:.0%} interval high / low {float(ratio.median()):.3f} over {len(fitted)} fitted points"


def _agreement_entry(sigma_scan: Tensor, sigma_bisect: Tensor, levels: Tensor, size: str) -> BenchEntry:
    """The largest |log| ratio of the two searches' levels (N,) (the scan's sigma_c and the bisection's
    lo; 0 where there is no basin), against one step of the search grid `levels`."""
    both = (sigma_scan > 0) & (sigma_bisect > 0)
    log_gap = (sigma_bisect[both] / sigma_scan[both]).log().abs()
    worst = float(log_gap.max()) if bool(both.any()) else 0.0
    unmatched = int((both != ((sigma_scan > 0) | (sigma_bisect > 0))).sum())  # a basin in one search only
    resolution = math.log(float(levels[1] / levels[0]))
    agree = int((log_gap <= resolution * (1 + 1e-9)).sum())
    return BenchEntry.measured(
        "basin_sigma_c_log_gap",
        worst,
        "|log(sigma_c bisection / sigma_c scan)|",
        resolution,
        "log of one grid step",
        Goal("<=", 1 + 1e-9),  # within one step, up to the rounding of the grid's logarithm
        size,
        f"{agree} of {int(both.sum())} points within one step, {unmatched} with a basin in one search only",
        also=unmatched == 0,
    )
