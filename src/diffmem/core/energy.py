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

Quadrature error. At small sigma the integrand is a sequence of near-steps (the posterior over
training examples switches from one to the next along the path, over a stretch of s of order
sigma^2 / (|b - a| |xi_i - xi_j|), about 1e-3 for the digits at sigma = 0.2), so a fixed rule
errs by nats (32 nodes: several nats). Every value therefore comes with an error estimate:

  adaptive (default)  each pair's [0, 1] is bisected into panels, each integrated by the 8-point
                      rule; a panel whose two halves sum to its own value within tolerance * its
                      length, and whose parent's halves agreed within 10 tolerance * its length
                      (two successive refinements agree: one agreement alone is fooled by a step
                      that both rules miss), is accepted with its halves' sum as value and the
                      disagreement as error. The error of a pair is the sum over its panels,
                      at most `tolerance` unless max_nodes stopped it first.
  fixed (n_nodes)     the n-point rule, with |I_n - I_2n| as its error.

The estimate is conservative (the accepted value is far more accurate than the disagreement that
bounds it) but not a guarantee: a feature narrower than the node spacing at every level is missed.
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
DEFAULT_TOLERANCE = 0.01  # nats per path: the two-path discrepancy is then known to 0.02 nats
DEFAULT_MAX_NODES = 1024  # denoiser calls per pair and path; digits at sigma = 0.2 use at most about 1000
PANEL_NODES = 8  # Gauss-Legendre nodes per panel of the adaptive rule
PARENT_FACTOR = 10.0  # a panel's parent must have agreed to PARENT_FACTOR * tolerance * the panel's length
MIN_ADAPTIVE_NODES = 7 * PANEL_NODES  # [0, 1], its halves, their halves: the fewest calls that accept a panel

# A path gives gamma(s) (M, *event) and gamma'(s) (M, D) at nodes s (M,) of the pairs pair (M,)
Path = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class RelativeEnergy:
    """-log p_sigma(b) + log p_sigma(a) for N pairs of states, along two paths, with quadrature errors."""

    straight: Tensor  # (N,) along the straight line
    arc: Tensor  # (N,) along the quarter arc
    discrepancy: Tensor  # (N,) |straight - arc|: zero for a conservative score, up to discrepancy_error
    relative_discrepancy: Tensor  # (N,) discrepancy / max(|straight|, |arc|); 0 where both vanish
    straight_error: Tensor  # (N,) estimated quadrature error of straight (see the module docstring)
    arc_error: Tensor  # (N,) estimated quadrature error of arc
    discrepancy_error: Tensor  # (N,) straight_error + arc_error: the discrepancy's own quadrature uncertainty
    straight_nodes: Tensor  # (N,) int64 denoiser calls spent on each pair's straight path, estimate included
    arc_nodes: Tensor  # (N,) int64 the same for the arc
    n_nodes: int | None  # the fixed rule's nodes per path; None: adaptive
    tolerance: float | None  # the adaptive rule's target error per path in nats; None: fixed rule
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


def check_adaptive_rule(tolerance: float, max_nodes: int) -> tuple[float, int]:
    """The adaptive rule's tolerance (> 0 nats) and max_nodes (>= MIN_ADAPTIVE_NODES), checked."""
    tolerance = check_finite_float(tolerance, "tolerance")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 nats, got {tolerance}")
    max_nodes = check_positive_int(max_nodes, "max_nodes")
    if max_nodes < MIN_ADAPTIVE_NODES:
        raise ValueError(
            f"max_nodes must be >= {MIN_ADAPTIVE_NODES} (two refinements of one {PANEL_NODES}-point panel), "
            f"got {max_nodes}; or pass n_nodes for a fixed rule"
        )
    return tolerance, max_nodes


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


def _integrand(denoiser, sigma: float, path: Path, pair: Tensor, s: Tensor, batch: int) -> Tensor:
    """grad(-log p)(gamma(s)) . gamma'(s) at nodes s (M,) of pairs pair (M,), in calls of <= batch states."""
    parts = []
    for i0 in range(0, s.shape[0], batch):
        pts, tangent = path(s[i0 : i0 + batch], pair[i0 : i0 + batch])  # (m, *event), (m, D)
        sig = torch.full((pts.shape[0],), sigma, dtype=pts.dtype, device=pts.device)
        grad = ((pts - denoiser(pts, sig)) / sigma**2).reshape(pts.shape[0], -1)  # (m, D)
        parts.append((grad * tangent).sum(-1))
    return torch.cat(parts) if parts else s.new_zeros(0)


def _panels(denoiser, sigma, path, pair, lo, hi, rule, batch) -> Tensor:
    """The Gauss-Legendre rule (nodes, weights on [0, 1]) on the panels [lo, hi] (P,) of pairs pair (P,)."""
    nodes, weights = rule
    m = nodes.shape[0]
    s = lo[:, None] + (hi - lo)[:, None] * nodes  # (P, m)
    f = _integrand(denoiser, sigma, path, pair.repeat_interleave(m), s.reshape(-1), batch).reshape(-1, m)
    return (f * weights).sum(1) * (hi - lo)


def _fixed(denoiser, sigma, path, like, n_nodes, batch) -> Tensor:
    """The n_nodes-point rule on [0, 1] for every pair, shape (N,)."""
    n = like.shape[0]
    pair = torch.arange(n, device=like.device)
    return _panels(
        denoiser, sigma, path, pair, like.new_zeros(n), like.new_ones(n), gauss_legendre(n_nodes, like=like), batch
    )


def _adaptive(denoiser, sigma, path, like, tolerance, max_nodes, batch) -> tuple[Tensor, Tensor, Tensor]:
    """(value, error, calls) per pair, each (N,), by bisection into 8-point panels (module docstring).

    Active panels of all pairs are refined together. A pair whose next round would pass max_nodes
    stops: its open panels keep their values, and each its share of its parent's disagreement as error.
    """
    n = like.shape[0]
    rule = gauss_legendre(PANEL_NODES, like=like)
    pair = torch.arange(n, device=like.device)  # (P,) the pair of each open panel
    lo, hi = like.new_zeros(n), like.new_ones(n)  # (P,)
    coarse = _panels(denoiser, sigma, path, pair, lo, hi, rule, batch)  # (P,) the panel's own value
    share = torch.full_like(coarse, math.inf)  # (P,) half its parent's disagreement
    value, error = like.new_zeros(n), like.new_zeros(n)
    calls = torch.full((n,), PANEL_NODES, dtype=torch.int64, device=like.device)
    while pair.numel():
        cost = 2 * PANEL_NODES * torch.bincount(pair, minlength=n)  # (N,) calls of the next round
        stop = (calls + cost > max_nodes)[pair]
        value.index_add_(0, pair[stop], coarse[stop])
        error.index_add_(0, pair[stop], share[stop])
        pair, lo, hi, coarse, share = (t[~stop] for t in (pair, lo, hi, coarse, share))
        if not pair.numel():
            break
        calls += torch.where(calls + cost > max_nodes, 0, cost)
        mid = 0.5 * (lo + hi)
        halves = _panels(denoiser, sigma, path, pair.repeat(2), torch.cat([lo, mid]), torch.cat([mid, hi]), rule, batch)
        left, right = halves.chunk(2)
        fine = left + right
        err = (fine - coarse).abs()
        length = hi - lo
        done = (err <= tolerance * length) & (share <= PARENT_FACTOR * tolerance * length)
        value.index_add_(0, pair[done], fine[done])
        error.index_add_(0, pair[done], err[done])
        go = ~done
        pair, lo, hi = pair[go].repeat(2), torch.cat([lo[go], mid[go]]), torch.cat([mid[go], hi[go]])
        coarse, share = torch.cat([left[go], right[go]]), (0.5 * err[go]).repeat(2)
    return value, error, calls


def _line_integral(denoiser, sigma, path, like, *, n_nodes, tolerance, max_nodes, batch):
    """(value, error, calls) per pair: the adaptive rule, or with n_nodes the fixed one against 2 n_nodes."""
    batch = check_positive_int(batch, "batch")
    if n_nodes is None:
        return _adaptive(denoiser, sigma, path, like, tolerance, max_nodes, batch)
    value = _fixed(denoiser, sigma, path, like, n_nodes, batch)
    error = (value - _fixed(denoiser, sigma, path, like, 2 * n_nodes, batch)).abs()
    return value, error, torch.full_like(value, 3 * n_nodes, dtype=torch.int64)


def _straight_path(a: Tensor, b: Tensor) -> Path:
    n = a.shape[0]
    delta = b - a  # (N, *event)
    delta_flat = delta.reshape(n, -1)  # (N, D)

    def path(s: Tensor, pair: Tensor) -> tuple[Tensor, Tensor]:
        pts = a[pair] + s.reshape(-1, *([1] * (a.ndim - 1))) * delta[pair]  # (M, *event)
        return pts, delta_flat[pair]

    return path


def straight_line_energy(
    denoiser, sigma: float, a: Tensor, b: Tensor, *, n_nodes: int = 32, batch: int = DEFAULT_BATCH
) -> Tensor:
    """-log p(b) + log p(a) for pairs of states a, b of shape (N, *event), by an n_nodes-point
    Gauss-Legendre rule on the straight path; returns (N,). Without an error estimate: for one, and
    for an adaptive rule, use relative_energy."""
    sigma = _check_pairs(a, b, sigma)
    n_nodes = check_positive_int(n_nodes, "n_nodes")
    return _fixed(denoiser, sigma, _straight_path(a, b), a, n_nodes, check_positive_int(batch, "batch"))


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


def _arc_path(a: Tensor, b: Tensor, direction: Tensor | None) -> Path:
    n = a.shape[0]
    af, bf = a.reshape(n, -1), b.reshape(n, -1)
    centre = 0.5 * (af + bf) + quarter_arc_normal(a, b, direction)  # (N, D)
    u, v = af - centre, bf - centre  # orthogonal, equal length

    def path(s: Tensor, pair: Tensor) -> tuple[Tensor, Tensor]:
        theta = (0.5 * math.pi * s)[:, None]  # (M, 1)
        uu, vv = u[pair], v[pair]  # (M, D)
        pts = centre[pair] + uu * torch.cos(theta) + vv * torch.sin(theta)  # (M, D)
        tangent = 0.5 * math.pi * (vv * torch.cos(theta) - uu * torch.sin(theta))  # (M, D) d gamma / ds
        return pts.reshape(s.shape[0], *a.shape[1:]), tangent

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
    """-log p(b) + log p(a) along the quarter arc from a to b (see quarter_arc_normal) by an n_nodes-point
    rule, shape (N,). Without an error estimate: for one, use relative_energy."""
    sigma = _check_pairs(a, b, sigma)
    n_nodes = check_positive_int(n_nodes, "n_nodes")
    return _fixed(denoiser, sigma, _arc_path(a, b, direction), a, n_nodes, check_positive_int(batch, "batch"))


def relative_energy(
    denoiser,
    sigma: float,
    a: Tensor,
    b: Tensor,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    max_nodes: int = DEFAULT_MAX_NODES,
    n_nodes: int | None = None,
    direction: Tensor | None = None,
    batch: int = DEFAULT_BATCH,
) -> RelativeEnergy:
    """-log p_sigma(b) + log p_sigma(a) for N pairs along the straight line and the quarter arc, each
    with its estimated quadrature error.

    denoiser: D(x, sigma) with x (B, *event) and sigma (B,). a, b: (N, *event). The energy is
    -log p_sigma (Tweedie's score integrated), not a drift potential. By default each pair and path
    is integrated adaptively (module docstring) to an estimated error of `tolerance` nats, spending
    at most max_nodes denoiser calls (>= 56); a pair that runs out reports the larger error it
    reached, a rough estimate only (its integrand is not resolved). n_nodes: a fixed n-point rule
    instead (tolerance and max_nodes then unused), its error |I_n - I_2n| costing 2n more calls,
    reliable only once the rule resolves the integrand. direction: orientation of the arc (see
    quarter_arc_normal). batch: most states per denoiser call. Autograd stays on, so that a denoiser may differentiate
    internally; wrap the call in torch.no_grad() for a network.
    """
    sigma = _check_pairs(a, b, sigma)
    if n_nodes is None:
        tolerance, max_nodes = check_adaptive_rule(tolerance, max_nodes)
    else:
        n_nodes = check_positive_int(n_nodes, "n_nodes")
    arc_path = _arc_path(a, b, direction)  # validates the arc before any denoiser call
    rule = {"n_nodes": n_nodes, "tolerance": tolerance, "max_nodes": max_nodes, "batch": batch}
    straight, straight_error, straight_nodes = _line_integral(denoiser, sigma, _straight_path(a, b), a, **rule)
    arc, arc_error, arc_nodes = _line_integral(denoiser, sigma, arc_path, a, **rule)
    discrepancy = (straight - arc).abs()
    scale = torch.maximum(straight.abs(), arc.abs())
    relative = torch.where(scale > 0, discrepancy / torch.where(scale > 0, scale, 1), 0)
    return RelativeEnergy(
        straight=straight,
        arc=arc,
        discrepancy=discrepancy,
        relative_discrepancy=relative,
        straight_error=straight_error,
        arc_error=arc_error,
        discrepancy_error=straight_error + arc_error,
        straight_nodes=straight_nodes,
        arc_nodes=arc_nodes,
        n_nodes=n_nodes,
        tolerance=None if n_nodes is not None else tolerance,
        sigma=sigma,
    )
