"""`diffmem demo`: the exact empirical denoiser memorizes the digits at every K (SCIENCE.md §4)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffmem.attractors import circle_landscape_panels
from diffmem.core import EmpiricalDenoiser, VPSchedule, initial_noise, sample_ddim, seeded_generators
from diffmem.core.census import KINDS
from diffmem.data import load_digits, nested_subset
from diffmem.plots import landscape_figure, sample_neighbour_grid
from diffmem.runs import write_json_atomic

MEMORIZED_TOL = 1e-3  # normalized L2 (||.|| / sqrt(D)) below which a sample is a training image


@dataclass(frozen=True)
class DemoConfig:
    ks: tuple[int, ...] = (16, 128, 1797)  # nested training-set sizes
    circle_ks: tuple[int, ...] = (2, 9, 1000)  # circle subsets of the census panels; () skips the census
    circle_sigma: float = 0.15  # noise level of the circle census
    n_samples: int = 256  # samples per K
    steps: int = 50  # DDIM steps (eta = 0) on the standard linear VP schedule, 'leading' spacing
    seed: int = 0  # subset permutation seed; sample i uses seed `seed * 1_000_003 + i`
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"--k values must be positive integers, got {list(self.ks)}")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"--k values must be distinct, got {list(self.ks)}")
        if self.n_samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.n_samples}")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"--steps must lie in [1, 1000], got {self.steps}")


@dataclass(frozen=True)
class DemoRow:
    k: int
    n_samples: int
    frac_memorized: float  # share of samples within MEMORIZED_TOL of a training image
    max_distance: float  # largest normalized L2 distance of a sample to its nearest training image
    distinct_patterns: int  # how many different training images the samples landed on
    seconds: float


def run_demo(config: DemoConfig, out: Path, *, progress: bool = True) -> tuple[list[DemoRow], dict | None]:
    """Rows per K and the circle-census summary (None when skipped); both also go to OUT/summary.json."""
    device = torch.device(config.device)
    data = load_digits(device=device)
    if max(config.ks) > len(data):
        raise ValueError(f"--k {max(config.ks)} exceeds the {len(data)} digits available")
    schedule = VPSchedule()
    sigmas = schedule.sampling_sigmas(config.steps)
    rows, panels = [], []
    for k in tqdm(sorted(config.ks), desc="demo: K", disable=not progress):
        start = time.perf_counter()
        train = data.x[nested_subset(len(data), k, config.seed).to(device)]
        den = EmpiricalDenoiser(train)
        seeds = [config.seed * 1_000_003 + i for i in range(config.n_samples)]
        gens = seeded_generators(seeds, device)
        x = initial_noise((config.n_samples, data.x.shape[1]), float(sigmas[0]), generator=gens, like=train)
        samples = sample_ddim(den, x, sigmas)
        idx, dist = den.nearest(samples)
        dist = dist / math.sqrt(data.x.shape[1])
        rows.append(
            DemoRow(
                k=k,
                n_samples=config.n_samples,
                frac_memorized=float((dist < MEMORIZED_TOL).double().mean()),
                max_distance=float(dist.max()),
                distinct_patterns=int(idx.unique().numel()),
                seconds=time.perf_counter() - start,
            )
        )
        show = min(16, config.n_samples)
        panels.append(
            (
                f"K={k}",
                samples[:show].reshape(-1, *data.image_shape).cpu().numpy(),
                train[idx[:show]].reshape(-1, *data.image_shape).cpu().numpy(),
            )
        )
    sample_neighbour_grid(
        panels,
        out / "samples.png",
        title="Exact empirical denoiser (DDIM, eta=0): every sample is a training digit",
    )
    summary = {
        "config": asdict(config),
        "sampler": {"name": "ddim", "eta": 0.0, "schedule": schedule.to_dict(), "spacing": "leading"},
        "memorized_tolerance": MEMORIZED_TOL,
        "distance": "L2 / sqrt(D)",
        "results": [asdict(r) for r in rows],
    }
    if config.circle_ks:
        panels = circle_landscape_panels(config.circle_sigma, config.circle_ks, seed=config.seed, n_starts=150)
        landscape_figure(panels, out / "landscape.png", sigma=config.circle_sigma)
        summary["circle_census"] = {
            "sigma": config.circle_sigma,
            "panels": [
                {
                    "title": p.title,
                    "counts": {kind: sum(a["kind"] == kind for a in p.attractors) for kind in KINDS},
                    "ring_radius": p.ring_radius,
                }
                for p in panels
            ],
        }
    write_json_atomic(out / "summary.json", summary)
    return rows, summary.get("circle_census")
