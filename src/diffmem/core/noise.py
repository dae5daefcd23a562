"""Noise levels and schedules (SCIENCE.md §2).

The inside of diffmem speaks one parameterisation: the variance-exploding noise level sigma,
with x_sigma = x0 + sigma * eps. Everything else is converted here, in one place:

    VP state      x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps
    VE state      x   = x_t / sqrt(alpha_bar_t)                       (vp_to_ve)
    noise level   sigma^2 = (1 - alpha_bar) / alpha_bar                (alpha_bar_to_sigma)
    memory        beta = 1 / sigma^2                                   (sigma_to_beta)

Do not confuse sigma with the DDIM "sigma_t" (the std of the noise injected at a step).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor

from diffmem.core._checks import check_finite_float, check_positive_int

# ---------------------------------------------------------------------------------------------
# Conversions: the one named place where t, alpha_bar, sigma and beta meet.
# ---------------------------------------------------------------------------------------------


def alpha_bar_to_sigma(alpha_bar: Tensor) -> Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar)  (SCIENCE.md §2)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_alpha_bar(sigma: Tensor) -> Tensor:
    """alpha_bar = 1 / (1 + sigma^2), the inverse of alpha_bar_to_sigma."""
    return 1 / (1 + sigma**2)


def sigma_to_beta(sigma: Tensor) -> Tensor:
    """Inverse temperature of the dense memory at noise level sigma: beta = 1 / sigma^2 (§4)."""
    return sigma**-2


def beta_to_sigma(beta: Tensor) -> Tensor:
    """sigma = beta^(-1/2)."""
    return beta**-0.5


def vp_to_ve(x_t: Tensor, alpha_bar: Tensor) -> Tensor:
    """VP state x_t -> VE state x = x_t / sqrt(alpha_bar); alpha_bar broadcasts over leading dims."""
    return x_t / _expand(alpha_bar, x_t).sqrt()


def ve_to_vp(x: Tensor, sigma: Tensor) -> Tensor:
    """VE state x at level sigma -> VP state x_t = x * sqrt(alpha_bar(sigma))."""
    return x * _expand(sigma_to_alpha_bar(sigma), x).sqrt()


def _expand(level: Tensor, x: Tensor) -> Tensor:
    """Append singleton dims so a per-sample level (B,) broadcasts against x (B, ...)."""
    level = torch.as_tensor(level, dtype=x.dtype, device=x.device)
    return level.reshape(level.shape + (1,) * (x.ndim - level.ndim))


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

VP_KINDS = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


def _cosine_alpha_bar(t: float) -> float:
    # Nichol & Dhariwal (2021), eq. 17, with s = 0.008; the form diffusers uses.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


@dataclass(frozen=True)
class VPSchedule:
    """A discrete variance-preserving (DDPM) schedule with T steps, t = 0..T-1.

    The betas are built exactly as diffusers' DDPMScheduler builds them for the same
    configuration (float32 values, as there); alpha_bar and sigma are then computed in float64.
    """

    kind: str = "linear"  # 'linear' | 'scaled_linear' | 'squaredcos_cap_v2'
    num_train_timesteps: int = 1000  # T
    beta_start: float = 1e-4  # betas_0 for the linear kinds (DDPM, Ho et al. 2020)
    beta_end: float = 0.02  # betas_{T-1} for the linear kinds
    max_beta: float = 0.999  # cap of the cosine schedule, avoids alpha_bar = 0 at t = T-1
    betas: Tensor = field(init=False, repr=False, compare=False)
    _alpha_bar: Tensor = field(init=False, repr=False, compare=False)
    _sigmas: Tensor = field(init=False, repr=False, compare=False)
    _log_sigmas: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in VP_KINDS:
            raise ValueError(f"unknown VP schedule kind {self.kind!r}; choose one of {VP_KINDS}")
        T = check_positive_int(self.num_train_timesteps, "num_train_timesteps")
        check_finite_float(self.beta_start, "beta_start", low=0.0, high=1.0)
        check_finite_float(self.beta_end, "beta_end", low=0.0, high=1.0)
        check_finite_float(self.max_beta, "max_beta", low=0.0, high=1.0)
        if self.kind == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        elif self.kind == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        else:
            values = [
                min(1 - _cosine_alpha_bar((i + 1) / T) / _cosine_alpha_bar(i / T), self.max_beta) for i in range(T)
            ]
            betas = torch.tensor(values, dtype=torch.float32)
        betas = betas.to(torch.float64)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1); check beta_start, beta_end and max_beta")
        object.__setattr__(self, "betas", betas)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        object.__setattr__(self, "_alpha_bar", alpha_bar)
        object.__setattr__(self, "_sigmas", alpha_bar_to_sigma(alpha_bar))
        object.__setattr__(self, "_log_sigmas", self._sigmas.log())

    @property
    def alpha_bar(self) -> Tensor:
        """alpha_bar_t = prod_{s<=t} (1 - betas_s), float64, shape (T,) (a copy)."""
        return self._alpha_bar.clone()

    @property
    def sigmas(self) -> Tensor:
        """Noise level of every training timestep, increasing in t, float64, shape (T,) (a copy)."""
        return self._sigmas.clone()

    @property
    def sigma_min(self) -> float:
        return float(self._sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self._sigmas[-1])

    def prior_std(self) -> float:
        """Std of the VE state at t = T-1 when x_{T-1} ~ N(0, I): 1 / sqrt(alpha_bar_{T-1})."""
        return float(self.alpha_bar[-1] ** -0.5)

    def timesteps(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
        """Decreasing integer timesteps for sampling, exactly as diffusers' set_timesteps builds them.

        'leading' (diffusers' DDIM default): t = i * (T // n) + steps_offset.
        'trailing': t = round(T - i * T / n) - 1, so sampling starts at T-1.
        'linspace': n values evenly spaced over [0, T-1], rounded.
        """
        T = self.num_train_timesteps
        n = check_positive_int(num_steps, "num_steps")
        if n > T:
            raise ValueError(f"num_steps={n} exceeds the schedule's {T} training timesteps")
        if spacing == "leading":
            ts = torch.arange(n, dtype=torch.float64) * (T // n) + steps_offset
            ts = ts.flip(0)
        elif spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)) - 1
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().flip(0)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
        ts = ts.to(torch.int64)
        if int(ts.max()) >= T or int(ts.min()) < 0:
            raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {T - 1}]")
        return ts

    def sampling_sigmas(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> Tensor:
        """The sampler's grid: sigma at each of `timesteps(...)`, then a final 0 (float64, n + 1)."""
        ts = self.timesteps(num_steps, spacing, steps_offset)
        return torch.cat([self._sigmas[ts], self._sigmas.new_zeros(1)])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep whose noise level is sigma: linear interpolation in log sigma.

        sigma outside [sigma_min, sigma_max] is clamped to the ends; the result is float64.
        """
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_s = (
            torch.as_tensor(sigma, dtype=torch.float64, device=sigma.device).clamp(self.sigma_min, self.sigma_max).log()
        )
        hi = torch.searchsorted(log_sigmas, log_s.reshape(-1)).clamp(1, len(log_sigmas) - 1).reshape(log_s.shape)
        lo = hi - 1
        frac = (log_s - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return lo.to(torch.float64) + frac

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Noise level at a (possibly fractional) timestep, interpolating log sigma; float64.
        Exact on integer timesteps and the inverse of sigma_to_t."""
        t = torch.as_tensor(t)
        tf = t.to(torch.float64)
        if bool((tf < 0).any()) or bool((tf > self.num_train_timesteps - 1).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        log_sigmas = self._log_sigmas.to(t.device)
        lo = tf.floor().to(torch.int64).clamp(max=self.num_train_timesteps - 2)
        frac = tf - lo
        return torch.lerp(log_sigmas[lo], log_sigmas[lo + 1], frac).exp()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {"type": "vp", **d}


@dataclass(frozen=True)
class VESchedule:
    """Variance-exploding noise levels, geometric between sigma_max and sigma_min (Song et al. 2021)."""

    sigma_min: float = 0.002  # smallest non-zero level the sampler visits
    sigma_max: float = 80.0  # level of the prior N(0, sigma_max^2 I)

    def __post_init__(self) -> None:
        lo = check_finite_float(self.sigma_min, "sigma_min")
        hi = check_finite_float(self.sigma_max, "sigma_max")
        if not 0 < lo < hi:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")

    def prior_std(self) -> float:
        return float(self.sigma_max)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """n geometric levels from sigma_max down to sigma_min, then a final 0 (float64, n + 1)."""
        n = check_positive_int(num_steps, "num_steps")
        if n == 1:
            levels = torch.tensor([self.sigma_max], dtype=torch.float64)
        else:
            levels = torch.logspace(math.log10(self.sigma_max), math.log10(self.sigma_min), n, dtype=torch.float64)
        return torch.cat([levels, levels.new_zeros(1)])

    def to_dict(self) -> dict:
        return {"type": "ve", **asdict(self)}


def schedule_from_dict(d: dict) -> VPSchedule | VESchedule:
    """Rebuild a schedule from `to_dict()` output (JSON round trip)."""
    d = dict(d)
    kind = d.pop("type", None)
    cls = {"vp": VPSchedule, "ve": VESchedule}.get(kind)
    if cls is None:
        raise ValueError(f"schedule dict needs 'type' of 'vp' or 've', got {kind!r}")
    allowed = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"unknown {kind} schedule keys {unknown}; allowed: {sorted(allowed)}")
    return cls(**d)
