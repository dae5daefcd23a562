"""Attractor studies on top of the core census: one census, the (K, sigma) phase diagram of the
exact memory, neighbour merging on the circle, and the 2D energy landscape (SCIENCE.md §3, §6)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffmem.core import DenseAM
from diffmem.core._checks import check_finite_float
from diffmem.core.census import (
    Census,
    DenoiserLandscape,
    MemoryLandscape,
    census,
    every_pattern_is_memory,
    largest_sigma_all_memories,
    make_starts,
    split_starts,
)
from diffmem.core.dynamics import iterate_map
from diffmem.core.energy import straight_line_energy
from diffmem.core.theory import circle_neg_log_prob, circle_ring_radius
from diffmem.io.data import load_circle, nested_order
from diffmem.models.train import load_denoiser

SIGMA_RANGE = (1e-12, 1e12)  # noise levels whose beta = 1 / sigma^2 and sigma^2 are usable floats


def check_sigma(sigma: float, name: str = "sigma") -> float:
    """sigma as a float, once it is a finite noise level inside SIGMA_RANGE."""
    return check_finite_float(sigma, name, low=SIGMA_RANGE[0], high=SIGMA_RANGE[1])


def exact_census(
    patterns: Tensor, sigma: float, n_starts: int, *, seed: int = 0, saddle_search: str = "newton", **kw
) -> Census:
    """Census of the exact dense memory (the empirical denoiser) of `patterns` at noise level sigma."""
    sigma = check_sigma(sigma)
    g = torch.Generator(device=patterns.device).manual_seed(seed)
    starts, labels = make_starts(patterns, sigma, split_starts(n_starts), generator=g)
    land = MemoryLandscape(DenseAM(patterns), sigma)
    return census(land, patterns, starts, start_labels=labels, saddle_search=saddle_search, **kw)


# ---------------------------------------------------------------------------------------------
# Phase diagram over (K, sigma)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseDiagram:
    rows: list[dict]  # one per (K, sigma): counts, shares, convergence
    thresholds: list[dict]  # one per K: sigma_all_memories, sigma_first_spurious
    ks: list[int]
    sigmas: list[float]

    def grid(self, key: str) -> np.ndarray:
        """(len(ks), len(sigmas)) array of one column of the table."""
        out = np.full((len(self.ks), len(self.sigmas)), np.nan)
        for r in self.rows:
            out[self.ks.index(r["K"]), self.sigmas.index(r["sigma"])] = r[key]
        return out


def phase_diagram(
    ordered: Tensor,
    ks: Sequence[int],
    sigmas: Sequence[float],
    *,
    n_starts: int = 400,
    seed: int = 0,
    progress: bool = True,
) -> PhaseDiagram:
    """Census of the exact memory of the nested subsets ordered[:K] over a grid of sigma.

    For each K also: the largest sigma at which every pattern is still a memory (bisection between
    the grid's ends, 0.1% resolution) and the smallest grid sigma at which a spurious minimum exists.
    """
    ks, sigmas = sorted(int(k) for k in ks), sorted(float(s) for s in sigmas)
    if not ks or ks[0] < 1 or ks[-1] > ordered.shape[0]:
        raise ValueError(f"K values must lie in [1, {ordered.shape[0]}], got {ks}")
    if not sigmas:
        raise ValueError("give at least one sigma")
    sigmas = [check_sigma(s, "sigma values") for s in sigmas]
    rows, thresholds = [], []
    bar = tqdm(total=len(ks) * len(sigmas), desc="phase diagram", disable=not progress)
    for k in ks:
        pats = ordered[:k]
        first_spurious = None
        for s in sigmas:
            c = exact_census(pats, s, n_starts, seed=seed)
            counts, shares = c.counts, c.shares
            rows.append(
                {
                    "K": k,
                    "sigma": s,
                    "beta": s**-2,
                    "n_starts": c.n_starts,
                    "n_converged": c.n_converged,
                    **{f"n_{kind}": counts[kind] for kind in counts},
                    **{f"share_{kind}": shares[kind] for kind in shares},
                }
            )
            if first_spurious is None and counts["spurious"] > 0:
                first_spurious = s
            bar.update()
        am = DenseAM(pats)
        lo, hi = sigmas[0], sigmas[-1]
        if k == 1:
            all_mem = math.inf  # a single pattern is always its own memory
        elif not every_pattern_is_memory(MemoryLandscape(am, lo), pats):
            all_mem = None  # already merged at the smallest sigma of the grid
        else:
            all_mem = largest_sigma_all_memories(lambda s, am=am: MemoryLandscape(am, s), pats, lo, hi)
        thresholds.append(
            {
                "K": k,
                "sigma_all_memories": all_mem,
                "beyond_grid": all_mem is not None and all_mem >= hi,  # still all memories at the top of the grid
                "sigma_first_spurious": first_spurious,
            }
        )
    bar.close()
    return PhaseDiagram(rows=rows, thresholds=thresholds, ks=ks, sigmas=sigmas)


# ---------------------------------------------------------------------------------------------
# Neighbour merging for K equally spaced points on the circle
# ---------------------------------------------------------------------------------------------


def circle_barrier(k: int, sigma: float) -> float:
    """Barrier between neighbouring memories of K equally spaced points on the unit circle, in nats:
    -log p at the saddle on the bisector of two neighbours minus -log p at a memory.

    The memory lies on its pattern's ray and the saddle on the bisector (mirror symmetry). Each is
    found by retrieval restricted to its ray: the x-axis, with the points placed at angles 2 pi j / K
    (memory) or 2 pi (j + 1/2) / K (saddle). The restriction keeps rounding from pushing the
    iteration off the saddle. The barrier never reaches zero (the angular modulation is a sum of
    positive Bessel terms) but falls like exp(-K^2 sigma^2 / (2 r)).
    """
    beta = sigma**-2
    nlp = []
    for offset in (0.0, 0.5):
        theta = (torch.arange(k, dtype=torch.float64) + offset) * (2 * math.pi / k)
        am = DenseAM(torch.stack([theta.cos(), theta.sin()], dim=1))
        axis = torch.tensor([1.0, 0.0], dtype=torch.float64)
        fp = iterate_map(
            lambda xa, idx, am=am, axis=axis: am.retrieve(xa, beta) * axis,
            axis[None].clone(),
            tol=1e-13,
            max_iter=200_000,
        )
        if not bool(fp.converged.all()):
            raise RuntimeError(f"retrieval on the symmetry axis did not converge for K={k}, sigma={sigma}")
        nlp.append(beta * float(am.energy(fp.x, beta)[0]))  # -log p differences are beta * dE
    return nlp[1] - nlp[0]


def circle_merge_sigma(k: int, *, threshold_nats: float = 1.0, rtol: float = 1e-4) -> float:
    """The sigma at which the barrier between neighbours falls to `threshold_nats` (bisection in log
    sigma): above it neighbouring memories are no longer distinct modes of p_sigma."""
    if k < 3:
        raise ValueError("neighbour merging on the circle needs K >= 3")
    lo, hi = math.log(1e-3), math.log(0.69)  # the ring itself collapses at sigma = 1 / sqrt(2)
    if circle_barrier(k, math.exp(hi)) > threshold_nats:
        return math.exp(hi)
    while hi - lo > math.log1p(rtol):
        mid = 0.5 * (lo + hi)
        if circle_barrier(k, math.exp(mid)) > threshold_nats:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def merging_scaling(ks: Sequence[int], *, threshold_nats: float = 1.0) -> dict:
    """sigma_merge(K) for each K and the least-squares fit sigma_merge = c * K^(-a) in log-log."""
    if len(set(ks)) < 2:
        raise ValueError(f"a scaling fit needs at least two different K values, got {list(ks)}")
    sig = [circle_merge_sigma(k, threshold_nats=threshold_nats) for k in ks]
    slope, intercept = np.polyfit(np.log(ks), np.log(sig), 1)
    return {
        "threshold_nats": threshold_nats,
        "K": list(ks),
        "sigma_merge": sig,
        "exponent": float(-slope),
        "constant": float(math.exp(intercept)),
        "K_times_sigma": [k * s for k, s in zip(ks, sig, strict=True)],
    }


# ---------------------------------------------------------------------------------------------
# The 2D landscape figure
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LandscapePanel:
    title: str
    grid: np.ndarray  # (n, n) -log p on the square [-lim, lim]^2
    lim: float
    patterns: np.ndarray  # (K, 2), possibly empty
    attractors: list[dict]  # {x, kind, share}
    ring_radius: float | None = None  # continuum panel: the ring of minima


def _grid_points(lim: float, n: int) -> Tensor:
    ax = torch.linspace(-lim, lim, n, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1).reshape(-1, 2)


def landscape_panel(
    patterns: Tensor,
    sigma: float,
    *,
    n_starts: int = 300,
    seed: int = 0,
    lim: float = 1.6,
    n: int = 161,
    title: str,
    result: Census | None = None,
) -> LandscapePanel:
    """-log p_sigma of the exact memory on a grid, with every attractor of its census (run here
    unless `result` is given)."""
    pts = patterns.to(torch.float64)
    c = result if result is not None else exact_census(pts, sigma, n_starts, seed=seed, max_iter=5000)
    am = DenseAM(pts)
    beta = sigma**-2
    nlp = beta * am.energy(_grid_points(lim, n), beta) + math.log(2 * math.pi * sigma**2) + math.log(pts.shape[0])
    atts = [{"x": a.x.tolist(), "kind": a.kind, "share": a.share} for a in c.attractors]
    return LandscapePanel(title, nlp.reshape(n, n).numpy(), lim, pts.numpy(), atts)


def continuum_panel(sigma: float, *, lim: float = 1.6, n: int = 161) -> LandscapePanel:
    """The K -> infinity circle: -log p in closed form and its ring of minima (or the centre)."""
    nlp = circle_neg_log_prob(_grid_points(lim, n), sigma).reshape(n, n).numpy()
    r = circle_ring_radius(sigma**-2)
    atts = [] if r > 0 else [{"x": [0.0, 0.0], "kind": "spurious", "share": 1.0}]
    return LandscapePanel("continuum (K = inf)", nlp, lim, np.zeros((0, 2)), atts, ring_radius=r or None)


def circle_landscape_panels(
    sigma: float,
    ks: Sequence[int] = (2, 9, 1000),
    *,
    seed: int = 0,
    n_starts: int = 300,
    extra: Sequence[LandscapePanel] = (),
    progress: Callable[[str], None] | None = None,
) -> list[LandscapePanel]:
    """Panels for nested subsets of uniform circle points at one sigma, plus the continuum limit.
    `extra` appends panels from other models (trained networks) drawn by the same code."""
    sigma = check_sigma(sigma)
    data = load_circle(dtype=torch.float64, seed=seed)
    ordered = data.x[nested_order(len(data), seed)]
    panels = []
    for k in ks:
        if progress:
            progress(f"landscape: K={k}")
        panels.append(landscape_panel(ordered[:k], sigma, n_starts=n_starts, seed=seed, title=f"K = {k}"))
    panels.append(continuum_panel(sigma))
    return [*panels, *extra]


def trained_landscape_panel(
    run_dir,
    sigma: float,
    *,
    n_starts: int = 300,
    seed: int = 0,
    lim: float = 1.6,
    n: int = 81,
    max_iter: int = 3000,
    device: str = "cpu",
) -> LandscapePanel:
    """A trained 2D model at noise level sigma: its census (DenoiserLandscape, Jacobian by autograd)
    and -log p relative to the origin from straight-line Gauss-Legendre integrals of its score."""
    sigma = check_sigma(sigma)
    run = load_denoiser(run_dir, device=device)
    den, config, train_x = run.denoiser, run.config, run.train_x
    if train_x.shape[1] != 2:
        raise ValueError(f"landscape panels need 2D data; the run in {run_dir} has D = {train_x.shape[1]}")
    pats = train_x.to(torch.float32)
    land = DenoiserLandscape(den, sigma, 2)
    g = torch.Generator().manual_seed(seed)
    starts, labels = make_starts(pats, sigma, split_starts(n_starts), generator=g)
    c = census(land, pats, starts, start_labels=labels, tol=1e-5, max_iter=max_iter)
    grid = _grid_points(lim, n).to(torch.float32)
    with torch.no_grad():
        nlp = straight_line_energy(den, sigma, torch.zeros_like(grid), grid, n_nodes=24)
    atts = [{"x": a.x.tolist(), "kind": a.kind, "share": a.share} for a in c.attractors]
    return LandscapePanel(f"trained, K = {config.k}", nlp.reshape(n, n).double().numpy(), lim, pats.numpy(), atts)
