"""`diffmem analyze`: classify one run's samples and run the analysis stages the flags enable."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.common import DeviceOpt, Sampler, check_device, choices, echo_lines, progress
from diffmem.evaluate.analysis import AnalysisConfig, analyze_run
from diffmem.evaluate.classify import CLASSES, RULES, ClassifyConfig
from diffmem.evaluate.lpips import NETS
from diffmem.evaluate.metrics import METRICS, MetricConfig
from diffmem.evaluate.run import WITH_TRAINING
from diffmem.evaluate.stages import STAGES
from diffmem.io.results import Notes, read_csv
from diffmem.models.sampling import SamplingConfig

Metric = choices(METRICS)
Rule = choices(RULES)
LpipsNet = choices(NETS)


def _with_stage_flags(command):
    """`command` with one `--NAME` flag per optional analysis stage of the registry, its help the
    stage's: a new stage gets its flag here without a change to the command. The flags arrive in
    **flags."""
    sig = inspect.signature(command, eval_str=True)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for name, stage in STAGES.items():
        if stage.optional:
            flag = Annotated[bool, typer.Option(f"--{name}", help=stage.help, rich_help_panel="Analyses")]
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=flag))
    command.__signature__ = sig.replace(parameters=params)
    return command


@_with_stage_flags
def analyze(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `diffmem train`.")],
    metric: Annotated[Metric, typer.Option("--metric", help="'l2' (pixel L2 / sqrt(D)) or 'lpips'.")] = "l2",
    samples: Annotated[
        str,
        typer.Option(
            "--samples",
            metavar="N|FILE",
            help="N new samples to draw and classify, or FILE: a samples.npz of this run from `diffmem sample` to "
            "classify instead (its sampler, steps and seed come with it).",
        ),
    ] = "512",
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.")] = 50,
    sampler: Annotated[Sampler, typer.Option("--sampler", help="Sampler; ode is the probability-flow ODE (Heun).")] = (
        "ddim"
    ),
    delta_m: Annotated[
        float | None, typer.Option("--delta-m", help="Memorized threshold (default: calibrated on held-out data).")
    ] = None,
    delta_s: Annotated[
        float | None, typer.Option("--delta-s", help="Spurious threshold (default: calibrated on held-out data).")
    ] = None,
    quantile: Annotated[
        float,
        typer.Option(
            "--quantile",
            help="Calibration quantile of held-out distances (the share of unseen real images each test may err on).",
        ),
    ] = 0.02,
    rule: Annotated[Rule, typer.Option("--rule", help="'threshold' (m <= delta_m) or 'ratio' (m/m2 < 1/3).")] = (
        "threshold"
    ),
    points: Annotated[int, typer.Option("--points", help="Points per class for basins, energy, curvature.")] = 32,
    sigma: Annotated[float, typer.Option("--sigma", help="Noise level of energy, curvature and census.")] = 0.2,
    weights_dir: Annotated[
        Path | None,
        typer.Option(
            "--weights-dir",
            help="Folder of the LPIPS weight files, --metric lpips "
            "(default: $DIFFMEM_WEIGHTS or ~/.cache/diffmem/weights).",
        ),
    ] = None,
    lpips_net: Annotated[LpipsNet, typer.Option("--lpips-net", help="LPIPS backbone.")] = "alex",
    lpips_resize: Annotated[
        int | None,
        typer.Option("--lpips-resize", help="Upsample images to this side before LPIPS (default: as they are)."),
    ] = None,
    absolute: Annotated[
        bool,
        typer.Option(
            "--absolute",
            help="With --energy: also -log p itself by the probability-flow ODE, its gap to the line integral, and "
            "the heat equation's test of the model's noise levels, which says why they differ (slower: an ODE solve "
            "per point).",
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of samples, point choice and analyses.")] = 0,
    device: DeviceOpt = "cpu",
    **flags: bool,
) -> None:
    """Classify a run's samples as memorized / spurious / generalized and measure their attractors.

    Draws new samples, or takes those of --samples FILE. Writes RUN_DIR/analysis/: samples.npz,
    distances.npz, samples.csv (per sample: class, m, s, neighbours), classification.json
    (thresholds, fractions with bootstrap 95% intervals), gallery.png, and for each analysis flag
    given (listed under Analyses) that stage's .csv/.json; analysis.json sums it up. Prints the
    fractions, and per point the critical noise levels (--basins), energies (--energy) and
    curvatures (--curvature); progress goes to stderr.

    Examples:
      diffmem analyze runs/digits-k32
      diffmem analyze runs/digits-k32 --samples runs/digits-k32/samples-00001/samples.npz
      diffmem analyze runs/digits-k32 --basins --energy --curvature --census --collapse
      diffmem analyze runs/mnist-k1000 --metric lpips --weights-dir weights --device cuda
    """
    count, samples_file = _samples_value(samples)
    if absolute and not flags.get("energy"):
        raise ValueError("--absolute adds the probability-flow ODE to the energy stage: give it with --energy")
    classify = ClassifyConfig(rule=rule, quantile=quantile)
    given = {"delta_m": delta_m, "delta_s": delta_s}
    calibration = "given" if all(given[t] is not None for t in classify.thresholds_used()) else "held_out"
    weights = str(weights_dir) if weights_dir else None
    config = AnalysisConfig(
        sampling=SamplingConfig(sampler=sampler, steps=steps, n_samples=count, seed=seed),
        metric=MetricConfig(name=metric, lpips_net=lpips_net, weights_dir=weights, resize=lpips_resize),
        classify=replace(classify, **given, calibration=calibration),
        analyses=_analyses(
            AnalysisConfig().analyses, points=points, sigma=sigma, seed=seed, flags=flags, absolute=absolute
        ),
    )
    result = analyze_run(run_dir, config, device=check_device(device), samples_file=samples_file, progress=progress)
    source = result.get("samples_file", {}).get("path")
    echo_lines(_classification_lines(result["classification"], result["K"], source))
    echo_lines(_stage_lines(result))
    typer.echo(f"results written to {Path(run_dir) / 'analysis'}")


def _samples_value(value: str) -> tuple[int, Path | None]:
    """--samples N (draw N) or --samples FILE.npz (classify those): (N, None) or (a placeholder N, FILE)."""
    if value.strip().isascii() and value.strip().isdigit():
        return int(value), None
    if value.endswith(".npz"):
        return SamplingConfig().n_samples, Path(value)  # N is the file's
    raise ValueError(f"--samples takes a number of samples to draw or a samples .npz file, got {value!r}")


def _analyses(analyses, *, points: int, sigma: float, seed: int, flags: dict[str, bool], absolute: bool = False):
    """The analyses section: --points and --sigma wherever a stage takes them, the flags as `enabled`,
    --absolute as the energy stage's absolute: ode."""
    sections = {}
    for name, enabled in flags.items():
        section = getattr(analyses, name)
        shared = {"n_points": points, "sigma": sigma, "absolute": "ode" if absolute else "none"}
        sections[name] = replace(section, enabled=enabled, **{k: v for k, v in shared.items() if hasattr(section, k)})
    return replace(analyses, **sections, seed=seed)


def _classification_lines(c: dict, k: int, source: str | None = None) -> list[str]:
    dm = "-" if c["delta_m"] is None else f"{c['delta_m']:.4f}"
    where = f" from {source}" if source else ""
    lines = [
        f"K = {k}, N = {c['n_samples']} samples{where}, metric {c['metric']}, rule {c['rule']}",
        f"thresholds: delta_m = {dm}, delta_s = {c['delta_s']:.4f} ({c['calibration'].get('calibration')})",
    ]
    if c["calibration"].get("density_matched") is False:
        lines.append(DENSITY_NOTE.format(n=c["calibration"].get("n_held_out"), N=c["n_samples"]))
    for cls, f in c["fractions"].items():
        lines.append(f"  {cls:<12} {f['value']:.3f}  [{f['low']:.3f}, {f['high']:.3f}]")
    return lines


DENSITY_NOTE = (
    "note: delta_s is not density-matched: {n} held-out images against {N} samples, so it is too large "
    "(nearest-neighbour distances shrink as a set grows) and errs towards calling samples spurious; "
    "hold out at least as many images as you sample"
)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _medians(by_class: dict, field: str | None = None, classes=WITH_TRAINING) -> str:
    """'memorized 0.12, spurious -, ...': the median of each class's summary (of `field` when given)."""
    cells = []
    for cls in classes:
        s = by_class.get(cls)
        s = s.get(field) if s is not None and field is not None else s
        cells.append(f"{cls} {_num(s['median'] if s else None)}")
    return ", ".join(cells)


# one line per stage in the terminal; analysis.json and the stage's files hold the rest
STAGE_LINES = {
    "basins": lambda r: f"median sigma_c: {_medians(r['sigma_c'])}",
    "energy": lambda r: f"median energy at sigma {r['sigma']:g} (nats): {_medians(r['energy'])}" + _ode_line(r),
    "curvature": lambda r: f"median lambda_max at sigma {r['sigma']:g}: {_medians(r['by_class'], 'lambda_max')}",
    "census": lambda r: ", ".join(f"{kind} {n}" for kind, n in r.items()),
    "collapse": lambda r: f"median sigma_nearest: {_medians(r['sigma_nearest'], classes=CLASSES)}",
}


def _ode_line(r: dict) -> str:
    """The energy stage's ODE check, when it ran: how many points agree with the line integral and pass the heat
    equation (core.consistency), each within its error."""
    a = r.get("absolute")
    if not a:
        return ""
    n = r["quadrature"]["n_points"]
    return (
        f"\n  energy by the ODE: {a['n_agree']} of {n} points equal the line integral within errors, "
        f"{a['n_consistent']} of {n} pass the heat equation (its residual is why the two differ)"
    )


def _stage_lines(result: dict) -> list[str]:
    """A short line for each optional stage that ran (its files for a stage without one here), and
    below it the stage's per-point table where it has one."""
    lines = []
    for name, stage in STAGES.items():
        if not stage.optional or name not in result["outputs"]:
            continue
        if name in STAGE_LINES and result.get(name) is not None:
            lines.append(f"  {name}: {STAGE_LINES[name](result[name])}")
        else:
            lines.append(f"  {name}: " + ", ".join(Path(p).name for p in result["outputs"][name]))
        if name in POINT_TABLES and result.get(name) is not None:
            table = ENERGY_ODE_TABLE if name == "energy" and result[name].get("absolute") else POINT_TABLES[name]
            lines += _point_table(table, result[name], result["outputs"][name])
    return lines


ROWS_PER_CLASS = 4  # points of each class a table prints; the stage's CSV holds every point


def _pm(value: str, error: str) -> str:
    return f"{_cell(value)} +- {_cell(error, '.2g')}"


def _cell(text: str | None, spec: str = ".4g") -> str:
    """A CSV cell as printed: numbers to 4 significant digits, empty or unparsable as '-'."""
    try:
        return format(float(text), spec)
    except (TypeError, ValueError):
        return "-"


@dataclass(frozen=True)
class PointTable:
    """How a per-point stage prints: its CSV, a title from its summary, and the cells of one row."""

    file: str
    title: Callable[[dict], str]
    header: tuple[str, ...]  # after class and index
    cells: Callable[[dict], tuple[str, ...]]
    needed: tuple[str, ...]  # the CSV columns read


POINT_TABLES = {
    "basins": PointTable(
        "basins.csv",
        lambda r: f"critical noise level sigma_c with its {r.get('interval_level', 0.9):.0%} interval",
        ("sigma_c", "interval", "status"),
        lambda row: (
            _cell(row["sigma_c"]),
            f"[{_cell(row['sigma_c_low'])}, {_cell(row['sigma_c_high'])}]",
            row["status"],
        ),
        ("sigma_c", "sigma_c_low", "sigma_c_high", "status"),
    ),
    "energy": PointTable(
        "energy.csv",
        lambda r: f"-log p at sigma {r['sigma']:g} relative to the training mean (nats) +- quadrature error",
        ("energy", "path discrepancy"),
        lambda row: (
            _pm(row["energy_straight"], row["energy_straight_error"]),
            _pm(row["discrepancy"], row["discrepancy_error"]),
        ),
        ("energy_straight", "energy_straight_error", "discrepancy", "discrepancy_error"),
    ),
    "curvature": PointTable(
        "curvature.csv",
        lambda r: (
            f"extreme Hessian eigenvalues of -log p at sigma {r['sigma']:g} (isotropic well {1 / r['sigma'] ** 2:.4g})"
        ),
        ("lambda_max", "lambda_min"),
        lambda row: (_cell(row["lambda_max"]), _cell(row["lambda_min"])),
        ("lambda_max", "lambda_min"),
    ),
}

# the energy stage with --absolute: the ODE's energy beside the line integral's, their gap, and the heat equation's
# residual (nats per unit log sigma) that explains it
ENERGY_ODE_TABLE = PointTable(
    "energy.csv",
    lambda r: f"-log p at sigma {r['sigma']:g} relative to the training mean (nats) +- error: line integral, ODE",
    ("line integral", "ODE", "gap", "heat residual"),
    lambda row: (
        _pm(row["energy_straight"], row["energy_straight_error"]),
        _pm(row["energy_ode"], row["energy_ode_error"]),
        _pm(row["energy_gap"], row["energy_gap_error"]),
        _pm(row["consistency"], row["consistency_error"]),
    ),
    (
        "energy_straight",
        "energy_straight_error",
        "energy_ode",
        "energy_ode_error",
        "energy_gap",
        "energy_gap_error",
        "consistency",
        "consistency_error",
    ),
)


def _point_table(table: PointTable, summary: dict, outputs: list[str]) -> list[str]:
    """Up to ROWS_PER_CLASS points of each class as an aligned table, from the stage's CSV (nothing
    when the CSV is missing or lacks the columns: the median line above stands alone)."""
    path = next((Path(p) for p in outputs if Path(p).name == table.file), None)
    rows = read_csv(path, ("class", "index", *table.needed), Notes()) if path is not None else None
    if not rows:
        return []
    shown = [r for cls in WITH_TRAINING for r in [r for r in rows if r["class"] == cls][:ROWS_PER_CLASS]]
    grid = [("class", "index", *table.header)] + [(r["class"], r["index"], *table.cells(r)) for r in shown]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    lines = [f"    {table.title(summary)}"]
    for line in grid:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        lines.append("    " + "  ".join(cells))
    if len(shown) < len(rows):
        lines.append(f"    {len(shown)} of {len(rows)} points shown; all of them in {path}")
    return lines
