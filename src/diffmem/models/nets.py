"""Denoising networks (VP parameterisation: model(x_t, t) with DDPM timesteps), exposed to the
samplers as D(x, sigma) through diffmem.core.VPNetworkDenoiser."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from diffmem.io.config import check_keys, choice, coerce, error, field_types, mapping, plain, reraise, show

EMBEDDINGS = ("sinusoidal", "fourier")
NETWORKS = ("mlp", "unet")
# network fields that build_network fills in from the data and the schedule
NETWORK_FROM_DATA = {"mlp": ("dim", "num_train_timesteps"), "unet": ("in_channels", "sample_size")}

# Upper bounds on the sizes a config (a study file, a run's checkpoint.json, a hand-made dict) may ask for,
# checked before any tensor is built: far above the networks of a memorization study (the digits MLP is 512
# wide and 4 blocks deep, a CIFAR U-Net has 128-512 channels), low enough that a typo such as hidden: 10000000
# (a 10^14-entry weight) fails with a message instead of exhausting memory.
MAX_WIDTH = 65_536  # mlp.hidden and mlp.emb_dim
MAX_DEPTH = 256  # mlp.depth and unet.layers_per_block
MAX_DIM = 2**24  # mlp.dim, the flattened example (a 2048 x 2048 RGB image has 12.6M entries)
MAX_CHANNELS = 8_192  # each entry of unet.block_out_channels, unet.in_channels, unet.norm_num_groups
MAX_LEVELS = 8  # len(unet.block_out_channels): 8 levels halve the image side 7 times, down to 1/128
MAX_SIDE = 16_384  # unet.sample_size, the image side


@dataclass(frozen=True)
class MLPConfig:
    """A residual MLP for vectors and 2D points."""

    dim: int  # D, the flattened data dimension
    hidden: int = 256  # width of every hidden layer
    depth: int = 3  # residual blocks
    embedding: str = "sinusoidal"  # 'sinusoidal' (transformer-style) or 'fourier' (random features)
    emb_dim: int = 64  # size of the timestep embedding
    fourier_scale: float = 16.0  # std of the random Fourier frequencies (per unit of t / T)
    num_train_timesteps: int = 1000  # T, to normalise t

    def __post_init__(self) -> None:
        limits = {"dim": MAX_DIM, "hidden": MAX_WIDTH, "depth": MAX_DEPTH, "emb_dim": MAX_WIDTH}
        for name in ("dim", "hidden", "depth", "emb_dim", "num_train_timesteps"):
            _check_size(f"mlp.{name}", getattr(self, name), limits.get(name))
        if self.emb_dim % 2:
            raise ValueError(f"mlp.emb_dim must be even, got {self.emb_dim}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"unknown embedding {self.embedding!r}; choose one of {EMBEDDINGS}")
        scale = self.fourier_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"mlp.fourier_scale must be a positive finite number, got {scale!r}")


@dataclass(frozen=True)
class UNetConfig:
    """diffusers' UNet2DModel, configured here (never from the hub)."""

    sample_size: int = 32
    in_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "UpBlock2D")
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple):
                raise ValueError(f"unet.{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        _check_size("unet.sample_size", self.sample_size, MAX_SIDE)
        _check_size("unet.in_channels", self.in_channels, MAX_CHANNELS)
        _check_size("unet.layers_per_block", self.layers_per_block, MAX_DEPTH)
        _check_size("unet.norm_num_groups", self.norm_num_groups, MAX_CHANNELS)
        n = len(self.block_out_channels)
        if not 1 <= n <= MAX_LEVELS:
            raise ValueError(f"unet.block_out_channels needs 1 to {MAX_LEVELS} levels, got {n}")
        for i, c in enumerate(self.block_out_channels):
            _check_size(f"unet.block_out_channels[{i}]", c, MAX_CHANNELS)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise ValueError("unet: block_out_channels, down_block_types and up_block_types need the same length")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError("unet: every block_out_channels entry must be divisible by norm_num_groups")


def _check_size(what: str, value: Any, high: int | None) -> None:
    """A positive integer, at most high (None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {show(value)}")
    if high is not None and value > high:
        raise ValueError(f"{what} must be <= {high}, got {show(value).removesuffix(' (int)')}")


def config_from_dict(cls, d: dict):
    """Build MLPConfig / UNetConfig from JSON, naming unknown keys."""
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(allowed)}")
    return cls(**d)


class TimestepEmbedding(nn.Module):
    def __init__(self, kind: str, dim: int, num_train_timesteps: int, fourier_scale: float, seed: int = 0):
        super().__init__()
        self.kind, self.dim, self.T = kind, dim, num_train_timesteps
        if kind == "fourier":
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * fourier_scale)
        else:
            # DDPM / transformer frequencies 10000^(-i / (dim/2)) applied to the raw timestep
            self.register_buffer("freqs", torch.exp(-math.log(10_000.0) * torch.arange(dim // 2) / (dim // 2)))

    def forward(self, t: Tensor) -> Tensor:  # (B,) -> (B, dim)
        t = t.to(self.freqs.dtype)
        arg = (2 * math.pi * (t / self.T))[:, None] * self.freqs if self.kind == "fourier" else t[:, None] * self.freqs
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class MLPNet(nn.Module):
    """model(x_t, t): residual MLP conditioned on the timestep embedding; x_t of shape (B, ...) with D entries."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        c = config
        self.config = c
        self.embed = TimestepEmbedding(c.embedding, c.emb_dim, c.num_train_timesteps, c.fourier_scale)
        self.t_proj = nn.Sequential(nn.Linear(c.emb_dim, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden))
        self.inp = nn.Linear(c.dim, c.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden)) for _ in range(c.depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.dim))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        shape = x_t.shape
        h = self.inp(x_t.reshape(shape[0], self.config.dim))  # explicit size: empty batches too
        temb = self.t_proj(self.embed(torch.as_tensor(t, device=x_t.device).reshape(-1).expand(shape[0])))
        for block in self.blocks:
            h = h + block(h + temb)
        return self.out(h).reshape(shape)


class UNetNet(nn.Module):
    """model(x_t, t) around diffusers' UNet2DModel; x_t of shape (B, C, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config
        c = asdict(config)
        self.unet = UNet2DModel(out_channels=config.in_channels, **c)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return self.unet(x_t, t).sample


@dataclass(frozen=True)
class NetworkConfig:
    kind: str = "mlp"  # 'mlp' or 'unet'
    mlp: dict = field(default_factory=dict)  # MLPConfig fields (dim is filled from the data)
    unet: dict = field(default_factory=dict)  # UNetConfig fields (in_channels, sample_size from the data)

    def __post_init__(self) -> None:
        if self.kind not in NETWORKS:
            raise ValueError(f"unknown network {self.kind!r}; choose one of {NETWORKS}")

    @classmethod
    def from_config(cls, value: Any, key: str = "network") -> NetworkConfig:
        """NetworkConfig with its active kind's options resolved (defaults filled in, as JSON lists)."""
        if isinstance(value, NetworkConfig):
            value = asdict(value)
        d = mapping(value, "network")
        check_keys(d, ["kind", "mlp", "unet"], "network")
        kind = coerce(d.get("kind", "mlp"), str, "network.kind")
        choice("network.kind", kind, NETWORKS)
        other = "unet" if kind == "mlp" else "mlp"
        if d.get(other):
            raise error(
                f"network.{other}", f"given, but network.kind is {kind!r}; remove it or set network.kind: {other}"
            )
        key = f"network.{kind}"
        given = mapping(d.get(kind, {}), key)
        options_cls = MLPConfig if kind == "mlp" else UNetConfig
        for name in NETWORK_FROM_DATA[kind]:
            if name in given:
                raise error(f"{key}.{name}", "set from the data and the noise schedule; remove it")
        allowed = [f for f in fields(options_cls) if f.name not in NETWORK_FROM_DATA[kind]]
        check_keys(given, [f.name for f in allowed], key)
        hints = field_types(options_cls)
        options = {f.name: coerce(given.get(f.name, f.default), hints[f.name], f"{key}.{f.name}") for f in allowed}
        placeholders = {"dim": 1, "num_train_timesteps": 1} if kind == "mlp" else {}
        try:
            options_cls(**placeholders, **options)
        except ValueError as e:
            raise reraise(key, list(options), e) from None
        return cls(kind=kind, **{kind: plain(options)})

    def to_config(self) -> dict:
        """The config-file form: the kind and its own options only."""
        return {"kind": self.kind, self.kind: plain(getattr(self, self.kind))}


def build_network(config: NetworkConfig, event_shape: tuple[int, ...], num_train_timesteps: int) -> nn.Module:
    """The network for data of one example's shape (D,) or (C, H, W); its sizes are checked (see MAX_WIDTH
    and the other bounds) before any tensor is built."""
    if config.kind == "mlp":
        d = math.prod(event_shape)
        return MLPNet(config_from_dict(MLPConfig, {"num_train_timesteps": num_train_timesteps, **config.mlp, "dim": d}))
    if len(event_shape) != 3 or event_shape[1] != event_shape[2]:
        raise ValueError(f"the U-Net needs square images (C, H, W), got example shape {event_shape}")
    c, h, _ = event_shape
    unet = config_from_dict(UNetConfig, {**config.unet, "in_channels": c, "sample_size": h})
    # every level but the last halves the side with a stride-2 convolution and the up path doubles it back, so
    # the skip connections only line up when the side divides evenly
    levels = len(unet.block_out_channels)
    factor, most = 2 ** (levels - 1), (h & -h).bit_length()  # h & -h: the largest power of 2 dividing h
    if h % factor:
        raise error(
            "network.unet.block_out_channels",
            f"the U-Net with {levels} levels needs an image side divisible by {factor}, got {h}x{h}; "
            f"side {h} allows at most {most} level{'s' if most > 1 else ''}: drop entries of block_out_channels "
            "and the block types, or resize the images",
        )
    return UNetNet(unet)
