"""Samplers over any denoiser D(x, sigma), one shared signature (k-diffusion style):

    sample_x(denoiser, x, sigmas, *, generator=None, callback=None, accum_dtype=None, ...)

x is the starting VE state at sigmas[0] (see initial_noise), sigmas a decreasing 1-D grid that
normally ends in 0. Glossary (SCIENCE.md §2, §4):

    s, n      current and next noise level sigma_i, sigma_{i+1}
    x0        denoised estimate D(x, s)
    eps       (x - x0) / s, the noise estimate; the probability-flow ODE is dx/dsigma = eps
    s_up      std of the noise injected by a step (the DDIM papers' "sigma_t"; not a noise level)

In VE coordinates DDPM's VP chain is x_s = x_n + sqrt(s^2 - n^2) z, so every step below is the
VP algorithm divided by sqrt(alpha_bar); the tests check this against diffusers' schedulers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffmem.core._checks import check_finite_float
from diffmem.core.denoisers import Denoiser
from diffmem.core.random import GeneratorLike, randn

Callback = Callable[[dict], None]
CONVENTIONS = ("vp", "ve")


def initial_noise(
    shape: tuple[int, ...], sigma_start: float, *, generator: GeneratorLike, like: Tensor, convention: str = "vp"
) -> Tensor:
    """Starting state at level sigma_start, in like's dtype/device.

    'vp': x_T ~ N(0, I) in VP coordinates, i.e. std sqrt(1 + sigma^2) in VE coordinates (DDPM/DDIM).
    've': std sigma (EDM / score-SDE convention).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose one of {CONVENTIONS}")
    s = check_finite_float(sigma_start, "sigma_start", low=0.0)
    scale = math.sqrt(1 + s * s) if convention == "vp" else s
    return randn(shape, generator, like) * scale


def _check_grid(x: Tensor, sigmas: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] == 0:
        raise ValueError("x must be a tensor with a non-empty batch dimension first")
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid with at least 2 levels, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()) or bool((sigmas < 0).any()):
        raise ValueError("sigmas must be finite and >= 0")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (from noise to data)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the starting state x contains NaN or Inf")
    return sigmas.to(torch.float64)


def _loop(
    step: Callable[[Tensor, Callable[[Tensor, float], Tensor], float, float], Tensor],
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    callback: Callback | None,
    accum_dtype: torch.dtype | None,
) -> Tensor:
    """Shared loop: x is accumulated in accum_dtype (e.g. float64), the denoiser sees x's dtype."""
    sigmas = _check_grid(x, sigmas)
    in_dtype = x.dtype
    acc = x.to(accum_dtype or in_dtype)
    b = x.shape[0]
    denoised: list[Tensor] = []

    def D(state: Tensor, s: float) -> Tensor:
        sig = torch.full((b,), s, dtype=in_dtype, device=x.device)
        out = denoiser(state.to(in_dtype), sig).to(acc.dtype)
        denoised.append(out)
        return out

    for i in range(len(sigmas) - 1):
        s, n = float(sigmas[i]), float(sigmas[i + 1])
        denoised.clear()
        acc = step(acc, D, s, n)
        if callback is not None:
            callback({"i": i, "sigma": s, "sigma_next": n, "x": acc, "denoised": denoised[0]})
    return acc.to(in_dtype)


def ddim_step(x: Tensor, x0: Tensor, s: float, n: float, eta: float, noise: Tensor | None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in VE form:
    x_n = x0 + sqrt(n^2 - s_up^2) eps + s_up z,  s_up = eta * n * sqrt(s^2 - n^2) / s.
    """
    eps = (x - x0) / s
    s_up = eta * n * math.sqrt(max(s * s - n * n, 0.0)) / s
    out = x0 + math.sqrt(max(n * n - s_up * s_up, 0.0)) * eps
    if s_up > 0:
        if noise is None:
            raise ValueError("a stochastic DDIM step (eta > 0) needs noise")
        out = out + s_up * noise
    return out


def ddpm_step(x: Tensor, x0: Tensor, s: float, n: float, noise: Tensor | None) -> Tensor:
    """DDPM ancestral step (Ho et al. 2020, eqs. 6-7): sample the posterior q(x_n | x_s, x0),
    mean x0 + (n^2 / s^2)(x - x0), std n sqrt(s^2 - n^2) / s (beta-tilde in VE coordinates).
    """
    mean = x0 + (n * n) / (s * s) * (x - x0)
    std = n * math.sqrt(max(s * s - n * n, 0.0)) / s
    if std == 0:
        return mean
    if noise is None:
        raise ValueError("a DDPM step with n > 0 needs noise")
    return mean + std * noise


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike | None = None,
    callback: Callback | None = None,
    accum_dtype: torch.dtype | None = None,
) -> Tensor:
    """DDPM ancestral sampling on the grid `sigmas` (any subsequence of the training levels)."""
    if generator is None:
        raise ValueError("DDPM ancestral sampling draws noise: pass a torch.Generator (or one per sample)")

    def step(xc, D, s, n):
        x0 = D(xc, s)
        noise = randn(xc.shape, generator, xc) if n > 0 else None
        return ddpm_step(xc, x0, s, n, noise)

    return _loop(step, denoiser, x, sigmas, callback, accum_dtype)


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: GeneratorLike | None = None,
    callback: Callback | None = None,
    accum_dtype: torch.dtype | None = None,
) -> Tensor:
    """DDIM with stochasticity eta in [0, 1]: 0 is deterministic, 1 is DDPM ancestral sampling."""
    eta = check_finite_float(eta, "eta", low=0.0, high=1.0)
    if eta > 0 and generator is None:
        raise ValueError("DDIM with eta > 0 draws noise: pass a torch.Generator (or one per sample)")

    def step(xc, D, s, n):
        x0 = D(xc, s)
        noise = randn(xc.shape, generator, xc) if eta > 0 and n > 0 else None
        return ddim_step(xc, x0, s, n, eta, noise)

    return _loop(step, denoiser, x, sigmas, callback, accum_dtype)


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike | None = None,
    callback: Callback | None = None,
    accum_dtype: torch.dtype | None = None,
) -> Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4).
    Deterministic; generator is accepted for the shared signature and unused. Equals DDIM with eta = 0.
    """

    def step(xc, D, s, n):
        return xc + (n - s) * (xc - D(xc, s)) / s

    return _loop(step, denoiser, x, sigmas, callback, accum_dtype)


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike | None = None,
    callback: Callback | None = None,
    accum_dtype: torch.dtype | None = None,
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 with
    S_churn = 0); the last step to sigma = 0 is an Euler step. Two denoiser calls per step otherwise.
    """

    def step(xc, D, s, n):
        d = (xc - D(xc, s)) / s
        x_next = xc + (n - s) * d
        if n == 0:
            return x_next
        d_next = (x_next - D(x_next, n)) / n
        return xc + (n - s) * 0.5 * (d + d_next)

    return _loop(step, denoiser, x, sigmas, callback, accum_dtype)


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "ode": sample_heun,  # the probability-flow ODE with its second-order solver
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Sampler function by name: 'ddpm', 'ddim', 'euler', 'heun', or 'ode' (= 'heun')."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {tuple(SAMPLERS)}") from None
