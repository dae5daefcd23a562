"""Randomness is passed in, never global: a torch.Generator, or one generator per sample."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

GeneratorLike = torch.Generator | Sequence[torch.Generator]


def randn(shape: Sequence[int], generator: GeneratorLike | None, like: Tensor) -> Tensor:
    """Standard normal noise of `shape` in like's dtype and device.

    generator: one torch.Generator for the whole batch, or a sequence with one generator per
    sample along the first dimension, so that a sample is identified by its own seed whatever
    batch it is drawn in. None is an error: diffmem draws no global randomness.
    """
    if generator is None:
        raise ValueError("this operation draws noise: pass a torch.Generator (or one per sample)")
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, dtype=like.dtype, device=generator.device).to(like.device)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}; pass one per sample")
    return torch.stack(
        [torch.randn(tuple(shape[1:]), generator=g, dtype=like.dtype, device=g.device) for g in gens]
    ).to(like.device)


def seeded_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per seed, on the given device (no default: the caller chooses)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
