"""Line-integral energies of a denoiser's score against the exact -log p."""

import numpy as np
import pytest
import torch

from conftest import random_patterns
from diffmem.core import EmpiricalDenoiser
from diffmem.core.energy import gauss_legendre, straight_line_energy


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
