"""Extreme eigenvalues of symmetric operators given only matrix-vector products (batched Lanczos)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffmem.core._checks import check_positive_int
from diffmem.core.random import randn


def lanczos_eigenvalues(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    n_iter: int,
) -> Tensor:
    """Ritz values of a batch of symmetric operators after n_iter Lanczos steps.

    matvec: (B, D) -> (B, D), one symmetric operator per row. start: (B, D) non-zero start vectors.
    Uses full reorthogonalisation (Q is kept, O(B n_iter D) memory), so the extreme Ritz values
    converge to the extreme eigenvalues in a few dozen steps and match them exactly at n_iter = D.
    Returns (B, m) Ritz values in ascending order, m <= n_iter (fewer if the Krylov space closes).
    """
    n_iter = check_positive_int(n_iter, "n_iter")
    b, d = start.shape
    m = min(n_iter, d)
    q = start / start.norm(dim=1, keepdim=True)
    Q = start.new_zeros(b, m, d)
    alphas = start.new_zeros(b, m)
    betas = start.new_zeros(b, m)
    steps = m
    for j in range(m):
        Q[:, j] = q
        w = matvec(q)
        alphas[:, j] = (w * q).sum(1)
        # full reorthogonalisation against every previous Lanczos vector (twice is enough)
        for _ in range(2):
            w = w - torch.einsum("bj,bjd->bd", torch.einsum("bjd,bd->bj", Q[:, : j + 1], w), Q[:, : j + 1])
        beta = w.norm(dim=1)
        if j + 1 == m:
            break
        scale = alphas[:, : j + 1].abs().amax(dim=1).clamp_min(1e-30)
        if bool((beta <= 1e-10 * scale).all()):
            steps = j + 1  # invariant subspace found for every row
            break
        betas[:, j] = beta
        q = w / beta.clamp_min(1e-300)[:, None]
    T = torch.diag_embed(alphas[:, :steps])
    off = betas[:, : steps - 1]
    T = T + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    return torch.linalg.eigvalsh(T)


def extreme_eigenvalues(
    matvec: Callable[[Tensor], Tensor],
    like: Tensor,
    *,
    n_iter: int = 60,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """(smallest, largest) eigenvalue, each (B,), of a batch of symmetric operators, by Lanczos
    from random start vectors drawn with `generator`. like: (B, D) fixes batch, dtype and device."""
    start = randn(like.shape, generator, like)
    ritz = lanczos_eigenvalues(matvec, start, n_iter)
    return ritz[:, 0], ritz[:, -1]
