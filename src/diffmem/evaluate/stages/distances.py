"""Stage 'distances': m (nearest training example), m2 (second nearest) and s (nearest other sample)
of every sample in the study's metric, with the neighbours' indices (distances.npz; SCIENCE.md §5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffmem.evaluate.classify import sample_distances
from diffmem.evaluate.metrics import MetricConfig
from diffmem.evaluate.run import RunContext
from diffmem.evaluate.stages.base import Stage
from diffmem.io.files import write_npz_atomic


def run(ctx: RunContext, c: MetricConfig) -> list[Path]:
    samples, _ = ctx.samples()
    d = sample_distances(samples, ctx.train_x, ctx.metric)
    write_npz_atomic(
        ctx.out / "distances.npz",
        m=d.m.numpy(),
        m2=d.m2.numpy(),
        s=d.s.numpy(),
        train_index=d.train_index.numpy(),
        gen_index=d.gen_index.numpy(),
        metric=np.asarray(d.metric),
    )
    return [ctx.out / "distances.npz"]


STAGE = Stage("distances", "Distances", MetricConfig, run, ("sample",), result=None)
