"""Benchmarks of the exact nearest-neighbour search (diffmem.core.knn): matmul efficiency and faiss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffmem.bench.harness import BenchContext, BenchEntry
from diffmem.core.knn import Neighbours, knn

KNN_PROBLEM = {"full": (10_000, 50_000, 3_072), "quick": (500, 2_000, 256)}  # (queries N, refs M, D), k = 1
_CHECKED_QUERIES = 200  # queries compared with a float64 brute force (all M refs) at full size


def _seconds(ctx: BenchContext, fn: Callable[[], object]) -> float:
    """Best of ctx.repeats at quick size; at full size, where one run takes about half a minute, one
    warm-up run (allocations, page faults, BLAS start-up) and one timed run, for both backends alike."""
    return ctx.best_time(fn, repeats=1 if ctx.size == "full" else None)


def _brute_force_mismatches(queries: torch.Tensor, refs: torch.Tensor, found: Neighbours) -> tuple[int, float]:
    """Rows whose nearest index differs from a float64 torch.cdist brute force, and the largest distance gap."""
    rows = min(len(queries), _CHECKED_QUERIES)
    d = torch.cdist(queries[:rows].double(), refs.double())  # (rows, M)
    dist, idx = d.min(dim=1)
    mismatches = int((idx != found.indices[:rows, 0]).sum())
    return mismatches, float((dist - found.distances[:rows, 0]).abs().max())


def bench_knn(ctx: BenchContext) -> list[BenchEntry]:
    """Exact 1-NN of N queries among M refs in float32: GFLOP/s against the machine's matmul, a check against
    a float64 brute force, and the time of faiss's IndexFlatL2 on the same data."""
    n, m, d = KNN_PROBLEM[ctx.size]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    refs = torch.randn(m, d, generator=g, device=ctx.device)
    queries = torch.randn(n, d, generator=g, device=ctx.device)
    found: list[Neighbours] = []
    ours = _seconds(ctx, lambda: found.append(knn(queries, refs, 1)))
    gflops = 2 * n * m * d / ours / 1e9
    rows = min(n, _CHECKED_QUERIES)
    mismatches, gap = _brute_force_mismatches(queries, refs, found[-1])
    faiss_entry, faiss_note = _faiss_entry(ctx, queries, refs, ours, found[-1])
    entries = [
        BenchEntry.against_matmul(
            "knn_gflops",
            gflops,
            ctx,
            f"N={n} queries, M={m} refs, D={d} float32, k=1, {ours:.2f} s, {torch.get_num_threads()} threads, "
            f"device {ctx.device}{faiss_note}",
        ),
        BenchEntry(
            "knn_exact_mismatches",
            float(mismatches),
            "rows",
            float(rows),
            "rows checked against float64 cdist",
            mismatches / rows,
            "== 0",
            mismatches == 0,
            f"first {rows} queries against all {m} refs; largest distance difference {gap:.2e}",
        ),
    ]
    return entries + faiss_entry


def _faiss_entry(
    ctx: BenchContext, queries: torch.Tensor, refs: torch.Tensor, ours: float, found: Neighbours
) -> tuple[list[BenchEntry], str]:
    """faiss IndexFlatL2 (build + search, k = 1) on the CPU with torch's thread count, or a note why not."""
    try:
        import faiss
    except ImportError:
        return [], "; faiss not installed: comparison skipped (pip install 'diffmem[faiss]')"
    q, r = queries.cpu().numpy(), refs.cpu().numpy()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())
    out = []

    def search():
        index = faiss.IndexFlatL2(r.shape[1])
        index.add(r)
        out.append(index.search(q, 1)[1][:, 0])

    try:
        seconds = _seconds(ctx, search)
    finally:
        faiss.omp_set_num_threads(threads)
    differ = int((torch.from_numpy(out[-1]) != found.indices[:, 0].cpu()).sum())
    where = "" if ctx.device.type == "cpu" else f" (faiss on the CPU, ours on {ctx.device})"
    entry = BenchEntry(
        "knn_faiss_seconds",
        seconds,
        "s",
        ours,
        "knn seconds (exact, ours)",
        seconds / ours,
        ">= 1.0",
        seconds / ours >= 1.0,
        f"faiss {faiss.__version__} IndexFlatL2 build + search, {torch.get_num_threads()} threads{where}; "
        f"its float32 answer differs from the exact one in {differ} of {len(out[-1])} rows",
    )
    return [entry], ""
