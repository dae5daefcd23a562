"""Fixed-point census of a denoiser at one noise level (SCIENCE.md §3, §6).

Iterate x <- D(x, sigma) from many starts, Newton-refine and deduplicate the end points, and label
each fixed point:

  memory    a minimum of -log p reached by the retrieval started at exactly one pattern
  spurious  any other minimum: reached from several patterns (merged memories) or from none
            (emergent); a weighted mixture of nearby patterns
  saddle    a fixed point whose Hessian has both signs; its `index` counts the negative directions
  maximum   a fixed point whose Hessian is negative definite (index = D), e.g. the centre of a ring

The Hessian of -log p_sigma is H = (I - J_D) / sigma^2. For the exact memory J_D = beta C(x), so H is
in closed form; for any other denoiser J_D comes from autograd (full Jacobian up to 1,024
dimensions, Lanczos on Jacobian-vector products above, where the index is a lower bound).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from diffmem.core._checks import check_finite_float, check_patterns, check_positive_int
from diffmem.core.dynamics import FixedPointResult, iterate_map
from diffmem.core.lanczos import lanczos_eigenvalues
from diffmem.core.memory import DenseAM
from diffmem.core.random import randn

KINDS = ("memory", "spurious", "saddle", "maximum")
NEWTON_MAX_DIM = 1024  # largest D for Newton steps: each needs the full Jacobian (D backward passes)
# A root lies within NEWTON_FACTOR Newton steps of a point from which Newton's steps shrink at
# least by 3/4 each: quadratically at a simple root, by 1/2 at a fold, by 2/3 at a pitchfork.
NEWTON_FACTOR = 4.0
_BLOCK = 2**24  # entries of the (B, D, D) Jacobians held at once (128 MiB in float64)
START_STRATEGIES = ("noise", "perturbed", "midpoints", "mixtures")


# ---------------------------------------------------------------------------------------------
# Landscapes: a denoiser at one noise level, with its Jacobian, curvature and (optionally) energy
# ---------------------------------------------------------------------------------------------


class Landscape(Protocol):
    sigma: float
    dim: int
    max_jacobian_dim: int  # largest D at which `jacobian` is affordable (Newton steps need it)

    def map(self, x: Tensor) -> Tensor:
        """D(x, sigma) for a flat batch (B, D)."""

    def jacobian(self, x: Tensor) -> Tensor:
        """J_D(x), shape (B, D, D); may raise for large D."""

    def hessian_extremes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Smallest and largest eigenvalue of the Hessian of -log p_sigma at x, each (B,)."""

    def hessian_eigenvalues(self, x: Tensor) -> Tensor:
        """Eigenvalues of the Hessian of -log p_sigma at x, ascending, (B, D); (B, m) Ritz values
        (m < D) where the spectrum comes from Lanczos."""

    def neg_log_prob(self, x: Tensor) -> Tensor | None:
        """-log p_sigma(x) (B,), or None where the landscape has no closed-form energy."""


class MemoryLandscape:
    """The exact dense memory at beta = 1 / sigma^2, i.e. the exact empirical denoiser."""

    def __init__(self, memory: DenseAM, sigma: float):
        self.memory = memory
        self.sigma = check_finite_float(sigma, "sigma")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0 for a census, got {sigma}")
        self.beta = self.sigma**-2
        self.dim = memory.dim
        self.max_jacobian_dim = NEWTON_MAX_DIM  # the closed-form Jacobian is (B, D, D)

    def map(self, x: Tensor) -> Tensor:
        return self.memory.retrieve(x, self.beta)

    def jacobian(self, x: Tensor, *, weight_floor: float = 1e-14) -> Tensor:
        return self.beta * self.memory.covariance(x, self.beta, weight_floor=weight_floor)  # dm/dx = beta C(x)

    def hessian_extremes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lam_min, lam_max = self.memory.covariance_eigenvalue_range(x, self.beta)
        s2 = self.sigma**2
        return (1 - self.beta * lam_max) / s2, (1 - self.beta * lam_min) / s2

    def hessian_eigenvalues(self, x: Tensor, *, weight_floor: float = 1e-12) -> Tensor:
        """(1 - beta * eig C(x)) / sigma^2 ascending, (B, D). Above D = 256 the eigenproblem is the
        K' x K' weighted Gram matrix of the patterns with weight above weight_floor times the largest
        (C has rank < K'; its other D - K' eigenvalues are 0)."""
        d, s2 = self.dim, self.sigma**2
        if d <= 256:
            rows = max(1, _BLOCK // (d * d))
            cov = [self.memory.covariance(x[i : i + rows], self.beta) for i in range(0, x.shape[0], rows)]
            eig_c = torch.linalg.eigvalsh(torch.cat(cov)).clamp_min(0)
        else:
            xi = self.memory.patterns
            eig_c = x.new_zeros(x.shape[0], d)
            for i, w in enumerate(self.memory.weights(x, self.beta)):
                keep = w > weight_floor * w.max()
                wk = w[keep] / w[keep].sum()
                scaled = (xi[keep] - wk @ xi[keep]) * wk.sqrt()[:, None]  # (K', D)
                small = scaled.shape[0] < d
                eig = torch.linalg.eigvalsh(scaled @ scaled.T if small else scaled.T @ scaled).clamp_min(0)
                eig_c[i, d - eig.shape[0] :] = eig
        return (1 - self.beta * eig_c.flip(1)) / s2

    def neg_log_prob(self, x: Tensor) -> Tensor:
        k, d = self.memory.num_patterns, self.dim
        const = 0.5 * d * math.log(2 * math.pi * self.sigma**2) + math.log(k)
        return self.beta * self.memory.energy(x, self.beta) + const


class DenoiserLandscape:
    """Any denoiser D(x, sigma) at a fixed sigma, on flat states of dimension `dim`.

    The Jacobian is built from `dim` backward passes over the whole batch, which is exact when the
    denoiser treats samples independently (no batch statistics). Above `exact_max_dim` the curvature
    comes from Lanczos on the symmetrised Jacobian, with start vectors from `generator`.
    """

    def __init__(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        sigma: float,
        dim: int,
        *,
        event_shape: tuple[int, ...] | None = None,
        neg_log_prob: Callable[[Tensor], Tensor] | None = None,
        exact_max_dim: int = 1024,  # largest D for a full Jacobian (D backward passes)
        lanczos_iter: int = 60,
        generator: torch.Generator | None = None,
    ):
        self.denoiser = denoiser
        self.sigma = check_finite_float(sigma, "sigma")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0 for a census, got {sigma}")
        self.dim = check_positive_int(dim, "dim")
        self.event_shape = event_shape or (dim,)
        self._nlp = neg_log_prob
        self.exact_max_dim = exact_max_dim
        self.max_jacobian_dim = min(exact_max_dim, NEWTON_MAX_DIM)
        self.lanczos_iter = lanczos_iter
        self.generator = generator

    def map(self, x: Tensor) -> Tensor:
        sig = torch.full((x.shape[0],), self.sigma, dtype=x.dtype, device=x.device)
        return self.denoiser(x.reshape(-1, *self.event_shape), sig).reshape(x.shape)

    def jacobian(self, x: Tensor) -> Tensor:
        if self.dim > self.exact_max_dim:
            raise ValueError(f"a full Jacobian needs D <= {self.exact_max_dim}, got D = {self.dim}")
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = self.map(xg)
            rows = [torch.autograd.grad(out[:, i].sum(), xg, retain_graph=True)[0] for i in range(self.dim)]
        return torch.stack(rows, dim=1)  # (B, D_out, D_in)

    def _sym_jvp(self, x: Tensor, v: Tensor) -> Tensor:
        """((J + J^T) / 2) v for every row, by one forward-mode and one reverse-mode product."""
        _, jv = torch.func.jvp(self.map, (x,), (v,))
        _, vjp_fn = torch.func.vjp(self.map, x)
        (jtv,) = vjp_fn(v)
        return 0.5 * (jv + jtv)

    def hessian_extremes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        eig = self.hessian_eigenvalues(x)
        return eig[:, 0], eig[:, -1]

    def hessian_eigenvalues(self, x: Tensor) -> Tensor:
        """Eigenvalues of (I - (J + J^T) / 2) / sigma^2: all of them (B, D) up to exact_max_dim, else
        the (B, m) Ritz values of lanczos_iter Lanczos steps, whose negative ones are at most as many
        as the Hessian's (Cauchy interlacing)."""
        s2 = self.sigma**2
        if self.dim <= self.exact_max_dim:
            J = self.jacobian(x)
            H = (torch.eye(self.dim, dtype=x.dtype, device=x.device) - 0.5 * (J + J.transpose(1, 2))) / s2
            return torch.linalg.eigvalsh(H.detach())
        if self.generator is None:
            raise ValueError("Lanczos curvature above exact_max_dim draws start vectors: pass a generator")
        x = x.detach()
        with torch.enable_grad():
            ritz = lanczos_eigenvalues(
                lambda v: (v - self._sym_jvp(x, v)) / s2, randn(x.shape, self.generator, x), self.lanczos_iter
            )
        return ritz.detach()

    def neg_log_prob(self, x: Tensor) -> Tensor | None:
        return None if self._nlp is None else self._nlp(x)


# ---------------------------------------------------------------------------------------------
# Starts
# ---------------------------------------------------------------------------------------------


def nearest_neighbour_pairs(patterns: Tensor) -> Tensor:
    """Unique pairs (i, j), i < j, where j is i's nearest other pattern or vice versa. Shape (P, 2)."""
    k = patterns.shape[0]
    if k < 2:
        return torch.zeros(0, 2, dtype=torch.int64, device=patterns.device)
    d2 = torch.cdist(patterns, patterns)
    d2.fill_diagonal_(math.inf)
    j = d2.argmin(dim=1)
    i = torch.arange(k, device=patterns.device)
    pairs = torch.stack([torch.minimum(i, j), torch.maximum(i, j)], dim=1)
    return torch.unique(pairs, dim=0)


def split_starts(n: int) -> dict[str, int]:
    """How `--starts N` is shared: half Gaussian noise around the data, a quarter perturbed
    patterns, an eighth nearest-neighbour midpoints, the rest three-pattern mixtures."""
    if n < 1:
        raise ValueError(f"--starts must be >= 1, got {n}")
    noise, perturbed, midpoints = n // 2, n // 4, n // 8
    return {
        "noise": noise,
        "perturbed": perturbed,
        "midpoints": midpoints,
        "mixtures": n - noise - perturbed - midpoints,
    }


def make_starts(
    patterns: Tensor,
    sigma: float,
    counts: dict[str, int],
    *,
    generator: torch.Generator,
    mixture_size: int = 3,
) -> tuple[Tensor, list[str]]:
    """Starting points for a census, and the strategy each came from.

    noise      data mean + sqrt(per-coordinate data variance + sigma^2) * z (the noised data's scale)
    perturbed  a random pattern + sigma / 2 * z
    midpoints  exact midpoints of nearest-neighbour pairs (all pairs if fewer than asked); these sit
               on the symmetric saddles between two memories
    mixtures   random convex mixtures of `mixture_size` patterns with Dirichlet(1) weights
    """
    check_patterns(patterns)
    unknown = sorted(set(counts) - set(START_STRATEGIES))
    if unknown:
        raise ValueError(f"unknown start strategies {unknown}; choose from {START_STRATEGIES}")
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"the count of {name!r} starts must be an integer >= 0, got {n!r}")
    if sum(counts.values()) == 0:
        raise ValueError("a census needs at least one start; every start count is zero")
    k, d = patterns.shape
    dev = patterns.device
    parts, labels = [], []
    n = counts.get("noise", 0)
    if n:
        std = (patterns.var(dim=0, unbiased=False) + sigma**2).sqrt()
        parts.append(patterns.mean(0) + std * randn((n, d), generator, patterns))
    n = counts.get("perturbed", 0)
    if n:
        idx = torch.randint(k, (n,), generator=generator, device=generator.device).to(dev)
        parts.append(patterns[idx] + 0.5 * sigma * randn((n, d), generator, patterns))
    n = counts.get("midpoints", 0)
    if n:
        pairs = nearest_neighbour_pairs(patterns)
        if pairs.shape[0] > n:
            pick = torch.randperm(pairs.shape[0], generator=generator, device=generator.device)[:n].to(dev)
            pairs = pairs[pick]
        n = pairs.shape[0]
        parts.append(0.5 * (patterns[pairs[:, 0]] + patterns[pairs[:, 1]]))
    n_mid = n if counts.get("midpoints", 0) else 0
    n = counts.get("mixtures", 0)
    if n:
        m = min(mixture_size, k)
        idx = torch.stack([torch.randperm(k, generator=generator, device=generator.device)[:m] for _ in range(n)]).to(
            dev
        )
        w = -torch.log(torch.rand((n, m), generator=generator, dtype=patterns.dtype, device=generator.device))
        w = (w / w.sum(1, keepdim=True)).to(dev)  # Dirichlet(1, ..., 1)
        parts.append(torch.einsum("nm,nmd->nd", w, patterns[idx]))
    for name in START_STRATEGIES:
        c = n_mid if name == "midpoints" else counts.get(name, 0)
        labels += [name] * c
    return torch.cat(parts), labels


# ---------------------------------------------------------------------------------------------
# The census
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attractor:
    x: Tensor  # (D,) position
    kind: str  # 'memory' | 'spurious' | 'saddle' | 'maximum'
    nearest_pattern: int
    distance: float  # L2 distance to the nearest pattern
    share: float  # fraction of all starts whose dynamics ended here
    n_captured: int  # number of starts whose dynamics ended here
    energy: float | None  # -log p_sigma(x), where the landscape has one
    hessian_min: float  # extreme eigenvalues of the Hessian of -log p_sigma, (I - J_D) / sigma^2
    hessian_max: float
    index: int  # negative Hessian eigenvalues: 0 at a minimum, D at a maximum (a lower bound under Lanczos)
    reached_from: tuple[int, ...]  # patterns whose retrieval ends here
    mixes: tuple[tuple[int, float], ...]  # largest posterior weights w_mu(x): the patterns it mixes
    found_by: str  # 'dynamics' or 'newton' (saddle search)

    def to_dict(self) -> dict:
        return {
            "x": self.x.tolist(),
            "kind": self.kind,
            "nearest_pattern": self.nearest_pattern,
            "distance": self.distance,
            "share": self.share,
            "n_captured": self.n_captured,
            "energy": self.energy,
            "hessian_min": self.hessian_min,
            "hessian_max": self.hessian_max,
            "index": self.index,
            "reached_from": list(self.reached_from),
            "mixes": [[i, w] for i, w in self.mixes],
            "found_by": self.found_by,
        }


@dataclass(frozen=True)
class Census:
    sigma: float
    k: int
    n_starts: int
    n_converged: int
    start_counts: dict[str, int]  # starts per strategy
    unconverged: dict[str, int]  # starts per strategy that did not converge (never dropped silently)
    patterns_unconverged: int  # pattern retrievals that did not converge
    dedup_tol: float  # largest L2 distance at which two end points can be one fixed point (see census)
    attractors: tuple[Attractor, ...]
    settings: dict = field(default_factory=dict)

    @property
    def beta(self) -> float:
        return self.sigma**-2

    @property
    def counts(self) -> dict[str, int]:
        return {kind: sum(a.kind == kind for a in self.attractors) for kind in KINDS}

    @property
    def shares(self) -> dict[str, float]:
        return {kind: sum(a.share for a in self.attractors if a.kind == kind) for kind in KINDS}

    def of_kind(self, kind: str) -> list[Attractor]:
        return [a for a in self.attractors if a.kind == kind]

    def to_dict(self) -> dict:
        return {
            "sigma": self.sigma,
            "beta": self.beta,
            "K": self.k,
            "n_starts": self.n_starts,
            "n_converged": self.n_converged,
            "start_counts": self.start_counts,
            "unconverged": self.unconverged,
            "patterns_unconverged": self.patterns_unconverged,
            "dedup_tol": self.dedup_tol,
            "counts": self.counts,
            "shares": self.shares,
            "settings": self.settings,
            "attractors": [a.to_dict() for a in self.attractors],
        }


def default_dedup_tol(patterns: Tensor, sigma: float) -> float:
    """0.05 * min(sigma, spread), spread being the RMS distance of the patterns from their mean: wells
    are about sigma wide, and no finer than the data. The census never merges two end points farther
    apart than this; without Newton refinement it merges every pair closer than this."""
    spread = float((patterns - patterns.mean(0)).pow(2).sum(1).mean().sqrt())
    scale = min(sigma, spread) if spread > 0 else sigma
    return 0.05 * scale


def _cluster(points: Tensor, tol: float, radius: Tensor | None = None, *, block: int = 1024) -> tuple[Tensor, Tensor]:
    """Leader clustering: labels (M,) and the index of each cluster's leader (C,). In index order, a
    point joins the first leader within min(tol, radius[point] + radius[leader]) in L2 (within tol
    when radius is None) or else becomes a leader. Blocks of points are compared with all leaders
    at once; distances are computed directly, not through ||a||^2 + ||b||^2 - 2 a.b, which loses
    every distance below sqrt(eps) |a|."""
    m = points.shape[0]
    labels = torch.full((m,), -1, dtype=torch.int64, device=points.device)
    leaders: list[int] = []

    def within(a: Tensor, b: Tensor) -> Tensor:  # (len(a), len(b)) bool
        d = torch.cdist(points[a], points[b], compute_mode="donot_use_mm_for_euclid_dist")
        reach = tol if radius is None else (radius[a][:, None] + radius[b][None, :]).clamp(max=tol)
        return d <= reach

    for first in range(0, m, block):
        idx = torch.arange(first, min(m, first + block), device=points.device)
        if leaders:
            hit = within(idx, torch.tensor(leaders, dtype=torch.int64, device=points.device))
            has = hit.any(dim=1)
            labels[idx[has]] = hit.to(torch.int8).argmax(dim=1)[has]  # the first leader within reach
        rest = idx[labels[idx] < 0]
        if rest.numel():
            hit = within(rest, rest).cpu().tolist()  # plain lists: this loop is sequential
            lab = [-1] * rest.numel()
            for a in range(rest.numel()):
                if lab[a] < 0:
                    row = hit[a]
                    for b in range(a, rest.numel()):
                        if lab[b] < 0 and row[b]:
                            lab[b] = len(leaders)
                    leaders.append(int(rest[a]))
            labels[rest] = torch.tensor(lab, dtype=torch.int64, device=points.device)
    return labels, torch.tensor(leaders, dtype=torch.int64, device=points.device)


def newton_step(landscape: Landscape, x: Tensor) -> Tensor:
    """The Newton step (I - J_D)^{-1} (x - D(x)) on F(x) = x - D(x) = 0 for every row of x (B, D);
    least squares where I - J_D is exactly singular."""
    f = x - landscape.map(x)
    a = torch.eye(landscape.dim, dtype=x.dtype, device=x.device) - landscape.jacobian(x)
    delta, info = torch.linalg.solve_ex(a, f)
    bad = info != 0
    if bool(bad.any()):
        delta[bad] = torch.linalg.lstsq(a[bad], f[bad][..., None]).solution[..., 0]
    return delta


def newton_critical_points(
    landscape: Landscape, x: Tensor, *, tol: float, max_iter: int = 25, max_step: float | None = None
) -> tuple[Tensor, Tensor]:
    """Newton's method on F(x) = x - D(x) = 0, which converges to nearby critical points of any kind
    (saddles included). Steps are capped at max_step (default sigma) in L2. Returns (x, converged)."""
    max_step = landscape.sigma if max_step is None else max_step
    root_d = math.sqrt(landscape.dim)

    def step(xa: Tensor, idx: Tensor) -> Tensor:
        delta = newton_step(landscape, xa)
        norm = delta.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return xa - delta * torch.clamp(max_step / norm, max=1.0)

    fp = iterate_map(step, x, tol=tol, max_iter=max_iter)
    residual = (fp.x - landscape.map(fp.x)).norm(dim=1) / root_d
    return fp.x, fp.converged & (residual <= 10 * tol)


@dataclass(frozen=True)
class RefinedPoints:
    x: Tensor  # (M, D) Newton-refined fixed points; the end point itself where refinement was refused
    radius: Tensor  # (M,) L2 radius around x that holds the exact fixed point (inf where not refined)
    refined: Tensor  # (M,) bool: Newton's root was accepted
    eigenvalues: Tensor  # (M, D) Hessian spectrum of -log p_sigma at x, ascending


def refine_fixed_points(
    landscape: Landscape, x: Tensor, *, tol: float, scale: float, max_iter: int = 50
) -> RefinedPoints:
    """Newton-refine approximate fixed points x (M, D) on F(x) = x - D(x) = 0 and bound their error.

    Newton (newton_critical_points) runs from each point; its root is accepted when it converged
    within NEWTON_FACTOR * (eta_0 + tol sqrt(D)) of the point, eta_0 being the length of the first
    Newton step. The radius of an accepted root is NEWTON_FACTOR * (eta + rho): eta is the length of
    the Newton step left at the root (the distance to the exact root, up to that factor) and rho the
    round-off floor 16 eps (||x|| + scale) / min |eig(I - J_D)|, the displacement an error of a few
    ulps in D(x) causes; both grow as the smallest Hessian eigenvalue goes to zero, at a bifurcation
    or along a numerically flat valley. A point whose Newton run did not converge, or went farther,
    is kept as it is with an infinite radius: nothing locates its root. scale: the magnitude of the
    terms D(x) sums (the largest pattern norm). Needs the full Jacobian (D <= landscape.max_jacobian_dim).
    """
    d = landscape.dim
    eps = torch.finfo(x.dtype).eps
    rows = max(1, _BLOCK // (d * d))
    out_x, out_r, out_ok, out_eig = [x[:0]], [x.new_zeros(0)], [x.new_zeros(0, dtype=torch.bool)], [x.new_zeros(0, d)]
    for i in range(0, x.shape[0], rows):
        xb = x[i : i + rows]
        eta0 = newton_step(landscape, xb).norm(dim=1)
        xr, ok = newton_critical_points(landscape, xb, tol=tol, max_iter=max_iter)
        ok = ok & ((xr - xb).norm(dim=1) <= NEWTON_FACTOR * (eta0 + tol * math.sqrt(d)))
        xb = torch.where(ok[:, None], xr, xb)
        eta = newton_step(landscape, xb).norm(dim=1)
        eig = landscape.hessian_eigenvalues(xb)  # (b, D)
        soft = (eig.abs().amin(dim=1) * landscape.sigma**2).clamp_min(1e-300)  # min |eig(I - J_D)|
        rho = 16 * eps * (xb.norm(dim=1) + scale) / soft
        out_x.append(xb)
        out_r.append(torch.where(ok, NEWTON_FACTOR * (eta + rho), math.inf))
        out_ok.append(ok)
        out_eig.append(eig)
    return RefinedPoints(torch.cat(out_x), torch.cat(out_r), torch.cat(out_ok), torch.cat(out_eig))


def saddle_index(eig: Tensor) -> Tensor:
    """Negative eigenvalues per row of a Hessian spectrum eig (B, m), (B,). Eigenvalues within
    64 eps max|eig| of zero are round-off (a numerically flat direction, e.g. along a ring of
    minima) and count as zero, so a flat valley is a minimum rather than a coin toss."""
    floor = 64 * torch.finfo(eig.dtype).eps * eig.abs().amax(dim=1, keepdim=True)
    return (eig < -floor).sum(dim=1)


def _kind(index: int, n_eig: int, dim: int, reached_from: tuple[int, ...]) -> str:
    """Kind of a fixed point from its index among n_eig computed eigenvalues (n_eig < dim under
    Lanczos) and the patterns whose retrieval ends there."""
    if index == 0:
        return "memory" if len(reached_from) == 1 else "spurious"
    return "maximum" if index == n_eig == dim else "saddle"


def census(
    landscape: Landscape,
    patterns: Tensor,
    starts: Tensor,
    *,
    start_labels: list[str] | None = None,
    tol: float = 1e-7,
    max_iter: int = 20_000,
    dedup_tol: float | None = None,
    dedup: str = "newton",
    saddle_search: str = "newton",
    newton_starts: int = 1000,
    mix_top: int = 5,
) -> Census:
    """Fixed-point census of `landscape` (a denoiser at one sigma) from `starts` (N, D).

    Retrieval x <- D(x) runs from every start and from every pattern (the latter decides which
    stable points are memories). saddle_search='newton' also runs Newton's method from the first
    `newton_starts` 'midpoints' and 'mixtures' starts (midpoints first) to find saddles the dynamics
    cannot reach (needs the full Jacobian, D <= landscape.max_jacobian_dim); 'none' skips it.
    Convergence: the RMS of the last update is <= tol. Starts that do not converge within max_iter
    are counted per strategy.

    Deduplication, dedup='newton' (needs the full Jacobian; otherwise the census falls back to
    'radius' and says so in settings['dedup']):
      1. end points within 10 tol sqrt(D) of each other, below what the retrieval itself resolves
         (its last update is up to tol sqrt(D) long), are one point;
      2. each remaining point is Newton-refined on x - D(x) = 0 (refine_fixed_points), which gives
         it a radius r that holds the exact fixed point: NEWTON_FACTOR times the Newton step left at
         the refined point plus a round-off floor, both divided by the smallest |Hessian
         eigenvalue| in effect, so the radius scales with the local geometry;
      3. two refined points are one fixed point when ||x_i - x_j|| <= min(r_i + r_j, dedup_tol):
         their error balls overlap. Near a bifurcation the minima are close but each is located to
         far better than their separation, so they stay distinct; a point Newton cannot refine
         (a flat direction, a stalled float32 residual) gets an infinite radius: dedup_tol decides.
    dedup='radius' merges every pair of end points within dedup_tol (default default_dedup_tol).
    Each fixed point is labelled from the Hessian spectrum at its (refined) position: minimum
    (memory or spurious), saddle with its index, or maximum.
    """
    labels = _checked_starts(patterns, starts, start_labels, saddle_search, dedup)
    k, n = patterns.shape[0], starts.shape[0]
    sigma = landscape.sigma
    dedup_tol = default_dedup_tol(patterns, sigma) if dedup_tol is None else float(dedup_tol)

    def update(xa: Tensor, idx: Tensor) -> Tensor:
        return landscape.map(xa)

    with torch.no_grad():  # a trained network's map needs no graph; Jacobians enable it themselves
        from_starts = iterate_map(update, starts, tol=tol, max_iter=max_iter)
        from_patterns = iterate_map(update, patterns, tol=tol, max_iter=max_iter)

    points = [from_patterns.x[from_patterns.converged], from_starts.x[from_starts.converged]]
    origin = ["pattern"] * int(from_patterns.converged.sum()) + ["start"] * int(from_starts.converged.sum())
    newton_note = "skipped"
    if saddle_search == "newton":
        found, newton_note = _newton_points(landscape, starts, labels, newton_starts, tol)
        points.append(found)
        origin += ["newton"] * found.shape[0]
    cluster_of, leaders, reps, eig, dedup_note = _deduplicate(
        landscape, patterns, torch.cat(points).detach(), dedup, dedup_tol, tol
    )

    pattern_idx = torch.nonzero(from_patterns.converged).flatten().tolist()
    n_pat, n_start = len(pattern_idx), int(from_starts.converged.sum())
    reached: dict[int, list[int]] = {}
    for row, mu in enumerate(pattern_idx):
        reached.setdefault(int(cluster_of[row]), []).append(mu)
    captured = torch.bincount(cluster_of[n_pat : n_pat + n_start], minlength=len(leaders))
    by_dynamics = set(cluster_of[: n_pat + n_start].tolist())
    attractors = _attractors(landscape, patterns, reps, eig, reached, captured, n, by_dynamics, mix_top)
    strategies = sorted(set(labels), key=lambda s: (START_STRATEGIES + ("given",)).index(s))
    not_conv = ~from_starts.converged
    return Census(
        sigma=sigma,
        k=k,
        n_starts=n,
        n_converged=n_start,
        start_counts={s: sum(lab == s for lab in labels) for s in strategies},
        unconverged={s: int(sum(bool(not_conv[i]) for i, lab in enumerate(labels) if lab == s)) for s in strategies},
        patterns_unconverged=int((~from_patterns.converged).sum()),
        dedup_tol=dedup_tol,
        attractors=tuple(attractors),
        settings={
            "tol": tol,
            "max_iter": max_iter,
            "saddle_search": newton_note,
            "dedup": dedup_note,
            "origin_counts": {o: origin.count(o) for o in ("pattern", "start", "newton")},
        },
    )


def _checked_starts(
    patterns: Tensor, starts: Tensor, start_labels: list[str] | None, saddle_search: str, dedup: str
) -> list[str]:
    """census's arguments checked; the starts' strategy labels ('given' when there are none)."""
    check_patterns(patterns)
    if starts.ndim != 2 or starts.shape[1] != patterns.shape[1]:
        raise ValueError(f"starts must have shape (N, {patterns.shape[1]}), got {tuple(starts.shape)}")
    if starts.shape[0] == 0:
        raise ValueError("a census needs at least one start")
    if starts.dtype != patterns.dtype:
        raise ValueError(f"starts are {starts.dtype} but patterns are {patterns.dtype}")
    if not bool(torch.isfinite(starts).all()):
        raise ValueError("starts contain NaN or Inf")
    if saddle_search not in ("newton", "none"):
        raise ValueError(f"unknown saddle_search {saddle_search!r}; choose 'newton' or 'none'")
    if dedup not in ("newton", "radius"):
        raise ValueError(f"unknown dedup {dedup!r}; choose 'newton' or 'radius'")
    labels = start_labels or ["given"] * starts.shape[0]
    if len(labels) != starts.shape[0]:
        raise ValueError(f"got {len(labels)} start labels for {starts.shape[0]} starts")
    return labels


def _newton_points(
    landscape: Landscape, starts: Tensor, labels: list[str], newton_starts: int, tol: float
) -> tuple[Tensor, str]:
    """Critical points Newton's method finds from the first newton_starts midpoint, then mixture starts
    (saddles the retrieval dynamics cannot reach), and a note of what was done."""
    seeds = [i for i, lab in enumerate(labels) if lab == "midpoints"]
    seeds = (seeds + [i for i, lab in enumerate(labels) if lab == "mixtures"])[:newton_starts]
    none = starts[:0]
    if not seeds:
        return none, "skipped"
    if landscape.dim > landscape.max_jacobian_dim:
        return none, f"skipped: Newton needs the full Jacobian (D <= {landscape.max_jacobian_dim}), D = {landscape.dim}"
    xs, ok = newton_critical_points(landscape, starts[seeds], tol=tol)
    return xs[ok], f"newton from {len(seeds)} midpoint/mixture starts, {int(ok.sum())} converged"


def _deduplicate(
    landscape: Landscape, patterns: Tensor, points: Tensor, dedup: str, dedup_tol: float, tol: float
) -> tuple[Tensor, list[int], Tensor, Tensor, str]:
    """The distinct fixed points among points (census's docstring): each point's cluster, the clusters'
    leaders, their (refined) positions and Hessian eigenvalues, and a note of the rule applied."""
    if dedup == "newton" and landscape.dim > landscape.max_jacobian_dim:
        cluster_of, leaders = _cluster(points, dedup_tol)
        reps = points[leaders]
        note = f"radius {dedup_tol:.3g}: Newton refinement needs the full Jacobian (D <= {landscape.max_jacobian_dim})"
        return cluster_of, leaders, reps, landscape.hessian_eigenvalues(reps).detach(), note
    if dedup == "radius":
        cluster_of, leaders = _cluster(points, dedup_tol)
        reps = points[leaders]
        return cluster_of, leaders, reps, landscape.hessian_eigenvalues(reps).detach(), f"radius {dedup_tol:.3g}"
    scale = float(patterns.norm(dim=1).max())
    pre_of, pre_leaders = _cluster(points, 10 * tol * math.sqrt(landscape.dim))
    with torch.no_grad():
        ref = refine_fixed_points(landscape, points[pre_leaders], tol=tol, scale=scale)
    fin_of, leaders = _cluster(ref.x, dedup_tol, ref.radius)
    n_ref = int(ref.refined.sum())
    note = (
        f"newton: {len(pre_leaders)} distinct end points, {n_ref} refined, "
        f"{len(pre_leaders) - n_ref} kept as they are; merged within min(r_i + r_j, {dedup_tol:.3g})"
    )
    return fin_of[pre_of], leaders, ref.x[leaders], ref.eigenvalues[leaders], note


def _attractors(
    landscape: Landscape,
    patterns: Tensor,
    reps: Tensor,
    eig: Tensor,
    reached: dict[int, list[int]],
    captured: Tensor,
    n_starts: int,
    by_dynamics: set[int],
    mix_top: int,
) -> list[Attractor]:
    """One Attractor per distinct fixed point (captured: (C,) the starts each one captured), labelled from
    its Hessian spectrum, sorted by kind and share."""
    index = saddle_index(eig)
    energy = landscape.neg_log_prob(reps)
    d_all = torch.cdist(reps, patterns)  # (C, K)
    dist, nearest = d_all.min(dim=1)
    weights = torch.softmax(-0.5 * d_all**2 / landscape.sigma**2, dim=1)  # posterior over patterns
    top_w, top_i = weights.topk(min(mix_top, patterns.shape[0]), dim=1)
    out = []
    for c in range(reps.shape[0]):
        src = tuple(sorted(reached.get(c, [])))
        mixes = tuple((int(i), float(w)) for i, w in zip(top_i[c], top_w[c], strict=True) if w >= 0.01)
        out.append(
            Attractor(
                x=reps[c],
                kind=_kind(int(index[c]), eig.shape[1], landscape.dim, src),
                nearest_pattern=int(nearest[c]),
                distance=float(dist[c]),
                share=float(captured[c]) / n_starts,
                n_captured=int(captured[c]),
                energy=None if energy is None else float(energy[c]),
                hessian_min=float(eig[c, 0]),
                hessian_max=float(eig[c, -1]),
                index=int(index[c]),
                reached_from=src,
                mixes=mixes,
                found_by="dynamics" if c in by_dynamics else "newton",
            )
        )
    out.sort(key=lambda a: (KINDS.index(a.kind), -a.share, a.nearest_pattern))
    return out


def descend_to_minima(landscape: Landscape, x: Tensor, *, tol: float = 1e-10, max_iter: int = 500) -> FixedPointResult:
    """Retrieval to the nearest minimum, accelerated by safeguarded Newton steps.

    Where the Hessian (I - J_D) is positive definite the step is Newton's (capped at sigma in L2),
    elsewhere it is the plain retrieval step x <- D(x), which moves away from saddles. Newton never
    lands on a saddle this way, and near a bifurcation, where plain retrieval slows down without
    bound, it still converges quadratically. Needs the full Jacobian (D <= 1024).
    """
    eye = torch.eye(landscape.dim, dtype=x.dtype, device=x.device)

    def step(xa: Tensor, idx: Tensor) -> Tensor:
        f = xa - landscape.map(xa)
        J = landscape.jacobian(xa)
        a = eye - 0.5 * (J + J.transpose(1, 2))
        delta = f.clone()
        pd = torch.linalg.eigvalsh(a)[:, 0] > 0
        if bool(pd.any()):
            newton = torch.linalg.solve(a[pd], f[pd])
            norm = newton.norm(dim=1, keepdim=True).clamp_min(1e-300)
            delta[pd] = newton * torch.clamp(landscape.sigma / norm, max=1.0)
        return xa - delta

    return iterate_map(step, x, tol=tol, max_iter=max_iter)


def every_pattern_is_memory(
    landscape: Landscape,
    patterns: Tensor,
    *,
    tol: float = 1e-10,
    max_iter: int = 50_000,
    dedup_tol: float | None = None,
) -> bool:
    """True when the retrieval started at each pattern converges to a stable attractor that no
    other pattern's retrieval reaches: every pattern still has its own memory. Where the full
    Jacobian is affordable, retrieval uses descend_to_minima and two end points are one attractor by
    census's Newton rule (within min(r_i + r_j, dedup_tol)); otherwise plain iteration and dedup_tol."""
    tol_d = default_dedup_tol(patterns, landscape.sigma) if dedup_tol is None else dedup_tol
    if landscape.dim <= landscape.max_jacobian_dim:
        fp = descend_to_minima(landscape, patterns, tol=tol, max_iter=min(max_iter, 2000))
        if not bool(fp.converged.all()):
            return False
        scale = float(patterns.norm(dim=1).max())
        with torch.no_grad():
            ref = refine_fixed_points(landscape, fp.x, tol=tol, scale=scale)
        _, leaders = _cluster(ref.x, tol_d, ref.radius)
        stable = saddle_index(ref.eigenvalues) == 0
    else:
        fp = iterate_map(lambda xa, idx: landscape.map(xa), patterns, tol=tol, max_iter=max_iter)
        if not bool(fp.converged.all()):
            return False
        _, leaders = _cluster(fp.x, tol_d)
        stable = landscape.hessian_extremes(fp.x)[0] > 0
    return leaders.numel() == patterns.shape[0] and bool(stable.all())


def largest_sigma_all_memories(
    make_landscape: Callable[[float], Landscape],
    patterns: Tensor,
    sigma_lo: float,
    sigma_hi: float,
    *,
    rtol: float = 1e-3,
) -> float:
    """The largest sigma at which every pattern is still a memory, by bisection in log sigma.

    Assumes the property holds at sigma_lo and fails at sigma_hi (checked; a ValueError otherwise)
    and changes once in between (memories only merge as sigma grows). Accurate to a factor 1 + rtol.
    """
    if not 0 < sigma_lo < sigma_hi:
        raise ValueError(f"need 0 < sigma_lo < sigma_hi, got {sigma_lo}, {sigma_hi}")
    if not every_pattern_is_memory(make_landscape(sigma_lo), patterns):
        raise ValueError(f"not every pattern is a memory at sigma_lo = {sigma_lo}; lower it")
    if every_pattern_is_memory(make_landscape(sigma_hi), patterns):
        return sigma_hi
    lo, hi = math.log(sigma_lo), math.log(sigma_hi)
    while hi - lo > math.log1p(rtol):
        mid = 0.5 * (lo + hi)
        if every_pattern_is_memory(make_landscape(math.exp(mid)), patterns):
            lo = mid
        else:
            hi = mid
    return math.exp(lo)
