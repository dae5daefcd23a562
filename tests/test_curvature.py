"""Hessian spectra of -log p_sigma from a denoiser's Jacobian against the dense memory's closed form."""

import numpy as np
import pytest
import torch
from torch.autograd.function import once_differentiable

import diffmem.core.curvature as curvature
from conftest import random_patterns
from diffmem.core import DenseAM, EmpiricalDenoiser
from diffmem.core.curvature import denoiser_jacobian, hessian_spectrum, summarize_by_class


def closed_form_hessian(patterns, x, sigma):
    """-log p_sigma = beta E(x; beta) + const, so its Hessian is beta (I - beta C(x)), beta = 1 / sigma^2."""
    beta = sigma**-2
    return beta * DenseAM(patterns).hessian(x, beta)


def linear_denoiser(M):
    """D(x, sigma) = M x: Jacobian M at every x, whatever sigma."""
    return lambda x, sigma: x @ M.T


@pytest.mark.parametrize("sigma", [0.4, 1.0, 2.5])
def test_exact_spectrum_matches_dense_memory_closed_form(sigma):
    xi = random_patterns(30, 8)
    x = random_patterns(5, 8, seed=1)
    spec = hessian_spectrum(EmpiricalDenoiser(xi), x, sigma)
    H = closed_form_hessian(xi, x, sigma)
    eig = torch.linalg.eigvalsh(H)
    scale = sigma**-2
    assert spec.exact and spec.dim == 8 and spec.eigenvalues.shape == (5, 8)
    torch.testing.assert_close(spec.eigenvalues, eig, rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(spec.lambda_min, eig[:, 0], rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(spec.lambda_max, eig[:, -1], rtol=0, atol=1e-8 * scale)
    trace = torch.diagonal(H, dim1=1, dim2=2).sum(1)
    torch.testing.assert_close(spec.mean_curvature, trace / 8, rtol=1e-10, atol=0)
    torch.testing.assert_close(spec.effective_dim, trace**2 / (H**2).sum((1, 2)), rtol=1e-10, atol=0)
    assert float(spec.asymmetry.max()) < 1e-12  # the exact score is a gradient: J is symmetric
    near = (eig.abs() < spec.tau * scale).sum(1)
    assert torch.equal(spec.n_near_zero, near) and torch.equal(spec.n_negative, (eig <= -spec.tau * scale).sum(1))


def test_denoiser_jacobian_is_beta_times_covariance_by_both_methods():
    xi = random_patterns(20, 5)
    x = random_patterns(4, 5, seed=1)
    sigma = 0.8
    beta = sigma**-2
    expected = beta * DenseAM(xi).covariance(x, beta)
    for method in ("vmap", "loop", "auto"):
        J = denoiser_jacobian(EmpiricalDenoiser(xi), x, sigma, method=method)
        torch.testing.assert_close(J, expected, rtol=1e-10, atol=1e-12)


def test_batch_chunks_and_image_states_give_the_per_point_spectrum(monkeypatch):
    """Images (B, C, H, W) or flat states with event_shape; points split into Jacobian chunks of 2."""
    xi = random_patterns(25, 6).reshape(25, 1, 2, 3)
    x = random_patterns(5, 6, seed=1).reshape(5, 1, 2, 3)
    den = EmpiricalDenoiser(xi)
    whole = hessian_spectrum(den, x, 0.7)
    monkeypatch.setattr(curvature, "_JACOBIAN_BUDGET", 12)  # 12 // D = 2 points per chunk
    chunked = hessian_spectrum(den, x.reshape(5, 6), 0.7, event_shape=(1, 2, 3))
    torch.testing.assert_close(chunked.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=1e-12)
    for i in range(5):
        single = hessian_spectrum(den, x[i : i + 1], 0.7)
        torch.testing.assert_close(single.eigenvalues[0], whole.eigenvalues[i], rtol=1e-12, atol=1e-12)
    eig = torch.linalg.eigvalsh(closed_form_hessian(xi.reshape(25, 6), x.reshape(5, 6), 0.7))
    torch.testing.assert_close(whole.eigenvalues, eig, rtol=0, atol=1e-10)


def test_lanczos_matches_closed_form_extremes():
    """D = 200 above exact_max_dim = 50: the 3 smallest and 3 largest eigenvalues of beta (I - beta C)."""
    d = 200
    xi = random_patterns(400, d) / d**0.5
    x = random_patterns(3, d, seed=1) / d**0.5
    sigma = 0.1
    beta = sigma**-2
    gen = torch.Generator().manual_seed(0)
    spec = hessian_spectrum(EmpiricalDenoiser(xi), x, sigma, k=3, exact_max_dim=50, n_iter=100, generator=gen)
    H = closed_form_hessian(xi, x, sigma)
    eig = torch.linalg.eigvalsh(H)
    assert not spec.exact and spec.eigenvalues.shape == (3, 6)
    expected = torch.cat([eig[:, :3], eig[:, -3:]], dim=1)
    torch.testing.assert_close(spec.eigenvalues, expected, rtol=0, atol=2e-6 * beta)
    # Hutchinson estimates from 8 probes: within a few percent in D = 200
    trace = torch.diagonal(H, dim1=1, dim2=2).sum(1)
    torch.testing.assert_close(spec.mean_curvature, trace / d, rtol=0.1, atol=0)
    torch.testing.assert_close(spec.effective_dim, trace**2 / (H**2).sum((1, 2)), rtol=0.2, atol=0)
    assert float(spec.asymmetry.max()) < 1e-12


def test_network_denoiser_float32_jacobian_and_lanczos_agree_with_autograd():
    """A small MLP (non-symmetric Jacobian) in float32: the Jacobian matches torch.autograd.functional,
    and Lanczos with n_iter = D reproduces the exact extremes."""
    d = 16
    net = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, d))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g))

    def denoiser(x, sigma):
        return net(x)

    x = random_patterns(3, d, seed=1, dtype=torch.float32)
    J = denoiser_jacobian(denoiser, x, 0.5)
    for i in range(3):
        ref = torch.autograd.functional.jacobian(net, x[i])
        torch.testing.assert_close(J[i], ref, rtol=1e-5, atol=1e-6)
    exact = hessian_spectrum(denoiser, x, 0.5)
    assert exact.eigenvalues.dtype == torch.float32 and float(exact.asymmetry.min()) > 0.1
    gen = torch.Generator().manual_seed(0)
    lanczos = hessian_spectrum(denoiser, x, 0.5, k=2, exact_max_dim=8, n_iter=d, generator=gen)
    torch.testing.assert_close(lanczos.lambda_min, exact.lambda_min, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lanczos.lambda_max, exact.lambda_max, rtol=1e-4, atol=1e-4)


def test_memory_at_small_sigma_is_an_isotropic_well():
    """At a stored pattern with sigma far below the pattern spacing: H = I / sigma^2 (weights one-hot)."""
    xi = random_patterns(10, 8)
    sigma = 0.05
    spec = hessian_spectrum(EmpiricalDenoiser(xi), xi[:3], sigma)
    torch.testing.assert_close(spec.eigenvalues * sigma**2, torch.ones(3, 8, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(spec.effective_dim, torch.full((3,), 8.0, dtype=torch.float64), rtol=1e-6, atol=0)
    assert spec.n_near_zero.tolist() == [0, 0, 0] and spec.n_negative.tolist() == [0, 0, 0]


@pytest.mark.parametrize("half_distance", [1.0, 0.3])
def test_two_pattern_midpoint_saddle_or_merged_minimum(half_distance):
    """Patterns +-a e_1 (SCIENCE.md §3): at the midpoint C = a^2 e_1 e_1^T, so lambda_min = beta (1 - beta a^2),
    negative (a saddle) iff a > sigma; the other eigenvalues are beta."""
    a, sigma = half_distance, 0.5
    beta = sigma**-2
    xi = torch.zeros(2, 3, dtype=torch.float64)
    xi[0, 0], xi[1, 0] = a, -a
    spec = hessian_spectrum(EmpiricalDenoiser(xi), torch.zeros(1, 3, dtype=torch.float64), sigma)
    expected = torch.tensor([[beta * (1 - beta * a**2), beta, beta]], dtype=torch.float64)
    torch.testing.assert_close(spec.eigenvalues, expected, rtol=1e-12, atol=1e-12)
    assert spec.n_negative.item() == (1 if a > sigma else 0)


def test_dense_line_of_patterns_has_a_flat_direction():
    """Patterns packed along a segment (spacing << sigma) act like a data manifold: D(x) follows x along
    it (J ~ projection onto the line), so one eigenvalue is near zero and the transverse ones ~ 1 / sigma^2."""
    t = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    xi = torch.stack([t, torch.zeros_like(t), torch.zeros_like(t)], dim=1)
    sigma = 0.05
    spec = hessian_spectrum(EmpiricalDenoiser(xi), torch.tensor([[0.1, 0.0, 0.0]], dtype=torch.float64), sigma)
    eig = spec.eigenvalues[0] * sigma**2
    assert abs(float(eig[0])) < 1e-3
    torch.testing.assert_close(eig[1:], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert spec.n_near_zero.item() == 1 and spec.n_negative.item() == 0


def test_non_symmetric_jacobian_reports_its_asymmetry_exactly_and_by_lanczos():
    g = torch.Generator().manual_seed(2)
    d, sigma = 60, 0.5
    M = 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64)
    asym = float((M - M.T).norm() / M.norm())
    x = random_patterns(2, d, seed=1)
    exact = hessian_spectrum(linear_denoiser(M), x, sigma)
    H = (torch.eye(d, dtype=torch.float64) - 0.5 * (M + M.T)) / sigma**2
    torch.testing.assert_close(exact.eigenvalues, torch.linalg.eigvalsh(H).expand(2, d), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(exact.asymmetry, torch.full((2,), asym, dtype=torch.float64), rtol=1e-12, atol=0)
    gen = torch.Generator().manual_seed(0)
    lanczos = hessian_spectrum(linear_denoiser(M), x, sigma, k=2, exact_max_dim=10, n_iter=d, generator=gen)
    torch.testing.assert_close(lanczos.asymmetry, exact.asymmetry, rtol=0.1, atol=0)
    torch.testing.assert_close(lanczos.lambda_min, exact.lambda_min, rtol=1e-10, atol=0)
    torch.testing.assert_close(lanczos.lambda_max, exact.lambda_max, rtol=1e-10, atol=0)


class _NoVmapCube(torch.autograd.Function):
    """x^3 whose backward branches on the incoming gradient's values, which torch.vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if bool((grad == 0).all()):
            return torch.zeros_like(x)
        return 3 * x**2 * grad


def test_auto_jacobian_falls_back_to_autograd_rows_when_vmap_fails():
    def cube(x, sigma):
        return _NoVmapCube.apply(x)

    x = random_patterns(3, 4, seed=1)
    with pytest.raises(RuntimeError, match="[Bb]atching rule"):
        denoiser_jacobian(cube, x, 1.0, method="vmap")
    J = denoiser_jacobian(cube, x, 1.0)
    torch.testing.assert_close(J, torch.diag_embed(3 * x**2), rtol=1e-14, atol=0)
    spec = hessian_spectrum(cube, x, 1.0)
    torch.testing.assert_close(spec.eigenvalues, torch.sort(1 - 3 * x**2, dim=1).values, rtol=1e-12, atol=1e-12)


class _CubeOnceDifferentiable(torch.autograd.Function):
    """x^3 whose backward cannot be differentiated again, with a forward-mode derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        return x**3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * tangent


def test_lanczos_uses_forward_mode_when_double_backward_fails():
    def cube(x, sigma):
        return 0.1 * _CubeOnceDifferentiable.apply(x)

    x = random_patterns(2, 12, seed=1)
    spec = hessian_spectrum(cube, x, 0.5, k=2, exact_max_dim=4, n_iter=12, generator=torch.Generator().manual_seed(0))
    eig = torch.sort((1 - 0.3 * x**2) / 0.25, dim=1).values
    torch.testing.assert_close(spec.eigenvalues, torch.cat([eig[:, :2], eig[:, -2:]], 1), rtol=1e-10, atol=1e-10)


def test_summarize_by_class_quartiles_match_numpy():
    xi = random_patterns(10, 4)
    den = EmpiricalDenoiser(xi)
    sigma = 0.5
    memorized = hessian_spectrum(den, xi[:4] + 1e-3, sigma)
    others = hessian_spectrum(den, random_patterns(5, 4, seed=1), sigma)
    labels = ["memorized"] * 4 + ["generalized", "spurious", "generalized", "spurious", "generalized"]
    summary = summarize_by_class([memorized, others], labels)
    assert list(summary) == ["memorized", "generalized", "spurious"]
    assert [summary[c]["n"] for c in summary] == [4, 3, 2]
    for field in curvature.SUMMARY_FIELDS:
        values = torch.cat([getattr(memorized, field), getattr(others, field)]).double().numpy()
        for label in summary:
            sel = values[[i for i, lab in enumerate(labels) if lab == label]]
            q25, med, q75 = np.quantile(sel, [0.25, 0.5, 0.75])
            got = summary[label][field]
            assert got["q25"] == pytest.approx(q25) and got["median"] == pytest.approx(med)
            assert got["q75"] == pytest.approx(q75)
            assert isinstance(got["median"], float)
    # memorized points sit in sharper wells than the rest
    assert summary["memorized"]["lambda_min"]["median"] > summary["generalized"]["lambda_min"]["median"]
    one = summarize_by_class(memorized, ["memorized"] * 4)
    assert one["memorized"] == summary["memorized"]


def test_bad_input():
    den = EmpiricalDenoiser(random_patterns(5, 4))
    x = random_patterns(2, 4, seed=1)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        hessian_spectrum(den, x, 0.0)
    with pytest.raises(ValueError, match="sigma must be finite"):
        hessian_spectrum(den, x, float("inf"))
    with pytest.raises(ValueError, match="NaN"):
        hessian_spectrum(den, torch.full((2, 4), float("nan"), dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="event_shape"):
        hessian_spectrum(den, x, 0.5, event_shape=(5,))
    with pytest.raises(ValueError, match=r"\(B, \*event_shape\)"):
        hessian_spectrum(den, x[0], 0.5)
    with pytest.raises(ValueError, match="pass a torch.Generator"):
        hessian_spectrum(den, x, 0.5, exact_max_dim=2)
    with pytest.raises(ValueError, match="n_iter >= 2k"):
        hessian_spectrum(den, x, 0.5, exact_max_dim=2, k=3, n_iter=4, generator=torch.Generator())
    with pytest.raises(ValueError, match="unknown Jacobian method"):
        hessian_spectrum(den, x, 0.5, jacobian="forward")
    with pytest.raises(ValueError, match="tau must be > 0"):
        hessian_spectrum(den, x, 0.5, tau=0.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        hessian_spectrum(den, x.to(torch.int64), 0.5)
    spec = hessian_spectrum(den, x, 0.5)
    with pytest.raises(ValueError, match="one label per point"):
        summarize_by_class(spec, ["memorized"])
    with pytest.raises(ValueError, match="summarize each level separately"):
        summarize_by_class([spec, hessian_spectrum(den, x, 0.6)], ["a"] * 4)
    with pytest.raises(ValueError, match="labels must be strings"):
        summarize_by_class(spec, [0, 1])
    with pytest.raises(ValueError, match="non-empty sequence"):
        summarize_by_class([], [])
