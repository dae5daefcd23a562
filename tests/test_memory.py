"""The dense associative memory against closed forms, autograd and an independent log-density."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from conftest import random_patterns
from diffmem import DenseAM, EmpiricalDenoiser


def naive_energy(x, xi, beta):
    d2 = ((x[:, None, :] - xi[None]) ** 2).sum(-1)
    return -torch.logsumexp(-0.5 * beta * d2, dim=1) / beta


def test_energy_matches_brute_force():
    xi = random_patterns(7, 5)
    x = random_patterns(11, 5, seed=1) * 2
    am = DenseAM(xi)
    for beta in (0.01, 0.7, 3.0, 50.0):
        torch.testing.assert_close(am.energy(x, beta), naive_energy(x, xi, beta), rtol=1e-12, atol=1e-12)


def test_neg_log_prob_equals_gaussian_mixture_density():
    """-log p_sigma = beta E + (D/2) log(2 pi sigma^2) + log K  (SCIENCE.md §4), against scipy."""
    k, d = 6, 4
    xi = random_patterns(k, d)
    x = random_patterns(9, d, seed=3) * 1.5
    den = EmpiricalDenoiser(xi)
    for sigma in (0.3, 1.0, 4.0):
        logpdf = np.stack(
            [multivariate_normal(xi[m].numpy(), sigma**2 * np.eye(d)).logpdf(x.numpy()) for m in range(k)]
        )
        expected = -(logsumexp(logpdf, axis=0) - math.log(k))
        np.testing.assert_allclose(den.neg_log_prob(x, sigma).numpy(), expected, rtol=1e-12, atol=1e-10)
        beta = sigma**-2
        const = 0.5 * d * math.log(2 * math.pi * sigma**2) + math.log(k)
        np.testing.assert_allclose((beta * den.memory.energy(x, beta) + const).numpy(), expected, rtol=1e-12)


def test_gradient_is_autograd_of_energy_and_retrieval_residual():
    xi = random_patterns(5, 3)
    am = DenseAM(xi)
    x = random_patterns(4, 3, seed=2).requires_grad_(True)
    e = am.energy(x, 1.7).sum()
    (g,) = torch.autograd.grad(e, x)
    torch.testing.assert_close(g, am.grad(x.detach(), 1.7), rtol=1e-10, atol=1e-12)


def test_weights_are_softmax_and_retrieval_is_weighted_mean():
    xi = random_patterns(8, 3)
    am = DenseAM(xi)
    x = random_patterns(5, 3, seed=4)
    w = am.weights(x, 2.0)
    d2 = ((x[:, None] - xi[None]) ** 2).sum(-1)
    torch.testing.assert_close(w, torch.softmax(-d2, dim=1))
    torch.testing.assert_close(am.retrieve(x, 2.0), w @ xi)


def test_hessian_matches_autograd_and_hvp():
    xi = random_patterns(6, 4)
    am = DenseAM(xi)
    x = random_patterns(3, 4, seed=5) * 0.5
    beta = 1.3
    H = am.hessian(x, beta)
    for i in range(3):
        Ha = torch.autograd.functional.hessian(lambda z: am.energy(z[None], beta)[0], x[i])
        torch.testing.assert_close(H[i], Ha, rtol=1e-10, atol=1e-10)
    v = random_patterns(3, 4, seed=6)
    torch.testing.assert_close(am.hvp(x, v, beta), (H @ v[..., None])[..., 0], rtol=1e-10, atol=1e-12)
    shared = v[0]
    torch.testing.assert_close(am.hvp(x, shared, beta), H @ shared, rtol=1e-10, atol=1e-12)


def test_covariance_top_eigenvalue_matches_dense_eigvalsh():
    xi = random_patterns(30, 5)
    am = DenseAM(xi)
    x = random_patterns(4, 5, seed=7)
    for beta in (0.2, 1.0, 5.0):
        dense = torch.linalg.eigvalsh(am.covariance(x, beta))[..., -1]
        torch.testing.assert_close(am.covariance_top_eigenvalue(x, beta), dense, rtol=1e-8, atol=1e-10)
    # K < D: the Gram route
    am_small = DenseAM(random_patterns(3, 10, seed=1))
    x = random_patterns(2, 10, seed=2)
    dense = torch.linalg.eigvalsh(am_small.covariance(x, 0.4))[..., -1]
    torch.testing.assert_close(am_small.covariance_top_eigenvalue(x, 0.4), dense, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_and_unchunked_agree(chunk):
    xi = random_patterns(20, 6)
    x = random_patterns(9, 6, seed=8)
    beta = torch.linspace(0.1, 8.0, 9, dtype=torch.float64)
    full, part = DenseAM(xi, chunk_size=10_000), DenseAM(xi, chunk_size=chunk)
    torch.testing.assert_close(part.energy(x, beta), full.energy(x, beta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part.retrieve(x, beta), full.retrieve(x, beta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part.hessian(x, beta), full.hessian(x, beta), rtol=1e-10, atol=1e-12)
    v = random_patterns(9, 6, seed=9)
    torch.testing.assert_close(part.hvp(x, v, beta), full.hvp(x, v, beta), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(part.nearest(x)[0], full.nearest(x)[0])


def test_batch_agnostic_shapes():
    am = DenseAM(random_patterns(5, 3))
    x = random_patterns(24, 3, seed=1).reshape(2, 4, 3, 3)
    assert am.energy(x, 1.0).shape == (2, 4, 3)
    assert am.retrieve(x, 1.0).shape == (2, 4, 3, 3)
    assert am.hessian(x, 1.0).shape == (2, 4, 3, 3, 3)
    assert am.weights(x, 1.0).shape == (2, 4, 3, 5)
    flat = am.energy(x.reshape(-1, 3), 1.0)
    torch.testing.assert_close(am.energy(x, 1.0).reshape(-1), flat)
    single = am.energy(x[0, 0, 0], 1.0)
    assert single.shape == () and torch.isclose(single, flat[0])


def test_float32_agrees_with_float64():
    xi = random_patterns(50, 16)
    x = random_patterns(8, 16, seed=3)
    a64, a32 = DenseAM(xi), DenseAM(xi.float())
    torch.testing.assert_close(a32.retrieve(x.float(), 0.5).double(), a64.retrieve(x, 0.5), rtol=1e-4, atol=1e-5)


def test_million_patterns_stream_in_small_memory():
    g = torch.Generator().manual_seed(0)
    xi = torch.randn(1_000_000, 4, generator=g)
    am = DenseAM(xi, chunk_size=65_536)
    x = torch.randn(3, 4, generator=g)
    e, m = am.energy_and_retrieve(x, 2.0)
    x64, xi64 = x.double(), xi.double()
    reference = torch.softmax(2.0 * (x64 @ xi64.T - 0.5 * (xi64 * xi64).sum(-1)), 1) @ xi64
    torch.testing.assert_close(m.double(), reference, rtol=0, atol=1e-4)
    assert torch.isfinite(e).all()


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 12),
    d=st.integers(1, 6),
    beta=st.floats(0.05, 30.0),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 5.0),
)
def test_energy_never_increases_along_retrieval(k, d, beta, seed, scale):
    """x <- m(x) is the concave-convex procedure for E: E(m(x)) <= E(x)."""
    xi = random_patterns(k, d, seed=seed) * scale
    am = DenseAM(xi)
    x = random_patterns(5, d, seed=seed + 1) * scale * 2
    e = am.energy(x, beta)
    for _ in range(15):
        x = am.retrieve(x, beta)
        e_next = am.energy(x, beta)
        assert (e_next <= e + 1e-10 * (1 + e.abs())).all()
        e = e_next


def test_single_pattern_is_always_retrieved():
    xi = torch.tensor([[0.5, -2.0, 3.0]], dtype=torch.float64)
    am = DenseAM(xi)
    x = random_patterns(4, 3, seed=1) * 10
    torch.testing.assert_close(am.retrieve(x, 0.01), xi.expand(4, 3))
    res = am.run(x, 0.3)
    # one step lands on the pattern, the second step (an update of zero) confirms it
    assert res.converged.all() and (res.n_iter == 2).all()
    torch.testing.assert_close(res.x, xi.expand(4, 3))


@pytest.mark.parametrize("rel", [0.97, 1.03])
def test_two_patterns_pitchfork(rel):
    """Patterns +-a (d = 2a): the midpoint is the unique minimum iff beta d^2 / 4 < 1 (SCIENCE.md §3)."""
    a = 1.5
    d = 2 * a
    beta = rel * 4 / d**2
    xi = torch.tensor([[a, 0.0], [-a, 0.0]], dtype=torch.float64)
    am = DenseAM(xi)
    mid = torch.zeros(1, 2, dtype=torch.float64)
    torch.testing.assert_close(am.retrieve(mid, beta), mid)  # the midpoint is always a fixed point
    torch.testing.assert_close(am.covariance_top_eigenvalue(mid, beta), torch.tensor([a * a], dtype=torch.float64))
    stable = bool(am.is_stable(mid, beta))
    eig_min = torch.linalg.eigvalsh(am.hessian(mid, beta))[0, 0]
    res = am.run(xi + torch.tensor([[-0.1, 0.05], [0.1, -0.05]], dtype=torch.float64), beta, max_iter=20_000, tol=1e-9)
    assert res.converged.all()
    if rel < 1:
        assert stable and eig_min > 0
        # both patterns' retrievals collapse onto the midpoint: one (spurious) attractor
        torch.testing.assert_close(res.x, torch.zeros_like(res.x), atol=1e-3, rtol=0)
    else:
        assert not stable and eig_min < 0
        # two memories, one near each pattern, and a saddle between them
        assert res.x[0, 0] > 0.1 and res.x[1, 0] < -0.1
        torch.testing.assert_close(res.x[0], -res.x[1])


def test_run_methods_agree_on_end_points(gen):
    xi = random_patterns(4, 3) * 3
    am = DenseAM(xi)
    x = xi + 0.2 * random_patterns(4, 3, seed=2)
    fp = am.run(x, 2.0)
    gd = am.run(x, 2.0, method="gradient", step_size=0.5, max_iter=5000)
    assert fp.converged.all() and gd.converged.all()
    assert (gd.n_iter > fp.n_iter).all()
    torch.testing.assert_close(gd.x, fp.x, atol=1e-5, rtol=0)
    assert (fp.residual < 1e-6).all()
    torch.testing.assert_close(fp.energy, am.energy(fp.x, 2.0))
    lv = am.run(x, 2.0, method="langevin", temperature=1e-4, step_size=0.1, max_iter=200, generator=gen)
    assert not lv.converged.any() and (lv.n_iter == 200).all()
    assert ((lv.x - fp.x).norm(dim=-1) < 0.1).all()  # low temperature: jitters inside the same well


def test_run_reports_non_convergence():
    xi = random_patterns(10, 3)
    am = DenseAM(xi)
    res = am.run(random_patterns(6, 3, seed=1), 1.0, max_iter=1, tol=1e-14)
    assert not res.converged.any() and (res.n_iter == 1).all()


def test_langevin_samples_the_gaussian_for_one_pattern(gen):
    """One pattern: exp(-E/T) with T = 1/beta is N(xi, 1/beta) per coordinate."""
    xi = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    am = DenseAM(xi)
    beta = 4.0
    x = xi.expand(4000, 2).clone()
    out = am.run(x, beta, method="langevin", temperature=1 / beta, step_size=0.05, max_iter=200, generator=gen).x
    torch.testing.assert_close(out.mean(0), xi[0], atol=0.03, rtol=0)
    torch.testing.assert_close(out.var(0), torch.full((2,), 1 / beta, dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DenseAM(torch.tensor([[0.0, float("nan")]])), "NaN or Inf"),
        (lambda: DenseAM(torch.tensor([[0.0, float("inf")]])), "NaN or Inf"),
        (lambda: DenseAM(torch.zeros(0, 3)), "empty"),
        (lambda: DenseAM(torch.zeros(3)), r"shape \(K, D\)"),
        (lambda: DenseAM(torch.zeros(2, 3, dtype=torch.int64)), "float32 or float64"),
        (lambda: DenseAM(torch.zeros(2, 3)).energy(torch.zeros(4, 2), 1.0), r"shape \(\.\.\., 3\)"),
        (lambda: DenseAM(torch.zeros(2, 3)).energy(torch.zeros(4, 3), 0.0), "beta must be > 0"),
        (lambda: DenseAM(torch.zeros(2, 3)).energy(torch.zeros(4, 3), -1.0), "beta must be > 0"),
        (lambda: DenseAM(torch.zeros(2, 3)).energy(torch.zeros(4, 3), float("nan")), "NaN"),
        (lambda: DenseAM(torch.zeros(2, 3)).energy(torch.zeros(4, 3, dtype=torch.float64), 1.0), "dtype"),
        (lambda: DenseAM(torch.zeros(2, 3)).energy(torch.full((4, 3), float("nan")), 1.0), "NaN or Inf"),
        (lambda: DenseAM(torch.zeros(2, 3)).energy(torch.zeros(4, 3), torch.ones(3)), "broadcast"),
        (lambda: DenseAM(torch.zeros(2, 3)).run(torch.zeros(4, 3), 1.0, method="newton"), "unknown retrieval"),
        (lambda: DenseAM(torch.zeros(2, 3)).run(torch.zeros(4, 3), 1.0, method="langevin"), "Generator"),
        (lambda: DenseAM(torch.zeros(2, 3)).run(torch.zeros(4, 3), 1.0, max_iter=0), "max_iter"),
        (lambda: DenseAM(torch.zeros(2, 3), chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input_raises_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()
