"""Benchmarks of memories out of core: the exact-denoiser step and the exact kNN read from a pattern store
on disk (diffmem.io.patterns), against the same work on the same values held in memory, timed interleaved.

A pass over a store costs the in-memory pass plus reading the shards: from the page cache a float32
block is a zero-copy view of the mapping (page faults only), a float16 block is converted to float32
(one copy); the norms of each block are recomputed. So a step takes about

    t = 4 B K D / F + K D c + K D s / R      (the kNN: 2 N K D / F in place of the first term)

for F FLOP/s, c seconds per value read from the page cache, s bytes per stored value and R the disk's
read rate (the last term only when the store does not fit in the page cache); the ratio to memory,
1 / (1 + c F / 4B) from the page cache, grows with the batch and does not depend on K or D. Measured
on 2 shared cores at K = 10^6, D = 64, B = 128: F = 36 GFLOP/s per thread, c ~ 3.5 ns, ratios 0.90 to
0.94 (one thread), R = 1.0 GB/s. The goal is >= 0.7 with the store in the page cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from diffmem.bench.harness import BenchContext, BenchEntry, Goal
from diffmem.core.knn import knn
from diffmem.core.memory import DenseAM
from diffmem.io.patterns import PatternStore


@dataclass(frozen=True)
class _Problem:
    k: int  # patterns in the store
    d: int
    b: int  # states of one denoiser step
    n: int  # kNN queries


OUTOFCORE_PROBLEM = {"full": _Problem(1_000_000, 64, 64, 256), "quick": _Problem(50_000, 64, 64, 64)}
STORAGES = ("float32", "float16")
_BETA = 1 / 16.0  # sigma = 4: the weights spread over many patterns, every block counts
GOAL = 0.7  # throughput from the store (page cache) over throughput in memory

# run in a fresh interpreter so that the peak is the step's own; prints {"base", "peak"} in bytes
_RSS_PROBE = r"""
import json, sys
import torch
from diffmem.core.memory import DenseAM
from diffmem.io.patterns import PatternStore

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

store = PatternStore.open(sys.argv[1])
am = DenseAM(store)
x = torch.randn(int(sys.argv[2]), store.dim, generator=torch.Generator().manual_seed(0)) * 4
am.retrieve(x, float(sys.argv[3]))  # warm-up: allocator pools, BLAS buffers
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS")
am.retrieve(x, float(sys.argv[3]))
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def _step_rss(store: PatternStore, b: int) -> dict[str, int] | None:
    """Resident memory before and at the peak of one step over the store, in a fresh process (Linux only)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(store.path), str(b), str(_BETA)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_outofcore(ctx: BenchContext) -> list[BenchEntry]:
    """Throughput of the exact step (B states) and the exact 1-NN (N queries) over K patterns read from a
    float32 and a float16 store, as a share of the same work on the same values in memory, timed
    interleaved; and the resident memory one step over the float32 store adds, as a share of its size."""
    p = OUTOFCORE_PROBLEM[ctx.size]
    g = torch.Generator().manual_seed(0)
    xi = torch.randn(p.k, p.d, generator=g)  # the store is written from the CPU
    x = (torch.randn(p.b, p.d, generator=g) * 4).to(ctx.device)
    q = torch.randn(p.n, p.d, generator=g).to(ctx.device)
    entries = []
    with tempfile.TemporaryDirectory(prefix="diffmem-bench-outofcore-") as tmp:
        for storage in STORAGES:
            store = PatternStore.create(Path(tmp) / storage, xi, storage=storage)
            held = (xi if storage == "float32" else xi.half().float()).to(ctx.device)  # the same values in memory
            mem, disk = DenseAM(held), DenseAM(store)
            # memory, store, memory, store, ...: load that lasts a round slows both alike; the warm-up pass
            # brings the store into the page cache
            t = ctx.interleave(
                {
                    "step_memory": ctx.clock(lambda m=mem: m.retrieve(x, _BETA)),
                    "step_store": ctx.clock(lambda m=disk: m.retrieve(x, _BETA)),
                    "knn_memory": ctx.clock(lambda r=held: knn(q, r, 1)),
                    "knn_store": ctx.clock(lambda r=store: knn(q, r, 1)),
                },
                rounds=ctx.heavy_rounds,
            )
            where = f"K={p.k} D={p.d} {storage} store ({store.nbytes / 2**20:.0f} MiB, page cache), device {ctx.device}"
            for what, count in (("step", f"B={p.b}"), ("knn", f"N={p.n}, k=1")):
                entries.append(
                    BenchEntry.timed(
                        f"outofcore_{what}_{storage}",
                        "1/s",
                        [1 / s for s in t[f"{what}_store"]],
                        [1 / s for s in t[f"{what}_memory"]],
                        f"the same {what} on the values in memory",
                        Goal(">=", GOAL),
                        ctx.size,
                        f"{where}, {count}, {torch.get_num_threads()} threads",
                    )
                )
            if storage == "float32":
                rss = _step_rss(store, p.b)
                if rss is not None:
                    mb, size = max(rss["peak"] - rss["base"], 0) / 2**20, store.nbytes / 2**20
                    entries.append(
                        BenchEntry.measured(
                            "outofcore_step_rss_mb",
                            mb,
                            "MB",
                            size,
                            "size of the float32 store",
                            Goal("<=", 0.1, full_only=True),  # at quick size one read (8 MiB) is most of the store
                            ctx.size,
                            f"peak RSS during one step over the store minus before it, B={p.b}",
                        )
                    )
            del mem, disk, store
    return entries
