"""Absolute likelihood -log p_sigma(x) of any denoiser by the probability-flow ODE (SCIENCE.md §6).

In the VE convention x_sigma = x0 + sigma eps the probability-flow ODE (Song et al. 2021, eq. 13;
Karras et al. 2022, eq. 4) and the change of log-density along it (instantaneous change of
variables, Chen et al. 2018, thm. 1) are

    dx / dsigma          = -sigma score(x) = (x - D(x, sigma)) / sigma
    d log p / dsigma     = -div_x (dx / dsigma)

Integrated in u = log sigma (the drift x - D(x, sigma) is then O(|x|) at every scale) from sigma up
to the prior level sigma_max:

    x_T                  = x + integral_u^u_max (x - D(x, e^u)) du
    -log p_sigma(x)      = -log N(x_T; 0, sigma_max^2 I) - integral_u^u_max (n - tr J_D(x, e^u)) du

with n the state dimension and J_D = dD / dx. The prior term treats p_sigma_max as N(0, sigma_max^2 I):
the data's own spread is neglected against sigma_max. The neglected term is log E_x0 exp((x_T . x0 -
|x0|^2 / 2) / sigma_max^2) = a / sigma_max + b / sigma_max^2 + O(sigma_max^-3) along the trajectory
(x_T ~ sigma_max z: a = z . E[x0], b from the data's second moments). The results with the prior
taken at sigma_max / 4 and / 2 instead (states on the same trajectory: no extra calls) give a and b,
and prior_error = 2 (|a| / sigma_max + |b| / sigma_max^2): one difference alone misses the term where
the two orders cancel in it.

Divergence: 'exact' takes tr J_D from n vector-Jacobian products (one backward pass over n copies
of each state), for small n; 'hutchinson' estimates it by v^T J_D v with Rademacher probes v
(Hutchinson 1989), each probe fixed along the whole trajectory (FFJORD, Grathwohl et al. 2019), so
each probe gives an unbiased estimate of the whole integral and their spread a standard error.

ODE: 'dopri5' (Dormand & Prince 1980, the 5(4) pair with local extrapolation), adaptive per point,
solved at rtol / atol and again at tolerances ten times smaller; the finer result is reported with
|coarse - fine| as its error. (The sum of the embedded local error estimates is no global error
here: an error in x moves the trajectory through regions where tr J_D changes on a scale sigma^2,
and the measured global error was 20 to 900 times that sum on the empirical model; the global error
does scale with the tolerance, so the difference over a factor 10 bounds the finer result's error
about tenfold.) 'rk4': a fixed grid of `steps` steps uniform in log sigma against 2 steps, the finer
reported; reliable only once the grid resolves the posterior's switch between patterns, which at
sigma << the patterns' spacing it does not (64 steps err by hundreds of nats at sigma = 0.05, and
the halving estimate misses it). State and log-density accumulate in float64; the denoiser sees the
input's dtype. After k-diffusion's `log_likelihood` (sampling.py), per point and with error estimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem.core._checks import FLOAT_DTYPES, check_finite_float, check_positive_int

DIVERGENCES = ("exact", "hutchinson")
ODE_METHODS = ("dopri5", "rk4")
DEFAULT_PROBES = 16  # Hutchinson probes: the standard error falls as 1 / sqrt(n_probes)
DEFAULT_RTOL = 1e-5  # dopri5 tolerances, on the state and on the log-density [nats]
DEFAULT_ATOL = 1e-5
DEFAULT_STEPS = 64  # rk4 steps from sigma to sigma_max (and twice as many for the error estimate)
DEFAULT_MAX_CALLS = 20_000  # right-hand-side evaluations per point before a point is given up
DEFAULT_BATCH = 65_536  # states per denoiser call (a point's copies count one state each)
PRIOR_CHECK = 2.0  # the prior's error is estimated from the results with the prior at sigma_max / 2 and / 4
PRIOR_SAFETY = 2.0  # prior_error = 2 (|a| / sigma_max + |b| / sigma_max^2): margin for the O(1 / sigma_max^3) rest
TOL_RATIO = 10.0  # dopri5's error estimate: the result at tolerances / TOL_RATIO against the one at the tolerances

# Dormand-Prince 5(4) tableau (Hairer, Norsett & Wanner, Solving ODEs I, table 5.2)
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = the 5th-order weights (FSAL)
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4, strict=True))  # local error of the 4th-order solution
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0  # step-size controller (Hairer et al. II.4)

# f(idx, u, y) -> dy/du for the points idx (m,) at log-levels u (m,) and states y (m, n + c)
Rhs = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LikelihoodResult:
    """-log p_sigma(x) of B points by the probability-flow ODE, with its parts and error estimates.

    nll = prior - divergence; error = stderr + ode_error + prior_error (a one-standard-error band of
    the Hutchinson estimate widened by the two deterministic estimates). (nll - truth) / stderr follows
    Student's t with n_probes - 1 degrees of freedom: within one stderr 65% of the time for 8 probes,
    68% for many; within two, 91% and 95%. A point whose integration ran out of max_calls or step
    size has converged False, nll NaN and error inf.
    """

    nll: Tensor  # (B,) -log p_sigma(x) [nats]
    error: Tensor  # (B,) stderr + ode_error + prior_error
    stderr: Tensor  # (B,) Hutchinson standard error over probes (0 for the exact divergence)
    ode_error: Tensor  # (B,) estimated discretisation error of the ODE solution
    prior_error: Tensor  # (B,) bound on the neglected data spread, from the priors at sigma_max / 4 and / 2
    prior: Tensor  # (B,) -log N(x_T; 0, sigma_max^2 I), x_T the state at sigma_max
    divergence: Tensor  # (B,) integral_{log sigma}^{log sigma_max} div_x (x - D) du (mean over probes)
    latent: Tensor  # (B, *event) x_T, the state at sigma_max, float64
    converged: Tensor  # (B,) bool
    n_calls: Tensor  # (B,) int64 right-hand-side evaluations: each one D and tr J_D (or v^T J_D v) of the point
    sigma: Tensor  # (B,) float64 the level of each point
    sigma_max: float
    divergence_method: str  # 'exact' or 'hutchinson'
    n_probes: int | None  # Hutchinson probes; None for the exact divergence
    method: str  # 'dopri5' or 'rk4'
    nll_closer_priors: Tensor  # (B, 2) the results with the prior at sigma_max / 4 and / 2 (for prior_error)

    def difference(self, reference: int = 0) -> tuple[Tensor, Tensor]:
        """(nll - nll[reference], its error), each (B,): an energy relative to one of the points.

        The ODE errors add and the Hutchinson standard errors add in quadrature (each point has its own
        probes). The prior's neglected term is largely the same for both points (it depends on the data,
        and on a point only through its latent), so it is estimated on the difference itself from the
        closer priors, rather than as the sum of the two points' prior errors, which it can be far below."""
        r = reference
        stderr = (self.stderr.square() + self.stderr[r].square()).sqrt()
        value = self.nll - self.nll[r]
        closer = self.nll_closer_priors - self.nll_closer_priors[r]
        prior_error = _prior_error(value, closer[:, 1], closer[:, 0])
        return value, stderr + self.ode_error + self.ode_error[r] + prior_error


def rademacher(shape: Sequence[int], generator: torch.Generator | Sequence[torch.Generator], like: Tensor) -> Tensor:
    """Random signs +-1 of `shape` in like's dtype and device; one generator, or one per sample
    along the first dimension (so that a point's probes depend on its own seed only)."""
    if generator is None:
        raise ValueError("the Hutchinson divergence draws random probes: pass generator=torch.Generator()")
    if isinstance(generator, torch.Generator):
        bits = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device)
    else:
        gens = list(generator)
        if len(gens) != shape[0]:
            raise ValueError(f"got {len(gens)} generators for {shape[0]} points; pass one per point")
        bits = torch.stack(
            [torch.randint(0, 2, tuple(shape[1:]), generator=g, device=g.device).to(like.device) for g in gens]
        )
    return (2 * bits - 1).to(dtype=like.dtype, device=like.device)


def divergence_probes(divergence: str, n_probes: int, generator, x64: Tensor) -> tuple[Tensor | None, int]:
    """(probes (B, n_probes, n) or None, accumulators per point) for states x64 (B, n): Rademacher probes for
    'hutchinson', one exact trace (None, 1) for 'exact'."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if divergence == "exact":
        return None, 1
    n_probes = check_positive_int(n_probes, "n_probes")
    if n_probes < 2:
        raise ValueError(f"n_probes must be >= 2 (their spread gives the standard error), got {n_probes}")
    return rademacher((x64.shape[0], n_probes, x64.shape[1]), generator, x64), n_probes


def _check_inputs(x, sigma, sigma_max) -> tuple[Tensor, float]:
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (B, *event_shape) with B >= 1, got {got}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")
    s = torch.as_tensor(sigma, dtype=torch.float64).to(x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a number or have shape ({x.shape[0]},), got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError("sigma must be finite and > 0: the ODE runs in log sigma")
    sigma_max = check_finite_float(sigma_max, "sigma_max")
    if not PRIOR_CHECK**2 * float(s.max()) <= sigma_max:
        raise ValueError(
            f"sigma_max = {sigma_max} must be >= {PRIOR_CHECK**2:g} * sigma = {PRIOR_CHECK**2 * float(s.max()):.6g} "
            "(the prior's error is estimated from sigma_max / 4 and / 2); choose sigma_max far above the data's scale"
        )
    return s.clone(), sigma_max


def _rhs(denoiser, event_shape, in_dtype, mode: str, probes: Tensor | None, batch: int) -> Rhs:
    """dy/du for y = (x (n,), log-density accumulators (c,)): (x - D(x, e^u), n - v_j^T J_D v_j).

    exact: c = 1 and the trace is summed over the n coordinate vectors v_j = e_j; hutchinson: c =
    n_probes and v_j are the point's probes (B, c, n). All (point, vector) pairs of a call go through
    the denoiser as one batch of copies (in chunks of at most `batch`), with one backward pass.
    """
    n = math.prod(event_shape)

    def f(idx: Tensor, u: Tensor, y: Tensor) -> Tensor:
        m = idx.shape[0]
        x = y[:, :n]  # (m, n) float64
        copies = n if mode == "exact" else probes.shape[1]
        point = torch.arange(m, device=y.device).repeat_interleave(copies)  # (m * copies,)
        which = torch.arange(copies, device=y.device).repeat(m)  # (m * copies,) coordinate or probe
        quad = y.new_zeros(m * copies)  # v_j^T J_D v_j
        denoised = y.new_zeros(m, n)
        for i0 in range(0, m * copies, batch):
            p, j = point[i0 : i0 + batch], which[i0 : i0 + batch]
            with torch.enable_grad():
                xr = x[p].to(in_dtype).detach().requires_grad_(True)  # (r, n)
                sig = u[p].exp().to(in_dtype)
                out = denoiser(xr.reshape(-1, *event_shape), sig).reshape(-1, n)  # (r, n)
                if not out.requires_grad:
                    raise ValueError(
                        "the denoiser's output does not depend on x through autograd; the divergence needs a "
                        "differentiable D(x, sigma) (do not wrap it in torch.no_grad())"
                    )
                if mode == "exact":
                    (g,) = torch.autograd.grad(out.gather(1, j[:, None]).sum(), xr, allow_unused=True)
                    q = torch.zeros_like(j, dtype=y.dtype) if g is None else g.gather(1, j[:, None])[:, 0]
                else:
                    v = probes[idx[p], j].to(in_dtype)  # (r, n)
                    (g,) = torch.autograd.grad((out * v).sum(), xr, allow_unused=True)
                    q = torch.zeros_like(j, dtype=y.dtype) if g is None else (g * v).sum(1)
            quad[i0 : i0 + p.shape[0]] = q.detach().to(y.dtype)
            first = j == 0
            denoised[p[first]] = out[first].detach().to(y.dtype)
        quad = quad.reshape(m, copies)
        rate = n - (quad.sum(1, keepdim=True) if mode == "exact" else quad)  # (m, c) div_x (x - D)
        return torch.cat([x - denoised, rate], dim=1)

    return f


def _error_ratio(y0: Tensor, y1: Tensor, err: Tensor, n: int, rtol: float, atol: float) -> Tensor:
    """Scaled local error per point (m,): RMS over the state, max over the log-density accumulators."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    r = err / scale
    return torch.maximum(r[:, :n].square().mean(1).sqrt(), r[:, n:].abs().amax(1))


def _dopri5(
    f: Rhs, y: Tensor, u: Tensor, u_end: float, n: int, rtol: float, atol: float, calls: Tensor, max_calls: int
) -> tuple[Tensor, Tensor]:
    """Integrate every point from u (B,) to u_end in place of y (B, n + c), each with its own step size.

    Returns (y at u_end, ok (B,) bool); `calls` (B,) is incremented. A point stops unfinished (ok
    False) past max_calls, at a step below 1e-12 of its span, or where the denoiser gave NaN or Inf.
    """
    b = y.shape[0]
    y, u = y.clone(), u.clone()
    span = (u_end - u).clamp_min(0)
    h = (span / 64).clamp_min(1e-3)  # a guess; the controller corrects it within a few steps
    ok = torch.ones(b, dtype=torch.bool, device=y.device)
    active = u < u_end
    fsal = y.new_zeros(y.shape)  # f at (u, y) of each point, valid where have_f
    have_f = torch.zeros(b, dtype=torch.bool, device=y.device)
    while bool(active.any()):
        idx = active.nonzero()[:, 0]
        need = idx[~have_f[idx]]
        if need.numel():
            fsal[need] = f(need, u[need], y[need])
            calls[need] += 1
            have_f[need] = True
        y0, u0 = y[idx], u[idx]
        last = h[idx] >= u_end - u0
        step = torch.where(last, u_end - u0, h[idx])  # (m,)
        col = step[:, None]
        k = [fsal[idx]]
        for i in range(1, 7):
            yi = y0 + col * sum(a * ki for a, ki in zip(_A[i], k, strict=False) if a != 0.0)
            k.append(f(idx, u0 + _C[i] * step, yi))
        calls[idx] += 6
        y1 = y0 + col * sum(bb * ki for bb, ki in zip(_B5, k, strict=True) if bb != 0.0)
        err = col * sum(e * ki for e, ki in zip(_E, k, strict=True) if e != 0.0)  # (m, n + c)
        ratio = _error_ratio(y0, y1, err, n, rtol, atol)
        accept = ratio <= 1
        acc = idx[accept]
        y[acc] = y1[accept]
        u[acc] = torch.where(last[accept], torch.full_like(u0[accept], u_end), u0[accept] + step[accept])
        fsal[acc] = k[6][accept]
        factor = (_SAFETY * ratio.clamp_min(1e-10) ** -0.2).clamp(_MIN_FACTOR, _MAX_FACTOR)
        factor = torch.where(accept, factor, factor.clamp(max=1.0))
        h[idx] = step * factor
        finished = accept & last
        stuck = (calls[idx] + 6 > max_calls) & ~finished
        tiny = (h[idx] < 1e-12 * span[idx].clamp_min(1.0)) & ~finished
        broken = ~torch.isfinite(ratio)
        failed = stuck | tiny | broken
        ok[idx[failed]] = False
        active[idx[finished | failed]] = False
    return y, ok


def _rk4(f: Rhs, y: Tensor, u: Tensor, u_end: float, steps: int, calls: Tensor) -> Tensor:
    """Classical Runge-Kutta on `steps` equal steps in u from u (B,) to u_end; increments calls."""
    idx = torch.arange(y.shape[0], device=y.device)
    h = ((u_end - u) / steps)[:, None]  # (B, 1)
    for i in range(steps):
        ui = u + i * h[:, 0]
        k1 = f(idx, ui, y)
        k2 = f(idx, ui + 0.5 * h[:, 0], y + 0.5 * h * k1)
        k3 = f(idx, ui + 0.5 * h[:, 0], y + 0.5 * h * k2)
        k4 = f(idx, ui + h[:, 0], y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    calls += 4 * steps
    return y


def _prior_nll(x_t: Tensor, sigma_t: float) -> Tensor:
    """-log N(x_t; 0, sigma_t^2 I) for x_t (B, n), shape (B,)."""
    n = x_t.shape[1]
    return (x_t * x_t).sum(1) / (2 * sigma_t**2) + 0.5 * n * math.log(2 * math.pi * sigma_t**2)


def _prior_error(nll: Tensor, nll_2: Tensor, nll_4: Tensor) -> Tensor:
    """PRIOR_SAFETY (|a'| + |b'|), from the prior's neglected term a' + b' = a / sigma_max + b / sigma_max^2 and the
    results with the prior at sigma_max, / 2 and / 4: d1 = nll_2 - nll = a' + 3 b', d2 = nll_4 - nll_2 = 2 a' + 12 b'.
    """
    d1, d2 = nll_2 - nll, nll_4 - nll_2
    b_term = (d2 - 2 * d1) / 6
    a_term = d1 - 3 * b_term
    return PRIOR_SAFETY * (a_term.abs() + b_term.abs())


def log_likelihood(
    denoiser,
    x: Tensor,
    sigma: float | Tensor,
    *,
    sigma_max: float,
    divergence: str = "exact",
    n_probes: int = DEFAULT_PROBES,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    method: str = "dopri5",
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    steps: int = DEFAULT_STEPS,
    max_calls: int = DEFAULT_MAX_CALLS,
    batch: int = DEFAULT_BATCH,
) -> LikelihoodResult:
    """-log p_sigma(x) of the distribution the denoiser D implies, by its probability-flow ODE from
    sigma to sigma_max (module docstring), with error estimates.

    denoiser: D(x, sigma) with x (B, *event) and sigma (B,), differentiable in x (autograd stays on
    inside; for a network, its parameters may keep requires_grad). x: (B, *event), float32 or
    float64 (the dtype D is called in). sigma: a level > 0, or one per point (B,). sigma_max: the
    prior level, >= 2 sigma and far above the data's scale (the prior N(0, sigma_max^2 I) neglects
    the data's spread; prior_error measures by how much). divergence: 'exact' (n backward copies per
    evaluation, for small n) or 'hutchinson' (n_probes >= 2 Rademacher probes from `generator`, one
    torch.Generator or one per point). method: 'dopri5' (adaptive to rtol, atol, solved again at
    tolerances / 10 for the error estimate) or 'rk4' (a fixed grid of steps against 2 steps, only
    where the grid resolves the density: see the module docstring). max_calls: right-hand-side
    evaluations per point, all solves together, before it is given up (converged False). batch: most states
    per denoiser call.
    """
    s, sigma_max = _check_inputs(x, sigma, sigma_max)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {ODE_METHODS}")
    if method == "dopri5":
        rtol, atol = check_finite_float(rtol, "rtol"), check_finite_float(atol, "atol")
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    else:
        steps = check_positive_int(steps, "steps")
    max_calls, batch = check_positive_int(max_calls, "max_calls"), check_positive_int(batch, "batch")
    b, event_shape = x.shape[0], tuple(x.shape[1:])
    n = math.prod(event_shape)
    x64 = x.reshape(b, n).to(torch.float64)
    probes, c = divergence_probes(divergence, n_probes, generator, x64)
    f = _rhs(denoiser, event_shape, x.dtype, divergence, probes, batch)
    levels = [sigma_max / PRIOR_CHECK**2, sigma_max / PRIOR_CHECK, sigma_max]  # the prior checks, then the prior
    calls = torch.zeros(b, dtype=torch.int64, device=x.device)
    y0 = torch.cat([x64, x64.new_zeros(b, c)], dim=1)  # (B, n + c): state, then integrated divergences
    u0 = s.log()
    span = math.log(sigma_max) - float(u0.min())

    def legs(step: Callable[[Tensor, Tensor, float, int], Tensor]) -> list[Tensor]:
        """The state at each level of `levels`, each leg integrated by step(y, u, u_end, leg)."""
        ys, y, u = [], y0, u0
        for i, level in enumerate(levels):
            y = step(y, u, math.log(level), i)
            ys.append(y)
            u = torch.full_like(u0, math.log(level))
        return ys

    if method == "dopri5":
        ok = torch.ones(b, dtype=torch.bool, device=x.device)

        def adaptive(rt: float, at: float) -> Callable[[Tensor, Tensor, float, int], Tensor]:
            def step(y: Tensor, u: Tensor, u_end: float, _: int) -> Tensor:
                y, leg_ok = _dopri5(f, y, u, u_end, n, rt, at, calls, max_calls)
                ok.logical_and_(leg_ok)
                return y

            return step

        coarse = legs(adaptive(rtol, atol))[-1]
        ys = legs(adaptive(rtol / TOL_RATIO, atol / TOL_RATIO))
    else:

        def fixed(k: int) -> Callable[[Tensor, Tensor, float, int], Tensor]:
            def step(y: Tensor, u: Tensor, u_end: float, leg: int) -> Tensor:
                # the first leg takes most of the span; each later one (log 2 wide) its share of k
                share = k if leg == 0 else max(1, math.ceil(k * math.log(PRIOR_CHECK) / max(span, 1e-12)))
                return _rk4(f, y, u, u_end, share, calls)

            return step

        coarse = legs(fixed(steps))[-1]
        ys = legs(fixed(2 * steps))
        ok = torch.ones(b, dtype=torch.bool, device=x.device)

    y_end = ys[-1]
    prior = _prior_nll(y_end[:, :n], sigma_max)
    per_probe = prior[:, None] - y_end[:, n:]  # (B, c)
    nll = per_probe.mean(1)
    ode_error = ((_prior_nll(coarse[:, :n], sigma_max) - coarse[:, n:].mean(1)) - nll).abs()
    stderr = per_probe.std(1) / math.sqrt(c) if c > 1 else torch.zeros_like(nll)
    nll_4, nll_2 = ((_prior_nll(ys[i][:, :n], levels[i])[:, None] - ys[i][:, n:]).mean(1) for i in (0, 1))
    prior_error = _prior_error(nll, nll_2, nll_4)
    error = stderr + ode_error + prior_error
    ok = ok & torch.isfinite(error)  # a NaN or Inf from the denoiser (rk4 has no other check)
    nan = torch.full_like(nll, math.nan)
    return LikelihoodResult(
        nll=torch.where(ok, nll, nan),
        error=torch.where(ok, error, math.inf),
        stderr=torch.where(ok, stderr, nan),
        ode_error=torch.where(ok, ode_error, math.inf),
        prior_error=torch.where(ok, prior_error, nan),
        prior=torch.where(ok, prior, nan),
        divergence=torch.where(ok, y_end[:, n:].mean(1), nan),
        latent=y_end[:, :n].reshape(b, *event_shape),
        converged=ok,
        n_calls=calls,
        sigma=s,
        sigma_max=sigma_max,
        divergence_method=divergence,
        n_probes=None if probes is None else n_probes,
        method=method,
        nll_closer_priors=torch.stack([torch.where(ok, nll_4, nan), torch.where(ok, nll_2, nan)], dim=1),
    )
