"""Collapse times along sampling trajectories, and the speciation level the collapse figure shows."""

import json
import math

import matplotlib.pyplot as plt
import pytest
import torch

import diffmem.evaluate.stages.collapse as collapse_stage
from diffmem.core import EmpiricalDenoiser, VPSchedule, initial_noise
from diffmem.core.collapse import _last_run_start, collapse_times
from diffmem.core.theory import covariance_top_eigenvalue, speciation_sigma
from diffmem.evaluate.analysis import AnalysisConfig, RunAnalysis
from diffmem.io.data import load_dataset
from diffmem.io.files import write_csv_atomic, write_json_atomic
from diffmem.io.results import Job, Notes
from diffmem.models.train import TrainConfig, load_denoiser, train
from diffmem.viz.html import ReportContext
from diffmem.viz.html import Section as ReportSection
from diffmem.viz.sections import strip_section

SMALL = {"kind": "mlp", "mlp": {"hidden": 16, "depth": 1, "emb_dim": 8}}


def test_last_run_start():
    flags = torch.tensor(
        [
            [True, True, True, True],  # committed from the start
            [False, True, False, True],  # only the last step
            [True, False, True, True],
            [True, True, True, False],  # never at the end
        ]
    )
    assert _last_run_start(flags).tolist() == [0, 3, 2, 4]


def test_exact_denoiser_trajectories_commit_to_their_end_point():
    data = load_dataset("digits", dtype=torch.float64)
    train = data.x[:16]
    den = EmpiricalDenoiser(train)
    sigmas = VPSchedule().sampling_sigmas(40).double()
    g = torch.Generator().manual_seed(0)
    x = initial_noise((32, 64), float(sigmas[0]), generator=g, like=train)
    res = collapse_times(den, x, sigmas, train)
    assert float(res.final_distance.max()) < 1e-6  # the exact model memorizes
    assert torch.equal(res.nearest_path[:, -1], res.final_index)
    # the collapse level is where the final run of "nearest == final" starts, from the recorded path
    for i in range(32):
        same = (res.nearest_path[i] == res.final_index[i]).tolist()
        j = len(same)
        while j > 0 and same[j - 1]:
            j -= 1
        assert float(res.sigma_nearest[i]) == pytest.approx(float(sigmas[j]))
    # the posterior is one-hot at the end and committed before the last step
    assert float(res.top_weight_path[:, -1].min()) > 0.99
    assert bool((res.sigma_posterior > 0).all())
    # both readings lie inside the sampling range
    assert float(res.sigma_nearest.max()) <= float(sigmas[0])


def test_collapse_needs_matching_shapes():
    train = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="differ in example size"):
        collapse_times(EmpiricalDenoiser(train), torch.zeros(2, 5), VPSchedule().sampling_sigmas(5), train)


def _fake_job(root, k: int, seed: int, speciation) -> Job:
    """A job folder with a collapse.csv of three trajectories and a collapse.json with this speciation level."""
    analysis = root / f"k-{k:04d}-seed-{seed}" / "analysis"
    analysis.mkdir(parents=True)
    rows = [
        {"index": i, "class": c, "sigma_nearest": 0.5 + i, "sigma_posterior": 0.2 + i, "final_nearest": i}
        for i, c in enumerate(("memorized", "spurious", "generalized"))
    ]
    write_csv_atomic(analysis / "collapse.csv", rows)
    write_json_atomic(analysis / "collapse.json", {"n": 3, "speciation_sigma": speciation})
    return Job(analysis.parent.name, k, seed, analysis)


def _report(tmp_path, jobs, monkeypatch):
    """The collapse section of these jobs, and the lines its reference draws on a blank panel."""
    captured = {}

    def spy(ctx, spec, **kw):
        captured.update(kw, spec=spec)
        return strip_section(ctx, spec, **kw)

    monkeypatch.setattr(collapse_stage, "strip_section", spy)
    classes = ("memorized", "spurious", "generalized")
    ctx = ReportContext(tmp_path, jobs, {}, Notes(), classes, (*classes, "training"))
    section = collapse_stage.report_section(ctx)
    fig, ax = plt.subplots()
    if captured.get("reference") is not None:
        captured["reference"](ax, "sigma_nearest")
    drawn = [tuple(line.get_ydata()) for line in ax.get_lines()]
    drawn += [tuple(float(y) for (_, y) in seg[:1]) for c in ax.collections for seg in c.get_segments()]
    xs = [tuple(float(x) for x, _ in seg) for c in ax.collections for seg in c.get_segments()]
    plt.close(fig)
    return section, captured, drawn, xs


def test_collapse_report_draws_the_speciation_level(tmp_path, monkeypatch):
    jobs = [_fake_job(tmp_path, 8, seed, 1.34) for seed in (0, 1)]
    section, captured, drawn, _ = _report(tmp_path, jobs, monkeypatch)
    assert isinstance(section, ReportSection) and "<img" in section.body
    assert drawn == [(1.34, 1.34)]  # one horizontal line: every job has the same level
    assert "sigma_S = 1.34" in section.body and "Biroli" in section.body
    assert "speciation level" in captured["spec"].figure_title


def test_collapse_report_speciation_per_k(tmp_path, monkeypatch):
    # different Ks train on different sets: one segment over each K's strips; K = 16 has none
    jobs = [_fake_job(tmp_path, 4, 0, 2.0), _fake_job(tmp_path, 8, 0, 1.5), _fake_job(tmp_path, 16, 0, None)]
    section, _, drawn, xs = _report(tmp_path, jobs, monkeypatch)
    assert drawn == [(2.0,), (1.5,)]
    assert [round(sum(x) / 2) for x in xs] == [0, 1]  # centred on the strips of K = 4 and K = 8
    assert "K=4: 2, K=8: 1.5; none at K = 16" in section.body
    # the same level at every K that has one, but not at all of them: still segments, not a line
    jobs = [_fake_job(tmp_path / "same", 4, 0, 2.0), _fake_job(tmp_path / "same", 8, 0, None)]
    section, _, drawn, xs = _report(tmp_path / "same", jobs, monkeypatch)
    assert drawn == [(2.0,)] and [round(sum(x) / 2) for x in xs] == [0]


def test_collapse_report_without_a_speciation_level(tmp_path, monkeypatch):
    jobs = [_fake_job(tmp_path, 8, 0, None)]  # Lambda <= 1 (or a run from before the level was recorded)
    section, captured, drawn, _ = _report(tmp_path, jobs, monkeypatch)
    assert isinstance(section, ReportSection) and drawn == [] and captured.get("reference") is None
    assert "sigma_S" not in section.body


def test_collapse_stage_records_the_speciation_level_of_the_training_data(tmp_path):
    run = tmp_path / "k-0008-seed-0" / "run"
    train(TrainConfig(k=8, steps=5, batch_size=8, warmup_steps=1, n_held_out=40, network=SMALL), run, progress=False)
    config = AnalysisConfig.from_dict(
        {
            "sampling": {"n_samples": 6, "steps": 3},
            "classify": {"n_bootstrap": 20},
            "analyses": {"collapse": {"n_samples": 4}},
        }
    ).enable("collapse")
    a = RunAnalysis(run, config, out_dir=run.parent / "analysis")
    for stage in ("sample", "distances", "classify", "collapse"):
        a.run(stage)
    saved = json.loads((a.out / "collapse.json").read_text())
    train_x = load_denoiser(run).train_x  # (8, 64)
    assert saved["covariance_top_eigenvalue"] == pytest.approx(covariance_top_eigenvalue(train_x), rel=1e-6)
    assert saved["speciation_sigma"] == pytest.approx(speciation_sigma(train_x), rel=1e-6)
    assert saved["speciation_sigma"] == pytest.approx(math.sqrt(saved["covariance_top_eigenvalue"] - 1), rel=1e-9)
