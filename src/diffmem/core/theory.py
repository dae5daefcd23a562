"""Closed forms the census and the tests are checked against (SCIENCE.md §3), and the speciation
level of Biroli et al. (2024) that the collapse figure is read against."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffmem.core._checks import check_finite_float, check_patterns, check_positive_int
from diffmem.core.lanczos import lanczos_eigenvalues
from diffmem.core.noise import alpha_bar_to_sigma
from diffmem.core.random import randn


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


def covariance_top_eigenvalue(data: Tensor, *, exact_up_to: int = 4096, n_iter: int = 100) -> float:
    """Lambda, the largest eigenvalue of the covariance of the points data (N, D), in float64.

    The covariance is that of the empirical distribution, (1/N) sum_i (x_i - m)(x_i - m)^T: the
    distribution the training loss targets (for N = 1 it is 0). The top eigenvalue equals that of
    the smaller Gram matrix (Xc^T Xc or Xc Xc^T, divided by N), solved exactly by eigvalsh when
    min(N, D) <= exact_up_to; beyond, n_iter Lanczos steps on v -> Xc^T (Xc v) / N from a start
    vector drawn with a fixed seed (deterministic), with no D x D matrix formed."""
    check_patterns(data, "data")
    exact_up_to = check_positive_int(exact_up_to, "exact_up_to")
    n_iter = check_positive_int(n_iter, "n_iter")
    x = data.double()
    xc = x - x.mean(dim=0)  # (N, D)
    n, d = xc.shape
    if min(n, d) <= exact_up_to:
        gram = xc.T @ xc if d <= n else xc @ xc.T  # (min(N, D), min(N, D)), same non-zero spectrum
        return max(0.0, float(torch.linalg.eigvalsh(gram / n)[-1]))
    start = randn((1, d), torch.Generator().manual_seed(0), xc)  # CPU: the same start on any device
    ritz = lanczos_eigenvalues(lambda v: (v @ xc.T) @ xc / n, start, n_iter)  # (1, m) ascending
    return max(0.0, float(ritz[0, -1]))


def speciation_sigma(data: Tensor) -> float | None:
    """The VE noise level sigma_S at which the backward dynamics splits the data into classes
    (speciation), from the top covariance eigenvalue Lambda of data (N, D); None when Lambda <= 1.
    See speciation_level for the formula and its source."""
    return speciation_level(covariance_top_eigenvalue(data))


def speciation_level(top_eigenvalue: float) -> float | None:
    """sigma_S = sqrt(Lambda - 1) for the top data-covariance eigenvalue Lambda; None when Lambda <= 1.

    Biroli, Bonnaire, de Bortoli & Mezard, "Dynamical regimes of diffusion models" (Nat. Commun. 15,
    9957, 2024; arXiv:2402.18491) run the forward Ornstein-Uhlenbeck process
    x_t = x_0 e^{-t} + sqrt(1 - e^{-2t}) z and find speciation at t_S = (1/2) log Lambda. That is the
    VP process with alpha_bar = e^{-2t} (SCIENCE.md §2), so sigma^2 = (1 - alpha_bar) / alpha_bar
    = e^{2t} - 1 and sigma_S = sqrt(e^{2 t_S} - 1) = sqrt(Lambda - 1) (alpha_bar_S = 1 / Lambda).

    Lambda <= 1 gives t_S <= 0: the top direction of the data is no wider than the unit noise of the
    OU stationary state, and the formula places no split at any positive noise level, hence None.
    The formula is the paper's large-D asymptotic (Lambda of order D); for Lambda of order 1 the
    "- 1" is an O(1) correction and sigma_S is an order-of-magnitude guide, not a sharp threshold.
    It is not scale-free: Lambda is in the units of the data (diffmem's images lie in [-1, 1])."""
    lam = check_finite_float(top_eigenvalue, "top_eigenvalue", low=0.0)
    if lam <= 1.0:
        return None
    return float(alpha_bar_to_sigma(torch.tensor(1.0 / lam, dtype=torch.float64)))
