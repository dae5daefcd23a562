"""The benchmark harness: interleaved rounds, per-round ratios, their spread and the unstable flag,
checked on injected timings; and one cheap entry end to end through the command line."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from diffmem.bench import harness
from diffmem.bench.harness import BenchContext, BenchEntry, Goal, format_table, is_unstable, quartiles, run_suite
from diffmem.cli.app import app

runner = CliRunner()


class Load:
    """A shared machine: every call of a fake timer is one tick, and both timers report their base
    time times the load at their tick. `profile(tick)` is the load factor."""

    def __init__(self, profile):
        self.profile = profile
        self.tick = 0
        self.calls: list[str] = []

    def timer(self, name: str, base: float):
        def run() -> float:
            self.calls.append(name)
            seconds = base * self.profile(self.tick)
            self.tick += 1
            return seconds

        return run


# --- interleaving ---------------------------------------------------------------------------------


def test_interleave_runs_a_b_a_b_and_keeps_each_rounds_best():
    times = iter([9.0, 9.0, 4.0, 2.0, 3.0, 5.0, 7.0, 1.0, 6.0, 8.0])  # warm-up pair, then 2 rounds x 2 passes
    calls = []

    def fake(name):
        def run():
            calls.append(name)
            return next(times)

        return run

    t = BenchContext("cpu", "quick", repeats=2, rounds=3).interleave(
        {"A": fake("A"), "B": fake("B")}, rounds=2, repeats=2
    )
    assert calls == ["A", "B"] * 5  # one warm-up pass, then A B A B in every round
    assert t == {"A": (3.0, 6.0), "B": (2.0, 1.0)}  # round 1 passes (4, 2), (3, 5); round 2 (7, 1), (6, 8)


def test_interleave_three_timers_without_warmup_uses_the_context_defaults():
    load = Load(lambda tick: 1.0)
    ctx = BenchContext("cpu", "quick", repeats=1, rounds=3)
    t = ctx.interleave({"A": load.timer("A", 1.0), "B": load.timer("B", 2.0), "C": load.timer("C", 3.0)}, warmup=False)
    assert load.calls == ["A", "B", "C"] * 3
    assert t == {"A": (1.0,) * 3, "B": (2.0,) * 3, "C": (3.0,) * 3}
    with pytest.raises(ValueError, match="at least one timer"):
        ctx.interleave({})


def test_clock_keeps_the_best_of_its_runs(monkeypatch):
    ticks = iter([0.0, 5.0, 10.0, 12.0, 20.0, 23.0])  # runs of 5, 2 and 3 seconds
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(ticks))
    ran = []
    assert BenchContext("cpu", "quick", 1).clock(lambda: ran.append(1), best_of=3)() == 2.0
    assert len(ran) == 3


def test_load_that_slows_both_alike_leaves_the_interleaved_ratio_unchanged():
    # the neighbours start a job and slow everything 3x from tick 8 on, 5x from tick 20 on; in the
    # interleaved run below that is from the second round on (a warm-up pair, then 6 ticks a round)
    def profile(tick):
        return 1.0 if tick < 8 else 3.0 if tick < 20 else 5.0

    ref_s, work_s = 0.010, 0.014  # the true ratio of rates, reference time / work time, is 10 / 14
    ctx = BenchContext("cpu", "quick", repeats=3, rounds=5)

    load = Load(profile)
    t = ctx.interleave({"ref": load.timer("ref", ref_s), "work": load.timer("work", work_s)})
    entry = BenchEntry.timed("x", "1/s", [1 / s for s in t["work"]], [1 / s for s in t["ref"]], "ref", None, "quick")
    assert {s / ref_s for s in t["ref"]} == {1.0, 3.0, 5.0}  # the load did change between rounds
    assert entry.ratios == pytest.approx([ref_s / work_s] * 5, rel=1e-12)
    assert entry.spread == pytest.approx((ref_s / work_s,) * 2) and not entry.unstable

    # the old scheme: the reference timed once (best of 10), the work later under the new load
    load = Load(profile)
    ref = ctx.interleave({"ref": load.timer("ref", ref_s)}, rounds=1, repeats=10)["ref"][0]
    work = ctx.interleave({"work": load.timer("work", work_s)}, rounds=1, repeats=10)["work"][0]
    assert ref / work == pytest.approx(ref_s / work_s / 3)  # a third of the true ratio


# --- ratios, spread and the unstable flag ------------------------------------------------------------


def test_quartiles_match_numpy_linear_interpolation():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 5, 7, 10):
        xs = rng.uniform(0, 2, size=n).tolist()
        assert quartiles(xs) == pytest.approx(tuple(np.percentile(xs, [25, 50, 75])), rel=1e-12)
    assert quartiles([5.0, 1.0, 4.0, 2.0, 3.0]) == (2.0, 3.0, 4.0)  # 5 rounds: 2nd, 3rd, 4th smallest
    with pytest.raises(ValueError, match="empty"):
        quartiles([])


def test_timed_entry_takes_the_median_round_and_the_interquartile_range():
    values = [40.0, 90.0, 70.0, 80.0, 60.0]  # GFLOP/s per round
    refs = [80.0, 100.0, 100.0, 100.0, 100.0]  # ratios 0.5, 0.9, 0.7, 0.8, 0.6
    e = BenchEntry.timed("step", "GFLOP/s", values, refs, "bare products", Goal(">=", 0.5), "quick")
    assert e.ratios == pytest.approx((0.5, 0.9, 0.7, 0.8, 0.6))
    assert (e.value, e.reference) == (70.0, 100.0)  # round 3 has the median ratio
    assert e.ratio == pytest.approx(0.7) and e.ratio == e.value / e.reference
    assert e.spread == pytest.approx((0.6, 0.8))
    assert e.met is True and e.goal == ">= 0.5"
    # IQR 0.2 is 29% of the median 0.7: too wide to state the ratio to the goal's precision
    assert e.unstable
    even = BenchEntry.timed("e", "s", [1.0, 2.0, 3.0, 4.0], [1.0] * 4, "r", None, "quick")
    assert even.ratio == 2.0  # the lower middle round, so that ratio == value / reference still holds
    with pytest.raises(ValueError, match="one value and one reference per round"):
        BenchEntry.timed("e", "s", [1.0, 2.0], [1.0], "r", None, "quick")


def test_unstable_when_the_goal_lies_inside_the_spread():
    goal = Goal(">=", 0.7)
    inside = [0.66, 0.69, 0.71, 0.73, 0.74]  # IQR 0.69..0.73, 6% of the median, but it straddles 0.7
    assert is_unstable(inside, goal, "quick")
    e = BenchEntry.timed("k", "GFLOP/s", inside, [1.0] * 5, "r", goal, "quick")
    assert e.unstable and e.met is True
    above = [0.74, 0.75, 0.76, 0.77, 0.60]  # one slow round: the IQR 0.74..0.76 clears the goal
    assert not is_unstable(above, goal, "quick")
    wide = [1.0, 1.5, 2.0, 2.5, 3.0]  # IQR 1.5..2.5 is 50% of the median
    assert is_unstable(wide, None, "quick") and is_unstable(wide, Goal("<=", 10), "quick")
    assert not is_unstable([0.5, 0.5, 0.5], goal, "quick")
    # a goal judged at full size only does not make a quick run unstable
    assert not is_unstable(inside, Goal(">=", 0.7, full_only=True), "quick")
    assert is_unstable(inside, Goal(">=", 0.7, full_only=True), "full")
    # a goal on the value is checked against the spread of the values
    assert is_unstable([1.0] * 3, Goal("<", 30, on="value"), "full", values=[25.0, 29.0, 33.0])  # IQR 27..31
    assert not is_unstable([1.0] * 3, Goal("<", 30, on="value"), "full", values=[25.0, 27.0, 28.0])


def test_measured_entries_goals_and_context_checks():
    e = BenchEntry.measured("mm", 3.0, "MB", 300.0, "naive", Goal("<=", 0.01), "quick")
    assert e.ratio == 0.01 and e.met is True and e.ratios == () and e.spread is None and not e.unstable
    assert BenchEntry.measured("g", 0.0, "x", 1.0, "r", Goal("<=", 1), "quick", also=False).met is False
    assert BenchEntry.measured("c", 5.0, "s", 1.0, "r", Goal("<", 30, "value", "s", True), "quick").met is None
    assert str(Goal("<", 30, on="value", unit="s", full_only=True)) == "value < 30 s (full size)"
    assert str(Goal("==", 0)) == "== 0"
    with pytest.raises(ValueError, match="unknown goal comparison"):
        Goal("=>", 1)
    with pytest.raises(ValueError, match="a goal is on one of"):
        Goal(">=", 1, on="seconds")
    with pytest.raises(ValueError, match="rounds must be an odd number"):
        BenchContext("cpu", "quick", 1, rounds=4)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        BenchContext("cpu", "quick", 0)
    assert BenchContext("cpu", "full", 1, rounds=9).heavy_rounds == 3
    ref = BenchContext("cpu", "quick", 1).matmul_reference([(2, 3, 4), (2, 4, 3)])
    assert ref.flops == 2 * 24 * 2 and ref.describe() == "bare float32 products (2,3)@(3,4), (2,4)@(4,3)"
    assert [p.shape for p in ref.run()] == [(2, 4), (2, 3)]


def test_run_suite_passes_rounds_and_the_table_shows_spread_and_flag():
    def fake(ctx):
        assert ctx.rounds == 3 and ctx.repeats == 2
        return [
            BenchEntry.timed("steady", "1/s", [1.0, 1.01, 0.99], [1.0] * 3, "r", Goal(">=", 0.9), ctx.size),
            BenchEntry.timed("noisy", "1/s", [0.5, 1.0, 2.0], [1.0] * 3, "r", Goal(">=", 0.9), ctx.size),
        ]

    entries = run_suite({"fake": fake}, size="quick", repeats=2, rounds=3)
    table = format_table(entries)
    assert "spread (IQR)" in table and "interquartile range of the per-round ratios" in table
    steady, noisy = table.splitlines()[2:4]
    assert "0.995..1.005" in steady and steady.endswith("met") and "unstable" not in steady
    assert "0.750..1.500" in noisy and noisy.endswith("unstable (median met)")


# --- the command line ------------------------------------------------------------------------------


def test_bench_command_reports_rounds_spread_and_flag(tmp_path):
    out = tmp_path / "bench.json"
    res = runner.invoke(
        app, ["bench", "--size", "quick", "--only", "exact_step", "--rounds", "3", "--repeats", "1", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    (e,) = json.loads(out.read_text())
    assert e["name"] == "exact_step_gflops" and e["reference_name"].startswith("bare float32 products")
    assert len(e["ratios"]) == 3 and all(math.isfinite(r) and r > 0 for r in e["ratios"])
    assert e["ratio"] == pytest.approx(sorted(e["ratios"])[1])  # the median round's
    assert e["ratio"] == pytest.approx(e["value"] / e["reference"])
    lo, hi = e["spread"]
    assert min(e["ratios"]) <= lo <= e["ratio"] <= hi <= max(e["ratios"])
    assert isinstance(e["unstable"], bool) and e["goal"] == ">= 0.7"
    assert "exact_step_gflops" in res.output and "spread (IQR)" in res.output

    res = runner.invoke(app, ["bench", "--size", "quick", "--only", "exact_step", "--rounds", "4"])
    assert res.exit_code == 2 and "--rounds must be an odd number" in res.output and "Traceback" not in res.output


def test_bench_threads_option_sets_torch_threads_and_refuses_zero(monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    monkeypatch.setattr("diffmem.cli.bench.run_benchmarks", lambda *a, **k: [])
    res = runner.invoke(app, ["bench", "--size", "quick", "--threads", "1"])
    assert res.exit_code == 0 and seen == [1]
    res = runner.invoke(app, ["bench", "--threads", "0"])
    assert res.exit_code == 2 and "--threads must be >= 1" in res.output
