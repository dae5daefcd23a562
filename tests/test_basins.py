"""Basins and critical times (SCIENCE.md §6) against the two-pattern closed form P(sigma) = Phi(a / sigma)."""

import math

import pytest
import torch

from diffmem.bench.basins import bench_basins
from diffmem.bench.harness import BenchContext
from diffmem.core import EmpiricalDenoiser, VPNetworkDenoiser, VPSchedule, sample_ddim, vp_model
from diffmem.core.basins import (
    BasinEstimator,
    KarrasGrid,
    TruncatedGrid,
    critical_time,
    normalized_l2,
    wilson_interval,
)

Z90 = 1.2815515655446004  # Phi^{-1}(0.9)


def phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def two_patterns(a=1.0, d=2, dtype=torch.float64):
    xi = torch.zeros(2, d, dtype=dtype)
    xi[0, 0], xi[1, 0] = a, -a
    return xi


def counting(denoiser):
    """The denoiser with a tally of the rows it evaluates."""
    rows = []

    def wrapped(x, sigma):
        rows.append(x.shape[0])
        return denoiser(x, sigma)

    return wrapped, rows


# --- grids and statistics ---------------------------------------------------------------------


def test_karras_grid_closed_form():
    g = KarrasGrid(sigma_floor=0.002, rho=7.0)(3.0, 20)
    assert g.shape == (21,) and g.dtype == torch.float64
    assert g[0] == 3.0 and g[-1] == 0 and g[-2] == pytest.approx(0.002, rel=1e-12)
    assert bool((g[1:] < g[:-1]).all())
    i = 7  # eq. 5 of Karras et al. (2022)
    ref = (3.0 ** (1 / 7) + i / 19 * (0.002 ** (1 / 7) - 3.0 ** (1 / 7))) ** 7
    assert float(g[i]) == pytest.approx(ref, rel=1e-12)
    lin = KarrasGrid(sigma_floor=0.5, rho=1.0)(6.0, 5)
    assert torch.allclose(lin, torch.tensor([6.0, 4.625, 3.25, 1.875, 0.5, 0.0], dtype=torch.float64))
    assert KarrasGrid()(0.01, 3)[-2] == pytest.approx(0.001)  # the floor drops to sigma / 10 below 10 sigma_floor
    assert KarrasGrid()(0.7, 1).tolist() == [0.7, 0.0]


def test_truncated_grid_starts_at_sigma_or_on_the_table():
    table = VPSchedule().sigmas
    g = TruncatedGrid(table, start="sigma")(0.78, 20)
    assert g.shape == (21,) and g[0] == 0.78 and g[-1] == 0 and bool((g[1:] < g[:-1]).all())
    assert float(g[-2]) == pytest.approx(float(table[0]))  # keeps the smallest level
    on = TruncatedGrid(table, start="grid")(0.78, 20)
    below = table[table <= 0.78]
    assert float(on[0]) == float(below.max()) and bool(torch.isin(on[:-1], table).all())
    short = TruncatedGrid(torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64), start="sigma")(0.3, 20)
    assert short.tolist() == [0.3, 0.2, 0.1, 0.0]  # fewer levels than steps: all of them
    with pytest.raises(ValueError, match="below the table's smallest level"):
        TruncatedGrid(table, start="grid")(1e-4, 5)
    with pytest.raises(ValueError, match="unknown grid start"):
        TruncatedGrid(table, start="nearest")


def test_wilson_interval_solves_the_score_equation():
    """The Wilson bounds p0 solve (p_hat - p0)^2 = z^2 p0 (1 - p0) / n."""
    k, n, z = torch.tensor([0, 3, 9, 10]), 10, 1.959963984540054
    low, high = wilson_interval(k, n)
    p = k.double() / n
    for bound in (low, high):
        resid = (p - bound) ** 2 - z * z * bound * (1 - bound) / n
        assert torch.allclose(resid, torch.zeros_like(resid), atol=1e-12)
    assert float(low[0]) == 0.0 and float(high[3]) == 1.0
    assert bool(((low < p) | (low == 0)).all()) and bool(((high > p) | (high == 1)).all())
    # 9 / 10 against roots of the score equation found by scipy's brentq (golden values)
    assert float(low[2]) == pytest.approx(0.5958499732047616, abs=1e-12)
    assert float(high[2]) == pytest.approx(0.9821237869049271, abs=1e-12)


def test_normalized_l2():
    y = torch.zeros(2, 1, 2, 2)
    x = torch.ones(2, 1, 2, 2)
    x[1] *= 3
    assert normalized_l2(y, x).tolist() == [1.0, 3.0]


# --- the recovery test ------------------------------------------------------------------------


def test_recovery_equals_an_independent_ddim(gen):
    """Recovery replays sample_ddim from x + sigma eps with the same eps (drawn first from the generator)."""
    g = torch.Generator().manual_seed(3)
    xi = torch.randn(6, 3, generator=g, dtype=torch.float64)
    den = EmpiricalDenoiser(xi)
    outputs = []

    def distance(y, x):
        outputs.append(y.clone())
        return normalized_l2(y, x)

    est = BasinEstimator(den, n_trials=7, steps=9, distance=distance)
    sigma = 0.8
    curve = est.recovery_curve(xi[:4], torch.tensor([sigma]), generator=torch.Generator().manual_seed(5))
    eps = torch.randn(4 * 7, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    start = xi[:4].repeat_interleave(7, dim=0) + sigma * eps
    ref = sample_ddim(den, start, KarrasGrid()(sigma, 9))
    assert torch.allclose(outputs[0], ref, atol=1e-12)
    rec = (normalized_l2(ref, xi[:4].repeat_interleave(7, dim=0)) <= 0.1).reshape(4, 7).sum(1)
    assert torch.equal(curve.n_recovered[:, 0], rec)
    assert 0 < int(rec.sum()) < 28  # a non-trivial level: some trials land elsewhere
    assert curve.n_calls.tolist() == [7 * 9] * 4


def test_grids_of_different_lengths_in_one_batch():
    """Rows with shorter grids (a truncated table at small sigma) share a batch with longer ones and get
    the same outcome and call count as when run alone; the trial noise does not depend on the levels."""
    g = torch.Generator().manual_seed(8)
    xi = torch.randn(5, 3, generator=g, dtype=torch.float32)
    grid = TruncatedGrid(torch.tensor([0.1, 0.2, 0.4, 1.0, 2.0], dtype=torch.float64))
    est = BasinEstimator(EmpiricalDenoiser(xi), n_trials=6, steps=4, sigma_grid=grid)
    levels = torch.tensor([0.15, 0.5, 3.0], dtype=torch.float64)  # grids of 2, 4 and 5 levels
    both = est.recovery_curve(xi, levels, generator=torch.Generator().manual_seed(1))
    calls = 0
    for j, s in enumerate(levels):
        alone = est.recovery_curve(xi, levels[j : j + 1], generator=torch.Generator().manual_seed(1))
        assert torch.equal(both.n_recovered[:, j], alone.n_recovered[:, 0])
        assert alone.n_calls.tolist() == [6 * (grid(float(s), 4).numel() - 1)] * 5
        calls += alone.n_calls
    assert torch.equal(both.n_calls, calls)
    assert 0 < int(both.n_recovered.sum()) < 5 * 6 * 3


def test_two_pattern_flow_never_crosses_the_hyperplane():
    """The premise of the closed form: with the exact denoiser, DDIM (eta = 0) ends at +a iff a + sigma eps_1 > 0."""
    xi = two_patterns(1.0, d=4)
    est = BasinEstimator(EmpiricalDenoiser(xi), n_trials=1)
    sigmas = torch.tensor([0.2, 0.78, 1.5, 4.0, 20.0], dtype=torch.float64)
    x = xi[:1].repeat(3000, 1)
    curve = est.recovery_curve(x, sigmas, generator=torch.Generator().manual_seed(2))
    eps1 = torch.randn(3000, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)[:, 0]
    predicted = (1.0 + sigmas[None, :] * eps1[:, None] > 0).long()  # (N, L)
    assert torch.equal(curve.n_recovered, predicted)


# --- critical times ---------------------------------------------------------------------------


def test_critical_time_matches_phi_closed_form():
    """The search alone (no design rounds) with 2,000 trials: its bracket is the order statistic of the
    trials, read independently, and the probit fit of those trials' brackets finds sigma* = a / Phi^{-1}(p)
    with an interval that covers it."""
    a, n = 1.0, 2000
    xi = two_patterns(a)
    den, rows = counting(EmpiricalDenoiser(xi))
    est = BasinEstimator(den, n_trials=n, sigma_min=0.05, sigma_max=20.0, rtol=0.005, design_rounds=0)
    (r,) = est.critical_times(xi[:1], generator=torch.Generator().manual_seed(0))
    assert r.status == "bracketed" and r.has_basin and r.fit == "probit" and r.lo == r.p_sigma
    assert r.hi / r.lo <= 1 + est.rtol + 1e-12
    assert r.p_hat >= 0.9 > r.p_hat_hi
    # closed form: p_hat(lo) is within 4 binomial standard errors of 0.9, and Phi(a / lo) too
    se = math.sqrt(0.9 * 0.1 / n)
    assert abs(phi(a / r.lo) - 0.9) <= 4 * se + phi(a / r.lo) - phi(a / r.hi)
    assert r.ci_low < 0.9 <= r.p_hat < r.ci_high and r.ci_high - r.ci_low < 0.03
    # the fit: within 4 % of the closed form (4 se / |dP/dsigma|), its 90 % interval covers it
    assert r.sigma_c == pytest.approx(a / Z90, rel=0.04)
    assert r.sigma_c_low < a / Z90 < r.sigma_c_high and r.interval_level == 0.9
    assert r.sigma_c_low < r.sigma_c < r.sigma_c_high and r.sigma_c_high / r.sigma_c_low < 1.15
    assert r.slope == pytest.approx(-Z90, rel=0.15)  # dz / dlog sigma of Phi(a / sigma) at sigma*: -a / sigma*
    # the same trials, read independently: the largest grid level at which >= 90 % of a + sigma eps_1 > 0
    eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    levels = est.search_levels()
    ok = [int((a + s * eps[:, 0] > 0).sum()) >= 1800 for s in levels]
    assert r.lo == float(levels[max(i for i, v in enumerate(ok) if v)])
    # radius ||x_sigma - x|| = sigma_c ||eps|| on average over the trials
    assert r.radius == pytest.approx(r.sigma_c * float(eps.norm(dim=1).mean()), rel=1e-12)
    assert r.radius_normalized == pytest.approx(r.radius / math.sqrt(2))
    # calls: every probe costs trials x steps rows; 2 end probes, then floor or ceil of log2(J) halvings
    assert r.n_calls == sum(rows) == est.n_calls_ and r.n_calls % (n * est.steps) == 0
    halvings = math.log2(levels.numel() - 1)
    assert math.floor(halvings) <= r.n_calls // (n * est.steps) - 2 <= math.ceil(halvings)
    assert r.n_design_trials == 0


def test_design_rounds_add_their_budget():
    """The default design spends design_rounds x design_levels x design_trials fresh trials per bracketed
    point, each of `steps` denoiser rows, on top of the search; a fixed generator reproduces everything."""
    xi = two_patterns(1.0)
    den, rows = counting(EmpiricalDenoiser(xi))
    kw = dict(sigma_min=0.05, sigma_max=20.0, design_rounds=2, design_levels=3, design_trials=8)
    est = BasinEstimator(den, **kw).fit(xi, generator=torch.Generator().manual_seed(3))
    search = BasinEstimator(EmpiricalDenoiser(xi), **{**kw, "design_rounds": 0})
    search.fit(xi, generator=torch.Generator().manual_seed(3))
    assert est.design_calls() == 2 * 3 * 8 * 20
    for r, s in zip(est.results_, search.results_, strict=True):
        assert r.status == "bracketed" and r.n_design_trials == 2 * 3 * 8
        assert r.n_calls == s.n_calls + est.design_calls()
        assert (r.lo, r.hi, r.p_hat) == (s.lo, s.hi, s.p_hat)  # the search draws first: the same bracket
    assert est.n_calls_ == sum(rows) == sum(r.n_calls for r in est.results_)
    again = BasinEstimator(EmpiricalDenoiser(xi), **kw).fit(xi, generator=torch.Generator().manual_seed(3))
    assert again.results_ == est.results_


def test_estimate_is_unbiased_and_its_interval_covers_the_closed_form():
    """The honest-estimator check (SCIENCE.md §6): 400 copies of the pattern +a, each with its own noise,
    through one default estimator (10-trial search, edge check, 2 rounds x 5 levels x 32 fresh trials,
    inverse-link probit, 90 % profile-likelihood interval). Against sigma* = a / Phi^{-1}(0.9) = 0.780 the
    median relative bias is under 5 % (the old "9 of 10" rule: +26 %) and the interval covers sigma* in
    at least 85 % of points (seeds 0-9 of this test: 0.86-0.90, bias -0.7 % to +2.1 %), at about 8,800
    denoiser rows per point."""
    a, n = 1.0, 400
    xi = two_patterns(a)
    est = BasinEstimator(EmpiricalDenoiser(xi)).fit(xi[:1].repeat(n, 1), generator=torch.Generator().manual_seed(0))
    true = a / Z90
    assert all(r.status == "bracketed" and r.fit == "probit" for r in est.results_)
    bias = float((est.sigma_c_ / true - 1).median())
    covered = (est.sigma_c_low_ <= true) & (true <= est.sigma_c_high_)
    assert abs(bias) < 0.05
    assert float(covered.double().mean()) >= 0.85
    # misses on both sides, neither far above its nominal 5 %
    assert float((est.sigma_c_high_ < true).double().mean()) <= 0.1
    assert float((est.sigma_c_low_ > true).double().mean()) <= 0.1
    assert bool((est.sigma_c_low_ < est.sigma_c_).all() and (est.sigma_c_ < est.sigma_c_high_).all())
    calls = est.n_calls_ / n
    assert 6_400 < calls < 10_000  # the design's 2 x 5 x 32 x 20 = 6,400 rows plus the search
    # the slope dz / dlog sigma = -a / sigma* = -Z90 at sigma*
    slopes = torch.tensor([r.slope for r in est.results_], dtype=torch.float64)
    assert float(slopes.median()) == pytest.approx(-Z90, rel=0.1)


def test_log_link_runs_with_a_misspecification_bias():
    """The 'log' link, Phi(b0 + b1 log sigma), is not the two-pattern curve (which flattens at p = 1/2):
    fitted locally it is still within 10 % of sigma* (about +5 % at the default design width)."""
    xi = two_patterns(1.0)
    est = BasinEstimator(EmpiricalDenoiser(xi), link="log")
    est.fit(xi[:1].repeat(100, 1), generator=torch.Generator().manual_seed(0))
    assert float((est.sigma_c_ * Z90 - 1).median()) == pytest.approx(0.0, abs=0.1)
    assert all(r.fit == "probit" and r.slope < 0 for r in est.results_)


def test_scale_invariance_and_distant_patterns_have_larger_basins():
    """With common random numbers sigma_c(2a) = 2 sigma_c(a) up to the grid; and on a line of patterns
    0, 1, 4 the isolated one has the largest basin."""
    est_args = dict(n_trials=50, sigma_min=0.02, sigma_max=20.0, rtol=0.01)
    sig = []
    for a in (0.5, 1.0, 2.0):
        xi = two_patterns(a)
        sig.append(critical_time(EmpiricalDenoiser(xi), xi[:1], generator=torch.Generator().manual_seed(1), **est_args))
    s = [r[0].lo for r in sig]  # the search: the same trials at scaled levels, up to the grid
    assert s[0] < s[1] < s[2]
    assert s[1] / s[0] == pytest.approx(2, rel=0.021) and s[2] / s[1] == pytest.approx(2, rel=0.021)
    fitted = [r[0].sigma_c for r in sig]  # the fit: within its intervals
    assert fitted[0] < fitted[1] < fitted[2]
    for r, scale in zip(sig, (0.5, 1.0, 2.0), strict=True):
        assert r[0].sigma_c_low < scale / Z90 < r[0].sigma_c_high

    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    est = BasinEstimator(EmpiricalDenoiser(line), **est_args).fit(line, generator=torch.Generator().manual_seed(1))
    sc = est.sigma_c_
    assert sc.shape == (3,) and bool((sc > 0).all())
    assert sc[2] > 2 * sc[0] and sc[2] > 2 * sc[1]
    assert est.results_[2].radius > est.results_[0].radius


def test_midpoint_has_no_basin_and_a_lone_pattern_is_censored():
    xi = two_patterns(1.0)
    mid = torch.zeros(1, 2, dtype=torch.float64)
    est = BasinEstimator(EmpiricalDenoiser(xi), n_trials=20, sigma_min=0.05, sigma_max=5.0)
    (r,) = est.critical_times(mid, generator=torch.Generator().manual_seed(0))
    assert r.status == "no_basin" and not r.has_basin
    assert (r.sigma_c, r.lo, r.hi, r.radius, r.p_hat, r.p_sigma) == (0.0, 0.0, 0.05, 0.0, 0.0, 0.05)
    assert r.ci_low == 0.0 and 0 < r.ci_high < 0.2
    # no fit, a one-sided interval: sigma* in (0, sigma_min)
    assert (r.fit, r.slope, r.sigma_c_low, r.sigma_c_high) == ("none", None, 0.0, 0.05)
    # one probe at sigma_min, then one design round of fresh trials there confirms it
    assert r.n_design_trials == est.design_levels * est.design_trials
    assert r.n_calls == 20 * 20 + est.design_levels * est.design_trials * 20

    lone = xi[:1]  # K = 1: the denoiser always returns the pattern
    est = BasinEstimator(EmpiricalDenoiser(lone), n_trials=5, sigma_max=50.0)
    (c,) = est.critical_times(lone, generator=torch.Generator().manual_seed(0))
    assert c.status == "censored" and c.sigma_c == 50.0 and c.hi == math.inf and c.p_hat == 1.0
    assert (c.fit, c.slope, c.sigma_c_low, c.sigma_c_high) == ("none", None, 50.0, math.inf)
    assert c.p_hat_hi is None and c.n_calls == 2 * 5 * 20 + est.design_levels * est.design_trials * 20


def test_edge_check_overturns_a_lucky_search():
    """Two patterns at sigma_max = 20, where p = Phi(1 / 20) = 0.52: a search of 10 trials sometimes sees
    9 recovered there (censored by chance); the edge check's fresh trials overturn it, and the point is
    fitted like the others. Without design rounds the search's verdict stands."""
    xi = two_patterns(1.0)
    x = xi[:1].repeat(300, 1)
    kw = dict(sigma_min=0.05, sigma_max=20.0)
    search = BasinEstimator(EmpiricalDenoiser(xi), design_rounds=0, **kw)
    search.fit(x, generator=torch.Generator().manual_seed(0))
    lucky = [i for i, r in enumerate(search.results_) if r.status == "censored"]
    assert 1 <= len(lucky) <= 12  # P(>= 9 of 10 | p = 0.52) = 1.6 %
    est = BasinEstimator(EmpiricalDenoiser(xi), **kw).fit(x, generator=torch.Generator().manual_seed(0))
    for i in lucky:
        r = est.results_[i]
        assert r.status == "bracketed" and r.fit == "probit" and r.hi == math.inf  # hi: the search's
        assert r.sigma_c_low < 1 / Z90 < r.sigma_c_high
        assert r.n_design_trials == (est.design_rounds + 1) * est.design_levels * est.design_trials


def test_separated_fit_reports_the_gap():
    """A step-like recovery curve (every trial recovers below 0.5, none above) has no finite probit
    maximum: the fit is 'separated' and the interval is the gap between the probed levels around the step."""

    def step(x, sigma):  # recovers exactly when the starting level is below 0.5
        return torch.where(sigma.reshape(-1, 1) < 0.5, torch.zeros_like(x), x + 10.0)

    x = torch.zeros(2, 3, dtype=torch.float64)
    est = BasinEstimator(step, steps=1, sigma_min=0.05, sigma_max=5.0, design_trials=4)
    for r in est.critical_times(x, generator=torch.Generator().manual_seed(0)):
        assert r.status == "bracketed" and r.fit == "separated" and r.slope is None
        assert r.sigma_c_low < 0.5 <= r.sigma_c_high and r.sigma_c_low < r.sigma_c < r.sigma_c_high
        assert r.sigma_c_high / r.sigma_c_low <= 1 + est.rtol + 1e-9


def test_recovery_curve_decreases_matches_phi_and_the_scan_agrees_with_bisection():
    a, n = 1.0, 300
    xi = two_patterns(a)
    est = BasinEstimator(EmpiricalDenoiser(xi), n_trials=n, sigma_min=0.1, sigma_max=10.0, rtol=0.08)
    levels = est.search_levels()
    curve = est.recovery_curve(xi, levels, generator=torch.Generator().manual_seed(4))
    ph = curve.p_hat
    assert ph.shape == (2, levels.numel())
    assert bool((ph[:, 1:] <= ph[:, :-1]).all())  # monotone: common random numbers
    expected = torch.tensor([phi(a / float(s)) for s in levels], dtype=torch.float64)
    assert bool(((ph - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-9).all())
    low, high = curve.ci
    assert bool((low <= ph).all() and (ph <= high).all())
    assert curve.n_calls.tolist() == [levels.numel() * n * est.steps] * 2
    est.fit(xi, generator=torch.Generator().manual_seed(4))
    search_lo = torch.tensor([r.lo for r in est.results_], dtype=torch.float64)
    assert torch.equal(curve.scan_critical_sigma(0.9), search_lo)
    search_calls = est.n_calls_ - sum(r.n_design_trials for r in est.results_) * est.steps
    assert search_calls < 0.2 * int(curve.n_calls.sum())


def test_fit_with_curve_batches_and_reproducibility():
    xi = two_patterns(1.0)
    kw = dict(n_trials=12, sigma_min=0.1, sigma_max=10.0, rtol=0.1, curve_sigmas=torch.tensor([0.3, 1.0, 3.0]))
    ref = BasinEstimator(EmpiricalDenoiser(xi), **kw).fit(xi, generator=torch.Generator().manual_seed(9))
    den, rows = counting(EmpiricalDenoiser(xi))
    small = BasinEstimator(den, batch_size=10, **kw).fit(xi, generator=torch.Generator().manual_seed(9))
    assert max(rows) <= 10
    for r, s in zip(ref.results_, small.results_, strict=True):
        assert r == s and torch.equal(r.curve_p_hat, s.curve_p_hat)
    assert ref.results_[0].curve_p_hat.shape == (3,) and float(ref.results_[0].curve_p_hat[0]) == 1.0
    # the curve's calls are counted with the point's
    assert sum(rows) == small.n_calls_ == sum(r.n_calls for r in small.results_)


def test_stochastic_ddim_matches_an_independent_sampler_and_reuses_its_noise():
    """eta = 1 against sample_ddim(eta = 1) at one level (statistically), and common random numbers:
    the same level probed twice gives the same outcome trial by trial."""
    xi = two_patterns(1.0)
    den = EmpiricalDenoiser(xi)
    n, sigma = 2000, 1.2
    est = BasinEstimator(den, n_trials=n, eta=1.0, steps=10)
    curve = est.recovery_curve(xi[:1], torch.tensor([sigma, sigma]), generator=torch.Generator().manual_seed(0))
    k = curve.n_recovered[0]
    assert int(k[0]) == int(k[1])
    g = torch.Generator().manual_seed(11)
    start = xi[:1] + sigma * torch.randn(n, 2, generator=g, dtype=torch.float64)
    ref = sample_ddim(den, start, KarrasGrid()(sigma, 10), eta=1.0, generator=g)
    k_ref = int((normalized_l2(ref, xi[:1].expand(n, 2)) <= 0.1).sum())
    p = (int(k[0]) + k_ref) / (2 * n)
    assert abs(int(k[0]) - k_ref) / n <= 4 * math.sqrt(2 * p * (1 - p) / n)
    # stochastic DDIM can cross the hyperplane, so it does not reproduce Phi(a / sigma) exactly
    deterministic = BasinEstimator(den, n_trials=n, steps=10).recovery_curve(
        xi[:1], torch.tensor([sigma]), generator=torch.Generator().manual_seed(0)
    )
    assert int(deterministic.n_recovered[0, 0]) / n == pytest.approx(phi(1 / sigma), abs=4 * math.sqrt(0.2 / n))


def test_vp_network_on_its_own_grid():
    """A VP network with integer timesteps, probed on its schedule's levels, recovers the closed form."""
    xi = two_patterns(1.0)
    sched = VPSchedule()
    net = VPNetworkDenoiser(vp_model(EmpiricalDenoiser(xi), sched), sched, timestep="nearest")
    est = BasinEstimator(
        net,
        n_trials=1000,
        sigma_min=0.05,
        sigma_max=20.0,
        rtol=0.02,
        sigma_grid=TruncatedGrid(sched.sigmas, start="grid"),
    )
    (r,) = est.critical_times(xi[:1], generator=torch.Generator().manual_seed(0))
    assert r.status == "bracketed"
    assert r.sigma_c == pytest.approx(1 / Z90, rel=0.08)
    # the point was noised to the schedule level at or below sigma_c
    level = float(sched.sigmas[sched.sigmas <= r.sigma_c].max())
    assert r.radius < r.sigma_c * 1.5 and level <= r.sigma_c


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(p=0.0), "strictly between 0 and 1"),
        (dict(p=1.0), "strictly between 0 and 1"),
        (dict(p=float("nan")), "p must be finite"),
        (dict(n_trials=0), "n_trials must be a positive integer"),
        (dict(delta=0.0), "delta must be > 0"),
        (dict(delta=float("nan")), "delta must be finite"),
        (dict(sigma_min=1.0, sigma_max=1.0), "0 < sigma_min < sigma_max"),
        (dict(sigma_min=0.0), "0 < sigma_min < sigma_max"),
        (dict(rtol=0.0), "rtol must be > 0"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(eta=1.5), "eta must be <= 1.0"),
        (dict(sigma_grid="karras"), "sigma_grid must be callable"),
        (dict(distance="lpips"), "distance must be callable"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(curve_sigmas=torch.tensor([0.5, -1.0])), "curve_sigmas must be finite and > 0"),
        (dict(design_rounds=-1), "design_rounds must be an integer >= 0"),
        (dict(design_levels=0), "design_levels must be a positive integer"),
        (dict(design_trials=0), "design_trials must be a positive integer"),
        (dict(design_width=0.0), "design_width must be > 0"),
        (dict(interval=1.0), "interval must lie strictly between 0 and 1"),
        (dict(link="logit"), "unknown link"),
    ],
)
def test_bad_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        BasinEstimator(EmpiricalDenoiser(two_patterns()), **kw)


def test_bad_points_generator_and_callables():
    xi = two_patterns()
    est = BasinEstimator(EmpiricalDenoiser(xi), n_trials=2, steps=2)
    gen = torch.Generator().manual_seed(0)
    bad = xi.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        est.fit(bad, generator=gen)
    with pytest.raises(ValueError, match=r"shape \(N, \*event\)"):
        est.fit(xi[0], generator=gen)
    with pytest.raises(ValueError, match=r"shape \(N, \*event\)"):
        est.fit(xi[:0], generator=gen)
    with pytest.raises(ValueError, match="floating-point"):
        est.fit(xi.long(), generator=gen)
    with pytest.raises(ValueError, match="pass a torch.Generator"):
        est.fit(xi, generator=None)
    with pytest.raises(ValueError, match="sigmas must be a non-empty 1-D"):
        est.recovery_curve(xi, torch.ones(2, 2), generator=gen)
    with pytest.raises(ValueError, match="denoiser must be callable"):
        BasinEstimator(None)

    def no_zero(sigma, steps):
        return torch.tensor([sigma, sigma / 2])

    with pytest.raises(ValueError, match="end with a single 0"):
        BasinEstimator(EmpiricalDenoiser(xi), sigma_grid=no_zero).fit(xi, generator=gen)
    with pytest.raises(ValueError, match="one value per row"):
        BasinEstimator(EmpiricalDenoiser(xi), steps=2, distance=lambda y, x: (y - x).norm()).fit(xi, generator=gen)

    def nan_denoiser(x, sigma):
        return x * float("nan")

    with pytest.raises(ValueError, match="denoiser returned NaN"):
        BasinEstimator(nan_denoiser, steps=2).fit(xi, generator=gen)
    with pytest.raises(ValueError, match="denoiser returned"):
        BasinEstimator(lambda x, s: x[:, :1], steps=2).fit(xi, generator=gen)


# --- benchmark --------------------------------------------------------------------------------


def test_bench_basins_quick():
    entries = {e.name: e for e in bench_basins(BenchContext("cpu", "quick", 1))}
    assert set(entries) == {
        "basin_bisection_calls",
        "basin_bisection_seconds",
        "basin_sigma_c_log_gap",
        "basin_estimate_calls",
    }
    for e in entries.values():
        assert math.isfinite(e.value) and math.isfinite(e.reference) and math.isfinite(e.ratio)
    full = entries["basin_estimate_calls"]
    assert full.ratio > 1 and "interval" in full.notes  # the design rounds cost calls on top of the search
    calls = entries["basin_bisection_calls"]
    assert calls.met and calls.ratio <= 0.2 and calls.ratio == pytest.approx(calls.value / calls.reference)
    gap = entries["basin_sigma_c_log_gap"]
    assert gap.met and gap.value <= gap.reference
