"""`diffmem demo`: the whole study at CPU scale (digits K sweep + circle toy, report), and
`diffmem exact-demo`: the exact empirical denoiser memorizes the digits at every K (SCIENCE.md §4)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffmem.core import EmpiricalDenoiser, VPSchedule, initial_noise, sample_ddim, seeded_generators
from diffmem.core.census import KINDS
from diffmem.experiments.attractors import circle_landscape_panels, trained_landscape_panel
from diffmem.io.data import load_dataset, load_digits, nested_subset
from diffmem.io.files import prepare_out_dir, write_json_atomic
from diffmem.models.nets import NetworkConfig
from diffmem.models.train import TrainConfig, train
from diffmem.report.page import write_report
from diffmem.study.config import StudyConfig
from diffmem.study.runner import StudyResult, run_study
from diffmem.study.store import StudyStore
from diffmem.viz.figures import landscape_figure, sample_neighbour_grid

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


def circle_summary(panels, sigma: float) -> dict:
    """Counts per census kind (memories, spurious minima, saddles, maxima) per landscape panel, and the
    continuum's ring."""
    return {
        "sigma": sigma,
        "panels": [
            {
                "title": p.title,
                "counts": {kind: sum(a["kind"] == kind for a in p.attractors) for kind in KINDS},
                "ring_radius": p.ring_radius,
            }
            for p in panels
        ],
    }


@dataclass(frozen=True)
class ExactDemoResult:
    rows: list[DemoRow]  # one per K
    circle: dict | None  # the circle census summary (None when skipped)
    out: Path  # where summary.json and the figures are


def run_exact_demo(config: DemoConfig, out: str | Path | None = None, *, progress: bool = True) -> ExactDemoResult:
    """Rows per K and the circle-census summary, also written to OUT/summary.json (OUT default: a new
    ./diffmem-exact-NNNNN, made once the arguments are checked)."""
    device = torch.device(config.device)
    data = load_digits(device=device)
    if max(config.ks) > len(data):
        raise ValueError(f"--k {max(config.ks)} exceeds the {len(data)} digits available")
    out = prepare_out_dir(out, "diffmem-exact")
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
        summary["circle_census"] = circle_summary(panels, config.circle_sigma)
    write_json_atomic(out / "summary.json", summary)
    return ExactDemoResult(rows, summary.get("circle_census"), out)


# ---------------------------------------------------------------------------------------------
# The study at CPU scale
# ---------------------------------------------------------------------------------------------

DEMO_KS = (4, 16, 48, 128, 384, 1500)  # log-spaced nested digit sets; 1,500 leaves the 297 held-out digits


def demo_study_config(
    ks: tuple[int, ...] = DEMO_KS,
    *,
    n_samples: int = 256,
    train_steps: int = 4000,
    hidden: int = 256,
    depth: int = 3,
    executor: str = "pool",
    workers: int = 2,
    device: str = "cpu",
    analysis_points: int = 16,
) -> StudyConfig:
    """The digits K sweep of `diffmem demo`: an MLP per K trained for the same number of steps,
    256 DDIM samples, calibrated classification, basins, energies, curvature, census and collapse."""
    return StudyConfig.from_dict(
        {
            "name": "diffmem-demo",
            "data": {"name": "digits", "options": {}},
            "ks": list(ks),
            "seeds": [0],
            "n_held_out": 297,
            "network": {"kind": "mlp", "mlp": {"hidden": hidden, "depth": depth}},
            "train": {
                "steps": train_steps,
                "batch_size": 128,
                "lr": 2e-3,
                "lr_schedule": "cosine",
                "warmup_steps": min(100, train_steps),
                "ema_decay": 0.999,
                "log_every": max(1, train_steps // 10),
            },
            "sampling": {"sampler": "ddim", "steps": 50, "n_samples": n_samples},
            "analyses": {
                "basins": {"enabled": True, "n_points": analysis_points, "n_trials": 10, "p": 0.9, "steps": 20},
                "energy": {"enabled": True, "n_points": analysis_points, "sigma": 0.2},
                "curvature": {"enabled": True, "n_points": analysis_points, "sigma": 0.2},
                "census": {"enabled": True, "sigma": 0.2, "n_starts": 100},
                "collapse": {"enabled": True, "n_samples": min(128, n_samples)},
            },
            "device": device,
            "executor": {"kind": executor, "workers": workers if executor != "local" else 1},
        }
    )


def circle_toy(
    out: Path,
    *,
    ks: tuple[int, ...] = (2, 9, 1000),
    sigma: float = 0.15,
    train_steps: int = 3000,
    n_starts: int = 150,
    max_iter: int = 1000,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """The 2D toy of SCIENCE.md §7: the exact memory of K circle points and MLPs trained on the same
    points, their fixed points at one sigma and -log p; writes OUT/landscape.png and landscape.json."""
    trained = []
    for k in tqdm(ks, desc="circle toy: K", disable=not progress):
        config = TrainConfig(
            data="circle",
            k=k,
            steps=train_steps,
            batch_size=128,
            lr=2e-3,
            lr_schedule="cosine",
            warmup_steps=min(100, train_steps),
            network=NetworkConfig("mlp", {"hidden": 128, "depth": 3}),
            log_every=max(1, train_steps // 5),
        )
        run = out / "circle" / f"k-{k}"
        train(config, run, device=device, progress=False)
        trained.append(trained_landscape_panel(run, sigma, n_starts=n_starts, max_iter=max_iter, device=device))
    panels = circle_landscape_panels(sigma, ks, n_starts=n_starts, extra=trained)
    landscape_figure(panels, out / "landscape.png", sigma=sigma)
    summary = circle_summary(panels, sigma)
    write_json_atomic(out / "landscape.json", summary)
    return summary


@dataclass(frozen=True)
class DemoResult:
    study: StudyResult  # the phase table and transitions of the digits sweep
    circle: dict | None  # the circle toy's panels (None when skipped)
    report: Path  # report.html


def run_demo(
    config: StudyConfig,
    out: str | Path | None = None,
    *,
    circle: bool = True,
    circle_steps: int = 3000,
    progress: bool = True,
) -> DemoResult:
    """The study of `config` in OUT (default: a new ./diffmem-demo-NNNNN) with the circle toy beside it
    (in a thread of this process, while the study's jobs run), then the report."""
    config.check_dataset_size(len(load_dataset(config.data.name, **config.data.options)))  # before any work
    out = prepare_out_dir(out, "diffmem-demo")
    StudyStore.create_or_open(out, config.to_dict(), config.fingerprint())  # before the toy writes into OUT
    toy: dict = {}
    failure: list[BaseException] = []

    def run_toy() -> None:
        try:
            toy.update(circle_toy(out, train_steps=circle_steps, device=config.device, progress=False))
        except BaseException as e:  # re-raised in the caller's thread below
            failure.append(e)

    threads = torch.get_num_threads()
    worker = threading.Thread(target=run_toy, name="circle-toy", daemon=True)
    if circle:
        if config.executor.kind != "local":
            torch.set_num_threads(1)  # the study's workers take the other cores
        worker.start()
    try:
        result = run_study(config, out, progress=progress)
    finally:
        if circle:
            worker.join()
        torch.set_num_threads(threads)
    if failure:
        raise failure[0]
    return DemoResult(result, toy or None, write_report(out))
