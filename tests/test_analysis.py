"""Evaluation of a trained run: stages, outputs, CLI."""

import csv
import json

import numpy as np
import pytest

from diffmem.evaluate.analysis import AnalysisConfig, RunAnalysis, analyze_run
from diffmem.models.train import TrainConfig, train

SMALL = {"kind": "mlp", "mlp": {"hidden": 32, "depth": 2, "emb_dim": 16}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits-k8"
    config = TrainConfig(k=8, steps=60, batch_size=16, log_every=30, warmup_steps=5, n_held_out=64, network=SMALL)
    train(config, out, progress=False)
    return out


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def small_analysis(extra: dict | None = None, *, enable: tuple[str, ...] = ()) -> AnalysisConfig:
    """A fast AnalysisConfig; `extra` overrides any key (nested dicts as in a study config)."""
    base = {
        "sampling": {"n_samples": 24, "steps": 8},
        "classify": {"n_bootstrap": 200},
        "analyses": {
            "basins": {"n_points": 3, "n_trials": 4, "steps": 4},
            "energy": {"n_points": 3},
            "curvature": {"n_points": 3},
        },
    }
    d = merged(base, extra or {})
    for name in enable:
        d["analyses"].setdefault(name, {})["enabled"] = True
    return AnalysisConfig.from_dict(d)


GIVEN = {"classify": {"calibration": "given"}}


def test_sample_distances_classify_write_consistent_tables(run_dir):
    result = analyze_run(run_dir, small_analysis())
    out = run_dir / "analysis"
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 24
    summary = json.loads((out / "classification.json").read_text())
    counts = {c: sum(r["class"] == c for r in rows) for c in ("memorized", "spurious", "generalized", "off_manifold")}
    assert summary["counts"] == counts and summary["classes"] == list(counts)
    assert sum(f["value"] for f in summary["fractions"].values()) == pytest.approx(1.0)
    for f in summary["fractions"].values():
        assert f["low"] <= f["value"] <= f["high"] and f["n"] == 24
    # the table agrees with the thresholds it reports
    dm, ds, scale = summary["delta_m"], summary["delta_s"], summary["calibration"]["manifold"]["scale"]
    for r in rows:
        m, s, rho = float(r["m"]), float(r["s"]), float(r["manifold_ratio"])
        novel = "generalized" if rho <= scale else "off_manifold"
        expected = "memorized" if m <= dm else ("spurious" if s <= ds else novel)
        assert r["class"] == expected
        assert int(r["nearest_generated"]) != int(r["index"])
    assert sum(f["value"] for f in summary["three_class_fractions"].values()) == pytest.approx(1.0)
    assert set(summary["quality"]) == {"precision", "recall", "density", "coverage"}
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        assert f["samples"].shape == (24, 64) and f["seeds"].tolist() == list(range(24))
    assert (out / "gallery.png").stat().st_size > 1000
    assert result["classification"]["calibration"]["n_held_out"] == 64


def test_given_thresholds_are_used_as_given(run_dir):
    result = analyze_run(run_dir, small_analysis(merged(GIVEN, {"classify": {"delta_m": 1e-6, "delta_s": 1e-6}})))
    c = result["classification"]
    assert c["delta_m"] == 1e-6 and c["calibration"]["calibration"] == "given"
    assert c["counts"]["memorized"] == 0


def test_stage_needs_its_inputs(run_dir):
    a = RunAnalysis(run_dir, small_analysis({"sampling": {"n_samples": 30}}))
    (run_dir / "analysis" / "samples.csv").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="run the 'classify' stage first|samples.csv"):
        a.ctx.labels()


def test_pickled_npz_is_refused(run_dir):
    a = RunAnalysis(run_dir, small_analysis())
    np.savez(run_dir / "analysis" / "samples.npz", samples=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="pickled"):
        a.ctx.samples()
    a.run("sample")  # recomputing replaces the refused file
    assert a.ctx.samples()[0].shape == (24, 64)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sampling": {"n_samples": 1}}, "sampling.n_samples: the spurious test compares samples"),
        ({"classify": {"delta_m": 0.0}}, r"classify.delta_m: must be > 0"),
        ({"classify": {"delta_s": -2.0}}, r"classify.delta_s: must be > 0"),
        ({"metric": {"name": "ssim"}}, "metric.name: unknown value 'ssim'"),
        ({"sampling": {"sampler": "dpm"}}, "sampling.sampler: unknown value 'dpm'"),
        ({"analyses": {"basins": {"p": 1.0}}}, r"analyses.basins.p: must lie in \(0, 1\)"),
        ({"analyses": {"basins": {"sigma_min": 2.0, "sigma_max": 1.0}}}, "analyses.basins.sigma_min: must be below"),
        ({"analyses": {"colapse": {}}}, "did you mean collapse"),
    ],
)
def test_bad_analysis_options(kw, match):
    with pytest.raises(ValueError, match=match):
        small_analysis(kw)


def test_enable_switches_on_optional_stages_only():
    config = AnalysisConfig().enable("basins", "collapse")
    assert config.stages() == ("sample", "distances", "classify", "basins", "collapse")
    with pytest.raises(ValueError, match="unknown analyses"):
        config.enable("classify")


def test_missing_run_directory(tmp_path):
    with pytest.raises(ValueError, match="run directory not found"):
        RunAnalysis(tmp_path / "nope")


def test_no_held_out_data_needs_thresholds(tmp_path):
    out = tmp_path / "r"
    train(TrainConfig(k=8, steps=5, batch_size=8, warmup_steps=1, network=SMALL), out, progress=False)
    with pytest.raises(ValueError, match="n_held_out"):
        analyze_run(out, small_analysis())
    given = merged(GIVEN, {"classify": {"delta_m": 0.1, "delta_s": 0.1}})
    with pytest.raises(ValueError, match="the manifold test needs held-out images"):
        analyze_run(out, small_analysis(given))
    result = analyze_run(out, small_analysis(merged(given, {"classify": {"quality": "none"}})))
    assert result["classification"]["n_samples"] == 24 and result["classification"]["classes"] == [
        "memorized",
        "spurious",
        "generalized",
    ]


def test_collapse_stage(run_dir):
    result = analyze_run(run_dir, small_analysis({"analyses": {"collapse": {"n_samples": 10}}}, enable=("collapse",)))
    rows = list(csv.DictReader((run_dir / "analysis" / "collapse.csv").open()))
    assert len(rows) == 10
    assert result["collapse"]["n"] == 10
    top = max(float(r["sigma_nearest"]) for r in rows)
    assert 0 <= top <= 160  # inside the sampling range of the linear VP schedule


def test_attractor_stages_write_per_class_summaries(run_dir):
    extra = {
        "analyses": {
            "energy": {"n_nodes": 8},
            "census": {"n_starts": 8},
            "basins": {"sigma_max": 5.0, "rtol": 0.1},
        }
    }
    config = small_analysis(extra, enable=("basins", "energy", "curvature", "census"))
    result = analyze_run(run_dir, config)
    out = run_dir / "analysis"
    labels = [r["class"] for r in csv.DictReader((out / "samples.csv").open())]
    for name in ("basins", "energy", "curvature"):
        rows = list(csv.DictReader((out / f"{name}.csv").open()))
        per_class = {c: min(3, labels.count(c)) for c in ("memorized", "spurious", "generalized")}
        per_class["training"] = 3
        assert {c: sum(r["class"] == c for r in rows) for c in per_class} == per_class
    basins = list(csv.DictReader((out / "basins.csv").open()))
    for r in basins:
        sc = float(r["sigma_c"])
        assert r["status"] in ("bracketed", "no_basin", "censored")
        assert (sc == 0) == (r["status"] == "no_basin")
        assert 0 <= sc <= 5.0 and int(r["n_calls"]) > 0
    assert result["basins"]["denoiser_calls"] == sum(int(r["n_calls"]) for r in basins)
    energy = list(csv.DictReader((out / "energy.csv").open()))
    for r in energy:
        a, b = float(r["energy_straight"]), float(r["energy_arc"])
        assert float(r["discrepancy"]) == pytest.approx(abs(a - b), rel=1e-5, abs=1e-4)  # float32 network
    curv = result["curvature"]
    assert curv["exact"] is True and curv["isotropic_curvature"] == pytest.approx(25.0)
    for r in csv.DictReader((out / "curvature.csv").open()):
        assert float(r["lambda_min"]) <= float(r["lambda_max"])
    census = json.loads((out / "census.json").read_text())
    assert sum(census["counts"].values()) == len(census["attractors"])
