"""Commands over studies (one trained model per K, resumable): demo, sweep, report, status,
memorization, two-model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer

from diffmem.cli.common import (
    Circle,
    DeviceOpt,
    Executor,
    check_device,
    circle_lines,
    echo_lines,
    join_ints,
)
from diffmem.experiments.demo import DEMO_KS, demo_study_config, run_demo
from diffmem.io.data import default_held_out, load_dataset
from diffmem.io.files import write_bytes_atomic
from diffmem.report import write_report
from diffmem.report.page import transitions_text
from diffmem.study.config import StudyConfig, format_resolved, load_study_config
from diffmem.study.executors import ExecutorConfig
from diffmem.study.presets import MEMORIZATION_KS, TWO_MODEL_KS, MLPStudy, memorization_config, two_model_config
from diffmem.study.runner import StudyResult, format_phase_table, run_study, training_progress
from diffmem.study.store import STUDY_FILE, format_status, study_status
from diffmem.viz.study_figures import two_model_figure

SamplesOpt = Annotated[int, typer.Option("--samples", help="Samples per K.")]
TrainStepsOpt = Annotated[int, typer.Option("--train-steps", help="Optimizer steps for every K.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Jobs at once (pool, ray).")]
DataOpt = Annotated[str, typer.Option("--data", help="Dataset name.")]
RootOpt = Annotated[
    Path | None, typer.Option("--root", help="Folder of a file-based dataset; required for mnist, cifar10, npz, ...")
]
HiddenOpt = Annotated[int, typer.Option("--hidden", help="MLP width.")]
DepthOpt = Annotated[int, typer.Option("--depth", help="MLP residual blocks.")]


def demo(
    out: Annotated[
        Path | None, typer.Option("--out", help="Study directory (default: a new ./diffmem-demo-NNNNN).")
    ] = None,
    k: Annotated[
        list[int] | None, typer.Option("--k", help=f"Training-set size; repeat (default {join_ints(DEMO_KS)}).")
    ] = None,
    samples: SamplesOpt = 256,
    train_steps: TrainStepsOpt = 4000,
    executor: Annotated[Executor, typer.Option("--executor", help="Where the jobs run.")] = "pool",
    workers: WorkersOpt = 2,
    circle: Annotated[Circle, typer.Option("--circle", help="'census' runs the circle toy, 'skip' does not.")] = (
        "census"
    ),
    device: DeviceOpt = "cpu",
) -> None:
    """The study at CPU scale: digits at six K and the circle toy, trained, sampled, classified as
    memorized / spurious / generalized / off-manifold, with basins, energies, curvature and census; then the
    report.

    About 3 to 4 minutes on two cores. Prints the phase table and the report's path. Rerunning with
    the same --out resumes.

    Examples:
      diffmem demo
      diffmem demo --k 8 --k 1500 --train-steps 1000 --samples 64 --circle skip --out demo-small
    """
    config = demo_study_config(
        tuple(k) if k else DEMO_KS,
        n_samples=samples,
        train_steps=train_steps,
        executor=executor,
        workers=workers,
        device=check_device(device),
    )
    demo_result = run_demo(config, out, circle=circle == "census")
    _echo_phase(demo_result.study)
    if demo_result.circle:
        echo_lines(circle_lines(demo_result.circle, "circle toy"))
    typer.echo(f"results written to {demo_result.report}")


def sweep(
    config_file: Annotated[Path, typer.Argument(help="Study configuration (.yaml, .yml, .toml or .json).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Study directory; rerunning resumes it. Required unless --dry-run."),
    ] = None,
    executor: Annotated[
        Executor | None, typer.Option("--executor", help="Where the jobs run (default: the config's).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Jobs at once, pool and ray (default: the config's).")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster address, e.g. auto or ray://head:10001 (default: the config's)."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved configuration and stop.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write the HTML report at the end.")] = True,
    device: Annotated[
        str | None, typer.Option("--device", help="Torch device, e.g. cpu, cuda (default: the config's).")
    ] = None,
) -> None:
    """Run a K sweep: train, sample, classify and analyse one model per (K, seed), then the phase table.

    Every stage is recorded in a manifest with content hashes; rerunning the same command resumes
    after a crash, and a directory made by another configuration is refused.

    Examples:
      diffmem sweep examples/digits-study.yaml --dry-run
      diffmem sweep examples/digits-study.yaml --out studies/digits --executor pool --workers 2
      diffmem sweep examples/cifar10-study.yaml --out studies/cifar10 --executor ray --address auto
    """
    config = _override(load_study_config(config_file), executor, workers, address, device)
    if dry_run:
        typer.echo(format_resolved(config), nl=False)
        return
    if out is None:
        raise ValueError("give the study directory with --out DIR (or use --dry-run)")
    check_device(config.device)
    result = run_study(config, out)
    where = write_report(out) if report else out
    _echo_phase(result)
    typer.echo(f"results written to {where} ({result.seconds:.0f} s)")


def _override(
    config: StudyConfig, kind: str | None, workers: int | None, address: str | None, device: str | None
) -> StudyConfig:
    """The config with the command line's executor and device; another executor kind drops the
    settings only the old kind takes (a Ray address, pool workers for 'local'). A device given here
    sets the GPUs per job to match it: 0 on a CPU, 1 per Ray job on a GPU if the config asked none."""
    ex = config.executor.to_dict()
    if kind is not None:
        ex.update(kind=kind, address=ex["address"] if kind == "ray" else None)
        ex["workers"] = 1 if kind == "local" else ex["workers"]
    ex.update({name: v for name, v in (("workers", workers), ("address", address)) if v is not None})
    changes = {}
    if device is not None:
        changes["device"] = check_device(device)
        # the config's GPUs per job were set for its own device: none on a CPU, and one each for a Ray job on
        # a GPU when the config (written for a CPU) asked for none, since Ray hides the GPUs from such a job
        if torch.device(changes["device"]).type == "cpu":
            ex["gpus_per_job"] = 0.0
        elif ex["kind"] == "ray" and not ex["gpus_per_job"]:
            ex["gpus_per_job"] = 1.0
    changes["executor"] = ExecutorConfig.from_dict(ex)
    return replace(config, **changes)  # validated again: e.g. gpus_per_job against the device


def _echo_phase(result: StudyResult) -> None:
    typer.echo(format_phase_table(result.rows))
    typer.echo(transitions_text(result.transitions, result.rows))


def report(
    study_dir: Annotated[Path, typer.Argument(help="Study directory written by `diffmem sweep CONFIG --out DIR`.")],
) -> None:
    """One self-contained HTML page of a K sweep (phase diagram, galleries, basins, energy, curvature,
    census, two-model test, collapse levels, 2D landscape), plus the tables behind it.

    Writes DIR/report/report.html, DIR/report/*.csv, DIR/report/*.png and DIR/report/summary.json.

    Examples:
      diffmem report studies/digits
    """
    _check_not_a_run(study_dir, "report")
    path = write_report(study_dir)
    typer.echo(f"results written to {path}")


def status(
    study_dir: Annotated[Path, typer.Argument(help="Study directory written by `diffmem sweep`.")],
) -> None:
    """Which stages of which jobs of a study are done, running, interrupted or failed, and where each
    unfinished training is: its step, its loss and the time left at its rate so far.

    Examples:
      diffmem status studies/digits
    """
    _check_not_a_run(study_dir, "status")
    rows = study_status(study_dir)
    typer.echo(format_status(rows))
    for p in training_progress(study_dir):
        typer.echo(p.line())
    typer.echo(f"results are in {study_dir}")


def _check_not_a_run(path: Path, command: str) -> None:
    """Refuse a training run (or a study's job folder) given where a study directory belongs, naming
    the commands that read what it is."""
    if (path / STUDY_FILE).is_file():
        return
    if (path / "checkpoint.json").is_file():  # written by `diffmem train` (models.train)
        raise ValueError(
            f"{path} is a training run, not a study: `diffmem analyze {path}` classifies and measures its samples "
            f"(into {path / 'analysis'}); `diffmem {command}` reads a study directory made by `diffmem sweep CONFIG "
            "--out DIR`, `diffmem demo`, `diffmem memorization` or `diffmem two-model`"
        )
    study = next((p for p in (path.parent, path.parent.parent) if (p / STUDY_FILE).is_file()), None)
    if (path / "run" / "checkpoint.json").is_file() and study is not None:  # DIR/<job> or DIR/jobs/<job>
        raise ValueError(
            f"{path} is one job of the study {study}: `diffmem {command} {study}` covers the study, "
            f"`diffmem analyze {path / 'run'}` this job's run"
        )


HELD_OUT_HELP = (
    "Examples never trained on; they calibrate the thresholds (default: 297 of the digits, else one in six)."
)


def _mlp_study(data: str, root: Path | None, n_held_out, steps: int, hidden: int, depth: int, device: str):
    """The options memorization and two-model share; n_held_out None is the rule of every command."""
    root = str(root) if root else None
    if n_held_out is None:
        n_held_out = default_held_out(data, len(load_dataset(data, **({"root": root} if root else {}))))
    return MLPStudy(data, root, n_held_out, steps, hidden, depth, check_device(device))


def memorization(
    out: Annotated[Path, typer.Option("--out", help="Study directory (one run per K inside; resumable).")],
    data: DataOpt = "digits",
    root: RootOpt = None,
    k: Annotated[
        list[int] | None, typer.Option("--k", help=f"Training-set sizes (default {join_ints(MEMORIZATION_KS)}).")
    ] = None,
    n_held_out: Annotated[int | None, typer.Option("--n-held-out", help=HELD_OUT_HELP)] = None,
    steps: TrainStepsOpt = 6000,
    hidden: HiddenOpt = 512,
    depth: DepthOpt = 4,
    samples: SamplesOpt = 512,
    device: DeviceOpt = "cpu",
) -> None:
    """Train one model per nested K, sample it, and measure how many samples are training copies.

    A sample counts as memorized when its nearest training image is closer than delta_m, the 2%
    quantile of the held-out images' nearest-training distances. Writes the study layout:
    OUT/phase.json, OUT/phase.csv (the memorized fraction f_M per K with its interval) and
    OUT/report/report.html.

    Examples:
      diffmem memorization --out studies/digits
      diffmem memorization --k 8 --k 1500 --train-steps 2000 --out studies/quick
    """
    study = _mlp_study(data, root, n_held_out, steps, hidden, depth, device)
    config = memorization_config(ks=k or MEMORIZATION_KS, n_samples=samples, study=study)
    result = run_study(config, out)
    write_report(out)
    echo_lines(_memorization_lines(result.rows))
    typer.echo(f"results written to {out} (phase.json, phase.csv, report/report.html)")


def _memorization_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'K':>6} {'memorized':>22} {'delta_m':>9}"]
    for r in rows:
        f_m = f"{r['f_M']:.3f} [{r['f_M_low']:.3f}, {r['f_M_high']:.3f}]"
        delta_m = "-" if r["delta_m"] is None else f"{r['delta_m']:.4f}"
        lines.append(f"{r['K']:>6} {f_m:>22} {delta_m:>9}")
    return lines


def two_model(
    out: Annotated[Path, typer.Option("--out", help="Study directory (two runs per K inside; resumable).")],
    data: DataOpt = "digits",
    root: RootOpt = None,
    k: Annotated[
        list[int] | None,
        typer.Option("--k", help=f"Training-set size of each model; repeat (default {join_ints(TWO_MODEL_KS)})."),
    ] = None,
    n_held_out: Annotated[int | None, typer.Option("--n-held-out", help=HELD_OUT_HELP)] = None,
    steps: TrainStepsOpt = 6000,
    hidden: HiddenOpt = 512,
    depth: DepthOpt = 4,
    samples: Annotated[int, typer.Option("--samples", help="Samples per model, same seeds for both.")] = 256,
    delta: Annotated[
        float | None, typer.Option("--delta", help="Agreement radius (default: held-out calibration).")
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Two models trained on disjoint sets of size K, sampled from the same noise: agreement vs K.

    Writes OUT/two_model.json and OUT/two_model.png.

    Examples:
      diffmem two-model --out studies/two-model --k 8 --k 64 --k 512
    """
    study = _mlp_study(data, root, n_held_out, steps, hidden, depth, device)
    config = two_model_config(ks=k or TWO_MODEL_KS, n_samples=samples, delta=delta, study=study)
    result = run_study(config, out)
    write_bytes_atomic(out / "two_model.png", two_model_figure(result.two_model, {}))
    typer.echo(f"{'K':>6} {'agreement':>10} {'mean dist':>10}")
    for r in result.two_model:
        typer.echo(f"{r['K']:>6} {r['agreement']:>10.3f} {r['mean_distance']:>10.4f}")
    typer.echo(f"results written to {out} (two_model.json, two_model.png)")
