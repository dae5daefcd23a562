"""A pretrained diffusers model as a diffmem denoiser D(x, sigma), in one call (SCIENCE.md §4).

load_diffusers reads a DDPMPipeline / DDIMPipeline folder (or a bare UNet2DModel folder plus a
scheduler config) and returns its network behind VPNetworkDenoiser, the VP schedule its scheduler
was trained with, and the scheduler's sampling settings (sampler, steps, timestep spacing,
clipping), so diffmem's samplers and analyses see the same model the pipeline samples from.

Every file is checked before diffusers touches it: pickled weights are refused unopened (loading a
pickle can execute code), and scheduler options that change the math and that diffmem does not
implement are refused rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from diffmem.core import PREDICTION_TYPES, ClippedDenoiser, VPNetworkDenoiser, VPSchedule
from diffmem.core.noise import SPACINGS, VP_KINDS
from diffmem.io.checkpoint import PICKLE_MESSAGE, load_json, looks_like_pickle
from diffmem.models.sampling import sample_denoiser

WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# scheduler class -> (diffmem sampler, the pipeline's default num_inference_steps)
SCHEDULERS = {"DDPMScheduler": ("ddpm", 1000), "DDIMScheduler": ("ddim", 50)}
# diffusers' defaults for keys that older scheduler configs leave out
_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "variance_type": "fixed_small",  # DDPMScheduler only
    "set_alpha_to_one": True,  # DDIMScheduler only
}
# (key, the values diffmem implements, what any other value would change)
_UNSUPPORTED = (
    ("trained_betas", (None,), "explicit betas (VPSchedule builds its betas from beta_schedule)"),
    ("thresholding", (False,), "dynamic thresholding of the predicted x0 (Imagen)"),
    ("rescale_betas_zero_snr", (False,), "zero-terminal-SNR rescaled betas (Lin et al. 2023)"),
    ("variance_type", ("fixed_small", "fixed_small_log"), "the DDPM step's noise (diffmem uses beta-tilde)"),
    ("set_alpha_to_one", (True,), "DDIM's last step (diffmem ends at sigma = 0, alpha_bar = 1)"),
)


@dataclass(frozen=True, eq=False)
class PretrainedModel:
    """A diffusers UNet2DModel with its scheduler's settings, speaking diffmem's D(x, sigma)."""

    denoiser: VPNetworkDenoiser  # D(x, sigma) around unet(x_t, t).sample, in the caller's dtype
    unet: nn.Module  # the diffusers network, eval mode, gradients off
    schedule: VPSchedule  # the DDPM schedule the scheduler config describes
    prediction_type: str  # 'epsilon' | 'sample' | 'v_prediction'
    event_shape: tuple[int, int, int]  # (in_channels, height, width): sample_size, an int or [h, w]
    sampler: str  # the diffmem sampler of the pipeline's scheduler: 'ddpm' or 'ddim' (eta = 0)
    steps: int  # the pipeline's default number of inference steps (DDPM 1000, DDIM 50)
    spacing: str  # timestep_spacing: 'leading' | 'trailing' | 'linspace'
    steps_offset: int  # added to 'leading' timesteps, as in diffusers' set_timesteps
    data_range: tuple[float, float] | None  # (-r, r) when clip_sample clamps x0, else None
    scheduler_class: str  # 'DDPMScheduler' or 'DDIMScheduler'
    source: str  # the folder the network was loaded from
    unet_config: dict  # unet config.json, for the record
    scheduler_config: dict  # scheduler_config.json, for the record

    def sample(
        self, n: int, *, seed: int = 0, steps: int | None = None, batch_size: int = 256, progress: bool = True
    ) -> Tensor:
        """n samples (n, D) in the model's data space (clamped to data_range when clip_sample is on),
        drawn with the scheduler's own sampler and timesteps; sample i uses seed `seed * 1_000_003 + i`.

        Two departures from diffusers' pipelines: DDIM with clipping re-derives eps from the clipped x0
        (use_clipped_model_output=True, as in GLIDE), where DDIMPipeline keeps the network's eps; and
        every step goes to the next listed timestep, where DDIMScheduler steps to t - T // steps (the
        same for 'leading', and for 'trailing' when steps divides T)."""
        den = self.denoiser if self.data_range is None else ClippedDenoiser(self.denoiser, *self.data_range)
        x, _ = sample_denoiser(
            den,
            self.schedule,
            n,
            self.event_shape,
            sampler=self.sampler,
            steps=self.steps if steps is None else steps,
            seed=seed,
            batch_size=batch_size,
            device=str(next(self.unet.parameters()).device),
            spacing=self.spacing,
            steps_offset=self.steps_offset,
            progress=progress,
        )
        return x


def load_diffusers(
    path: str | Path,
    *,
    scheduler: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PretrainedModel:
    """Load a diffusers UNet2DModel and its DDPM/DDIM scheduler as a PretrainedModel.

    path: a pipeline folder (model_index.json, unet/, scheduler/) as DDPMPipeline.save_pretrained
    writes it, or a bare UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors).
    scheduler: a scheduler_config.json, or a folder holding one; required for a bare UNet folder,
    and it replaces a pipeline's own scheduler. Weights are read from safetensors only, offline.
    """
    from diffusers import UNet2DModel

    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}")
    root = Path(path)
    unet_dir, sched_file = _locate(root, scheduler)
    unet_config = _check_unet_folder(unet_dir)
    sched_config = load_json(sched_file)
    settings = _scheduler_settings(sched_config, sched_file)
    try:
        unet = UNet2DModel.from_pretrained(
            unet_dir, use_safetensors=True, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{unet_dir}: diffusers could not load the UNet: {' '.join(str(e).split())}") from None
    unet = unet.to(device).eval().requires_grad_(False)

    def network(x_t: Tensor, t: Tensor) -> Tensor:
        # the network runs in its own dtype; D(x, sigma) answers in the dtype it is called with
        return unet(x_t.to(dtype), t).sample.to(x_t.dtype)

    denoiser = VPNetworkDenoiser(network, settings["schedule"], prediction_type=settings["prediction_type"])
    return PretrainedModel(
        denoiser=denoiser,
        unet=unet,
        event_shape=_event_shape(unet_config, unet_dir / "config.json"),
        source=str(unet_dir),
        unet_config=unet_config,
        scheduler_config=sched_config,
        **settings,
    )


def _locate(root: Path, scheduler: str | Path | None) -> tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a pipeline folder or a bare UNet folder."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass a diffusers pipeline or UNet2DModel folder")
    if (root / "model_index.json").is_file():
        index = load_json(root / "model_index.json")
        extra = sorted(k for k in index if not k.startswith("_") and k not in ("unet", "scheduler"))
        if extra:
            raise ValueError(
                f"{root / 'model_index.json'} lists components {extra} besides unet and scheduler; only "
                "unconditional pixel-space pipelines (DDPMPipeline, DDIMPipeline) are supported"
            )
        unet_dir, sched_file = root / "unet", root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        if scheduler is None:
            raise ValueError(
                f"{root} is a bare UNet folder without a scheduler; pass scheduler= a scheduler_config.json "
                "(or a folder holding one) describing the noise schedule the network was trained with"
            )
        unet_dir, sched_file = root, Path()
    else:
        raise ValueError(
            f"{root} holds neither model_index.json (a diffusers pipeline) nor config.json (a UNet2DModel folder)"
        )
    if scheduler is not None:
        sched_file = Path(scheduler)
        if sched_file.is_dir():
            nested = sched_file / "scheduler" / "scheduler_config.json"
            sched_file = nested if nested.is_file() else sched_file / "scheduler_config.json"
    if not sched_file.is_file():
        raise ValueError(f"scheduler config not found: {sched_file}; pass scheduler= a scheduler_config.json")
    return unet_dir, sched_file


def _check_unet_folder(folder: Path) -> dict:
    """The UNet's config, after checking the folder holds an unconditional UNet2DModel in safetensors.
    Pickled weights are refused by name, never opened."""
    config = load_json(folder / "config.json")
    name = config.get("_class_name")
    if name != "UNet2DModel":
        why = "conditional models are not supported" if "Condition" in str(name) else "only UNet2DModel is supported"
        raise ValueError(f"{folder / 'config.json'} describes a {name!r}: {why}")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise ValueError(f"{folder / 'config.json'} describes a class-conditional UNet2DModel: not supported")
    if config.get("time_embedding_type", "positional") == "fourier":
        raise ValueError(
            f"{folder / 'config.json'}: a Fourier time embedding takes continuous VE noise levels (score SDE), "
            "not DDPM timesteps; not supported"
        )
    c_in, c_out = config.get("in_channels", 3), config.get("out_channels", 3)
    if c_in != c_out:
        raise ValueError(
            f"{folder / 'config.json'}: out_channels={c_out} differs from in_channels={c_in} (a learned variance?); "
            "diffmem needs one prediction per input channel"
        )
    _event_shape(config, folder / "config.json")
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{folder} holds pickled weights ({', '.join(pickles)}) and no {WEIGHTS}; diffmem refuses them "
                "because unpickling can execute arbitrary code. If you trust the file, convert it once in a trusted "
                f"environment: UNet2DModel.from_pretrained('{folder}', use_safetensors=False)"
                f".save_pretrained('{folder}', safe_serialization=True)"
            )
        raise ValueError(f"{folder} holds no {WEIGHTS}")
    with open(weights, "rb") as f:
        if looks_like_pickle(f.read(4)):
            raise ValueError(f"{weights} {PICKLE_MESSAGE}")
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            f.keys()  # the header is parsed and checked against the file's length on opening
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is truncated or corrupt: {' '.join(str(e).split())}") from None
    return config


def _event_shape(config: dict, file: Path) -> tuple[int, int, int]:
    """(in_channels, height, width) from a UNet config; sample_size is an int or [height, width]."""
    size, channels = config.get("sample_size"), config.get("in_channels", 3)
    hw = [size, size] if isinstance(size, int) else size
    dims = [channels, *hw] if isinstance(hw, list) and len(hw) == 2 else []
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims) or not dims:
        raise ValueError(
            f"{file}: need a positive integer in_channels and sample_size (an int or [height, width]), "
            f"got in_channels={channels!r}, sample_size={size!r}"
        )
    return (dims[0], dims[1], dims[2])


def _scheduler_settings(config: dict, file: Path) -> dict:
    """PretrainedModel's schedule and sampling fields from a DDPM/DDIM scheduler config."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"{file}: scheduler {name!r} is not supported; supported: {sorted(SCHEDULERS)}")
    cfg = {**_DEFAULTS, **config}  # unknown keys (diffusers adds many) are ignored
    for key, allowed, what in _UNSUPPORTED:
        if cfg[key] not in allowed:
            value = repr(cfg[key]) if len(repr(cfg[key])) < 40 else repr(cfg[key])[:36] + "..."
            raise ValueError(
                f"{file}: {key}={value} sets {what}, which diffmem does not implement; it supports {key}={allowed[0]!r}"
            )
    prediction, kind, spacing = cfg["prediction_type"], cfg["beta_schedule"], cfg["timestep_spacing"]
    for key, value, choices in (
        ("prediction_type", prediction, PREDICTION_TYPES),
        ("beta_schedule", kind, VP_KINDS),
        ("timestep_spacing", spacing, SPACINGS),
    ):
        if value not in choices:
            raise ValueError(f"{file}: {key}={value!r} is not supported; choose one of {choices}")
    if not isinstance(cfg["clip_sample"], bool):
        raise ValueError(f"{file}: clip_sample must be true or false, got {cfg['clip_sample']!r}")
    r = cfg["clip_sample_range"]
    if cfg["clip_sample"] and not (isinstance(r, (int, float)) and r > 0):
        raise ValueError(f"{file}: clip_sample_range must be a positive number, got {r!r}")
    offset = cfg["steps_offset"]
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"{file}: steps_offset must be an integer >= 0, got {offset!r}")
    try:
        schedule = VPSchedule(kind, cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from None
    sampler, steps = SCHEDULERS[name]
    return {
        "schedule": schedule,
        "prediction_type": prediction,
        "sampler": sampler,
        "steps": min(steps, schedule.num_train_timesteps),
        "spacing": spacing,
        "steps_offset": offset,
        "data_range": (-float(r), float(r)) if cfg["clip_sample"] else None,
        "scheduler_class": name,
    }
