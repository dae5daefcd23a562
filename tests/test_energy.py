"""Line-integral energies of a denoiser's score against the exact -log p and closed-form line integrals."""

import csv

import numpy as np
import pytest
import torch

from conftest import random_patterns
from diffmem.core import EmpiricalDenoiser
from diffmem.core.energy import (
    DEFAULT_MAX_NODES,
    DEFAULT_TOLERANCE,
    arc_energy,
    gauss_legendre,
    quarter_arc_normal,
    relative_energy,
    straight_line_energy,
)
from diffmem.evaluate.stages.energy import ERROR_NOTE, report_section
from diffmem.io.data import load_digits
from diffmem.io.results import Notes, find_jobs
from diffmem.viz.html import ReportContext
from report_fixture import make_study


def test_gauss_legendre_matches_numpy_and_integrates_polynomials_exactly():
    nodes, weights = gauss_legendre(12, like=torch.zeros(0, dtype=torch.float64))
    x, w = np.polynomial.legendre.leggauss(12)
    np.testing.assert_allclose(nodes.numpy(), 0.5 * (x + 1), atol=1e-14)
    np.testing.assert_allclose(weights.numpy(), 0.5 * w, atol=1e-14)
    assert float((weights * nodes**23).sum()) == pytest.approx(1 / 24, rel=1e-13)  # degree 2n - 1


@pytest.mark.parametrize("sigma, n_nodes", [(0.3, 128), (0.5, 64), (1.0, 32)])
def test_straight_line_energy_reproduces_exact_neg_log_prob(sigma, n_nodes):
    """Sharper landscapes (small sigma) need more nodes: 128 at sigma = 0.3 reach 3e-7 relative."""
    xi = random_patterns(12, 3)
    den = EmpiricalDenoiser(xi)
    a = random_patterns(6, 3, seed=1)
    b = random_patterns(6, 3, seed=2) * 1.5
    exact = den.neg_log_prob(b, sigma) - den.neg_log_prob(a, sigma)
    got = straight_line_energy(den, sigma, a, b, n_nodes=n_nodes)
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-6)


def test_energy_bad_input():
    den = EmpiricalDenoiser(random_patterns(3, 2))
    a = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="same shape"):
        straight_line_energy(den, 0.5, a, torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        straight_line_energy(den, 0.0, a, a)
    with pytest.raises(ValueError, match="n_nodes"):
        gauss_legendre(0, like=a)


# -- two paths: straight line and quarter arc ---------------------------------------------------


def _far_pairs():
    """Generic pairs, plus pairs from next to a memory to far outside the data (3x a pattern's norm)."""
    xi = random_patterns(12, 3)
    a = torch.cat([random_patterns(6, 3, seed=1), xi[:3] + 0.05 * random_patterns(3, 3, seed=4)])
    b = torch.cat([random_patterns(6, 3, seed=2) * 1.5, -3 * xi[3:6]])
    return xi, a, b


@pytest.mark.parametrize("sigma, n_nodes", [(0.3, 160), (0.5, 64), (1.0, 32), (2.0, 16)])
def test_both_paths_reproduce_exact_neg_log_prob(sigma, n_nodes):
    """The empirical score is a gradient: both paths give -log p(b) + log p(a), so they agree."""
    xi, a, b = _far_pairs()
    den = EmpiricalDenoiser(xi)
    exact = den.neg_log_prob(b, sigma) - den.neg_log_prob(a, sigma)
    res = relative_energy(den, sigma, a, b, n_nodes=n_nodes)
    torch.testing.assert_close(res.straight, exact, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.arc, exact, rtol=1e-4, atol=1e-6)
    assert float(res.discrepancy.max()) < 1e-5
    assert float(res.relative_discrepancy.max()) < 1e-4
    assert res.n_nodes == n_nodes and res.sigma == sigma and res.tolerance is None
    assert (res.straight_nodes == 3 * n_nodes).all() and (res.arc_nodes == 3 * n_nodes).all()  # n and 2n
    torch.testing.assert_close(res.straight, straight_line_energy(den, sigma, a, b, n_nodes=n_nodes), rtol=0, atol=0)


def test_quadrature_error_falls_with_more_nodes():
    xi, a, b = _far_pairs()
    den = EmpiricalDenoiser(xi)
    sigma = 0.5
    exact = den.neg_log_prob(b, sigma) - den.neg_log_prob(a, sigma)
    errors = []
    for n in (8, 16, 32, 64):
        res = relative_energy(den, sigma, a, b, n_nodes=n)
        errors.append(max(float((res.straight - exact).abs().max()), float((res.arc - exact).abs().max())))
    assert all(later < 0.2 * earlier for earlier, later in zip(errors[:-1], errors[1:], strict=True)), errors
    assert errors[-1] < 1e-8


def test_image_states_and_chunked_calls_match_one_call():
    """(N, C, H, W) states; a batch of 5 states per call splits both pairs and nodes."""
    xi = random_patterns(7, 8).reshape(7, 2, 2, 2)
    den = EmpiricalDenoiser(xi)
    a = random_patterns(4, 8, seed=1).reshape(4, 2, 2, 2)
    b = random_patterns(4, 8, seed=2).reshape(4, 2, 2, 2)
    whole = relative_energy(den, 1.0, a, b, n_nodes=24)
    chunked = relative_energy(den, 1.0, a, b, n_nodes=24, batch=3)
    torch.testing.assert_close(chunked.straight, whole.straight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.arc, whole.arc, rtol=1e-12, atol=1e-12)
    exact = den.neg_log_prob(b, 1.0) - den.neg_log_prob(a, 1.0)
    torch.testing.assert_close(whole.arc, exact, rtol=1e-6, atol=1e-8)


def test_quarter_arc_geometry_and_default_direction():
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    b = torch.tensor([[3.0, 0.1, -2.0], [1.0, 2.0, 4.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    n = quarter_arc_normal(a, b)
    delta = b - a
    # pair 0: the axis least aligned with (3, 0.1, -2) is e_1, with its part along delta removed
    e1 = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    perp = e1 - (0.1 / (delta[0] @ delta[0])) * delta[0]
    torch.testing.assert_close(n[0], perp / perp.norm() * delta[0].norm() / 2, rtol=1e-14, atol=1e-14)
    # pair 1: delta = e_2, ties between e_0 and e_1 go to the first axis
    torch.testing.assert_close(n[1], torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert float(n[2].abs().max()) == 0.0  # a = b: the arc is one point
    centre = 0.5 * (a + b) + n
    u, v = a - centre, b - centre
    torch.testing.assert_close((u * v).sum(1), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(u.norm(dim=1), v.norm(dim=1), rtol=1e-14, atol=1e-14)
    # a given direction is used after projecting out b - a
    w = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    n_w = quarter_arc_normal(a[:2], b[:2], w)
    for i in range(2):
        p = w - (w @ delta[i]) / (delta[i] @ delta[i]) * delta[i]
        torch.testing.assert_close(n_w[i], p / p.norm() * delta[i].norm() / 2, rtol=1e-14, atol=1e-14)


def _linear_field_denoiser(A):
    """D(x, sigma) = x - sigma^2 A x, whose 'score' -A x is a gradient field only when A is symmetric."""

    def denoiser(x, sigma):
        return x - sigma[:, None] ** 2 * (x @ A.T)

    return denoiser


def _closed_form_line_integrals(A, a, b, direction):
    """Integrals of g(x) = A x along the straight line and the quarter arc, derived by hand:
    straight: (A a).d + (A d).d / 2 with d = b - a;
    arc: (A o).(v - u) + (v.A v - u.A u) / 2 + (pi / 4) ((A u).v - (A v).u), u = a - o, v = b - o."""
    d = b - a
    straight = ((a @ A.T) * d).sum(1) + 0.5 * ((d @ A.T) * d).sum(1)
    p = direction - ((direction * d).sum(1, keepdim=True) / (d * d).sum(1, keepdim=True)) * d
    o = 0.5 * (a + b) + p / p.norm(dim=1, keepdim=True) * d.norm(dim=1, keepdim=True) / 2
    u, v = a - o, b - o
    quad = lambda y, z: ((y @ A.T) * z).sum(1)  # noqa: E731  (A y).z
    arc = quad(o, v - u) + 0.5 * (quad(v, v) - quad(u, u)) + 0.25 * np.pi * (quad(u, v) - quad(v, u))
    return straight, arc


def test_non_conservative_field_discrepancy_matches_closed_form():
    g = torch.Generator().manual_seed(3)
    R = torch.randn(4, 4, generator=g, dtype=torch.float64)
    A = 0.5 * (R + R.T) + 2 * (R - R.T)  # a strong antisymmetric part: the field has curl
    a = random_patterns(5, 4, seed=1)
    b = random_patterns(5, 4, seed=2)
    direction = random_patterns(5, 4, seed=5)
    straight, arc = _closed_form_line_integrals(A, a, b, direction)
    res = relative_energy(_linear_field_denoiser(A), 0.7, a, b, n_nodes=32, direction=direction)
    torch.testing.assert_close(res.straight, straight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.arc, arc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.discrepancy, (straight - arc).abs(), rtol=1e-10, atol=1e-12)
    assert float(res.discrepancy.min()) > 1e-2  # far above quadrature error
    # its symmetric part is conservative (energy x.S x / 2): both paths agree with the closed form
    S = 0.5 * (A + A.T)
    sym = relative_energy(_linear_field_denoiser(S), 0.7, a, b, n_nodes=32)
    expected = 0.5 * (((b @ S) * b).sum(1) - ((a @ S) * a).sum(1))
    torch.testing.assert_close(sym.straight, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sym.arc, expected, rtol=1e-12, atol=1e-12)
    assert float(sym.discrepancy.max()) < 1e-12


def test_rotation_field_discrepancy_is_the_enclosed_curl():
    """Stokes: for g = omega (-y, x) (curl 2 omega) the two paths differ by 2 omega times the area between
    the chord and the quarter arc, r^2 (pi / 4 - 1 / 2) with r = |b - a| / sqrt(2)."""
    omega = 1.3
    A = torch.tensor([[0.0, -omega], [omega, 0.0]], dtype=torch.float64)
    a = random_patterns(6, 2, seed=1)
    b = random_patterns(6, 2, seed=2)
    res = relative_energy(_linear_field_denoiser(A), 0.4, a, b, n_nodes=32)
    r2 = ((b - a) ** 2).sum(1) / 2
    torch.testing.assert_close(res.discrepancy, 2 * omega * r2 * (np.pi / 4 - 0.5), rtol=1e-12, atol=1e-12)
    assert float(res.relative_discrepancy.min()) > 0.1


def test_arc_energy_matches_relative_energy_arc():
    xi, a, b = _far_pairs()
    den = EmpiricalDenoiser(xi)
    torch.testing.assert_close(
        arc_energy(den, 1.0, a, b, n_nodes=32), relative_energy(den, 1.0, a, b, n_nodes=32).arc, rtol=0, atol=0
    )


def test_relative_energy_bad_input():
    den = EmpiricalDenoiser(random_patterns(3, 2))
    a = torch.zeros(2, 2, dtype=torch.float64)
    b = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="D >= 2"):
        relative_energy(EmpiricalDenoiser(random_patterns(3, 1)), 0.5, a[:, :1], b[:, :1])
    with pytest.raises(ValueError, match="parallel"):
        relative_energy(den, 0.5, a, b, direction=torch.tensor([2.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="direction must have shape"):
        relative_energy(den, 0.5, a, b, direction=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        relative_energy(den, 0.5, a, torch.full((2, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        relative_energy(den, -1.0, a, b)
    with pytest.raises(ValueError, match="sigma must be finite"):
        relative_energy(den, float("nan"), a, b)
    with pytest.raises(ValueError, match=r"\(N, \*event_shape\)"):
        relative_energy(den, 0.5, a[0], b[0])
    with pytest.raises(ValueError, match="batch"):
        relative_energy(den, 0.5, a, b, batch=0)


def test_relative_energy_bad_options():
    den = EmpiricalDenoiser(random_patterns(3, 2))
    a, b = torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        relative_energy(den, 0.5, a, b, tolerance=0.0)
    with pytest.raises(ValueError, match="max_nodes must be >= 56"):
        relative_energy(den, 0.5, a, b, max_nodes=40)
    with pytest.raises(ValueError, match="n_nodes"):
        relative_energy(den, 0.5, a, b, n_nodes=0)


# -- quadrature error on the digits at sigma = 0.2 (the demo's setting) -----------------------------


@pytest.fixture(scope="module")
def digits_pairs():
    """The exact memory of 300 digits, pairs from the training mean to training digits and to points
    between two digits, and their exact -log p differences at sigma = 0.2 (SCIENCE.md §4)."""
    g = torch.Generator().manual_seed(0)
    x = load_digits(dtype=torch.float64).x
    xi = x[torch.randperm(x.shape[0], generator=g)[:300]]
    den = EmpiricalDenoiser(xi)
    lam = torch.rand(16, 1, generator=g, dtype=torch.float64)
    between = lam * xi[16:32] + (1 - lam) * xi[32:48]
    b = torch.cat([xi[:16], between])  # (32, 64)
    a = xi.mean(0, keepdim=True).expand_as(b)
    exact = den.neg_log_prob(b, 0.2) - den.neg_log_prob(a, 0.2)
    return den, a, b, exact


def test_adaptive_defaults_on_digits_are_within_their_reported_error(digits_pairs):
    """32 fixed nodes err by nats here (the old default); the adaptive default reaches the exact -log p within
    its reported error on every pair, and the two-path discrepancy stays below 0.1 nats."""
    den, a, b, exact = digits_pairs
    res = relative_energy(den, 0.2, a, b)
    assert res.n_nodes is None and res.tolerance == DEFAULT_TOLERANCE
    for value, error, nodes in (
        (res.straight, res.straight_error, res.straight_nodes),
        (res.arc, res.arc_error, res.arc_nodes),
    ):
        true = (value - exact).abs()
        assert bool((true <= error).all()), (true / error).max()
        assert float(error.max()) <= DEFAULT_TOLERANCE  # converged within max_nodes
        assert int(nodes.max()) <= DEFAULT_MAX_NODES
    assert float(res.discrepancy.max()) < 0.1
    assert bool((res.discrepancy <= res.discrepancy_error).all())  # a conservative score: only quadrature error
    torch.testing.assert_close(res.discrepancy_error, res.straight_error + res.arc_error, rtol=0, atol=0)
    old = straight_line_energy(den, 0.2, a, b, n_nodes=32)
    assert float((old - exact).abs().max()) > 1.0  # what the estimate guards against


def test_adaptive_error_estimate_shrinks_with_tolerance_and_nodes(digits_pairs):
    den, a, b, exact = digits_pairs
    a, b, exact = a[::4], b[::4], exact[::4]
    errors, nodes = [], []
    for tol in (1.0, 1e-2, 1e-4):
        res = relative_energy(den, 0.2, a, b, tolerance=tol, max_nodes=4096)
        assert bool(((res.straight - exact).abs() <= res.straight_error).all())
        errors.append(float(res.straight_error.max()))
        nodes.append(float(res.straight_nodes.float().mean()))
        assert errors[-1] <= tol
    assert errors[0] > errors[1] > errors[2] and nodes[0] < nodes[1] < nodes[2]


def test_fixed_rule_error_estimate_shrinks_as_nodes_grow(digits_pairs):
    """n against 2n nodes: the estimate falls with n, and once resolved (256 nodes) it bounds the true error."""
    den, a, b, exact = digits_pairs
    a, b, exact = a[::2], b[::2], exact[::2]
    medians = []
    for n in (32, 64, 128, 256):
        res = relative_energy(den, 0.2, a, b, n_nodes=n)
        medians.append(float(res.straight_error.median()))
    assert all(later < 0.5 * earlier for earlier, later in zip(medians[:-1], medians[1:], strict=True)), medians
    assert medians[-1] < 1e-5
    # resolved, I_2n is nearly exact and the estimate nearly equals the true error: allow for rounding
    assert bool(((res.straight - exact).abs() <= 1.01 * res.straight_error + 1e-9).all())


def test_max_nodes_caps_the_calls_and_flags_the_pairs_it_stopped(digits_pairs):
    """Stopped by max_nodes, a pair reports an error above the tolerance (a rough one: unresolved)."""
    den, a, b, exact = digits_pairs
    capped = relative_energy(den, 0.2, a[:8], b[:8], max_nodes=120)
    assert int(capped.straight_nodes.max()) <= 120 and int(capped.arc_nodes.max()) <= 120
    off = (capped.straight - exact[:8]).abs() > DEFAULT_TOLERANCE
    assert bool(off.any()) and bool((capped.straight_error[off] > DEFAULT_TOLERANCE).all())


def test_adaptive_chunked_calls_match_one_call_and_a_equal_b_costs_the_minimum():
    xi = random_patterns(7, 8).reshape(7, 2, 2, 2)
    den = EmpiricalDenoiser(xi)
    a = random_patterns(4, 8, seed=1).reshape(4, 2, 2, 2)
    b = torch.cat([random_patterns(3, 8, seed=2).reshape(3, 2, 2, 2), a[3:]])  # the last pair has a = b
    whole = relative_energy(den, 0.7, a, b)
    chunked = relative_energy(den, 0.7, a, b, batch=5)
    for field in ("straight", "arc", "straight_error", "arc_error"):
        torch.testing.assert_close(getattr(chunked, field), getattr(whole, field), rtol=1e-12, atol=1e-12)
    assert torch.equal(chunked.straight_nodes, whole.straight_nodes)
    exact = den.neg_log_prob(b, 0.7) - den.neg_log_prob(a, 0.7)
    assert bool(((whole.straight - exact).abs() <= whole.straight_error + 1e-12).all())
    assert float(whole.straight[3]) == 0.0 and int(whole.straight_nodes[3]) == 56  # 8 + 16 + 32 calls


# -- the stage's report section ------------------------------------------------------------------


def test_report_section_shows_the_discrepancy_with_its_quadrature_error(tmp_path):
    make_study(tmp_path, parts=("study", "energy"))
    notes = Notes()
    jobs = find_jobs(tmp_path, notes)
    classes = ("memorized", "spurious", "generalized")

    def context():
        return ReportContext(tmp_path, jobs, {}, notes, classes, (*classes, "training"))

    old = report_section(context())
    assert "No quadrature error was recorded" in old.body and ERROR_NOTE not in old.body
    for job in jobs:  # runs analysed with the error estimate
        path = job.analysis / "energy.csv"
        rows = list(csv.DictReader(path.open()))
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, [*rows[0], "discrepancy_error"])
            w.writeheader()
            w.writerows({**r, "discrepancy_error": "0.0125"} for r in rows)
    new = report_section(context())
    assert ERROR_NOTE in new.body and "0.013 [0.013, 0.013]" in new.body and new.body.count("<table") == 2
    assert "quadrature error" in new.body and not notes.items
