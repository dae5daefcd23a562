"""The `diffmem` command line: the Typer app and its commands, one module per group of commands."""

from __future__ import annotations

from typing import Annotated

import typer

from diffmem.cli.audit import audit_cmd
from diffmem.cli.bench import bench
from diffmem.cli.common import one_error_path
from diffmem.cli.evaluate import analyze
from diffmem.cli.exact import census, census_sweep, exact_demo, hopfield, landscape
from diffmem.cli.export import export_cmd
from diffmem.cli.study import demo, memorization, report, status, sweep, two_model
from diffmem.cli.training import sample, train_cmd
from diffmem.io.files import VERSION

app = typer.Typer(
    name="diffmem",
    help="Diffusion models as dense associative memories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"diffmem {VERSION}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the installed diffmem version and exit.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    pass  # the app's help is Typer(help=...); this callback only carries the app-wide options


# in the order `diffmem --help` lists them; bad input of any kind ends in one line and exit status 2
app.command()(one_error_path(demo))
app.command("exact-demo")(one_error_path(exact_demo))
app.command()(one_error_path(bench))
app.command()(one_error_path(census))
app.command("census-sweep")(one_error_path(census_sweep))
app.command()(one_error_path(landscape))
app.command()(one_error_path(hopfield))
app.command("train")(one_error_path(train_cmd))
app.command()(one_error_path(sample))
app.command("export")(one_error_path(export_cmd))
app.command()(one_error_path(memorization))
app.command()(one_error_path(analyze))
app.command("audit")(one_error_path(audit_cmd))
app.command("two-model")(one_error_path(two_model))
app.command()(one_error_path(sweep))
app.command()(one_error_path(report))
app.command()(one_error_path(status))


def main() -> None:  # pragma: no cover - console entry point
    app()
