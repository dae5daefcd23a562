"""Is a diffusion model trained elsewhere copying its training images? (SCIENCE.md §5, applied to any
model or any folder of generated images.)

The audit classifies generated images against a training set exactly as the study does: a sample is
memorized when its nearest training image is closer than delta_m, spurious when another sample is
closer than delta_s, otherwise generalized or off-manifold by the k-NN manifold test. The thresholds
are calibrated on real images the model never saw:

- with held-out images (the calibration the study uses): delta_m is the `quantile` of their nearest
  distances to the training set, delta_s and the manifold come from the held-out images themselves;
- without them, leave one out on the training set: delta_m is the quantile of each training image's
  distance to its nearest *other* training image, and training images stand in for held-out ones.
  This calibration is weaker (near-duplicates in the training data pull delta_m down, and the manifold
  is that of the training images), and the results say so.

Images of another size or mode than the training images are converted to theirs (shorter side resized
to the training side with Lanczos, centre crop; grey <-> RGB by PIL's rules; diffmem.io.images). The
training set is embedded once and cached on disk by content hash; the nearest-neighbour search is exact
and streams the training embeddings, so a training folder need not fit in memory.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffmem.core.basins import BasinEstimator, KarrasGrid
from diffmem.core.denoisers import VPNetworkDenoiser
from diffmem.evaluate.classify import (
    CLASSES,
    Classification,
    Fraction,
    PhaseClassifier,
    SampleDistances,
)
from diffmem.evaluate.metrics import METRICS, MetricNeighbours, make_metric, neighbours, streamed_neighbours
from diffmem.evaluate.quality import MANIFOLD_K, Estimate, quality_metrics
from diffmem.io.config import AT_LEAST_1, NON_NEGATIVE, OPEN_UNIT, SEED, Section, choice
from diffmem.io.data import DATASETS, IMAGE_SUFFIXES, image_files, load_dataset, native_image_shape
from diffmem.io.files import read_npz, write_npz_atomic
from diffmem.io.images import EmbeddingCache, convert_images, embed_images, read_image_files, scan_images
from diffmem.models.pretrained import PretrainedModel, load_diffusers

CALIBRATIONS = ("held_out", "leave_one_out")
ONE_SIZE = "an audit compares images pixel by pixel, so give it square training images of one size"
MIN_HELD_OUT = MANIFOLD_K + 2  # the manifold test's leave-one-out calibration needs k + 2 images


@dataclass(frozen=True)
class AuditConfig(Section):
    """What an audit samples and how it calibrates (SCIENCE.md §5)."""

    _key = "audit"
    n_samples: int = 1000  # images drawn from a model (a folder of generated images is used whole)
    seed: int = 0  # sample i starts from the noise of seed * 1_000_003 + i
    steps: int = 0  # sampler steps; 0: the model's own default (DDPM 1000, DDIM 50)
    batch_size: int = 256  # images per denoiser call and per embedding batch
    metric: str = "l2"  # 'l2' (pixels, ||x - y|| / sqrt(D)) or 'lpips' (needs its weight files)
    quantile: float = 0.02  # share of unseen real images allowed under delta_m and delta_s
    manifold_k: int = MANIFOLD_K  # neighbours per real ball of the manifold test
    manifold_quantile: float = 0.98  # share of unseen real images the manifold test accepts
    max_reference: int = 5000  # reference images of delta_s and the manifold (a random subset beyond)
    n_pairs: int = 16  # closest sample / training pairs in the extraction figure
    n_basins: int = 0  # most-copied training images whose critical noise level is measured (model only)
    n_bootstrap: int = 1000  # resamples of the fractions' intervals

    _bounds = {
        **dict.fromkeys(("n_samples", "batch_size", "max_reference", "n_pairs", "n_bootstrap"), AT_LEAST_1),
        **dict.fromkeys(("steps", "n_basins"), NON_NEGATIVE),
        **dict.fromkeys(("quantile", "manifold_quantile"), OPEN_UNIT),
        "manifold_k": AT_LEAST_1,
        "seed": SEED,
    }

    def _check(self) -> None:
        choice(self._at("metric"), self.metric, METRICS)
        if self.n_samples < 2:
            raise ValueError(f"audit.n_samples: the spurious test compares samples: need >= 2, got {self.n_samples}")


@dataclass(frozen=True)
class ImageSet:
    """One set of images, embedded: where it came from and what was done to it."""

    role: str  # 'training', 'held-out' or 'generated'
    source: str  # a folder, a file, a dataset name, 'array' or the model folder
    names: list[str]  # one per image: a relative path, 'npz[i]', 'dataset[i]' or 'seed S'
    vectors: np.ndarray | Tensor  # (N, E) the metric's embeddings (a read-only memmap when cached)
    pixels: np.ndarray | None  # (N, C, H, W) in [-1, 1] when held in memory, else read back by name
    root: Path | None  # the folder or npz to read images back from
    conversion: dict  # the size and mode rule applied (diffmem.io.images)
    cached: bool  # embeddings read from the cache
    seconds: float  # time to read and embed
    key: str | None = None  # the embeddings' cache key (content, embedding, size, mode), None for arrays

    def __len__(self) -> int:
        return len(self.names)

    def images(self, index: list[int], size: int, mode: str) -> np.ndarray:
        """Images (n, C, H, W) of the given rows, for figures."""
        if self.pixels is not None:
            return self.pixels[index]
        return read_image_files(self.root, [self.names[i] for i in index], size=size, mode=mode)


@dataclass(frozen=True)
class AuditResult:
    """An audit: the classes of the generated images, the thresholds, and which training images are copied."""

    classification: Classification  # per sample: class, m, m2, s, manifold ratio
    fractions: dict[str, Fraction]  # memorized / spurious / generalized / off_manifold with 95% intervals
    three_class: dict[str, Fraction]  # the original study's view: off-manifold counted as generalized
    quality: dict[str, Estimate] | None  # precision, recall, density, coverage against held-out images
    calibration: str  # 'held_out' or 'leave_one_out' (weaker: see the module docstring)
    thresholds: dict  # delta_m, delta_s, the manifold scale and how each was calibrated
    samples: ImageSet
    train: ImageSet
    held_out: ImageSet | None
    reference_distances: np.ndarray  # (R,) nearest training distance of each unseen real image (or LOO training)
    train_nearest: np.ndarray  # (K,) each training image's distance to its nearest other training image
    train_nearest_index: np.ndarray  # (K,) and that image's index
    copies: list[dict]  # training images with at least one copy, most copied first
    duplicates: list[dict]  # training pairs closer than delta_m to each other
    pairs: list[int]  # samples of the closest pairs, one per training image, closest first
    basins: list[dict] | None  # critical noise levels of the most-copied training images
    model: dict | None  # the audited model's scheduler settings, or None for generated images
    image: dict  # the training images' shape (C, H, W) and mode, to which everything was converted
    seconds: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return len(self.samples)

    def verdict(self) -> str:
        """One sentence: how many samples copy a training image, and how many training images are copied."""
        f = self.fractions["memorized"]
        copied = len(self.copies)
        weak = " (leave-one-out calibration: no held-out images)" if self.calibration == "leave_one_out" else ""
        return (
            f"{f.value:.1%} [{f.low:.1%}, {f.high:.1%}] of {f.n} samples copy a training image "
            f"(delta_m = {self.thresholds['delta_m']:.4g}); {copied} of {len(self.train)} training images "
            f"are copied at least once{weak}"
        )

    def summary(self) -> dict:
        """Everything but the per-sample and per-image tables, as JSON-ready values."""

        def fr(d: dict[str, Fraction]) -> dict:
            return {c: {"value": f.value, "low": f.low, "high": f.high, "n": f.n} for c, f in d.items()}

        def source(s: ImageSet | None) -> dict | None:
            if s is None:
                return None
            return {
                "source": s.source,
                "n": len(s),
                "conversion": s.conversion,
                "cached": s.cached,
                "seconds": s.seconds,
            }

        return {
            "verdict": self.verdict(),
            "fractions": fr(self.fractions),
            "three_class_fractions": fr(self.three_class),
            "quality": None
            if self.quality is None
            else {k: {"value": e.value, "low": e.low, "high": e.high, "n": e.n} for k, e in self.quality.items()},
            "calibration": self.calibration,
            "thresholds": self.thresholds,
            "n_copied_training_images": len(self.copies),
            "most_copied": self.copies[:20],
            "n_duplicate_pairs": len(self.duplicates),
            "inputs": {
                "training": source(self.train),
                "held_out": source(self.held_out),
                "generated": source(self.samples),
                "image": self.image,
                "model": self.model,
            },
            "seconds": self.seconds,
        }

    def sample_rows(self) -> list[dict]:
        """The per-sample table, with the names of the nearest training image and nearest other sample."""
        rows = self.classification.rows()
        for r in rows:
            r["name"] = self.samples.names[r["index"]]
            r["nearest_train_name"] = self.train.names[r["nearest_train"]]
        return rows


# ------------------------------------------------------------------------------------------------
# Reading and embedding the image sets
# ------------------------------------------------------------------------------------------------


def _as_array(x, what: str) -> np.ndarray:
    """Images (N, C, H, W) float32 in [-1, 1] from an array or tensor of (N, H, W) or (N, C, H, W)."""
    a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 127.5 - 1
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{what} must be float images in [-1, 1] or uint8 pixels, got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3) or a.shape[0] == 0:
        raise ValueError(f"{what} must have shape (N, H, W) or (N, C, H, W) with C 1 or 3 and N >= 1, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} hold NaN or infinite values")
    if a.min() < -1 - 1e-4 or a.max() > 1 + 1e-4:
        raise ValueError(f"{what} must lie in [-1, 1] (diffmem's image range), got [{a.min():.4g}, {a.max():.4g}]")
    return a.astype(np.float32, copy=False)


def _dataset(name: str) -> np.ndarray:
    data = load_dataset(name)
    shape = tuple(data.image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise ValueError(f"dataset {name!r} holds vectors of shape {shape}, not images")
    return data.x.reshape(-1, *shape).numpy()


def _embed_array(a: np.ndarray, embed, batch: int) -> Tensor:
    return torch.cat([embed(torch.from_numpy(a[i : i + batch])) for i in range(0, len(a), batch)])


def _image_set(value, role: str, *, size, mode, embed, embedding_id, cache, batch, progress) -> ImageSet:
    """Read, convert and embed one set: a folder or npz (streamed and cached), a dataset name or an array."""
    start = time.perf_counter()
    is_path = isinstance(value, str | os.PathLike)
    if is_path and not Path(value).exists() and str(value) in DATASETS:
        a = _dataset(str(value))
        names, source, root = [f"{value}[{i}]" for i in range(len(a))], str(value), None
    elif is_path:
        e = embed_images(
            value, embed, embedding_id, size=size, mode=mode, cache=cache or None, batch=batch, progress=progress
        )
        conversion = {"native_size": e.native_size, "native_mode": e.native_mode, **e.conversion}
        return ImageSet(
            role, str(value), list(e.names), e.vectors, None, Path(value), conversion, e.cached, e.seconds, e.key
        )
    else:
        a = _as_array(value, f"the {role} images")
        names, source, root = [f"array[{i}]" for i in range(len(a))], "array", None
    conversion = {"native_size": [int(a.shape[2]), int(a.shape[3])], "native_mode": "L" if a.shape[1] == 1 else "RGB"}
    if size is not None and (a.shape[2:] != (size, size) or a.shape[1] != (1 if mode == "L" else 3)):
        a, conv = convert_images(a, size=size, mode=mode)
        conversion.update(conv)
    conversion.update({"size": size, "mode": mode})
    vectors = _embed_array(a, embed, batch)
    return ImageSet(role, source, names, vectors, a, root, conversion, False, time.perf_counter() - start)


def _native_shape(train) -> tuple[int, str]:
    """The training images' side and mode, to which every other set is converted."""
    if isinstance(train, str | os.PathLike):
        if not Path(train).exists() and str(train) in DATASETS:
            a = _dataset(str(train))
        elif Path(train).is_dir():  # the headers say it; the files' hashes come once, with the embeddings
            files = image_files(Path(train))
            if not files:
                raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}, any case) found under {train}")
            return native_image_shape(Path(train), files, fix=ONE_SIZE)
        else:
            listing = scan_images(train)  # an .npz: its array's header
            if listing.native_size is None or listing.native_size[0] != listing.native_size[1]:
                raise ValueError(f"the training images in {train} are {listing.native_size}; {ONE_SIZE}")
            return listing.native_size[0], listing.native_mode
    else:
        a = _as_array(train, "the training images")
    if a.shape[2] != a.shape[3]:
        raise ValueError(f"the training images are {a.shape[2]} x {a.shape[3]}; square images are needed")
    return int(a.shape[2]), "L" if a.shape[1] == 1 else "RGB"


# ------------------------------------------------------------------------------------------------
# The audit
# ------------------------------------------------------------------------------------------------


QUERY_CHUNK = 4096  # query rows of one streamed search: the training embeddings are read once per chunk


def _as_tensor(v) -> Tensor:
    return v if isinstance(v, Tensor) else torch.from_numpy(np.array(v, dtype=np.float32))  # a writable copy


def _search(
    metric, queries, refs, k: int, *, leave_one_out: bool = False, desc: str = "search", progress: bool = False
) -> MetricNeighbours:
    """streamed_neighbours of queries that may not fit in memory either (read QUERY_CHUNK rows at a time);
    leave_one_out: queries are refs, and no row is its own neighbour."""
    parts = []
    n = int(queries.shape[0])
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        for i0 in range(0, n, QUERY_CHUNK):
            q = _as_tensor(queries[i0 : i0 + QUERY_CHUNK])
            parts.append(streamed_neighbours(metric, q, refs, k, query_offset=i0 if leave_one_out else None))
            bar.update(q.shape[0])
    return MetricNeighbours(torch.cat([p.distances for p in parts]), torch.cat([p.indices for p in parts]))


def _leave_one_out(metric, train: ImageSet, cache, progress: bool) -> MetricNeighbours:
    """Each training image's nearest other training image (duplicates, and the calibration without held-out
    images): the audit's largest search (K^2), kept in the cache beside the embeddings it was computed from."""
    path = None if cache is False or train.key is None else cache.directory / f"{train.key}.nearest.npz"
    if path is not None and path.is_file():
        try:
            found = read_npz(path, what="cached nearest-neighbour file")
            d, i = found["distances"], found["indices"]
            if d.shape == i.shape == (len(train), 1) and d.dtype == np.float64 and i.dtype == np.int64:
                return MetricNeighbours(torch.from_numpy(d), torch.from_numpy(i))
        except (ValueError, KeyError):
            pass  # unreadable: recomputed and rewritten below
    loo = _search(
        metric, train.vectors, train.vectors, 1, leave_one_out=True, desc="training -> training", progress=progress
    )
    if path is not None:
        write_npz_atomic(path, distances=loo.distances.cpu().numpy(), indices=loo.indices.cpu().numpy())
    return loo


def _subset(v, n: int, seed: int) -> Tensor:
    """At most n rows of v, chosen at random (seeded) when there are more."""
    m = int(v.shape[0])
    if m <= n:
        return _as_tensor(v)
    idx = np.sort(np.random.default_rng(seed).choice(m, n, replace=False))
    return _as_tensor(v[idx])


def _samples_from_model(model: PretrainedModel, config: AuditConfig, size: int, mode: str, progress: bool):
    start = time.perf_counter()
    x = model.sample(
        config.n_samples, seed=config.seed, steps=config.steps or None, batch_size=config.batch_size, progress=progress
    )
    a = x.reshape(-1, *model.event_shape).cpu().numpy().astype(np.float32)
    conversion = {
        "native_size": list(model.event_shape[1:]),
        "native_mode": "L" if model.event_shape[0] == 1 else "RGB",
    }
    if a.shape[2:] != (size, size) or a.shape[1] != (1 if mode == "L" else 3):
        a, conv = convert_images(a, size=size, mode=mode)
        conversion.update(conv)
    conversion.update({"size": size, "mode": mode})
    names = [f"seed {config.seed * 1_000_003 + i}" for i in range(len(a))]
    return a, names, conversion, time.perf_counter() - start


def audit(
    train,
    *,
    model: str | os.PathLike | PretrainedModel | None = None,
    generated=None,
    held_out=None,
    config: AuditConfig | None = None,
    scheduler: str | os.PathLike | None = None,
    device: str = "cpu",
    cache: EmbeddingCache | str | os.PathLike | bool | None = None,
    progress: bool = True,
) -> AuditResult:
    """Audit a model (a diffusers folder, sampled here) or a set of generated images against its training images.

    train, held_out, generated: an image folder, an .npz of images, a dataset name of diffmem.io.data, or an
    array / tensor (N, C, H, W) in [-1, 1]. held_out None calibrates by leave-one-out on the training set
    (weaker; see the module docstring). cache: where embeddings of folders are kept by content hash (an
    EmbeddingCache or its directory; None: the default, $DIFFMEM_CACHE or ~/.cache/diffmem; False: none).
    Write the result with diffmem.report.audit.write_audit."""
    config = config or AuditConfig()
    if cache is not False and not isinstance(cache, EmbeddingCache):
        cache = EmbeddingCache(cache)
    if (model is None) == (generated is None):
        raise ValueError("audit either a model (a diffusers folder) or a set of generated images: give exactly one")
    start = time.perf_counter()
    size, mode = _native_shape(train)
    channels = 1 if mode == "L" else 3
    metric = make_metric(config.metric, (channels, size, size), device=device)
    embedding_id = f"{metric.name}:{size}:{mode}"

    def embed(x: Tensor) -> Tensor:
        return metric.embed(x.to(device)).float().cpu()

    common = dict(
        size=size,
        mode=mode,
        embed=embed,
        embedding_id=embedding_id,
        cache=cache,
        batch=config.batch_size,
        progress=progress,
    )
    train_set = _image_set(train, "training", **common)
    k = len(train_set)
    held = None if held_out is None else _image_set(held_out, "held-out", **common)
    if held is not None and len(held) < MIN_HELD_OUT:
        raise ValueError(f"the held-out set has {len(held)} images; calibration needs at least {MIN_HELD_OUT}")
    if held is None and k < MIN_HELD_OUT + 1:
        raise ValueError(
            f"the training set has {k} images: leave-one-out calibration needs at least {MIN_HELD_OUT + 1}; "
            "give held-out images (--heldout)"
        )
    model_info = None
    if model is not None:
        pm = model if isinstance(model, PretrainedModel) else load_diffusers(model, scheduler=scheduler, device=device)
        pixels, names, conversion, seconds = _samples_from_model(pm, config, size, mode, progress)
        vectors = _embed_array(pixels, embed, config.batch_size)
        samples = ImageSet("generated", pm.source, names, vectors, pixels, None, conversion, False, seconds)
        model_info = {
            "source": pm.source,
            "scheduler": pm.scheduler_class,
            "sampler": pm.sampler,
            "steps": config.steps or pm.steps,
            "prediction_type": pm.prediction_type,
            "clip": None if pm.data_range is None else list(pm.data_range),
            "event_shape": list(pm.event_shape),
            "seed": config.seed,
        }
    else:
        pm = None
        samples = _image_set(generated, "generated", **common)
    n = len(samples)
    if n < 2:
        raise ValueError(f"the spurious test compares samples: need at least 2 generated images, got {n}")
    t_search = time.perf_counter()
    gen = _as_tensor(samples.vectors)
    to_train = _search(metric, gen, train_set.vectors, min(2, k), desc="samples -> training", progress=progress)
    to_gen = neighbours(metric, gen, gen, 1, exclude_self=True, embedded=True)
    loo = _leave_one_out(metric, train_set, cache, progress)
    m2 = to_train.distances[:, 1] if k >= 2 else torch.full((n,), math.inf, dtype=torch.float64)
    dist = SampleDistances(
        to_train.distances[:, 0].cpu(),
        m2.cpu(),
        to_train.indices[:, 0].cpu(),
        to_gen.distances[:, 0].cpu(),
        to_gen.indices[:, 0].cpu(),
        metric.name,
    )
    if held is not None:
        calibration = "held_out"
        reference = _search(metric, held.vectors, train_set.vectors, 1, desc="held-out -> training", progress=progress)
        ref_d = reference.distances[:, 0].cpu()
        ref_emb = _subset(held.vectors, config.max_reference, config.seed)
    else:
        calibration = "leave_one_out"
        ref_d = loo.distances[:, 0].cpu()
        ref_emb = _subset(train_set.vectors, config.max_reference, config.seed)
    clf = PhaseClassifier(
        metric=metric,
        quantile=config.quantile,
        manifold_k=config.manifold_k,
        manifold_quantile=config.manifold_quantile,
        seed=config.seed,
    ).fit_embedded(ref_emb, ref_d, n_reference=k, n_generated=n, calibration=calibration)
    rho = clf.manifold_.ratio(metric, gen)
    classification = clf.classify_distances(dist, rho)
    boot = {"n_bootstrap": config.n_bootstrap, "seed": config.seed}
    fractions = classification.fractions(**boot)
    quality = None
    if held is not None:
        quality = quality_metrics(metric, gen, clf.manifold_, **boot)
    delta_m = clf.delta_m_
    copies = _copies(classification, train_set, loo, delta_m)
    duplicates = _duplicates(train_set, loo, delta_m)
    pairs = _closest_pairs(dist, config.n_pairs)
    thresholds = {
        "delta_m": delta_m,
        "delta_s": clf.delta_s_,
        "manifold_scale": clf.manifold_.scale,
        "quantile": config.quantile,
        "manifold_k": config.manifold_k,
        "manifold_quantile": config.manifold_quantile,
        "metric": metric.name,
        "calibration": clf.calibration_,
    }
    seconds = {"search": time.perf_counter() - t_search}
    basins = None
    if pm is not None and config.n_basins and copies:
        t_basins = time.perf_counter()
        basins = _basins(pm, metric, train_set, copies[: config.n_basins], delta_m, (size, mode), config, device)
        seconds["basins"] = time.perf_counter() - t_basins
    seconds["total"] = time.perf_counter() - start
    return AuditResult(
        classification=classification,
        fractions=fractions,
        three_class=classification.three_class_fractions(**boot),
        quality=quality,
        calibration=calibration,
        thresholds=thresholds,
        samples=samples,
        train=train_set,
        held_out=held,
        reference_distances=ref_d.numpy(),
        train_nearest=loo.distances[:, 0].cpu().numpy(),
        train_nearest_index=loo.indices[:, 0].cpu().numpy(),
        copies=copies,
        duplicates=duplicates,
        pairs=pairs,
        basins=basins,
        model=model_info,
        image={"shape": [channels, size, size], "mode": mode},
        seconds=seconds,
    )


def _closest_pairs(d: SampleDistances, n: int) -> list[int]:
    """Samples of the n closest pairs with distinct training images: each training image's closest
    sample, closest first (the extraction figure shows n different images, not n copies of one)."""
    best: dict[int, int] = {}
    for i in torch.argsort(d.m, stable=True).tolist():
        best.setdefault(int(d.train_index[i]), i)
        if len(best) == n:
            break
    return list(best.values())


def _copies(c: Classification, train: ImageSet, loo, delta_m: float) -> list[dict]:
    """Training images with at least one memorized sample: how many, the closest copy, and whether the
    image has a near-duplicate in the training data (closer than delta_m), which drives memorization."""
    d = c.distances
    mem = torch.tensor([label == "memorized" for label in c.labels])
    idx = d.train_index[mem]
    counts = torch.bincount(idx, minlength=len(train)) if idx.numel() else torch.zeros(len(train), dtype=torch.int64)
    rows = []
    for i in torch.nonzero(counts).flatten().tolist():
        hits = mem & (d.train_index == i)
        dup = float(loo.distances[i, 0])
        rows.append(
            {
                "train_index": i,
                "name": train.names[i],
                "n_copies": int(counts[i]),
                "closest_copy": float(d.m[hits].min()),
                "nearest_other_training": dup,
                "duplicate_of": train.names[int(loo.indices[i, 0])] if dup <= delta_m else None,
            }
        )
    rows.sort(key=lambda r: (-r["n_copies"], r["closest_copy"]))
    return rows


def _duplicates(train: ImageSet, loo, delta_m: float) -> list[dict]:
    """Pairs of training images closer than delta_m to each other (each pair once)."""
    d, j = loo.distances[:, 0].cpu(), loo.indices[:, 0].cpu()
    pairs = {}
    for i in torch.nonzero(d <= delta_m).flatten().tolist():
        a, b = sorted((i, int(j[i])))
        pairs[(a, b)] = float(d[i])
    return [
        {"a": a, "b": b, "name_a": train.names[a], "name_b": train.names[b], "distance": v}
        for (a, b), v in sorted(pairs.items(), key=lambda kv: kv[1])
    ]


def _basins(pm: PretrainedModel, metric, train: ImageSet, copies: list[dict], delta: float, shape, config, device):
    """Critical noise level (SCIENCE.md §6) of the most-copied training images under the model, with
    recovery meaning: denoised back within delta_m, the copy threshold, in the audit's metric."""
    index = [r["train_index"] for r in copies]
    x = train.images(index, *shape)

    def distance(y: Tensor, target: Tensor) -> Tensor:
        ey, et = metric.embed(y.reshape(y.shape[0], -1)), metric.embed(target.reshape(target.shape[0], -1))
        return metric.value((ey.double() - et.double()).norm(dim=1), ey.shape[1]).to(y.dtype)

    if tuple(x.shape[1:]) != tuple(pm.event_shape):
        x, _ = convert_images(x, size=pm.event_shape[-1], mode="L" if pm.event_shape[0] == 1 else "RGB")
    # recoveries start at any level of the search, between the schedule's grid points: the UNet takes
    # the fractional timestep (diffusers' embedding is defined on real t)
    denoiser = VPNetworkDenoiser(
        pm.denoiser.model, pm.schedule, prediction_type=pm.prediction_type, timestep="continuous"
    )
    est = BasinEstimator(
        denoiser,
        sigma_grid=KarrasGrid(sigma_floor=float(pm.schedule.sigmas.min())),
        delta=delta,
        sigma_min=float(pm.schedule.sigmas.min()),
        sigma_max=float(pm.schedule.sigmas.max()),
        distance=None if metric.name == "l2" else distance,
    )
    g = torch.Generator(device=device).manual_seed(config.seed)
    with torch.no_grad():
        res = est.critical_times(torch.from_numpy(x).to(device), generator=g)
    return [
        {
            "train_index": i,
            "name": r["name"],
            "n_copies": r["n_copies"],
            "sigma_c": float(t.sigma_c),
            "sigma_c_low": float(t.sigma_c_low),
            "sigma_c_high": float(t.sigma_c_high),
            "status": t.status,
        }
        for i, r, t in zip(index, copies, res, strict=True)
    ]


__all__ = ["CALIBRATIONS", "CLASSES", "AuditConfig", "AuditResult", "ImageSet", "audit"]
