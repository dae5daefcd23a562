"""The benchmarks `diffmem bench` runs, by name, in the order they run (`--only` takes these names)."""

from __future__ import annotations

import functools

from diffmem.bench.basins import bench_basins
from diffmem.bench.census import bench_census_digits
from diffmem.bench.exact import bench_ddim_digits, bench_exact_step, bench_exact_step_memory
from diffmem.bench.harness import Benchmark, bench_matmul, run_suite
from diffmem.bench.knn import bench_knn
from diffmem.bench.lpips import bench_lpips_knn
from diffmem.bench.outofcore import bench_outofcore
from diffmem.bench.training import bench_sampling, bench_training

BENCHMARKS: dict[str, Benchmark] = {
    "matmul": bench_matmul,  # the machine's matmul rate, listed first (each entry times its own reference)
    "exact_step": bench_exact_step,
    "exact_step_memory": bench_exact_step_memory,
    "ddim_digits": bench_ddim_digits,
    "census_digits": bench_census_digits,
    "training": bench_training,
    "sampling": bench_sampling,
    "knn": bench_knn,
    "basins": bench_basins,
    "lpips_knn": bench_lpips_knn,
    "outofcore": bench_outofcore,
}


# run_benchmarks(only=None, *, device="cpu", size="full", repeats=3, rounds=5, progress=None): the
# benchmarks named in `only` (all of BENCHMARKS when empty) in one context, entries in the order run;
# ValueError for an unknown name or size, or rounds that are not odd
run_benchmarks = functools.partial(run_suite, BENCHMARKS)
