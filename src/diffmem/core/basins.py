"""Basins of attraction and critical times of a denoiser (SCIENCE.md §6, "Basin / critical time").

Recovery test at noise level sigma (VE convention): noise a point, x_sigma = x + sigma * eps, denoise
it back to sigma = 0 with DDIM over `steps` levels, and call it recovered if distance(result, x) <= delta.

The estimand. p(sigma) = P(recovered at sigma) is the recovery probability of point x, assumed to
decrease in sigma; the critical level sigma*(x) is where it crosses p*: the largest sigma with
p(sigma) >= p*. On two patterns at +-a with the exact denoiser p(sigma) = Phi(a / sigma), so
sigma* = a / Phi^-1(p*) (0.780 a at p* = 0.9).

The estimate, in four steps:

1. Search. Bisection in log sigma on a geometric grid (neighbours <= 1 + rtol apart) for the level
   where n_trials trials with common noise stop reaching p* recovered (lo, hi). This only locates the
   transition: "at least 9 of 10" is an order statistic of the trial noise and biased upward.
2. Edge check. A point the search calls 'no_basin' (fails at sigma_min) or 'censored' (holds at
   sigma_max) gets one round of fresh trials (design_levels x design_trials) at that edge; if their
   fraction recovered contradicts the search, the point is fitted like the others.
3. Design. design_rounds rounds of design_levels levels, design_trials fresh trials each, spread over
   z* +- design_width in z = Phi^-1(p) around the current fit's sigma* (within a factor e). Fresh noise
   per level makes the levels independent binomial draws; common noise would re-read the same trials.
4. Fit. A probit curve p(sigma) = Phi(b0 + b1 t(sigma)), b1 < 0, fitted by maximum likelihood (Newton,
   float64, all points at once) to every trial at every probed level: a design trial counts as
   recovered (or failed) at its level; a search trial, probed at several levels with the same noise,
   counts as the bracket between its largest recovering and smallest failing level (interval
   censoring), coarsened to the window of the design (the probit is a local model). The link t is
   'inverse' (t = -1 / sigma: p = Phi(b0 + c / sigma), the margin model, exact for two patterns) or
   'log' (t = log sigma). sigma_c solves z(sigma_c) = z* = Phi^-1(p*); its interval at confidence
   `interval` (0.9 by default) is the profile-likelihood interval: the sigma* whose best curve through
   (sigma*, p*) loses less than chi^2_1(interval) / 2 in log-likelihood. When a level splits recovered
   from failed trials (a step sharper than the probes resolve) the likelihood has no maximum; then
   sigma_c is the middle (in log) of that gap and the interval is the gap (fit = 'separated').

Measured on two patterns (tests/test_basins.py, 10 x 400 points): median relative bias -0.7 % to
+2.1 %, 90 % intervals covering sigma* in 86-90 % of points (slightly under nominal: the profile
interval's small-sample error), at about 8,800 denoiser rows per point (search about 2,400, design
2 x 5 x 32 trials x 20 steps = 6,400).

Glossary:

    x        the point under test (a training example or a generated sample), shape (*event)
    eps      a trial's noise; the search's trials draw it once per (point, trial) and reuse it at every
             level (common random numbers: recovery is then close to monotone in sigma, and exactly so
             for the two-pattern memory, where it is the event a + sigma * eps_1 > 0)
    p_hat    recovered search trials / n_trials at one level, with its 95% Wilson score interval
    z        Phi^-1(p): the probit scale, on which the fitted curve is a line in t(sigma)
    slope    dz / dlog sigma of the fit at sigma_c (< 0): the steepness of the transition
    sigma_c  the estimate of sigma*; sigma_c_low, sigma_c_high its interval
    radius   ||x_sigma - x|| = sigma_c ||eps||, averaged over the search trials: how far the basin reaches

Points that stay 'no_basin' or 'censored' get no fit (fit = 'none'), only the one-sided bound of the
search: sigma* in (0, sigma_min) or (sigma_max, inf). Those bounds rest on the edge check's fraction
recovered against p*, not on a confidence statement.

Every probe evaluates all its points and trials in one denoiser batch (or in chunks of batch_size
rows); each point may sit at its own level, so the DDIM loop below takes a noise grid per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffmem.core._checks import check_finite_float, check_positive_int
from diffmem.core.denoisers import Denoiser
from diffmem.core.random import randn

STATUSES = ("bracketed", "no_basin", "censored")
GRID_STARTS = ("sigma", "grid")
WILSON_Z = 1.959963984540054  # standard normal quantile of 0.975: a two-sided 95% interval

SigmaGrid = Callable[[float, int], Tensor]
Distance = Callable[[Tensor, Tensor], Tensor]


def normalized_l2(y: Tensor, x: Tensor) -> Tensor:
    """Pixel L2 distance normalized by sqrt(D) (SCIENCE.md §5): ||y - x|| / sqrt(D), shape (B,)."""
    diff = (y - x).reshape(y.shape[0], -1)  # (B, D)
    return torch.linalg.vector_norm(diff, dim=1) / math.sqrt(diff.shape[1])


def wilson_interval(k: Tensor, n: int, z: float = WILSON_Z) -> tuple[Tensor, Tensor]:
    """Wilson score interval of a binomial proportion with k successes out of n trials (float64).

    center = (p + z^2 / 2n) / (1 + z^2 / n), half width = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).
    Unlike the normal approximation it stays inside [0, 1] and is not empty at p_hat = 0 or 1.
    """
    n = check_positive_int(n, "n")
    p = torch.as_tensor(k, dtype=torch.float64) / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * torch.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # the bounds at k = 0 and k = n are exactly 0 and 1; say so rather than leave a rounding error
    low = torch.where(p == 0, torch.zeros_like(p), (center - half).clamp(min=0.0))
    high = torch.where(p == 1, torch.ones_like(p), (center + half).clamp(max=1.0))
    return low, high


# ---------------------------------------------------------------------------------------------
# Denoising grids: sigma_grid(sigma, steps) -> decreasing levels from (about) sigma to 0
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KarrasGrid:
    """`steps` levels from sigma down to a small floor, spaced as in Karras et al. (2022, eq. 5), then 0.

    sigma_i = (sigma^(1/rho) + i / (steps - 1) (floor^(1/rho) - sigma^(1/rho)))^rho; the floor is
    sigma_floor, or sigma / 10 when sigma is below 10 sigma_floor, so that the grid always decreases.
    """

    sigma_floor: float = 0.002  # last non-zero level (EDM's sigma_min)
    rho: float = 7.0  # rho = 7 concentrates steps at small sigma (EDM); rho = 1 is linear spacing

    def __post_init__(self) -> None:
        if check_finite_float(self.sigma_floor, "sigma_floor") <= 0:
            raise ValueError(f"sigma_floor must be > 0, got {self.sigma_floor}")
        if check_finite_float(self.rho, "rho") <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")

    def __call__(self, sigma: float, steps: int) -> Tensor:
        steps = check_positive_int(steps, "steps")
        if check_finite_float(sigma, "sigma") <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        floor = min(self.sigma_floor, sigma / 10)
        frac = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
        inv = 1 / self.rho
        levels = (sigma**inv + frac * (floor**inv - sigma**inv)) ** self.rho  # (steps,)
        levels[0] = sigma  # exact start, free of the power's rounding
        return torch.cat([levels, levels.new_zeros(1)])


class TruncatedGrid:
    """A model's own noise levels truncated at sigma: up to `steps` levels of the table, then 0.

    sigmas: the levels the model knows, any order (e.g. VPSchedule().sigmas or sampling_sigmas(n)).
    start: 'sigma' starts at sigma itself and continues with table levels below it (for denoisers
    that accept any level, e.g. timestep='continuous'); 'grid' starts at the largest table level
    <= sigma, which is then the level the point is noised to (for timestep='nearest' networks).
    Below the start the table is subsampled evenly by index, always keeping its smallest level.
    """

    def __init__(self, sigmas: Tensor, *, start: str = "sigma"):
        if start not in GRID_STARTS:
            raise ValueError(f"unknown grid start {start!r}; choose one of {GRID_STARTS}")
        table = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
        if not bool(torch.isfinite(table).all()):
            raise ValueError("the noise-level table contains NaN or Inf")
        table = table[table > 0].unique().flip(0)  # (L,) strictly decreasing
        if table.numel() == 0:
            raise ValueError("the noise-level table has no level > 0")
        self.table = table
        self.start = start

    def __call__(self, sigma: float, steps: int) -> Tensor:
        steps = check_positive_int(steps, "steps")
        if check_finite_float(sigma, "sigma") <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if self.start == "sigma":
            first = torch.tensor([sigma], dtype=torch.float64)
            below = self.table[self.table < sigma]
        else:
            at_or_below = self.table[self.table <= sigma * (1 + 1e-12)]
            if at_or_below.numel() == 0:
                raise ValueError(
                    f"sigma={sigma:.6g} is below the table's smallest level {float(self.table[-1]):.6g}; "
                    "raise sigma_min or use start='sigma'"
                )
            first, below = at_or_below[:1], at_or_below[1:]
        if steps > 1 and below.numel() > steps - 1:
            idx = torch.linspace(0, below.numel() - 1, steps - 1, dtype=torch.float64).round().long()
            below = below[idx]
        elif steps == 1:
            below = below[:0]
        return torch.cat([first, below, below.new_zeros(1)])


def _check_grid(grid: Tensor, sigma: float) -> Tensor:
    if not isinstance(grid, Tensor) or grid.ndim != 1 or grid.numel() < 2:
        got = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"sigma_grid({sigma:.6g}, steps) must return a 1-D tensor of >= 2 levels, got {got}")
    grid = grid.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(grid).all()):
        raise ValueError(f"sigma_grid({sigma:.6g}, steps) returned NaN or Inf levels")
    if not (bool((grid[1:] < grid[:-1]).all()) and float(grid[-1]) == 0.0 and float(grid[-2]) > 0):
        raise ValueError(
            f"sigma_grid({sigma:.6g}, steps) must be strictly decreasing and end with a single 0, got {grid.tolist()}"
        )
    return grid


# ---------------------------------------------------------------------------------------------
# The probit fit of the recovery curve: interval-censored trials, maximum likelihood, profile interval
# ---------------------------------------------------------------------------------------------
#
# Each observation brackets one trial's own critical level s: s in (lo, hi), with probability
# P(lo < s < hi) = p(lo) - p(hi), p(sigma) = Phi(z(sigma)), z = b0 + b1 t(sigma), b1 < 0, t increasing
# in sigma (LINKS). A trial recovered at sigma is (sigma, inf): probability p(sigma); one that failed
# is (0, sigma): 1 - p(sigma); a trial probed at several levels with the same noise is the bracket
# between its largest recovering and smallest failing level. hi = inf includes trials that never fail
# (p(inf) = Phi(b0) > 0 under the 'inverse' link). Per point the data are (N, M) tensors t_lo, t_hi
# of t at the bracket's ends (-inf for lo = 0, +inf for hi = inf) and a weight w (a count; 0 pads).

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
# t(sigma) of each link, increasing in sigma, as a function of log sigma:
#   'inverse'  t = -1 / sigma: z = b0 + |b1| / sigma, the margin model. Recovery is a Gaussian noise
#              projection beating a margin, P(margin > sigma eps) = Phi(margin / sigma): exact for two
#              patterns (b0 = 0, |b1| = a), and p(inf) = Phi(b0) is the basin's share of pure noise.
#   'log'      t = log sigma: z = b0 + b1 log sigma, a log-normal law of the trials' critical levels.
LINKS = ("inverse", "log")


def _to_t(log_sigma: Tensor, link: str) -> Tensor:
    """t(sigma) from log sigma; the sentinels -inf (sigma = 0) and +inf (sigma = inf) stay as they are."""
    t = log_sigma if link == "log" else -torch.exp(-log_sigma)
    return torch.where(torch.isinf(log_sigma), log_sigma, t)


def _from_t(t: Tensor, link: str) -> Tensor:
    """log sigma from t (the inverse of _to_t): +inf for t >= 0 under 'inverse' (the curve never gets there)."""
    if link == "log":
        return t
    return torch.where(t < 0, -torch.log(-t.clamp(max=-1e-300)), math.inf)


@dataclass(frozen=True, eq=False)
class ProbitFit:
    """Maximum-likelihood probit fits of N recovery curves, p(sigma) = Phi(b0 + b1 log sigma)."""

    b0: Tensor  # (N,) float64
    b1: Tensor  # (N,) float64, < 0 (the constraint: recovery decreases with sigma); z = b0 + b1 t
    loglik: Tensor  # (N,) the log-likelihood at (b0, b1)
    converged: Tensor  # (N,) bool: the Newton decrement fell below tolerance
    separated: Tensor  # (N,) bool: a level splits recovered from failed trials; no finite maximum

    def level(self, p: float) -> Tensor:
        """(N,) t at which the fitted curve crosses p: (Phi^-1(p) - b0) / b1."""
        return (_probit(p) - self.b0) / self.b1


def _probit(p: float) -> float:
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def _log_phi_diff(za: Tensor, zb: Tensor) -> Tensor:
    """log(Phi(za) - Phi(zb)) for za > zb without cancellation: in the upper tail as
    Phi(-zb) - Phi(-za), then log Phi(a) + log1p(-Phi(b) / Phi(a))."""
    flip = zb > 0
    a, b = torch.where(flip, -zb, za), torch.where(flip, -za, zb)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return la + torch.log1p(-_exp(lb - la))


def _zs(c: Tensor, b1: Tensor, t_lo: Tensor, t_hi: Tensor) -> tuple[Tensor, Tensor]:
    """z at both ends, (N, M): c + b1 t (c, b1 (N, 1)), +inf at lo = 0 and -inf at hi = inf."""
    za = torch.where(torch.isfinite(t_lo), c + b1 * _finite(t_lo), math.inf)
    zb = torch.where(torch.isfinite(t_hi), c + b1 * _finite(t_hi), -math.inf)
    return za, zb


def _terms(za: Tensor, zb: Tensor, w: Tensor) -> tuple[Tensor, ...]:
    """The log-likelihood (N,) and the derivatives of each term w log(Phi(za) - Phi(zb)) in za, zb (N, M):
    da, db, daa, dbb, dab (0 where w = 0 or the bound is infinite)."""
    used = w > 0
    logd = torch.where(used, _log_phi_diff(za, zb), 0.0)
    ll = (w * logd).sum(-1)
    ga = torch.where(used & torch.isfinite(za), _exp(-0.5 * za * za - LOG_SQRT_2PI - logd), 0.0)  # phi(za) / D
    gb = torch.where(used & torch.isfinite(zb), _exp(-0.5 * zb * zb - LOG_SQRT_2PI - logd), 0.0)
    za0, zb0 = _finite(za), _finite(zb)
    return ll, w * ga, -w * gb, w * (-za0 * ga - ga * ga), w * (zb0 * gb - gb * gb), w * ga * gb


def _exp(t: Tensor) -> Tensor:
    """exp(t) with t clamped to >= -700 (exp = 1e-304): subnormal results make exp slow by 10x and more."""
    return torch.exp(t.clamp(min=-700.0))


def _finite(t: Tensor) -> Tensor:
    return torch.where(torch.isfinite(t), t, 0.0)


def _separated(t_lo: Tensor, t_hi: Tensor, w: Tensor) -> Tensor:
    """(N,) bool: the largest level at which a trial recovered lies below the smallest at which one
    failed, so a step between them explains every trial and the likelihood has no maximum."""
    used = w > 0
    top_ok = torch.where(used & torch.isfinite(t_lo), t_lo, -math.inf).amax(-1)
    low_fail = torch.where(used & torch.isfinite(t_hi), t_hi, math.inf).amin(-1)
    return top_ok < low_fail


def _newton(loglik_derivs, params: Tensor, feasible, *, max_iter: int = 100, tol: float = 1e-10):
    """Maximize N concave functions of P parameters each by Newton's method with step halving.
    loglik_derivs(params (N, P)) -> (ll (N,), grad (N, P), hess (N, P, P)); feasible(params) -> (N,) bool.
    Returns the maximizers (N, P), their ll (N,) and a converged flag (N,)."""
    n = params.shape[0]
    ll, g, h = loglik_derivs(params)
    converged = torch.zeros(n, dtype=torch.bool)
    eye = torch.eye(params.shape[1], dtype=torch.float64)
    for _ in range(max_iter):
        # -H^-1 g; a tiny ridge keeps a flat direction solvable, the halving below keeps ascent
        step = torch.linalg.solve(-h - 1e-12 * eye, g.unsqueeze(-1)).squeeze(-1)  # (N, P)
        step = torch.where(torch.isfinite(step), step, 0.0)
        decrement = (g * step).sum(-1)  # Newton decrement^2: the predicted gain is half of it
        converged = converged | (decrement.abs() < tol * (1 + ll.abs()))
        if bool(converged.all()):
            break
        scale = torch.where(converged, 0.0, 1.0).to(torch.float64)
        accepted = converged.clone()
        new = params.clone()
        for _ in range(40):
            cand = params + scale[:, None] * step
            ok = ~accepted & feasible(cand)
            cll = torch.where(ok, loglik_derivs(torch.where(ok[:, None], cand, params))[0], -math.inf)
            ok = ok & (cll >= ll - 1e-12)
            new = torch.where(ok[:, None], cand, new)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            scale = torch.where(accepted, scale, scale / 2)
        converged = converged | ~accepted  # no ascent left at machine precision
        params = new
        ll, g, h = loglik_derivs(params)
    return params, ll, converged


def fit_probit(t_lo: Tensor, t_hi: Tensor, w: Tensor, *, start: Tensor) -> ProbitFit:
    """Probit fits of N sets of interval-censored trials (N, M), each from z = 2 (start - t).
    The log-likelihood is concave in (b0, b1) (the interval probability of a log-concave law is
    log-concave in its end points), so Newton's method with step halving finds the maximum."""
    la, lb = _finite(t_lo), _finite(t_hi)

    def derivs(theta: Tensor):
        b0, b1 = theta[:, :1], theta[:, 1:]
        ll, da, db, daa, dbb, dab = _terms(*_zs(b0, b1, t_lo, t_hi), w)
        g = torch.stack([(da + db).sum(-1), (da * la + db * lb).sum(-1)], -1)  # (N, 2)
        h00 = (daa + dbb + 2 * dab).sum(-1)
        h01 = (daa * la + dbb * lb + dab * (la + lb)).sum(-1)
        h11 = (daa * la * la + dbb * lb * lb + 2 * dab * la * lb).sum(-1)
        h = torch.stack([torch.stack([h00, h01], -1), torch.stack([h01, h11], -1)], -2)  # (N, 2, 2)
        return ll, g, h

    theta = torch.stack([2.0 * start, torch.full_like(start, -2.0)], -1)
    theta, ll, converged = _newton(derivs, theta, lambda t: t[:, 1] < 0)
    return ProbitFit(theta[:, 0], theta[:, 1], ll, converged, _separated(t_lo, t_hi, w))


def _profile(u: Tensor, b1: Tensor, z_star: float, t_lo: Tensor, t_hi: Tensor, w: Tensor):
    """The profile log-likelihood of the level u = t(sigma*) (N,): the maximum over the slope b1 < 0
    of the curve through z(u) = z_star, z = z_star + b1 (t - u). Returns (ll, b1)."""
    xa, xb = _finite(t_lo - u[:, None]), _finite(t_hi - u[:, None])

    def derivs(slope: Tensor):
        s = slope[:, :1]
        ll, da, db, daa, dbb, dab = _terms(*_zs(z_star - s * u[:, None], s, t_lo, t_hi), w)
        g = (da * xa + db * xb).sum(-1, keepdim=True)
        h = (daa * xa * xa + dbb * xb * xb + 2 * dab * xa * xb).sum(-1)[:, None, None]
        return ll, g, h

    slope, ll, _ = _newton(derivs, b1[:, None], lambda t: t[:, 0] < 0, max_iter=50)
    return ll, slope[:, 0]


def profile_interval(
    fit: ProbitFit,
    p: float,
    level: float,
    t_lo: Tensor,
    t_hi: Tensor,
    w: Tensor,
    *,
    bounds: tuple[float, float],
    iters: int = 30,
) -> tuple[Tensor, Tensor]:
    """Profile-likelihood interval (Venzon & Moolgavkar 1988) of u* = t(sigma*) (N,) at confidence
    `level`: the u with 2 (ll_max - ll_profile(u)) <= chi^2_1(level), found by bisection on each side of
    the fit. bounds: (t_lo, t_hi), the range searched; where the profile stays below the threshold up
    to a bound, that side is open: -inf (sigma 0) or +inf (sigma inf)."""
    crit = _probit((1 + level) / 2) ** 2  # chi^2_1 quantile
    z_star = _probit(p)
    u_hat = fit.level(p)
    ends = []
    for side, edge in ((-1, bounds[0]), (1, bounds[1])):
        far = torch.full_like(u_hat, edge)
        far = torch.where(side * (far - u_hat) > 0, far, u_hat)  # a fit outside the range: open side
        ll_far, _ = _profile(far, fit.b1, z_star, t_lo, t_hi, w)
        open_side = 2 * (fit.loglik - ll_far) < crit
        near, b1 = u_hat.clone(), fit.b1.clone()
        for _ in range(iters):  # bisection between the fit (inside) and the bound (outside)
            mid = (near + far) / 2
            ll_mid, b1_mid = _profile(mid, b1, z_star, t_lo, t_hi, w)
            inside = 2 * (fit.loglik - ll_mid) < crit
            near, far = torch.where(inside, mid, near), torch.where(inside, far, mid)
            b1 = torch.where(inside, b1_mid, b1)
        bound = (near + far) / 2
        ends.append(torch.where(open_side, torch.full_like(bound, side * math.inf), bound))
    return ends[0], ends[1]


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriticalTime:
    """Critical level of one point: where its recovery probability crosses p, with an interval."""

    sigma_c: float  # the estimate of sigma* (probit fit, or the middle of a separating gap) within
    # [sigma_min, sigma_max]; 0 'no_basin', sigma_max 'censored'
    sigma_c_low: float  # interval for sigma* at confidence interval_level (profile likelihood of the fit);
    sigma_c_high: float  # one-sided (0, sigma_min) for 'no_basin', (sigma_max, inf) for 'censored'
    interval_level: float
    fit: str  # 'probit' | 'separated' (a step between two probed levels: the interval is that gap) | 'none'
    slope: float | None  # b1 = dz / dlog sigma of the fit, z = Phi^-1(p), < 0: the steepness of the transition
    lo: float  # the search's final bracket: p_hat >= p at lo (0 when the search failed at sigma_min) ...
    hi: float  # ... and p_hat < p at hi (inf when the search still held at sigma_max)
    status: str  # 'bracketed' | 'no_basin' (fails already at sigma_min) | 'censored' (holds at sigma_max);
    # the search's verdict at an edge stands only if the edge check's fresh trials confirm it
    p_hat: float  # recovery fraction of the search trials at p_sigma
    p_sigma: float  # where p_hat was measured: lo, or sigma_min when 'no_basin'
    ci_low: float  # 95% Wilson score interval of the recovery probability at p_sigma
    ci_high: float
    p_hat_hi: float | None  # recovery fraction at hi (< p); None when 'censored'
    n_trials: int  # search trials (common noise across its levels)
    n_design_trials: int  # fresh trials of the design rounds, over all their levels
    n_calls: int  # rows this point sent through the denoiser (trials x steps, summed over its probes)
    radius: float  # mean over search trials of ||x_sigma - x|| at sigma_c (0 when 'no_basin')
    radius_normalized: float  # radius / sqrt(D)
    curve_sigmas: Tensor | None = field(default=None, compare=False)  # (L,) when a curve was asked for
    curve_p_hat: Tensor | None = field(default=None, compare=False)  # (L,) recovery fraction at curve_sigmas

    @property
    def has_basin(self) -> bool:
        return self.status != "no_basin"


@dataclass(frozen=True, eq=False)
class RecoveryCurve:
    """Recovery fraction of N points at L noise levels, all from the same trial noise."""

    sigmas: Tensor  # (L,) float64, the requested levels
    n_recovered: Tensor  # (N, L) int64
    n_trials: int
    n_calls: Tensor  # (N,) int64, denoiser rows per point

    @property
    def p_hat(self) -> Tensor:
        """(N, L) float64."""
        return self.n_recovered.to(torch.float64) / self.n_trials

    @property
    def ci(self) -> tuple[Tensor, Tensor]:
        """95% Wilson score interval, two (N, L) tensors."""
        return wilson_interval(self.n_recovered, self.n_trials)

    def scan_critical_sigma(self, p: float) -> Tensor:
        """sigma_c as a linear scan reads it off this curve, (N,) float64: the level just below the
        first (increasing sigma) level with p_hat < p; 0 if the smallest fails, the largest if none does."""
        order = torch.argsort(self.sigmas)
        s = self.sigmas[order]
        fail = self.p_hat[:, order] < p  # (N, L)
        none_fail = torch.tensor(s.numel(), dtype=torch.int64)
        first = torch.where(fail.any(dim=1), fail.to(torch.int64).argmax(dim=1), none_fail)  # (N,)
        padded = torch.cat([s.new_zeros(1), s])  # padded[j] is the level below index j
        return padded[first]


# ---------------------------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------------------------


class _Trials:
    """The fixed trial noise of N points (n_trials each) and the recovery test over (point, level) pairs."""

    def __init__(self, est: BasinEstimator, x: Tensor, generator: torch.Generator, n_trials: int):
        self.est = est
        self.x = x
        self.n, self.t = x.shape[0], n_trials
        self.event = tuple(x.shape[1:])
        self.eps = randn((self.n * self.t, *self.event), generator, x).reshape(self.n, self.t, *self.event)
        self.eps_norm = torch.linalg.vector_norm(self.eps.reshape(self.n, self.t, -1), dim=2).to(torch.float64).cpu()
        # step noise of stochastic DDIM is replayed from one seed, so it is common across probes too
        self.step_seed = (
            int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)) if est.eta > 0 else None
        )
        self.step_device = generator.device
        self.calls = torch.zeros(self.n, dtype=torch.int64)
        self._grids: dict[float, Tensor] = {}

    def grid(self, sigma: float) -> Tensor:
        if sigma not in self._grids:
            self._grids[sigma] = _check_grid(self.est.sigma_grid(sigma, self.est.steps), sigma)
        return self._grids[sigma]

    def noise_level(self, sigma: float) -> float:
        """The level a point is actually noised to when probed at sigma (the grid's first level)."""
        return float(self.grid(sigma)[0])

    def recovered(self, points: Tensor, sigmas: list[float]) -> Tensor:
        """Recovered trials (M,) int64 for point indices `points` (M,), each probed at its own sigma."""
        return self.outcomes(points, sigmas).sum(dim=1)

    def outcomes(self, points: Tensor, sigmas: list[float]) -> Tensor:
        """Trial by trial (M, T) bool: recovered, for point indices `points` (M,) each at its own sigma."""
        m, t, device = points.numel(), self.t, self.x.device
        grids = [self.grid(s) for s in sigmas]
        width = max(g.numel() for g in grids)
        levels = torch.zeros(m, width, dtype=torch.float64)  # (M, L) on the CPU, padded with trailing zeros
        for i, g in enumerate(grids):
            levels[i, : g.numel()] = g
        levels = levels.repeat_interleave(t, dim=0)  # (M T, L)
        pts = points.to(device)
        rows = (pts[:, None] * t + torch.arange(t, device=device)).reshape(-1)  # (M T,) index of (point, trial)
        target = self.x[pts].repeat_interleave(t, dim=0)  # (M T, *event)
        eps = self.eps.reshape(self.n * t, *self.event)[rows]
        state = target + _per_row(levels[:, 0], target) * eps  # x_sigma = x + sigma eps
        out, calls = self._ddim(state, levels, rows)
        self.calls.index_add_(0, points.cpu(), calls.reshape(m, t).sum(dim=1))
        d = self.est.distance(out, target)
        if not isinstance(d, Tensor) or d.shape != (m * t,):
            got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"distance(y, x) must return one value per row, shape ({m * t},), got {got}")
        if not bool(torch.isfinite(d).all()):
            raise ValueError("distance(y, x) returned NaN or Inf; check the denoiser's output and the distance")
        return (d <= self.est.delta).reshape(m, t).cpu()

    def _ddim(self, state: Tensor, levels: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """DDIM (Song et al. 2021, eq. 12) in VE form with a grid per row (levels (R, L), float64 on the CPU):
        x_n = x0 + sqrt(n^2 - s_up^2) (x - x0) / s + s_up z,  s_up = eta n sqrt(s^2 - n^2) / s.
        A row takes a step only where s > n; its trailing zeros are no steps. Returns the end states
        and the denoiser calls of each row (R,)."""
        calls = torch.zeros(state.shape[0], dtype=torch.int64)
        gen = None
        if self.step_seed is not None:
            gen = torch.Generator(device=self.step_device)
            gen.manual_seed(self.step_seed)
        for i in range(levels.shape[1] - 1):
            s, n = levels[:, i], levels[:, i + 1]  # (R,)
            z = None
            if gen is not None:  # drawn for every (point, trial), so a row's noise does not depend on the batch
                z = randn((self.n * self.t, *self.event), gen, state)[rows]
            live = s > n
            if not bool(live.any()):
                continue
            every = bool(live.all())
            idx = live.nonzero().squeeze(1)
            s, n = s[idx], n[idx]
            x = state if every else state[idx.to(state.device)]
            x0 = self._denoise(x, s)
            s_up = self.est.eta * n * (s * s - n * n).clamp(min=0).sqrt() / s  # std of the injected noise
            keep = (n * n - s_up * s_up).clamp(min=0).sqrt() / s  # weight of the noise estimate (x - x0) / s
            step = x0 + _per_row(keep, x) * (x - x0)
            if z is not None:
                step = step + _per_row(s_up, x) * (z if every else z[idx.to(z.device)])
            state = step if every else state.index_copy(0, idx.to(state.device), step)
            calls[idx] += 1
        return state, calls

    def _denoise(self, x: Tensor, s: Tensor) -> Tensor:
        size = self.est.batch_size or x.shape[0]
        sig = s.to(device=x.device, dtype=x.dtype)
        parts = []
        for start in range(0, x.shape[0], size):
            xb = x[start : start + size]
            out = self.est.denoiser(xb, sig[start : start + size])
            if not isinstance(out, Tensor) or out.shape != xb.shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"the denoiser returned {got} for input shape {tuple(xb.shape)}")
            parts.append(out.to(x.dtype))
        out = torch.cat(parts)
        if not bool(torch.isfinite(out).all()):
            raise ValueError("the denoiser returned NaN or Inf during the recovery test")
        return out


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """(R,) float64 coefficients as (R, 1, ..., 1) in like's dtype and device, to scale rows of like."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class BasinEstimator:
    """Critical levels sigma_c, their intervals and basin radii of points under a denoiser (SCIENCE.md §6).

    The defaults follow the original study where it defined the test (p = 0.9, delta = 0.1, 20 DDIM
    steps, a 10-trial search); the design (2 rounds x 5 levels x 32 fresh trials) is what the estimate
    needs to be unbiased to about 1 % with a 90% interval covering 86-90 % on two patterns (tests).
    Use it as `BasinEstimator(D).fit(x, generator=g)` (then results_, sigma_c_, sigma_c_low_,
    sigma_c_high_, n_calls_) or
    `.critical_times(x, generator=g)`; `recovery_curve` gives p_hat on a grid of levels.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        n_trials: int = 10,  # search trials per point, reused at every search level
        p: float = 0.9,  # recovery probability that defines the basin
        delta: float = 0.1,  # recovered iff distance(result, x) <= delta
        sigma_min: float = 0.01,  # bracket of the search; below it a point has 'no basin'
        sigma_max: float = 80.0,  # above it sigma_c is 'censored' (EDM's largest level)
        rtol: float = 0.01,  # search grid ratio of neighbours <= 1 + rtol
        design_rounds: int = 2,  # rounds of fresh trials around the current fit after the search (0: none)
        design_levels: int = 5,  # levels per round
        design_trials: int = 32,  # fresh trials per level
        design_width: float = 0.5,  # a round spans z* +- design_width on the fitted probit scale
        interval: float = 0.9,  # confidence level of the interval for sigma*
        link: str = "inverse",  # the fitted curve: 'inverse' Phi(b0 + c / sigma) or 'log' Phi(b0 + b1 log sigma)
        steps: int = 20,  # DDIM steps of one recovery
        eta: float = 0.0,  # DDIM stochasticity: 0 deterministic, 1 DDPM ancestral
        sigma_grid: SigmaGrid | None = None,  # sigma_grid(sigma, steps) -> levels; None is KarrasGrid()
        distance: Distance | None = None,  # distance(y, x) -> (B,); None is normalized_l2
        batch_size: int | None = None,  # rows per denoiser call; None sends each probe in one batch
        curve_sigmas: Tensor | None = None,  # levels at which fit also records the recovery curve
    ):
        if not callable(denoiser):
            raise ValueError(f"denoiser must be callable as D(x, sigma), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.n_trials = check_positive_int(n_trials, "n_trials")
        self.p = check_finite_float(p, "p")
        if not 0 < self.p < 1:
            raise ValueError(f"p must lie strictly between 0 and 1, got {p}")
        self.delta = check_finite_float(delta, "delta")
        if self.delta <= 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        self.sigma_min = check_finite_float(sigma_min, "sigma_min")
        self.sigma_max = check_finite_float(sigma_max, "sigma_max")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.rtol = check_finite_float(rtol, "rtol")
        if self.rtol <= 0:
            raise ValueError(f"rtol must be > 0 (the relative resolution of the search), got {rtol}")
        if isinstance(design_rounds, bool) or not isinstance(design_rounds, int) or design_rounds < 0:
            raise ValueError(f"design_rounds must be an integer >= 0, got {design_rounds!r}")
        self.design_rounds = design_rounds
        self.design_levels = check_positive_int(design_levels, "design_levels")
        self.design_trials = check_positive_int(design_trials, "design_trials")
        self.design_width = check_finite_float(design_width, "design_width")
        if self.design_width <= 0:
            raise ValueError(f"design_width must be > 0 (a half-width on the probit scale), got {design_width}")
        self.interval = check_finite_float(interval, "interval")
        if not 0 < self.interval < 1:
            raise ValueError(f"interval must lie strictly between 0 and 1 (a confidence level), got {interval}")
        if link not in LINKS:
            raise ValueError(f"unknown link {link!r}; choose one of {LINKS}")
        self.link = link
        self.steps = check_positive_int(steps, "steps")
        self.eta = check_finite_float(eta, "eta", low=0.0, high=1.0)
        if sigma_grid is not None and not callable(sigma_grid):
            raise ValueError("sigma_grid must be callable as sigma_grid(sigma, steps) -> Tensor, or None")
        self.sigma_grid = KarrasGrid() if sigma_grid is None else sigma_grid
        if distance is not None and not callable(distance):
            raise ValueError("distance must be callable as distance(y, x) -> Tensor of shape (B,), or None")
        self.distance = normalized_l2 if distance is None else distance
        self.batch_size = None if batch_size is None else check_positive_int(batch_size, "batch_size")
        self.curve_sigmas = None if curve_sigmas is None else _check_levels(curve_sigmas, "curve_sigmas")

    def search_levels(self) -> Tensor:
        """The geometric grid the bisection walks, sigma_min ... sigma_max, (J + 1,) float64,
        with J the fewest intervals whose ratio (sigma_max / sigma_min)^(1/J) is <= 1 + rtol."""
        span = math.log(self.sigma_max / self.sigma_min)
        j = max(1, math.ceil(span / math.log1p(self.rtol) - 1e-9))
        log_levels = torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), j + 1, dtype=torch.float64)
        levels = log_levels.exp()  # (J + 1,)
        levels[0], levels[-1] = self.sigma_min, self.sigma_max
        return levels

    def design_calls(self) -> int:
        """Denoiser rows of the design rounds per bracketed point, at most (levels x trials x steps each)."""
        return self.design_rounds * self.design_levels * self.design_trials * self.steps

    def _trials(self, x: Tensor, generator: torch.Generator) -> _Trials:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"the recovery test draws noise: pass a torch.Generator, got {type(generator).__name__}")
        if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] == 0:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a batch of points, shape (N, *event) with N >= 1, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf; every point must be finite")
        return _Trials(self, x.detach(), generator, self.n_trials)

    def fit(self, x: Tensor, *, generator: torch.Generator) -> BasinEstimator:
        """Critical levels of the points x (N, *event). Sets results_ (N CriticalTime), sigma_c_,
        sigma_c_low_, sigma_c_high_ (N,) float64 and n_calls_ (total denoiser rows). Randomness comes
        from generator only: first the search trials (as in recovery_curve), then each design round."""
        with torch.no_grad():
            trials = self._trials(x, generator)
            results = self._estimate(trials, generator)
        self.results_ = results
        self.sigma_c_ = torch.tensor([r.sigma_c for r in results], dtype=torch.float64)
        self.sigma_c_low_ = torch.tensor([r.sigma_c_low for r in results], dtype=torch.float64)
        self.sigma_c_high_ = torch.tensor([r.sigma_c_high for r in results], dtype=torch.float64)
        self.n_calls_ = int(trials.calls.sum())
        return self

    def critical_times(self, x: Tensor, *, generator: torch.Generator) -> list[CriticalTime]:
        """One CriticalTime per point of x (N, *event)."""
        return self.fit(x, generator=generator).results_

    def recovery_curve(self, x: Tensor, sigmas: Tensor, *, generator: torch.Generator) -> RecoveryCurve:
        """Recovery fraction of every point x (N, *event) at every level of sigmas (L,), all (point,
        level, trial) rows in one denoiser batch (or chunks of batch_size). The same generator state
        gives the same trial noise as fit's search, so the curve and the search brackets agree."""
        levels = _check_levels(sigmas, "sigmas")
        with torch.no_grad():
            trials = self._trials(x, generator)
            k = self._curve(trials, levels)
        return RecoveryCurve(sigmas=levels, n_recovered=k, n_trials=self.n_trials, n_calls=trials.calls.clone())

    def _curve(self, trials: _Trials, levels: Tensor) -> Tensor:
        n, ln = trials.n, levels.numel()
        points = torch.arange(n).repeat_interleave(ln)  # (N L,) point-major
        k = trials.recovered(points, [float(s) for s in levels] * n)
        return k.reshape(n, ln)

    def _bisect(self, trials: _Trials) -> dict:
        """The search: bisection for the last grid level with p_hat >= p. Returns its bracket (grid
        indices lo, hi, recovered counts there, flags) and every probe's trial-by-trial outcomes."""
        n, t, p = trials.n, self.n_trials, self.p
        levels = self.search_levels()
        top = levels.numel() - 1
        need = math.ceil(p * t - 1e-9)  # p_hat >= p  <=>  recovered >= ceil(p t)
        lo = torch.zeros(n, dtype=torch.int64)
        hi = torch.full((n,), top, dtype=torch.int64)
        k_lo = torch.zeros(n, dtype=torch.int64)
        k_hi = torch.full((n,), -1, dtype=torch.int64)  # -1: never measured (censored)
        everyone = torch.arange(n)
        probes: list[tuple[Tensor, Tensor, Tensor]] = []  # (points, grid indices, outcomes (M, T))

        def probe(points: Tensor, idx: Tensor) -> Tensor:
            out = trials.outcomes(points, [float(levels[j]) for j in idx])
            probes.append((points, idx, out))
            return out.sum(dim=1)

        k = probe(everyone, torch.zeros(n, dtype=torch.int64))
        no_basin = k < need
        k_lo = torch.where(no_basin, k_lo, k)
        k_hi = torch.where(no_basin, k, k_hi)
        hi[no_basin] = 0
        rest = everyone[~no_basin]
        censored = torch.zeros(n, dtype=torch.bool)
        if rest.numel():
            k = probe(rest, torch.full((rest.numel(),), top, dtype=torch.int64))
            ok = k >= need
            censored[rest[ok]] = True
            lo[rest[ok]] = top
            k_lo[rest[ok]] = k[ok]
            k_hi[rest[~ok]] = k[~ok]
        active = everyone[~no_basin & ~censored & (hi - lo > 1)]
        while active.numel():
            mid = (lo[active] + hi[active]) // 2
            k = probe(active, mid)
            ok = k >= need
            lo[active[ok]], k_lo[active[ok]] = mid[ok], k[ok]
            hi[active[~ok]], k_hi[active[~ok]] = mid[~ok], k[~ok]
            active = active[hi[active] - lo[active] > 1]
        return dict(
            levels=levels, lo=lo, hi=hi, k_lo=k_lo, k_hi=k_hi, no_basin=no_basin, censored=censored, probes=probes
        )

    def _search_brackets(self, n: int, levels: Tensor, probes: list) -> tuple[Tensor, Tensor]:
        """Each search trial's bracket (log_lo, log_hi), (N, T): its smallest failing level, and its
        largest recovering level below that (-inf / +inf where there is none). A trial that recovers
        again above a failure (recovery not monotone along its noise) is read up to its first failure."""
        t = self.n_trials
        pts = torch.cat([q[0] for q in probes])  # (P,)
        logs = levels.log()[torch.cat([q[1] for q in probes])]  # (P,)
        out = torch.cat([q[2] for q in probes])  # (P, T)
        index = pts[:, None].expand(-1, t)
        log_hi = torch.full((n, t), math.inf, dtype=torch.float64)
        log_hi.scatter_reduce_(0, index, torch.where(out, math.inf, logs[:, None].expand(-1, t)), "amin")
        below = out & (logs[:, None] < log_hi[pts])
        log_lo = torch.full((n, t), -math.inf, dtype=torch.float64)
        log_lo.scatter_reduce_(0, index, torch.where(below, logs[:, None].expand(-1, t), -math.inf), "amax")
        return log_lo, log_hi

    def _fit(self, log_lo: Tensor, log_hi: Tensor, w: Tensor, start: Tensor) -> dict:
        """The probit fit of brackets in log sigma (B, M) under self.link, from the level `start` (B,).
        Returns the fit (in t), the t-data, u = log sigma_c and the slope dz / dlog sigma there where
        the fit is not separated, the middle of the separating gap (top_ok, low_fail) and nan where it is."""
        data = (_to_t(log_lo, self.link), _to_t(log_hi, self.link), w)
        fit = fit_probit(*data, start=_to_t(start, self.link))
        used = w > 0
        top_ok = torch.where(used & torch.isfinite(log_lo), log_lo, -math.inf).amax(-1)  # largest recovering level
        low_fail = torch.where(used & torch.isfinite(log_hi), log_hi, math.inf).amin(-1)  # smallest failing level
        u = torch.where(fit.separated, (top_ok + low_fail) / 2, _from_t(fit.level(self.p), self.link))
        dt = torch.ones_like(u) if self.link == "log" else torch.exp(-u)  # dt / dlog sigma at sigma_c
        slope = torch.where(fit.separated | ~torch.isfinite(u), math.nan, fit.b1 * dt)
        return dict(fit=fit, data=data, u=u, slope=slope, top_ok=top_ok, low_fail=low_fail)

    def _design_levels(self, u: Tensor, slope: Tensor, gap: Tensor) -> Tensor:
        """A round's levels, log sigma (B, L), around log sigma* = u (B,): spread over z* +- design_width
        at the fitted slope dz / dlog sigma (or over the separating gap), at least the search resolution
        and at most a factor e either side (the probit is a local model), within [sigma_min, sigma_max]."""
        ln = self.design_levels
        half = torch.where(torch.isfinite(slope), self.design_width / slope.abs(), gap / 2)
        half = half.clamp(min=math.log1p(self.rtol), max=1.0)
        offsets = torch.linspace(-1.0, 1.0, ln, dtype=torch.float64) if ln > 1 else torch.zeros(1, dtype=torch.float64)
        return (u[:, None] + half[:, None] * offsets).clamp(math.log(self.sigma_min), math.log(self.sigma_max))

    def _fresh(self, trials: _Trials, points: Tensor, log_s: Tensor, generator: torch.Generator):
        """design_trials fresh trials (new noise) for each of `points` (B,) at each of its levels log_s (B, L).
        Returns the observations (log_lo, log_hi, w) (B, 2 L): recovered at s, the trial's own level is in
        (s, inf); failed, in (0, s)."""
        b, ln = log_s.shape
        x = trials.x[points.to(trials.x.device)].repeat_interleave(ln, dim=0)
        fresh = _Trials(self, x, generator, self.design_trials)
        k = fresh.recovered(torch.arange(b * ln), [float(v) for v in log_s.exp().reshape(-1)]).reshape(b, ln)
        trials.calls.index_add_(0, points.repeat_interleave(ln), fresh.calls)
        kf = k.to(torch.float64)
        inf = torch.full_like(log_s, math.inf)
        return (
            torch.cat([log_s, -inf], dim=1),
            torch.cat([inf, log_s], dim=1),
            torch.cat([kf, self.design_trials - kf], 1),
        )

    def _estimate(self, trials: _Trials, generator: torch.Generator) -> list[CriticalTime]:
        n, t, per_round = trials.n, self.n_trials, self.design_levels * self.design_trials
        s = self._bisect(trials)
        levels, lo, hi, no_basin, censored = s["levels"], s["lo"], s["hi"], s["no_basin"], s["censored"]
        k_lo, k_hi = s["k_lo"], s["k_hi"]
        log_lo, log_hi = self._search_brackets(n, levels, s["probes"])
        w = torch.ones(n, t, dtype=torch.float64)
        log_levels = levels.log()
        bracket = log_levels[torch.stack([lo, hi], dim=1)]  # (N, 2) the search's final bracket, log sigma
        n_design = torch.zeros(n, dtype=torch.int64)
        edge_data = [torch.empty(n, 0, dtype=torch.float64) for _ in range(3)]

        # edge check: the search's verdict at sigma_min ('no_basin') or sigma_max ('censored') rests on
        # n_trials trials; one round of fresh trials there confirms it, or the point is fitted after all
        search_no_basin, search_censored = no_basin.clone(), censored.clone()  # the search's verdicts
        edge = (no_basin | censored).nonzero().squeeze(1)
        if self.design_rounds and edge.numel():
            at = torch.where(no_basin[edge], log_levels[0], log_levels[-1])  # (E,)
            obs = self._fresh(trials, edge, at[:, None].expand(-1, self.design_levels), generator)
            frac = obs[2][:, : self.design_levels].sum(1) / per_round
            n_design[edge] = per_round
            overturned = torch.where(no_basin[edge], frac >= self.p, frac < self.p)
            edge_data = [torch.zeros(n, 2 * self.design_levels, dtype=torch.float64) for _ in range(3)]
            for full, part in zip(edge_data, obs, strict=True):
                full[edge] = part
            bracket[edge] = at[:, None].expand(-1, 2)
            no_basin[edge[overturned]] = False
            censored[edge[overturned]] = False

        # design rounds and the fit, for the bracketed points only
        bracketed = (~no_basin & ~censored).nonzero().squeeze(1)
        b = bracketed.numel()

        def full(value: float) -> Tensor:
            return torch.full((n,), value, dtype=torch.float64)

        sigma_c = torch.where(no_basin, full(0.0), torch.where(censored, full(self.sigma_max), full(math.nan)))
        low = torch.where(no_basin, full(0.0), full(self.sigma_max))
        high = torch.where(no_basin, full(self.sigma_min), full(math.inf))
        slope_all = torch.full((n,), math.nan, dtype=torch.float64)
        separated = torch.zeros(n, dtype=torch.bool)
        if b:
            search = (log_lo[bracketed], log_hi[bracketed], w[bracketed])
            design = [d[bracketed] for d in edge_data]
            design[2] = torch.where(torch.isfinite(design[0]) | torch.isfinite(design[1]), design[2], 0.0)
            window = bracket[bracketed]
            u = window[:, 0]
            bounds = (math.log(self.sigma_min), math.log(self.sigma_max))
            t_bounds = tuple(float(_to_t(torch.tensor(v, dtype=torch.float64), self.link)) for v in bounds)
            for r in range(self.design_rounds + 1):
                at = torch.where(torch.isfinite(design[0]), design[0], design[1])  # each observation's level
                coarse = _coarsen(*search, torch.where(design[2] > 0, at, math.inf), window)
                data = [torch.cat([c, d], dim=1) for c, d in zip(coarse, design, strict=True)]
                f = self._fit(*data, start=u)
                if r == self.design_rounds:
                    break
                gap = torch.where(torch.isfinite(f["low_fail"] - f["top_ok"]), f["low_fail"] - f["top_ok"], 0.0)
                u = torch.where(torch.isfinite(f["u"]), f["u"], u).clamp(*bounds)
                new = self._fresh(trials, bracketed, self._design_levels(u, f["slope"], gap.abs()), generator)
                design = [torch.cat([d, e], dim=1) for d, e in zip(design, new, strict=True)]
            n_design[bracketed] += self.design_rounds * per_round
            fit, u_fit, slope = f["fit"], f["u"], f["slope"]
            sep = fit.separated
            u_low, u_high = torch.full_like(u_fit, math.nan), torch.full_like(u_fit, math.nan)
            if not bool(sep.all()):  # a separated fit has no profile: its interval is the gap
                sub = (~sep).nonzero().squeeze(1)
                part = ProbitFit(*(getattr(fit, k)[sub] for k in ("b0", "b1", "loglik", "converged", "separated")))
                t_data = (d[sub] for d in f["data"])
                lows, highs = profile_interval(part, self.p, self.interval, *t_data, bounds=t_bounds)
                u_low[sub], u_high[sub] = _from_t(lows, self.link), _from_t(highs, self.link)
            # a fit that puts sigma* beyond the searched range (e.g. an 'inverse' plateau above p) reports
            # the range's edge; its interval, open on that side, says how far it may lie
            sigma_c[bracketed] = u_fit.exp().clamp(self.sigma_min, self.sigma_max)
            low[bracketed] = torch.where(sep, f["top_ok"], u_low).exp()
            high[bracketed] = torch.where(sep, f["low_fail"], u_high).exp()
            slope_all[bracketed] = slope
            separated[bracketed] = sep

        curve = self._curve(trials, self.curve_sigmas) if self.curve_sigmas is not None else None
        ci_low, ci_high = wilson_interval(torch.where(search_no_basin, k_hi, k_lo), t)
        root_d = math.sqrt(trials.eps[0, 0].numel())
        results = []
        for i in range(n):
            status = "no_basin" if bool(no_basin[i]) else ("censored" if bool(censored[i]) else "bracketed")
            sc = float(sigma_c[i])
            fit_kind = "none" if status != "bracketed" else ("separated" if bool(separated[i]) else "probit")
            at = min(max(sc, self.sigma_min), self.sigma_max)  # the level the radius is read at, in the searched range
            radius = 0.0 if status == "no_basin" else trials.noise_level(at) * float(trials.eps_norm[i].mean())
            nb, cens = bool(search_no_basin[i]), bool(search_censored[i])
            lo_i = 0.0 if nb else float(levels[lo[i]])
            results.append(
                CriticalTime(
                    sigma_c=sc,
                    sigma_c_low=float(low[i]),
                    sigma_c_high=float(high[i]),
                    interval_level=self.interval,
                    fit=fit_kind,
                    slope=float(slope_all[i]) if fit_kind == "probit" else None,
                    lo=lo_i,
                    hi=math.inf if cens else float(levels[hi[i]]),
                    status=status,
                    p_hat=int(k_hi[i] if nb else k_lo[i]) / t,
                    p_sigma=float(levels[0]) if nb else lo_i,
                    ci_low=float(ci_low[i]),
                    ci_high=float(ci_high[i]),
                    p_hat_hi=None if cens else int(k_hi[i]) / t,
                    n_trials=t,
                    n_design_trials=int(n_design[i]),
                    n_calls=int(trials.calls[i]),
                    radius=radius,
                    radius_normalized=radius / root_d,
                    curve_sigmas=None if curve is None else self.curve_sigmas,
                    curve_p_hat=None if curve is None else curve[i].to(torch.float64) / t,
                )
            )
        return results


def _coarsen(
    log_lo: Tensor, log_hi: Tensor, w: Tensor, design_lo: Tensor, bracket: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The search trials' brackets (B, T) coarsened to the window spanned by the design levels (the finite
    entries of design_lo (B, M)) and the search's final bracket (B, 2) (log lo, log hi): an end beyond
    the window moves to its edge or to 0 / inf, so that a bracket only says on which side of the window
    a trial's level lies, or where inside it. The probit is a local model of the curve: without this,
    a trial bracketed far away (e.g. between 2 and 20 when sigma* is 0.8) would bend the fitted slope
    to explain the curve's far tail. A point without design levels yet keeps its brackets."""
    if design_lo.shape[-1] == 0:
        return log_lo, log_hi, w
    finite = torch.isfinite(design_lo)
    wa = torch.minimum(torch.where(finite, design_lo, math.inf).amin(-1), bracket[:, 0])[:, None]  # (B, 1)
    wb = torch.maximum(torch.where(finite, design_lo, -math.inf).amax(-1), bracket[:, 1])[:, None]
    none = ~finite.any(-1, keepdim=True)
    wa, wb = torch.where(none, -math.inf, wa), torch.where(none, math.inf, wb)
    lo = torch.where(log_lo < wa, -math.inf, torch.minimum(log_lo, wb))
    hi = torch.where(log_hi > wb, math.inf, torch.maximum(log_hi, wa))
    return lo, hi, w


def _check_levels(sigmas: Tensor, name: str) -> Tensor:
    levels = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if levels.ndim != 1 or levels.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of noise levels, got shape {tuple(levels.shape)}")
    if not bool(torch.isfinite(levels).all()) or bool((levels <= 0).any()):
        raise ValueError(f"{name} must be finite and > 0 (sigma = 0 needs no recovery test)")
    return levels


def critical_time(denoiser: Denoiser, x: Tensor, *, generator: torch.Generator, **params) -> list[CriticalTime]:
    """Critical times of the points x (N, *event): BasinEstimator(denoiser, **params).critical_times(x)."""
    return BasinEstimator(denoiser, **params).critical_times(x, generator=generator)
