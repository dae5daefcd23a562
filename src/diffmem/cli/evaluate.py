"""`diffmem analyze`: classify one run's samples and run the analysis stages the flags enable."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.common import DeviceOpt, Sampler, check_device, choices, echo_lines
from diffmem.evaluate.analysis import AnalysisConfig, analyze_run
from diffmem.evaluate.classify import CLASSES, RULES, ClassifyConfig
from diffmem.evaluate.lpips import NETS
from diffmem.evaluate.metrics import METRICS, MetricConfig
from diffmem.evaluate.run import WITH_TRAINING
from diffmem.evaluate.stages import STAGES
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
    samples: Annotated[int, typer.Option("--samples", help="Generated samples to classify.")] = 512,
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
    quantile: Annotated[float, typer.Option("--quantile", help="Calibration quantile of held-out distances.")] = 0.05,
    rule: Annotated[Rule, typer.Option("--rule", help="'threshold' (m <= delta_m) or 'ratio' (m/m2 < 1/3).")] = (
        "threshold"
    ),
    points: Annotated[int, typer.Option("--points", help="Points per class for basins, energy, curvature.")] = 32,
    sigma: Annotated[float, typer.Option("--sigma", help="Noise level of energy, curvature and census.")] = 0.2,
    weights_dir: Annotated[
        Path | None, typer.Option("--weights-dir", help="Folder of the LPIPS weight files (--metric lpips).")
    ] = None,
    lpips_net: Annotated[LpipsNet, typer.Option("--lpips-net", help="LPIPS backbone.")] = "alex",
    lpips_resize: Annotated[
        int | None, typer.Option("--lpips-resize", help="Upsample images to this side before LPIPS.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of samples, point choice and analyses.")] = 0,
    device: DeviceOpt = "cpu",
    **flags: bool,
) -> None:
    """Classify a run's samples as memorized / spurious / generalized and measure their attractors.

    Writes RUN_DIR/analysis/: samples.npz, distances.npz, samples.csv (per sample: class, m, s,
    neighbours), classification.json (thresholds, fractions with bootstrap 95% intervals),
    gallery.png, and for each analysis flag given (listed under Analyses) that stage's .csv/.json;
    analysis.json sums it up.

    Examples:
      diffmem analyze runs/digits-k32
      diffmem analyze runs/digits-k32 --basins --energy --curvature --census --collapse
      diffmem analyze runs/cifar-k1000 --metric lpips --weights-dir ~/weights --device cuda
    """
    classify = ClassifyConfig(rule=rule, quantile=quantile)
    given = {"delta_m": delta_m, "delta_s": delta_s}
    calibration = "given" if all(given[t] is not None for t in classify.thresholds_used()) else "held_out"
    weights = str(weights_dir) if weights_dir else None
    config = AnalysisConfig(
        sampling=SamplingConfig(sampler=sampler, steps=steps, n_samples=samples, seed=seed),
        metric=MetricConfig(name=metric, lpips_net=lpips_net, weights_dir=weights, resize=lpips_resize),
        classify=replace(classify, **given, calibration=calibration),
        analyses=_analyses(AnalysisConfig().analyses, points=points, sigma=sigma, seed=seed, flags=flags),
    )
    result = analyze_run(run_dir, config, device=check_device(device))
    echo_lines(_classification_lines(result["classification"], result["K"]))
    echo_lines(_stage_lines(result))
    typer.echo(f"results written to {Path(run_dir) / 'analysis'}")


def _analyses(analyses, *, points: int, sigma: float, seed: int, flags: dict[str, bool]):
    """The analyses section: --points and --sigma wherever a stage takes them, the flags as `enabled`."""
    sections = {}
    for name, enabled in flags.items():
        section = getattr(analyses, name)
        shared = {"n_points": points, "sigma": sigma}
        sections[name] = replace(section, enabled=enabled, **{k: v for k, v in shared.items() if hasattr(section, k)})
    return replace(analyses, **sections, seed=seed)


def _classification_lines(c: dict, k: int) -> list[str]:
    dm = "-" if c["delta_m"] is None else f"{c['delta_m']:.4f}"
    lines = [
        f"K = {k}, N = {c['n_samples']} samples, metric {c['metric']}, rule {c['rule']}",
        f"thresholds: delta_m = {dm}, delta_s = {c['delta_s']:.4f} ({c['calibration'].get('calibration')})",
    ]
    for cls, f in c["fractions"].items():
        lines.append(f"  {cls:<12} {f['value']:.3f}  [{f['low']:.3f}, {f['high']:.3f}]")
    return lines


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
    "energy": lambda r: f"median energy at sigma {r['sigma']:g} (nats): {_medians(r['energy'])}",
    "curvature": lambda r: f"median lambda_max at sigma {r['sigma']:g}: {_medians(r['by_class'], 'lambda_max')}",
    "census": lambda r: ", ".join(f"{kind} {n}" for kind, n in r.items()),
    "collapse": lambda r: f"median sigma_nearest: {_medians(r['sigma_nearest'], classes=CLASSES)}",
}


def _stage_lines(result: dict) -> list[str]:
    """A short line for each optional stage that ran (its files for a stage without one here)."""
    lines = []
    for name, stage in STAGES.items():
        if not stage.optional or name not in result["outputs"]:
            continue
        if name in STAGE_LINES and result.get(name) is not None:
            lines.append(f"  {name}: {STAGE_LINES[name](result[name])}")
        else:
            lines.append(f"  {name}: " + ", ".join(Path(p).name for p in result["outputs"][name]))
    return lines
