"""Curvature of -log p_sigma from any denoiser's Jacobian (SCIENCE.md §6 "Curvature").

    H(x) = (I - J_D(x)) / sigma^2,   J_D = dD(x, sigma) / dx

by differentiating Tweedie's score (D(x, sigma) - x) / sigma^2. The exact empirical denoiser has
J_D = beta C(x) with beta = 1 / sigma^2, so H = beta (I - beta C(x)), beta times the dense memory's
Hessian (§3). A learned denoiser's Jacobian is not exactly symmetric (its score is not exactly a
gradient), so H uses the symmetric part (J + J^T) / 2 and the asymmetry ||J - J^T||_F / ||J||_F is
reported beside it.

Expected shapes (§6): memories give large, nearly isotropic curvature (H ~ I / sigma^2); spurious
states positive but smaller curvature; generalized samples many near-zero eigenvalues along the
data manifold; saddles a negative eigenvalue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd import forward_ad

from diffmem.core._checks import FLOAT_DTYPES, check_finite_float, check_positive_int
from diffmem.core.lanczos import lanczos_eigenvalues
from diffmem.core.random import randn

JACOBIAN_METHODS = ("auto", "vmap", "loop")
NEAR_ZERO_TAU = 0.1  # |lambda| < tau / sigma^2: under a tenth of a memory's curvature 1 / sigma^2 (J_D ~ I there)
HUTCHINSON_PROBES = 8  # random probes for trace and Frobenius norms on the Lanczos path
_JACOBIAN_BUDGET = 2**14  # points x D cotangents per vectorised backward pass (bounds memory)
SUMMARY_FIELDS = (
    "lambda_min",
    "lambda_max",
    "mean_curvature",
    "effective_dim",
    "n_near_zero",
    "n_negative",
    "asymmetry",
)


@dataclass(frozen=True)
class CurvatureSpectrum:
    """Eigenvalues of the Hessian of -log p_sigma at B points, with summaries for comparing classes.

    On the Lanczos path (exact False) the eigenvalues are the k smallest then the k largest Ritz
    values; mean_curvature, effective_dim and asymmetry are then Hutchinson estimates from
    HUTCHINSON_PROBES random probes, and the counts only see the 2k computed eigenvalues (lower bounds).
    """

    eigenvalues: Tensor  # (B, m) ascending: all D eigenvalues (exact), or k smallest then k largest
    exact: bool  # full spectrum from the full Jacobian, or extreme eigenvalues by Lanczos
    sigma: float
    dim: int  # D, the flattened state dimension
    lambda_min: Tensor  # (B,)
    lambda_max: Tensor  # (B,)
    mean_curvature: Tensor  # (B,) trace(H) / D; 1 / sigma^2 for an isotropic memory well
    effective_dim: Tensor  # (B,) participation ratio tr(H)^2 / ||H||_F^2: D if isotropic, ~ n if n stiff dominate
    n_near_zero: Tensor  # (B,) int64, eigenvalues with |lambda| < tau / sigma^2 (flat directions)
    n_negative: Tensor  # (B,) int64, eigenvalues <= -tau / sigma^2 (descent directions: a saddle)
    asymmetry: Tensor  # (B,) ||J - J^T||_F / ||J||_F, 0 for a conservative score
    tau: float  # threshold of the counts, in units of 1 / sigma^2


def _flat_map(
    denoiser: Callable[[Tensor, Tensor], Tensor], sigma: float, event_shape: tuple[int, ...]
) -> Callable[[Tensor], Tensor]:
    """x (B, D) -> D(x, sigma) (B, D) for a denoiser on (B, *event_shape) states."""

    def f(x: Tensor) -> Tensor:
        sig = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        return denoiser(x.reshape(x.shape[0], *event_shape), sig).reshape(x.shape[0], -1)

    return f


def _jacobian_vmap(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    # summing over the batch is exact when samples do not interact (no batch statistics)
    xg = x.detach().requires_grad_(True)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    # all D backward passes in one call, vectorised over the rows of the identity by torch.vmap
    (jac,) = torch.autograd.grad(f(xg).sum(0), xg, eye, is_grads_batched=True)  # (D_out, B, D_in)
    return jac.permute(1, 0, 2)


def _jacobian_loop(f: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    xg = x.detach().requires_grad_(True)
    out = f(xg)  # (B, D)
    rows = [torch.autograd.grad(out[:, i].sum(), xg, retain_graph=True)[0] for i in range(out.shape[1])]
    return torch.stack(rows, dim=1)  # (B, D_out, D_in)


def denoiser_jacobian(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigma: float,
    *,
    event_shape: tuple[int, ...] | None = None,
    method: str = "auto",
) -> Tensor:
    """J_D(x) = dD(x, sigma) / dx of shape (B, D, D) on flattened states, rows = outputs.

    method: 'vmap' (the D backward passes vectorised by torch.vmap, one call per chunk of points), 'loop'
    (D backward passes with autograd), or 'auto' (vmap, and the loop where the denoiser does not
    support vmap, e.g. data-dependent control flow in its backward pass). Both assume the denoiser
    treats samples independently.
    """
    xf, event_shape, sigma = _prepare(x, sigma, event_shape)
    return _jacobian(_flat_map(denoiser, sigma, event_shape), xf, _check_method(method))


def _check_method(method: str) -> str:
    if method not in JACOBIAN_METHODS:
        raise ValueError(f"unknown Jacobian method {method!r}; choose one of {JACOBIAN_METHODS}")
    return method


def _jacobian(f: Callable[[Tensor], Tensor], xf: Tensor, method: str) -> Tensor:
    dim = xf.shape[1]
    chunk = max(1, _JACOBIAN_BUDGET // dim)
    parts = []
    with torch.enable_grad():
        for start in range(0, xf.shape[0], chunk):
            xc = xf[start : start + chunk].detach()
            if method == "loop":
                parts.append(_jacobian_loop(f, xc))
                continue
            try:
                parts.append(_jacobian_vmap(f, xc))
            except Exception:
                if method == "vmap":
                    raise
                method = "loop"  # the loop re-raises any error that is not about vmap
                parts.append(_jacobian_loop(f, xc))
    return torch.cat(parts).detach()


def _jacobian_products(f: Callable[[Tensor], Tensor], xf: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """v (B, D) -> (J v, J^T v) for every row, from one forward pass kept for all products.

    J^T v is a backward pass through that graph. J v is the derivative in u of J^T u (linear in u),
    a backward pass through the backward graph: several times cheaper than forward-mode AD for the
    dense memory. Denoisers whose backward is not differentiable use forward-mode AD instead.
    """
    xg = xf.detach().requires_grad_(True)
    out = f(xg)  # (B, D)
    u = torch.zeros_like(out, requires_grad=True)

    def transposed(v: Tensor) -> Tensor:
        return torch.autograd.grad(out, xg, v, retain_graph=True)[0].detach()

    try:
        (jtu,) = torch.autograd.grad(out, xg, u, create_graph=True)  # J^T u, a graph in u

        def double_backward(v: Tensor) -> tuple[Tensor, Tensor]:
            (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)
            return jv.detach(), transposed(v)

        double_backward(torch.zeros_like(xf))  # raises here if the backward is not differentiable
        return double_backward
    except RuntimeError:

        def forward_mode(v: Tensor) -> tuple[Tensor, Tensor]:
            with forward_ad.dual_level():
                jv = forward_ad.unpack_dual(f(forward_ad.make_dual(xf, v))).tangent
            return (torch.zeros_like(v) if jv is None else jv.detach()), transposed(v)

        return forward_mode


def _prepare(x: Tensor, sigma: float, event_shape: tuple[int, ...] | None) -> tuple[Tensor, tuple[int, ...], float]:
    """Validated flat states (B, D), the denoiser's event shape and sigma."""
    sigma = check_finite_float(sigma, "sigma")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape (B, *event_shape), got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must have shape (B, *event_shape) with B >= 1, got {tuple(x.shape)}")
    if event_shape is None:
        event_shape = tuple(x.shape[1:])
    event_shape = tuple(int(n) for n in event_shape)
    dim = math.prod(event_shape)
    if tuple(x.shape[1:]) != event_shape and tuple(x.shape[1:]) != (dim,):
        raise ValueError(
            f"x has shape {tuple(x.shape)}, which is neither (B, *event_shape) with event_shape = {event_shape} "
            f"nor flat (B, {dim}); reshape x or pass the denoiser's event_shape"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf values")
    return x.detach().reshape(x.shape[0], dim), event_shape, sigma


def _participation_ratio(trace: Tensor, frob_sq: Tensor) -> Tensor:
    return torch.where(frob_sq > 0, trace**2 / torch.where(frob_sq > 0, frob_sq, 1), 0)


def _ratio(num_sq: Tensor, den_sq: Tensor) -> Tensor:
    return torch.where(den_sq > 0, (num_sq / torch.where(den_sq > 0, den_sq, 1)).sqrt(), 0)


def hessian_spectrum(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigma: float,
    *,
    k: int | None = None,
    exact_max_dim: int = 1024,
    n_iter: int | None = None,
    generator: torch.Generator | None = None,
    event_shape: tuple[int, ...] | None = None,
    tau: float = NEAR_ZERO_TAU,
    jacobian: str = "auto",
) -> CurvatureSpectrum:
    """Spectrum of the Hessian of -log p_sigma, (I - (J_D + J_D^T) / 2) / sigma^2, at the points x.

    denoiser: D(x, sigma) with x (B, *event_shape) and sigma (B,); it must treat samples
    independently. x: (B, *event_shape), or flat (B, D) with event_shape given. sigma > 0.
    D <= exact_max_dim: the full Jacobian and all D eigenvalues (method `jacobian`, see
    denoiser_jacobian; k and n_iter are not used). Above: the k smallest and k largest eigenvalues
    (default k = min(5, D // 2)) by n_iter Lanczos steps (default min(D, max(60, 4k))) on
    Jacobian-vector products, from start vectors and Hutchinson probes drawn with `generator`
    (required there). Extreme eigenvalues that are well separated converge first; clustered ones
    need more steps (n_iter = D is exact).
    tau: eigenvalues with |lambda| < tau / sigma^2 count as near zero, those <= -tau / sigma^2 as negative.
    """
    xf, event_shape, sigma = _prepare(x, sigma, event_shape)
    exact_max_dim = check_positive_int(exact_max_dim, "exact_max_dim")
    tau = check_finite_float(tau, "tau")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    method = _check_method(jacobian)
    f = _flat_map(denoiser, sigma, event_shape)
    b, dim = xf.shape
    s2 = sigma**2
    if dim <= exact_max_dim:
        J = _jacobian(f, xf, method)  # (B, D, D)
        sym = 0.5 * (J + J.transpose(1, 2))
        eye = torch.eye(dim, dtype=xf.dtype, device=xf.device)
        eig = torch.linalg.eigvalsh((eye - sym) / s2)  # (B, D) ascending
        asym_sq = ((J - J.transpose(1, 2)) ** 2).sum((1, 2))
        trace, frob_sq = eig.sum(1), (eig**2).sum(1)
        asymmetry = _ratio(asym_sq, (J**2).sum((1, 2)))
        exact = True
    else:
        if generator is None:
            raise ValueError(
                f"D = {dim} > exact_max_dim = {exact_max_dim}: Lanczos draws start vectors; pass a torch.Generator"
            )
        k = min(5, dim // 2) if k is None else check_positive_int(k, "k")
        n_iter = min(dim, max(60, 4 * k)) if n_iter is None else check_positive_int(n_iter, "n_iter")
        if 2 * k > min(n_iter, dim):
            raise ValueError(
                f"k = {k} eigenvalues at each end need n_iter >= 2k = {2 * k} and D >= 2k; "
                f"got n_iter = {n_iter}, D = {dim}"
            )
        with torch.enable_grad():
            products = _jacobian_products(f, xf)

            def hvp(v: Tensor) -> Tensor:
                jv, jtv = products(v)
                return (v - 0.5 * (jv + jtv)) / s2

            ritz = lanczos_eigenvalues(hvp, randn((b, dim), generator, xf), n_iter)  # (B, m)
            # Hutchinson: E z^T A z = tr A and E ||A z||^2 = ||A||_F^2 for z ~ N(0, I)
            trace = xf.new_zeros(b)
            frob_sq, j_sq, asym_sq = xf.new_zeros(b), xf.new_zeros(b), xf.new_zeros(b)
            for _ in range(HUTCHINSON_PROBES):
                z = randn((b, dim), generator, xf)
                jz, jtz = products(z)
                hz = (z - 0.5 * (jz + jtz)) / s2
                trace += (z * hz).sum(1) / HUTCHINSON_PROBES
                frob_sq += (hz**2).sum(1) / HUTCHINSON_PROBES
                j_sq += (jz**2).sum(1)
                asym_sq += ((jz - jtz) ** 2).sum(1)
        eig = ritz if ritz.shape[1] < 2 * k else torch.cat([ritz[:, :k], ritz[:, -k:]], dim=1)  # (B, <= 2k)
        asymmetry = _ratio(asym_sq, j_sq)
        exact = False
    threshold = tau / s2
    return CurvatureSpectrum(
        eigenvalues=eig,
        exact=exact,
        sigma=sigma,
        dim=dim,
        lambda_min=eig[:, 0],
        lambda_max=eig[:, -1],
        mean_curvature=trace / dim,
        effective_dim=_participation_ratio(trace, frob_sq),
        n_near_zero=(eig.abs() < threshold).sum(1),
        n_negative=(eig <= -threshold).sum(1),
        asymmetry=asymmetry,
        tau=tau,
    )


def summarize_by_class(
    spectra: CurvatureSpectrum | Sequence[CurvatureSpectrum], labels: Sequence[str]
) -> dict[str, dict[str, float | int | dict[str, float]]]:
    """Per-class quartiles of the curvature summaries, as plain Python numbers.

    spectra: one CurvatureSpectrum over B points, or several (concatenated in order), all at the
    same sigma and tau (curvature scales as 1 / sigma^2, so levels are summarized separately).
    labels: one string per point, e.g. 'memorized', 'spurious', 'generalized'.
    Returns {label: {'n': count, field: {'q25', 'median', 'q75'}}} for every field in
    SUMMARY_FIELDS, classes in order of first appearance.
    """
    parts = [spectra] if isinstance(spectra, CurvatureSpectrum) else list(spectra)
    if not parts or not all(isinstance(p, CurvatureSpectrum) for p in parts):
        raise ValueError("spectra must be a CurvatureSpectrum or a non-empty sequence of them")
    if len({(p.sigma, p.tau) for p in parts}) > 1:
        raise ValueError(
            "spectra mix noise levels or thresholds (sigma, tau); curvature scales as 1 / sigma^2, "
            "so summarize each level separately"
        )
    labels = list(labels)
    if not all(isinstance(lab, str) for lab in labels):
        raise ValueError("labels must be strings, e.g. 'memorized', 'spurious', 'generalized'")
    n_points = sum(p.lambda_min.shape[0] for p in parts)
    if len(labels) != n_points:
        raise ValueError(f"got {len(labels)} labels for {n_points} points; pass one label per point")
    columns = {name: torch.cat([getattr(p, name).to(torch.float64) for p in parts]) for name in SUMMARY_FIELDS}
    out: dict[str, dict[str, float | int | dict[str, float]]] = {}
    for label in dict.fromkeys(labels):
        idx = torch.tensor([i for i, lab in enumerate(labels) if lab == label], device=columns["lambda_min"].device)
        entry: dict[str, float | int | dict[str, float]] = {"n": int(idx.shape[0])}
        for name, col in columns.items():
            q = torch.quantile(col[idx], torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=col.device))
            entry[name] = {"q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}
        out[label] = entry
    return out
