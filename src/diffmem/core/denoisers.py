"""The denoiser contract D(x, sigma) -> estimate of x0, and the exact empirical denoiser (SCIENCE.md §4).

x is a VE state x = x0 + sigma * eps of shape (B, *event_shape); sigma is a float or a tensor of
shape (B,). Networks trained in other parameterisations (epsilon / x0 / v prediction with VP
integer timesteps) are converted at this boundary by VPNetworkDenoiser, so samplers and analyses
speak sigma only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from diffmem.core._checks import as_level, check_finite_float, check_patterns
from diffmem.core.memory import DEFAULT_CHUNK, DenseAM, PatternSource, is_pattern_source
from diffmem.core.noise import VPSchedule, sigma_to_alpha_bar, sigma_to_beta, vp_to_ve

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # diffusers' names for eps / x0 / v targets
TIMESTEP_MODES = ("nearest", "continuous")


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Estimate of x0 (B, *event_shape) from the VE state x (B, *event_shape) at level sigma (B,)."""
        ...


def _per_sample(sigma: float | Tensor, x: Tensor, event_ndim: int) -> Tensor:
    """sigma as a (B,) tensor for a batch x of shape (B, *event), validated (sigma >= 0)."""
    s = as_level(sigma, x, "sigma", allow_zero=True)
    batch = x.shape[: x.ndim - event_ndim]
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != batch:
        raise ValueError(f"sigma has shape {tuple(s.shape)}; expected a scalar or the batch shape {tuple(batch)}")
    return s


def score(denoiser: Denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    """Score grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie's formula)."""
    s = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
    return (denoiser(x, sigma) - x) / s**2


class EmpiricalDenoiser:
    """The exact optimal denoiser of the training set: D(x, sigma) = m(x; beta = 1 / sigma^2).

    By Tweedie's formula E[x0 | x_sigma = x] under p_sigma = (1/K) sum_mu N(xi_mu, sigma^2 I) is one
    retrieval step of the dense memory. It needs no training and memorizes at any K.

    patterns: (K, *event_shape), e.g. (K, D) vectors or (K, C, H, W) images, or a PatternSource read
    block by block (its `event_shape` attribute when it has one, else (D,)). At sigma = 0 the
    denoiser returns the nearest pattern (the beta -> infinity limit).
    """

    def __init__(self, patterns: Tensor | PatternSource, *, chunk_size: int = DEFAULT_CHUNK):
        if is_pattern_source(patterns):
            self.memory = DenseAM(patterns, chunk_size=chunk_size)
            self.event_shape = tuple(getattr(patterns, "event_shape", (patterns.dim,)))
            if math.prod(self.event_shape) != patterns.dim:
                raise ValueError(
                    f"the pattern source's event_shape {self.event_shape} does not hold its D = {patterns.dim} values"
                )
            return
        if not isinstance(patterns, Tensor) or patterns.ndim < 2:
            shape = tuple(patterns.shape) if isinstance(patterns, Tensor) else type(patterns).__name__
            raise ValueError(f"patterns must have shape (K, *event_shape) with at least 2 dims, got {shape}")
        self.event_shape = tuple(patterns.shape[1:])
        flat = patterns.reshape(patterns.shape[0], -1)
        check_patterns(flat)
        self.memory = DenseAM(flat, chunk_size=chunk_size)

    @property
    def patterns(self) -> Tensor:
        """(K, *event_shape) (a ValueError for a denoiser over a PatternSource, which holds no such tensor)."""
        return self.memory.patterns.reshape(-1, *self.event_shape)

    def _flatten(self, x: Tensor) -> Tensor:
        n = len(self.event_shape)
        if not isinstance(x, Tensor) or tuple(x.shape[x.ndim - n :]) != self.event_shape or x.ndim <= n:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.event_shape))}), got {got}")
        return x.reshape(*x.shape[: x.ndim - n], -1)

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        xf = self._flatten(x)
        s = _per_sample(sigma, xf, 1)
        zero = s == 0
        out = self.memory.retrieve(xf, sigma_to_beta(torch.where(zero, torch.ones_like(s), s)))
        if bool(zero.any()):
            _, nearest = self.memory.nearest_pattern(xf)
            out = torch.where(zero[..., None], nearest, out)
        return out.reshape(x.shape)

    def neg_log_prob(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """-log p_sigma(x) = beta E(x; beta) + (D/2) log(2 pi sigma^2) + log K, beta = 1/sigma^2 (§4). Shape (B,)."""
        xf = self._flatten(x)
        s = as_level(sigma, xf, "sigma", allow_zero=False)
        beta = sigma_to_beta(s)
        d, k = self.memory.dim, self.memory.num_patterns
        return beta * self.memory.energy(xf, beta) + 0.5 * d * torch.log(2 * math.pi * s**2) + math.log(k)

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """grad log p_sigma(x) = -(x - m(x)) / sigma^2."""
        s = _per_sample(sigma, self._flatten(x), 1)
        return score(self, x, s)

    def posterior_weights(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """p(x0 = xi_mu | x_sigma = x) = w_mu(x; 1/sigma^2), shape (B, K)."""
        xf = self._flatten(x)
        return self.memory.weights(xf, sigma_to_beta(as_level(sigma, xf, "sigma", allow_zero=False)))

    def nearest(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Index of the nearest pattern (B,) and its L2 distance (B,)."""
        return self.memory.nearest(self._flatten(x))


class VPNetworkDenoiser:
    """Turns a VP network model(x_t, t) with integer DDPM timesteps into D(x, sigma).

    prediction_type: what the network outputs, in diffusers' names:
      'epsilon'       eps               x0 = x - sigma * eps
      'sample'        x0                x0 = output
      'v_prediction'  v = sqrt(ab) eps - sqrt(1 - ab) x0  ->  x0 = sqrt(ab) x_t - sqrt(1 - ab) v
    timestep: 'nearest' feeds the integer timestep whose sigma equals the requested one (an error if
    sigma is not on the schedule's grid); 'continuous' feeds the fractional timestep interpolated in
    log sigma, for networks that accept float timesteps.
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        schedule: VPSchedule,
        *,
        prediction_type: str = "epsilon",
        timestep: str = "nearest",
        grid_rtol: float = 1e-4,  # relative mismatch tolerated between sigma and its grid value
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
        if timestep not in TIMESTEP_MODES:
            raise ValueError(f"unknown timestep mode {timestep!r}; choose one of {TIMESTEP_MODES}")
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.timestep = timestep
        self.grid_rtol = grid_rtol

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        s = _per_sample(sigma, x, x.ndim - 1)
        if bool((s == 0).any()):
            raise ValueError("a VP network is not defined at sigma = 0; samplers never call it there")
        t = self.schedule.sigma_to_t(s)
        if self.timestep == "nearest":
            t = t.round().to(torch.int64)
            grid = self.schedule._sigmas.to(x.device)[t]
            bad = (grid - s.double()).abs() > self.grid_rtol * s.double()
            if bool(bad.any()):
                raise ValueError(
                    f"sigma={s[bad][0].item():.6g} is not on the VP schedule's grid; use the schedule's "
                    "sampling_sigmas or timestep='continuous'"
                )
            s = grid.to(x.dtype)
        view = (-1,) + (1,) * (x.ndim - 1)
        ab = sigma_to_alpha_bar(s).reshape(view)
        x_t = x * ab.sqrt()
        out = self.model(x_t, t)
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        if self.prediction_type == "epsilon":
            return x - s.reshape(view) * out
        if self.prediction_type == "sample":
            return out
        return ab.sqrt() * x_t - (1 - ab).sqrt() * out


class ClippedDenoiser:
    """D(x, sigma) with the predicted clean sample clamped to [low, high], the data's range (DDPM's
    and diffusers' clip_sample). A sampler step built on x0 then never leaves the range the data
    lives in, however wrong an undertrained network is; the score it implies is no longer a
    gradient, so energies and curvature use the unclipped denoiser."""

    def __init__(self, denoiser: Denoiser, low: float, high: float):
        low, high = check_finite_float(low, "low"), check_finite_float(high, "high")
        if not low < high:
            raise ValueError(f"the clipping range needs low < high, got [{low}, {high}]")
        self.denoiser, self.low, self.high = denoiser, low, high

    def __call__(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        return self.denoiser(x, sigma).clamp(self.low, self.high)


def vp_model(denoiser: Denoiser, schedule: VPSchedule, *, prediction_type: str = "epsilon") -> Callable:
    """The inverse adapter: a VP network model(x_t, t) -> eps / x0 / v built from any D(x, sigma).

    Lets the exact empirical denoiser stand in for a trained network wherever a VP model is expected
    (for example in diffusers' schedulers).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")

    def model(x_t: Tensor, t: Tensor | float | Sequence[float]) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        sigma = schedule.t_to_sigma(t).to(x_t.dtype)  # exact on integer t, log-interpolated between
        ab = sigma_to_alpha_bar(sigma)
        x = vp_to_ve(x_t, ab)
        x0 = denoiser(x, sigma)
        view = (-1,) + (1,) * (x_t.ndim - 1)
        eps = (x - x0) / sigma.reshape(view)
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        return ab.sqrt().reshape(view) * eps - (1 - ab).sqrt().reshape(view) * x0

    return model
