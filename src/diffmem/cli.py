"""The `diffmem` command line: each command is a short function over library calls."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="diffmem",
    help="Diffusion models as dense associative memories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device for the heavy work, e.g. cpu, cuda, cuda:1.")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def _check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        _fail(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        _fail(f"device {device!r} requested but CUDA is not available on this machine; use --device cpu")
    return device


@app.command()
def demo(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: a new ./diffmem-demo-NNNNN).")
    ] = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="Training-set size; repeat for several.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Samples per K.")] = 256,
    steps: Annotated[int, typer.Option("--steps", help="DDIM steps.")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the subsets and of the samples.")] = 0,
    device: DeviceOpt = "cpu",
) -> None:
    """Sample the digits with the exact empirical denoiser at several K: every sample is a training image.

    Writes OUT/samples.png (each sample above its nearest training digit) and OUT/summary.json.

    Examples:
      diffmem demo
      diffmem demo --k 16 --k 128 --samples 64 --out demo-small
    """
    from diffmem.demo import DemoConfig, run_demo
    from diffmem.runs import prepare_out_dir

    try:
        config = DemoConfig(
            ks=tuple(k) if k else DemoConfig.ks, n_samples=samples, steps=steps, seed=seed, device=_check_device(device)
        )
        out_dir = prepare_out_dir(out, "diffmem-demo")
        rows = run_demo(config, out_dir)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{'K':>6} {'samples':>8} {'memorized':>10} {'max dist':>10} {'distinct':>9} {'seconds':>8}")
    for r in rows:
        typer.echo(
            f"{r.k:>6} {r.n_samples:>8} {r.frac_memorized:>10.3f} {r.max_distance:>10.2e} "
            f"{r.distinct_patterns:>9} {r.seconds:>8.2f}"
        )
    typer.echo(f"results written to {out_dir} (samples.png, summary.json)")


@app.command()
def bench(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this benchmark; repeat for several.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the entries as JSON to this file.")] = None,
    size: Annotated[
        str, typer.Option("--size", help="'full' (the stated problem sizes) or 'quick' (a smoke run).")
    ] = "full",
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repetitions; the best is kept.")] = 3,
    device: DeviceOpt = "cpu",
) -> None:
    """Run the benchmark harness: each figure with a reference measured in the same run and their ratio.

    Examples:
      diffmem bench
      diffmem bench --only exact_step --out bench.json
      diffmem bench --size quick --device cuda
    """
    from diffmem.bench import entries_to_json, format_table, run_benchmarks
    from diffmem.runs import write_json_atomic

    if repeats < 1:
        _fail(f"--repeats must be >= 1, got {repeats}")
    if out is not None and not out.parent.exists():
        _fail(f"the directory of --out ({out.parent}) does not exist")
    try:
        entries = run_benchmarks(
            only, device=_check_device(device), size=size, repeats=repeats, progress=lambda m: typer.echo(m, err=True)
        )
    except ValueError as e:
        _fail(str(e))
    typer.echo(format_table(entries))
    if out is not None:
        try:
            write_json_atomic(out, entries_to_json(entries))
        except OSError as e:
            _fail(f"cannot write {out}: {e.strerror}")
        typer.echo(f"results written to {out}")
    else:
        typer.echo("results printed above (pass --out FILE.json to save them)")


def main() -> None:  # pragma: no cover - console entry point
    app()
