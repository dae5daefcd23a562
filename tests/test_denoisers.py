"""The exact empirical denoiser is one retrieval step; Tweedie; the VP adapters."""

import pytest
import torch

from conftest import random_patterns
from diffmem import DenseAM, EmpiricalDenoiser, VPNetworkDenoiser, VPSchedule, score, vp_model


def test_empirical_denoiser_is_one_retrieval_step():
    xi = random_patterns(9, 5)
    den = EmpiricalDenoiser(xi)
    x = random_patterns(6, 5, seed=1) * 2
    sigma = torch.tensor([0.2, 0.5, 1.0, 2.0, 5.0, 9.0], dtype=torch.float64)
    expected = DenseAM(xi).retrieve(x, 1 / sigma**2)
    torch.testing.assert_close(den(x, sigma), expected)
    torch.testing.assert_close(den(x, 0.7), DenseAM(xi).retrieve(x, 0.7**-2))


def test_tweedie_autograd_score_equals_denoiser_score():
    """grad log p_sigma(x) (autograd of the exact -log p) = (D(x, sigma) - x) / sigma^2."""
    xi = random_patterns(7, 4)
    den = EmpiricalDenoiser(xi)
    x = (random_patterns(5, 4, seed=2) * 1.5).requires_grad_(True)
    for sigma in (0.3, 1.0, 3.0):
        (g,) = torch.autograd.grad(-den.neg_log_prob(x, sigma).sum(), x)
        torch.testing.assert_close(g, den.score(x.detach(), sigma), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g, score(den, x.detach(), torch.full((5,), sigma, dtype=torch.float64)))


def test_image_shaped_patterns():
    xi = random_patterns(4, 2 * 3 * 3).reshape(4, 2, 3, 3)
    den = EmpiricalDenoiser(xi)
    x = random_patterns(5, 18, seed=1).reshape(5, 2, 3, 3)
    out = den(x, 0.8)
    assert out.shape == (5, 2, 3, 3)
    torch.testing.assert_close(out.reshape(5, -1), DenseAM(xi.reshape(4, -1)).retrieve(x.reshape(5, -1), 0.8**-2))
    assert den.neg_log_prob(x, 0.8).shape == (5,)
    with pytest.raises(ValueError, match=r"shape \(B, 2, 3, 3\)"):
        den(x.reshape(5, 18), 0.8)


def test_sigma_zero_returns_nearest_pattern_and_posterior_weights():
    xi = random_patterns(6, 3)
    den = EmpiricalDenoiser(xi)
    x = xi[[2, 4]] + 0.01
    sig = torch.tensor([0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(den(x, sig), xi[[2, 4]])
    w = den.posterior_weights(x, 0.05)
    assert w.shape == (2, 6) and torch.allclose(w.sum(1), torch.ones(2, dtype=torch.float64))
    assert w.argmax(1).tolist() == [2, 4]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_vp_adapters_round_trip(prediction_type):
    """EmpiricalDenoiser -> VP network (x_t, t) -> VPNetworkDenoiser gives back D(x, sigma)."""
    sched = VPSchedule()
    xi = random_patterns(5, 3)
    den = EmpiricalDenoiser(xi)
    net = vp_model(den, sched, prediction_type=prediction_type)
    back = VPNetworkDenoiser(net, sched, prediction_type=prediction_type)
    t = torch.tensor([0, 10, 200, 640, 999])
    sigma = sched.sigmas[t]
    x = xi + sigma[:, None] * random_patterns(5, 3, seed=3)
    torch.testing.assert_close(back(x, sigma), den(x, sigma), rtol=1e-9, atol=1e-9)
    cont = VPNetworkDenoiser(net, sched, prediction_type=prediction_type, timestep="continuous")
    off_grid = sigma * torch.tensor([1.001, 1.001, 0.999, 1.001, 0.999], dtype=torch.float64)  # inside the grid
    torch.testing.assert_close(cont(x, off_grid), den(x, off_grid), rtol=1e-9, atol=1e-9)


def test_vp_epsilon_formula():
    """An epsilon network that always says eps = 1 gives x0 = x - sigma (VE) at every level."""
    sched = VPSchedule()
    seen = {}

    def net(x_t, t):
        seen["t"], seen["x_t"] = t, x_t
        return torch.ones_like(x_t)

    den = VPNetworkDenoiser(net, sched)
    t = torch.tensor([3, 400])
    sigma = sched.sigmas[t]
    x = torch.full((2, 4), 2.0, dtype=torch.float64)
    out = den(x, sigma)
    torch.testing.assert_close(out, x - sigma[:, None])
    assert seen["t"].tolist() == [3, 400]
    torch.testing.assert_close(seen["x_t"], x * sched.alpha_bar[t].sqrt()[:, None])


def test_vp_denoiser_rejects_off_grid_sigma_and_bad_options():
    sched = VPSchedule()
    den = VPNetworkDenoiser(lambda x_t, t: torch.zeros_like(x_t), sched)
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="not on the VP schedule's grid"):
        den(x, torch.tensor([0.5 * (sched.sigmas[100] + sched.sigmas[101])], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma = 0"):
        den(x, torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="prediction_type"):
        VPNetworkDenoiser(lambda x_t, t: x_t, sched, prediction_type="eps")
    with pytest.raises(ValueError, match="timestep mode"):
        VPNetworkDenoiser(lambda x_t, t: x_t, sched, timestep="floor")
    bad_shape = VPNetworkDenoiser(lambda x_t, t: x_t[:, :1], sched)
    with pytest.raises(ValueError, match="returned shape"):
        bad_shape(x, sched.sigmas[[5]])


def test_continuous_timesteps_feed_fractional_t():
    sched = VPSchedule()
    seen = {}

    def net(x_t, t):
        seen["t"] = t
        return torch.zeros_like(x_t)

    mid = (sched.sigmas[10].log() + sched.sigmas[11].log()).div(2).exp()
    VPNetworkDenoiser(net, sched, timestep="continuous")(torch.zeros(1, 2, dtype=torch.float64), mid[None])
    assert float(seen["t"]) == pytest.approx(10.5)


def test_empirical_denoiser_bad_input():
    with pytest.raises(ValueError, match="NaN or Inf"):
        EmpiricalDenoiser(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="at least 2 dims"):
        EmpiricalDenoiser(torch.zeros(3))
    den = EmpiricalDenoiser(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        den(torch.zeros(1, 3), -0.1)
    with pytest.raises(ValueError, match="batch shape"):
        den(torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        den.neg_log_prob(torch.zeros(1, 3), 0.0)
