"""Relative energies from any denoiser by line integrals of its score (SCIENCE.md §6).

-log p(b) + log p(a) = integral_0^1 grad(-log p)(gamma(s)) . gamma'(s) ds along a straight path
gamma(s) = a + s (b - a), with grad(-log p)(x) = (x - D(x, sigma)) / sigma^2, by Gauss-Legendre
quadrature. For the exact empirical denoiser this reproduces differences of -log p_sigma.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffmem.core._checks import check_positive_int


def gauss_legendre(n: int, *, like: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes in [0, 1] and weights (summing to 1) of the n-point Gauss-Legendre rule."""
    n = check_positive_int(n, "n_nodes")
    # Golub-Welsch: nodes are the eigenvalues of the Jacobi matrix of the Legendre recurrence,
    # weights 2 * (first eigenvector component)^2 on [-1, 1]
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4 * k**2 - 1)
    jacobi = torch.diag(off, 1) + torch.diag(off, -1)
    x, v = torch.linalg.eigh(jacobi)
    w = 2 * v[0] ** 2
    return (0.5 * (x + 1)).to(like.dtype).to(like.device), (0.5 * w).to(like.dtype).to(like.device)


def straight_line_energy(
    denoiser, sigma: float, a: Tensor, b: Tensor, *, n_nodes: int = 32, batch: int = 65_536
) -> Tensor:
    """-log p(b) + log p(a) for pairs of states a, b of shape (N, *event), by an n_nodes-point
    Gauss-Legendre rule on the straight path; returns (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    nodes, weights = gauss_legendre(n_nodes, like=a)
    n = a.shape[0]
    delta = (b - a).reshape(n, -1)
    pts = a[None] + nodes.reshape(-1, *([1] * a.ndim)) * (b - a)[None]  # (n_nodes, N, *event)
    flat = pts.reshape(-1, *a.shape[1:])
    grads = []
    for start in range(0, flat.shape[0], batch):
        x = flat[start : start + batch]
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        grads.append(((x - denoiser(x, sig)) / sigma**2).reshape(x.shape[0], -1))
    g = torch.cat(grads).reshape(n_nodes, n, -1)
    return torch.einsum("q,qnd,nd->n", weights, g, delta)
