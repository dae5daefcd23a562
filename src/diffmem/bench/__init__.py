"""The benchmark harness and one module per benchmark; every figure is a ratio against a reference
timed in turn with it, in rounds. harness (contexts, entries, output) sits below the benchmark modules,
and registry lists them by name."""

from diffmem.bench.harness import BenchContext, BenchEntry, Goal, entries_to_json, format_table
from diffmem.bench.registry import BENCHMARKS, run_benchmarks

__all__ = ["BENCHMARKS", "BenchContext", "BenchEntry", "Goal", "entries_to_json", "format_table", "run_benchmarks"]
