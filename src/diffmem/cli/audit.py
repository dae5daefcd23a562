"""`diffmem audit`: is a diffusion model (or a folder of generated images) copying its training images?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffmem.cli.common import DeviceOpt, check_device, choices, fail
from diffmem.evaluate.audit import AuditConfig, audit
from diffmem.evaluate.metrics import METRICS
from diffmem.report.audit import CLASS_LABELS, write_audit

Metric = choices(METRICS)


def audit_cmd(
    model: Annotated[
        Path | None,
        typer.Argument(
            help="A diffusers pipeline folder (unet/ + scheduler/), or a UNet2DModel folder with --scheduler."
        ),
    ] = None,
    train: Annotated[
        str, typer.Option("--train", help="Training images: a folder of PNG/JPEG, an .npz, or a dataset name.")
    ] = ...,
    generated: Annotated[
        Path | None, typer.Option("--generated", help="Generated images to audit instead of a model (folder or .npz).")
    ] = None,
    heldout: Annotated[
        str | None,
        typer.Option("--heldout", help="Real images the model never saw; without them calibration is leave-one-out."),
    ] = None,
    scheduler: Annotated[
        Path | None,
        typer.Option("--scheduler", help="scheduler_config.json (or its folder): required for a bare UNet folder."),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="Images to draw from the model.")] = 1000,
    steps: Annotated[int, typer.Option("--steps", help="Sampler steps; 0: the model's own default.")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Sample i starts from the noise of seed * 1,000,003 + i.")] = 0,
    metric: Annotated[Metric, typer.Option("--metric", help="Distance between images.")] = "l2",
    basins: Annotated[
        int, typer.Option("--basins", help="Measure the critical noise level of the N most-copied images (model only).")
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per network call and embedding batch.")] = 256,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Embedding cache (default: $DIFFMEM_CACHE, else ~/.cache/diffmem)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default: a new ./diffmem-audit-NNNNN).")
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Is a model copying its training images? Samples the model (or reads generated images), classifies
    every image as memorized / spurious / generalized / off-manifold against the training set, and writes
    the closest pairs, the copied training images and a report.

    Examples:
      diffmem audit my-ddpm --train data/train --heldout data/test --samples 1000
      diffmem audit --generated samples/ --train data/train
    """
    if model is not None and generated is not None:
        fail("give either a model folder or --generated images, not both")
    if model is None and generated is None:
        fail("give a model folder (diffusers save_pretrained layout) or --generated DIR")
    config = AuditConfig(
        n_samples=samples, seed=seed, steps=steps, metric=metric, n_basins=basins, batch_size=batch_size
    )
    result = audit(
        train,
        model=model,
        generated=generated,
        held_out=heldout,
        config=config,
        scheduler=scheduler,
        device=check_device(device),
        cache=cache_dir,
    )
    where = write_audit(result, out)
    for cls, f in result.fractions.items():
        typer.echo(
            f"{CLASS_LABELS[cls]:>20}: {f.value:.3f} [{f.low:.3f}, {f.high:.3f}]  ({round(f.value * f.n)} of {f.n})"
        )
    typer.echo(result.verdict())
    if result.duplicates:
        typer.echo(f"{len(result.duplicates)} pairs of training images are near-duplicates (duplicates.csv)")
    typer.echo(f"results written to {where}")
