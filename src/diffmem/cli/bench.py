"""`diffmem bench`: the benchmark harness, every figure against a reference timed in turn with it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from diffmem.bench import entries_to_json, format_table, run_benchmarks
from diffmem.cli.common import DeviceOpt, check_device, fail, progress
from diffmem.io.files import write_json_atomic


def bench(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this benchmark; repeat for several (default: all).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the entries as JSON to this file (default: print only).")
    ] = None,
    size: Annotated[
        str, typer.Option("--size", help="'full' (the stated problem sizes) or 'quick' (a smoke run).")
    ] = "full",
    repeats: Annotated[
        int, typer.Option("--repeats", help="Passes of reference and work per round; the best of each is kept.")
    ] = 3,
    rounds: Annotated[
        int,
        typer.Option(
            "--rounds",
            help="Rounds of reference and work timed in turn (odd); each entry reports the median round's "
            "ratio and the spread over rounds. Benchmarks whose one pass takes seconds run at most 3.",
        ),
    ] = 5,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="CPU threads for torch (default: torch's own, one per core). On a shared machine use fewer "
            "than the free cores: oversubscribed threads slow small operations far more than large products.",
        ),
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Run the benchmark harness: each figure against a reference timed in turn with it, in rounds.

    Reference and work run interleaved (A B A B ...), so that a busy machine slows both alike.
    Each entry gives its median round's ratio and the spread (IQR) of the rounds' ratios.
    'unstable' marks an entry whose spread is too wide to judge its goal.

    Examples:
      diffmem bench
      diffmem bench --only exact_step --out bench.json
      diffmem bench --size quick --device cuda
      diffmem bench --only knn --rounds 9
      diffmem bench --size quick --threads 1
    """
    if repeats < 1:
        fail(f"--repeats must be >= 1, got {repeats}")
    if rounds < 1 or rounds % 2 == 0:
        fail(f"--rounds must be an odd number >= 1 (the median is then one round's ratio), got {rounds}")
    if out is not None and not out.parent.exists():
        fail(f"the directory of --out ({out.parent}) does not exist")
    if threads is not None:
        if threads < 1:
            fail(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    entries = run_benchmarks(
        only, device=check_device(device), size=size, repeats=repeats, rounds=rounds, progress=progress
    )
    typer.echo(format_table(entries))
    if out is None:
        typer.echo("results printed above (pass --out FILE.json to save them)")
        return
    try:
        write_json_atomic(out, entries_to_json(entries))
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror}")
    typer.echo(f"results written to {out}")
