"""LPIPS as a squared Euclidean distance between per-image embeddings (SCIENCE.md §5).

LPIPS v0.1 (Zhang et al. 2018, richzhang/PerceptualSimilarity) compares unit-normalised feature
maps f^_l (l = 1..5, C_l channels on an H_l x W_l grid) of an ImageNet network:

    LPIPS(x, y) = sum_l (1 / (H_l W_l)) sum_{h,w} sum_c w_{l,c} (f^_l(x) - f^_l(y))_{c,h,w}^2

With non-negative head weights w this is ||phi(x) - phi(y)||^2 for the fixed embedding
phi(x) = concat_l sqrt(w_l / (H_l W_l)) * f^_l(x), so features are computed once per image and a
nearest-neighbour search is a matrix product over embeddings.

The feature stacks are torchvision's AlexNet and VGG-16 `features`, written here in plain torch
with torchvision's parameter names, so the standard ImageNet files load directly. Nothing is ever
downloaded: the user puts the files in a weights directory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmem.core.knn import Neighbours, knn
from diffmem.io.checkpoint import PICKLE_MESSAGE, load_tensors, looks_like_pickle

NETS = ("alex", "vgg")
WEIGHTS = ("pretrained", "random")
WEIGHTS_ENV = "DIFFMEM_WEIGHTS"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/diffmem/weights")
NORM_EPS = 1e-10  # LPIPS normalize_tensor: f / (sqrt(sum_c f^2) + eps)
# LPIPS v0.1 ScalingLayer: inputs in [-1, 1] to ImageNet statistics
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# ("conv", in, out, kernel, stride, padding) | ("relu",) | ("pool", kernel, stride): torchvision's `features`
_ALEX_LAYERS = (
    ("conv", 3, 64, 11, 4, 2),
    ("relu",),
    ("pool", 3, 2),
    ("conv", 64, 192, 5, 1, 2),
    ("relu",),
    ("pool", 3, 2),
    ("conv", 192, 384, 3, 1, 1),
    ("relu",),
    ("conv", 384, 256, 3, 1, 1),
    ("relu",),
    ("conv", 256, 256, 3, 1, 1),
    ("relu",),
    ("pool", 3, 2),
)


def _vgg16_layers() -> tuple[tuple, ...]:
    """torchvision's VGG-16 configuration "D" without batch norm."""
    layers, c_in = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(("pool", 2, 2))
        else:
            layers += [("conv", c_in, v, 3, 1, 1), ("relu",)]
            c_in = v
    return tuple(layers)


@dataclass(frozen=True)
class WeightFile:
    name: str
    sha256: str
    source: str


@dataclass(frozen=True)
class NetSpec:
    layers: tuple[tuple, ...]
    taps: tuple[int, ...]  # indices into `features` whose outputs (ReLUs) LPIPS reads
    channels: tuple[int, ...]
    backbone: WeightFile
    heads: WeightFile


# SHA-256 of the four files as published (the torchvision names carry the first 8 hex digits).
SPECS: dict[str, NetSpec] = {
    "alex": NetSpec(
        _ALEX_LAYERS,
        taps=(1, 4, 7, 9, 11),  # relu1..relu5
        channels=(64, 192, 384, 256, 256),
        backbone=WeightFile(
            "alexnet-owt-7be5be79.pth",
            "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
            "torchvision AlexNet ImageNet weights, https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        ),
        heads=WeightFile(
            "alex.pth",
            "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
            "LPIPS v0.1 linear heads, lpips/weights/v0.1/alex.pth in github.com/richzhang/PerceptualSimilarity",
        ),
    ),
    "vgg": NetSpec(
        _vgg16_layers(),
        taps=(3, 8, 15, 22, 29),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
        channels=(64, 128, 256, 512, 512),
        backbone=WeightFile(
            "vgg16-397923af.pth",
            "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
            "torchvision VGG-16 ImageNet weights, https://download.pytorch.org/models/vgg16-397923af.pth",
        ),
        heads=WeightFile(
            "vgg.pth",
            "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
            "LPIPS v0.1 linear heads, lpips/weights/v0.1/vgg.pth in github.com/richzhang/PerceptualSimilarity",
        ),
    ),
}


def weights_directory(weights_dir: str | os.PathLike | None = None) -> Path:
    """weights_dir if given, else $DIFFMEM_WEIGHTS, else ~/.cache/diffmem/weights."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else DEFAULT_WEIGHTS_DIR.expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str | os.PathLike, *, sha256: str | None = None) -> dict[str, Tensor]:
    """Tensors of a .pth state dict (torch.load with weights_only=True, never plain unpickling) or
    of a .safetensors file, on the CPU; with sha256, the file's digest is checked first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise ValueError(
                f"{path.name} has SHA-256 {actual}, expected {sha256}: the file is corrupt, truncated or a "
                f"different release; replace {path}"
            )
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if path.suffix not in (".pth", ".pt"):
        with open(path, "rb") as f:
            head = f.read(4)
        if looks_like_pickle(head):
            raise ValueError(f"{path} {PICKLE_MESSAGE}")
        raise ValueError(
            f"{path}: unsupported weight file type {path.suffix!r}; use .pth (a state dict) or .safetensors"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for refused or broken files
        raise ValueError(
            f"{path} is not a plain tensor state dict: torch.load(weights_only=True) refused it ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); diffmem never unpickles arbitrary objects"
        ) from None
    plain = isinstance(state, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    if not plain:
        raise ValueError(
            f"{path} is not a plain state dict (a mapping of names to tensors), got {type(state).__name__}"
        )
    return dict(state)


def load_pretrained(net: str, weights_dir: str | os.PathLike | None = None) -> tuple[dict, dict]:
    """(backbone, heads) state dicts of `net` from the weights directory, SHA-256 verified."""
    spec = _spec(net)
    folder = weights_directory(weights_dir)
    files = (spec.backbone, spec.heads)
    missing = [f for f in files if not (folder / f.name).is_file()]
    if missing:
        listing = "; ".join(f"{f.name} ({f.source})" for f in files)
        raise FileNotFoundError(
            f"LPIPS with net={net!r} needs {len(files)} weight files in {folder}: {listing}. Missing: "
            f"{', '.join(f.name for f in missing)}. diffmem downloads nothing: put the files in that directory, "
            f"or pass weights_dir=... / set {WEIGHTS_ENV} to the directory that holds them."
        )
    return tuple(load_state_dict(folder / f.name, sha256=f.sha256) for f in files)


def _spec(net: str) -> NetSpec:
    if net not in SPECS:
        raise ValueError(f"unknown LPIPS network {net!r}; choose one of {NETS}")
    return SPECS[net]


def tap_shapes(net: str, height: int, width: int) -> list[tuple[int, int, int]]:
    """(C_l, H_l, W_l) of the LPIPS feature maps of `net` for an input of height x width; a side of
    0 or less means the input is too small for that tap."""
    spec = _spec(net)
    h, w, c, shapes = height, width, 3, []
    for i, layer in enumerate(spec.layers):
        if layer[0] == "conv":
            _, _, c, k, s, p = layer
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        elif layer[0] == "pool":
            _, k, s = layer
            h, w = (h - k) // s + 1, (w - k) // s + 1
        if i in spec.taps:
            shapes.append((c, h, w))
        if i == spec.taps[-1]:
            break
    return shapes


@functools.cache
def min_side(net: str) -> int:
    """The smallest square input side for which every LPIPS tap of `net` has at least one position."""
    side = 1
    while min(min(h, w) for _, h, w in tap_shapes(net, side, side)) < 1:
        side += 1
    return side


class _LinearHead(nn.Module):
    """LPIPS NetLinLayer: model.0 is Dropout (inactive at evaluation), model.1 the 1x1 conv w_{l,c}."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.utils.skip_init(nn.Conv2d, channels, 1, 1, bias=False))


class LPIPSEmbedding(nn.Module):
    """phi(x) with LPIPS(x, y) = ||phi(x) - phi(y)||^2, for images (N, C, H, W) in [-1, 1], C in {1, 3}.

    net: "alex" (AlexNet relu1..relu5) or "vgg" (VGG-16 relu1_2 .. relu5_3).
    weights: "pretrained" reads the torchvision and LPIPS v0.1 files from weights_dir (else
        $DIFFMEM_WEIGHTS, else ~/.cache/diffmem/weights) and checks their SHA-256; "random" draws
        He-normal convolutions and uniform [0, 1) head weights from `generator` (for tests/benchmarks).
    resize: if set, images are bilinearly resized to resize x resize first (8x8 digits are too small
        for AlexNet; LPIPS of upsampled images is a different, but well-defined, metric).
    """

    def __init__(
        self,
        net: str = "alex",
        weights: str = "pretrained",
        *,
        weights_dir: str | os.PathLike | None = None,
        generator: torch.Generator | None = None,
        resize: int | None = None,
    ):
        spec = _spec(net)
        if weights not in WEIGHTS:
            raise ValueError(f"unknown weights {weights!r}; choose one of {WEIGHTS}")
        if weights == "random" and generator is None:
            raise ValueError('weights="random" draws the weights: pass generator=torch.Generator().manual_seed(...)')
        if weights == "pretrained" and generator is not None:
            raise ValueError('generator is only used with weights="random"; the pretrained weights are fixed')
        if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
            raise ValueError(f"resize must be a positive integer side in pixels (e.g. 64) or None, got {resize!r}")
        super().__init__()
        self.net = net
        self.resize = resize
        self.taps = spec.taps
        self.channels = spec.channels
        modules: list[nn.Module] = []
        for layer in spec.layers:
            if layer[0] == "conv":
                _, c_in, c_out, k, s, p = layer
                modules.append(nn.utils.skip_init(nn.Conv2d, c_in, c_out, k, stride=s, padding=p))
            elif layer[0] == "relu":
                modules.append(nn.ReLU())
            else:
                modules.append(nn.MaxPool2d(kernel_size=layer[1], stride=layer[2]))
        self.features = nn.Sequential(*modules)  # parameter names as torchvision: features.{i}.weight
        for l, c in enumerate(spec.channels):
            self.add_module(f"lin{l}", _LinearHead(c))  # lin{l}.model.1.weight as in LPIPS v0.1
        self.register_buffer("shift", torch.tensor(SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).reshape(1, 3, 1, 1))
        if weights == "random":
            self._randomize(generator)
        else:
            self.load_weights(*load_pretrained(net, weights_dir))
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _randomize(self, generator: torch.Generator) -> None:
        def draw(shape, rand=False):
            f = torch.rand if rand else torch.randn
            return f(shape, generator=generator, device=generator.device).to(self.shift.device)

        for conv in self.features:
            if isinstance(conv, nn.Conv2d):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(draw(conv.weight.shape) * math.sqrt(2.0 / fan_in))
                conv.bias.copy_(draw(conv.bias.shape) * 0.01)
        for head in self.heads:
            head.copy_(draw(head.shape, rand=True))

    @property
    def heads(self) -> list[Tensor]:
        """The head weights lin{l}.model.1.weight, each (1, C_l, 1, 1)."""
        return [getattr(self, f"lin{l}").model[1].weight for l in range(len(self.taps))]

    def head_weights(self) -> list[Tensor]:
        """w_l, each (C_l,); they must be >= 0 for the embedding identity."""
        w = [h.reshape(-1) for h in self.heads]
        for l, wl in enumerate(w):
            if not bool(torch.isfinite(wl).all()):
                raise ValueError(f"LPIPS head lin{l} has NaN or Inf weights")
            if bool((wl < 0).any()):
                raise ValueError(
                    f"LPIPS head lin{l} has {int((wl < 0).sum())} negative weights (min {wl.min().item():.3g}): "
                    "LPIPS equals a squared distance between embeddings only for weights >= 0 (the published "
                    "v0.1 heads are clamped to >= 0); use those heads"
                )
        return w

    @torch.no_grad()
    def load_weights(self, backbone: Mapping[str, Tensor], heads: Mapping[str, Tensor]) -> LPIPSEmbedding:
        """Copy a torchvision state dict (features.*; classifier.* is ignored) and an LPIPS v0.1 head
        state dict (lin{l}.model.1.weight) into this module, checking names and shapes."""
        own = self.state_dict()
        expected_backbone = {k for k in own if k.startswith("features.")}
        expected_heads = {f"lin{l}.model.1.weight" for l in range(len(self.taps))}
        for what, given, expected, ignored in (
            ("backbone", backbone, expected_backbone, "classifier."),
            ("heads", heads, expected_heads, None),
        ):
            keys = {k for k in given if not (ignored and k.startswith(ignored))}
            missing, unexpected = sorted(expected - keys), sorted(keys - expected)
            if missing or unexpected:
                raise ValueError(
                    f"{what} state dict does not fit LPIPS net={self.net!r}: missing {missing[:6]}, unexpected "
                    f"{unexpected[:6]}; expected torchvision names (features.0.weight, ...) for the backbone and "
                    "lin0.model.1.weight ... lin4.model.1.weight for the heads"
                )
            for k in sorted(expected):
                if tuple(given[k].shape) != tuple(own[k].shape):
                    raise ValueError(
                        f"{what} tensor {k} has shape {tuple(given[k].shape)}, expected {tuple(own[k].shape)} "
                        f"for net={self.net!r}"
                    )
        for k in sorted(expected_backbone | expected_heads):
            source = backbone[k] if k in expected_backbone else heads[k]
            if not source.is_floating_point() or not bool(torch.isfinite(source).all()):
                raise ValueError(f"weight tensor {k} must be finite floating point")
            own[k].copy_(source)
        self.head_weights()
        return self

    def prepare(self, images: Tensor, image_shape: tuple[int, ...] | None = None) -> Tensor:
        """Validated (N, 3, H', W') network input in the module's dtype and device: flat (N, D) images
        reshaped to image_shape, one channel repeated to three, resized if asked."""
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if image_shape is not None:
            image_shape = tuple(int(s) for s in image_shape)
            if len(image_shape) != 3 or images.ndim < 1 or math.prod(images.shape[1:]) != math.prod(image_shape):
                raise ValueError(
                    f"images of shape {tuple(images.shape)} do not hold images of shape (C, H, W) = {image_shape}"
                )
            images = images.reshape(-1, *image_shape)
        if images.ndim != 4:
            hint = "; flat (N, D) images need image_shape=(C, H, W)" if images.ndim == 2 else ""
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}{hint}")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels (N, C, H, W), got C = {images.shape[1]}")
        if images.shape[0] == 0:
            raise ValueError("images is empty (N = 0)")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floating point in [-1, 1], got {images.dtype}; scale integer pixels first"
            )
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or Inf values")
        h, w = (self.resize, self.resize) if self.resize else images.shape[2:]
        need = min_side(self.net)
        if min(h, w) < need:
            raise ValueError(
                f"images of {h}x{w} pixels are too small for LPIPS net={self.net!r}: its deepest feature map needs "
                f"at least {need}x{need}; pass resize={max(64, need)} to upsample them bilinearly"
            )
        x = images.to(device=self.shift.device, dtype=self.shift.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize and tuple(x.shape[2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return x

    def normalized_features(self, x: Tensor) -> list[Tensor]:
        """f^_l(x) = f_l / (sqrt(sum_c f_l^2) + eps) at the five taps, each (N, C_l, H_l, W_l), for a
        prepared input x (see prepare)."""
        h = (x - self.shift) / self.scale
        feats = []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                feats.append(h / (torch.sqrt((h * h).sum(1, keepdim=True)) + NORM_EPS))
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """phi of a prepared batch: (N, E), E = sum_l C_l H_l W_l, differentiable."""
        parts = []
        for f, w in zip(self.normalized_features(x), self.head_weights(), strict=True):
            c, hl, wl = f.shape[1:]
            parts.append((f * torch.sqrt(w / (hl * wl)).reshape(1, c, 1, 1)).flatten(1))
        return torch.cat(parts, 1)

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 256, *, image_shape: tuple[int, ...] | None = None) -> Tensor:
        """phi(images): (N, E) float32 on the module's device, each image through the network once."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        first = images[:1] if isinstance(images, Tensor) and images.ndim > 0 else images
        self.prepare(first, image_shape)  # shape errors before any work
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or Inf values")
        n = images.shape[0]
        out = [self(self.prepare(images[i : i + batch_size], image_shape)).float() for i in range(0, n, batch_size)]
        return torch.cat(out, 0)

    def distance(self, x: Tensor, y: Tensor, *, image_shape: tuple[int, ...] | None = None) -> Tensor:
        """LPIPS(x_i, y_i) for paired images by the published formula (features of both, squared
        differences, 1x1 head, spatial mean, sum over layers): (N,). For checks and small batches."""
        fx = self.normalized_features(self.prepare(x, image_shape))
        fy = self.normalized_features(self.prepare(y, image_shape))
        if fx[0].shape != fy[0].shape:
            raise ValueError(
                f"x and y must hold the same number and size of images, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        total = 0.0
        for a, b, w in zip(fx, fy, self.head_weights(), strict=True):
            total = total + ((a - b) ** 2 * w.reshape(1, -1, 1, 1)).sum(1).mean((1, 2))  # (N,)
        return total


def lpips_knn(queries_emb: Tensor, refs_emb: Tensor, k: int = 1, *, exclude_self: bool = False) -> Neighbours:
    """k nearest neighbours in LPIPS from embeddings (LPIPSEmbedding.embed): diffmem.core.knn.knn,
    with distances squared, so that `distances` are LPIPS values (N, k) float64, ascending."""
    nb = knn(queries_emb, refs_emb, k, exclude_self=exclude_self)
    return dataclasses.replace(nb, distances=nb.distances**2)


__all__ = [
    "NETS",
    "SPECS",
    "WEIGHTS",
    "WEIGHTS_ENV",
    "LPIPSEmbedding",
    "NetSpec",
    "WeightFile",
    "load_pretrained",
    "load_state_dict",
    "lpips_knn",
    "min_side",
    "sha256_file",
    "tap_shapes",
    "weights_directory",
]
