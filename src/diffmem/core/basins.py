"""Basins of attraction and critical times of a denoiser (SCIENCE.md §6, "Basin / critical time").

Recovery test at noise level sigma (VE convention): noise a point, x_sigma = x + sigma * eps, denoise
it back to sigma = 0 with DDIM over `steps` levels, and call it recovered if distance(result, x) <= delta.
The critical time sigma_c(x) is the largest sigma at which the recovery probability stays >= p.

Glossary:

    x        the point under test (a training example or a generated sample), shape (*event)
    eps      the trial's noise, drawn once per (point, trial) and reused at every probed level
             (common random numbers: recovery is then close to monotone in sigma, and exactly so for
             the two-pattern memory, where it is the event a + sigma * eps_1 > 0)
    p_hat    recovered trials / n_trials at one level, with its 95% Wilson score interval
    sigma_c  largest level of the search grid with p_hat >= p, found by bisection in log sigma on a
             geometric grid between sigma_min and sigma_max whose ratio of neighbours is <= 1 + rtol
    radius   ||x_sigma - x|| = sigma_c ||eps||, averaged over trials: how far the basin reaches

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
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriticalTime:
    """Critical time of one point: the largest sigma whose recovery probability stays >= p."""

    sigma_c: float  # largest search level with p_hat >= p; 0 when status is 'no_basin'
    lo: float  # final bracket: p_hat >= p verified at lo (0 when 'no_basin') ...
    hi: float  # ... and p_hat < p at hi (inf when 'censored')
    status: str  # 'bracketed' | 'no_basin' (fails already at sigma_min) | 'censored' (holds at sigma_max)
    p_hat: float  # recovery fraction at p_sigma
    p_sigma: float  # where p_hat was measured: sigma_c, or sigma_min when 'no_basin'
    ci_low: float  # 95% Wilson score interval of the recovery probability at p_sigma
    ci_high: float
    p_hat_hi: float | None  # recovery fraction at hi (< p); None when 'censored'
    n_trials: int
    n_calls: int  # rows this point sent through the denoiser (trials x steps, summed over its probes)
    radius: float  # mean over trials of ||x_sigma - x|| at sigma_c (0 when 'no_basin')
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
    """The fixed trial noise of N points and the recovery test over (point, level) pairs."""

    def __init__(self, est: BasinEstimator, x: Tensor, generator: torch.Generator):
        self.est = est
        self.x = x
        self.n, self.t = x.shape[0], est.n_trials
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
        return (d <= self.est.delta).reshape(m, t).sum(dim=1).cpu()

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
    """Critical times sigma_c and basin radii of points under a denoiser (SCIENCE.md §6).

    The defaults follow the original study: p = 0.9 over 10 trials, delta = 0.1, 20 DDIM steps.
    Use it as `BasinEstimator(D).fit(x, generator=g)` (then results_, sigma_c_, n_calls_) or
    `.critical_times(x, generator=g)`; `recovery_curve` gives p_hat on a grid of levels.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        n_trials: int = 10,  # noise draws per point and level
        p: float = 0.9,  # recovery probability that defines the basin
        delta: float = 0.1,  # recovered iff distance(result, x) <= delta
        sigma_min: float = 0.01,  # bracket of the search; below it a point has 'no basin'
        sigma_max: float = 80.0,  # above it sigma_c is 'censored' (EDM's largest level)
        rtol: float = 0.01,  # search grid ratio of neighbours <= 1 + rtol, the resolution of sigma_c
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
            raise ValueError(f"rtol must be > 0 (the relative resolution of sigma_c), got {rtol}")
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
        return _Trials(self, x.detach(), generator)

    def fit(self, x: Tensor, *, generator: torch.Generator) -> BasinEstimator:
        """Critical times of the points x (N, *event). Sets results_ (N CriticalTime), sigma_c_ (N,)
        float64 and n_calls_ (total denoiser rows). Randomness comes from generator only."""
        with torch.no_grad():
            trials = self._trials(x, generator)
            results = self._bisect(trials)
        self.results_ = results
        self.sigma_c_ = torch.tensor([r.sigma_c for r in results], dtype=torch.float64)
        self.n_calls_ = int(trials.calls.sum())
        return self

    def critical_times(self, x: Tensor, *, generator: torch.Generator) -> list[CriticalTime]:
        """One CriticalTime per point of x (N, *event)."""
        return self.fit(x, generator=generator).results_

    def recovery_curve(self, x: Tensor, sigmas: Tensor, *, generator: torch.Generator) -> RecoveryCurve:
        """Recovery fraction of every point x (N, *event) at every level of sigmas (L,), all (point,
        level, trial) rows in one denoiser batch (or chunks of batch_size). The same generator state
        gives the same trial noise as fit, so the curve and the critical times agree."""
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

    def _bisect(self, trials: _Trials) -> list[CriticalTime]:
        n, t, p = trials.n, self.n_trials, self.p
        levels = self.search_levels()
        top = levels.numel() - 1
        need = math.ceil(p * t - 1e-9)  # p_hat >= p  <=>  recovered >= ceil(p t)
        lo = torch.zeros(n, dtype=torch.int64)
        hi = torch.full((n,), top, dtype=torch.int64)
        k_lo = torch.zeros(n, dtype=torch.int64)
        k_hi = torch.full((n,), -1, dtype=torch.int64)  # -1: never measured (censored)
        everyone = torch.arange(n)

        k = trials.recovered(everyone, [float(levels[0])] * n)
        no_basin = k < need
        k_lo = torch.where(no_basin, k_lo, k)
        k_hi = torch.where(no_basin, k, k_hi)
        hi[no_basin] = 0
        rest = everyone[~no_basin]
        censored = torch.zeros(n, dtype=torch.bool)
        if rest.numel():
            k = trials.recovered(rest, [float(levels[top])] * rest.numel())
            ok = k >= need
            censored[rest[ok]] = True
            lo[rest[ok]] = top
            k_lo[rest[ok]] = k[ok]
            k_hi[rest[~ok]] = k[~ok]
        active = everyone[~no_basin & ~censored & (hi - lo > 1)]
        while active.numel():
            mid = (lo[active] + hi[active]) // 2
            k = trials.recovered(active, [float(levels[j]) for j in mid])
            ok = k >= need
            lo[active[ok]], k_lo[active[ok]] = mid[ok], k[ok]
            hi[active[~ok]], k_hi[active[~ok]] = mid[~ok], k[~ok]
            active = active[hi[active] - lo[active] > 1]

        curve = self._curve(trials, self.curve_sigmas) if self.curve_sigmas is not None else None
        ci_low, ci_high = wilson_interval(torch.where(no_basin, k_hi, k_lo), t)
        root_d = math.sqrt(trials.eps[0, 0].numel())
        results = []
        for i in range(n):
            status = "no_basin" if bool(no_basin[i]) else ("censored" if bool(censored[i]) else "bracketed")
            sigma_c = 0.0 if status == "no_basin" else float(levels[lo[i]])
            radius = 0.0 if status == "no_basin" else trials.noise_level(sigma_c) * float(trials.eps_norm[i].mean())
            results.append(
                CriticalTime(
                    sigma_c=sigma_c,
                    lo=sigma_c,
                    hi=math.inf if status == "censored" else float(levels[hi[i]]),
                    status=status,
                    p_hat=int(k_hi[i] if status == "no_basin" else k_lo[i]) / t,
                    p_sigma=float(levels[0]) if status == "no_basin" else sigma_c,
                    ci_low=float(ci_low[i]),
                    ci_high=float(ci_high[i]),
                    p_hat_hi=None if status == "censored" else int(k_hi[i]) / t,
                    n_trials=t,
                    n_calls=int(trials.calls[i]),
                    radius=radius,
                    radius_normalized=radius / root_d,
                    curve_sigmas=None if curve is None else self.curve_sigmas,
                    curve_p_hat=None if curve is None else curve[i].to(torch.float64) / t,
                )
            )
        return results


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
