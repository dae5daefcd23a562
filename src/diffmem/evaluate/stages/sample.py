"""Stage 'sample': N samples of the trained denoiser, each identified by its seed (samples.npz)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffmem.evaluate.run import RunContext
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.models.sampling import SamplingConfig, sample_with, save_samples


def run(ctx: RunContext, c: SamplingConfig) -> list[Path]:
    samples, seeds = sample_with(
        ctx.denoiser, ctx.schedule, ctx.event_shape, c, device=ctx.device, data_range=ctx.data_range
    )
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("the model produced NaN or Inf samples; the run cannot be analysed")
    save_samples(ctx.out / "samples.npz", samples, seeds)
    return [ctx.out / "samples.npz"]


STAGE = Stage("sample", "Samples", SamplingConfig, run, (TRAIN,), result=None)
