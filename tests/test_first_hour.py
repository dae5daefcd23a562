"""A new user's first hour: the documented commands run as written, help says what is required, and
each command's output says what it measured (issue "A new user's first hour")."""

import csv
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from diffmem.cli import evaluate as cli_evaluate
from diffmem.cli.app import app
from diffmem.io.config import ConfigError
from diffmem.io.files import VERSION
from diffmem.models.train import TrainConfig, train
from diffmem.study.config import parse_study_config

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands


def _parse(line: str):
    """A documented `diffmem CMD ...` line parsed by the command's own parser (nothing runs)."""
    args = shlex.split(line)
    assert args[0] == "diffmem" and args[1] in COMMANDS, line
    cmd = COMMANDS[args[1]]
    return cmd.make_context(args[1], args[2:]).params


def _example_lines(text: str) -> list[str]:
    """The command lines of an Examples block."""
    block = text.split("Examples:", 1)[1]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("diffmem ")]


# --- 1. the example configs' header commands are real commands -------------------------------------------------


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_header_commands_run(example, monkeypatch):
    header = [line[1:].split("  #")[0].strip() for line in example.read_text().splitlines() if line.startswith("#")]
    commands = [line for line in header if line.startswith("diffmem ")]
    assert commands, f"{example.name} documents no command"
    dry = [line for line in commands if "--dry-run" in line]
    assert dry, f"{example.name} documents no --dry-run"
    for line in commands:
        assert _parse(line)["config_file"] == Path("examples") / example.name
    monkeypatch.chdir(ROOT)  # the documented lines use paths relative to the repository
    name = yaml.safe_load(example.read_text())["name"]
    for line in dry:
        res = runner.invoke(app, shlex.split(line)[1:])
        assert res.exit_code == 0, (line, res.output)
        assert yaml.safe_load(res.stdout)["name"] == name


# --- 2. --version ---------------------------------------------------------------------------------------------


def test_version_prints_the_installed_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"diffmem {VERSION}\n"
    assert re.fullmatch(r"\d+\.\d+.*|0\+unknown", VERSION)


# --- 3, 4. help says what is required and what leaving an option out means --------------------------------------

OMITTED = re.compile(r"\b(default|unless|without|instead|exactly one of|required for)\b")


def _records():
    """(command, parameter, its help line) for every parameter of every command."""
    for name, cmd in COMMANDS.items():
        ctx = cmd.make_context(name, [], resilient_parsing=True)
        for p in cmd.params:
            if p.name != "help" and not p.hidden:
                yield name, p, p.get_help_record(ctx)[1]


def test_required_parameters_show_required_and_no_default():
    required = [(name, p.name) for name, p, _ in _records() if p.required]
    assert ("census", "k") in required and ("census", "sigma") in required and ("train", "out") in required
    for name, p, text in _records():
        if p.required:
            assert "[required]" in text and "[default:" not in text, (name, p.name, text)


def test_options_without_a_default_say_what_leaving_them_out_means():
    unset = [(name, p, text) for name, p, text in _records() if p.param_type_name == "option" and p.default is None]
    unset = [(name, p, text) for name, p, text in unset if not p.required and not p.is_flag]
    assert len(unset) > 20  # --out, --k lists, --root, thresholds, ... of every command
    for name, p, text in unset:
        assert OMITTED.search(text), f"diffmem {name} {p.opts[0]}: help does not say what omitting it means: {text}"
        assert "[default:" not in text
    sweep_out = next(text for name, p, text in unset if name == "sweep" and p.name == "out")
    assert "Required unless --dry-run" in sweep_out


def test_census_needs_k_and_sigma():
    shown = {p.name: text for name, p, text in _records() if name == "census"}
    assert "[default:" not in shown["k"] + shown["sigma"]  # were [default: 0] and [default: 0.0]
    res = runner.invoke(app, ["census", "--data", "circle", "--sigma", "0.3"])
    assert res.exit_code == 2 and "Missing option '--k'" in res.output
    res = runner.invoke(app, ["census", "--data", "circle", "--k", "9"])
    assert res.exit_code == 2 and "Missing option '--sigma'" in res.output


# --- every command's Examples run as written ----------------------------------------------------------------------

# the parameters that take what another command writes: each must name a repository file or the --out of
# another example (runs/digits-k32 of `train`, studies/digits of `sweep`, ...)
CONSUMES = {
    "sample": ("run_dir",),
    "analyze": ("run_dir",),
    "landscape": ("trained",),
    "report": ("study_dir",),
    "status": ("study_dir",),
    "sweep": ("config_file",),
}


def test_every_help_example_parses_with_relative_paths_that_exist_or_are_made():
    examples = {name: _example_lines(cmd.help or "") for name, cmd in COMMANDS.items()}
    made, used = set(), []
    for name, lines in examples.items():
        assert lines, f"diffmem {name} --help has no Examples"
        for line in lines:
            params = _parse(line)  # options exist, values have their types and choices
            for token in shlex.split(line):
                assert not token.startswith(("/", "~")), f"{line}: use a relative path"
            if params.get("out") is not None:
                made.add(Path(params["out"]))
            if name == "sample" and params.get("out_file") is None:
                made.add(params["run_dir"] / "samples-00001" / "samples.npz")  # the first samples of a run
            for key in CONSUMES.get(name, ()):
                value = params[key]
                values = [] if value is None else value if isinstance(value, list | tuple) else [value]
                used += [(line, Path(v)) for v in values]
            if name == "analyze" and params["samples"].endswith(".npz"):
                used.append((line, Path(params["samples"])))
    for line, path in used:
        assert path in made or (ROOT / path).is_file(), f"{line}: {path} is neither in the repository nor made"


# --- 5. report / status on a training run -----------------------------------------------------------------------


def _fake_run(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("config.json", "checkpoint.json"):
        (path / name).write_text("{}")
    return path


@pytest.mark.parametrize("command", ["report", "status"])
def test_report_and_status_of_a_training_run_name_the_command_for_it(tmp_path, command):
    run = _fake_run(tmp_path / "runs" / "digits-k32")
    res = runner.invoke(app, [command, str(run)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.count("\n") == 1  # one line
    assert f"{run} is a training run, not a study" in res.output and f"`diffmem analyze {run}`" in res.output
    assert "sweep" in res.output and "--out" in res.output
    assert not (run / "report").exists() and not (run / "study.json").exists()  # nothing written into it
    study = tmp_path / "study"
    job = _fake_run(study / "k-0008-seed-0" / "run").parent
    (study / "study.json").write_text("{}")
    res = runner.invoke(app, [command, str(job)])
    assert res.exit_code == 2 and f"one job of the study {study}" in res.output
    assert f"`diffmem {command} {study}`" in res.output and f"`diffmem analyze {job / 'run'}`" in res.output


# --- 6. analyses.two_model.ks is checked where it is used ---------------------------------------------------------


def _study(two_model: dict, run: str = "all"):
    text = yaml.safe_dump(
        {"run": run, "ks": [8, 32], "n_held_out": 100, "analyses": {"two_model": two_model}}, sort_keys=False
    )
    return parse_study_config(text)


@pytest.mark.parametrize("ks", [[64], [32, 8], []])
def test_two_model_ks_are_checked_only_when_the_test_runs(ks):
    off = _study({"enabled": False, "ks": ks})
    assert off.two_model_ks() == () and off.analyses.two_model.ks == tuple(ks)
    assert _study({"enabled": True, "ks": ks}, run="phase").two_model_ks() == ()  # 'phase' skips the pairs
    with pytest.raises(ConfigError, match=r"analyses\.two_model\.ks"):
        _study({"enabled": True, "ks": ks})
    with pytest.raises(ConfigError, match=r"analyses\.two_model\.ks"):
        _study({"enabled": True, "ks": ks}, run="two_model")
    assert _study({"enabled": True, "ks": [32]}).two_model_ks() == (32,)


# --- 7, 8. analyze: point tables, progress, and --samples FILE ----------------------------------------------------


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    """A tiny digits run (K = 8) and 12 samples of it drawn by `diffmem sample` (ddpm, 5 steps, seed 3)."""
    run = tmp_path_factory.mktemp("first-hour") / "digits-k8"
    network = {"kind": "mlp", "mlp": {"hidden": 32, "depth": 1, "emb_dim": 16}}
    train(
        TrainConfig(k=8, steps=20, batch_size=16, warmup_steps=2, n_held_out=40, network=network), run, progress=False
    )
    args = ["sample", str(run), "--samples", "12", "--steps", "5", "--sampler", "ddpm", "--seed", "3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return run, run / "samples-00001" / "samples.npz"


def test_analyze_classifies_a_samples_file_and_prints_point_tables(sampled_run):
    run, npz = sampled_run
    args = ["analyze", str(run), "--samples", str(npz), "--basins", "--energy", "--curvature", "--points", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    with np.load(npz, allow_pickle=False) as given, np.load(run / "analysis" / "samples.npz") as used:
        np.testing.assert_array_equal(given["samples"], used["samples"])  # the file's samples, none drawn
        np.testing.assert_array_equal(given["seeds"], used["seeds"])
    record = json.loads((run / "analysis" / "analysis.json").read_text())
    s = record["config"]["sampling"]
    assert (s["n_samples"], s["sampler"], s["steps"], s["seed"]) == (12, "ddpm", 5, 3)  # from sample.json and seeds
    assert record["samples_file"]["reproducible"] is True and "sample" not in record["outputs"]
    assert f"N = 12 samples from {npz}" in res.stdout
    # progress on stderr, one line as each stage starts and ends; results on stdout
    assert re.search(r"analyze \[4/5\] energy done in \d+\.\d s", res.stderr) and "analyze [" not in res.stdout
    basins = _csv(run / "analysis" / "basins.csv")
    lines = res.stdout.splitlines()
    title = next(i for i, line in enumerate(lines) if "critical noise level sigma_c with its 90% interval" in line)
    assert lines[title + 1].split() == ["class", "index", "sigma_c", "interval", "status"]
    first = lines[title + 2].split()
    assert first[0] == basins[0]["class"] and first[1] == basins[0]["index"] and first[-1] == basins[0]["status"]
    assert float(first[2]) == pytest.approx(float(basins[0]["sigma_c"]), rel=1e-3, abs=1e-9)
    assert any("+-" in line for line in lines)  # energies with their quadrature errors
    curv = next(i for i, line in enumerate(lines) if "extreme Hessian eigenvalues" in line)
    assert lines[curv + 1].split() == ["class", "index", "lambda_max", "lambda_min"]
    n_rows = sum(1 for line in lines[curv + 2 :] if line.startswith("    ") and len(line.split()) == 4)
    assert n_rows == len(_csv(run / "analysis" / "curvature.csv")) <= 5 * 2


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_point_tables_show_a_few_points_per_class(tmp_path):
    rows = [
        {"class": cls, "index": i, "lambda_min": -1.0, "lambda_max": 25.0 + i}
        for cls in ("memorized", "training")
        for i in range(10)
    ]
    (tmp_path / "curvature.csv").write_text(
        "class,index,lambda_min,lambda_max\n"
        + "".join(f"{r['class']},{r['index']},-1,{r['lambda_max']}\n" for r in rows)
    )
    summary = {"sigma": 0.2, "by_class": {}}
    table = cli_evaluate._point_table(
        cli_evaluate.POINT_TABLES["curvature"], summary, [str(tmp_path / "curvature.csv")]
    )
    body = [line.split() for line in table[2:-1]]
    assert [(b[0], b[1]) for b in body] == [(c, str(i)) for c in ("memorized", "training") for i in range(4)]
    assert body[1][2] == "26" and "isotropic well 25" in table[0]
    assert table[-1].strip() == f"8 of 20 points shown; all of them in {tmp_path / 'curvature.csv'}"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_analyze_refuses_a_samples_file_that_does_not_fit_the_run(sampled_run, tmp_path):
    run, npz = sampled_run
    x = np.zeros((6, 64), dtype=np.float32)
    seeds = np.arange(6)
    cases = [
        (_npz(tmp_path / "wide.npz", samples=np.zeros((6, 10), np.float32), seeds=seeds), "do not match the run"),
        (_npz(tmp_path / "img.npz", samples=np.zeros((6, 3, 8, 8), np.float32), seeds=seeds), "(N, 64)"),
        (_npz(tmp_path / "noseeds.npz", samples=x), "must hold the arrays 'samples' and 'seeds'"),
        (_npz(tmp_path / "seeds.npz", samples=x, seeds=np.arange(5)), "one integer per sample"),
        (_npz(tmp_path / "one.npz", samples=x[:1], seeds=seeds[:1]), "need >= 2"),
        (_npz(tmp_path / "obj.npz", samples=np.array([object()] * 6), seeds=seeds), "pickled"),
        (tmp_path / "missing.npz", "samples file not found"),
    ]
    before = _files(run / "analysis")
    for path, message in cases:
        res = runner.invoke(app, ["analyze", str(run), "--samples", str(path)])
        assert res.exit_code == 2 and message in res.stderr, (path.name, res.output)
        assert len(res.stderr.strip().splitlines()) == 2 and "Traceback" not in res.output  # progress + error
    assert _files(run / "analysis") == before  # an earlier analysis is left as it was
    res = runner.invoke(app, ["analyze", str(run), "--samples", "many"])
    assert res.exit_code == 2 and "--samples takes a number of samples to draw or a samples .npz file" in res.output


def test_samples_whose_seeds_do_not_reproduce_them_are_refused_by_collapse(sampled_run, tmp_path):
    run, npz = sampled_run
    with np.load(npz, allow_pickle=False) as f:
        odd = _npz(tmp_path / "odd.npz", samples=f["samples"], seeds=f["seeds"][::-1].copy())
        other = _npz(tmp_path / "other.npz", samples=f["samples"][:6], seeds=f["seeds"][:6][::-1].copy())
    res = runner.invoke(app, ["analyze", str(run), "--samples", str(odd)])
    assert res.exit_code == 0, res.output  # classification needs no seeds
    record = json.loads((run / "analysis" / "analysis.json").read_text())
    assert record["samples_file"] == {"path": str(odd), "options_file": None, "reproducible": False}
    before = _files(run / "analysis")
    res = runner.invoke(app, ["analyze", str(run), "--samples", str(other), "--collapse"])
    assert res.exit_code == 2 and "collapse re-runs each sample's trajectory from its seed" in res.output
    assert _files(run / "analysis") == before  # refused before anything is written


# --- defaults chosen from the data, and the README's walk-through on a folder of the user's images ---------------


def _rgb_folder(path: Path, n: int = 60, side: int = 16) -> Path:
    """n small RGB PNGs: a coloured square on black at a random place."""
    from PIL import Image

    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    for i in range(n):
        im = np.zeros((side, side, 3), np.uint8)
        y, x = rng.integers(0, side - 6, 2)
        im[y : y + 6, x : x + 6] = rng.integers(0, 256, 3)
        Image.fromarray(im).save(path / f"{i:03d}.png")
    return path


def _run_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_readme_own_data_walkthrough_runs_verbatim(tmp_path, monkeypatch):
    block = re.search(r"<!-- readme:own-data.*?-->\n```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    lines = block.group(1).splitlines()
    _rgb_folder(tmp_path / "my-images")
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in lines:
        args = shlex.split(line)
        assert args[0] == "diffmem"
        res = runner.invoke(app, args[1:])
        assert res.exit_code == 0 and "Traceback" not in res.output, (line, res.output)
        outputs.append(res.output)
    config = _run_config(tmp_path / "runs" / "my-images")
    assert config["network"]["kind"] == "unet" and config["batch_size"] == 32 and config["n_held_out"] == 10
    assert config["data_options"] == {"root": "my-images"}  # the images' own 16 x 16 RGB, nothing forced
    assert "holding out 10" in outputs[0] and "unet network, batch 32" in outputs[0]
    for cls in ("memorized", "spurious", "generalized", "off_manifold"):
        assert re.search(rf"{cls}\s+\d\.\d{{3}}\s+\[", outputs[1]), outputs[1]


def test_train_defaults_on_the_digits_are_the_presets(tmp_path):
    res = runner.invoke(app, ["train", "--data", "digits", "--k", "8", "--steps", "2", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    config = _run_config(tmp_path / "r")
    assert (config["n_held_out"], config["network"]["kind"], config["batch_size"]) == (297, "mlp", 128)


def test_a_narrow_mlp_is_warned_about(tmp_path):
    folder = _rgb_folder(tmp_path / "imgs", n=12)
    args = ["train", "--data", "image_folder", "--root", str(folder), "--k", "4", "--steps", "1", "--network", "mlp"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "warning: the MLP is 256 wide for data of dimension 768" in res.output


def test_image_options_resize_a_folder_and_are_refused_elsewhere(tmp_path):
    folder = _rgb_folder(tmp_path / "imgs", n=12)
    args = ["train", "--data", "image_folder", "--root", str(folder), "--k", "4", "--steps", "1"]
    res = runner.invoke(app, [*args, "--image-size", "8", "--mode", "L", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "12 examples of 1 x 8 x 8" in res.output and "mlp network" in res.output  # 8 < 16: an MLP
    res = runner.invoke(app, ["train", "--data", "digits", "--image-size", "8", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "apply to --data image_folder" in res.output
    assert not (tmp_path / "d").exists()


def test_a_delta_s_that_is_not_density_matched_is_said():
    c = {"delta_m": 0.2, "delta_s": 0.3, "n_samples": 64, "metric": "l2", "rule": "threshold", "fractions": {}}
    c["calibration"] = {"calibration": "held_out", "density_matched": False, "n_held_out": 10}
    lines = cli_evaluate._classification_lines(c, 40)
    assert any("not density-matched: 10 held-out images against 64 samples" in line for line in lines)
    c["calibration"]["density_matched"] = True
    assert not any("density" in line for line in cli_evaluate._classification_lines(c, 40))
