"""Distances between images for the phase classification (SCIENCE.md §5).

A metric is an embedding phi computed once per image plus a map from the Euclidean distance
between embeddings to the metric's value, so every nearest-neighbour search is one chunked matrix
product over embeddings:
- pixel L2 normalised by sqrt(D): phi(x) = x, value = ||phi(x) - phi(y)|| / sqrt(D);
- LPIPS: phi = concat_l sqrt(w_l / (H_l W_l)) * normalised features_l, value = ||phi(x) - phi(y)||^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from diffmem.core.knn import Neighbours, knn, merge_shards, shard_knn
from diffmem.evaluate.lpips import NETS as LPIPS_NETS
from diffmem.evaluate.lpips import LPIPSEmbedding
from diffmem.io.config import Section, choice, in_range


@dataclass(frozen=True)
class MetricConfig(Section):
    """The distance between images: pixel L2 / sqrt(D) or LPIPS (SCIENCE.md §5)."""

    _key = "metric"
    name: str = "l2"  # 'l2' (pixel L2 / sqrt(D)) or 'lpips'
    lpips_net: str = "alex"  # LPIPS backbone: 'alex' or 'vgg'
    weights_dir: str | None = None  # LPIPS weight files; null: $DIFFMEM_WEIGHTS or ~/.cache/diffmem/weights
    resize: int | None = None  # upsample small images to this side before LPIPS; null: as they are

    def _check(self) -> None:
        choice(self._at("name"), self.name, METRICS)
        choice(self._at("lpips_net"), self.lpips_net, LPIPS_NETS)
        if self.resize is not None:
            in_range(self._at("resize"), self.resize, low=1)


def check_images(x: Tensor, name: str) -> Tensor:
    """(N, *event) finite floating images as (N, D)."""
    if not isinstance(x, Tensor) or x.ndim < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape (N, *event_shape), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).sum())
        raise ValueError(f"{name} contains NaN or Inf in {bad} of {x.shape[0]} images")
    return x.reshape(x.shape[0], -1)


class PixelL2:
    """||x - y|| / sqrt(D) on pixels in [-1, 1]; the search runs on `device` (default: where x is)."""

    name = "l2"

    def __init__(self, device: str | torch.device | None = None):
        self.device = device

    def embed(self, x: Tensor) -> Tensor:
        flat = check_images(x, "images")
        return flat if self.device is None else flat.to(self.device)

    def value(self, euclidean: Tensor, dim: int) -> Tensor:
        return euclidean / math.sqrt(dim)


class LPIPSMetric:
    """LPIPS through the embedding identity; `embedding` is a diffmem.evaluate.lpips.LPIPSEmbedding."""

    name = "lpips"

    def __init__(self, embedding, image_shape: tuple[int, ...], device: str | torch.device | None = None):
        self.embedding = embedding if device is None else embedding.to(device)
        self.image_shape = tuple(image_shape)
        self.device = device

    def embed(self, x: Tensor) -> Tensor:
        flat = check_images(x, "images")
        images = flat.reshape(-1, *self.image_shape).float()
        with torch.no_grad():
            return self.embedding.embed(images if self.device is None else images.to(self.device))

    def value(self, euclidean: Tensor, dim: int) -> Tensor:
        return euclidean**2


def _lpips(config: MetricConfig, image_shape: tuple[int, ...], device) -> LPIPSMetric:
    shape = tuple(image_shape)
    if len(shape) == 2:
        shape = (1, *shape)  # a grey image
    if len(shape) != 3:
        raise ValueError(f"LPIPS needs image data of shape (C, H, W); this data has example shape {image_shape}")
    embedding = LPIPSEmbedding(net=config.lpips_net, weights_dir=config.weights_dir, resize=config.resize)
    return LPIPSMetric(embedding, shape, device)


# metric name -> factory(config, example shape, device); a new metric is a class with name, embed(x)
# and value(euclidean, dim), plus one entry here
METRIC_FACTORIES = {"l2": lambda config, shape, device: PixelL2(device), "lpips": _lpips}
METRICS = tuple(METRIC_FACTORIES)


def metric_from_config(config: MetricConfig, image_shape: tuple[int, ...], device: str | torch.device | None = None):
    """The metric a MetricConfig section describes, for examples of image_shape ((C, H, W) or (H, W)
    for LPIPS), computing on `device`."""
    return METRIC_FACTORIES[config.name](config, image_shape, device)


def make_metric(name: str, image_shape: tuple[int, ...], *, device: str | torch.device | None = None, **options):
    """The metric called `name`, with MetricConfig's other fields as keywords (lpips_net, weights_dir, resize)."""
    return metric_from_config(MetricConfig(name=name, **options), image_shape, device)


@dataclass(frozen=True)
class MetricNeighbours:
    """k nearest neighbours in a metric's own units."""

    distances: Tensor  # (N, k) float64, ascending
    indices: Tensor  # (N, k) int64


def neighbours(
    metric, queries: Tensor, refs: Tensor, k: int = 1, *, exclude_self: bool = False, embedded: bool = False
) -> MetricNeighbours:
    """Exact k nearest neighbours of each query among refs under `metric` (self excluded by index when
    exclude_self, which needs queries to be refs). embedded=True: inputs are embeddings already."""
    q = queries if embedded else metric.embed(queries)
    r = q if exclude_self else (refs if embedded else metric.embed(refs))
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and references differ in size: {tuple(queries.shape)} vs {tuple(refs.shape)}")
    nb: Neighbours = knn(q, r, k, exclude_self=exclude_self)
    dim = queries.reshape(queries.shape[0], -1).shape[1] if not embedded else q.shape[1]
    return MetricNeighbours(metric.value(nb.distances, dim), nb.indices)


REF_CHUNK = 16384  # reference rows read at a time by streamed_neighbours (50 MB of 32x32 RGB float32)


def _rows(refs, j0: int, j1: int, like: Tensor) -> Tensor:
    """Rows j0:j1 of refs (a tensor, an array or a read-only memmap) as a tensor like `like`."""
    block = refs[j0:j1]
    if not isinstance(block, Tensor):
        block = torch.from_numpy(np.array(block))  # a writable copy of the rows (memmaps are read-only)
    return block.to(device=like.device, dtype=like.dtype)


def streamed_neighbours(
    metric,
    queries: Tensor,
    refs,
    k: int = 1,
    *,
    query_offset: int | None = None,
    chunk: int = REF_CHUNK,
) -> MetricNeighbours:
    """Exact k nearest neighbours of embedded queries (N, E) among embedded refs (M, E) that need not fit
    in memory (an np.memmap is read `chunk` rows at a time), in the metric's units.

    query_offset: the queries are refs[query_offset : query_offset + N] (leave one out): each query's
    own row is never its neighbour (excluded by index, as knn's exclude_self; duplicates elsewhere count).
    The chunks' candidates are merged on squared float64 distances, ties in increasing index
    (core.knn.merge_shards), so the result equals one exact search over all refs."""
    m = int(refs.shape[0])
    n = int(queries.shape[0])
    k_max = m - (query_offset is not None)
    if not 1 <= k <= k_max:
        raise ValueError(f"k must lie in [1, {k_max}] for {m} references, got {k}")
    if int(refs.shape[1]) != int(queries.shape[1]):
        raise ValueError(f"queries and references differ in size: {tuple(queries.shape)} vs {tuple(refs.shape)}")
    want = k + (query_offset is not None)  # one more, to drop the query itself
    best = None
    for j0 in range(0, m, chunk):
        j1 = min(m, j0 + chunk)
        part = shard_knn(queries, _rows(refs, j0, j1, queries), want, offset=j0)
        best = part if best is None else merge_shards([best, part], min(want, best.indices.shape[1] + j1 - j0))
    best_d, best_i = best.squared.sqrt(), best.indices  # merged on squared float64 distances: exact order
    if query_offset is not None:
        own = best_i == (torch.arange(n, device=best_i.device) + query_offset)[:, None]
        own[~own.any(1), -1] = True  # the query itself lies beyond the list (tied duplicates): drop the last
        keep = (~own).nonzero()[:, 1].reshape(n, k)
        best_d, best_i = best_d.gather(1, keep), best_i.gather(1, keep)
    return MetricNeighbours(metric.value(best_d, int(queries.shape[1])), best_i)


__all__ = [
    "METRICS",
    "LPIPSMetric",
    "MetricNeighbours",
    "PixelL2",
    "check_images",
    "make_metric",
    "neighbours",
    "streamed_neighbours",
]
