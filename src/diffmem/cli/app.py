"""The `diffmem` command line: the Typer app and its commands, one module per group of commands."""

from __future__ import annotations

import typer

from diffmem.cli.bench import bench
from diffmem.cli.evaluate import analyze
from diffmem.cli.exact import census, census_sweep, exact_demo, hopfield, landscape
from diffmem.cli.study import demo, memorization, report, status, sweep, two_model
from diffmem.cli.training import sample, train_cmd

app = typer.Typer(
    name="diffmem",
    help="Diffusion models as dense associative memories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# in the order `diffmem --help` lists them
app.command()(demo)
app.command("exact-demo")(exact_demo)
app.command()(bench)
app.command()(census)
app.command("census-sweep")(census_sweep)
app.command()(landscape)
app.command()(hopfield)
app.command("train")(train_cmd)
app.command()(sample)
app.command()(memorization)
app.command()(analyze)
app.command("two-model")(two_model)
app.command()(sweep)
app.command()(report)
app.command()(status)


def main() -> None:  # pragma: no cover - console entry point
    app()
