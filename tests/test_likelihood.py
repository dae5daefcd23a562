"""-log p_sigma(x) by the probability-flow ODE against closed forms: the exact empirical model (a
Gaussian mixture, SCIENCE.md §4) and a Gaussian data model, in float64; Hutchinson's estimator's
bias and coverage; the energy stage's absolute option against its line integrals."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import random_patterns
from diffmem.core import EmpiricalDenoiser, LikelihoodResult, log_likelihood
from diffmem.core.likelihood import rademacher
from diffmem.evaluate.stages import energy as energy_stage
from diffmem.evaluate.stages.energy import EnergyConfig
from diffmem.evaluate.stages.energy import run as run_energy
from diffmem.io.files import write_csv_atomic, write_json_atomic


class GaussianDenoiser:
    """N(mu, Sigma) data, D = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), p_sigma = N(mu, Sigma + sigma^2 I)"""

    def __init__(self, mu, cov):
        self.mu = mu
        self.lam, self.u = torch.linalg.eigh(cov)  # Sigma = U diag(lam) U^T

    def __call__(self, x, sigma):
        w = (x - self.mu) @ self.u  # (B, D) in the eigenbasis
        return self.mu + (w * self.lam / (self.lam + sigma[:, None] ** 2)) @ self.u.T

    def neg_log_prob(self, x, sigma):
        w = (x - self.mu) @ self.u
        var = self.lam + sigma**2
        return 0.5 * (w**2 / var + torch.log(2 * math.pi * var)).sum(1)


def _gaussian(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    return GaussianDenoiser(mu, a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))


def _mixture_points(xi, seed):
    """Points near two patterns and two in between, where the posterior is spread."""
    g = torch.Generator().manual_seed(seed)
    near = xi[:2] + 0.3 * torch.randn(2, xi.shape[1], generator=g, dtype=torch.float64)
    return torch.cat([near, torch.randn(2, xi.shape[1], generator=g, dtype=torch.float64)])


# -- the exact empirical model: a Gaussian mixture over the patterns ---------------------------------------------------


@pytest.mark.parametrize("d, sigma", [(2, 0.15), (5, 0.4), (8, 0.3), (8, 2.0)])
def test_exact_divergence_matches_the_mixtures_closed_form(d, sigma):
    den = EmpiricalDenoiser(random_patterns(4, d, seed=d))
    x = _mixture_points(den.patterns, seed=d + 1)
    r = log_likelihood(den, x, sigma, sigma_max=1e5, rtol=1e-6, atol=1e-6)
    truth = den.neg_log_prob(x, sigma)
    assert isinstance(r, LikelihoodResult) and r.nll.dtype == torch.float64 and bool(r.converged.all())
    miss = (r.nll - truth).abs()
    assert bool((miss <= r.error).all()), (miss, r.error)
    assert float(miss.max()) < 1e-3 and float(r.error.max()) < 1e-3
    # the error estimate is not vacuous either: within 50 times what it bounds, or at roundoff
    assert float(r.error.max()) < 50 * float(miss.max()) + 1e-8
    # the parts add up, and the exact divergence has no standard error
    torch.testing.assert_close(r.nll, r.prior - r.divergence)
    assert bool((r.stderr == 0).all()) and r.n_probes is None and r.divergence_method == "exact"
    assert r.latent.shape == x.shape and bool((r.n_calls > 0).all())


def test_image_shaped_states_and_per_point_sigma():
    xi = random_patterns(3, 6, seed=3)
    den = EmpiricalDenoiser(xi.reshape(3, 1, 2, 3))
    x = _mixture_points(xi, seed=4)[:3]
    sigma = torch.tensor([0.3, 0.6, 1.2], dtype=torch.float64)
    r = log_likelihood(den, x.reshape(3, 1, 2, 3), sigma, sigma_max=1e4, rtol=1e-6, atol=1e-6)
    truth = den.neg_log_prob(x.reshape(3, 1, 2, 3), sigma)
    assert bool(((r.nll - truth).abs() <= r.error).all())
    assert r.latent.shape == (3, 1, 2, 3)
    alone = log_likelihood(den, x[1:2].reshape(1, 1, 2, 3), 0.6, sigma_max=1e4, rtol=1e-6, atol=1e-6)
    assert float(alone.nll[0]) == pytest.approx(float(r.nll[1]), abs=float(r.error[1]))


def test_hutchinson_is_unbiased_and_its_standard_error_covers_at_the_stated_rate():
    """Rademacher probes fixed along each trajectory: each point's n_probes estimates are iid and
    unbiased, so (nll - truth) / stderr is t-distributed with n_probes - 1 = 7 degrees of freedom:
    within one standard error 65% of the time, within two 91%."""
    d, copies = 6, 50
    den = EmpiricalDenoiser(random_patterns(4, d, seed=6))
    pts = _mixture_points(den.patterns, seed=7)
    x = pts.repeat_interleave(copies, 0)  # 50 independent estimates of each of 4 points
    gen = torch.Generator().manual_seed(1)
    r = log_likelihood(
        den, x, 0.5, sigma_max=1e4, divergence="hutchinson", n_probes=8, generator=gen, rtol=1e-6, atol=1e-6
    )
    truth = den.neg_log_prob(x, 0.5)
    assert r.divergence_method == "hutchinson" and r.n_probes == 8
    est = r.nll.reshape(4, copies)
    se_of_mean = est.std(1) / math.sqrt(copies)
    bias_z = (est.mean(1) - truth.reshape(4, copies)[:, 0]) / se_of_mean
    assert float(bias_z.abs().max()) < 3, bias_z
    # the deterministic parts are negligible here, so the error is the standard error
    assert float((r.ode_error + r.prior_error).max()) < 0.05 * float(r.stderr.min())
    z = ((r.nll - truth) / r.stderr).abs()
    assert 0.55 <= float((z <= 1).double().mean()) <= 0.76  # t7: 0.65, +- 3 binomial sd over 200
    assert float((z <= 2).double().mean()) >= 0.85  # t7: 0.91
    # the standard error is that of the probes' spread: it matches the estimates' scatter over seeds
    assert float((r.stderr.reshape(4, copies).mean(1) / est.std(1)).min()) > 0.7


def test_probes_come_from_the_generator_one_per_point_when_given_a_sequence():
    like = torch.zeros(0, dtype=torch.float64)
    v = rademacher((3, 4, 5), torch.Generator().manual_seed(0), like)
    assert set(v.unique().tolist()) == {-1.0, 1.0} and v.dtype == torch.float64
    torch.testing.assert_close(v, rademacher((3, 4, 5), torch.Generator().manual_seed(0), like))
    per_point = [torch.Generator().manual_seed(s) for s in (5, 6)]
    w = rademacher((2, 4, 5), per_point, like)
    torch.testing.assert_close(w[1], rademacher((1, 4, 5), [torch.Generator().manual_seed(6)], like)[0])


# -- a Gaussian data model ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_gaussian_data_model_agrees(sigma):
    den = _gaussian()
    x = den.mu + torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = log_likelihood(den, x, sigma, sigma_max=1e5, rtol=1e-6, atol=1e-6)
    miss = (r.nll - den.neg_log_prob(x, sigma)).abs()
    assert bool((miss <= r.error).all()) and float(miss.max()) < 1e-4


def test_the_result_converges_as_sigma_max_grows_and_prior_error_bounds_the_gap():
    """The prior N(0, sigma_max^2 I) neglects the data's mean and spread: the gap to the truth falls
    as 1 / sigma_max (the mean is not zero here), and prior_error bounds it at every sigma_max."""
    den = _gaussian(seed=1)
    x = den.mu + torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    truth = den.neg_log_prob(x, 0.5)
    gaps = []
    for sigma_max in (1e1, 1e2, 1e3):
        r = log_likelihood(den, x, 0.5, sigma_max=sigma_max, rtol=1e-6, atol=1e-6)
        gap = (r.nll - truth).abs()
        assert bool((gap <= r.error).all()) and bool((r.prior_error >= r.ode_error).all())
        gaps.append(float(gap.max()))
    assert gaps[0] > 5 * gaps[1] > 25 * gaps[2] and gaps[0] > 1e-2  # about tenfold per decade


def test_a_difference_has_its_own_prior_error_far_below_the_sum_and_still_covers():
    """Data far from the origin: the prior's neglected term (mostly |mean|^2 / sigma_max^2) is large for each point
    but nearly the same for all. The energy nll - nll[0] keeps an error estimated on the difference, which covers
    the true difference and is far below the sum of the two points' errors (and never above it)."""
    den = _gaussian(seed=4)
    den.mu = den.mu + 20.0
    x = den.mu + torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = log_likelihood(den, x, 0.5, sigma_max=8.0, rtol=1e-7, atol=1e-7)
    truth = den.neg_log_prob(x, 0.5)
    assert float(r.prior_error.min()) > 1e-2  # each point's own prior error is not small here
    value, error = r.difference(0)
    assert value[0] == 0 and r.nll_closer_priors.shape == (4, 2)
    assert bool(((value - (truth - truth[0])).abs() <= error).all())
    summed = r.error + r.error[0]
    assert float((error[1:] / summed[1:]).max()) < 0.3 and bool((error <= summed).all())
    # Hutchinson standard errors of the two points add in quadrature
    h = log_likelihood(
        den, x, 0.5, sigma_max=1e3, divergence="hutchinson", n_probes=4, generator=torch.Generator().manual_seed(0)
    )
    _, herror = h.difference(0)
    quadrature = (h.stderr.square() + h.stderr[0].square()).sqrt()
    assert bool((herror >= quadrature).all()) and bool(
        (herror[1:] < h.stderr[1:] + h.stderr[0] + h.ode_error[1:] + h.ode_error[0] + 2 * h.prior_error.max()).all()
    )


def test_fixed_step_rk4_agrees_where_its_grid_resolves_the_density():
    den = _gaussian()
    x = den.mu + torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    truth = den.neg_log_prob(x, 1.0)
    coarse = log_likelihood(den, x, 1.0, sigma_max=1e4, method="rk4", steps=8)
    fine = log_likelihood(den, x, 1.0, sigma_max=1e4, method="rk4", steps=32)
    for r in (coarse, fine):
        assert r.method == "rk4" and bool(((r.nll - truth).abs() <= r.error).all())
    assert float(fine.ode_error.max()) < float(coarse.ode_error.max()) / 50  # fourth order: 4^4 = 256 ideally
    # 4 evaluations a step: 32 + 2 x 3 steps (the legs to sigma_max / 2 and sigma_max), then 64 + 2 x 5
    assert fine.n_calls.tolist() == [4 * (38 + 74)] * 3


def test_float32_states_are_passed_to_the_denoiser_in_float32():
    xi = random_patterns(3, 2, seed=8)
    exact = EmpiricalDenoiser(xi)
    den32 = EmpiricalDenoiser(xi.float())
    seen = set()

    def denoiser(x, sigma):
        seen.add((x.dtype, sigma.dtype))
        return den32(x, sigma)

    x = _mixture_points(xi, seed=9)
    r = log_likelihood(denoiser, x.float(), 1.0, sigma_max=1e3, rtol=1e-4, atol=1e-4)
    assert seen == {(torch.float32, torch.float32)} and r.nll.dtype == torch.float64
    assert float((r.nll - exact.neg_log_prob(x, 1.0)).abs().max()) < 1e-2


def test_a_point_out_of_calls_is_marked_not_converged():
    den = EmpiricalDenoiser(random_patterns(3, 2))
    r = log_likelihood(den, random_patterns(2, 2, seed=1), 0.2, sigma_max=100.0, max_calls=20)
    assert not bool(r.converged.any())
    assert bool(r.nll.isnan().all()) and bool(r.error.isinf().all())


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_a_denoiser_returning_nan_marks_its_point_not_converged(method):
    den = EmpiricalDenoiser(random_patterns(3, 2))

    def broken(x, sigma):  # NaN wherever the first coordinate is positive (or NaN), as a diverged network
        out = den(torch.nan_to_num(x), sigma)
        return torch.where(x[:, :1] <= 0, out, math.nan)

    x = torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    r = log_likelihood(broken, x, 0.5, sigma_max=2.0, method=method, steps=4)
    assert r.converged.tolist() == [True, False] and math.isnan(float(r.nll[1])) and math.isfinite(float(r.nll[0]))
    assert int(r.n_calls[1]) < 100  # given up at once, not after max_calls


def test_bad_input_is_refused_with_a_fix():
    den = EmpiricalDenoiser(random_patterns(3, 2))
    x = random_patterns(2, 2, seed=1)
    with pytest.raises(ValueError, match="sigma_max = 1.0 must be >= 4"):
        log_likelihood(den, x, 0.5, sigma_max=1.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        log_likelihood(den, x, 0.5, sigma_max=10.0, divergence="skilling")
    with pytest.raises(ValueError, match="pass generator"):
        log_likelihood(den, x, 0.5, sigma_max=10.0, divergence="hutchinson")
    with pytest.raises(ValueError, match="n_probes must be >= 2"):
        log_likelihood(den, x, 0.5, sigma_max=10.0, divergence="hutchinson", n_probes=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="unknown ODE method"):
        log_likelihood(den, x, 0.5, sigma_max=10.0, method="euler")
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        log_likelihood(den, x, 0.0, sigma_max=10.0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        log_likelihood(den, x, torch.ones(3, dtype=torch.float64), sigma_max=10.0)
    with pytest.raises(ValueError, match="NaN"):
        log_likelihood(den, torch.full((1, 2), math.nan, dtype=torch.float64), 0.5, sigma_max=10.0)
    with pytest.raises(ValueError, match="rtol and atol must be > 0"):
        log_likelihood(den, x, 0.5, sigma_max=10.0, rtol=0.0)

    def frozen(x, sigma):
        with torch.no_grad():
            return den(x, sigma)

    with pytest.raises(ValueError, match="differentiable"):
        log_likelihood(frozen, x, 0.5, sigma_max=10.0)


# -- the energy stage's absolute option --------------------------------------------------------------------------------


def _exact_context(tmp_path, xi, points):
    """The parts of a RunContext the energy stage reads, around the exact empirical denoiser."""

    def write_results(name, rows, summary):
        write_csv_atomic(tmp_path / f"{name}.csv", rows)
        write_json_atomic(tmp_path / f"{name}.json", summary)
        return [tmp_path / f"{name}.csv", tmp_path / f"{name}.json"]

    labels = ["memorized", "generalized", "training"][: points.shape[0]]
    return SimpleNamespace(
        denoiser=EmpiricalDenoiser(xi),
        train_x=xi,
        points=lambda n: (points, labels, list(range(points.shape[0]))),
        as_images=lambda x: x,
        schedule=SimpleNamespace(sigmas=torch.tensor([0.01, 100.0], dtype=torch.float64)),
        seed=0,
        write_results=write_results,
    )


def test_energy_stage_ode_differences_equal_the_line_integral_energies(tmp_path):
    """On the exact denoiser -log p(x) - (-log p(mean)) from two ODE solves equals the line integral
    of the score from the training mean to x, within the two error bars."""
    xi = random_patterns(5, 4, seed=11)
    points = _mixture_points(xi, seed=12)[1:]
    ctx = _exact_context(tmp_path, xi, points)
    config = EnergyConfig(enabled=True, sigma=0.5, absolute="ode", ode_sigma_max=1e4)
    paths = run_energy(ctx, config)
    rows = [line.split(",") for line in paths[0].read_text().splitlines()]
    table = [dict(zip(rows[0], map(str, r), strict=True)) for r in rows[1:]]
    assert len(table) == 3
    den = ctx.denoiser
    truth = den.neg_log_prob(points, 0.5)
    for i, row in enumerate(table):
        straight, straight_err = float(row["energy_straight"]), float(row["energy_straight_error"])
        ode, ode_err = float(row["energy_ode"]), float(row["energy_ode_error"])
        assert abs(ode - straight) <= ode_err + straight_err
        assert float(row["nll_ode"]) == pytest.approx(float(truth[i]), abs=float(row["nll_ode_error"]))
    summary = json.loads(paths[1].read_text())
    mean_nll = den.neg_log_prob(xi.mean(0, keepdim=True), 0.5)
    absolute = summary["absolute"]
    assert absolute["divergence"] == "exact" and absolute["n_converged"] == 3 and absolute["sigma_max"] == 1e4
    assert absolute["reference_nll"] == pytest.approx(float(mean_nll), abs=absolute["reference_nll_error"])
    assert summary["nll_ode"]["training"]["n"] == 1


def test_energy_stage_uses_hutchinson_above_the_exact_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(energy_stage, "EXACT_DIVERGENCE_MAX_DIM", 2)
    xi = random_patterns(4, 3, seed=14)
    ctx = _exact_context(tmp_path, xi, xi[:2] + 0.1)
    config = EnergyConfig(enabled=True, sigma=0.5, n_nodes=4, absolute="ode", ode_sigma_max=1e3, n_probes=4)
    summary = json.loads(run_energy(ctx, config)[1].read_text())
    assert summary["absolute"]["divergence"] == "hutchinson" and summary["absolute"]["n_probes"] == 4
    mean_nll = float(ctx.denoiser.neg_log_prob(xi.mean(0, keepdim=True), 0.5))
    assert abs(summary["absolute"]["reference_nll"] - mean_nll) <= 4 * summary["absolute"]["reference_nll_error"]


def test_energy_stage_absolute_option_is_validated_and_off_by_default(tmp_path):
    assert EnergyConfig().absolute == "none"
    with pytest.raises(ValueError, match="absolute: unknown value 'exact'"):
        EnergyConfig(absolute="exact")
    with pytest.raises(ValueError, match="ode_sigma_max: must be >= 4"):
        EnergyConfig(sigma=1.0, ode_sigma_max=2.0)
    assert EnergyConfig.from_dict(EnergyConfig(absolute="ode").to_dict()).absolute == "ode"
    xi = random_patterns(3, 2, seed=13)
    ctx = _exact_context(tmp_path, xi, xi[:2])
    header = run_energy(ctx, EnergyConfig(enabled=True, sigma=0.5, n_nodes=4))[0].read_text().splitlines()[0]
    assert "nll_ode" not in header and "absolute" not in json.loads((tmp_path / "energy.json").read_text())
    ctx.schedule = SimpleNamespace(sigmas=torch.tensor([0.01, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="set analyses.energy.ode_sigma_max"):
        run_energy(ctx, EnergyConfig(enabled=True, sigma=0.5, n_nodes=4, absolute="ode"))
