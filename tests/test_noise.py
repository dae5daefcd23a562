"""Schedules and conversions, against diffusers' schedulers."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffmem import (
    VESchedule,
    VPSchedule,
    alpha_bar_to_sigma,
    beta_to_sigma,
    schedule_from_dict,
    sigma_to_alpha_bar,
    sigma_to_beta,
    ve_to_vp,
    vp_to_ve,
)


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("linear", {}),
        ("linear", {"num_train_timesteps": 500, "beta_start": 5e-4, "beta_end": 0.03}),
        ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
        ("squaredcos_cap_v2", {}),
        ("squaredcos_cap_v2", {"num_train_timesteps": 250}),
    ],
)
def test_betas_equal_diffusers(kind, kw):
    ours = VPSchedule(kind=kind, **kw)
    theirs = DDPMScheduler(beta_schedule=kind, **kw)
    assert torch.equal(ours.betas, theirs.betas.double())  # bit for bit
    # alpha_bar is accumulated in float64 here, float32 there
    torch.testing.assert_close(ours.alpha_bar, theirs.alphas_cumprod.double(), rtol=2e-6, atol=1e-9)


def test_linear_schedule_standard_values():
    """alpha_bar is the cumulative product of 1 - betas (not of betas: a known past bug)."""
    s = VPSchedule()
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert float(s.alpha_bar[0]) == pytest.approx(1 - 1e-4, rel=1e-8)  # betas are float32, as in diffusers
    expected = torch.prod(1 - s.betas[:10])
    assert float(s.alpha_bar[9]) == pytest.approx(float(expected), rel=1e-12)
    assert s.sigma_min == pytest.approx((1e-4 / (1 - 1e-4)) ** 0.5, rel=1e-6)
    assert 150 < s.sigma_max < 160  # alpha_bar_{T-1} ~ 4e-5
    assert (s.sigmas[1:] > s.sigmas[:-1]).all()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 10, 50, 333, 1000])
def test_timesteps_equal_diffusers(spacing, n):
    ours = VPSchedule().timesteps(n, spacing)
    sched = DDIMScheduler(timestep_spacing=spacing)
    sched.set_timesteps(n)
    assert torch.equal(ours, sched.timesteps)


def test_leading_with_offset_equals_diffusers():
    sched = DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(50)
    assert torch.equal(VPSchedule().timesteps(50, "leading", steps_offset=1), sched.timesteps)


def test_sampling_sigmas_end_in_zero_and_follow_timesteps():
    s = VPSchedule()
    sig = s.sampling_sigmas(20)
    assert sig.shape == (21,) and sig[-1] == 0
    torch.testing.assert_close(sig[:-1], s.sigmas[s.timesteps(20)])


def test_conversions_round_trip():
    ab = torch.linspace(0.001, 0.999, 50, dtype=torch.float64)
    sigma = alpha_bar_to_sigma(ab)
    torch.testing.assert_close(sigma_to_alpha_bar(sigma), ab)
    torch.testing.assert_close(beta_to_sigma(sigma_to_beta(sigma)), sigma)
    torch.testing.assert_close(sigma_to_beta(sigma), 1 / sigma**2)
    x_t = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = vp_to_ve(x_t, ab)
    torch.testing.assert_close(x, x_t / ab.sqrt()[:, None])
    torch.testing.assert_close(ve_to_vp(x, sigma), x_t)


def test_sigma_to_t_inverts_the_grid():
    s = VPSchedule()
    t = torch.tensor([0, 1, 17, 500, 999])
    torch.testing.assert_close(s.sigma_to_t(s.sigmas[t]), t.double(), atol=1e-9, rtol=0)
    mid = (s.sigmas[10].log() + s.sigmas[11].log()).div(2).exp()
    assert float(s.sigma_to_t(mid)) == pytest.approx(10.5, abs=1e-9)


def test_ve_geometric():
    s = VESchedule(sigma_min=0.01, sigma_max=10.0)
    sig = s.sampling_sigmas(4)
    torch.testing.assert_close(sig, torch.tensor([10.0, 1.0, 0.1, 0.01, 0.0], dtype=torch.float64))
    assert s.sampling_sigmas(1).tolist() == [10.0, 0.0]


@pytest.mark.parametrize("sched", [VPSchedule("squaredcos_cap_v2", 100), VESchedule(0.1, 20.0)])
def test_schedule_json_round_trip(sched):
    back = schedule_from_dict(json.loads(json.dumps(sched.to_dict())))
    assert back == sched


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VPSchedule(kind="quadratic"), "unknown VP schedule kind"),
        (lambda: VPSchedule(num_train_timesteps=0), "positive integer"),
        (lambda: VPSchedule(beta_start=float("nan")), "finite"),
        (lambda: VPSchedule(beta_start=0.0), r"\(0, 1\)"),
        (lambda: VPSchedule().timesteps(1001), "exceeds"),
        (lambda: VPSchedule().timesteps(10, "uniform"), "unknown timestep spacing"),
        (lambda: VPSchedule().timesteps(10, "leading", steps_offset=500), "outside"),
        (lambda: VESchedule(sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
        (lambda: VESchedule(sigma_min=0.0), "sigma_min < sigma_max"),
        (lambda: schedule_from_dict({"type": "karras"}), "'vp' or 've'"),
        (lambda: schedule_from_dict({"type": "vp", "colour": 1}), "colour"),
    ],
)
def test_bad_schedule_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
