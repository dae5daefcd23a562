"""Benchmark: LPIPS nearest neighbours through embeddings against features recomputed per pair of batches."""

from __future__ import annotations

import math
from statistics import median

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmem.bench.harness import BenchContext, BenchEntry, Goal
from diffmem.evaluate.lpips import LPIPSEmbedding, lpips_knn

KNN_PROBLEM = {"full": (2_000, 2_000), "quick": (200, 200)}  # (queries, references), 3x32x32 images
PAIR_BATCH = 100  # batch size of the pairwise reference, as earlier implementations used
TIMED_QUERY_BATCHES = {"full": 2, "quick": None}  # None: the whole pairwise run


def pairwise_nearest(model: LPIPSEmbedding, queries: Tensor, refs: Tensor, batch_size: int) -> Tensor:
    """Smallest LPIPS from each query to refs the way earlier implementations computed it: for every
    pair of a query batch and a reference batch, features of both batches are computed again and all
    pairs are compared with LPIPS's own formula (1x1 head on squared differences, spatial mean).
    Returns (N_queries,)."""
    best = []
    with torch.no_grad():
        for i in range(0, len(queries), batch_size):
            row = torch.full((min(batch_size, len(queries) - i),), math.inf, device=model.shift.device)
            for j in range(0, len(refs), batch_size):
                fq = model.normalized_features(model.prepare(queries[i : i + batch_size]))
                fr = model.normalized_features(model.prepare(refs[j : j + batch_size]))
                d = 0.0
                for a, b, head in zip(fq, fr, model.heads, strict=True):
                    diff2 = ((a[:, None] - b[None]) ** 2).flatten(0, 1)  # (Bq * Br, C_l, H_l, W_l)
                    d = d + F.conv2d(diff2, head).mean((1, 2, 3)).reshape(len(a), len(b))  # (Bq, Br)
                row = torch.minimum(row, d.min(1).values)
            best.append(row)
    return torch.cat(best)


def bench_lpips_knn(ctx: BenchContext) -> list[BenchEntry]:
    """Nearest-neighbour LPIPS (AlexNet, random weights) of N queries among N references of 3x32x32:
    embeddings once per image plus one k-NN, against the pairwise approach."""
    n_q, n_r = KNN_PROBLEM[ctx.size]
    g = torch.Generator().manual_seed(0)
    model = LPIPSEmbedding("alex", "random", generator=g).to(ctx.device)
    queries = (torch.rand(n_q, 3, 32, 32, generator=g) * 2 - 1).to(ctx.device)
    refs = (torch.rand(n_r, 3, 32, 32, generator=g) * 2 - 1).to(ctx.device)

    def by_embedding():
        return lpips_knn(model.embed(queries), model.embed(refs), 1)

    # the pairwise run grows as N^2: at full size a fixed subset of query batches (each against every
    # reference batch) is timed and the time scaled to all batch pairs
    n_batches = math.ceil(n_q / PAIR_BATCH)
    timed = TIMED_QUERY_BATCHES[ctx.size] or n_batches
    subset = queries[: timed * PAIR_BATCH]
    nb = by_embedding()  # warm-up of both
    pairwise_nearest(model, subset[:PAIR_BATCH], refs[:PAIR_BATCH], PAIR_BATCH)
    found = []
    t = ctx.interleave(
        {
            "pairwise": ctx.clock(lambda: found.append(pairwise_nearest(model, subset, refs, PAIR_BATCH))),
            "embedding": ctx.clock(by_embedding, best_of=ctx.repeats),
        },
        rounds=ctx.heavy_rounds,
        repeats=1,
        warmup=False,
    )
    best = found[-1]
    t_pairwise = [s * n_batches / timed for s in t["pairwise"]]

    ours = nb.distances[: len(best), 0]
    max_diff = float((ours - best.double()).abs().max())
    scale = float(best.double().mean())
    how = "whole run" if timed == n_batches else f"{timed} of {n_batches} query batches timed, scaled to all"
    common = f"{n_q} x {n_r} images 3x32x32, AlexNet random weights, device {ctx.device}"
    return [
        BenchEntry.timed(
            "lpips_knn_queries_per_s",
            "queries/s",
            [n_q / s for s in t["embedding"]],
            [n_q / s for s in t_pairwise],
            f"features recomputed per pair of {PAIR_BATCH}-image batches, LPIPS formula per pair",
            Goal(">=", 50, full_only=True),
            ctx.size,
            f"{common}; embeddings + k-NN (best of {ctx.repeats}) and pairwise ({how}) timed in turn, "
            f"median {median(t['embedding']):.3g} s and {median(t_pairwise):.3g} s",
        ),
        BenchEntry.measured(
            "lpips_knn_max_abs_diff",
            max_diff,
            "LPIPS",
            scale,
            "mean nearest-neighbour LPIPS",
            Goal("<=", 1e-5, on="value"),
            ctx.size,
            f"{common}; nearest-neighbour LPIPS of {len(best)} queries, embedding identity vs pairwise formula",
        ),
    ]


__all__ = ["bench_lpips_knn", "pairwise_nearest"]
