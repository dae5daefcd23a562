"""Exact k-NN with faiss's IndexFlatL2 as the candidate search (optional backend, CPU).

faiss ranks by float32 ||q||^2 + ||r||^2 - 2 q.r, as the core search does. Its candidates get the same
float64 re-check, and the same kind of certificate decides which rows are already exact: with
d~ the faiss distance, every faiss entry is within e (n_q + n_r) + b of ||q - r||^2, so a ref that faiss
did not return has ||q - r||^2 >= d~_last - e (n_q + max n_r) - b. Rows where that lower bound does not
clear the k-th float64 distance are searched again with diffmem.core.knn.knn. The result therefore
equals diffmem.core.knn.knn (and a float64 brute force), ties in increasing index included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffmem.core.knn import _F64_SLACK, MARGIN, Neighbours, _recheck, _validated, knn

INSTALL_HINT = "install the faiss extra: pip install 'diffmem[faiss]'"


def knn_faiss(queries: Tensor, refs: Tensor, k: int = 1, *, exclude_self: bool = False) -> Neighbours:
    """Same contract and result as diffmem.core.knn.knn; faiss (CPU) does the float32 search.

    queries (N, D) or (N, *event), refs (M, D) or (M, *event); tensors on any device (the search runs
    on the CPU, the result comes back on the inputs' device).
    """
    try:
        import faiss
    except ImportError as err:
        raise ImportError(f"knn_faiss needs faiss; {INSTALL_HINT}") from err
    q, r, nq, nr = _validated(queries, refs, k, exclude_self)
    n, m = q.shape[0], r.shape[0]
    if n == 0:
        return knn(q, r, k)

    d = q.shape[1]
    a, b = _faiss_bound(d, q.dtype)
    if a >= 0.125 or not 8 * (float(nq.max()) + float(nr.max())) < torch.finfo(torch.float32).max:
        return knn(q, r, k, exclude_self=exclude_self)  # beyond what a float32 search can certify
    index = faiss.IndexFlatL2(d)
    index.add(r.detach().to("cpu", torch.float32).contiguous().numpy())
    width = min(k + max(MARGIN, k // 4) + exclude_self, m)
    dist_f, cand = index.search(q.detach().to("cpu", torch.float32).contiguous().numpy(), width)
    dist_f = torch.from_numpy(dist_f).to(q.device, torch.float64)  # (N, width) float32 values, exact in float64
    cand = torch.from_numpy(cand).to(q.device)  # (N, width)
    if exclude_self:
        dist_f, cand = _drop_self(dist_f, cand)
    scale = nq[:, None] + nr[cand]  # (N, W)
    lower = dist_f - a * scale - b - _F64_SLACK * (dist_f.abs() + scale)  # (N, W) bounds on ||q - r||^2
    first = torch.arange(k, device=q.device).expand(n, k)  # faiss lists candidates nearest first
    d2, idx = _recheck(q, r, cand, lower, first)
    dist = d2.sqrt()
    if cand.shape[1] == m - exclude_self:  # faiss returned every ref: nothing to certify
        return Neighbours(dist, idx)

    last = dist_f[:, -1]  # (N,) every ref faiss did not return is at least this far in float32
    scale = nq + nr.max()
    lower = last - a * scale - b - _F64_SLACK * (last.abs() + scale)
    failed = (~(lower > d2[:, k - 1])).nonzero().squeeze(1)
    if len(failed):
        exact = _exact_rows(q, r, failed, k, exclude_self)
        dist[failed], idx[failed] = exact.distances, exact.indices
    return Neighbours(dist, idx)


def _faiss_bound(d: int, dtype: torch.dtype) -> tuple[float, float]:
    """(a, b) with |faiss distance - ||q - r||^2| + float64 re-check error <= a (n_q + n_r) + b.

    Norms, dot product and the two additions each add at most gamma_{D+2} (1 + u_in)^2 + 2 u_in + u_in^2
    or a few u (any summation order, Higham §3.1); the factor 2 covers faiss's kernels that fold the
    norms in another order.
    """
    u = 2.0**-24
    u_in = 2.0**-24 if dtype == torch.float64 else 0.0
    gamma = (d + 2) * u / (1 - (d + 2) * u)
    one = gamma * (1 + u_in) ** 2 + 2 * u_in + u_in**2
    u64 = 2.0**-53
    gamma64 = (d + 4) * u64 / (1 - (d + 4) * u64)
    return 2 * (2 * one + 4 * u) + 2 * gamma64, (d + 16) * 2.0**-118


def _drop_self(dist_f: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
    """Remove index i from row i (by index, not distance); rows without it lose their last entry."""
    rows = torch.arange(cand.shape[0], device=cand.device)[:, None]
    is_self = cand == rows  # (N, W)
    drop = torch.where(is_self.any(1), is_self.to(torch.int64).argmax(1), cand.shape[1] - 1)  # (N,)
    keep = torch.arange(cand.shape[1], device=cand.device)[None, :] != drop[:, None]
    w = cand.shape[1] - 1
    # the last remaining faiss distance still bounds every ref faiss did not return
    return dist_f[keep].view(-1, w), cand[keep].view(-1, w)


def _exact_rows(q: Tensor, r: Tensor, rows: Tensor, k: int, exclude_self: bool) -> Neighbours:
    """The exact neighbours of some query rows, through the core search. (F, k) each."""
    if not exclude_self:
        return knn(q[rows], r, k)
    # the exclude-self top k is the top k + 1 without index i (present or not, order by index kept)
    res = knn(q[rows], r, k + 1)
    is_self = res.indices == rows[:, None]  # (F, k + 1)
    drop = torch.where(is_self.any(1), is_self.to(torch.int64).argmax(1), k)
    keep = torch.arange(k + 1, device=rows.device)[None, :] != drop[:, None]
    return Neighbours(res.distances[keep].view(-1, k), res.indices[keep].view(-1, k))
