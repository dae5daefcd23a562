"""Benchmarks of the exact denoiser: one retrieval step (speed and memory) and DDIM on the digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from statistics import median

import torch

from diffmem.bench.harness import BenchContext, BenchEntry, Goal
from diffmem.core import DenseAM, EmpiricalDenoiser, VPSchedule, initial_noise, sample_ddim
from diffmem.io.data import load_digits


@dataclass(frozen=True)
class _Problem:
    k: int
    d: int
    b: int


STEP_PROBLEM = {"full": _Problem(50_000, 3_072, 256), "quick": _Problem(2_000, 256, 32)}
DDIM_PROBLEM = {"full": (1_024, 100), "quick": (64, 10)}  # (samples, steps) on the 1,797 digits


def bench_exact_step(ctx: BenchContext) -> list[BenchEntry]:
    """One exact-denoiser step (the retrieval map) for K patterns of dimension D and a batch B, against
    the step's two products done bare, timed interleaved: what the streamed softmax costs on top."""
    p = STEP_PROBLEM[ctx.size]
    g = torch.Generator(device=ctx.device).manual_seed(0)
    xi = torch.randn(p.k, p.d, generator=g, device=ctx.device)
    x = torch.randn(p.b, p.d, generator=g, device=ctx.device) * 20
    am = DenseAM(xi)
    products = ctx.matmul_reference([(p.b, p.d, p.k), (p.b, p.k, p.d)])  # scores x xi^T, then weights @ xi
    t = ctx.interleave({"products": ctx.clock(products.run), "step": ctx.clock(lambda: am.retrieve(x, 1 / 400.0))})
    flops = 4 * p.b * p.k * p.d  # two (B, K, D) matrix products
    step = [flops / s / 1e9 for s in t["step"]]
    bare = [products.flops / s / 1e9 for s in t["products"]]
    ms = median(t["step"]) * 1e3
    note = f"K={p.k} D={p.d} B={p.b} float32, {torch.get_num_threads()} threads, median step {ms:.2f} ms"
    return [
        BenchEntry.timed(
            "exact_step_gflops", "GFLOP/s", step, bare, products.describe(), Goal(">=", 0.7), ctx.size, note
        )
    ]


# run in a fresh interpreter so that the peak memory is the step's own; prints {"base", "peak"} in bytes
_MEMORY_PROBE = r"""
import json, sys
import torch
from diffmem.core import DenseAM
k, d, b, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator(device=device).manual_seed(0)
xi = torch.randn(k, d, generator=g, device=device)
x = torch.randn(b, d, generator=g, device=device) * 20
am = DenseAM(xi)
if device.startswith("cuda"):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    am.retrieve(x, 1 / 400.0); torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = status("VmRSS")
    am.retrieve(x, 1 / 400.0)
    peak = status("VmHWM")
print(json.dumps({"base": base, "peak": peak}))
"""


def _probe_memory(p: _Problem, device: torch.device) -> dict[str, int]:
    """Memory before and at the peak of one step, in bytes, measured by _MEMORY_PROBE."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(p.k), str(p.d), str(p.b), str(device)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_exact_step_memory(ctx: BenchContext) -> list[BenchEntry]:
    """Peak memory of one exact-denoiser step, in a fresh process: what the step adds to its inputs."""
    p = STEP_PROBLEM[ctx.size]
    if ctx.device.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        return []  # peak-RSS reset needs Linux procfs
    m = _probe_memory(p, ctx.device)
    mb = 2**20
    workspace = max(m["peak"] - m["base"], 0) / mb
    naive = p.b * p.k * p.d * 4 / mb  # the (B, K, D) float32 tensor a naive implementation builds
    inputs = (p.k + p.b) * p.d * 4 / mb
    what = "peak RSS" if ctx.device.type == "cpu" else "peak CUDA allocation"
    return [
        BenchEntry.measured(
            "exact_step_workspace_mb",
            workspace,
            "MB",
            naive,
            "size of a (B, K, D) float32 tensor",
            Goal("<=", 0.01),
            ctx.size,
            f"{what} during the step minus before it",
        ),
        BenchEntry.measured(
            "exact_step_peak_mb",
            inputs + workspace,
            "MB",
            1024.0,
            "1 GB budget",
            Goal("<", 1),
            ctx.size,
            f"inputs ({inputs:.0f} MB: patterns and batch) plus workspace",
        ),
    ]


def bench_ddim_digits(ctx: BenchContext) -> list[BenchEntry]:
    """Wall time of exact-denoiser DDIM sampling on the digits, against its matmul-bound time: the
    bare products of one step, timed interleaved with the sampling, times the number of steps."""
    n, steps = DDIM_PROBLEM[ctx.size]
    train = load_digits(device=ctx.device).x
    k, d = train.shape
    den = EmpiricalDenoiser(train)
    sigmas = VPSchedule().sampling_sigmas(steps)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    x = initial_noise((n, d), float(sigmas[0]), generator=g, like=train)
    products = ctx.matmul_reference([(n, d, k), (n, k, d)])  # one step's two products
    t = ctx.interleave({"products": ctx.clock(products.run), "ddim": ctx.clock(lambda: sample_ddim(den, x, sigmas))})
    return [
        BenchEntry.timed(
            "ddim_digits_seconds",
            "s",
            t["ddim"],
            [steps * s for s in t["products"]],
            f"{steps} x one step's {products.describe()}",
            None,
            ctx.size,
            f"{n} samples, K={k}, D={d}, {steps} DDIM steps",
        )
    ]
