"""The benchmark harness: every figure is a ratio against a reference measured in the same run.

An entry has a name, a value with its unit, the reference figure it is compared with, and
ratio = value / reference, plus the goal it is judged by. Later work adds entries to BENCHMARKS.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from diffmem.core import DenseAM, EmpiricalDenoiser, VPSchedule, initial_noise, sample_ddim

SIZES = ("full", "quick")


@dataclass(frozen=True)
class BenchEntry:
    name: str
    value: float
    unit: str
    reference: float | None  # a figure measured in the same run (None only for the reference itself)
    reference_name: str
    ratio: float | None  # value / reference
    goal: str  # how the ratio is judged, e.g. ">= 0.7"
    met: bool | None  # whether the goal is met (None when there is no goal)
    notes: str = ""


@dataclass(frozen=True)
class _Problem:
    k: int
    d: int
    b: int


STEP_PROBLEM = {"full": _Problem(50_000, 3_072, 256), "quick": _Problem(2_000, 256, 32)}
DDIM_PROBLEM = {"full": (1_024, 100), "quick": (64, 10)}  # (samples, steps) on the 1,797 digits


class BenchContext:
    def __init__(self, device: str, size: str, repeats: int):
        if size not in SIZES:
            raise ValueError(f"unknown benchmark size {size!r}; choose one of {SIZES}")
        self.device = torch.device(device)
        self.size = size
        self.repeats = repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def best_time(self, fn: Callable[[], object], repeats: int | None = None) -> float:
        fn()  # warm-up
        self.sync()
        best = math.inf
        for _ in range(repeats or self.repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        return best

    @cached_property
    def matmul_gflops(self) -> float:
        """The machine's own float32 matmul rate: best of square n x n products."""
        n = 2048 if self.size == "full" else 512
        g = torch.Generator(device=self.device).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=self.device)
        b = torch.randn(n, n, generator=g, device=self.device)
        return 2 * n**3 / self.best_time(lambda: a @ b, repeats=max(self.repeats, 10)) / 1e9


def bench_matmul(ctx: BenchContext) -> list[BenchEntry]:
    n = 2048 if ctx.size == "full" else 512
    return [
        BenchEntry(
            "matmul_float32",
            ctx.matmul_gflops,
            "GFLOP/s",
            None,
            "-",
            None,
            "reference",
            None,
            f"{n}x{n} @ {n}x{n} float32, {torch.get_num_threads()} threads, device {ctx.device}",
        )
    ]


def bench_exact_step(ctx: BenchContext) -> list[BenchEntry]:
    """One exact-denoiser step (the retrieval map) for K patterns of dimension D and a batch B."""
    p = STEP_PROBLEM[ctx.size]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    xi = torch.randn(p.k, p.d, generator=g, device=ctx.device)
    x = torch.randn(p.b, p.d, generator=g, device=ctx.device) * 20
    am = DenseAM(xi)
    seconds = ctx.best_time(lambda: am.retrieve(x, 1 / 400.0), repeats=max(ctx.repeats, 5))
    gflops = 4 * p.b * p.k * p.d / seconds / 1e9  # two (B, K, D) matrix products
    ref = ctx.matmul_gflops
    return [
        BenchEntry(
            "exact_step_gflops",
            gflops,
            "GFLOP/s",
            ref,
            "matmul_float32",
            gflops / ref,
            ">= 0.7",
            gflops / ref >= 0.7,
            f"K={p.k} D={p.d} B={p.b} float32, {seconds * 1e3:.1f} ms per step",
        )
    ]


_MEMORY_PROBE = r"""
import json, sys
import torch
from diffmem.core import DenseAM
k, d, b, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator(device=device).manual_seed(0)
xi = torch.randn(k, d, generator=g, device=device)
x = torch.randn(b, d, generator=g, device=device) * 20
am = DenseAM(xi)
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    am.retrieve(x, 1 / 400.0); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = status("VmRSS")
    am.retrieve(x, 1 / 400.0)
    peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak}))
"""


def bench_exact_step_memory(ctx: BenchContext) -> list[BenchEntry]:
    """Peak memory of one exact-denoiser step, in a fresh process: what the step adds to its inputs."""
    p = STEP_PROBLEM[ctx.size]
    if ctx.device.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        return []  # peak-RSS reset needs Linux procfs
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(p.k), str(p.d), str(p.b), str(ctx.device)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip()[-500:]}")
    m = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 2**20
    workspace = max(m["peak"] - m["base"], 0) / mb
    naive = p.b * p.k * p.d * 4 / mb  # the (B, K, D) float32 tensor a naive implementation builds
    inputs = (p.k + p.b) * p.d * 4 / mb
    what = "peak RSS" if ctx.device.type == "cpu" else "peak CUDA allocation"
    return [
        BenchEntry(
            "exact_step_workspace_mb",
            workspace,
            "MB",
            naive,
            "size of a (B, K, D) float32 tensor",
            workspace / naive,
            "<= 0.01",
            workspace / naive <= 0.01,
            f"{what} during the step minus before it",
        ),
        BenchEntry(
            "exact_step_peak_mb",
            inputs + workspace,
            "MB",
            1024.0,
            "1 GB budget",
            (inputs + workspace) / 1024.0,
            "< 1",
            inputs + workspace < 1024.0,
            f"inputs ({inputs:.0f} MB: patterns and batch) plus workspace",
        ),
    ]


def bench_ddim_digits(ctx: BenchContext) -> list[BenchEntry]:
    """Wall time of exact-denoiser DDIM sampling on the digits, against its matmul-bound time."""
    from diffmem.io.data import load_digits

    n, steps = DDIM_PROBLEM[ctx.size]
    train = load_digits(device=ctx.device).x
    den = EmpiricalDenoiser(train)
    sigmas = VPSchedule().sampling_sigmas(steps)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    x = initial_noise((n, train.shape[1]), float(sigmas[0]), generator=g, like=train)
    seconds = ctx.best_time(lambda: sample_ddim(den, x, sigmas))
    bound = 4 * n * train.shape[0] * train.shape[1] * steps / (ctx.matmul_gflops * 1e9)
    return [
        BenchEntry(
            "ddim_digits_seconds",
            seconds,
            "s",
            bound,
            "matmul-bound time at matmul_float32",
            seconds / bound,
            "report",
            None,
            f"{n} samples, K={train.shape[0]}, D={train.shape[1]}, {steps} DDIM steps",
        )
    ]


CENSUS_PROBLEM = {"full": (10_000, 1.0), "quick": (400, 1.0)}  # (starts, sigma) on all 1,797 digits


def bench_census_digits(ctx: BenchContext) -> list[BenchEntry]:
    """Census of the exact memory of the digits with exact stability (float64), against the time of
    one retrieval step over all starts measured in the same run."""
    from diffmem.experiments.attractors import exact_census, split_starts
    from diffmem.core.census import make_starts
    from diffmem.io.data import load_digits

    n, sigma = CENSUS_PROBLEM[ctx.size]
    pats = load_digits(dtype=torch.float64, device=ctx.device).x
    g = torch.Generator(device=ctx.device).manual_seed(0)
    starts, _ = make_starts(pats, sigma, split_starts(n), generator=g)
    am = DenseAM(pats)
    step = ctx.best_time(lambda: am.retrieve(starts, sigma**-2))
    t0 = time.perf_counter()
    result = exact_census(pats, sigma, n, seed=0)
    ctx.sync()
    seconds = time.perf_counter() - t0
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


UNET_SMALL = {
    "block_out_channels": [32, 64],
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
}
TRAIN_PROBLEMS = {  # name: (data, network, batch, steps full, steps quick)
    "train_mlp_digits": ("digits", {"kind": "mlp", "mlp": {"hidden": 256, "depth": 3}}, 128, 400, 20),
    "train_unet_8x8": ("digits", {"kind": "unet", "unet": UNET_SMALL}, 64, 40, 6),
    "train_unet_32x32": ("npz32", {"kind": "unet", "unet": UNET_SMALL}, 16, 40, 4),
}


def _train_config(name: str, size: str, root: str | None):
    from diffmem.models.train import TrainConfig

    data, net, batch, full, quick = TRAIN_PROBLEMS[name]
    steps = full if size == "full" else quick
    opts = {"data": "npz", "data_options": {"root": root}} if data == "npz32" else {"data": data}
    # two log records: the second half of the run is timed, after warm-up, in both loops
    return TrainConfig(**opts, k=64, steps=steps, batch_size=batch, network=net, log_every=steps // 2, warmup_steps=2)


def _reference_train_seconds(config, device: torch.device) -> float:
    """A minimal hand-written DDPM loop doing the same work: batch, noise, forward, MSE, backward,
    clipping, AdamW, EMA."""
    from diffmem.io.data import load_dataset
    from diffmem.models.train import build_model, event_shape_for, split_indices

    data = load_dataset(config.data, **config.data_options)
    x = data.x[split_indices(config, len(data))].to(device)
    event = event_shape_for(config, data)
    model = build_model(config, event, device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ab = VPSchedule().alpha_bar.float().to(device)
    g = torch.Generator().manual_seed(0)
    half = config.steps // 2
    for step in range(config.steps):
        if step == half:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        i = torch.randint(len(x), (config.batch_size,), generator=g).to(device)
        t = torch.randint(1000, (config.batch_size,), generator=g).to(device)
        eps = torch.randn((config.batch_size, x.shape[1]), generator=g).to(device)
        a = ab[t][:, None]
        x_t = (a.sqrt() * x[i] + (1 - a).sqrt() * eps).reshape(-1, *event)
        loss = ((model(x_t, t).reshape(config.batch_size, -1) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                ema[k].mul_(0.999).add_(v, alpha=0.001) if v.dtype.is_floating_point else ema[k].copy_(v)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench_training(ctx: BenchContext) -> list[BenchEntry]:
    """Training steps per second of diffmem's trainer against a minimal loop in the same run."""
    import tempfile

    import numpy as np

    from diffmem.models.train import train

    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = f"{tmp}/images32.npz"
        np.savez(npz, x=np.random.default_rng(0).uniform(-1, 1, size=(64, 32 * 32)).astype(np.float32))
        for name in TRAIN_PROBLEMS:
            config = _train_config(name, ctx.size, npz)
            train(config, f"{tmp}/{name}", device=str(ctx.device), progress=False)
            with open(f"{tmp}/{name}/metrics.jsonl") as f:
                first, last = (json.loads(line) for line in f.readlines()[-2:])
            ours = (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])
            ref = (config.steps - config.steps // 2) / _reference_train_seconds(config, ctx.device)
            entries.append(
                BenchEntry(
                    f"{name}_steps_per_s",
                    ours,
                    "steps/s",
                    ref,
                    "minimal hand-written loop",
                    ours / ref,
                    ">= 0.9",
                    ours / ref >= 0.9,
                    f"batch {config.batch_size}, {config.steps} steps",
                )
            )
    return entries


def bench_sampling(ctx: BenchContext) -> list[BenchEntry]:
    """Images per second of DDIM sampling of a (freshly initialised) MLP through diffmem's denoiser
    contract and sampler, against a minimal VP DDIM loop calling the network directly."""
    from diffmem.core import VPNetworkDenoiser
    from diffmem.models.sampling import sample_denoiser
    from diffmem.models.train import build_model

    config = _train_config("train_mlp_digits", ctx.size, None)
    model = build_model(config, (8, 8), ctx.device).eval()
    sched = VPSchedule()
    n, steps = (1024, 50) if ctx.size == "full" else (64, 10)
    den = VPNetworkDenoiser(model, sched, timestep="continuous")
    ours = n / ctx.best_time(
        lambda: sample_denoiser(den, sched, n, (8, 8), steps=steps, batch_size=n, device=str(ctx.device))
    )
    ts = sched.timesteps(steps)
    ab = sched.alpha_bar.float().to(ctx.device)

    def reference():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 8, 8, generator=g).to(ctx.device)
        with torch.no_grad():
            for i, t in enumerate(ts.tolist()):
                a, a_prev = ab[t], (ab[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=ctx.device))
                eps = model(x, torch.full((n,), t, device=ctx.device))
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # DDIM, eta = 0 (Song et al. eq. 12)
        return x

    ref = n / ctx.best_time(reference)
    return [
        BenchEntry(
            "sample_mlp_digits_images_per_s",
            ours,
            "images/s",
            ref,
            "minimal VP DDIM loop",
            ours / ref,
            ">= 0.9",
            ours / ref >= 0.9,
            f"{n} images, {steps} DDIM steps, per-sample seeds",
        )
    ]


def bench_knn(ctx: BenchContext) -> list[BenchEntry]:
    """Exact k-NN: GFLOP/s against the matmul rate, a float64 brute-force check, and faiss IndexFlatL2."""
    from diffmem.bench.knn import bench_knn as run  # imported late: it imports this module

    return run(ctx)


def bench_basins(ctx: BenchContext) -> list[BenchEntry]:
    """Critical-time search: bisection against a linear scan at the same resolution."""
    from diffmem.bench.basins import bench_basins as run  # imported late: it imports this module

    return run(ctx)


def bench_lpips_knn(ctx: BenchContext) -> list[BenchEntry]:
    """LPIPS nearest neighbours through embeddings against features recomputed for every pair of batches."""
    from diffmem.bench.lpips import bench_lpips_knn as run

    return run(ctx)


BENCHMARKS: dict[str, Callable[[BenchContext], list[BenchEntry]]] = {
    "matmul": bench_matmul,
    "exact_step": bench_exact_step,
    "exact_step_memory": bench_exact_step_memory,
    "ddim_digits": bench_ddim_digits,
    "census_digits": bench_census_digits,
    "training": bench_training,
    "sampling": bench_sampling,
    "knn": bench_knn,
    "basins": bench_basins,
    "lpips_knn": bench_lpips_knn,
}


def run_benchmarks(
    only: list[str] | None = None,
    *,
    device: str = "cpu",
    size: str = "full",
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[BenchEntry]:
    names = list(BENCHMARKS) if not only else only
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    ctx = BenchContext(device, size, repeats)
    entries: list[BenchEntry] = []
    for name in names:
        if progress:
            progress(f"bench: {name} ...")
        entries.extend(BENCHMARKS[name](ctx))
    return entries


def format_table(entries: list[BenchEntry]) -> str:
    head = f"{'name':<26} {'value':>12} {'unit':<8} {'reference':>12} {'ratio':>8}  goal"
    lines = [head, "-" * len(head)]
    for e in entries:
        ref = "-" if e.reference is None else f"{e.reference:.4g}"
        ratio = "-" if e.ratio is None else f"{e.ratio:.3f}"
        status = "" if e.met is None else ("  met" if e.met else "  NOT met")
        lines.append(f"{e.name:<26} {e.value:>12.4g} {e.unit:<8} {ref:>12} {ratio:>8}  {e.goal}{status}")
    return "\n".join(lines)


def entries_to_json(entries: list[BenchEntry]) -> list[dict]:
    return [asdict(e) for e in entries]
