"""The contract every registered analysis stage keeps, checked for each one on a tiny trained run
(as every scheduler of diffusers runs the same common tests): its config section round-trips and
sits where it says; its inputs are earlier stages; run() writes only inside the analysis directory
and returns what it wrote; its result and its report section read those files back."""

import ast
import pathlib

import pytest

import diffmem.evaluate.stages as stages_pkg
from diffmem.evaluate.analysis import AnalysisConfig, RunAnalysis
from diffmem.evaluate.stages import OPTIONAL, STAGES, TRAIN, AnalysesConfig
from diffmem.io.results import Job, Notes
from diffmem.models.train import TrainConfig, train
from diffmem.viz.html import ReportContext
from diffmem.viz.html import Section as ReportSection

SMALL = {"kind": "mlp", "mlp": {"hidden": 16, "depth": 1, "emb_dim": 8}}
TINY = {
    "sampling": {"n_samples": 12, "steps": 4},
    "classify": {"n_bootstrap": 50},
    "analyses": {
        "basins": {"n_points": 2, "n_trials": 2, "steps": 2, "rtol": 0.2, "sigma_max": 5.0},
        "energy": {"n_points": 2, "n_nodes": 4},
        "curvature": {"n_points": 2, "k": 2},
        "census": {"n_starts": 4},
        "collapse": {"n_samples": 6},
    },
}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A tiny run with every registered stage run once, in registry order: (analysis, {stage: paths})."""
    run = tmp_path_factory.mktemp("stages") / "k-0008-seed-0" / "run"
    train(TrainConfig(k=8, steps=20, batch_size=8, warmup_steps=2, n_held_out=40, network=SMALL), run, progress=False)
    config = AnalysisConfig.from_dict(TINY).enable(*OPTIONAL)
    a = RunAnalysis(run, config, out_dir=run.parent / "analysis")
    written = {name: a.run(name) for name in STAGES}
    return a, written


def test_registry_order_and_names():
    assert list(STAGES)[:3] == ["sample", "distances", "classify"]
    assert all(name == stage.name for name, stage in STAGES.items())
    assert OPTIONAL == tuple(n for n, s in STAGES.items() if s.optional)
    assert [f for f in AnalysesConfig.__dataclass_fields__] == [*OPTIONAL, "two_model", "seed"]


def test_every_stage_module_is_registered():
    here = pathlib.Path(stages_pkg.__file__).parent
    modules = {p.stem for p in here.glob("*.py")} - {"__init__", "base"}
    assert modules == set(STAGES), "a stage module is not listed in diffmem/evaluate/stages/__init__.py"


@pytest.mark.parametrize("name", list(STAGES))
def test_config_section_round_trips_and_sits_at_its_key(name):
    stage = STAGES[name]
    section = stage.section(AnalysisConfig())
    assert isinstance(section, stage.config)
    assert type(section)._key == stage.config_key and stage.help
    assert stage.config.from_dict(section.to_dict()) == section
    assert ("enabled" in section.to_dict()) == stage.optional  # optional stages are switched by enabled


@pytest.mark.parametrize("name", list(STAGES))
def test_inputs_are_earlier_stages(name):
    earlier = [TRAIN, *list(STAGES)[: list(STAGES).index(name)]]
    assert STAGES[name].inputs and set(STAGES[name].inputs) <= set(earlier)


@pytest.mark.parametrize("name", list(STAGES))
def test_run_writes_its_files_inside_the_analysis_directory(analysed, name):
    a, written = analysed
    paths = written[name]
    assert paths, f"stage {name} reported no output"
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        assert p.resolve().parent == a.out.resolve()


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if s.result is not None])
def test_result_reads_back_what_run_wrote(analysed, name):
    a, _ = analysed
    result = STAGES[name].read_result(a.out)
    assert isinstance(result, dict) and result


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if s.report is not None])
def test_report_section_from_the_written_files(analysed, name):
    a, _ = analysed
    job_dir = a.out.parent
    ctx = ReportContext(
        job_dir.parent,
        [Job(job_dir.name, 8, 0, a.out)],
        {},
        Notes(),
        ("memorized", "spurious", "generalized"),
        ("memorized", "spurious", "generalized", "training"),
    )
    section = STAGES[name].report(ctx)
    assert isinstance(section, ReportSection), section
    assert section.key == name and section.title == STAGES[name].title and "<img" in section.body
    assert ctx.figures and ctx.tables  # it contributed a figure and a table to report/


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if s.report is not None])
def test_report_section_says_why_it_is_omitted(tmp_path, name):
    ctx = ReportContext(tmp_path, [], {}, Notes(), ("memorized",), ("memorized", "training"))
    reason = STAGES[name].report(ctx)
    assert isinstance(reason, str) and name in reason


def test_stage_modules_define_one_stage_each():
    here = pathlib.Path(stages_pkg.__file__).parent
    for name in STAGES:
        tree = ast.parse((here / f"{name}.py").read_text())
        assigned = [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if hasattr(t, "id")]
        assert assigned.count("STAGE") == 1
