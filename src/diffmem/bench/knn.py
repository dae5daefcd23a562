"""Benchmarks of the exact nearest-neighbour search (diffmem.core.knn): matmul efficiency and faiss."""

from __future__ import annotations

from collections.abc import Callable
from statistics import median

import torch

from diffmem.bench.harness import BenchContext, BenchEntry, Goal
from diffmem.core.knn import Neighbours, knn

KNN_PROBLEM = {"full": (10_000, 50_000, 3_072), "quick": (500, 2_000, 256)}  # (queries N, refs M, D), k = 1
QUERY_CHUNK, REF_CHUNK = 4096, 16384  # the search's score blocks (knn's defaults), passed explicitly
_CHECKED_QUERIES = 200  # queries compared with a float64 brute force (all M refs) at full size


def _brute_force_mismatches(queries: torch.Tensor, refs: torch.Tensor, found: Neighbours) -> tuple[int, float]:
    """Rows whose nearest index differs from a float64 torch.cdist brute force, and the largest distance gap."""
    rows = min(len(queries), _CHECKED_QUERIES)
    d = torch.cdist(queries[:rows].double(), refs.double())  # (rows, M)
    dist, idx = d.min(dim=1)
    mismatches = int((idx != found.indices[:rows, 0]).sum())
    return mismatches, float((dist - found.distances[:rows, 0]).abs().max())


def bench_knn(ctx: BenchContext) -> list[BenchEntry]:
    """Exact 1-NN of N queries among M refs in float32: GFLOP/s against one bare block product of the
    search (a query chunk against a ref chunk), a check against a float64 brute force, and the time of
    faiss's IndexFlatL2 on the same data; the product, our search and faiss are timed interleaved."""
    n, m, d = KNN_PROBLEM[ctx.size]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    refs = torch.randn(m, d, generator=g, device=ctx.device)
    queries = torch.randn(n, d, generator=g, device=ctx.device)
    block = ctx.matmul_reference([(min(n, QUERY_CHUNK), d, min(m, REF_CHUNK))])  # one score block
    found: list[Neighbours] = []

    def ours() -> None:
        found[:] = [knn(queries, refs, 1, query_chunk=QUERY_CHUNK, ref_chunk=REF_CHUNK)]

    faiss_search, faiss_found, faiss_text = _faiss_search(queries, refs)
    faiss_note = "" if faiss_search is not None else faiss_text
    timers = {"block": ctx.clock(block.run), "ours": ctx.clock(ours)}
    if faiss_search is not None:
        timers["faiss"] = ctx.clock(faiss_search)
    # at full size one pass of the search takes about half a minute: HEAVY_ROUNDS rounds of one pass
    # each and no warm-up pass (the median round drops the first round's start-up costs)
    heavy = ctx.size == "full"
    t = ctx.interleave(
        timers, rounds=ctx.heavy_rounds if heavy else None, repeats=1 if heavy else None, warmup=not heavy
    )
    rows = min(n, _CHECKED_QUERIES)
    mismatches, gap = _brute_force_mismatches(queries, refs, found[-1])
    entries = [
        BenchEntry.timed(
            "knn_gflops",
            "GFLOP/s",
            [2 * n * m * d / s / 1e9 for s in t["ours"]],
            [block.flops / s / 1e9 for s in t["block"]],
            block.describe(),
            Goal(">=", 0.7),
            ctx.size,
            f"N={n} queries, M={m} refs, D={d} float32, k=1, median {median(t['ours']):.3g} s, "
            f"{torch.get_num_threads()} threads, device {ctx.device}{faiss_note}",
        ),
        BenchEntry.measured(
            "knn_exact_mismatches",
            float(mismatches),
            "rows",
            float(rows),
            "rows checked against float64 cdist",
            Goal("==", 0),
            ctx.size,
            f"first {rows} queries against all {m} refs; largest distance difference {gap:.2e}",
        ),
    ]
    if faiss_search is None:
        return entries
    differ = int((torch.from_numpy(faiss_found[-1]) != found[-1].indices[:, 0].cpu()).sum())
    where = "" if ctx.device.type == "cpu" else f" (faiss on the CPU, ours on {ctx.device})"
    faiss_entry = BenchEntry.timed(
        "knn_faiss_seconds",
        "s",
        t["faiss"],
        t["ours"],
        "knn seconds (exact, ours)",
        Goal(">=", 1.0),
        ctx.size,
        f"faiss {faiss_text} IndexFlatL2 build + search, {torch.get_num_threads()} threads{where}; "
        f"its float32 answer differs from the exact one in {differ} of {len(faiss_found[-1])} rows",
    )
    return [*entries, faiss_entry]


def _faiss_search(queries: torch.Tensor, refs: torch.Tensor) -> tuple[Callable[[], None] | None, list, str]:
    """faiss IndexFlatL2 (build + search, k = 1) on the CPU with torch's thread count, the list its
    answers go to, and faiss's version; (None, [], a note why not) without faiss."""
    try:
        import faiss
    except ImportError:
        return None, [], "; faiss not installed: comparison skipped (pip install 'diffmem[faiss]')"
    q, r = queries.cpu().numpy(), refs.cpu().numpy()
    out: list = []

    def search() -> None:
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(torch.get_num_threads())
        try:
            index = faiss.IndexFlatL2(r.shape[1])
            index.add(r)
            out[:] = [index.search(q, 1)[1][:, 0]]
        finally:
            faiss.omp_set_num_threads(threads)

    return search, out, faiss.__version__
