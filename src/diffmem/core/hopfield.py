"""The classical binary Hopfield network: the historical reference (SCIENCE.md §3).

N spins s in {-1, +1}, P random patterns, Hebbian weights W = (1/N) sum_mu xi_mu xi_mu^T with zero
diagonal, energy E(s) = -(1/2) s^T W s. Zero-temperature asynchronous dynamics: a spin flips when
it disagrees with its local field h = W s. Batched over independent networks; the loop runs over
flips (the most unstable spin of every network flips at once), never over spins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem.core._checks import check_positive_int


def random_patterns(n_nets: int, p: int, n: int, *, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    """(n_nets, P, N) independent +-1 patterns."""
    for v, name in ((n_nets, "n_nets"), (p, "P"), (n, "N")):
        check_positive_int(v, name)
    bits = torch.randint(0, 2, (n_nets, p, n), generator=generator, device=generator.device)
    return (2 * bits - 1).to(dtype)


def hebbian_weights(patterns: Tensor) -> Tensor:
    """W = (1/N) sum_mu xi_mu xi_mu^T with zero diagonal; patterns (..., P, N) -> (..., N, N)."""
    n = patterns.shape[-1]
    w = patterns.transpose(-1, -2) @ patterns / n
    return w - torch.diag_embed(torch.diagonal(w, dim1=-2, dim2=-1))


def energy(w: Tensor, s: Tensor) -> Tensor:
    """E(s) = -(1/2) s^T W s for states s (..., N) and weights (..., N, N); shape (...)."""
    return -0.5 * (s * (w @ s[..., None])[..., 0]).sum(-1)


@dataclass(frozen=True)
class HopfieldResult:
    s: Tensor  # (B, N) final states
    n_flips: Tensor  # (B,) spins flipped
    converged: Tensor  # (B,) True when no spin disagrees with its field (a fixed point)


def run(w: Tensor, s: Tensor, *, max_flips: int | None = None) -> HopfieldResult:
    """Zero-temperature asynchronous dynamics from s (B, N) with weights w (B, N, N).

    Greedy sequential order: each step flips, in every network, the spin whose alignment s_i h_i is
    most negative. Every flip lowers E by 2 |h_i| > 0, so the dynamics ends at a fixed point
    (s_i h_i >= 0 for all i); ties h_i = 0 are left as they are.
    """
    if w.ndim != 3 or s.ndim != 2 or w.shape[0] != s.shape[0] or w.shape[1:] != (s.shape[1], s.shape[1]):
        raise ValueError(f"need w (B, N, N) and s (B, N); got {tuple(w.shape)} and {tuple(s.shape)}")
    b, n = s.shape
    max_flips = 10 * n if max_flips is None else check_positive_int(max_flips, "max_flips")
    s = s.clone()
    h = (w @ s[..., None])[..., 0]  # (B, N) local fields
    flips = torch.zeros(b, dtype=torch.int64, device=s.device)
    rows = torch.arange(b, device=s.device)
    for _ in range(max_flips):
        align = s * h
        worst, i = align.min(dim=1)
        active = worst < 0
        if not bool(active.any()):
            break
        r, i = rows[active], i[active]
        s_old = s[r, i]
        s[r, i] = -s_old
        h[r] -= 2 * s_old[:, None] * w[r, :, i]  # h <- h + W[:, i] (s_new - s_old)
        flips[r] += 1
    converged = (s * h >= 0).all(dim=1)
    return HopfieldResult(s=s, n_flips=flips, converged=converged)


def overlap(a: Tensor, b: Tensor) -> Tensor:
    """m = (1/N) a . b for +-1 states, shape (...)."""
    return (a * b).sum(-1) / a.shape[-1]


def mixture_state(patterns: Tensor) -> Tensor:
    """Symmetric mixture sign(xi_1 + xi_2 + xi_3) of the first three patterns of (B, P, N) -> (B, N)."""
    if patterns.shape[-2] < 3:
        raise ValueError("a symmetric three-pattern mixture needs P >= 3")
    return torch.sign(patterns[..., :3, :].sum(-2))
