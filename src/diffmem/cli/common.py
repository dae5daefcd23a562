"""What the commands share: the error exit, the device check, choice types and shared options."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, NoReturn

import torch
import typer

from diffmem.core import SAMPLERS
from diffmem.study.executors import EXECUTORS, JobsFailedError


def fail(message: str) -> NoReturn:
    """`error: message` on stderr and exit status 2: what the user gave is wrong, not the program."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def one_error_path(command: Callable) -> Callable:
    """The command, with every error that bad input can cause turned into `error: ...` and exit
    status 2: ValueError (ConfigError and StoreError are ValueErrors), OSError (a file that cannot
    be read or written), ImportError (a missing optional extra) and JobsFailedError. Anything else
    is a bug in diffmem and keeps its traceback."""

    @functools.wraps(command)
    def checked(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError, ImportError, JobsFailedError) as e:
            fail(str(e) or type(e).__name__)

    return checked


def check_device(device: str) -> str:
    """The device string, once it names a torch device this machine has (cpu, cuda, cuda:N)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"device {device!r} requested but CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        fail(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        fail(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def choices(names: Iterable[str]) -> Any:
    """A Literal type over a list the library defines once: Typer shows these values in --help and
    rejects any other with exit status 2 (`Invalid value for '--option'`)."""
    return Literal[tuple(names)]


Sampler = choices(SAMPLERS)
Executor = choices(EXECUTORS)
CIRCLE = ("census", "skip")  # run the circle toy's census panels, or not
Circle = choices(CIRCLE)

DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device for the heavy work, e.g. cpu, cuda, cuda:1.")]


def join_ints(values: Iterable[int]) -> str:
    """'4 16 48': a default list as help texts show it (the way --k is repeated on the command line)."""
    return " ".join(map(str, values))


def circle_lines(summary: dict, heading: str) -> list[str]:
    """The circle census panels, one line each: counts of memories, spurious minima and saddles."""
    lines = [f"{heading} at sigma = {summary['sigma']:g}:"]
    for p in summary["panels"]:
        ring = f", ring r*={p['ring_radius']:.4f}" if p["ring_radius"] else ""
        lines.append(f"  {p['title']:>20}: " + ", ".join(f"{k} {v}" for k, v in p["counts"].items()) + ring)
    return lines


def progress(message: str) -> None:
    """Progress goes to stderr, so that stdout holds only the results."""
    typer.echo(message, err=True)


def echo_lines(lines: Iterable[str]) -> None:
    for line in lines:
        typer.echo(line)
