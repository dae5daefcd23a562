"""The speciation level of Biroli, Bonnaire, de Bortoli & Mezard (2024), sigma_S = sqrt(Lambda - 1)."""

import math

import pytest
import torch

from diffmem.core.noise import sigma_to_alpha_bar
from diffmem.core.theory import covariance_top_eigenvalue, speciation_level, speciation_sigma
from diffmem.io.data import load_digits


def gaussian_with_spectrum(eigenvalues: list[float], n: int, seed: int = 0) -> torch.Tensor:
    """n Gaussian points (n, D) whose empirical covariance (1/n) is exactly Q diag(eigenvalues) Q^T for a
    random rotation Q: the sample is whitened before it is scaled, so the test is free of sampling noise."""
    g = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / n)).T  # empirical covariance I
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (z * torch.tensor(eigenvalues, dtype=torch.float64).sqrt()) @ q.T + 3.0  # a mean, removed again


def test_top_eigenvalue_of_a_known_covariance():
    spectrum = [5.0, 2.0, 1.0, 0.5, 0.1, 0.1]
    x = gaussian_with_spectrum(spectrum, n=500)
    eig = torch.linalg.eigvalsh(torch.cov(x.T, correction=0))
    assert torch.allclose(eig, torch.tensor(sorted(spectrum), dtype=torch.float64))  # the construction holds
    assert covariance_top_eigenvalue(x) == pytest.approx(5.0, rel=1e-10)
    assert covariance_top_eigenvalue(x.float()) == pytest.approx(5.0, rel=1e-5)
    # fewer points than dimensions: the N x N Gram matrix has the same top eigenvalue
    wide = x[:4].repeat(1, 3)  # (4, 18)
    assert covariance_top_eigenvalue(wide) == pytest.approx(
        float(torch.linalg.eigvalsh(torch.cov(wide.T, correction=0))[-1])
    )
    # the Lanczos path (no D x D matrix) agrees with the exact one
    assert covariance_top_eigenvalue(x, exact_up_to=2, n_iter=6) == pytest.approx(5.0, rel=1e-8)


def test_speciation_sigma_on_gaussian_data():
    x = gaussian_with_spectrum([5.0, 2.0, 1.0, 0.5], n=400)
    assert speciation_sigma(x) == pytest.approx(2.0, rel=1e-10)  # sqrt(5 - 1)
    # a plain sample: the estimate approaches the population value sqrt(Lambda - 1)
    g = torch.Generator().manual_seed(1)
    plain = torch.randn(20_000, 4, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5, 0.5])
    assert speciation_sigma(plain) == pytest.approx(math.sqrt(9.0 - 1.0), rel=0.03)


def test_speciation_level_is_the_paper_time_in_ve_units():
    # t_S = (1/2) log Lambda on the OU process x_t = x_0 e^-t + sqrt(1 - e^-2t) z, where alpha_bar = e^-2t
    for lam in (1.5, 2.79, 10.0, 1e4):
        t_s = 0.5 * math.log(lam)
        sigma = speciation_level(lam)
        assert sigma == pytest.approx(math.sqrt(math.exp(2 * t_s) - 1), rel=1e-12)
        assert float(sigma_to_alpha_bar(torch.tensor(sigma, dtype=torch.float64))) == pytest.approx(math.exp(-2 * t_s))
    assert speciation_level(1e6) == pytest.approx(1e3, rel=1e-6)  # sqrt(Lambda) for large Lambda


def test_no_speciation_when_the_top_eigenvalue_is_at_most_one():
    assert speciation_level(1.0) is None and speciation_level(0.3) is None
    assert speciation_sigma(gaussian_with_spectrum([0.9, 0.5, 0.1], n=100)) is None
    assert speciation_sigma(torch.ones(1, 5)) is None  # one point: zero covariance
    with pytest.raises(ValueError, match="top_eigenvalue must be >= 0"):
        speciation_level(-1.0)
    with pytest.raises(ValueError, match="must have shape"):
        speciation_sigma(torch.zeros(5))


def test_speciation_of_the_digits():
    x = load_digits().x  # (1797, 64) in [-1, 1]
    lam = covariance_top_eigenvalue(x)
    assert lam == pytest.approx(2.7954268, rel=1e-6)  # > 1: the digits have a speciation level
    assert speciation_sigma(x) == pytest.approx(math.sqrt(lam - 1), rel=1e-12) == pytest.approx(1.33994, rel=1e-5)
