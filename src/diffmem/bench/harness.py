"""The benchmark harness: every figure is a ratio against a reference timed in the same rounds.

A machine shared with other processes changes speed from one second to the next. A reference
timed once, at another moment, moves the ratio with the neighbours' load: on a busy 2-core machine
the exact step came out at 0.32 and then 0.50 of a matmul rate timed earlier, against 0.745 quiet.
So the reference A and the work B are timed interleaved, A B A B ..., in several rounds, each round
keeping the best of a few passes of each: load that lasts a round slows A and B alike and cancels
in that round's ratio. An entry reports every round's ratio, the median round (its value,
reference and ratio) and the interquartile range of the per-round ratios, and is flagged unstable
when that range is too wide to judge its goal.

The benchmarks live one module each (or one per related group) and are listed in
diffmem.bench.registry; this module knows none of them.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch

SIZES = ("full", "quick")
GOAL_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
GOAL_ON = ("ratio", "value")
MAX_RELATIVE_SPREAD = 0.25  # an interquartile range wider than this share of the median is unstable
SPREAD = "interquartile range of the per-round ratios"
HEAVY_ROUNDS = 3  # rounds of benchmarks whose one pass takes seconds (training, census, searches)
Timer = Callable[[], float]  # runs the work once and returns its seconds
T = TypeVar("T")


@dataclass(frozen=True)
class Goal:
    """How an entry is judged: its ratio (or its value) `op` threshold, e.g. ratio >= 0.7."""

    op: str  # one of GOAL_OPS
    threshold: float
    on: str = "ratio"  # the quantity compared: "ratio" or "value"
    unit: str = ""  # printed after the threshold of a goal on the value
    full_only: bool = False  # judged at the full problem size only (quick sizes are smoke runs)

    def __post_init__(self):
        if self.op not in GOAL_OPS:
            raise ValueError(f"unknown goal comparison {self.op!r}; choose one of {list(GOAL_OPS)}")
        if self.on not in GOAL_ON:
            raise ValueError(f"a goal is on one of {GOAL_ON}, got {self.on!r}")

    def __str__(self) -> str:
        text = f"{self.op} {self.threshold:g}"
        if self.on == "value":
            text = f"value {text}" + (f" {self.unit}" if self.unit else "")
        return text + (" (full size)" if self.full_only else "")

    def judged(self, size: str) -> bool:
        return size == "full" or not self.full_only

    def holds(self, x: float) -> bool:
        return bool(GOAL_OPS[self.op](x, self.threshold))


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(q25, median, q75) of xs, interpolating linearly between order statistics (numpy's default):
    for 5 rounds, the 2nd, 3rd and 4th smallest."""
    if not xs:
        raise ValueError("quartiles of an empty sequence")
    s = sorted(xs)

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (pos - lo) * (s[hi] - s[lo])

    return q(0.25), q(0.5), q(0.75)


def is_unstable(ratios: Sequence[float], goal: Goal | None, size: str, values: Sequence[float] = ()) -> bool:
    """Whether the rounds are too spread to judge: the interquartile range of the ratios exceeds
    MAX_RELATIVE_SPREAD of their median, or the goal's threshold lies strictly inside the
    interquartile range of the quantity it judges (the ratios, or `values` for a goal on the value),
    so that some rounds meet it and others do not."""
    lo, mid, hi = quartiles(ratios)
    if hi - lo > MAX_RELATIVE_SPREAD * abs(mid):
        return True
    if goal is None or not goal.judged(size):
        return False
    lo, _, hi = quartiles(values if goal.on == "value" else ratios)
    return lo < goal.threshold < hi


@dataclass(frozen=True)
class BenchEntry:
    """One figure of a run: value, the reference it is compared with and their ratio, the goal and
    whether the median round meets it; for a timed figure also every round's ratio and their spread."""

    name: str
    value: float
    unit: str
    reference: float | None  # a figure measured in the same run (None only for a reference itself)
    reference_name: str
    ratio: float | None  # value / reference; of the median round for an entry timed in rounds
    goal: str  # how the ratio is judged, e.g. ">= 0.7", or "report"
    met: bool | None  # whether the goal is met by the median round (None when there is no goal)
    notes: str = ""
    ratios: tuple[float, ...] = ()  # each round's ratio in the order run; () for an untimed figure
    spread: tuple[float, float] | None = None  # (q25, q75) of `ratios`
    unstable: bool = False  # the rounds are too spread to judge the goal (see is_unstable)

    @classmethod
    def measured(
        cls,
        name: str,
        value: float,
        unit: str,
        reference: float,
        reference_name: str,
        goal: Goal | None,
        size: str,
        notes: str = "",
        *,
        also: bool = True,
    ) -> BenchEntry:
        """A figure that is not a time (a count, a memory size, an error): measured once, no rounds.
        `also` is a further condition of the goal that the ratio cannot express."""
        ratio = value / reference
        met = _met(goal, size, value, ratio)
        met = None if met is None else met and also
        return cls(name, value, unit, reference, reference_name, ratio, _goal_text(goal), met, notes)

    @classmethod
    def timed(
        cls,
        name: str,
        unit: str,
        values: Sequence[float],
        references: Sequence[float],
        reference_name: str,
        goal: Goal | None,
        size: str,
        notes: str = "",
    ) -> BenchEntry:
        """A figure timed in interleaved rounds: values[i] / references[i] is round i's ratio. The entry
        takes the value, reference and ratio of the median round (the lower middle one for an even
        count), so that ratio == value / reference still holds."""
        if len(values) != len(references) or not values:
            raise ValueError(f"one value and one reference per round, got {len(values)} and {len(references)}")
        ratios = tuple(v / r for v, r in zip(values, references, strict=True))
        mid = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]
        lo, _, hi = quartiles(ratios)
        return cls(
            name,
            values[mid],
            unit,
            references[mid],
            reference_name,
            ratios[mid],
            _goal_text(goal),
            _met(goal, size, values[mid], ratios[mid]),
            notes,
            ratios,
            (lo, hi),
            is_unstable(ratios, goal, size, values),
        )


def _goal_text(goal: Goal | None) -> str:
    return "report" if goal is None else str(goal)


def _met(goal: Goal | None, size: str, value: float, ratio: float) -> bool | None:
    if goal is None or not goal.judged(size):
        return None
    return goal.holds(value if goal.on == "value" else ratio)


@dataclass(frozen=True)
class MatmulReference:
    """Bare float32 products (m, k) @ (k, n), one per shape, on fixed random operands: the reference
    of a work made of the same products, timed beside it."""

    shapes: tuple[tuple[int, int, int], ...]  # (m, k, n) of each product
    run: Callable[[], object]

    @property
    def flops(self) -> float:
        return float(sum(2 * m * k * n for m, k, n in self.shapes))

    def describe(self) -> str:
        return "bare float32 products " + ", ".join(f"({m},{k})@({k},{n})" for m, k, n in self.shapes)


class BenchContext:
    """Device, problem size and timing settings shared by the benchmarks of one run.

    repeats: passes of each timer per round, the best kept; rounds: interleaved rounds (odd, so
    that the median is one round's ratio)."""

    def __init__(self, device: str, size: str, repeats: int, rounds: int = 5):
        if size not in SIZES:
            raise ValueError(f"unknown benchmark size {size!r}; choose one of {SIZES}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if rounds < 1 or rounds % 2 == 0:
            raise ValueError(f"rounds must be an odd number >= 1 (the median is then one round's ratio), got {rounds}")
        self.device = torch.device(device)
        self.size = size
        self.repeats = repeats
        self.rounds = rounds

    @property
    def heavy_rounds(self) -> int:
        """Rounds of a benchmark whose one pass takes seconds: at most HEAVY_ROUNDS."""
        return min(self.rounds, HEAVY_ROUNDS)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], T]) -> tuple[T, float]:
        """One run of fn, no warm-up: its result and its wall time, the device synchronised around it."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def clock(self, fn: Callable[[], object], best_of: int = 1) -> Timer:
        """A timer of fn: the best wall time of `best_of` runs, the device synchronised around each."""
        return lambda: min(self.timed(fn)[1] for _ in range(best_of))

    def interleave(
        self,
        timers: Mapping[str, Timer],
        *,
        rounds: int | None = None,
        repeats: int | None = None,
        warmup: bool = True,
    ) -> dict[str, tuple[float, ...]]:
        """Seconds of each timer per round, timed interleaved: after one warm-up pass of each (unless
        warmup is False), every round runs `repeats` (default ctx.repeats) passes of A B C ... in the
        order given and keeps each timer's best; `rounds` defaults to ctx.rounds."""
        if not timers:
            raise ValueError("interleave needs at least one timer")
        if warmup:
            for timer in timers.values():
                timer()
        out: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(rounds or self.rounds):
            best = dict.fromkeys(timers, math.inf)
            for _ in range(repeats or self.repeats):
                for name, timer in timers.items():
                    best[name] = min(best[name], timer())
            for name, seconds in best.items():
                out[name].append(seconds)
        return {name: tuple(s) for name, s in out.items()}

    def matmul_reference(self, shapes: Sequence[tuple[int, int, int]]) -> MatmulReference:
        """Bare float32 products of the given (m, k, n) shapes on this device, operands drawn once."""
        g = torch.Generator(device=self.device).manual_seed(0)
        pairs = [
            (torch.randn(m, k, generator=g, device=self.device), torch.randn(k, n, generator=g, device=self.device))
            for m, k, n in shapes
        ]
        return MatmulReference(tuple(shapes), lambda: [a @ b for a, b in pairs])

    @property
    def matmul_size(self) -> int:
        return 2048 if self.size == "full" else 512


Benchmark = Callable[[BenchContext], list[BenchEntry]]


def bench_matmul(ctx: BenchContext) -> list[BenchEntry]:
    """The machine's float32 matmul rate, square n x n, per round: not the reference of the other
    entries (each times its own beside its work), but the rate a reader compares machines by, and
    its spread over the rounds shows how busy the machine was."""
    n = ctx.matmul_size
    ref = ctx.matmul_reference([(n, n, n)])
    seconds = ctx.interleave({"matmul": ctx.clock(ref.run)}, repeats=max(ctx.repeats, 3))["matmul"]
    rates = sorted(ref.flops / s / 1e9 for s in seconds)
    return [
        BenchEntry(
            "matmul_float32",
            rates[(len(rates) - 1) // 2],
            "GFLOP/s",
            None,
            "-",
            None,
            "reference",
            None,
            f"{n}x{n} @ {n}x{n} float32, {torch.get_num_threads()} threads, device {ctx.device}; median of "
            f"{len(rates)} rounds, {rates[0]:.4g}..{rates[-1]:.4g} GFLOP/s",
        )
    ]


def run_suite(
    benchmarks: Mapping[str, Benchmark],
    only: list[str] | None = None,
    *,
    device: str = "cpu",
    size: str = "full",
    repeats: int = 3,
    rounds: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[BenchEntry]:
    """Run the named benchmarks (all of `benchmarks` when `only` is empty) in order, in one context."""
    names = list(benchmarks) if not only else only
    unknown = [n for n in names if n not in benchmarks]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {list(benchmarks)}")
    ctx = BenchContext(device, size, repeats, rounds)
    entries: list[BenchEntry] = []
    for name in names:
        if progress:
            progress(f"bench: {name} ...")
        entries.extend(benchmarks[name](ctx))
    return entries


def _status(e: BenchEntry) -> str:
    if e.unstable:
        return "unstable" + ("" if e.met is None else f" (median {'met' if e.met else 'NOT met'})")
    return "" if e.met is None else ("met" if e.met else "NOT met")


def format_table(entries: list[BenchEntry]) -> str:
    """One line per entry; the ratio is the median round's, the spread the IQR of the rounds' ratios."""
    head = f"{'name':<32} {'value':>10} {'unit':<9} {'reference':>10} {'ratio':>8} {'spread (IQR)':>15} {'n':>2}  goal"
    lines = [head, "-" * len(head)]
    for e in entries:
        ref = "-" if e.reference is None else f"{e.reference:.4g}"
        ratio = "-" if e.ratio is None else f"{e.ratio:.3f}"
        spread = "-" if e.spread is None else f"{e.spread[0]:.3f}..{e.spread[1]:.3f}"
        n = len(e.ratios) or "-"
        status = _status(e)
        lines.append(
            f"{e.name:<32} {e.value:>10.4g} {e.unit:<9} {ref:>10} {ratio:>8} {spread:>15} {n:>2}  {e.goal}"
            + (f"  {status}" if status else "")
        )
    lines.append(
        f"ratio: of the median of n interleaved rounds; spread: {SPREAD}; unstable: spread over "
        f"{MAX_RELATIVE_SPREAD:.0%} of the median, or the goal inside it"
    )
    return "\n".join(lines)


def entries_to_json(entries: list[BenchEntry]) -> list[dict]:
    return [asdict(e) for e in entries]
