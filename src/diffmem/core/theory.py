"""Closed forms the census and the tests are checked against (SCIENCE.md §3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffmem.core._checks import check_finite_float


def two_pattern_critical_beta(d: float) -> float:
    """Two patterns at distance d: the midpoint is the unique minimum iff beta < 4 / d^2 (d < 2 sigma)."""
    d = check_finite_float(d, "d")
    if d <= 0:
        raise ValueError(f"the distance between the two patterns must be > 0, got {d}")
    return 4.0 / d**2


def bessel_ratio(z: Tensor) -> Tensor:
    """I1(z) / I0(z), computed with exponentially scaled Bessel functions (no overflow)."""
    return torch.special.i1e(z) / torch.special.i0e(z)


def log_i0(z: Tensor) -> Tensor:
    """log I0(z) without overflow: log(i0e(z)) + |z|."""
    return torch.log(torch.special.i0e(z)) + z.abs()


def circle_ring_radius(beta: float, *, tol: float = 1e-14) -> float:
    """Radius r* of the ring of minima for patterns uniform on the unit circle (K -> infinity).

    Solves r = I1(beta r) / I0(beta r) by bisection; 0 when beta <= 2 (a single minimum at the
    centre), and r* -> 1 - 1 / (2 beta) for large beta.
    """
    beta = check_finite_float(beta, "beta")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if beta <= 2:
        return 0.0

    def g(r: float) -> float:
        return float(bessel_ratio(torch.tensor(beta * r, dtype=torch.float64))) - r

    lo, hi = 1e-12, 1.0  # g(lo) > 0 (slope beta/2 - 1 at 0), g(1) < 0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if g(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def circle_neg_log_prob(x: Tensor, sigma: float) -> Tensor:
    """-log p_sigma(x) for patterns uniform on the unit circle, x of shape (..., 2):
    (r^2 + 1) / (2 sigma^2) - log I0(r / sigma^2) + log(2 pi sigma^2), r = ||x||."""
    sigma = check_finite_float(sigma, "sigma")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = x.norm(dim=-1)
    return (r**2 + 1) / (2 * sigma**2) - log_i0(r / sigma**2) + math.log(2 * math.pi * sigma**2)
