"""The benchmark harness: every figure is a ratio against a reference measured in the same run.

An entry has a name, a value with its unit, the reference figure it is compared with, and
ratio = value / reference, plus the goal it is judged by. The benchmarks live one module each
(or one per related group) and are listed in diffmem.bench.registry; this module knows none of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import TypeVar

import torch

SIZES = ("full", "quick")
T = TypeVar("T")


@dataclass(frozen=True)
class BenchEntry:
    name: str
    value: float
    unit: str
    reference: float | None  # a figure measured in the same run (None only for the reference itself)
    reference_name: str
    ratio: float | None  # value / reference
    goal: str  # how the ratio is judged, e.g. ">= 0.7"
    met: bool | None  # whether the goal is met (None when there is no goal)
    notes: str = ""

    @classmethod
    def against_matmul(cls, name: str, gflops: float, ctx: BenchContext, notes: str, goal: float = 0.7) -> BenchEntry:
        """A GFLOP/s figure as a share of the float32 matmul rate measured in the same run."""
        ratio = gflops / ctx.matmul_gflops
        return cls(
            name, gflops, "GFLOP/s", ctx.matmul_gflops, "matmul_float32", ratio, f">= {goal}", ratio >= goal, notes
        )


class BenchContext:
    def __init__(self, device: str, size: str, repeats: int):
        if size not in SIZES:
            raise ValueError(f"unknown benchmark size {size!r}; choose one of {SIZES}")
        self.device = torch.device(device)
        self.size = size
        self.repeats = repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def best_time(self, fn: Callable[[], object], repeats: int | None = None) -> float:
        """Best wall time of `repeats` (default ctx.repeats) runs of fn after one warm-up run."""
        fn()  # warm-up
        self.sync()
        best = math.inf
        for _ in range(repeats or self.repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t0)
        return best

    def timed(self, fn: Callable[[], T]) -> tuple[T, float]:
        """One run of fn, no warm-up: its result and its wall time, the device synchronised around it."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    @property
    def matmul_size(self) -> int:
        return 2048 if self.size == "full" else 512

    @cached_property
    def matmul_gflops(self) -> float:
        """The machine's own float32 matmul rate: best of square n x n products."""
        n = self.matmul_size
        g = torch.Generator(device=self.device).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=self.device)
        b = torch.randn(n, n, generator=g, device=self.device)
        return 2 * n**3 / self.best_time(lambda: a @ b, repeats=max(self.repeats, 10)) / 1e9


Benchmark = Callable[[BenchContext], list[BenchEntry]]


def bench_matmul(ctx: BenchContext) -> list[BenchEntry]:
    """The reference of the compute-bound benchmarks: the float32 matmul rate of this run."""
    n = ctx.matmul_size
    return [
        BenchEntry(
            "matmul_float32",
            ctx.matmul_gflops,
            "GFLOP/s",
            None,
            "-",
            None,
            "reference",
            None,
            f"{n}x{n} @ {n}x{n} float32, {torch.get_num_threads()} threads, device {ctx.device}",
        )
    ]


def run_suite(
    benchmarks: Mapping[str, Benchmark],
    only: list[str] | None = None,
    *,
    device: str = "cpu",
    size: str = "full",
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[BenchEntry]:
    """Run the named benchmarks (all of `benchmarks` when `only` is empty) in order, in one context."""
    names = list(benchmarks) if not only else only
    unknown = [n for n in names if n not in benchmarks]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(benchmarks)}")
    ctx = BenchContext(device, size, repeats)
    entries: list[BenchEntry] = []
    for name in names:
        if progress:
            progress(f"bench: {name} ...")
        entries.extend(benchmarks[name](ctx))
    return entries


def format_table(entries: list[BenchEntry]) -> str:
    head = f"{'name':<26} {'value':>12} {'unit':<8} {'reference':>12} {'ratio':>8}  goal"
    lines = [head, "-" * len(head)]
    for e in entries:
        ref = "-" if e.reference is None else f"{e.reference:.4g}"
        ratio = "-" if e.ratio is None else f"{e.ratio:.3f}"
        status = "" if e.met is None else ("  met" if e.met else "  NOT met")
        lines.append(f"{e.name:<26} {e.value:>12.4g} {e.unit:<8} {ref:>12} {ratio:>8}  {e.goal}{status}")
    return "\n".join(lines)


def entries_to_json(entries: list[BenchEntry]) -> list[dict]:
    return [asdict(e) for e in entries]
