"""Relative energies from any denoiser by line integrals of its score (SCIENCE.md §6).

    -log p(b) + log p(a) = integral_0^1 grad(-log p)(gamma(s)) . gamma'(s) ds,
    grad(-log p)(x)      = (x - D(x, sigma)) / sigma^2          (Tweedie's formula)

evaluated by Gauss-Legendre quadrature along two paths from a to b:

  straight  gamma(s) = a + s (b - a)
  arc       gamma(s) = o + (a - o) cos(pi s / 2) + (b - o) sin(pi s / 2), a quarter circle with
            centre o = (a + b) / 2 + n, n perpendicular to b - a and |n| = |b - a| / 2, so that
            a - o and b - o are orthogonal and of equal length |b - a| / sqrt(2)

The energy is -log p_sigma itself, not a drift potential. For the exact empirical denoiser the
score is a gradient and both paths reproduce differences of -log p_sigma; a learned score is not
exactly a gradient field, and the disagreement of the two paths measures by how much.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem.core._checks import check_finite_float, check_positive_int

PATHS = ("straight", "arc")
DEFAULT_BATCH = 65_536  # states per denoiser call


@dataclass(frozen=True)
class RelativeEnergy:
    """-log p_sigma(b) + log p_sigma(a) for N pairs of states, along two paths."""

    straight: Tensor  # (N,) along the straight line
    arc: Tensor  # (N,) along the quarter arc
    discrepancy: Tensor  # (N,) |straight - arc|: zero for a conservative score, up to quadrature error
    relative_discrepancy: Tensor  # (N,) discrepancy / max(|straight|, |arc|); 0 where both vanish
    n_nodes: int  # Gauss-Legendre nodes per path
    sigma: float


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


def _check_pairs(a: Tensor, b: Tensor, sigma: float) -> float:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ValueError("a and b must be torch.Tensors of shape (N, *event_shape)")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"a and b must have shape (N, *event_shape), got {tuple(a.shape)}; add a batch dimension")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("a and b must be finite; they contain NaN or Inf")
    sigma = check_finite_float(sigma, "sigma")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return sigma


def _path_integral(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    sigma: float,
    path: Callable[[Tensor, slice], tuple[Tensor, Tensor]],
    like: Tensor,
    n_nodes: int,
    batch: int,
) -> Tensor:
    """sum_q w_q grad(-log p)(gamma(s_q)) . gamma'(s_q) for N pairs, in denoiser calls of <= batch states.

    path(s, pairs) gives gamma(s) of shape (Q, n, *event) and gamma'(s) broadcastable to (Q, n, D)
    for nodes s (Q,) and the pairs in the slice `pairs`. like: the (N, *event) start states.
    """
    batch = check_positive_int(batch, "batch")
    nodes, weights = gauss_legendre(n_nodes, like=like)
    n, event = like.shape[0], like.shape[1:]
    total = like.new_zeros(n)
    pair_chunk = min(max(n, 1), batch)
    node_chunk = max(1, batch // pair_chunk)
    for p0 in range(0, n, pair_chunk):
        pairs = slice(p0, min(p0 + pair_chunk, n))
        for q0 in range(0, n_nodes, node_chunk):
            s = nodes[q0 : q0 + node_chunk]
            pts, tangent = path(s, pairs)  # (Q, n, *event), (Q or 1, n, D)
            x = pts.reshape(-1, *event)
            sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
            grad = ((x - denoiser(x, sig)) / sigma**2).reshape(s.shape[0], pts.shape[1], -1)  # (Q, n, D)
            total[pairs] += torch.einsum("q,qn->n", weights[q0 : q0 + node_chunk], (grad * tangent).sum(-1))
    return total


def _straight_path(a: Tensor, b: Tensor) -> Callable[[Tensor, slice], tuple[Tensor, Tensor]]:
    n = a.shape[0]
    delta = b - a  # (N, *event)
    delta_flat = delta.reshape(n, -1)  # (N, D)

    def path(s: Tensor, pairs: slice) -> tuple[Tensor, Tensor]:
        pts = a[pairs][None] + s.reshape(-1, *([1] * a.ndim)) * delta[pairs][None]  # (Q, n, *event)
        return pts, delta_flat[pairs][None]

    return path


def straight_line_energy(
    denoiser, sigma: float, a: Tensor, b: Tensor, *, n_nodes: int = 32, batch: int = DEFAULT_BATCH
) -> Tensor:
    """-log p(b) + log p(a) for pairs of states a, b of shape (N, *event), by an n_nodes-point
    Gauss-Legendre rule on the straight path; returns (N,)."""
    sigma = _check_pairs(a, b, sigma)
    return _path_integral(denoiser, sigma, _straight_path(a, b), a, n_nodes, batch)


def quarter_arc_normal(a: Tensor, b: Tensor, direction: Tensor | None = None) -> Tensor:
    """The offset n of the quarter arc's centre o = (a + b) / 2 + n from the midpoint, shape (N, D).

    n is perpendicular to b - a with |n| = |b - a| / 2. Its direction is `direction` (shape
    (*event) shared by all pairs, or (N, *event)) with its component along b - a projected out; by
    default it is the coordinate axis e_j least aligned with b - a (smallest |b_j - a_j|, the first
    such j on ties) with that component projected out, which keeps at least half its length
    (|b_j - a_j|^2 <= |b - a|^2 / D). The rule needs D >= 2: in one dimension no direction is
    perpendicular. Where a = b the offset is zero and the arc is a single point.
    """
    n = a.shape[0]
    delta = (b - a).reshape(n, -1)  # (N, D)
    dim = delta.shape[1]
    if dim < 2:
        raise ValueError("the quarter arc needs states of dimension D >= 2 (no perpendicular direction in 1D)")
    sq = (delta * delta).sum(1, keepdim=True)  # (N, 1) |b - a|^2
    safe_sq = torch.where(sq > 0, sq, torch.ones_like(sq))
    if direction is None:
        j = delta.abs().argmin(dim=1)  # (N,)
        raw = torch.nn.functional.one_hot(j, dim).to(delta.dtype)  # (N, D)
    else:
        if not isinstance(direction, Tensor):
            raise ValueError(f"direction must be a torch.Tensor, got {type(direction).__name__}")
        event = tuple(a.shape[1:])
        if tuple(direction.shape) == event:
            raw = direction.reshape(1, dim).expand(n, dim)
        elif tuple(direction.shape) == tuple(a.shape):
            raw = direction.reshape(n, dim)
        else:
            raise ValueError(
                f"direction must have shape {event} (shared) or {tuple(a.shape)} (one per pair), "
                f"got {tuple(direction.shape)}"
            )
        raw = raw.to(delta.dtype)
        if not bool(torch.isfinite(raw).all()):
            raise ValueError("direction contains NaN or Inf")
    perp = raw - ((raw * delta).sum(1, keepdim=True) / safe_sq) * delta  # (N, D)
    perp_norm = perp.norm(dim=1, keepdim=True)
    moving = sq[:, 0] > 0
    parallel = moving & (perp_norm[:, 0] <= 1e-8 * raw.norm(dim=1))
    if bool(parallel.any()):
        i = int(parallel.nonzero()[0, 0])
        raise ValueError(f"direction is parallel to b - a (or zero) for pair {i}; pass one with a perpendicular part")
    scale = torch.where(moving[:, None], 0.5 * sq.sqrt() / perp_norm.clamp_min(torch.finfo(delta.dtype).tiny), 0)
    return perp * scale


def _arc_path(a: Tensor, b: Tensor, direction: Tensor | None) -> Callable[[Tensor, slice], tuple[Tensor, Tensor]]:
    n = a.shape[0]
    af, bf = a.reshape(n, -1), b.reshape(n, -1)
    centre = 0.5 * (af + bf) + quarter_arc_normal(a, b, direction)  # (N, D)
    u, v = af - centre, bf - centre  # orthogonal, equal length

    def path(s: Tensor, pairs: slice) -> tuple[Tensor, Tensor]:
        theta = (0.5 * math.pi * s)[:, None, None]  # (Q, 1, 1)
        uu, vv = u[pairs][None], v[pairs][None]
        pts = centre[pairs][None] + uu * torch.cos(theta) + vv * torch.sin(theta)  # (Q, n, D)
        tangent = 0.5 * math.pi * (vv * torch.cos(theta) - uu * torch.sin(theta))  # (Q, n, D) d gamma / ds
        return pts.reshape(s.shape[0], pts.shape[1], *a.shape[1:]), tangent

    return path


def arc_energy(
    denoiser,
    sigma: float,
    a: Tensor,
    b: Tensor,
    *,
    n_nodes: int = 32,
    direction: Tensor | None = None,
    batch: int = DEFAULT_BATCH,
) -> Tensor:
    """-log p(b) + log p(a) along the quarter arc from a to b (see quarter_arc_normal), shape (N,)."""
    sigma = _check_pairs(a, b, sigma)
    return _path_integral(denoiser, sigma, _arc_path(a, b, direction), a, n_nodes, batch)


def relative_energy(
    denoiser,
    sigma: float,
    a: Tensor,
    b: Tensor,
    *,
    n_nodes: int = 32,
    direction: Tensor | None = None,
    batch: int = DEFAULT_BATCH,
) -> RelativeEnergy:
    """-log p_sigma(b) + log p_sigma(a) for N pairs along the straight line and the quarter arc.

    denoiser: D(x, sigma) with x (B, *event) and sigma (B,). a, b: (N, *event). The energy is
    -log p_sigma (Tweedie's score integrated), not a drift potential. n_nodes: Gauss-Legendre nodes
    per path; sharp landscapes (sigma small against the pattern spacing) need more, e.g. 128 at
    sigma = 0.3 for unit-scale patterns. direction: orientation of the arc (see
    quarter_arc_normal). batch: most states per denoiser call. Autograd stays on, so that a
    denoiser may differentiate internally; wrap the call in torch.no_grad() for a network.
    """
    sigma = _check_pairs(a, b, sigma)
    arc_path = _arc_path(a, b, direction)  # validates the arc before any denoiser call
    straight = _path_integral(denoiser, sigma, _straight_path(a, b), a, n_nodes, batch)
    arc = _path_integral(denoiser, sigma, arc_path, a, n_nodes, batch)
    discrepancy = (straight - arc).abs()
    scale = torch.maximum(straight.abs(), arc.abs())
    relative = torch.where(scale > 0, discrepancy / torch.where(scale > 0, scale, 1), 0)
    return RelativeEnergy(
        straight=straight,
        arc=arc,
        discrepancy=discrepancy,
        relative_discrepancy=relative,
        n_nodes=n_nodes,
        sigma=sigma,
    )
