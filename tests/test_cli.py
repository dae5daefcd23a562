"""The diffmem command line, through Typer's CLI runner."""

import json
import math

import pytest
import torch
import typer
from typer.testing import CliRunner

from diffmem.cli import evaluate as cli_evaluate
from diffmem.cli.app import app
from diffmem.evaluate.classify import CLASSES
from diffmem.evaluate.run import WITH_TRAINING
from diffmem.evaluate.stages import STAGES

runner = CliRunner()


def test_exact_demo_writes_summary_and_figure(tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(
        app, ["exact-demo", "--k", "4", "--k", "32", "--samples", "24", "--steps", "20", "--out", str(out)]
    )
    circle = json.loads((out / "summary.json").read_text())["circle_census"]
    counts = {p["title"]: p["counts"] for p in circle["panels"]}
    # two far-apart points at sigma 0.15
    assert counts["K = 2"] == {"memory": 2, "spurious": 0, "saddle": 1, "maximum": 0}
    assert counts["K = 9"]["spurious"] > 0  # merged neighbours
    assert circle["panels"][-1]["ring_radius"] > 0.9
    assert (out / "landscape.png").stat().st_size > 10_000
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["k"] for r in summary["results"]] == [4, 32]
    for r in summary["results"]:
        assert r["frac_memorized"] == 1.0  # the exact denoiser memorizes (SCIENCE.md §4)
        assert r["n_samples"] == 24 and 1 <= r["distinct_patterns"] <= r["k"]
    png = (out / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    assert f"results written to {out}" in res.output


def test_exact_demo_default_out_is_a_new_numbered_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["exact-demo", "--k", "3", "--samples", "4", "--steps", "5", "--circle", "skip"]
    for expected in ("diffmem-exact-00001", "diffmem-exact-00002"):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert (tmp_path / expected / "summary.json").exists()
        assert expected in res.stdout.strip().splitlines()[-1]


def test_exact_demo_is_reproducible(tmp_path):
    args = ["exact-demo", "--k", "50", "--samples", "16", "--steps", "10", "--seed", "7", "--circle", "skip"]
    for name in ("a", "b"):
        assert runner.invoke(app, [*args, "--out", str(tmp_path / name)]).exit_code == 0
    a = json.loads((tmp_path / "a" / "summary.json").read_text())["results"][0]
    b = json.loads((tmp_path / "b" / "summary.json").read_text())["results"][0]
    assert a["distinct_patterns"] == b["distinct_patterns"] and a["max_distance"] == b["max_distance"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["exact-demo", "--k", "0"], "positive"),
        (["exact-demo", "--k", "5000"], "exceeds the 1797 digits"),
        (["exact-demo", "--k", "8", "--k", "8"], "distinct"),
        (["exact-demo", "--samples", "0"], "--samples"),
        (["exact-demo", "--steps", "2000"], "--steps"),
        (["exact-demo", "--device", "tpu9"], "device"),
        (["demo", "--k", "0"], "ks: training-set sizes must be >= 1"),
        (["demo", "--k", "64", "--k", "8"], "ks: must be sorted ascending"),
        (["demo", "--k", "1700"], "K=1700 exceeds"),
        (["demo", "--executor", "slurm"], "executor"),
        (["demo", "--samples", "1"], "n_samples"),
        (["bench", "--only", "nope"], "unknown benchmark"),
        (["bench", "--size", "huge"], "unknown benchmark size"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["bench", "--out", "/nonexistent-dir/b.json"], "does not exist"),
        (["demo", "--circle", "maybe"], "--circle"),
        (["exact-demo", "--circle", "maybe"], "--circle"),
        (["census", "--data", "circle", "--k", "5", "--sigma", "0"], "--sigma must be >= 1e-12"),
        (["census", "--data", "circle", "--k", "5", "--sigma", "-1"], "--sigma must be >= 1e-12"),
        (["census", "--data", "circle", "--k", "5000", "--sigma", "0.2"], "--k must lie in [1, 2000]"),
        (["census", "--data", "circle", "--k", "5", "--sigma", "0.2", "--starts", "0"], "--starts"),
        (["census", "--k", "5", "--sigma", "0.2"], "exactly one of --data"),
        (["census", "--data", "mnist", "--k", "5", "--sigma", "0.2"], "pass root="),
        (["census", "--data", "imagenet", "--k", "5", "--sigma", "0.2"], "unknown dataset"),
        (["census", "--patterns", "/nonexistent.npz", "--k", "5", "--sigma", "0.2"], "not found"),
        (["census-sweep", "--data", "circle", "--sigma-min", "1", "--sigma-max", "0.5"], "--sigma-min"),
        (["census-sweep", "--data", "circle", "--n-sigma", "1"], "--n-sigma"),
        (["landscape", "--sigma", "0"], "--sigma must be >= 1e-12"),
        (["landscape", "--merge-k", "2"], "--merge-k"),
        (["landscape", "--merge-k", "8"], "at least two different K"),
        (["hopfield", "--n", "5"], "--n values"),
    ],
)
def test_bad_arguments_give_a_message_not_a_traceback(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a refusal may come after the default output directory was made
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_cuda():
    res = runner.invoke(app, ["demo", "--device", "cuda"])
    assert res.exit_code == 2 and "CUDA is not available" in res.output


def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("keep me")
    res = runner.invoke(
        app, ["exact-demo", "--k", "3", "--samples", "2", "--circle", "skip", "--out", str(blocker / "x")]
    )
    assert res.exit_code == 2 and "cannot create the output directory" in res.output
    assert blocker.read_text() == "keep me"


def test_bench_quick_writes_entries(tmp_path):
    out = tmp_path / "bench.json"
    # one round each: the rounds' arithmetic is tested in test_bench.py, here every benchmark runs end to end
    res = runner.invoke(app, ["bench", "--size", "quick", "--repeats", "1", "--rounds", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    entries = json.loads(out.read_text())
    names = [e["name"] for e in entries]
    assert names[:2] == ["matmul_float32", "exact_step_gflops"]
    assert "ddim_digits_seconds" in names and "exact_step_workspace_mb" in names and "census_digits_seconds" in names
    for e in entries:
        assert set(e) >= {"name", "value", "unit", "reference", "ratio"}
        assert math.isfinite(e["value"]) and e["value"] >= 0  # counts of errors and gaps may be 0
        if e["unit"] in ("GFLOP/s", "s", "images/s", "steps/s"):
            assert e["value"] > 0
        if e["reference"] is not None:
            assert e["ratio"] == pytest.approx(e["value"] / e["reference"])
    step = next(e for e in entries if e["name"] == "exact_step_gflops")
    # timed against its own bare products, interleaved with it round by round
    assert step["reference_name"].startswith("bare float32 products") and len(step["ratios"]) == 1
    assert step["spread"][0] <= step["ratio"] <= step["spread"][1]
    workspace = next(e for e in entries if e["name"] == "exact_step_workspace_mb")
    assert workspace["ratio"] < 1  # never the size of a (B, K, D) tensor
    assert "exact_step_gflops" in res.output
    assert {"knn_gflops", "knn_exact_mismatches", "basin_bisection_calls", "lpips_knn_queries_per_s"} <= set(names)
    mismatches = next(e for e in entries if e["name"] == "knn_exact_mismatches")
    assert mismatches["value"] == 0  # the exact search equals a float64 brute force


def test_help_shows_examples():
    commands = ("demo", "exact-demo", "bench", "census", "census-sweep", "landscape", "hopfield", "train", "sample")
    commands += ("memorization", "analyze", "two-model", "sweep", "report", "status")
    for cmd in commands:
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Examples" in res.output and f"diffmem {cmd}" in res.output


def test_census_command_writes_the_documented_record(tmp_path):
    out = tmp_path / "c"
    res = runner.invoke(
        app, ["census", "--data", "circle", "--k", "9", "--sigma", "0.15", "--starts", "200", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "census.json").read_text())
    assert {"sigma", "beta", "K", "n_starts", "n_converged", "counts", "attractors"} <= set(rec)
    assert rec["K"] == 9 and rec["beta"] == pytest.approx(1 / 0.15**2)
    assert sum(rec["counts"].values()) == len(rec["attractors"]) > 0
    for a in rec["attractors"]:
        assert {"x", "kind", "nearest_pattern", "distance", "share", "energy", "hessian_min", "hessian_max"} <= set(a)
    assert sum(a["share"] for a in rec["attractors"]) == pytest.approx(rec["n_converged"] / rec["n_starts"])
    assert (out / "census.png").stat().st_size > 10_000


def test_census_from_npz_gallery_and_pickle_refusal(tmp_path):
    import numpy as np

    good = tmp_path / "p.npz"
    np.savez(good, x=np.random.default_rng(0).uniform(-1, 1, size=(30, 16)))
    out = tmp_path / "c"
    res = runner.invoke(
        app, ["census", "--patterns", str(good), "--k", "20", "--sigma", "0.8", "--starts", "100", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "census.json").read_text())["K"] == 20
    assert (out / "census.png").exists()
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.array([object()], dtype=object))
    res = runner.invoke(app, ["census", "--patterns", str(bad), "--k", "1", "--sigma", "0.8"])
    assert res.exit_code == 2 and "pickled" in res.output and "Traceback" not in res.output


def test_census_sweep_writes_tables_and_heatmap(tmp_path):
    out = tmp_path / "s"
    res = runner.invoke(
        app,
        [
            "census-sweep",
            "--data",
            "circle",
            "--k",
            "2",
            "--k",
            "9",
            "--sigma-min",
            "0.05",
            "--sigma-max",
            "0.6",
            "--n-sigma",
            "3",
            "--starts",
            "60",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = (out / "phase.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 3 and rows[0].startswith("K,sigma,beta")
    th = json.loads((out / "phase.json").read_text())["thresholds"]
    assert [t["K"] for t in th] == [2, 9]
    assert (out / "phase.png").stat().st_size > 10_000


def test_landscape_and_hopfield_commands(tmp_path):
    res = runner.invoke(
        app,
        [
            "landscape",
            "--k",
            "2",
            "--k",
            "9",
            "--starts",
            "60",
            "--merge-k",
            "8",
            "--merge-k",
            "16",
            "--out",
            str(tmp_path / "l"),
        ],
    )
    assert res.exit_code == 0, res.output
    merging = json.loads((tmp_path / "l" / "merging.json").read_text())
    assert merging["K"] == [8, 16] and 0.8 < merging["exponent"] < 1.2
    assert (tmp_path / "l" / "landscape.png").exists() and (tmp_path / "l" / "merging.png").exists()
    res = runner.invoke(app, ["hopfield", "--n", "100", "--spins", "1000", "--out", str(tmp_path / "h")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "h" / "hopfield.json").read_text())
    assert set(rec) == {"capacity", "mixtures"} and (tmp_path / "h" / "hopfield_capacity.png").exists()


def test_train_and_sample_commands(tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        "digits",
        "--k",
        "8",
        "--steps",
        "20",
        "--batch-size",
        "16",
        "--hidden",
        "32",
        "--depth",
        "1",
        "--out",
        str(run),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (run / "checkpoint.safetensors").exists() and (run / "config.json").exists()
    assert "trained 20 steps" in res.output
    res = runner.invoke(app, ["sample", str(run), "--samples", "6", "--steps", "10", "--seed", "2"])
    assert res.exit_code == 0, res.output
    import numpy as np

    with np.load(run / "samples-00001" / "samples.npz", allow_pickle=False) as f:
        assert f["samples"].shape == (6, 64) and f["seeds"].tolist() == [2 * 1_000_003 + i for i in range(6)]
        assert (f["nearest_index"] < 8).all()
    assert (run / "samples-00001" / "samples.png").exists()
    again = runner.invoke(app, ["sample", str(run), "--samples", "6", "--steps", "10", "--seed", "2"])
    assert again.exit_code == 0 and (run / "samples-00002").exists()  # never overwrites
    with (
        np.load(run / "samples-00002" / "samples.npz", allow_pickle=False) as g,
        np.load(run / "samples-00001" / "samples.npz", allow_pickle=False) as f,
    ):
        np.testing.assert_array_equal(f["samples"], g["samples"])  # a sample is identified by its seed
    res = runner.invoke(
        app,
        ["sample", str(run), "--samples", "3", "--sampler", "ode", "--steps", "5", "--out", str(tmp_path / "s.npz")],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.npz").exists() and (tmp_path / "s.png").exists() and (tmp_path / "s.json").exists()
    res = runner.invoke(app, [*args[:-2], "--lr", "0.5", "--out", str(run)])
    assert res.exit_code == 2 and "different configuration" in res.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--k", "5000", "--out", "x"], "K=5000"),
        (["train", "--network", "gan", "--out", "x"], "Invalid value for '--network'"),
        (["train", "--subset", "pair_c", "--out", "x"], "Invalid value for '--subset'"),
        (["train", "--prediction", "v", "--out", "x"], "Invalid value for '--prediction'"),
        (["sample", ".", "--sampler", "dpm"], "Invalid value for '--sampler'"),
        (["sample", ".", "--weights", "best"], "Invalid value for '--weights'"),
        (["train", "--data", "mnist", "--out", "x"], "pass root="),
        (["sample", "/nonexistent-run"], "run directory not found"),
        (["sample", ".", "--sampler", "ddpm", "--eta", "0.5"], "--eta applies to the ddim sampler only"),
        (["train", "--device", "meta", "--out", "x"], "not supported"),
        (["analyze", ".", "--rule", "nope"], "Invalid value for '--rule'"),
        (["analyze", ".", "--lpips-net", "resnet"], "Invalid value for '--lpips-net'"),
        (["analyze", ".", "--rule", "ratio", "--delta-m", "0.1"], "uses no delta_m"),
    ],
)
def test_train_sample_bad_arguments(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_landscape_with_a_trained_circle_run(tmp_path):
    run = tmp_path / "circle"
    res = runner.invoke(
        app,
        [
            "train",
            "--data",
            "circle",
            "--k",
            "3",
            "--steps",
            "30",
            "--batch-size",
            "32",
            "--hidden",
            "32",
            "--depth",
            "1",
            "--out",
            str(run),
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        [
            "landscape",
            "--k",
            "2",
            "--starts",
            "30",
            "--merge-k",
            "8",
            "--merge-k",
            "12",
            "--trained",
            str(run),
            "--out",
            str(tmp_path / "l"),
        ],
    )
    assert res.exit_code == 0, res.output
    panels = json.loads((tmp_path / "l" / "landscape.json").read_text())["panels"]
    assert [p["title"] for p in panels] == ["K = 2", "continuum (K = inf)", "trained, K = 3"]
    assert panels[-1]["attractors"] and all(
        a["kind"] in ("memory", "spurious", "saddle", "maximum") for a in panels[-1]["attractors"]
    )


def _fake_analyze_run(seen: dict):
    """analyze_run replaced: records the config it is given and answers like analysis.json."""

    def analyze_run(run_dir, config, *, device, samples_file=None, progress=None):
        seen.update(run_dir=run_dir, config=config, device=device, samples_file=samples_file)
        frac = {"value": 0.5, "low": 0.25, "high": 0.75}
        c = config.classify
        classification = {
            "n_samples": config.sampling.n_samples,
            "metric": config.metric.name,
            "rule": c.rule,
            "delta_m": c.delta_m,
            "delta_s": 0.2 if c.delta_s is None else c.delta_s,
            "calibration": {"calibration": c.calibration},
            "fractions": {cls: frac for cls in CLASSES},
        }
        median = {"n": 2, "median": 0.25, "q25": 0.2, "q75": 0.3}
        return {
            "K": 16,
            "classification": classification,
            "outputs": {s: [f"/run/analysis/{s}.json"] for s in config.stages()},
            "basins": {"sigma_c": {cls: median for cls in WITH_TRAINING}},
            "census": {"memory": 3, "spurious": 1, "saddle": 2},
            "collapse": {"sigma_nearest": {cls: median for cls in CLASSES}},
        }

    return analyze_run


def test_analyze_maps_its_options_onto_the_analysis_config(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli_evaluate, "analyze_run", _fake_analyze_run(seen))
    args = ["analyze", "runs/x", "--samples", "8", "--steps", "4", "--sampler", "euler", "--seed", "3"]
    res = runner.invoke(app, [*args, "--points", "5", "--sigma", "0.3", "--basins", "--census", "--collapse"])
    assert res.exit_code == 0, res.output
    c = seen["config"]
    assert c.stages() == ("sample", "distances", "classify", "basins", "census", "collapse")
    s = c.sampling
    assert (s.sampler, s.steps, s.n_samples, s.seed, c.analyses.seed) == ("euler", 4, 8, 3, 3)
    a = c.analyses
    assert a.basins.n_points == a.energy.n_points == a.curvature.n_points == 5
    assert a.energy.sigma == a.curvature.sigma == a.census.sigma == 0.3
    assert (c.classify.calibration, c.classify.delta_m, c.classify.delta_s) == ("held_out", None, None)
    lines = res.output.splitlines()
    assert (
        "  basins: median sigma_c: memorized 0.25, spurious 0.25, generalized 0.25, off_manifold 0.25, training 0.25"
        in lines
    )
    assert "  census: memory 3, spurious 1, saddle 2" in lines
    assert (
        "  collapse: median sigma_nearest: memorized 0.25, spurious 0.25, generalized 0.25, off_manifold 0.25" in lines
    )
    assert not any("energy" in line for line in lines)  # a stage not asked for neither runs nor prints


@pytest.mark.parametrize(
    "args, calibration",
    [
        (["--delta-m", "0.1", "--delta-s", "0.2"], "given"),  # both thresholds the rule uses
        (["--delta-s", "0.2"], "held_out"),  # delta_m is still calibrated
        (["--rule", "ratio", "--delta-s", "0.2"], "given"),  # ratio uses delta_s only
        (["--rule", "ratio"], "held_out"),
    ],
)
def test_analyze_calibrates_only_the_thresholds_not_given(monkeypatch, args, calibration):
    seen = {}
    monkeypatch.setattr(cli_evaluate, "analyze_run", _fake_analyze_run(seen))
    res = runner.invoke(app, ["analyze", "runs/x", *args])
    assert res.exit_code == 0, res.output
    assert seen["config"].classify.calibration == calibration
    assert f"({calibration})" in res.output


def test_analyze_has_a_flag_for_every_optional_stage():
    params = {p.name: p for p in typer.main.get_command(app).commands["analyze"].params}
    optional = [(name, s.help) for name, s in STAGES.items() if s.optional]
    assert len(optional) >= 5
    for name, help_text in optional:
        assert params[name].opts == [f"--{name}"] and params[name].is_flag and params[name].help == help_text
    res = runner.invoke(app, ["analyze", "--help"])
    assert res.exit_code == 0 and all(f"--{name}" in res.output for name, _ in optional)


def test_analyze_absolute_adds_the_ode_to_the_energy_stage_and_prints_its_check(monkeypatch, tmp_path):
    seen = {}
    fake = _fake_analyze_run(seen)
    columns = ["energy_straight", "energy_straight_error", "energy_ode", "energy_ode_error", "energy_gap"]
    columns += ["energy_gap_error", "consistency", "consistency_error"]
    csv = tmp_path / "energy.csv"
    csv.write_text("class,index," + ",".join(columns) + "\nmemorized,7,-5.0,0.01,-6.5,0.02,-1.5,0.03,-2.25,0.5\n")

    def analyze_run(run_dir, config, **kw):
        result = fake(run_dir, config, **kw)
        result["outputs"]["energy"] = [str(csv), str(tmp_path / "energy.json")]
        median = {"n": 1, "median": -5.0}
        absolute = {"n_converged": 1, "n_agree": 0, "n_consistent": 0}
        result["energy"] = {"sigma": 0.5, "energy": {"memorized": median}, "quadrature": {"n_points": 1}}
        result["energy"]["absolute"] = absolute
        return result

    monkeypatch.setattr(cli_evaluate, "analyze_run", analyze_run)
    res = runner.invoke(app, ["analyze", "runs/x", "--energy", "--absolute", "--sigma", "0.5"])
    assert res.exit_code == 0, res.output
    assert seen["config"].analyses.energy.absolute == "ode" and seen["config"].analyses.energy.enabled
    assert "energy by the ODE: 0 of 1 points equal the line integral within errors, 0 of 1 pass" in res.output
    row = next(line.split() for line in res.output.splitlines() if line.strip().startswith("memorized      7"))
    assert row[2:] == ["-5", "+-", "0.01", "-6.5", "+-", "0.02", "-1.5", "+-", "0.03", "-2.25", "+-", "0.5"]
    res = runner.invoke(app, ["analyze", "runs/x", "--absolute"])
    assert res.exit_code != 0 and "give it with --energy" in res.output
    runner.invoke(app, ["analyze", "runs/x", "--energy"])
    assert seen["config"].analyses.energy.absolute == "none"
