"""Sampling trained runs: seeded per sample, saved as npz (no pickle) plus a PNG grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffmem.core import SAMPLERS, ClippedDenoiser, get_sampler, initial_noise, knn, seeded_generators
from diffmem.io.config import AT_LEAST_1, MAX_SEED, UNIT, Section, choice, error, in_range
from diffmem.io.files import write_npz_atomic

CLIPS = ("data_range", "none")  # DDPM's clip_sample: on by default, as in DDPM and diffusers


@dataclass(frozen=True)
class SamplingConfig(Section):
    """Seeded samples of a trained denoiser: sampler, noise grid and N (SCIENCE.md §4)."""

    _key = "sampling"
    sampler: str = "ddim"  # a sampler of diffmem.core.SAMPLERS
    steps: int = 50  # noise levels of the sampling grid
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM ancestral (ddim only)
    n_samples: int = 512  # N per job; a spurious basin is seen once it receives two samples
    batch_size: int = 1024  # samples per denoiser call (does not change the samples)
    seed: int = 0  # sample i starts from the noise of seed * 1_000_003 + i
    clip: str = "data_range"  # 'data_range': the predicted clean sample is clamped to the data's range; 'none'

    _bounds = {"steps": AT_LEAST_1, "eta": UNIT, "batch_size": AT_LEAST_1}

    def _check(self) -> None:
        choice(self._at("sampler"), self.sampler, tuple(SAMPLERS))
        choice(self._at("clip"), self.clip, CLIPS)
        if self.eta and self.sampler != "ddim":
            raise error(self._at("eta"), "only the ddim sampler takes eta; set eta: 0 or sampler: ddim")
        if self.n_samples < 2:
            raise error(self._at("n_samples"), f"the spurious test compares samples: need >= 2, got {self.n_samples}")
        # sample i uses seed * 1_000_003 + i, which must stay a 64-bit seed
        in_range(self._at("seed"), self.seed, low=0, high=(MAX_SEED - self.n_samples) // 1_000_003)


def sample_denoiser(
    denoiser,
    schedule,
    n: int,
    event_shape: tuple[int, ...],
    *,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 1024,
    device: str = "cpu",
    spacing: str = "leading",
    steps_offset: int = 0,
    progress: bool = False,
) -> tuple[Tensor, list[int]]:
    """n samples (n, D) of any denoiser; sample i uses seed `seed * 1_000_003 + i`, whatever the batch.

    spacing and steps_offset place a VP schedule's timesteps as diffusers' set_timesteps does (a
    pretrained model samples on its own scheduler's grid); progress shows a bar over the batches."""
    if n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    fn = get_sampler(sampler)
    # a VE schedule has no timesteps: only a VP schedule takes spacing and steps_offset
    grid = (steps,) if (spacing, steps_offset) == ("leading", 0) else (steps, spacing, steps_offset)
    sigmas = schedule.sampling_sigmas(*grid)
    seeds = [seed * 1_000_003 + i for i in range(n)]
    like = torch.zeros(0, device=device)
    kw = {"eta": eta} if sampler == "ddim" else {}
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="sampling", unit="batch", disable=not progress):
            chunk = seeds[start : start + batch_size]
            gens = seeded_generators(chunk, "cpu")
            x = initial_noise((len(chunk), *event_shape), float(sigmas[0]), generator=gens, like=like.cpu()).to(device)
            out.append(fn(denoiser, x, sigmas, generator=gens, **kw).reshape(len(chunk), -1).cpu())
    return torch.cat(out), seeds


def sampling_denoiser(denoiser, config: SamplingConfig, data_range: tuple[float, float] | None):
    """The denoiser the samplers of `config` call: clipped to data_range unless config.clip is 'none'."""
    if config.clip == "none":
        return denoiser
    if data_range is None:
        raise ValueError("sampling.clip 'data_range' needs the data's range; pass data_range or set clip: none")
    return ClippedDenoiser(denoiser, *data_range)


def sample_with(
    denoiser,
    schedule,
    event_shape: tuple[int, ...],
    config: SamplingConfig,
    *,
    n: int | None = None,
    device="cpu",
    data_range: tuple[float, float] | None = None,
) -> tuple[Tensor, list[int]]:
    """sample_denoiser with the settings of a SamplingConfig section (clipping to data_range
    included); n overrides its n_samples."""
    return sample_denoiser(
        sampling_denoiser(denoiser, config, data_range),
        schedule,
        config.n_samples if n is None else n,
        event_shape,
        sampler=config.sampler,
        steps=config.steps,
        eta=config.eta,
        seed=config.seed,
        batch_size=config.batch_size,
        device=device,
    )


def save_samples(path: str | Path, samples: Tensor, seeds: list[int], **meta) -> None:
    """samples.npz: samples (N, D), their seeds, and any further per-sample arrays in meta."""
    write_npz_atomic(path, samples=samples.numpy(), seeds=np.asarray(seeds, dtype=np.int64), **meta)


def nearest_distance(x: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Normalized L2 distance ||x - r|| / sqrt(D) from each x (N, D) or (N, *event) to its nearest ref, and
    its index; D is the whole example's size (C H W for images)."""
    nb = knn(x.double(), ref.double(), 1)  # exact and chunked: never the full (N, M) distance matrix
    return nb.distances[:, 0] / math.sqrt(math.prod(x.shape[1:])), nb.indices[:, 0]  # D = C H W for images
