"""Samplers: golden trajectories against diffusers, analytic ODE solutions, memorization of the exact denoiser."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from conftest import random_patterns
from diffmem import (
    EmpiricalDenoiser,
    VESchedule,
    VPSchedule,
    ddim_step,
    get_sampler,
    initial_noise,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_heun,
    seeded_generators,
    vp_model,
)


def gaussian_denoiser(s0: float):
    """Data N(0, s0^2 I): D(x, sigma) = x s0^2 / (s0^2 + sigma^2)."""

    def D(x, sigma):
        return x * (s0**2 / (s0**2 + sigma**2))[:, None]

    return D


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("t_index", [0, 7, 19])
def test_one_ddim_step_equals_diffusers(spacing, eta, t_index):
    """One step for the same model output and timesteps. Spacing: 'leading' (diffusers' DDIM default)
    and 'trailing', with T divisible by the step count so that diffusers' prev_timestep (t - T // n)
    is the next entry of its own timestep list; we always step to the next listed timestep."""
    sched = VPSchedule()
    dd = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    dd.set_timesteps(20)
    ts = dd.timesteps.tolist()
    t = ts[t_index]
    g = torch.Generator().manual_seed(t_index)
    x_t = torch.randn(4, 6, generator=g)
    eps = torch.randn(4, 6, generator=g)
    z = torch.randn(4, 6, generator=g)
    ref = dd.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample

    sig = sched.sampling_sigmas(20, spacing)
    s, n = float(sig[t_index]), float(sig[t_index + 1])
    x = x_t.double() / sched.alpha_bar[t].sqrt()
    x0 = x - s * eps.double()
    out = ddim_step(x, x0, s, n, eta, z.double() if eta > 0 else None)
    ab_prev = 1.0 if t_index == 19 else float(sched.alpha_bar[ts[t_index + 1]])
    torch.testing.assert_close((out * math.sqrt(ab_prev)).float(), ref, rtol=1e-5, atol=1e-5)


def _diffusers_loop(scheduler, model, x_T, generator, **step_kw):
    x = x_T
    for t in scheduler.timesteps:
        eps = model(x, torch.full((x.shape[0],), int(t)))
        x = scheduler.step(eps, t, x, generator=generator, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_trajectory_equals_diffusers(eta):
    sched = VPSchedule()
    den = EmpiricalDenoiser(random_patterns(10, 8, dtype=torch.float32) * 0.5)
    dd = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    dd.set_timesteps(25)
    sig = sched.sampling_sigmas(25)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x_T = torch.randn(16, 8, generator=g1)
    ref = _diffusers_loop(dd, vp_model(den, sched), x_T, g1, eta=eta)
    x = initial_noise((16, 8), float(sig[0]), generator=g2, like=x_T, convention="vp")
    torch.testing.assert_close(x, x_T * math.sqrt(1 + float(sig[0]) ** 2))
    ours = sample_ddim(den, x, sig, eta=eta, generator=g2)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_ddpm_trajectory_equals_diffusers():
    sched = VPSchedule()
    den = EmpiricalDenoiser(random_patterns(10, 8, dtype=torch.float32) * 0.5)
    dd = DDPMScheduler(clip_sample=False)
    dd.set_timesteps(40)
    sig = sched.sampling_sigmas(40)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    x_T = torch.randn(16, 8, generator=g1)
    ref = _diffusers_loop(dd, vp_model(den, sched), x_T, g1)
    x = initial_noise((16, 8), float(sig[0]), generator=g2, like=x_T)
    ours = sample_ddpm(den, x, sig, generator=g2)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_ddpm_is_ddim_with_eta_one_and_euler_is_ddim_with_eta_zero():
    den = EmpiricalDenoiser(random_patterns(12, 5))
    sig = VPSchedule().sampling_sigmas(30)
    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * float(sig[0])
    a = sample_ddpm(den, x, sig, generator=torch.Generator().manual_seed(1))
    b = sample_ddim(den, x, sig, eta=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sample_euler(den, x, sig), sample_ddim(den, x, sig), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler, order", [(sample_euler, 1), (sample_heun, 2)])
def test_ode_solvers_converge_at_their_order(sampler, order):
    """Gaussian data: the probability-flow ODE solution is x(s) = x(S) sqrt((s0^2 + s^2) / (s0^2 + S^2))."""
    s0, S, s_end = 1.0, 10.0, 0.1
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    exact = x * math.sqrt((s0**2 + s_end**2) / (s0**2 + S**2))
    errs = []
    for n in (16, 32, 64):
        grid = torch.logspace(math.log10(S), math.log10(s_end), n + 1, dtype=torch.float64)
        errs.append((sampler(gaussian_denoiser(s0), x, grid) - exact).abs().max().item())
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.15 for r in rates), (errs, rates)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler", "heun"])
def test_exact_denoiser_memorizes(name):
    """Every sample of the exact empirical denoiser ends on a training pattern (SCIENCE.md §4)."""
    xi = random_patterns(20, 16, dtype=torch.float32).clamp(-1, 1)
    den = EmpiricalDenoiser(xi)
    sig = VPSchedule().sampling_sigmas(50)
    g = torch.Generator().manual_seed(3)
    x = initial_noise((64, 16), float(sig[0]), generator=g, like=xi)
    out = get_sampler(name)(den, x, sig, generator=g)
    _, dist = den.nearest(out)
    assert (dist / math.sqrt(16) < 1e-3).all()


def test_ddim_eta0_from_noise_ends_on_patterns_with_ve_schedule():
    xi = random_patterns(30, 8, dtype=torch.float32)
    den = EmpiricalDenoiser(xi)
    sig = VESchedule(0.002, 80.0).sampling_sigmas(40)
    g = torch.Generator().manual_seed(0)
    x = initial_noise((100, 8), 80.0, generator=g, like=xi, convention="ve")
    _, dist = den.nearest(sample_ddim(den, x, sig))
    assert (dist / math.sqrt(8) < 1e-3).all()


def test_callback_and_float64_accumulation():
    den = EmpiricalDenoiser(random_patterns(5, 3, dtype=torch.float32))
    sig = VPSchedule().sampling_sigmas(10)
    seen = []
    x = torch.ones(2, 3)

    def cb(info):
        seen.append((info["i"], info["sigma"], info["sigma_next"], info["x"].dtype, info["denoised"].shape))

    out = sample_heun(den, x, sig, callback=cb, accum_dtype=torch.float64)
    assert out.dtype == torch.float32
    assert [s[0] for s in seen] == list(range(10))
    assert seen[-1][2] == 0.0 and seen[0][1] == pytest.approx(float(sig[0]))
    assert all(s[3] == torch.float64 and s[4] == (2, 3) for s in seen)


def test_per_sample_generators_make_a_sample_independent_of_its_batch():
    den = EmpiricalDenoiser(random_patterns(6, 4, dtype=torch.float32))
    sig = VPSchedule().sampling_sigmas(20)
    seeds = [3, 14, 15]
    like = torch.zeros(0)
    x = initial_noise((3, 4), float(sig[0]), generator=seeded_generators(seeds, "cpu"), like=like)
    batch = sample_ddpm(den, x, sig, generator=seeded_generators(seeds, "cpu"))
    x1 = initial_noise((1, 4), float(sig[0]), generator=seeded_generators([14], "cpu"), like=like)
    alone = sample_ddpm(den, x1, sig, generator=seeded_generators([14], "cpu"))
    torch.testing.assert_close(batch[1:2], alone)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda d, x, s: sample_ddpm(d, x, s), "Generator"),
        (lambda d, x, s: sample_ddim(d, x, s, eta=0.5), "Generator"),
        (lambda d, x, s: sample_ddim(d, x, s, eta=1.5), "eta must be <= 1"),
        (lambda d, x, s: sample_euler(d, x, s.flip(0)), "strictly decreasing"),
        (lambda d, x, s: sample_euler(d, x, s[:1]), "at least 2 levels"),
        (lambda d, x, s: sample_euler(d, x, torch.tensor([1.0, -0.5])), ">= 0"),
        (lambda d, x, s: sample_euler(d, x * float("nan"), s), "NaN"),
        (lambda d, x, s: get_sampler("dpm++"), "unknown sampler"),
        (lambda d, x, s: initial_noise((2, 3), 1.0, generator=None, like=x), "Generator"),
        (lambda d, x, s: initial_noise((2, 3), 1.0, generator=[torch.Generator()], like=x), "one per sample"),
        (
            lambda d, x, s: initial_noise((2, 3), 1.0, generator=torch.Generator(), like=x, convention="edm"),
            "convention",
        ),
    ],
)
def test_sampler_bad_input(call, match):
    den = EmpiricalDenoiser(random_patterns(4, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match=match):
        call(den, torch.ones(2, 3), VPSchedule().sampling_sigmas(5))
