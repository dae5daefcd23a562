"""The heat equation as a test of a denoiser's noise levels (core.consistency), against closed forms in float64:
the exact empirical model and a Gaussian data model pass it; the exact model read at a rescaled level is a
gradient field at every level but fails it by (c^2 - 1)(tr J(a) - tr J(b)), and its ODE and line-integral
energies differ, as the energy stage reports."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import random_patterns
from diffmem.core import EmpiricalDenoiser, log_likelihood, relative_energy
from diffmem.core.consistency import heat_rate, level_consistency
from diffmem.evaluate.stages.energy import EnergyConfig
from diffmem.evaluate.stages.energy import run as run_energy
from diffmem.io.files import write_csv_atomic, write_json_atomic
from test_likelihood import _gaussian, _mixture_points


class Rescaled:
    """D(x, sigma) = D*(x, c sigma): the score c^2 grad log p*_{c sigma} is a gradient, the levels are inconsistent."""

    def __init__(self, exact: EmpiricalDenoiser, c: float):
        self.exact, self.c = exact, c

    def __call__(self, x, sigma):
        return self.exact(x, self.c * torch.as_tensor(sigma, dtype=x.dtype))


def _trace_jacobian(den, x, sigma):
    """tr dD/dx of each row of x (B, D) by the full Jacobian."""

    def one(row):
        return den(row[None], torch.tensor([sigma], dtype=row.dtype))[0]

    return torch.stack([torch.autograd.functional.jacobian(one, row).diagonal().sum() for row in x])


def _pairs(xi, seed):
    b = _mixture_points(xi, seed)
    return xi.mean(0, keepdim=True).expand_as(b).clone(), b


@pytest.mark.parametrize("d, sigma", [(3, 0.3), (6, 0.5), (6, 1.5)])
def test_both_sides_match_the_exact_models_closed_form_and_the_residual_vanishes(d, sigma):
    """line and heat each equal sigma d/dsigma [-log p(b) + log p(a)] of the closed form (a float64 central
    difference of neg_log_prob at step 1e-5), and the residual is zero within its error."""
    den = EmpiricalDenoiser(random_patterns(5, d, seed=d))
    a, b = _pairs(den.patterns, seed=d + 1)
    r = level_consistency(den, sigma, a, b)
    h = 1e-5 * sigma

    def rel(s):
        return den.neg_log_prob(b, s) - den.neg_log_prob(a, s)

    truth = sigma * (rel(sigma + h) - rel(sigma - h)) / (2 * h)
    assert torch.allclose(r.line, truth, atol=r.line_error.max().item() + 1e-6)
    assert torch.allclose(r.heat, truth, atol=1e-6)
    assert bool((r.residual.abs() <= r.error).all()) and float(r.error.max()) < 0.05
    assert r.divergence_method == "exact" and r.n_probes is None and bool((r.heat_stderr == 0).all())


def test_a_gaussian_data_model_is_consistent():
    den = _gaussian(d=4, seed=3)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    r = level_consistency(den, 0.7, a, b)
    assert bool((r.residual.abs() <= r.error).all()) and float(r.relative_residual.max()) < 1e-3


def test_rescaled_levels_are_conservative_but_fail_the_heat_equation_by_the_closed_form():
    """D(x, sigma) = D*(x, c sigma): two paths agree (a gradient), the line energy is c^2 times the exact one at
    c sigma, the residual is (c^2 - 1)(tr J*(a) - tr J*(b)) at c sigma, and the ODE's energy is not the line's."""
    exact, c, sigma = EmpiricalDenoiser(random_patterns(5, 4, seed=11)), 1.5, 0.5
    den = Rescaled(exact, c)
    a, b = _pairs(exact.patterns, seed=12)
    energy = relative_energy(den, sigma, a, b)
    truth = exact.neg_log_prob(b, c * sigma) - exact.neg_log_prob(a, c * sigma)
    assert torch.allclose(energy.straight, c**2 * truth, atol=1e-6)
    assert float(energy.discrepancy.max()) < 1e-6
    r = level_consistency(den, sigma, a, b)
    closed = (c**2 - 1) * (_trace_jacobian(exact, a, c * sigma) - _trace_jacobian(exact, b, c * sigma))
    assert torch.allclose(r.residual, closed, atol=r.error.max().item())
    assert bool((r.residual.abs() > 10 * r.error).all())
    lik = log_likelihood(den, torch.cat([a[:1], b]), sigma, sigma_max=1e4)
    gap = (lik.nll[1:] - lik.nll[0]) - energy.straight
    assert bool((gap.abs() > 10 * (lik.error[1:] + lik.error[0] + energy.straight_error)).all())


def test_hutchinson_heat_rate_is_unbiased_with_a_standard_error_that_covers():
    den = EmpiricalDenoiser(random_patterns(6, 10, seed=21))
    x = _mixture_points(den.patterns, seed=22)
    exact, zero = heat_rate(den, x, 0.6)
    assert bool((zero == 0).all())
    runs = [
        heat_rate(den, x, 0.6, divergence="hutchinson", n_probes=8, generator=torch.Generator().manual_seed(seed))
        for seed in range(40)
    ]
    est, se = torch.stack([r[0] for r in runs]), torch.stack([r[1] for r in runs])  # (40, 4) each
    assert bool(((est.mean(0) - exact).abs() <= 3 * est.std(0) / 40**0.5).all())  # unbiased
    z = (est - exact) / se  # Student's t with 7 degrees of freedom: |z| <= 2 about 91% of the time
    assert 0.8 <= float((z.abs() <= 2).double().mean()) <= 0.98


def test_bad_input_is_refused_with_a_reason():
    den = EmpiricalDenoiser(random_patterns(3, 2))
    a, b = den.patterns[:2], den.patterns[1:]
    with pytest.raises(ValueError, match="eps must be in"):
        level_consistency(den, 0.5, a, b, eps=0.0)
    with pytest.raises(ValueError, match="same shape"):
        level_consistency(den, 0.5, a, b[:1])
    with pytest.raises(ValueError, match="NaN"):
        level_consistency(den, 0.5, a, torch.full_like(b, float("nan")))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        level_consistency(den, -1.0, a, b)
    with pytest.raises(ValueError, match="unknown divergence"):
        level_consistency(den, 0.5, a, b, divergence="trace")
    with pytest.raises(ValueError, match="n_probes must be >= 2"):
        level_consistency(den, 0.5, a, b, divergence="hutchinson", n_probes=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="pass generator"):
        level_consistency(den, 0.5, a, b, divergence="hutchinson")
    with pytest.raises(ValueError, match="max_nodes must be >="):
        level_consistency(den, 0.5, a, b, max_nodes=8)


# -- the energy stage reports the gap and the residual ---------------------------------------------------------------


def _context(tmp_path, den, xi, points):
    def write_results(name, rows, summary):
        write_csv_atomic(tmp_path / f"{name}.csv", rows)
        write_json_atomic(tmp_path / f"{name}.json", summary)
        return [tmp_path / f"{name}.csv", tmp_path / f"{name}.json"]

    return SimpleNamespace(
        denoiser=den,
        train_x=xi,
        points=lambda n: (points, ["memorized", "spurious", "generalized"][: len(points)], list(range(len(points)))),
        as_images=lambda x: x,
        schedule=SimpleNamespace(sigmas=torch.tensor([0.01, 100.0], dtype=torch.float64)),
        seed=0,
        write_results=write_results,
    )


def _rows(path):
    lines = [line.split(",") for line in path.read_text().splitlines()]
    return [dict(zip(lines[0], r, strict=True)) for r in lines[1:]]


@pytest.mark.parametrize("c", [1.0, 1.5])
def test_energy_stage_reports_the_gap_and_the_heat_equation_that_explains_it(tmp_path, c):
    exact = EmpiricalDenoiser(random_patterns(5, 4, seed=31))
    den = exact if c == 1.0 else Rescaled(exact, c)
    points = _mixture_points(exact.patterns, seed=32)[1:]
    config = EnergyConfig(enabled=True, sigma=0.5, absolute="ode", ode_sigma_max=1e4)
    csv, summary = run_energy(_context(tmp_path, den, exact.patterns, points), config)
    rows, absolute = _rows(csv), json.loads(summary.read_text())["absolute"]
    for row in rows:
        assert float(row["energy_gap"]) == pytest.approx(float(row["energy_ode"]) - float(row["energy_straight"]))
        gap_within = abs(float(row["energy_gap"])) <= float(row["energy_gap_error"])
        consistent = abs(float(row["consistency"])) <= float(row["consistency_error"])
        assert gap_within == consistent == (c == 1.0)
    expected = 3 if c == 1.0 else 0
    assert absolute["n_agree"] == absolute["n_consistent"] == expected
