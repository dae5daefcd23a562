"""Exact k-nearest-neighbour search in Euclidean distance (SCIENCE.md §5).

The phase classifier needs, for every generated sample, its distance to the nearest training example
and to the nearest *other* sample. Both are k-NN queries over tens of thousands of images, so the
search has to run at matrix-product speed and still return what a float64 brute force returns.

Two passes:

1. float32 search. Blocks of scores come from one matrix product each (memory O(query_chunk x
   ref_chunk), never N x M), and a running top-c per query (c = k + margin) is kept across blocks.
2. float64 re-check. The candidates that can still reach the top k get float64 distances computed
   from differences, sqrt(sum_i (q_i - r_i)^2) (no cancellation), and are re-ranked.

Why the result is exact. With d(r) = ||q - r||^2, n_q = ||q||^2, n_r = ||r||^2, every float32
product entry is within e (n_q + n_r) + b of its exact value, where

    e = gamma_{D+2} ((1 + u) + (1 + u_in)^2) + 2 u_in + u_in^2 + 1.01 u,   gamma_n = n u / (1 - n u)

holds for any summation order of the dot product (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., §3.1), u = 2^-24, u_in is the rounding of the inputs on their way into the
product (the float64 -> float32 cast, TF32 or bf16 when torch enables them), and b = (D + 16) 2^-118
covers underflow, flush-to-zero included (the code adds the error of the squared norms, summed in
float64). The ranked score of ref r is

    s(r) = (1 - a) n_r - 2 q.r,   a = e + (float64 slack),

so that d(r) >= n_q (1 - a) + s(r) - b: the n_r terms cancel and one number per query certifies the
search. Every ref outside the candidates has s >= s_c (the largest candidate score), so if
n_q (1 - a) + s_c - b exceeds the k-th float64 distance among the candidates, no outside ref can
enter the top k. Rows that fail (near-ties wider than the margin, many duplicates, large norms with
small differences) are scanned again, collecting every ref whose lower bound does not exceed their
k-th distance, and those are re-checked in float64.

Ties: refs at equal float64 distance are listed in increasing index. Distances equal a float64
brute force up to the rounding of that brute force itself (the summation order may differ).

Out of core: refs may be a PatternSource (diffmem.core.memory), read a few ref chunks at a time. The
loops swap (reads outside, query rows inside) so the source is read once; while a read is in memory,
the float64 distances of its refs that entered the running top c are computed from the stored values,
so the running top c carries (score, index, exact distance) and the re-check needs no second pass. The certificate
is the same; rows that fail it take one more pass (the re-scan), with the same threshold. The result
equals the in-memory search bit for bit. shard_knn and merge_shards split a search over disjoint
shards (e.g. across workers) and merge on squared float64 distances, ties by index, which is
exactly the single search's order (merging on sqrt would tie distances that sqrt rounds together).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem.core._checks import FLOAT_DTYPES, check_positive_int
from diffmem.core.memory import PatternSource, check_source, is_pattern_source, read_rows, source_blocks

MARGIN = 8  # extra candidates per query: gaps between the k-th and (k+8)-th neighbour dwarf the float32 error
_RECHECK_ELEMENTS = 2**20  # elements per step of the norms and the re-check: few parallel regions, 8 MB buffers
_F64_SLACK = 2.0**-40  # relative slack for the few float64 operations of the certificate


@dataclass(frozen=True)
class Neighbours:
    """The k nearest refs of each query, nearest first (equal distances in increasing index)."""

    distances: Tensor  # (N, k) float64 Euclidean distances ||q - r||, not squared, not divided by sqrt(D)
    indices: Tensor  # (N, k) int64 row indices into refs


@dataclass(frozen=True)
class ShardNeighbours:
    """The exact nearest refs of one shard of a larger set, kept squared for an exact merge (merge_shards)."""

    squared: Tensor  # (N, k') float64 squared distances ||q - r||^2, nearest first (equal ones in increasing index)
    indices: Tensor  # (N, k') int64 row indices into the whole set (the shard's offset added)

    def neighbours(self) -> Neighbours:
        """As knn returns them: Euclidean distances (not squared)."""
        return Neighbours(self.squared.sqrt(), self.indices)


@torch.no_grad()
def knn(
    queries: Tensor,
    refs: Tensor | PatternSource,
    k: int = 1,
    *,
    exclude_self: bool = False,
    query_chunk: int = 4096,
    ref_chunk: int = 16384,
) -> Neighbours:
    """Exact k nearest neighbours of each query among refs, in Euclidean distance.

    queries (N, D) or (N, *event), refs (M, D) or (M, *event), float32 or float64 (both the same).
    refs may also be a PatternSource of M patterns of dimension D in the queries' dtype, read in one pass,
    a few ref_chunk blocks at a time (diffmem.core.memory.read_rows), moved to the queries' device.
    exclude_self: queries and refs are the same set (N == M) and row i never returns index i; the
    exclusion is by index, so duplicates of row i at other indices are legitimate neighbours.
    query_chunk x ref_chunk bounds the float32 score block (256 MB by default: large products run near peak).
    The result equals a float64 brute force; see the module docstring for why. The search is not
    differentiable: recompute distances from the indices where gradients are needed.
    """
    d2, idx = _search(queries, refs, k, exclude_self, query_chunk, ref_chunk)
    return Neighbours(d2.sqrt(), idx)


@torch.no_grad()
def shard_knn(
    queries: Tensor,
    refs: Tensor | PatternSource,
    k: int,
    *,
    offset: int = 0,
    query_chunk: int = 4096,
    ref_chunk: int = 16384,
) -> ShardNeighbours:
    """The exact min(k, M) nearest of one shard's M refs (a tensor or a PatternSource) whose first row is
    row `offset` of the whole set, as squared distances and whole-set indices for merge_shards."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(
            f"offset must be a non-negative integer (the shard's first row in the whole set), got {offset!r}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if is_pattern_source(refs):
        check_source(refs, "refs")
        m = refs.num_patterns
    else:
        m = refs.shape[0] if isinstance(refs, Tensor) and refs.ndim >= 2 else k  # anything else: _search says why
    d2, idx = _search(queries, refs, min(k, max(m, 1)), False, query_chunk, ref_chunk)
    return ShardNeighbours(d2, idx + offset)


def merge_shards(parts: Sequence[ShardNeighbours], k: int) -> ShardNeighbours:
    """The exact k nearest over disjoint shards from each shard's exact nearest (shard_knn, or an earlier merge):
    ranked by squared float64 distance, ties in increasing index, which is the order of one search over all
    shards. merge_shards(parts, k).neighbours() equals knn(queries, all refs, k)."""
    parts = list(parts)
    if not parts or not all(isinstance(p, ShardNeighbours) for p in parts):
        raise ValueError("merge_shards needs a non-empty list of ShardNeighbours (one per shard, from shard_knn)")
    if len({p.squared.shape[0] for p in parts}) != 1:
        raise ValueError(f"the shards answer different numbers of queries: {[p.squared.shape[0] for p in parts]}")
    d2 = torch.cat([p.squared for p in parts], dim=1)  # (N, sum k')
    idx = torch.cat([p.indices for p in parts], dim=1)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d2.shape[1]:
        raise ValueError(f"k must be an integer in [1, {d2.shape[1]}] (the neighbours the shards hold), got {k!r}")
    order = idx.sort(dim=1).values
    if bool((order[:, 1:] == order[:, :-1]).any()):
        raise ValueError("two shards returned the same ref index: the shards overlap (check their offsets)")
    return ShardNeighbours(*_rank(d2, idx, k))


def _search(
    queries: Tensor, refs: Tensor | PatternSource, k: int, exclude_self: bool, query_chunk: int, ref_chunk: int
) -> tuple[Tensor, Tensor]:
    """Exact squared distances (N, k) float64 and indices (N, k) of the k nearest refs of each query."""
    check_positive_int(query_chunk, "query_chunk")
    check_positive_int(ref_chunk, "ref_chunk")
    if is_pattern_source(refs):
        return _search_source(queries, refs, k, exclude_self, query_chunk, ref_chunk)
    q, r, nq, nr = _validated(queries, refs, k, exclude_self)
    n, m = q.shape[0], r.shape[0]
    if n == 0:
        return _empty(q, k)

    bound = _ErrorBound.for_search(q, r, nq, nr)
    qs, rs = q.to(bound.dtype), r.to(bound.dtype)
    cr = ((1 - bound.a) * nr).to(bound.dtype)  # (M,) the n_r term of the score s(r)
    c = min(k + max(MARGIN, k // 4), m - exclude_self)
    buf = torch.empty(min(query_chunk, n) * min(ref_chunk, m), dtype=bound.dtype, device=q.device)
    dist, idx = [], []
    for i0 in range(0, n, query_chunk):
        rows = torch.arange(i0, min(i0 + query_chunk, n), device=q.device)
        d2, j = _search_rows(q, r, qs, rs, cr, nq, rows, k, c, exclude_self, ref_chunk, buf, bound)
        dist.append(d2)
        idx.append(j)
    return torch.cat(dist), torch.cat(idx)


def _empty(q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return (
        torch.zeros(0, k, dtype=torch.float64, device=q.device),
        torch.zeros(0, k, dtype=torch.int64, device=q.device),
    )


@dataclass(frozen=True)
class _ErrorBound:
    """|computed score - ((1 - a) n_r - 2 q.r)| <= e (n_q + n_r) + b, with a >= e + float64 slack."""

    dtype: torch.dtype  # precision of the search pass
    a: float
    b: float

    @staticmethod
    def for_search(q: Tensor, r: Tensor, nq: Tensor, nr: Tensor) -> _ErrorBound:
        largest = float(nq.max()) + float(nr.max())
        for bound in _ErrorBound.options(q.shape[1], q.dtype):
            if bound.fits(largest):
                return bound
        raise ValueError(_too_large(largest, q.shape[1]))

    def fits(self, largest: float) -> bool:
        """No score block entry can overflow when n_q + n_r <= largest."""
        return 8 * largest < torch.finfo(self.dtype).max

    @staticmethod
    def options(d: int, source: torch.dtype) -> list[_ErrorBound]:
        """The bounds that certify a search of dimension d on `source` data, cheapest search precision first."""
        u64 = 2.0**-53
        gamma64 = (d + 4) * u64 / (1 - (d + 4) * u64)
        # n_q, n_r: squares rounded in the input precision (all positive: relative error <= u_x), summed in float64
        norm = 1.01 * torch.finfo(source).eps / 2 + gamma64
        # float64 re-check distances are within gamma64 d(r) <= 2 gamma64 (n_q + n_r) of exact; n_q in the
        # certificate is off by `norm`; 2^-100: flushed subnormal inputs
        slack = norm + 2 * gamma64 + 2.0**-100
        out = []
        for dtype in (torch.float32, torch.float64):
            u = torch.finfo(dtype).eps / 2
            u_in = _input_roundoff(source, dtype)
            if d + 2 >= 1 / (8 * u):
                continue
            gamma = (d + 2) * u / (1 - (d + 2) * u)
            # the dot product and the n_r term in the score, each rounded (1.01 u), and n_r's own error (norm)
            e = gamma * ((1 + u) + (1 + u_in) ** 2) + 2 * u_in + u_in**2 + 1.01 * u + norm
            if e + slack < 0.125:
                tiny = max(torch.finfo(dtype).tiny, torch.finfo(source).tiny)
                out.append(_ErrorBound(dtype, e + slack, (d + 16) * 256 * tiny))
        return out


def _too_large(largest: float, d: int) -> str:
    return f"squared norms up to {largest:.3g} in dimension {d} are too large for an exact search; rescale the data"


def _input_roundoff(source: torch.dtype, search: torch.dtype) -> float:
    """Relative rounding of the inputs before they meet in the matrix product."""
    if search == torch.float64:
        return 0.0  # float32 -> float64 is exact, float64 matmuls are never reduced
    cast = 2.0**-24 if source == torch.float64 else 0.0
    # torch may run float32 matmuls in TF32 (10-bit mantissa) or bf16 (7-bit) when asked to
    # (every backend's setting counts, whatever the device: the bound may only be too wide, never too narrow)
    modes = {torch.get_float32_matmul_precision()}
    for obj in (torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul):
        modes.add(str(getattr(obj, "fp32_precision", "none")))
    mm = 2.0**-8 if modes & {"medium", "bf16"} else 2.0**-11 if modes & {"high", "tf32"} else 0.0
    return cast + mm + cast * mm


def _validated(queries: Tensor, refs: Tensor, k: int, exclude_self: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check the inputs of a k-NN search; return (N, D) and (M, D) views and their float64 squared norms."""
    q, r = _as_matrices(queries, refs)
    _check_k(k, q.shape[0], r.shape[0], exclude_self)
    return q, r, _squared_norms(q, "queries"), _squared_norms(r, "refs")


def _check_k(k: int, n: int, m: int, exclude_self: bool) -> None:
    if not isinstance(exclude_self, bool):
        raise ValueError(f"exclude_self must be True or False, got {exclude_self!r}")
    if exclude_self and n != m:
        raise ValueError(
            f"exclude_self=True needs queries and refs to be the same set, got {n} queries and {m} refs; "
            "pass the same tensor twice or use exclude_self=False"
        )
    available = m - 1 if exclude_self else m
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        what = f"the {m} refs minus the query itself" if exclude_self else f"the {m} refs"
        raise ValueError(f"k must be an integer in [1, {available}] ({what}), got {k!r}")


def _as_matrices(queries: Tensor, refs: Tensor) -> tuple[Tensor, Tensor]:
    """Validate and flatten to (N, D) and (M, D) views."""
    for name, x in (("queries", queries), ("refs", refs)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (N, D) or (N, *event), got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"{name} must have shape (N, D) or (N, *event), got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
    d_q, d_r = math.prod(queries.shape[1:]), math.prod(refs.shape[1:])
    if d_q != d_r:
        raise ValueError(
            f"queries of shape {tuple(queries.shape)} (D = {d_q}) and refs of shape {tuple(refs.shape)} (D = {d_r}) "
            "must have the same dimension D after flattening"
        )
    if d_q == 0:
        raise ValueError("the dimension D is 0: there is no distance to compute")
    if queries.dtype != refs.dtype:
        raise ValueError(f"queries are {queries.dtype} but refs are {refs.dtype}; cast one of them (no silent casting)")
    if queries.device != refs.device:
        raise ValueError(f"queries are on {queries.device} but refs on {refs.device}; move one of them")
    if refs.shape[0] == 0:
        raise ValueError("refs is empty (M = 0): there is nothing to search")
    return queries.reshape(queries.shape[0], d_q), refs.reshape(refs.shape[0], d_r)


def _squared_norms(x: Tensor, name: str) -> Tensor:
    """||x_i||^2, (N,) float64: squares in x's precision, summed in float64, in row blocks (no float64 copy)."""
    parts = [(b * b).sum(1, dtype=torch.float64) for b in x.split(max(1, _RECHECK_ELEMENTS // x.shape[1]))]
    out = torch.cat(parts) if parts else x.new_zeros(0, dtype=torch.float64)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} contain NaN or Inf values (or values whose squares overflow)")
    return out


def _scores(qb: Tensor, rb: Tensor, crb: Tensor, buf: Tensor) -> Tensor:
    """s = (1 - a) n_r - 2 q.r for a block, written into the shared buffer. (B, W)"""
    out = buf[: qb.shape[0] * rb.shape[0]].view(qb.shape[0], rb.shape[0])
    return torch.addmm(crb, qb, rb.T, alpha=-2, out=out)


def _self_pairs(rows: Tensor, j0: int, j1: int) -> tuple[Tensor, Tensor]:
    """(position in rows, column in block [j0, j1)) of the entries where a query meets itself."""
    pos = ((rows >= j0) & (rows < j1)).nonzero().squeeze(1)
    return pos, rows[pos] - j0


def _scan(
    qb: Tensor, rows: Tensor, rs: Tensor, cr: Tensor, c: int, exclude_self: bool, ref_chunk: int, buf: Tensor
) -> tuple[Tensor, Tensor]:
    """The c refs with the smallest scores for each query of the block: scores (B, c), indices (B, c)."""
    best_s = best_i = None
    for j0 in range(0, rs.shape[0], ref_chunk):
        j1 = min(j0 + ref_chunk, rs.shape[0])
        s = _scores(qb, rs[j0:j1], cr[j0:j1], buf)  # (B, W)
        if exclude_self:
            s[_self_pairs(rows, j0, j1)] = math.inf
        v, j = s.topk(min(c, j1 - j0), dim=1, largest=False, sorted=False)
        j += j0
        if best_s is not None:
            v, j = torch.cat([best_s, v], dim=1), torch.cat([best_i, j], dim=1)
            if v.shape[1] > c:
                v, p = v.topk(c, dim=1, largest=False, sorted=False)
                j = j.gather(1, p)
        best_s, best_i = v, j
    return best_s, best_i


def _sq_dist_pairs(q: Tensor, r: Tensor, qi: Tensor, ri: Tensor) -> Tensor:
    """Float64 ||q_qi[p] - r_ri[p]||^2 from differences (no cancellation) for index pairs, (P,).

    Every sum runs serially over its row, so equal rows give bit-equal distances and ties stay ties.
    """
    step = max(1, _RECHECK_ELEMENTS // q.shape[1])
    out = []
    for p in range(0, len(qi), step):
        diff = q[qi[p : p + step]].double() - r[ri[p : p + step]].double()  # (P, D)
        if len(diff) == 1:  # torch splits a lone long sum across threads, in another order than a row of many
            diff = diff.expand(2, -1)
        out.append((diff * diff).sum(-1)[: min(step, len(qi) - p)])
    return torch.cat(out) if out else qi.new_zeros(0, dtype=torch.float64)


def _recheck(q: Tensor, r: Tensor, cand: Tensor, lower: Tensor, first: Tensor) -> tuple[Tensor, Tensor]:
    """Exact top k among the candidates (B, T), computing float64 distances only where they can matter.

    The k candidates at positions `first` (B, k) give an upper bound on the k-th distance; only candidates
    whose lower bound (B, T) does not exceed it can belong to the top k.
    """
    b, k = first.shape
    rows = torch.arange(b, device=q.device)
    d2 = torch.full(cand.shape, math.inf, dtype=torch.float64, device=q.device)  # (B, T)
    d_first = _sq_dist_pairs(q, r, rows.repeat_interleave(k), cand.gather(1, first).flatten()).view(b, k)
    d2.scatter_(1, first, d_first)
    more = lower <= d_first.max(dim=1).values[:, None]  # (B, T)
    more.scatter_(1, first, False)
    pr, pc = more.nonzero(as_tuple=True)
    d2[pr, pc] = _sq_dist_pairs(q, r, pr, cand[pr, pc])
    return _rank(d2, cand, k)


def _rank(d2: Tensor, cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest of each row ordered by (distance, index): (B, T) -> (B, k), (B, k)."""
    cand, p = cand.sort(dim=1)
    d2, p = d2.gather(1, p).sort(dim=1, stable=True)
    return d2[:, :k].contiguous(), cand.gather(1, p[:, :k])


def _all_refs(rows: Tensor, m: int, exclude_self: bool) -> Tensor:
    """Every ref as a candidate (every other ref with exclude_self). (B, M) or (B, M - 1)"""
    t = torch.arange(m - exclude_self, device=rows.device).expand(len(rows), -1)
    return t + (t >= rows[:, None]) if exclude_self else t


def _search_rows(
    q: Tensor,
    r: Tensor,
    qs: Tensor,
    rs: Tensor,
    cr: Tensor,
    nq: Tensor,
    rows: Tensor,
    k: int,
    c: int,
    exclude_self: bool,
    ref_chunk: int,
    buf: Tensor,
    bound: _ErrorBound,
) -> tuple[Tensor, Tensor]:
    """Exact squared distances (B, k) and indices (B, k) for a contiguous block of query rows."""
    i0, i1 = int(rows[0]), int(rows[-1]) + 1
    m = r.shape[0]
    if c == m - exclude_self:  # every ref is a candidate: nothing to certify
        cand = _all_refs(rows, m, exclude_self)  # (B, T)
        pairs = torch.arange(len(rows), device=q.device).repeat_interleave(cand.shape[1])
        return _rank(_sq_dist_pairs(q[i0:i1], r, pairs, cand.flatten()).view(cand.shape), cand, k)
    s, cand = _scan(qs[i0:i1], rows, rs, cr, c, exclude_self, ref_chunk, buf)
    nq_b = nq[i0:i1]
    s64 = s.double()
    lower = nq_b[:, None] * (1 - bound.a) + s64 - bound.b - _F64_SLACK * (nq_b[:, None] + s64.abs())  # (B, c)
    d2, idx = _recheck(q[i0:i1], r, cand, lower, s.topk(k, dim=1, largest=False).indices)
    kth = d2[:, k - 1]  # (B,)
    lower = lower.max(dim=1).values  # every ref off the list has a score >= the largest candidate score
    failed = (~(lower > kth)).nonzero().squeeze(1)
    if len(failed):
        thr = kth[failed] - nq_b[failed] * (1 - bound.a) + bound.b + _F64_SLACK * (nq_b[failed] + kth[failed])
        d2[failed], idx[failed] = _rescan(q, r, qs, rs, cr, rows[failed], thr, k, exclude_self, ref_chunk, buf)
    return d2, idx


def _rescan(
    q: Tensor,
    r: Tensor,
    qs: Tensor,
    rs: Tensor,
    cr: Tensor,
    rows: Tensor,
    thr: Tensor,
    k: int,
    exclude_self: bool,
    ref_chunk: int,
    buf: Tensor,
) -> tuple[Tensor, Tensor]:
    """Exact top k for rows whose margin was too thin: every ref with score <= thr (all refs whose
    lower bound reaches the row's k-th candidate distance) is re-checked in float64."""
    thr_s = thr.to(rs.dtype)
    thr_s = torch.where(thr_s.double() < thr, torch.nextafter(thr_s, torch.full_like(thr_s, math.inf)), thr_s)
    qf = qs[rows]  # (F, D)
    pos = torch.zeros(0, dtype=torch.int64, device=q.device)  # kept (row position, ref index, distance) triples
    col = pos.clone()
    d2 = torch.zeros(0, dtype=torch.float64, device=q.device)
    for j0 in range(0, rs.shape[0], ref_chunk):
        j1 = min(j0 + ref_chunk, rs.shape[0])
        hit = _scores(qf, rs[j0:j1], cr[j0:j1], buf) <= thr_s[:, None]  # (F, W)
        if exclude_self:
            hit[_self_pairs(rows, j0, j1)] = False
        hp, hc = hit.nonzero(as_tuple=True)
        hc = hc + j0
        pos, col = torch.cat([pos, hp]), torch.cat([col, hc])
        d2 = torch.cat([d2, _sq_dist_pairs(q, r, rows[hp], hc)])
        pos, col, d2 = _smallest_per_row(pos, col, d2, len(rows), k)
    if len(pos) != len(rows) * k:
        raise RuntimeError(
            "exact k-NN re-scan found fewer than k refs within the float32 error bound; the matrix product "
            "is less accurate than assumed (check torch's float32 matmul precision settings)"
        )
    return d2.view(len(rows), k), col.view(len(rows), k)


def _smallest_per_row(pos: Tensor, col: Tensor, d2: Tensor, n_rows: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the k smallest (distance, index) triples of each row, sorted by (row, distance, index)."""
    o = torch.argsort(col, stable=True)
    o = o[torch.argsort(d2[o], stable=True)]
    o = o[torch.argsort(pos[o], stable=True)]
    pos, col, d2 = pos[o], col[o], d2[o]
    counts = torch.bincount(pos, minlength=n_rows)
    first = torch.cumsum(counts, 0) - counts  # (F,) where each row starts
    keep = torch.arange(len(pos), device=pos.device) - first[pos] < k
    return pos[keep], col[keep], d2[keep]


# -- refs read from a PatternSource ------------------------------------------------------------------------------


def _source_queries(queries: Tensor, source: PatternSource) -> Tensor:
    """Validate queries against a source of refs; return the (N, D) view."""
    check_source(source, "refs")
    if not isinstance(queries, Tensor):
        raise ValueError(f"queries must be a torch.Tensor of shape (N, D) or (N, *event), got {type(queries).__name__}")
    if queries.ndim < 2:
        raise ValueError(f"queries must have shape (N, D) or (N, *event), got shape {tuple(queries.shape)}")
    if queries.dtype not in FLOAT_DTYPES:
        raise ValueError(f"queries must be float32 or float64, got {queries.dtype}")
    d = math.prod(queries.shape[1:])
    if d != source.dim:
        raise ValueError(
            f"queries of shape {tuple(queries.shape)} (D = {d}) and refs of dimension D = {source.dim} "
            "must have the same dimension D after flattening"
        )
    if queries.dtype != source.dtype:
        raise ValueError(
            f"queries are {queries.dtype} but the refs' source hands out {source.dtype}; cast the queries or "
            "open the source in the other dtype (no silent casting)"
        )
    return queries.reshape(queries.shape[0], d)


def _search_source(
    queries: Tensor, source: PatternSource, k: int, exclude_self: bool, query_chunk: int, ref_chunk: int
) -> tuple[Tensor, Tensor]:
    """_search for refs read block by block: one pass (plus one for rows the certificate rejects)."""
    q = _source_queries(queries, source)
    n, m = q.shape[0], source.num_patterns
    _check_k(k, n, m, exclude_self)
    nq = _squared_norms(q, "queries")
    if n == 0:
        return _empty(q, k)
    c = min(k + max(MARGIN, k // 4), m - exclude_self)
    largest = float(nq.max())
    for bound in _ErrorBound.options(q.shape[1], q.dtype):
        found, largest = _stream_scan(q, nq, source, bound, c, exclude_self, query_chunk, ref_chunk)
        if found is not None:
            break
    else:
        raise ValueError(_too_large(largest, q.shape[1]))

    qs = q.to(bound.dtype)
    dist, idx, failed, thresholds = [], [], [], []
    for (s, cand, d2), i0 in zip(found, range(0, n, query_chunk), strict=True):
        d2, j = _rank(d2, cand, k)
        dist.append(d2)
        idx.append(j)
        if c == m - exclude_self:
            continue  # every ref is a candidate: nothing to certify
        nq_b, kth, s64 = nq[i0 : i0 + len(s)], d2[:, k - 1], s.double()
        lower = nq_b[:, None] * (1 - bound.a) + s64 - bound.b - _F64_SLACK * (nq_b[:, None] + s64.abs())  # (B, c)
        bad = (~(lower.max(dim=1).values > kth)).nonzero().squeeze(1)  # refs off the list score >= every candidate
        if len(bad):
            failed.append(bad + i0)
            thresholds.append(kth[bad] - nq_b[bad] * (1 - bound.a) + bound.b + _F64_SLACK * (nq_b[bad] + kth[bad]))
    d2, j = torch.cat(dist), torch.cat(idx)
    if failed:
        rows = torch.cat(failed)
        d2[rows], j[rows] = _stream_rescan(
            q, qs, source, rows, torch.cat(thresholds), k, exclude_self, bound, query_chunk, ref_chunk
        )
    return d2, j


def _block_scores(rb: Tensor, j0: int, bound: _ErrorBound) -> tuple[Tensor, Tensor, Tensor]:
    """A block of refs (W, D) from row j0 in the search precision, its (1 - a) n_r score term and its norms
    n_r (float64)."""
    nr = _squared_norms(rb, f"refs {j0}..{j0 + rb.shape[0] - 1}")
    return rb.to(bound.dtype), ((1 - bound.a) * nr).to(bound.dtype), nr


def _stream_scan(
    q: Tensor,
    nq: Tensor,
    source: PatternSource,
    bound: _ErrorBound,
    c: int,
    exclude_self: bool,
    query_chunk: int,
    ref_chunk: int,
) -> tuple[list[tuple[Tensor, Tensor, Tensor]] | None, float]:
    """One pass over the source: for each query block, the c refs with the smallest scores (B, c), their
    indices (B, c) and exact float64 squared distances (B, c). The source is read several ref chunks at a
    time; a distance is computed while its ref's read is in memory, only for refs that entered the running
    top c during that read (after the first reads, few do).
    (None, largest n_q + n_r) when a block's norms are too large for this bound's precision."""
    n, m = q.shape[0], source.num_patterns
    qs = q.to(bound.dtype)
    nq_max = float(nq.max())
    buf = torch.empty(min(query_chunk, n) * min(ref_chunk, m), dtype=bound.dtype, device=q.device)
    starts = range(0, n, query_chunk)
    best: list = [None] * len(starts)
    for j0, rb in source_blocks(source, read_rows(ref_chunk, q.shape[1]), q.device):
        rs, cr, nr = _block_scores(rb, j0, bound)
        largest = nq_max + float(nr.max())
        if not bound.fits(largest):
            return None, largest
        for b, i0 in enumerate(starts):
            rows = torch.arange(i0, min(i0 + query_chunk, n), device=q.device)
            for a0 in range(0, rb.shape[0], ref_chunk):  # as _scan, one (B, ref_chunk) score block at a time
                a1 = min(a0 + ref_chunk, rb.shape[0])
                s = _scores(qs[i0 : i0 + len(rows)], rs[a0:a1], cr[a0:a1], buf)  # (B, W)
                if exclude_self:
                    s[_self_pairs(rows, j0 + a0, j0 + a1)] = math.inf
                v, j = s.topk(min(c, a1 - a0), dim=1, largest=False, sorted=False)  # (B, c')
                j = j + (j0 + a0)
                d2 = torch.full(v.shape, math.nan, dtype=torch.float64, device=q.device)  # NaN: not computed yet
                if best[b] is not None:
                    v, j, d2 = (torch.cat([old, new], dim=1) for old, new in zip(best[b], (v, j, d2), strict=True))
                    if v.shape[1] > c:
                        v, p = v.topk(c, dim=1, largest=False, sorted=False)
                        j, d2 = j.gather(1, p), d2.gather(1, p)
                best[b] = (v, j, d2)
            v, j, d2 = best[b]
            pr, pc = d2.isnan().nonzero(as_tuple=True)  # this read's refs that entered the top c
            if len(pr):
                d2[pr, pc] = _sq_dist_pairs(q[i0 : i0 + len(rows)], rb, pr, j[pr, pc] - j0)
                if exclude_self:
                    own = j[pr, pc] == rows[pr]
                    d2[pr[own], pc[own]] = math.inf  # a query's own row is never its neighbour
            best[b] = (v, j, d2)
    return best, nq_max


def _stream_rescan(
    q: Tensor,
    qs: Tensor,
    source: PatternSource,
    rows: Tensor,
    thr: Tensor,
    k: int,
    exclude_self: bool,
    bound: _ErrorBound,
    query_chunk: int,
    ref_chunk: int,
) -> tuple[Tensor, Tensor]:
    """_rescan for refs read block by block: one more pass for the rows (F,) whose margin was too thin."""
    thr_s = thr.to(bound.dtype)
    thr_s = torch.where(thr_s.double() < thr, torch.nextafter(thr_s, torch.full_like(thr_s, math.inf)), thr_s)
    qf = qs[rows]  # (F, D)
    f = len(rows)
    pos = torch.zeros(0, dtype=torch.int64, device=q.device)  # kept (row position, ref index, distance) triples
    col = pos.clone()
    d2 = torch.zeros(0, dtype=torch.float64, device=q.device)
    buf = torch.empty(min(query_chunk, f) * min(ref_chunk, source.num_patterns), dtype=bound.dtype, device=q.device)
    for j0, rb in source_blocks(source, read_rows(ref_chunk, q.shape[1]), q.device):
        rs, cr, _ = _block_scores(rb, j0, bound)
        for a0 in range(0, rb.shape[0], ref_chunk):
            a1 = min(a0 + ref_chunk, rb.shape[0])
            for g0 in range(0, f, query_chunk):
                g1 = min(g0 + query_chunk, f)
                hit = _scores(qf[g0:g1], rs[a0:a1], cr[a0:a1], buf) <= thr_s[g0:g1, None]  # (G, W)
                if exclude_self:
                    hit[_self_pairs(rows[g0:g1], j0 + a0, j0 + a1)] = False
                hp, hc = hit.nonzero(as_tuple=True)
                hp, hc = hp + g0, hc + a0
                pos, col = torch.cat([pos, hp]), torch.cat([col, hc + j0])
                d2 = torch.cat([d2, _sq_dist_pairs(q, rb, rows[hp], hc)])
            pos, col, d2 = _smallest_per_row(pos, col, d2, f, k)
    if len(pos) != f * k:
        raise RuntimeError(
            "exact k-NN re-scan found fewer than k refs within the float32 error bound; the matrix product "
            "is less accurate than assumed (check torch's float32 matmul precision settings)"
        )
    return d2.view(f, k), col.view(f, k)
