"""Do a denoiser's noise levels belong to one diffused density? The heat equation as a test (SCIENCE.md §6).

The scores s(x, sigma) = (D(x, sigma) - x) / sigma^2 of a denoiser are those of one density p_0
diffused, p_sigma = p_0 * N(0, sigma^2 I), only if every level is a gradient field and the levels
are linked by the heat equation dp / dsigma = sigma Lap p. For E = -log p_sigma it reads

    sigma dE / dsigma (x) = n - tr J_D(x, sigma) - |D(x, sigma) - x|^2 / sigma^2 =: q(x)

with n the dimension and J_D = dD / dx. The two energies diffmem computes need different parts of this:

- the line integral E(b) - E(a) (core.energy) uses level sigma only, and is path independent when
  that level is a gradient field (the two-path discrepancy tests it);
- the probability-flow ODE's -log p_sigma (core.likelihood) is the density that the model's sampler
  pushes forward from the prior: it integrates D over every level from sigma to sigma_max.

They are equal when the levels are consistent, and can differ by any amount when they are not, even
for a conservative score. Example: D(x, sigma) = D*(x, c sigma), D* the exact denoiser of some data.
Its score c^2 grad log p*_{c sigma} is a gradient, and its line integral is c^2 (E*(b) - E*(a)) at
level c sigma; its ODE is the exact model's flow in the variable c sigma, ending on a prior of width
sigma_max instead of c sigma_max, and gives neither. The heat equation's residual below is, in closed
form, (c^2 - 1) (tr J_D*(a) - tr J_D*(b)) at level c sigma (tests/test_consistency.py).

level_consistency measures the heat equation's residual on the difference between two states:

    line     = sigma d/dsigma [E(b) - E(a)]
             = integral_0^1 (2 (D - gamma) - dD / dlog sigma) / sigma^2 . gamma' ds   (straight path)
    heat     = q(b) - q(a)                    (D and its divergence at the two ends only)
    residual = line - heat                    (zero for the exact model of any data)

in nats per unit of log sigma. dD / dlog sigma is a central difference with step eps in log sigma
(a VP network's timestep is interpolated in log sigma between its grid points, so eps should span a
few of them; the default 0.05 does on a 1,000-step linear schedule); its truncation error is
estimated from a second integral at step 2 eps as (I_eps - I_2eps) / 3 and added (Richardson's
extrapolation); its size is kept as the error, a bound the extrapolated value beats. The line integral
is adaptive (core.energy) to `tolerance`. The divergence is exact (n backward copies) or Hutchinson's
estimate with Rademacher probes, whose spread gives a standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem.core._checks import check_finite_float, check_positive_int
from diffmem.core.energy import (
    DEFAULT_BATCH,
    DEFAULT_MAX_NODES,
    DEFAULT_TOLERANCE,
    _check_pairs,
    _line_integral,
    _straight_path,
    check_adaptive_rule,
)
from diffmem.core.likelihood import DEFAULT_PROBES, _rhs, divergence_probes

DEFAULT_EPS = 0.05  # step of the central difference in log sigma
RICHARDSON = 3.0  # a central difference's error is about (D_eps - D_2eps) / 3


@dataclass(frozen=True)
class LevelConsistency:
    """The heat equation's residual on E(b) - E(a) at level sigma for N pairs (module docstring), in nats per
    unit of log sigma. error = line_error + heat_stderr: within it, the levels are consistent at (a, b)."""

    line: Tensor  # (N,) sigma d/dsigma [E(b) - E(a)] from the straight-path integral
    heat: Tensor  # (N,) q(b) - q(a): the same, as the heat equation predicts it from the two ends
    residual: Tensor  # (N,) line - heat
    relative_residual: Tensor  # (N,) |residual| / max(|line|, |heat|); 0 where both vanish
    error: Tensor  # (N,) line_error + heat_stderr
    line_error: Tensor  # (N,) quadrature error + the central difference's estimated truncation error
    heat_stderr: Tensor  # (N,) Hutchinson standard error of heat (0 for the exact divergence)
    nodes: Tensor  # (N,) int64 straight-path nodes of both integrals; each node costs 3 denoiser calls
    sigma: float
    eps: float
    divergence_method: str
    n_probes: int | None


class _LevelDerivative:
    """A pseudo-denoiser whose 'score' is sigma d/dsigma of D's score, so that core.energy's line integral
    of it is sigma d/dsigma of the energy: D~ = 3 x - 2 D(x, sigma) + dD / dlog sigma."""

    def __init__(self, denoiser, eps: float):
        self.denoiser, self.eps = denoiser, eps

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        up = self.denoiser(x, sigma * math.exp(self.eps))
        down = self.denoiser(x, sigma * math.exp(-self.eps))
        return 3 * x - 2 * self.denoiser(x, sigma) + (up - down) / (2 * self.eps)


def heat_rate(
    denoiser,
    x: Tensor,
    sigma: float,
    *,
    divergence: str = "exact",
    n_probes: int = DEFAULT_PROBES,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    batch: int = DEFAULT_BATCH,
) -> tuple[Tensor, Tensor]:
    """q(x) = n - tr J_D - |D - x|^2 / sigma^2 (= sigma dE/dsigma for a consistent model) of x (B, *event),
    float64, and its Hutchinson standard error (zeros for the exact divergence)."""
    b, event = x.shape[0], tuple(x.shape[1:])
    n = math.prod(event)
    x64 = x.reshape(b, n).to(torch.float64)
    probes, c = divergence_probes(divergence, n_probes, generator, x64)
    f = _rhs(denoiser, event, x.dtype, divergence, probes, check_positive_int(batch, "batch"))
    u = torch.full((b,), math.log(sigma), dtype=torch.float64, device=x.device)
    out = f(torch.arange(b, device=x.device), u, torch.cat([x64, x64.new_zeros(b, c)], dim=1))
    drift, rate = out[:, :n], out[:, n:]  # x - D (B, n); n - v^T J_D v per probe (B, c)
    per_probe = rate - drift.square().sum(1, keepdim=True) / sigma**2
    stderr = per_probe.std(1) / math.sqrt(c) if c > 1 else per_probe.new_zeros(b)
    return per_probe.mean(1), stderr


def level_consistency(
    denoiser,
    sigma: float,
    a: Tensor,
    b: Tensor,
    *,
    eps: float = DEFAULT_EPS,
    tolerance: float = DEFAULT_TOLERANCE,
    max_nodes: int = DEFAULT_MAX_NODES,
    divergence: str = "exact",
    n_probes: int = DEFAULT_PROBES,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    batch: int = DEFAULT_BATCH,
) -> LevelConsistency:
    """The heat equation's residual for N pairs of states a, b (N, *event) at level sigma (module docstring).

    denoiser: D(x, sigma), differentiable in x (for the divergence), defined at sigma e^(+-2 eps). eps: step of
    the central difference in log sigma, in (0, 0.5]. tolerance, max_nodes: the adaptive straight-path rule of
    core.energy.relative_energy (each node costs 3 denoiser calls). divergence: 'exact' (n backward copies per
    state, small n) or 'hutchinson' (n_probes >= 2 probes from `generator`, one torch.Generator or one per state
    of the 2N: a's, then b's).
    """
    sigma = _check_pairs(a, b, sigma)
    eps = check_finite_float(eps, "eps")
    if not 0 < eps <= 0.5:
        raise ValueError(f"eps must be in (0, 0.5] (a step in log sigma), got {eps}")
    tolerance, max_nodes = check_adaptive_rule(tolerance, max_nodes)
    rule = {"n_nodes": None, "tolerance": tolerance, "max_nodes": max_nodes, "batch": batch}
    path = _straight_path(a, b)
    with torch.no_grad():
        line, quad_error, nodes = _line_integral(_LevelDerivative(denoiser, eps), sigma, path, a, **rule)
        wide, _, wide_nodes = _line_integral(_LevelDerivative(denoiser, 2 * eps), sigma, path, a, **rule)
    q, se = heat_rate(
        denoiser, torch.cat([a, b]), sigma, divergence=divergence, n_probes=n_probes, generator=generator, batch=batch
    )
    n = a.shape[0]
    heat = q[n:] - q[:n]
    heat_stderr = (se[n:].square() + se[:n].square()).sqrt()
    line, wide = line.to(torch.float64), wide.to(torch.float64)
    truncation = (line - wide) / RICHARDSON  # the eps estimate's own error, about
    line = line + truncation  # Richardson's extrapolation, O(eps^4)
    line_error = quad_error.to(torch.float64) + truncation.abs()
    residual = line - heat
    scale = torch.maximum(line.abs(), heat.abs())
    relative = torch.where(scale > 0, residual.abs() / scale.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return LevelConsistency(
        line=line,
        heat=heat,
        residual=residual,
        relative_residual=relative,
        error=line_error + heat_stderr,
        line_error=line_error,
        heat_stderr=heat_stderr,
        nodes=nodes + wide_nodes,
        sigma=sigma,
        eps=eps,
        divergence_method=divergence,
        n_probes=None if divergence == "exact" else n_probes,
    )
