"""Benchmarks of training and sampling of networks: diffmem's trainer and sampler against minimal
hand-written loops doing the same work, the two timed in turn."""

from __future__ import annotations

import itertools
import json
import tempfile
import time

import numpy as np
import torch
from torch import Tensor, nn

from diffmem.bench.harness import BenchContext, BenchEntry, Goal
from diffmem.core import VPNetworkDenoiser, VPSchedule
from diffmem.io.data import load_dataset
from diffmem.models.sampling import sample_denoiser
from diffmem.models.train import TrainConfig, build_model, event_shape_for, split_indices, train

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


def _train_config(name: str, size: str, root: str | None) -> TrainConfig:
    data, net, batch, full, quick = TRAIN_PROBLEMS[name]
    steps = full if size == "full" else quick
    opts = {"data": "npz", "data_options": {"root": root}} if data == "npz32" else {"data": data}
    # two log records: the second half of the run is timed, after warm-up, in both loops
    return TrainConfig(**opts, k=64, steps=steps, batch_size=batch, network=net, log_every=steps // 2, warmup_steps=2)


def _reference_train_seconds(config: TrainConfig, ctx: BenchContext) -> float:
    """A minimal hand-written DDPM loop doing the same work: batch, noise, forward, MSE, backward,
    clipping, AdamW, EMA. Returns the time of its second half, as the trainer's log records measure."""
    device = ctx.device
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
            ctx.sync()
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
    ctx.sync()
    return time.perf_counter() - t0


def _trainer_steps_per_s(run_dir: str) -> float:
    """Steps per second between the last two records of a run's metrics.jsonl."""
    with open(f"{run_dir}/metrics.jsonl") as f:
        first, last = (json.loads(line) for line in f.readlines()[-2:])
    return (last["step"] - first["step"]) / (last["seconds"] - first["seconds"])


def bench_training(ctx: BenchContext) -> list[BenchEntry]:
    """Training steps per second of diffmem's trainer against a minimal loop, for each problem."""
    with tempfile.TemporaryDirectory() as tmp:
        npz = f"{tmp}/images32.npz"
        np.savez(npz, x=np.random.default_rng(0).uniform(-1, 1, size=(64, 32 * 32)).astype(np.float32))
        return [_training_entry(ctx, name, _train_config(name, ctx.size, npz), tmp) for name in TRAIN_PROBLEMS]


def _training_entry(ctx: BenchContext, name: str, config: TrainConfig, tmp: str) -> BenchEntry:
    """The trainer and the minimal loop run in turn (loop, trainer, loop, trainer, ...) for
    HEAVY_ROUNDS rounds, each run a fresh training in its own directory under tmp."""
    runs = itertools.count()

    def ours() -> float:
        run_dir = f"{tmp}/{name}-{next(runs)}"
        train(config, run_dir, device=str(ctx.device), progress=False)
        return 1 / _trainer_steps_per_s(run_dir)  # seconds per step, as the loop's below

    def loop() -> float:
        return _reference_train_seconds(config, ctx) / (config.steps - config.steps // 2)

    # the first round also pays first-call costs (imports, kernel caches); the median round drops it
    t = ctx.interleave({"loop": loop, "ours": ours}, rounds=ctx.heavy_rounds, repeats=1, warmup=False)
    return BenchEntry.timed(
        f"{name}_steps_per_s",
        "steps/s",
        [1 / s for s in t["ours"]],
        [1 / s for s in t["loop"]],
        "minimal hand-written loop",
        Goal(">=", 0.9),
        ctx.size,
        f"batch {config.batch_size}, {config.steps} steps, the second half timed",
    )


def _reference_ddim(model: nn.Module, ab: Tensor, ts: Tensor, n: int, device: torch.device) -> Tensor:
    """A minimal VP DDIM loop calling an epsilon network directly at the integer timesteps ts, with
    alpha_bar ab (T,) on the device. Returns (n, 8, 8)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, 8, generator=g).to(device)
    with torch.no_grad():
        for i, t in enumerate(ts.tolist()):
            a, a_prev = ab[t], (ab[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device))
            eps = model(x, torch.full((n,), t, device=device))
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # DDIM, eta = 0 (Song et al. eq. 12)
    return x


def bench_sampling(ctx: BenchContext) -> list[BenchEntry]:
    """Images per second of DDIM sampling of a (freshly initialised) MLP through diffmem's denoiser
    contract and sampler, against a minimal VP DDIM loop calling the network directly, timed in turn."""
    config = _train_config("train_mlp_digits", ctx.size, None)
    model = build_model(config, (8, 8), ctx.device).eval()
    sched = VPSchedule()
    n, steps = (1024, 50) if ctx.size == "full" else (64, 10)
    den = VPNetworkDenoiser(model, sched, timestep="continuous")
    ts = sched.timesteps(steps)
    ab = sched.alpha_bar.float().to(ctx.device)
    t = ctx.interleave(
        {
            "loop": ctx.clock(lambda: _reference_ddim(model, ab, ts, n, ctx.device)),
            "ours": ctx.clock(
                lambda: sample_denoiser(den, sched, n, (8, 8), steps=steps, batch_size=n, device=str(ctx.device))
            ),
        }
    )
    return [
        BenchEntry.timed(
            "sample_mlp_digits_images_per_s",
            "images/s",
            [n / s for s in t["ours"]],
            [n / s for s in t["loop"]],
            "minimal VP DDIM loop",
            Goal(">=", 0.9),
            ctx.size,
            f"{n} images, {steps} DDIM steps, per-sample seeds",
        )
    ]
