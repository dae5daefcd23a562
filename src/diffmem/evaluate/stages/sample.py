"""Stage 'sample': N samples of the trained denoiser, each identified by its seed (samples.npz)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffmem.evaluate.run import RunContext
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.io.files import write_npz_atomic
from diffmem.models.sampling import SamplingConfig, sample_denoiser


def run(ctx: RunContext, c: SamplingConfig) -> list[Path]:
    samples, seeds = sample_denoiser(
        ctx.denoiser,
        ctx.schedule,
        c.n_samples,
        ctx.event_shape,
        sampler=c.sampler,
        steps=c.steps,
        eta=c.eta,
        seed=c.seed,
        batch_size=c.batch_size,
        device=ctx.device,
    )
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("the model produced NaN or Inf samples; the run cannot be analysed")
    write_npz_atomic(ctx.out / "samples.npz", samples=samples.numpy(), seeds=np.asarray(seeds, dtype=np.int64))
    return [ctx.out / "samples.npz"]


STAGE = Stage("sample", "Samples", SamplingConfig, run, (TRAIN,), result=None)
