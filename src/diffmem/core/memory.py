"""Dense associative memory with log-sum-exp energy (SCIENCE.md §3).

    E(x; beta) = -(1/beta) log sum_mu exp(-(beta/2) ||x - xi_mu||^2)
    w_mu(x)    = softmax_mu(-(beta/2) ||x - xi_mu||^2)
    m(x)       = sum_mu w_mu(x) xi_mu                 (retrieval map)
    grad E     = x - m(x)
    H(x)       = I - beta C(x),  C = sum_mu w_mu (xi_mu - m)(xi_mu - m)^T

Every quantity is streamed over the patterns in chunks with an online log-sum-exp (the
FlashAttention recurrence), so memory is O(B x chunk + B x D) and no (B, K, D) tensor is ever
built. Squared distances use ||x||^2 - 2 x.xi + ||xi||^2; the ||x||^2 term is constant over mu,
so it is dropped from the softmax and added back in the energy.

Precision: in float32 a logit carries an absolute error of about beta * 6e-8 * ||x|| ||xi||.
Use float64 when sigma is small compared with the data scale and patterns nearly tie.

Out of core: the patterns may also be a PatternSource, any object that hands them out block by block
(diffmem.io.patterns.PatternStore reads memory-mapped shards). Every method then reads the blocks in
order, one pass per streamed quantity, and moves each block to the device of the states; nothing of
size K is kept. A tensor keeps its in-memory path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from diffmem.core._checks import (
    FLOAT_DTYPES,
    as_level,
    check_finite_float,
    check_patterns,
    check_positive_int,
    check_state,
)
from diffmem.core.dynamics import iterate_map
from diffmem.core.random import randn

DEFAULT_CHUNK = 4096  # patterns per streamed block: (B, 4096) logits are small, matmuls stay large (`diffmem bench`)
_OUTER_LIMIT = 2**25  # largest K * D^2 for which covariances use the table of outer products
RETRIEVAL_METHODS = ("fixed_point", "gradient", "langevin")
READ_ELEMENTS = 2**22  # values read from a PatternSource at a time (16 MiB of float32): per-read work is amortised
READ_CHUNKS = 8  # at most this many chunks per read, so that a read stays O(chunk)


@runtime_checkable
class PatternSource(Protocol):
    """K patterns in R^D handed out block by block, for memories too large to hold as one tensor.

    chunks(chunk_size) yields (offset, block) in order: block (c, D) in `dtype` with 1 <= c <= chunk_size,
    offsets 0, c_0, c_0 + c_1, ..., the blocks covering the K rows exactly once. A block may sit on any
    device (consumers move it to their queries' device) and may be a read-only view: never write into it.
    A source may also carry `event_shape`, the shape of one pattern (D values in all), e.g. (C, H, W).
    """

    @property
    def num_patterns(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, Tensor]]: ...


def is_pattern_source(obj: object) -> bool:
    """obj is a PatternSource and not a tensor (a tensor takes the in-memory path)."""
    return not isinstance(obj, Tensor) and isinstance(obj, PatternSource)


def check_source(source: PatternSource, name: str = "patterns") -> None:
    """A source declares K >= 1 patterns of dimension D >= 1 in float32 or float64."""
    k, d, dtype = source.num_patterns, source.dim, source.dtype
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} holds K = {k!r} patterns; a memory needs at least one")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"{name} has dimension D = {d!r}; it must be a positive integer")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} hands out {dtype} blocks; read them as torch.float32 or torch.float64")


def read_rows(chunk_size: int, dim: int) -> int:
    """Rows read from a source at a time for chunks of chunk_size rows: a whole number of chunks, at most
    READ_CHUNKS and about READ_ELEMENTS values (a single chunk when one chunk is larger)."""
    return chunk_size * max(1, min(READ_CHUNKS, READ_ELEMENTS // (chunk_size * dim)))


def source_blocks(source: PatternSource, chunk_size: int, device: torch.device) -> Iterator[tuple[int, Tensor]]:
    """The (offset, (c, D) block) pairs of source.chunks(chunk_size), checked and moved to device.

    A block of the wrong shape or dtype, an offset out of order or a wrong total raise ValueError naming
    the source's mistake (finiteness is checked by the caller, from the norms it computes anyway)."""
    check_positive_int(chunk_size, "chunk_size")
    k, d, expected = source.num_patterns, source.dim, 0
    for start, block in source.chunks(chunk_size):
        if not isinstance(block, Tensor) or block.ndim != 2 or block.shape[1] != d or block.shape[0] < 1:
            got = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
            raise ValueError(f"the pattern source yielded a block {got} at offset {start}; blocks must be (c, {d})")
        if block.shape[0] > chunk_size or start != expected or start + block.shape[0] > k:
            raise ValueError(
                f"the pattern source yielded rows {start}..{start + block.shape[0] - 1} after {expected} rows "
                f"(chunk_size {chunk_size}, K = {k}); blocks must cover rows 0..K-1 in order, at most chunk_size each"
            )
        if block.dtype != source.dtype:
            raise ValueError(f"the pattern source declares {source.dtype} but yielded a {block.dtype} block")
        expected += block.shape[0]
        yield start, block.to(device)
    if expected != k:
        raise ValueError(f"the pattern source declares K = {k} patterns but yielded {expected}; is it complete?")


class TensorSource:
    """A tensor (K, *event_shape) read as a PatternSource, block by block: the protocol's reference
    implementation, and a way to run the out-of-core code paths on data that fits in memory."""

    def __init__(self, patterns: Tensor):
        if not isinstance(patterns, Tensor) or patterns.ndim < 2:
            shape = tuple(patterns.shape) if isinstance(patterns, Tensor) else type(patterns).__name__
            raise ValueError(f"patterns must have shape (K, *event_shape) with at least 2 dims, got {shape}")
        self.event_shape = tuple(patterns.shape[1:])
        self.patterns = patterns.reshape(patterns.shape[0], -1)  # (K, D)
        check_patterns(self.patterns)

    @property
    def num_patterns(self) -> int:
        return self.patterns.shape[0]

    @property
    def dim(self) -> int:
        return self.patterns.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.patterns.dtype

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, Tensor]]:
        check_positive_int(chunk_size, "chunk_size")
        for start in range(0, self.num_patterns, chunk_size):
            yield start, self.patterns[start : start + chunk_size]


def _check_source_state(x: Tensor, source: PatternSource, name: str) -> None:
    """A state x (..., D) in the source's dtype (any device: blocks follow x)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != source.dim:
        raise ValueError(f"{name} must have shape (..., {source.dim}), got shape {tuple(x.shape)}")
    if x.dtype != source.dtype:
        raise ValueError(
            f"{name} has dtype {x.dtype} but the pattern source hands out {source.dtype}; cast {name} or open the "
            "source in the other dtype (no silent casting)"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


class _Moments(NamedTuple):
    lse: Tensor  # (B,) log sum_mu exp(beta (x.xi_mu - ||xi_mu||^2 / 2))
    mean: Tensor  # (B, D) m(x)
    second: Tensor | None  # (B, D, D) sum_mu w_mu xi_mu xi_mu^T
    proj: Tensor | None  # (B, D) sum_mu w_mu (xi_mu . v) xi_mu
    top: Tensor  # (B,) the largest logit, beta (x.xi_mu - ||xi_mu||^2 / 2)


@dataclass(frozen=True)
class RetrievalResult:
    """End state of retrieval dynamics, one entry per start."""

    x: Tensor  # (..., D) final states
    n_iter: Tensor  # (...) iterations used (max_iter where not converged)
    converged: Tensor  # (...) bool: last update's RMS fell below tol
    residual: Tensor  # (...) RMS of grad E = x - m(x) at the final state, ||.|| / sqrt(D)
    energy: Tensor  # (...) E(x; beta) at the final state


class DenseAM:
    """A dense associative memory (modern Hopfield network) of K patterns in R^D.

    patterns: (K, D) float32 or float64, finite, or a PatternSource handing them out block by block
    (float32 or float64; read a few chunks at a time, see read_rows, and streamed chunk_size rows at
    a time). Every method takes states x of shape (..., D) in the patterns' dtype (and, for a tensor,
    its device: a source's blocks are moved to x's device), and beta as a positive float or a tensor
    broadcastable to the batch shape (...). Nothing here allocates on a default device or draws
    global randomness.
    """

    def __init__(self, patterns: Tensor | PatternSource, *, chunk_size: int = DEFAULT_CHUNK):
        self._outer: Tensor | None = None  # (K, D^2) outer products, built on first use when small
        if is_pattern_source(patterns):
            check_source(patterns)
            self.source: PatternSource | None = patterns
            self._patterns: Tensor | None = None
            self._half_sq: Tensor | None = None  # computed per block as the blocks are read
            self.chunk_size = check_positive_int(chunk_size, "chunk_size")
            return
        check_patterns(patterns)
        self.source = None
        self._patterns = patterns  # (K, D)
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        self._half_sq = 0.5 * torch.linalg.vector_norm(patterns, dim=-1) ** 2  # (K,) ||xi||^2 / 2, no (K, D) temporary

    @property
    def patterns(self) -> Tensor:
        """(K, D), for a memory built from a tensor (a memory over a PatternSource holds no such tensor)."""
        if self._patterns is None:
            raise ValueError(
                "this memory streams its patterns from a PatternSource and holds no (K, D) tensor; "
                "read them block by block with memory.source.chunks(chunk_size)"
            )
        return self._patterns

    @property
    def num_patterns(self) -> int:
        return self.source.num_patterns if self.source is not None else self._patterns.shape[0]

    @property
    def dim(self) -> int:
        return self.source.dim if self.source is not None else self._patterns.shape[1]

    # -- plumbing -------------------------------------------------------------------------------

    def _check_x(self, x: Tensor, name: str = "x") -> None:
        if self.source is None:
            check_state(x, self._patterns, self.dim, name=name)
        else:
            _check_source_state(x, self.source, name)

    def _blocks(self, like: Tensor) -> Iterator[tuple[int, Tensor, Tensor]]:
        """(start, xi (c, D), ||xi||^2 / 2 (c,)) for each block of patterns, on like's device."""
        if self.source is None:
            for start in range(0, self.num_patterns, self.chunk_size):
                yield (
                    start,
                    self._patterns[start : start + self.chunk_size],
                    self._half_sq[start : start + self.chunk_size],
                )
            return
        # read several chunks at a time (fewer small operations per pattern), then hand them out chunk by chunk
        for start, block in source_blocks(self.source, read_rows(self.chunk_size, self.dim), like.device):
            half_sq = 0.5 * torch.linalg.vector_norm(block, dim=-1) ** 2  # (r,)
            if not bool(torch.isfinite(half_sq).all()):
                raise ValueError(
                    f"patterns {start}..{start + block.shape[0] - 1} of the source contain NaN or Inf values; "
                    "clean the data before building a memory"
                )
            for a in range(0, block.shape[0], self.chunk_size):
                yield start + a, block[a : a + self.chunk_size], half_sq[a : a + self.chunk_size]

    def _prepare(self, x: Tensor, beta: float | Tensor) -> tuple[Tensor, Tensor, torch.Size]:
        self._check_x(x)
        batch_shape = x.shape[:-1]
        b = as_level(beta, x if self._patterns is None else self._patterns, "beta", allow_zero=False)
        try:
            b = torch.broadcast_to(b, batch_shape)
        except RuntimeError:
            raise ValueError(
                f"beta of shape {tuple(b.shape)} does not broadcast to the batch shape {tuple(batch_shape)}"
            ) from None
        return x.reshape(-1, self.dim), b.reshape(-1), batch_shape

    def _moments(self, x: Tensor, beta: Tensor, *, second: bool = False, v: Tensor | None = None) -> _Moments:
        """One streamed pass over the patterns for a flat batch x (B, D), beta (B,)."""
        B, D = x.shape
        run_max = x.new_full((B,), -math.inf)
        run_sum = x.new_zeros(B)
        acc = x.new_zeros(B, D)
        acc2 = x.new_zeros(B, D, D) if second else None
        accv = x.new_zeros(B, D) if v is not None else None
        xb = x * beta[:, None]
        beta_col = beta[:, None]
        # in-place elementwise work on the (B, c) block when autograd does not need the graph
        patterns_grad = self._patterns is not None and self._patterns.requires_grad
        inplace = not (torch.is_grad_enabled() and (x.requires_grad or beta.requires_grad or patterns_grad))
        for _, xi, half_sq in self._blocks(x):  # xi (c, D), half_sq (c,)
            logits = xb @ xi.T  # (B, c): beta x.xi
            if inplace:
                logits.addcmul_(beta_col, half_sq, value=-1)  # beta (x.xi - ||xi||^2 / 2)
            else:
                logits = logits - beta_col * half_sq
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            scale = torch.exp(run_max - new_max)  # (B,) rescales what was accumulated so far
            p = logits.sub_(new_max[:, None]).exp_() if inplace else torch.exp(logits - new_max[:, None])  # (B, c)
            run_sum = run_sum * scale + p.sum(dim=1)
            acc = acc * scale[:, None] + p @ xi
            if acc2 is not None:
                acc2 = acc2 * scale[:, None, None] + torch.einsum("bk,kd,ke->bde", p, xi, xi)
            if accv is not None:
                accv = accv * scale[:, None] + (p * (v @ xi.T)) @ xi
            run_max = new_max
        inv = 1 / run_sum
        return _Moments(
            lse=run_max + torch.log(run_sum),
            mean=acc * inv[:, None],
            second=None if acc2 is None else acc2 * inv[:, None, None],
            proj=None if accv is None else accv * inv[:, None],
            top=run_max,
        )

    # -- the memory ------------------------------------------------------------------------------

    def energy(self, x: Tensor, beta: float | Tensor) -> Tensor:
        """E(x; beta), shape (...)."""
        xf, b, shape = self._prepare(x, beta)
        mom = self._moments(xf, b)
        return (0.5 * (xf * xf).sum(-1) - mom.lse / b).reshape(shape)

    def weights(self, x: Tensor, beta: float | Tensor) -> Tensor:
        """Softmax weights w_mu(x), shape (..., K). Builds (B, K): use retrieve() for huge K."""
        xf, b, shape = self._prepare(x, beta)
        if self.source is None:
            logits = b[:, None] * (xf @ self.patterns.T - self._half_sq)
        else:
            logits = b[:, None] * torch.cat([xf @ xi.T - hs for _, xi, hs in self._blocks(xf)], dim=1)  # (B, K)
        return torch.softmax(logits, dim=-1).reshape(*shape, self.num_patterns)

    def retrieve(self, x: Tensor, beta: float | Tensor) -> Tensor:
        """Retrieval map m(x) = sum_mu w_mu(x) xi_mu, shape (..., D)."""
        xf, b, shape = self._prepare(x, beta)
        return self._moments(xf, b).mean.reshape(*shape, self.dim)

    def energy_and_retrieve(self, x: Tensor, beta: float | Tensor) -> tuple[Tensor, Tensor]:
        """(E(x), m(x)) from a single pass over the patterns."""
        xf, b, shape = self._prepare(x, beta)
        mom = self._moments(xf, b)
        e = 0.5 * (xf * xf).sum(-1) - mom.lse / b
        return e.reshape(shape), mom.mean.reshape(*shape, self.dim)

    def grad(self, x: Tensor, beta: float | Tensor) -> Tensor:
        """grad E(x) = x - m(x), shape (..., D)."""
        return x - self.retrieve(x, beta)

    def covariance(self, x: Tensor, beta: float | Tensor, *, weight_floor: float = 1e-14) -> Tensor:
        """C(x) = sum_mu w_mu (xi_mu - m)(xi_mu - m)^T, shape (..., D, D).

        Small problems (K D^2 <= 2^25) take one GEMM against a cached table of outer products.
        Otherwise patterns whose weight is below weight_floor times the largest are left out (in
        float64 they change C by less than that relative amount), so near attractors, where the
        weights concentrate on a few patterns, the cost is O(B K D + B K' D^2) with K' << K.
        Over a PatternSource: two passes, the same pruning (see _streamed_covariance).
        """
        xf, b, shape = self._prepare(x, beta)
        if self.source is not None:
            return self._streamed_covariance(xf, b, weight_floor).reshape(*shape, self.dim, self.dim)
        k, d = self.num_patterns, self.dim
        if k * d * d <= _OUTER_LIMIT:
            # one GEMM against the K x D^2 table of outer products xi xi^T (built once, small D)
            if self._outer is None:
                self._outer = (self.patterns[:, :, None] * self.patterns[:, None, :]).reshape(k, d * d)
            w = self.weights(xf, b)  # (B, K)
            mean = w @ self.patterns  # (B, D), from the same weights: one pass over the patterns
            second = (w @ self._outer).reshape(-1, d, d)
            cov = second - mean[:, :, None] * mean[:, None, :]
            return cov.reshape(*shape, d, d)
        out = xf.new_empty(xf.shape[0], d, d)
        rows = max(1, 2**24 // max(1, k * d))  # bound the gathered (rows, K', D) block
        for start in range(0, xf.shape[0], rows):
            xb, bb = xf[start : start + rows], b[start : start + rows]
            w = torch.softmax(bb[:, None] * (xb @ self.patterns.T - self._half_sq), dim=1)  # (r, K)
            keep = int((w > weight_floor * w.amax(dim=1, keepdim=True)).sum(dim=1).max())
            wk, idx = w.topk(keep, dim=1)  # (r, K')
            wk = wk / wk.sum(dim=1, keepdim=True)
            xi = self.patterns[idx]  # (r, K', D)
            centred = xi - torch.einsum("rk,rkd->rd", wk, xi)[:, None, :]
            out[start : start + rows] = (centred * wk[..., None]).transpose(1, 2) @ centred
        return out.reshape(*shape, self.dim, self.dim)

    def _streamed_covariance(self, x: Tensor, beta: Tensor, weight_floor: float) -> Tensor:
        """C(x) (B, D, D) for patterns read block by block. Pass 1 gives log Z, the largest logit and m(x);
        pass 2 sums w_mu (xi_mu - m)(xi_mu - m)^T, centred on m (no cancellation of large second moments),
        over the patterns whose weight exceeds weight_floor times the row's largest (as the in-memory path),
        normalised by the kept weight. The centred (r, c', D) block is bounded by splitting the rows."""
        mom = self._moments(x, beta)
        n, d = x.shape
        floor = mom.top + (math.log(weight_floor) if weight_floor > 0 else -math.inf)  # (B,) logit threshold
        out = x.new_zeros(n, d, d)
        kept = x.new_zeros(n)
        xb = x * beta[:, None]
        for _, xi, half_sq in self._blocks(x):
            logits = xb @ xi.T - beta[:, None] * half_sq  # (B, c), the same logits as _moments
            keep = logits > floor[:, None]
            cols = keep.any(dim=0).nonzero().squeeze(1)
            if not len(cols):
                continue
            w = torch.where(keep[:, cols], torch.exp(logits[:, cols] - mom.lse[:, None]), 0.0)  # (B, c')
            xk = xi[cols]  # (c', D)
            kept = kept + w.sum(dim=1)
            rows = max(1, 2**22 // (len(cols) * d))
            for r0 in range(0, n, rows):
                centred = xk[None] - mom.mean[r0 : r0 + rows, None, :]  # (r, c', D)
                out[r0 : r0 + rows] += (centred * w[r0 : r0 + rows, :, None]).transpose(1, 2) @ centred
        return out / kept[:, None, None]

    def hessian(self, x: Tensor, beta: float | Tensor) -> Tensor:
        """H(x) = I - beta C(x), shape (..., D, D)."""
        _, b, shape = self._prepare(x, beta)
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        return eye - b.reshape(*shape, 1, 1) * self.covariance(x, beta)

    def hvp(self, x: Tensor, v: Tensor, beta: float | Tensor) -> Tensor:
        """Hessian-vector product H(x) v = v - beta (sum_mu w_mu (xi_mu.v) xi_mu - m (m.v)).

        v: (..., D) matching x, or (D,) shared by the whole batch. Never builds a D x D matrix.
        """
        xf, b, shape = self._prepare(x, beta)
        self._check_x(v, name="v")
        vf = torch.broadcast_to(v, x.shape).reshape(-1, self.dim)
        mom = self._moments(xf, b, v=vf)
        cv = mom.proj - mom.mean * (mom.mean * vf).sum(-1, keepdim=True)
        return (vf - b[:, None] * cv).reshape(*shape, self.dim)

    def covariance_eigenvalue_range(
        self, x: Tensor, beta: float | Tensor, *, weight_floor: float = 1e-12
    ) -> tuple[Tensor, Tensor]:
        """(lambda_min, lambda_max) of C(x), each of shape (...).

        C has rank < K, so the eigenproblem is solved on the smaller of the D x D covariance and
        the K' x K' weighted Gram matrix of the K' patterns whose weight exceeds weight_floor times
        the largest (the rest change the eigenvalues by less than that relative amount); when
        K' < D, lambda_min is exactly 0. Over a PatternSource, the D x D covariance is always solved.
        """
        xf, b, shape = self._prepare(x, beta)
        if self.dim <= 256 or self.source is not None:  # batched dense eigensolve of the (pruned) covariance
            eig = torch.linalg.eigvalsh(self.covariance(xf, b, weight_floor=weight_floor)).clamp_min(0)
            return eig[:, 0].reshape(shape), eig[:, -1].reshape(shape)
        lo, hi = xf.new_empty(xf.shape[0]), xf.new_empty(xf.shape[0])
        for i in range(xf.shape[0]):
            logits = b[i] * (self.patterns @ xf[i] - self._half_sq)  # (K,)
            w = torch.softmax(logits, dim=0)
            keep = w > weight_floor * w.max()
            wk = w[keep] / w[keep].sum()
            centred = self.patterns[keep] - wk @ self.patterns[keep]  # (K', D)
            scaled = centred * wk.sqrt()[:, None]
            small = scaled.shape[0] < self.dim
            eig = torch.linalg.eigvalsh(scaled @ scaled.T if small else scaled.T @ scaled).clamp_min(0)
            lo[i] = 0.0 if small else eig[0]
            hi[i] = eig[-1]
        return lo.reshape(shape), hi.reshape(shape)

    def covariance_top_eigenvalue(self, x: Tensor, beta: float | Tensor, *, weight_floor: float = 1e-12) -> Tensor:
        """lambda_max(C(x)), shape (...). A fixed point is a stable minimum iff beta * lambda_max < 1."""
        return self.covariance_eigenvalue_range(x, beta, weight_floor=weight_floor)[1]

    def is_stable(self, x: Tensor, beta: float | Tensor) -> Tensor:
        """beta * lambda_max(C(x)) < 1: the Hessian is positive definite (a local minimum), shape (...)."""
        _, b, shape = self._prepare(x, beta)
        return b.reshape(shape) * self.covariance_top_eigenvalue(x, beta) < 1

    def nearest(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Index (...) of the nearest pattern and its distance (...) by a chunked search."""
        if self.source is not None:
            idx, rows = self.nearest_pattern(x)
            return idx, (x - rows).norm(dim=-1)
        check_state(x, self.patterns, self.dim)
        xf = x.reshape(-1, self.dim)
        best = xf.new_full((xf.shape[0],), -math.inf)
        idx = torch.zeros(xf.shape[0], dtype=torch.int64, device=x.device)
        for start in range(0, self.num_patterns, self.chunk_size):
            score = (
                xf @ self.patterns[start : start + self.chunk_size].T - self._half_sq[start : start + self.chunk_size]
            )  # (B, c): -||x - xi||^2 / 2 + ||x||^2 / 2
            val, arg = score.max(dim=1)
            better = val > best
            best = torch.where(better, val, best)
            idx = torch.where(better, arg + start, idx)
        dist = (xf - self.patterns[idx]).norm(dim=-1)
        return idx.reshape(x.shape[:-1]), dist.reshape(x.shape[:-1])

    def nearest_pattern(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Index (...) of the nearest pattern and the pattern itself (..., D), from one pass (ties: lowest index)."""
        if self.source is None:
            idx, _ = self.nearest(x)
            return idx, self.patterns[idx]
        self._check_x(x)
        xf = x.reshape(-1, self.dim)
        best = xf.new_full((xf.shape[0],), -math.inf)
        idx = torch.zeros(xf.shape[0], dtype=torch.int64, device=x.device)
        rows = torch.zeros_like(xf)  # (B, D) the nearest pattern so far
        for start, xi, half_sq in self._blocks(xf):
            val, arg = (xf @ xi.T - half_sq).max(dim=1)  # as nearest(): -||x - xi||^2 / 2 + ||x||^2 / 2
            better = val > best
            best = torch.where(better, val, best)
            idx = torch.where(better, arg + start, idx)
            rows = torch.where(better[:, None], xi[arg], rows)
        return idx.reshape(x.shape[:-1]), rows.reshape(x.shape)

    # -- dynamics --------------------------------------------------------------------------------

    def run(
        self,
        x: Tensor,
        beta: float | Tensor,
        *,
        method: str = "fixed_point",
        tol: float = 1e-6,
        max_iter: int = 1000,
        step_size: float = 0.5,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> RetrievalResult:
        """Retrieval dynamics from starts x (..., D).

        method:
          'fixed_point'  x <- m(x): the concave-convex procedure, E never increases.
          'gradient'     x <- x - step_size * grad E  (step_size in (0, 1]; 1 is 'fixed_point').
          'langevin'     x <- x - step_size * grad E + sqrt(2 step_size temperature) z, sampling
                         exp(-E / temperature); runs exactly max_iter steps, needs a generator,
                         and reports converged = False (a chain has no end point).
        tol: a start has converged when the RMS (||.|| / sqrt(D)) of its last update is <= tol;
        converged starts are frozen while the others continue.
        """
        if method not in RETRIEVAL_METHODS:
            raise ValueError(f"unknown retrieval method {method!r}; choose one of {RETRIEVAL_METHODS}")
        max_iter = check_positive_int(max_iter, "max_iter")
        eta = 1.0 if method == "fixed_point" else check_finite_float(step_size, "step_size")
        if not 0 < eta <= 1 and method == "gradient":
            raise ValueError(f"step_size must lie in (0, 1] for gradient descent, got {step_size}")
        if method == "langevin":
            if generator is None:
                raise ValueError("langevin dynamics draws noise: pass a torch.Generator")
            if temperature is None:
                raise ValueError("langevin dynamics needs a temperature (1 / beta samples p_sigma)")
            temperature = check_finite_float(temperature, "temperature", low=0.0)
            if eta <= 0:
                raise ValueError(f"step_size must be > 0, got {step_size}")

        xf, b, shape = self._prepare(x, beta)
        if method == "langevin":
            n_iter = torch.full((xf.shape[0],), max_iter, dtype=torch.int64, device=x.device)
            converged = torch.zeros(xf.shape[0], dtype=torch.bool, device=x.device)
            for _ in range(max_iter):
                noise = randn(xf.shape, generator, xf)
                xf = xf + eta * (self._moments(xf, b).mean - xf) + math.sqrt(2 * eta * temperature) * noise
        else:
            fp = iterate_map(
                lambda xa, idx: xa + eta * (self._moments(xa, b[idx]).mean - xa), xf, tol=tol, max_iter=max_iter
            )
            xf, n_iter, converged = fp.x, fp.n_iter, fp.converged
        root_d = math.sqrt(self.dim)
        mom = self._moments(xf, b)
        energy = 0.5 * (xf * xf).sum(-1) - mom.lse / b
        residual = (xf - mom.mean).norm(dim=-1) / root_d
        return RetrievalResult(
            x=xf.reshape(*shape, self.dim),
            n_iter=n_iter.reshape(shape),
            converged=converged.reshape(shape),
            residual=residual.reshape(shape),
            energy=energy.reshape(shape),
        )
