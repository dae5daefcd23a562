"""Commands on trained denoisers: train, sample."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from torch import Tensor

from diffmem.cli.common import DeviceOpt, Sampler, check_device, choices, fail
from diffmem.io.data import default_held_out, load_dataset
from diffmem.io.files import new_run_dir, write_json_atomic
from diffmem.models.nets import NETWORKS, NetworkConfig
from diffmem.models.sampling import CLIPS, SamplingConfig, nearest_distance, sample_with, save_samples
from diffmem.models.train import (
    SUBSETS,
    TRAIN_PREDICTIONS,
    UNET_MIN_SIDE,
    TrainConfig,
    default_batch_size,
    default_network,
    load_denoiser,
    narrow_mlp_warning,
    train,
)
from diffmem.viz.figures import sample_neighbour_grid

WEIGHTS = ("ema", "live")  # the exponential moving average of the weights, or the last step's
NetworkChoice = choices(("auto", *NETWORKS))
Mode = choices(("L", "RGB"))
Prediction = choices(TRAIN_PREDICTIONS)
Subset = choices(SUBSETS)
Weights = choices(WEIGHTS)
Clip = choices(CLIPS)


def train_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run directory; an existing run with the same options resumes.")],
    data: Annotated[str, typer.Option("--data", help="Dataset name (digits, circle, mnist, cifar10, ...).")] = "digits",
    root: Annotated[
        Path | None,
        typer.Option("--root", help="Folder (or .npz) of a file-based dataset; required for mnist, cifar10, npz, ..."),
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Training-set size: the first K of the seeded permutation.")] = 128,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps (the same for every K).")] = 2000,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Batch size (default: 128 for an MLP or on a GPU, 32 for a U-Net on a CPU)."),
    ] = None,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate after warm-up.")] = 1e-3,
    network: Annotated[
        NetworkChoice,
        typer.Option(
            "--network", help=f"Denoiser network; auto: a U-Net for images of side >= {UNET_MIN_SIDE}, else an MLP."
        ),
    ] = "auto",
    hidden: Annotated[int, typer.Option("--hidden", help="MLP width.")] = 256,
    depth: Annotated[int, typer.Option("--depth", help="MLP residual blocks.")] = 3,
    unet_width: Annotated[int, typer.Option("--unet-width", help="U-Net base channels W (levels of W and 2W).")] = 32,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", help="image_folder: resize and centre-crop to this side (default: the images' own)."
        ),
    ] = None,
    mode: Annotated[
        Mode | None, typer.Option("--mode", help="image_folder: grey (L) or RGB (default: the images' own).")
    ] = None,
    prediction: Annotated[
        Prediction,
        typer.Option("--prediction", help="What the network predicts: x0 ('sample') or the noise ('epsilon', DDPM)."),
    ] = "sample",
    n_held_out: Annotated[
        int | None,
        typer.Option(
            "--n-held-out",
            help="Examples never trained on, at the far end (default: the dataset's split, 297 of the digits, "
            "else one in six).",
        ),
    ] = None,
    subset: Annotated[
        Subset, typer.Option("--subset", help="'nested', or 'pair_a'/'pair_b' (two-model test).")
    ] = "nested",
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation, batches and noise.")] = 0,
    split_seed: Annotated[int, typer.Option("--split-seed", help="Seed of the data permutation.")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = 500,
    device: DeviceOpt = "cpu",
) -> None:
    """Train a DDPM denoiser on the nested training subset of size K (EMA weights are used for sampling).

    Options left out are chosen from the data: a held-out split (so that analyze can calibrate), a U-Net
    for images and an MLP for vectors, a batch that keeps a CPU run to minutes, an image folder's own
    size and mode. Writes OUT/config.json, OUT/checkpoint.safetensors + OUT/checkpoint.json and
    OUT/metrics.jsonl.

    Examples:
      diffmem train --data digits --k 32 --steps 4000 --out runs/digits-k32
      diffmem train --data circle --k 9 --out runs/circle-k9
      diffmem train --data image_folder --root my-images --k 40 --out runs/my-images
      diffmem train --data mnist --root data/mnist --network unet --k 1000 --device cuda --out runs/mnist-k1000
    """
    device = check_device(device)
    options = {"root": str(root)} if root else {}
    if image_size is not None or mode is not None:
        if data != "image_folder":
            fail(f"--image-size and --mode apply to --data image_folder, not {data!r}")
        options.update({k: v for k, v in (("size", image_size), ("mode", mode)) if v is not None})
    dataset = load_dataset(data, **options)  # checked before anything is written
    if n_held_out is None:
        n_held_out = default_held_out(data, len(dataset))
    kind = default_network(dataset) if network == "auto" else network
    batch_size = batch_size or default_batch_size(kind, device)
    if kind == "mlp":
        net = NetworkConfig("mlp", mlp={"hidden": hidden, "depth": depth})
    else:
        net = NetworkConfig("unet", unet={"block_out_channels": [unet_width, 2 * unet_width]})
    config = TrainConfig(
        data=data,
        data_options=options,
        k=k,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        network=net,
        prediction_type=prediction,
        n_held_out=n_held_out,
        subset=subset,
        seed=seed,
        split_seed=split_seed,
        checkpoint_every=checkpoint_every,
    )
    shape = " x ".join(str(d) for d in dataset.image_shape)
    typer.echo(
        f"{data}: {len(dataset)} examples of {shape}; training on K = {k}, holding out {n_held_out}; "
        f"{kind} network, batch {batch_size}, {steps} steps"
    )
    narrow = narrow_mlp_warning(config, dataset.x.shape[1])
    if narrow is not None:
        typer.secho(f"warning: {narrow}", err=True, fg=typer.colors.YELLOW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the narrow-MLP warning, printed above once
        result = train(config, out, device=device)
    typer.echo(f"trained {result.step} steps; results written to {result.out_dir}")


def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `diffmem train`.")],
    n: Annotated[int, typer.Option("--samples", help="Number of samples.")] = 256,
    sampler: Annotated[Sampler, typer.Option("--sampler", help="Sampler; ode is the probability-flow ODE (Heun).")] = (
        "ddim"
    ),
    steps: Annotated[int, typer.Option("--steps", help="Sampling steps.")] = 50,
    eta: Annotated[float, typer.Option("--eta", help="DDIM stochasticity in [0, 1].")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Sample i uses seed seed * 1000003 + i.")] = 0,
    weights: Annotated[Weights, typer.Option("--weights", help="EMA or live weights.")] = "ema",
    clip: Annotated[Clip, typer.Option("--clip", help="Clamp the predicted clean sample to the data's range.")] = (
        "data_range"
    ),
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Write FILE.npz, FILE.png, FILE.json (default: a new RUN_DIR/samples-NNNNN/)."),
    ] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Sample a trained run; each sample is identified by its seed.

    Writes samples.npz (samples, seeds, nearest training index and distance), samples.png (samples
    above their nearest training images) and sample.json into a new RUN_DIR/samples-NNNNN/, or to
    --out FILE.npz with FILE.png and FILE.json beside it.

    Examples:
      diffmem sample runs/digits-k32 --samples 512
      diffmem sample runs/digits-k32 --sampler ddpm --steps 1000 --seed 3
    """
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"--eta applies to the ddim sampler only (got --sampler {sampler})")
    config = SamplingConfig(sampler=sampler, steps=steps, eta=eta, n_samples=max(n, 2), seed=seed, clip=clip)
    if not run_dir.is_dir():
        raise ValueError(f"run directory not found: {run_dir}")
    dev = check_device(device)
    run = load_denoiser(run_dir, device=dev, use_ema=weights == "ema")
    samples, seeds = sample_with(
        run.denoiser, run.schedule, run.event_shape, config, n=n, device=dev, data_range=run.data_range
    )
    train_x = run.train_x.cpu()
    dist, idx = nearest_distance(samples, train_x)
    npz, png, meta = _sample_paths(run_dir, out_file)
    save_samples(npz, samples, seeds, nearest_index=idx.numpy(), nearest_distance=dist.numpy())
    options = {"n": n, "sampler": sampler, "steps": steps, "eta": eta, "seed": seed, "weights": weights, "clip": clip}
    if clip == "data_range":
        options["data_range"] = list(run.data_range)
    write_json_atomic(meta, {**options, "run": str(run_dir), "distance": "L2 / sqrt(D)"})
    if len(run.event_shape) >= 2:
        title = f"{sampler}, {steps} steps: samples above their nearest training images"
        _neighbour_grid(samples, train_x[idx[:16]], run.event_shape, f"K={run.config.k}", png, title)
    typer.echo(f"median distance to the nearest training example: {float(dist.median()):.4f} (L2 / sqrt(D))")
    typer.echo(f"results written to {npz.parent if out_file is None else npz}")


def _sample_paths(run_dir: Path, out_file: Path | None) -> tuple[Path, Path, Path]:
    """Where the samples, their figure and their options go: a new RUN_DIR/samples-NNNNN/, or --out."""
    if out_file is None:
        out = new_run_dir(run_dir, "samples")
        return out / "samples.npz", out / "samples.png", out / "sample.json"
    npz = out_file.with_suffix(".npz")
    if not npz.parent.is_dir():
        raise ValueError(f"the directory of --out ({npz.parent}) does not exist")
    return npz, npz.with_suffix(".png"), npz.with_suffix(".json")


def _neighbour_grid(samples: Tensor, nearest: Tensor, event: tuple, label: str, path: Path, title: str) -> None:
    """The first 16 samples (N, D) above their nearest training images (>= 16, D); colour as channel means."""
    show = min(16, samples.shape[0])
    grid = samples[:show].reshape(show, *event)
    near = nearest[:show].reshape(show, *event)
    if len(event) == 3:
        grid, near = grid.mean(1), near.mean(1)
    sample_neighbour_grid([(label, grid.numpy(), near.numpy())], path, title=title)
