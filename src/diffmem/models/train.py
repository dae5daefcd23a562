"""DDPM training on nested training subsets (SCIENCE.md §4, §7), with safe, resumable checkpoints.

A run directory holds config.json (resolved options), checkpoint.safetensors (model, EMA and
optimizer tensors), checkpoint.json (step, RNG state, data indices, optimizer hyper-parameters),
and metrics.jsonl (an append-only log of the loss, overall and per noise-level bucket).
Resuming from a checkpoint reaches exactly the weights of an uninterrupted run on the CPU.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffmem.core import VPNetworkDenoiser, VPSchedule, schedule_from_dict
from diffmem.io.checkpoint import load_json, load_tensors_and_metadata, save_tensors
from diffmem.io.config import (
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Bound,
    Section,
    check_keys,
    choice,
    coerce,
    error,
    field_types,
    mapping,
    reraise,
    show,
)
from diffmem.io.data import ArrayDataset, disjoint_pair, held_out_indices, load_dataset, training_indices
from diffmem.io.files import append_jsonl, read_jsonl, write_bytes_atomic, write_json_atomic
from diffmem.models.nets import MLPConfig, NetworkConfig, build_network

SUBSETS = ("nested", "pair_a", "pair_b")
LR_SCHEDULES = ("constant", "cosine")
TRAIN_PREDICTIONS = ("epsilon", "sample")
METRICS_FILE = "metrics.jsonl"
MAX_TIMESTEPS = 100_000  # a sanity bound on T (DDPM uses 1000): the schedule is built while validating


def vp_schedule_dict(value: Mapping, key: str) -> dict:
    """The resolved VP schedule dict (defaults filled in); training needs a VP schedule."""
    d = dict(mapping(value, key))
    kind = d.pop("type", "vp")
    if kind != "vp":
        raise error(f"{key}.type", f"training uses a VP (DDPM) schedule: set type: vp, got {show(kind)}")
    init = [f for f in fields(VPSchedule) if f.init]
    check_keys(d, ["type"] + [f.name for f in init], key)
    types_ = field_types(VPSchedule)
    d = {name: coerce(v, types_[name], f"{key}.{name}") for name, v in d.items()}
    if d.get("num_train_timesteps", 0) > MAX_TIMESTEPS:
        raise error(f"{key}.num_train_timesteps", f"must be <= {MAX_TIMESTEPS}, got {d['num_train_timesteps']}")
    try:
        return schedule_from_dict({"type": "vp", **d}).to_dict()
    except ValueError as e:
        raise reraise(key, [f.name for f in init], e) from None


@dataclass(frozen=True)
class TrainOptions(Section):
    """How to train: the optimizer, schedule and logging, the same for every run of a study (its
    `train:` section). TrainConfig adds what one run trains on."""

    _key = "train"
    # 'sample' (x0, the default) or 'epsilon' (DDPM, the original study). Within the same steps an
    # x0 network memorizes small K (digits, K = 8, 2,000 steps: every sample a copy, against 0.46
    # for epsilon) and still generalizes at large K (K = 1,500: 0.04 copies): the phases are visible.
    prediction_type: str = "sample"
    schedule: dict = field(default_factory=lambda: VPSchedule().to_dict())  # VP (DDPM) schedule
    steps: int = 2000  # optimizer steps, the same for every K (as in the original study)
    batch_size: int = 128
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    lr_schedule: str = "constant"  # after warm-up: 'constant' (DDPM) or 'cosine' (decays to 0 at `steps`)
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.999  # EMA of the weights, used for sampling
    loss_buckets: int = 10  # noise-level buckets of the logged loss
    log_every: int = 100
    checkpoint_every: int = 0  # 0: only at the end

    _bounds = {
        **dict.fromkeys(("steps", "batch_size", "loss_buckets", "log_every"), AT_LEAST_1),
        **dict.fromkeys(("warmup_steps", "checkpoint_every", "weight_decay"), NON_NEGATIVE),
        "lr": Bound(0, 10, (False, True)),  # AdamW's step is about lr per weight: above 10 nothing is learned
        "grad_clip": POSITIVE,
        "ema_decay": Bound(0, 1, (True, False)),
    }

    def _check(self) -> None:
        object.__setattr__(self, "schedule", vp_schedule_dict(self.schedule, self._at("schedule")))
        choice(self._at("prediction_type"), self.prediction_type, TRAIN_PREDICTIONS)
        choice(self._at("lr_schedule"), self.lr_schedule, LR_SCHEDULES)


@dataclass(frozen=True)
class TrainConfig(TrainOptions):
    """One training run: its data, training-set size K, network and seed, and how to train."""

    _key = ""
    data: str = "digits"  # a dataset name of diffmem.io.data.load_dataset
    data_options: dict = field(default_factory=dict)  # e.g. {"root": "/data/mnist"}
    k: int = 128  # training-set size: the first K of the seeded permutation
    split_seed: int = 0  # seed of that permutation (shared by every K: nested subsets)
    n_held_out: int = 0  # examples at the far end of the permutation, never trained on
    subset: str = "nested"  # 'nested'; 'pair_a' / 'pair_b': the two disjoint sets of the two-model test
    network: NetworkConfig = field(default_factory=NetworkConfig)
    seed: int = 0  # initialisation, batches, timesteps and noise

    _bounds = {
        **TrainOptions._bounds,
        "k": AT_LEAST_1,
        "n_held_out": NON_NEGATIVE,
        "split_seed": SEED,
        "seed": SEED,
    }

    def _check(self) -> None:
        super()._check()
        choice(self._at("subset"), self.subset, SUBSETS)

    @classmethod
    def for_run(cls, options: TrainOptions, **run) -> TrainConfig:
        """The run of `options` (a study's train section) on the data, K, network and seed in `run`."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(TrainOptions)}, **run)


UNET_MIN_SIDE = 16  # images at least this wide get a U-Net by default; smaller ones (the 8x8 digits) an MLP


def default_network(data: ArrayDataset) -> str:
    """'unet' for images of side >= UNET_MIN_SIDE, 'mlp' for vectors and tiny images."""
    shape = tuple(data.image_shape)
    return "unet" if len(shape) >= 2 and min(shape[-2:]) >= UNET_MIN_SIDE else "mlp"


def default_batch_size(network: str, device: str) -> int:
    """128 (the original study's) for an MLP or on a GPU; 32 for a U-Net on a CPU, where a step at 128 takes
    seconds and a few thousand steps would take hours."""
    return 32 if network == "unet" and torch.device(device).type == "cpu" else 128


def narrow_mlp_warning(config: TrainConfig, dim: int) -> str | None:
    """A warning when an MLP is narrower than the data it must reproduce (its hidden width below D)."""
    if config.network.kind != "mlp":
        return None
    hidden = int(config.network.mlp.get("hidden", MLPConfig.hidden))
    if hidden >= dim:
        return None
    return (
        f"the MLP is {hidden} wide for data of dimension {dim}: it cannot reproduce the images and its loss "
        f"will stall; use --hidden >= {dim} or --network unet"
    )


def split_indices(config: TrainConfig, n: int) -> Tensor:
    """Training indices of the run: the nested set of size K, or one of the two disjoint sets of the
    two-model test; never one of the n_held_out examples at the far end of the permutation."""
    if config.subset == "nested":
        return training_indices(n, config.k, config.split_seed, config.n_held_out)
    a, b = disjoint_pair(n, config.k, config.split_seed, config.n_held_out)
    return a if config.subset == "pair_a" else b


def held_out_split(config: TrainConfig, n: int) -> Tensor:
    """The run's held-out indices (never trained on by any K of the same split seed)."""
    return held_out_indices(n, config.n_held_out, config.split_seed)


def event_shape_for(config: TrainConfig, data: ArrayDataset) -> tuple[int, ...]:
    shape = tuple(data.image_shape)
    if config.network.kind == "unet" and len(shape) == 2:
        shape = (1, *shape)  # grey images without a channel axis
    return shape


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The CPU generator of one training step on one rank: every draw of the run is a function of
    (seed, rank, step), so a resumed run (on any number of ranks, any device) equals an
    uninterrupted one and ranks never share batches."""
    mixed = np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed) & (2**63 - 1))


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    step: int
    model: nn.Module  # the live (non-EMA) weights at the end


@dataclass
class TrainState:
    model: nn.Module
    ema: dict[str, Tensor]
    optimizer: torch.optim.Optimizer
    step: int = 0


def _all_finite(value: Tensor, distributed: bool) -> bool:
    """Whether `value` is finite on every rank (all ranks must stop together, or DDP deadlocks)."""
    bad = (~torch.isfinite(value.detach())).to(torch.float32).reshape(1)
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def _logged_step(record: dict) -> int:
    try:
        return int(record["step"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return 1 << 62  # a record without a readable step is dropped


def _lr_at(config: TrainConfig, step: int) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr


PREVIOUS_TENSORS = "checkpoint.prev.safetensors"


def _save(out: Path, config: TrainConfig, state: TrainState, train_idx: Tensor) -> None:
    """Tensors first, then the JSON naming their step and nonce. The previous tensors stay beside
    them until the new JSON is in place, so a crash at any moment leaves one matching pair, which
    _restore finds; a pair that matches nowhere is refused instead of mixing two steps."""
    nonce = secrets.token_hex(8)
    current, previous = out / "checkpoint.safetensors", out / PREVIOUS_TENSORS
    if current.exists() and (out / "checkpoint.json").exists():
        try:
            os.replace(current, previous)
        except OSError as e:
            raise ValueError(f"cannot keep the previous checkpoint in {out}: {e.strerror}") from None
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in state.ema.items()})
    opt = state.optimizer.state_dict()
    for i, s in opt["state"].items():
        for key, v in s.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(v)
    save_tensors(out / "checkpoint.safetensors", tensors, metadata={"step": str(state.step), "nonce": nonce})
    write_json_atomic(
        out / "checkpoint.json",
        {
            "config": config.to_dict(),
            "step": state.step,
            "nonce": nonce,
            "train_indices": train_idx.tolist(),
            "param_groups": opt["param_groups"],
            "torch": torch.__version__,
        },
    )
    previous.unlink(missing_ok=True)


def _matching_tensors(out: Path, nonce: str, step: int) -> tuple[dict | None, dict]:
    """The tensors saved with checkpoint.json: the current file, or the previous one when a save was
    interrupted after it moved the old tensors aside."""
    for name in ("checkpoint.safetensors", PREVIOUS_TENSORS):
        if not (out / name).exists():
            continue
        tensors, tmeta = load_tensors_and_metadata(out / name)
        if tmeta.get("nonce") == nonce and tmeta.get("step") == str(step):
            return tensors, tmeta
    return None, {}


def _restore(out: Path, config: TrainConfig, state: TrainState, train_idx: Tensor) -> None:
    """Load a run's checkpoint into `state`, refusing anything that does not fit exactly."""
    meta = load_json(out / "checkpoint.json")
    try:
        stored = TrainConfig.from_dict(meta["config"]).to_dict()
        step, nonce, param_groups, indices = meta["step"], meta["nonce"], meta["param_groups"], meta["train_indices"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{out / 'checkpoint.json'} is missing or has a malformed field ({e})") from None
    mine = config.to_dict()
    for d in (mine, stored):  # the data may move: its identity is checked by the training indices below
        d["data_options"] = {k: v for k, v in d["data_options"].items() if k != "root"}
    # a run may be extended or re-logged; a cosine schedule depends on `steps`, so it may not
    ignore = {"checkpoint_every", "log_every"} | ({"steps"} if config.lr_schedule == "constant" else set())
    diff = sorted(k for k in mine if k not in ignore and mine[k] != stored.get(k))
    if diff:
        raise ValueError(f"the checkpoint in {out} was trained with a different configuration ({', '.join(diff)})")
    if indices != train_idx.tolist():
        raise ValueError(f"the checkpoint in {out} was trained on different data indices")
    tensors, tmeta = _matching_tensors(out, nonce, step)
    if tensors is None:
        raise ValueError(
            f"checkpoint.safetensors and checkpoint.json in {out} belong to different saves (an interrupted "
            "write?); restore both files from one save or start a new run"
        )
    live = state.model.state_dict()
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    for name, part in (("model", model_sd), ("ema", ema)):
        bad = sorted(set(live) ^ set(part)) + [k for k in live if k in part and part[k].shape != live[k].shape]
        if bad:
            raise ValueError(f"the checkpoint's {name} weights do not fit the configured network (e.g. {bad[0]})")
    params = list(state.model.parameters())
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            opt_state.setdefault(int(i), {})[key] = v
    if step > 0 and (
        sorted(opt_state) != list(range(len(params)))
        or any(opt_state[i].get("exp_avg", torch.empty(0)).shape != p.shape for i, p in enumerate(params))
    ):
        raise ValueError(f"the checkpoint's optimizer state does not fit the configured network ({out})")
    state.model.load_state_dict(model_sd, strict=True)
    dev = params[0].device
    state.ema = {k: v.to(dev) for k, v in ema.items()}
    opt_state = {i: {k: (v if k == "step" else v.to(dev)) for k, v in s.items()} for i, s in opt_state.items()}
    state.optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
    state.step = int(step)


def build_model(config: TrainConfig, event_shape: tuple[int, ...], device: torch.device) -> nn.Module:
    """The network, initialised from config.seed without touching the caller's global RNG state."""
    schedule = schedule_from_dict(config.schedule)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_network(config.network, event_shape, schedule.num_train_timesteps)
    return model.to(device)


@dataclass(frozen=True)
class _Run:
    """What every step of one training run reads."""

    config: TrainConfig
    out: Path
    train_idx: Tensor  # (K,) the examples trained on, indices into the dataset
    x_train: Tensor  # (K, D) those examples, on the device
    event: tuple[int, ...]  # the network's shape of one example
    alpha_bar: Tensor  # (T,) float32 on the device, the DDPM schedule's cumulative signal levels
    rank: int  # this process's rank; rank 0 writes the files
    distributed: bool  # a torch.distributed process group is running


def _process_group() -> tuple[bool, int]:
    """(whether a torch.distributed process group is running, this process's rank in it)."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    return distributed, (dist.get_rank() if distributed else 0)


def _open_run_dir(run: _Run, state: TrainState, device: str) -> None:
    """Create the run directory, then resume from its checkpoint (dropping the log records written
    after it: they will be redone) or start afresh with config.json and no log."""
    out, metrics = run.out, run.out / METRICS_FILE
    if run.rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the run directory {out}: {e.strerror}") from None
    if (out / "checkpoint.json").exists():
        _restore(out, run.config, state, run.train_idx)
        if run.rank == 0 and metrics.exists():
            kept = [r for r in read_jsonl(metrics) if _logged_step(r) <= state.step]
            write_bytes_atomic(metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())
    elif run.rank == 0:
        write_json_atomic(out / "config.json", {**run.config.to_dict(), "device": device})
        metrics.unlink(missing_ok=True)  # a log left by a run that died before its first checkpoint


def _batch_loss(run: _Run, net: nn.Module, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-sample loss (B,), timesteps (B,)) of the step's batch: noised training examples
    and the network's prediction of their noise (or of the clean examples)."""
    c, dev = run.config, run.x_train.device
    # randomness is drawn on the CPU from the step's generator: identical on every device
    g = step_generator(c.seed, run.rank, step)
    idx = torch.randint(c.k, (c.batch_size,), generator=g)
    t = torch.randint(run.alpha_bar.shape[0], (c.batch_size,), generator=g)
    noise = torch.randn((c.batch_size, run.x_train.shape[1]), generator=g).to(dev)
    x0 = run.x_train[idx.to(dev)]
    ab = run.alpha_bar[t.to(dev)][:, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise  # DDPM forward process, Ho et al. eq. 4
    pred = net(x_t.reshape(-1, *run.event), t.to(dev)).reshape(c.batch_size, -1)
    target = noise if c.prediction_type == "epsilon" else x0
    per_sample = ((pred - target) ** 2).mean(dim=1)
    return per_sample.mean(), per_sample, t


def _optimizer_step(run: _Run, state: TrainState, loss: Tensor) -> None:
    """Back-propagate a finite loss, clip the gradient and update the weights; a non-finite loss or
    gradient stops the run (on every rank) before the weights change."""
    if not _all_finite(loss, run.distributed):
        meta = run.out / "checkpoint.json"
        kept = f"the last good checkpoint (step {load_json(meta)['step']}) is kept" if meta.exists() else None
        raise ValueError(
            f"the loss became {float(loss.detach())} at step {state.step + 1}; training stopped and "
            f"{kept or 'no checkpoint was written'}"
        )
    for group in state.optimizer.param_groups:
        group["lr"] = _lr_at(run.config, state.step)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), run.config.grad_clip)
    if not _all_finite(grad_norm, run.distributed):
        raise ValueError(
            f"the gradient became non-finite at step {state.step + 1}; training stopped before the update, "
            "the last checkpoint is kept"
        )
    state.optimizer.step()


class _EMA:
    """The exponential moving average of the weights, updated in place after every step."""

    def __init__(self, state: TrainState):
        # pairs built once: state_dict tensors share storage with the parameters updated in place
        live = state.model.state_dict()
        self.floats = [(state.ema[k], v) for k, v in live.items() if v.dtype.is_floating_point]
        self.others = [(state.ema[k], v) for k, v in live.items() if not v.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, config: TrainConfig, step: int) -> None:
        if self.floats:
            targets, sources = zip(*self.floats, strict=True)
            # decay warms up as (1 + step) / (10 + step) so early weights do not linger
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(targets), list(sources), 1 - decay)  # ema += (1 - d)(w - ema)
        for e, v in self.others:
            e.copy_(v)


class _LossLog:
    """Loss sums per noise-level bucket since the last record of metrics.jsonl."""

    def __init__(self, buckets: int, num_train_timesteps: int, device: torch.device):
        self.buckets, self.T = buckets, num_train_timesteps
        self.sum = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.n = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.t_start = time.perf_counter()

    def add(self, t: Tensor, per_sample: Tensor) -> None:  # (B,) timesteps and their losses
        b = (t.to(self.sum.device) * self.buckets // self.T).to(torch.int64)
        self.sum.index_add_(0, b, per_sample.detach().double())
        self.n.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))

    def mean(self) -> float:
        return float(self.sum.sum() / self.n.sum())

    def record(self, step: int) -> dict:
        return {
            "step": step,
            "loss": self.mean(),
            "loss_by_bucket": [float(s / n) if n else None for s, n in zip(self.sum, self.n, strict=True)],
            "seconds": time.perf_counter() - self.t_start,
        }

    def reset(self) -> None:
        self.sum.zero_()
        self.n.zero_()


def _run_steps(run: _Run, state: TrainState, net: nn.Module, end: int, progress: bool) -> None:
    """Optimizer steps from state.step to `end`, with the EMA, the loss log every log_every steps
    (and at `end`) and the checkpoints every checkpoint_every steps."""
    c = run.config
    ema = _EMA(state)
    bar = tqdm(total=end, initial=state.step, desc=f"train K={c.k}", disable=not progress or run.rank != 0)
    log = _LossLog(c.loss_buckets, run.alpha_bar.shape[0], run.x_train.device)
    with bar:
        while state.step < end:
            loss, per_sample, t = _batch_loss(run, net, state.step)
            _optimizer_step(run, state, loss)
            ema.update(c, state.step)
            state.step += 1
            log.add(t, per_sample)
            bar.update()
            if state.step % c.log_every == 0 or state.step == end:
                bar.set_postfix(loss=f"{log.mean():.4f}")
                if run.rank == 0:
                    append_jsonl(run.out / METRICS_FILE, log.record(state.step))
                log.reset()
            if run.rank == 0 and c.checkpoint_every and state.step % c.checkpoint_every == 0:
                _save(run.out, c, state, run.train_idx)


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    device: str = "cpu",
    stop_at: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume) the run in `out`. stop_at ends early at that step (with a checkpoint), as
    an interruption would. Under torch.distributed (e.g. torchrun, backend gloo or nccl) every rank
    trains a DistributedDataParallel replica on its own batches; rank 0 writes the files."""
    distributed, rank = _process_group()
    dev = torch.device(device)
    schedule = schedule_from_dict(config.schedule)
    if not isinstance(schedule, VPSchedule):
        raise ValueError("training uses a VP (DDPM) schedule; got a VE schedule")
    data = load_dataset(config.data, dtype=torch.float32, **config.data_options)
    train_idx = split_indices(config, len(data))
    event = event_shape_for(config, data)
    narrow = narrow_mlp_warning(config, math.prod(event))
    if narrow is not None and rank == 0:
        warnings.warn(narrow, stacklevel=2)
    model = build_model(config, event, dev)
    state = TrainState(
        model=model,
        ema={k: v.detach().clone() for k, v in model.state_dict().items()},
        optimizer=torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay),
    )
    run = _Run(
        config=config,
        out=Path(out),
        train_idx=train_idx,
        x_train=data.x[train_idx].to(dev),
        event=event,
        alpha_bar=schedule.alpha_bar.to(torch.float32).to(dev),
        rank=rank,
        distributed=distributed,
    )
    _open_run_dir(run, state, device)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    _run_steps(run, state, net, config.steps if stop_at is None else min(stop_at, config.steps), progress)
    if rank == 0:
        _save(run.out, config, state, train_idx)
    return TrainResult(out_dir=run.out, step=state.step, model=model)


@dataclass(frozen=True)
class TrainedRun:
    """A trained run, loaded: its denoiser D(x, sigma) and what it was trained on."""

    denoiser: VPNetworkDenoiser
    config: TrainConfig
    train_x: Tensor  # (K, D) the training examples, flat, on the run's device
    event_shape: tuple[int, ...]  # one example's shape, (D,) or (C, H, W)
    model: nn.Module  # the network (EMA or live weights), in eval mode
    schedule: VPSchedule
    data: ArrayDataset  # the whole dataset it was drawn from (held-out part included), float32 on the CPU

    @property
    def data_range(self) -> tuple[float, float]:
        """The smallest and largest value in the whole dataset: what sampling clips the clean estimate to."""
        return float(self.data.x.min()), float(self.data.x.max())


def load_denoiser(
    run_dir: str | Path,
    *,
    device: str = "cpu",
    use_ema: bool = True,
    timestep: str = "continuous",
    data_root: str | None = None,
) -> TrainedRun:
    """The denoiser of a trained run with its config, training data and network.

    timestep='continuous' feeds fractional timesteps for noise levels between the training grid's
    (both networks accept them); 'nearest' insists on the grid. data_root: where a file-based
    dataset is now, when it moved since training (the training indices still have to match)."""
    run_dir = Path(run_dir)
    meta = load_json(run_dir / "checkpoint.json")
    try:
        config = TrainConfig.from_dict(meta["config"])
        indices = torch.tensor(meta["train_indices"], dtype=torch.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{run_dir / 'checkpoint.json'} is missing or has a malformed field ({e})") from None
    if data_root is not None and "root" in config.data_options:
        config = replace(config, data_options={**config.data_options, "root": str(data_root)})
    data = load_dataset(config.data, dtype=torch.float32, **config.data_options)
    if not torch.equal(indices, split_indices(config, len(data))):
        raise ValueError(f"the data behind {run_dir} changed since training (its training indices no longer match)")
    event = event_shape_for(config, data)
    dev = torch.device(device)
    model = build_model(config, event, dev)
    tensors, _ = _matching_tensors(run_dir, meta.get("nonce"), meta.get("step"))
    if tensors is None:
        raise ValueError(
            f"checkpoint.safetensors and checkpoint.json in {run_dir} belong to different saves (an interrupted "
            "write?); rerun the training command to resume, or restore both files from one save"
        )
    prefix = "ema." if use_ema else "model."
    sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's weights do not fit its configured network: {e}") from None
    model.eval()
    schedule = schedule_from_dict(config.schedule)

    denoiser = VPNetworkDenoiser(model, schedule, prediction_type=config.prediction_type, timestep=timestep)
    return TrainedRun(denoiser, config, data.x[indices].to(dev), event, model, schedule, data)


def export_diffusers(run_dir: str | Path, out_dir: str | Path, *, use_ema: bool = True) -> Path:
    """Write a U-Net run's weights in diffusers' save_pretrained layout (config.json +
    diffusion_pytorch_model.safetensors), loadable with UNet2DModel.from_pretrained(out_dir)."""
    run = load_denoiser(run_dir, use_ema=use_ema)
    config, model = run.config, run.model
    if config.network.kind != "unet":
        raise ValueError(f"only U-Net runs have a diffusers layout; this run trained a {config.network.kind!r}")
    out_dir = Path(out_dir)
    model.unet.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


PIPELINES = ("ddim", "ddpm")  # the scheduler an exported pipeline samples with


def export_pipeline(run_dir: str | Path, out_dir: str | Path, *, scheduler: str = "ddim", use_ema: bool = True) -> Path:
    """Write a U-Net run as a diffusers pipeline folder (DDIMPipeline or DDPMPipeline.save_pretrained:
    model_index.json, unet/ in safetensors, scheduler/), with the run's schedule and prediction type and
    clipping to the data's range, so diffusers (and `diffmem audit`) load it like any other model."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if scheduler not in PIPELINES:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {PIPELINES}")
    run = load_denoiser(run_dir, use_ema=use_ema)
    if run.config.network.kind != "unet":
        raise ValueError(
            "only U-Net runs export as a diffusers pipeline (UNet2DModel); this run trained a "
            f"{run.config.network.kind!r}"
        )
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        raise ValueError(f"{out_dir} already holds a pipeline; choose another folder (nothing is overwritten)")
    low, high = run.data_range
    s = run.schedule
    options = {
        "num_train_timesteps": s.num_train_timesteps,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": s.kind,
        "prediction_type": run.config.prediction_type,
        "clip_sample": True,  # diffusers clips to [-r, r]: the data's range, made symmetric
        "clip_sample_range": max(abs(low), abs(high)),
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    if scheduler == "ddim":
        pipe = DDIMPipeline(unet=run.model.unet, scheduler=DDIMScheduler(set_alpha_to_one=True, **options))
    else:
        pipe = DDPMPipeline(unet=run.model.unet, scheduler=DDPMScheduler(variance_type="fixed_small", **options))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def export_images(run_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """The run's training images and held-out images as PNG folders OUT/train and OUT/heldout (values
    in [-1, 1] written as p = round((x + 1) * 127.5)), the inputs `diffmem audit` compares a model with."""
    run = load_denoiser(run_dir)
    if len(run.event_shape) != 3 or run.event_shape[0] not in (1, 3):
        raise ValueError(f"the run's data are not images: example shape {run.event_shape}")
    out_dir = Path(out_dir)
    held = held_out_split(run.config, len(run.data))
    counts = {}
    for name, x in (("train", run.train_x.cpu()), ("heldout", run.data.x[held])):
        folder = out_dir / name
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"{folder} is not empty; choose another folder (nothing is overwritten)")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((x.reshape(-1, *run.event_shape).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        for i, p in enumerate(pixels):
            im = Image.fromarray(p[0]) if p.shape[0] == 1 else Image.fromarray(p.transpose(1, 2, 0))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            write_bytes_atomic(folder / f"{i:05d}.png", buf.getvalue())
        counts[name] = len(pixels)
    return counts


def import_diffusers(path: str | Path):
    """A diffusers UNet2DModel from a local save_pretrained folder, safetensors only, no hub access."""
    from diffusers import UNet2DModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a diffusers model folder (config.json missing)")
    if not (path / "diffusion_pytorch_model.safetensors").is_file():
        raise ValueError(f"{path} holds no diffusion_pytorch_model.safetensors; pickled weights are refused")
    return UNet2DModel.from_pretrained(path, use_safetensors=True, local_files_only=True)
