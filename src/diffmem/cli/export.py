"""`diffmem export`: a trained U-Net run as a diffusers pipeline folder, and its images as PNG folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.common import choices
from diffmem.models.train import PIPELINES, export_images, export_pipeline

Pipeline = choices(PIPELINES)


def export_cmd(
    run: Annotated[Path, typer.Argument(help="A training run directory (diffmem train --network unet).")],
    out: Annotated[
        Path, typer.Option("--out", help="The pipeline folder to write (diffusers save_pretrained layout).")
    ],
    scheduler: Annotated[
        Pipeline, typer.Option("--scheduler", help="The scheduler the pipeline samples with.")
    ] = "ddim",
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Also write the run's training and held-out images to DIR/train, DIR/heldout (without it: none).",
        ),
    ] = None,
) -> None:
    """Write a U-Net run as a diffusers pipeline (DDIMPipeline or DDPMPipeline, safetensors), loadable by
    diffusers and by `diffmem audit`; --images writes the PNGs an audit compares it with.

    Examples:
      diffmem train --data digits --network unet --k 32 --n-held-out 297 --out runs/unet-k32
      diffmem export runs/unet-k32 --out pipelines/unet-k32 --images data/unet-k32
      diffmem audit pipelines/unet-k32 --train data/unet-k32/train --heldout data/unet-k32/heldout
    """
    export_pipeline(run, out, scheduler=scheduler)
    typer.echo(f"pipeline written to {out}")
    if images is not None:
        counts = export_images(run, images)
        typer.echo(f"{counts['train']} training and {counts['heldout']} held-out images written to {images}")
