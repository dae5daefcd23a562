"""The attractor census against the closed forms of SCIENCE.md §3."""

import math

import numpy as np
import pytest
import torch

from conftest import random_patterns
from diffmem.core import DenseAM, EmpiricalDenoiser
from diffmem.core.census import (
    DenoiserLandscape,
    MemoryLandscape,
    census,
    default_dedup_tol,
    largest_sigma_all_memories,
    make_starts,
    nearest_neighbour_pairs,
    refine_fixed_points,
    split_starts,
)
from diffmem.core.lanczos import extreme_eigenvalues, lanczos_eigenvalues
from diffmem.core.theory import circle_neg_log_prob, circle_ring_radius, two_pattern_critical_beta
from diffmem.experiments.attractors import (
    circle_barrier,
    exact_census,
    merging_scaling,
    phase_diagram,
)
from diffmem.io.data import circle_points


def test_split_starts_shares_every_start():
    assert split_starts(100) == {"noise": 50, "perturbed": 25, "midpoints": 12, "mixtures": 13}
    assert split_starts(1) == {"noise": 0, "perturbed": 0, "midpoints": 0, "mixtures": 1}
    with pytest.raises(ValueError, match="--starts must be >= 1"):
        split_starts(0)


def two_patterns(a=1.0):
    return torch.tensor([[a, 0.0], [-a, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("rel", [0.95, 1.05])
def test_two_patterns_census_closed_form(rel):
    """One attractor (spurious, at the midpoint) iff beta d^2 / 4 < 1; else two memories and a saddle."""
    xi = two_patterns(1.0)
    beta = rel * two_pattern_critical_beta(2.0)
    c = exact_census(xi, beta**-0.5, 200, seed=1)
    assert c.n_converged == c.n_starts and sum(c.unconverged.values()) == 0
    if rel < 1:
        assert c.counts == {"memory": 0, "spurious": 1, "saddle": 0, "maximum": 0}
        (att,) = c.attractors
        assert att.x.abs().max() < 1e-3 and att.reached_from == (0, 1) and att.share == pytest.approx(1.0)
        assert att.hessian_min > 0
    else:
        assert c.counts == {"memory": 2, "spurious": 0, "saddle": 1, "maximum": 0}
        mems = c.of_kind("memory")
        assert sorted(m.reached_from for m in mems) == [(0,), (1,)]
        assert sum(m.share for m in mems) > 0.95
        (saddle,) = c.of_kind("saddle")
        assert saddle.x.abs().max() < 1e-6 and saddle.hessian_min < 0 < saddle.hessian_max
        # the Hessian of -log p at the saddle: (1 - beta d^2 / 4) / sigma^2 along the axis
        assert saddle.hessian_min == pytest.approx((1 - rel) * beta, rel=1e-6)
        # energies: the memories lie below the saddle
        assert all(m.energy < saddle.energy for m in mems)


def test_close_minima_near_the_pitchfork_stay_distinct():
    """Two patterns at +-1 just past the pitchfork (sigma = 0.9999 < sigma_c = 1): the minima sit at
    +-x* with x* = tanh(beta x*) = 0.0245, only 0.05 sigma apart, and the midpoint is a saddle. A
    fixed merge radius of 0.05 min(sigma, spread) fused all three into one spurious state; the Newton
    rule keeps two memories and the saddle (index 1: the Hessian is 1 / sigma^2 across the axis)."""
    xi, sigma = two_patterns(1.0), 0.9999
    beta = sigma**-2
    x_star = 0.0245
    for _ in range(60):  # Newton on x = tanh(beta x)
        x_star -= (x_star - math.tanh(beta * x_star)) / (1 - beta / math.cosh(beta * x_star) ** 2)
    c = exact_census(xi, sigma, 20, seed=1)  # retrieval slows down near the pitchfork: few starts
    assert c.n_converged == c.n_starts and c.patterns_unconverged == 0
    assert c.counts == {"memory": 2, "spurious": 0, "saddle": 1, "maximum": 0}
    mems = sorted(c.of_kind("memory"), key=lambda a: float(a.x[0]))
    assert [m.reached_from for m in mems] == [(1,), (0,)]
    for m, sign in zip(mems, (-1, 1), strict=True):
        torch.testing.assert_close(m.x, torch.tensor([sign * x_star, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
        # along the axis C = 1 - x*^2, so the Hessian of -log p is beta (1 - beta (1 - x*^2))
        assert m.index == 0 and m.hessian_min == pytest.approx(beta * (1 - beta * (1 - x_star**2)), rel=1e-8)
    (saddle,) = c.of_kind("saddle")
    assert saddle.x.abs().max() < 1e-12 and saddle.index == 1
    assert saddle.hessian_min == pytest.approx(beta * (1 - beta), rel=1e-8)
    assert saddle.hessian_max == pytest.approx(beta, rel=1e-12)
    assert all(m.energy < saddle.energy for m in mems)
    assert c.settings["dedup"].startswith("newton")
    # all three lie within the fixed merge radius, which fused them into one spurious state
    points = torch.stack([a.x for a in c.attractors])
    assert torch.pdist(points).max() < default_dedup_tol(xi, sigma)
    # each is located far better than that: Newton through autograd gives the same points and radii
    # many orders of magnitude below their separation
    ref = refine_fixed_points(DenoiserLandscape(EmpiricalDenoiser(xi), sigma, 2), points, tol=1e-7, scale=1.0)
    assert bool(ref.refined.all()) and float(ref.radius.max()) < 1e-9
    torch.testing.assert_close(ref.x, points, rtol=0, atol=1e-12)


def test_one_dimensional_pitchfork_has_a_maximum():
    """In D = 1 the midpoint of two patterns past the pitchfork is a maximum of -log p: index 1 = D."""
    xi = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    sigma = 0.999
    beta = sigma**-2
    c = exact_census(xi, sigma, 20, seed=1)
    assert c.counts == {"memory": 2, "spurious": 0, "saddle": 0, "maximum": 1}
    (top,) = c.of_kind("maximum")
    assert abs(float(top.x)) < 1e-12 and top.index == 1
    assert top.hessian_min == top.hessian_max == pytest.approx(beta * (1 - beta), rel=1e-8)
    assert c.to_dict()["counts"]["maximum"] == 1 and c.to_dict()["attractors"][-1]["index"] == 1


def test_ring_centre_is_a_maximum_and_bisectors_are_index_one_saddles():
    """Six patterns evenly on the unit circle at sigma = 0.3: six memories, six saddles on the
    bisectors (index 1) and the centre, where C = I / 2, so the Hessian of -log p is
    beta (1 - beta / 2) I: negative definite (a maximum, index D = 2) whenever beta > 2."""
    ring = circle_points(6, spacing="even", dtype=torch.float64)
    sigma = 0.3
    beta = sigma**-2
    c = exact_census(ring, sigma, 200, seed=0)
    assert c.counts == {"memory": 6, "spurious": 0, "saddle": 6, "maximum": 1}
    (top,) = c.of_kind("maximum")
    assert top.x.abs().max() < 1e-12 and top.index == 2 and top.share == 0.0
    assert top.hessian_min == pytest.approx(beta * (1 - beta / 2), rel=1e-9)
    assert top.hessian_max == pytest.approx(beta * (1 - beta / 2), rel=1e-9)
    saddles = c.of_kind("saddle")
    assert [s.index for s in saddles] == [1] * 6
    angles = torch.stack([torch.atan2(s.x[1], s.x[0]) for s in saddles]) % (math.pi / 3)
    torch.testing.assert_close(angles, torch.full((6,), math.pi / 6, dtype=torch.float64), rtol=0, atol=1e-9)
    assert all(m.index == 0 and m.distance < 0.01 for m in c.of_kind("memory"))


def test_dedup_falls_back_to_the_radius_without_a_jacobian():
    """Above the full-Jacobian limit there is no Newton refinement: the census merges within
    dedup_tol and says so; indices then come from Lanczos Ritz values (a lower bound)."""
    xi = random_patterns(4, 5)
    land = DenoiserLandscape(
        EmpiricalDenoiser(xi), 0.3, 5, exact_max_dim=0, lanczos_iter=5, generator=torch.Generator().manual_seed(0)
    )
    starts, labels = make_starts(xi, 0.3, split_starts(40), generator=torch.Generator().manual_seed(1))
    c = census(land, xi, starts, start_labels=labels)
    exact = census(MemoryLandscape(DenseAM(xi), 0.3), xi, starts, start_labels=labels, saddle_search="none")
    assert c.settings["dedup"].startswith("radius") and "full Jacobian" in c.settings["dedup"]
    assert c.counts == exact.counts
    with pytest.raises(ValueError, match="unknown dedup"):
        census(land, xi, starts, dedup="grid")


def test_largest_sigma_with_all_memories_is_half_the_distance():
    xi = two_patterns(0.8)  # d = 1.6: memories merge at sigma = d / 2 = 0.8
    am = DenseAM(xi)
    s = largest_sigma_all_memories(lambda s: MemoryLandscape(am, s), xi, 0.1, 3.0, rtol=1e-4)
    assert s == pytest.approx(0.8, rel=2e-3)


def test_single_pattern_is_one_memory():
    xi = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    c = exact_census(xi, 0.7, 40)
    assert c.counts == {"memory": 1, "spurious": 0, "saddle": 0, "maximum": 0}
    assert c.attractors[0].share == pytest.approx(1.0) and c.attractors[0].distance < 1e-9


def test_continuum_circle_ring_radius():
    """2,000 uniformly spaced points on the circle: the census finds a ring at r* = I1(beta r)/I0(beta r)
    (within 1%; in fact 1e-4), and a single attractor at the centre when beta < 2. Randomly drawn
    points carry density fluctuations that move the ring by about 1% (checked at 2%)."""
    even = circle_points(2000, spacing="even", dtype=torch.float64)
    drawn = circle_points(2000, spacing="uniform", seed=3, dtype=torch.float64)
    for pts, rtol, betas in ((even, 0.01, (5.0, 20.0)), (drawn, 0.02, (20.0,))):
        for beta in betas:
            c = exact_census(pts, beta**-0.5, 20, seed=0, saddle_search="none", max_iter=1500)
            radii = torch.stack([a.x for a in c.attractors if a.index == 0]).norm(dim=1)
            r_star = circle_ring_radius(beta)
            assert len(radii) >= 3 and ((radii - r_star).abs() / r_star < rtol).all(), (beta, radii, r_star)
    c = exact_census(drawn, 1.5**-0.5, 30, seed=0, saddle_search="none")
    (att,) = c.attractors
    assert att.kind == "spurious" and float(att.x.norm()) < 0.03


def test_ring_radius_theory():
    assert circle_ring_radius(1.9) == 0.0 and circle_ring_radius(2.0) == 0.0
    for beta in (2.5, 5.0, 30.0):
        r = circle_ring_radius(beta)
        z = torch.tensor(beta * r, dtype=torch.float64)
        ratio = torch.special.i1(z) / torch.special.i0(z)
        assert float(ratio) == pytest.approx(r, abs=1e-10)
    assert circle_ring_radius(500.0) == pytest.approx(1 - 1 / 1000, abs=1e-5)


def test_continuum_energy_matches_dense_circle():
    """-log p of 4,000 evenly spaced points converges to the continuum closed form."""
    pts = circle_points(4000, spacing="even", dtype=torch.float64)
    den = EmpiricalDenoiser(pts)
    x = torch.tensor([[0.0, 0.1], [0.5, 0.5], [1.2, -0.3], [0.9, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(den.neg_log_prob(x, 0.3), circle_neg_log_prob(x, 0.3), rtol=1e-9, atol=1e-9)


def test_neighbour_merging_scales_as_one_over_k():
    res = merging_scaling([8, 16, 32, 64])
    assert 0.95 < res["exponent"] < 1.05
    assert res["K_times_sigma"][-1] == pytest.approx(1.708, abs=0.01)  # K sigma_merge -> constant
    assert circle_barrier(16, 0.05) > circle_barrier(16, 0.1) > circle_barrier(16, 0.2) > 0


def test_general_landscape_matches_the_exact_memory():
    xi = random_patterns(6, 5)
    sigma = 0.9
    exact = MemoryLandscape(DenseAM(xi), sigma)
    general = DenoiserLandscape(EmpiricalDenoiser(xi), sigma, 5)
    x = random_patterns(4, 5, seed=2)
    torch.testing.assert_close(general.jacobian(x), exact.jacobian(x), rtol=1e-9, atol=1e-10)
    for a, b in zip(general.hessian_extremes(x), exact.hessian_extremes(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    lanczos = DenoiserLandscape(
        EmpiricalDenoiser(xi), sigma, 5, exact_max_dim=0, lanczos_iter=5, generator=torch.Generator().manual_seed(0)
    )
    for a, b in zip(lanczos.hessian_extremes(x), exact.hessian_extremes(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)
    # the census through autograd finds what the closed form finds
    starts, labels = make_starts(xi, sigma, split_starts(60), generator=torch.Generator().manual_seed(1))
    c1 = census(exact, xi, starts, start_labels=labels)
    c2 = census(general, xi, starts, start_labels=labels)
    assert c1.counts == c2.counts
    assert [a.share for a in c1.attractors] == pytest.approx([a.share for a in c2.attractors])


def test_lanczos_extreme_eigenvalues():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 40, 40, generator=g, dtype=torch.float64)
    sym = a + a.transpose(1, 2)
    exact = torch.linalg.eigvalsh(sym)
    ritz = lanczos_eigenvalues(
        lambda v: (sym @ v[..., None])[..., 0], torch.randn(3, 40, generator=g, dtype=torch.float64), 40
    )
    torch.testing.assert_close(ritz, exact, rtol=1e-8, atol=1e-8)
    lo, hi = extreme_eigenvalues(
        lambda v: (sym @ v[..., None])[..., 0], torch.zeros(3, 40, dtype=torch.float64), n_iter=30, generator=g
    )
    torch.testing.assert_close(lo, exact[:, 0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hi, exact[:, -1], rtol=1e-6, atol=1e-6)


def test_unconverged_starts_are_counted_not_dropped():
    xi = random_patterns(5, 3)
    starts, labels = make_starts(xi, 0.8, {"noise": 20, "mixtures": 10}, generator=torch.Generator().manual_seed(0))
    c = census(
        MemoryLandscape(DenseAM(xi), 0.8), xi, starts, start_labels=labels, max_iter=2, tol=1e-15, saddle_search="none"
    )
    assert c.n_starts == 30 and c.n_converged == 0
    assert c.unconverged == {"noise": 20, "mixtures": 10}
    assert c.patterns_unconverged == 5


def test_make_starts_strategies():
    xi = random_patterns(10, 4)
    g = torch.Generator().manual_seed(0)
    starts, labels = make_starts(xi, 0.5, {"noise": 7, "perturbed": 5, "midpoints": 100, "mixtures": 6}, generator=g)
    pairs = nearest_neighbour_pairs(xi)
    assert labels.count("noise") == 7 and labels.count("perturbed") == 5 and labels.count("mixtures") == 6
    assert labels.count("midpoints") == pairs.shape[0] <= 10  # all pairs when fewer than asked
    mids = starts[[i for i, lab in enumerate(labels) if lab == "midpoints"]]
    torch.testing.assert_close(mids, 0.5 * (xi[pairs[:, 0]] + xi[pairs[:, 1]]))
    assert len(labels) == starts.shape[0]
    with pytest.raises(ValueError, match="unknown start strategies"):
        make_starts(xi, 0.5, {"grid": 3}, generator=g)
    with pytest.raises(ValueError, match="at least one start"):
        make_starts(xi, 0.5, {"noise": 0}, generator=g)
    with pytest.raises(ValueError, match=">= 0"):
        make_starts(xi, 0.5, {"noise": -1}, generator=g)


def test_census_bad_input():
    xi = random_patterns(4, 3)
    land = MemoryLandscape(DenseAM(xi), 0.5)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        MemoryLandscape(DenseAM(xi), 0.0)
    with pytest.raises(ValueError, match="at least one start"):
        census(land, xi, torch.zeros(0, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        census(land, xi, torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        census(land, xi, torch.full((2, 3), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        census(land, torch.full((2, 3), float("nan"), dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must be >= 1e-12, got -1.0"):
        exact_census(xi, -1.0, 10)
    with pytest.raises(ValueError, match="sigma must be <= 1000000000000.0, got 1e"):
        exact_census(xi, 1e300, 10)  # beta = 1 / sigma^2 and sigma^2 stay usable floats


def test_phase_diagram_two_patterns_and_circle():
    xi = torch.cat([two_patterns(0.5), torch.tensor([[0.0, 3.0]], dtype=torch.float64)])  # d = 1: merge at 0.5
    sigmas = [0.3, 0.45, 0.55, 0.8]
    diagram = phase_diagram(xi, [1, 2, 3], sigmas, n_starts=60, progress=False)
    th = {t["K"]: t for t in diagram.thresholds}
    assert th[1]["sigma_all_memories"] == math.inf and th[1]["sigma_first_spurious"] is None
    assert th[2]["sigma_all_memories"] == pytest.approx(0.5, rel=2e-3)
    assert th[2]["sigma_first_spurious"] == 0.55
    grid = diagram.grid("n_memory")
    assert grid.shape == (3, 4) and grid[1].tolist() == [2, 2, 0, 0]
    assert np.all(diagram.grid("share_spurious")[1, 2:] == 1.0)
