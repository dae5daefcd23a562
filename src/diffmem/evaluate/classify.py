"""Memorized / spurious / generalized / off-manifold classification of generated samples (SCIENCE.md §5).

For each sample x: m(x) = distance to its nearest training example, s(x) = distance to its nearest
*other* generated sample (excluded by index), rho(x) = its k-NN manifold ratio against held-out
images (diffmem.evaluate.quality). x is
- memorized if m <= delta_m (a copy of a training example);
- spurious if not memorized and s <= delta_s (independent seeds fell into the same new attractor);
- generalized if neither, and on the data manifold (rho <= c);
- off-manifold if neither, and not on it: noise, blobs, a broken model. "Generalized" never means
  "broken". quality='none' drops the manifold test (three classes, off-manifold samples counted as
  generalized), for comparison with the original study.

Calibration (held-out images were never trained on):
- delta_m, copy_threshold='dataset' (default): the `quantile` of the held-out images' distances to
  their nearest example of the whole training pool (every example outside the held-out set, the
  largest training set of any K). It is the same at every K, so "a copy" means the same thing
  across a sweep. copy_threshold='per_k': against the run's own K training examples (the first
  version of this rule: it loosens as K shrinks).
- delta_s = the `quantile` of the held-out images' nearest-other-held-out distances, computed on
  random held-out subsets of the generated set's size N when there are enough held-out images
  (nearest-neighbour distances shrink as a set grows, so the densities are matched); with fewer
  held-out images than samples the whole held-out set is used and `density_matched` is False.
- c (manifold scale): the share `manifold_quantile` of held-out images passes the manifold test
  against the other held-out images' balls.
calibration='given' takes delta_m and delta_s as they are.

rule='ratio' replaces the memorized test by the pixel-space criterion used in the field:
m(x) / m2(x) < ratio (nearest over second-nearest training distance, default 1/3).

Fractions carry intervals that are never empty at 0 or 1: the Wilson score interval of each count,
widened to the percentile bootstrap interval over samples (and over trained models, with several).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from diffmem.evaluate.metrics import PixelL2, check_images, neighbours
from diffmem.evaluate.quality import MANIFOLD_K, fit_manifold, wilson_interval
from diffmem.io.config import AT_LEAST_1, OPEN_UNIT, POSITIVE, SEED, Section, choice, error

CLASSES = ("memorized", "spurious", "generalized", "off_manifold")
THREE_CLASSES = ("memorized", "spurious", "generalized")  # quality 'none', and the three-class view
COPY_THRESHOLDS = ("dataset", "per_k")  # delta_m against the whole training pool | the run's K examples
QUALITIES = ("manifold", "none")  # the manifold test splits novel samples | it does not
FRACTION_KEYS = {"memorized": "f_M", "spurious": "f_S", "generalized": "f_G", "off_manifold": "f_O"}  # phase table
CALIBRATIONS = ("held_out", "given")
RULES = ("threshold", "ratio")


@dataclass(frozen=True)
class ClassifyConfig(Section):
    """Memorized / spurious / generalized (SCIENCE.md §5), the parameters of classify.PhaseClassifier."""

    _key = "classify"
    delta_m: float | None = None  # memorized iff m <= delta_m; null: calibrated
    delta_s: float | None = None  # spurious iff not memorized and s <= delta_s; null: calibrated
    calibration: str = "held_out"  # 'held_out': thresholds left null come from held-out images; 'given'
    quantile: float = (
        0.02  # share of held-out images under a calibrated threshold (each test errs on ~2% of real images)
    )
    n_calibration_draws: int = 20  # held-out subsets of size N averaged for delta_s
    copy_threshold: str = "dataset"  # delta_m from the whole training pool ('dataset', every K) or 'per_k'
    quality: str = "manifold"  # 'manifold': novel samples off the data manifold are 'off_manifold'; 'none'
    manifold_k: int = 3  # neighbours per held-out ball of the manifold test (Kynkaanniemi et al. 2019)
    manifold_quantile: float = 0.98  # share of held-out images the calibrated manifold test accepts
    rule: str = "threshold"  # memorized test: 'threshold' (m <= delta_m) or 'ratio' (m / m2 < ratio)
    ratio: float = 1 / 3  # nearest over second-nearest training distance, rule 'ratio'
    n_bootstrap: int = 1000  # resamples of the fractions' confidence intervals
    confidence: float = 0.95  # level of those intervals
    seed: int = 0  # calibration draws and bootstrap resamples

    _bounds = {
        **dict.fromkeys(("delta_m", "delta_s"), POSITIVE),
        **dict.fromkeys(("quantile", "ratio", "confidence", "manifold_quantile"), OPEN_UNIT),
        **dict.fromkeys(("n_calibration_draws", "n_bootstrap", "manifold_k"), AT_LEAST_1),
        "seed": SEED,
    }

    def _check(self) -> None:
        choice(self._at("calibration"), self.calibration, CALIBRATIONS)
        choice(self._at("rule"), self.rule, RULES)
        choice(self._at("copy_threshold"), self.copy_threshold, COPY_THRESHOLDS)
        choice(self._at("quality"), self.quality, QUALITIES)
        if self.rule == "ratio" and self.delta_m is not None:
            raise error(self._at("delta_m"), "classify.rule 'ratio' uses no delta_m; remove it or set rule: threshold")
        needed = [n for n in ("delta_m", "delta_s") if n in self.thresholds_used() and getattr(self, n) is None]
        if self.calibration == "given" and needed:
            raise error(
                self._at(needed[0]),
                f"classify.rule {self.rule!r} with calibration 'given' needs {needed[0]}; give it or set "
                "calibration: held_out",
            )
        if self.calibration == "held_out" and not needed:
            raise error(
                self._at("calibration"),
                f"'held_out' calibrates the thresholds left null, but {' and '.join(self.thresholds_used())} "
                f"(all that classify.rule {self.rule!r} uses) are given; set calibration: given",
            )

    def thresholds_used(self) -> tuple[str, ...]:
        return ("delta_m", "delta_s") if self.rule == "threshold" else ("delta_s",)


def _positive(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SampleDistances:
    """Nearest-neighbour distances of N generated samples, in the metric's units."""

    m: Tensor  # (N,) to the nearest training example
    m2: Tensor  # (N,) to the second-nearest training example (inf when K = 1)
    train_index: Tensor  # (N,) index of the nearest training example
    s: Tensor  # (N,) to the nearest other generated sample
    gen_index: Tensor  # (N,) its index
    metric: str

    @property
    def n(self) -> int:
        return int(self.m.shape[0])


def as_images(x, name: str):
    """A tensor of examples (N, *event_shape) from a tensor or a NumPy array; None stays None.

    Examples may be flat (N, D), grey images (N, H, W) or images (N, C, H, W): every distance is taken
    over the whole example, D = C * H * W. A contiguous NumPy array is shared with torch, not copied."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(
                f"{name} must be floating-point images, got a NumPy array of {x.dtype}; scale 8-bit pixels to "
                "[-1, 1] first (x / 127.5 - 1)"
            )
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, Tensor):
        raise ValueError(
            f"{name} must be a torch tensor or a NumPy array of shape (N, D), (N, H, W) or (N, C, H, W), "
            f"got {type(x).__name__}"
        )
    elif not x.is_floating_point():
        raise ValueError(f"{name} must be floating-point images, got a tensor of {x.dtype}; scale them to [-1, 1]")
    if x.ndim < 2:
        raise ValueError(
            f"{name} must be a batch of examples of shape (N, D), (N, H, W) or (N, C, H, W), got shape "
            f"{tuple(x.shape)}; for a single example add a batch axis (x[None])"
        )
    return x


def _same_dtype(*xs):
    """The inputs in one dtype, the widest of theirs and at least float32 (the nearest-neighbour search
    runs in float32 or float64): a NumPy float64 training set next to a model's float32 samples is
    compared in float64, as `a - b` would be. Promotion is exact; None stays None."""
    dtype = torch.float32
    for x in xs:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return [None if x is None else x.to(dtype) for x in xs]


def _check_same_size(x: Tensor | None, name: str, ref: Tensor, ref_name: str) -> None:
    """x and ref hold examples of the same size D (their shapes may differ: (N, 256) and (K, 16, 16))."""
    if x is None:
        return
    d, d_ref = math.prod(x.shape[1:]), math.prod(ref.shape[1:])
    if d != d_ref:
        hint = "pass the same kind of images, flat or not"
        if tuple(x.shape) == tuple(ref.shape[1:]):
            hint = f"{name} look like one example: add a batch axis (x[None])"
        raise ValueError(
            f"{name} and {ref_name} differ in shape: examples of {tuple(x.shape[1:])} ({d} values) vs "
            f"{tuple(ref.shape[1:])} ({d_ref} values); {hint}"
        )


def sample_distances(samples, train, metric=None) -> SampleDistances:
    """m, m2 and s of every sample (SCIENCE.md §5) by exact nearest-neighbour search. samples (N, ...),
    train (K, ...): tensors or NumPy arrays; distances are over whole examples (pixel L2 / sqrt(D))."""
    metric = metric or PixelL2()
    samples, train = as_images(samples, "generated samples"), as_images(train, "training data")
    if samples is None or train is None:
        raise ValueError("sample_distances needs both the generated samples and the training data")
    samples, train = _same_dtype(samples, train)
    flat = check_images(samples, "generated samples")
    ref = check_images(train, "training data")
    _check_same_size(samples, "generated samples", train, "training data")
    if flat.shape[0] < 2:
        raise ValueError(f"the spurious test needs at least 2 generated samples, got {flat.shape[0]}")
    emb_s, emb_t = metric.embed(samples), metric.embed(train)
    k = min(2, ref.shape[0])
    to_train = neighbours(metric, emb_s, emb_t, k, embedded=True)
    to_gen = neighbours(metric, emb_s, emb_s, 1, exclude_self=True, embedded=True)
    t_dist, t_idx = to_train.distances.cpu(), to_train.indices.cpu()
    m2 = t_dist[:, 1] if k == 2 else torch.full_like(t_dist[:, 0], math.inf)
    return SampleDistances(
        t_dist[:, 0], m2, t_idx[:, 0], to_gen.distances[:, 0].cpu(), to_gen.indices[:, 0].cpu(), metric.name
    )


@dataclass(frozen=True)
class Fraction:
    """A class fraction with its interval (never empty at 0 or 1; see the module docstring), over n samples."""

    value: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Classification:
    labels: list[str]  # (N,) one of CLASSES
    distances: SampleDistances
    delta_m: float | None  # None under rule='ratio'
    delta_s: float
    rule: str
    calibration: dict = field(default_factory=dict)
    manifold_ratio: Tensor | None = None  # (N,) rho(x); None under quality='none'

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES if self.manifold_ratio is not None else THREE_CLASSES

    def counts(self) -> dict[str, int]:
        return {c: self.labels.count(c) for c in self.classes}

    def fractions(self, *, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Fraction]:
        """The class fractions with their intervals (bootstrap_fractions)."""
        return bootstrap_fractions([self.labels], n_bootstrap=n_bootstrap, seed=seed, level=level, classes=self.classes)

    def three_class_fractions(self, **kw) -> dict[str, Fraction]:
        """The three-class view of the original study: off-manifold samples counted as generalized."""
        labels = ["generalized" if c == "off_manifold" else c for c in self.labels]
        return bootstrap_fractions([labels], classes=THREE_CLASSES, **kw)

    def rows(self, seeds: list[int] | None = None) -> list[dict]:
        """The per-sample table: index, seed, class, m, m2, s, the manifold ratio and the neighbour indices."""
        d = self.distances
        rho = self.manifold_ratio
        return [
            {
                "index": i,
                "seed": None if seeds is None else int(seeds[i]),
                "class": self.labels[i],
                "m": float(d.m[i]),
                "m2": float(d.m2[i]),
                "s": float(d.s[i]),
                "manifold_ratio": None if rho is None else float(rho[i]),
                "nearest_train": int(d.train_index[i]),
                "nearest_generated": int(d.gen_index[i]),
            }
            for i in range(d.n)
        ]

    def typical(self, cls: str, n: int, *, most: bool = True) -> list[int]:
        """Indices of the n most (or least) typical samples of a class: memorized by smallest m,
        spurious by smallest s, generalized by largest m, off-manifold by largest manifold ratio."""
        if cls not in self.classes:
            raise ValueError(f"unknown class {cls!r}; choose one of {self.classes}")
        idx = [i for i, c in enumerate(self.labels) if c == cls]
        d = self.distances
        score = {"memorized": d.m, "spurious": d.s, "generalized": -d.m}.get(cls)
        if cls == "off_manifold":
            score = -self.manifold_ratio
        idx.sort(key=lambda i: float(score[i]), reverse=not most)
        return idx[:n]


def bootstrap_fractions(
    labels_by_model: list[list[str]],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    classes: tuple[str, ...] = CLASSES,
) -> dict[str, Fraction]:
    """Class fractions over the samples of one or more trained models, with intervals. The samples
    are resampled with replacement and their (fixed) labels recounted; with several models the
    models are resampled first, so the intervals include the variation between trained models, not
    only the sampling of N. Each percentile interval is widened to the Wilson score interval of the
    pooled count, so a fraction of 0 or 1 never gets an empty interval."""
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not labels_by_model or not all(labels_by_model):
        raise ValueError("bootstrap_fractions needs at least one model with at least one sample")
    unknown = sorted({c for labels in labels_by_model for c in labels} - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} are none of the classes {classes}")
    codes = [torch.tensor([classes.index(c) for c in labels]) for labels in labels_by_model]
    everything = torch.cat(codes)
    g = torch.Generator().manual_seed(seed)
    if len(codes) == 1:
        n = len(everything)
        draws = everything[torch.randint(0, n, (n_bootstrap, n), generator=g)]  # (B, N)
        boot = torch.stack([(draws == i).double().mean(1) for i in range(len(classes))], dim=1)  # (B, C)
    else:
        boot = torch.zeros(n_bootstrap, len(classes), dtype=torch.float64)
        for b in range(n_bootstrap):
            chosen = torch.randint(0, len(codes), (len(codes),), generator=g).tolist()
            drawn = torch.cat(
                [codes[i][torch.randint(0, len(codes[i]), (len(codes[i]),), generator=g)] for i in chosen]
            )
            boot[b] = torch.bincount(drawn, minlength=len(classes)).double() / len(drawn)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out = {}
    n = len(everything)
    for i, c in enumerate(classes):
        count = int((everything == i).sum())
        lo, hi = (float(v) for v in torch.quantile(boot[:, i], q))
        w_lo, w_hi = wilson_interval(count, n, level)
        out[c] = Fraction(count / n, min(lo, w_lo), max(hi, w_hi), n)
    return out


def memorized_fraction(samples, train, threshold: float, *, metric=None, level: float = 0.95) -> Fraction:
    """The share of samples within `threshold` of their nearest training example, m(x) <= threshold
    (SCIENCE.md §5), with its Wilson interval at `level`: the memorized test alone, at a threshold
    you choose (PhaseClassifier calibrates it and adds the other classes).

    Under pixel L2, m(x) = ||x - xi_nearest|| / sqrt(D) with D the size of a whole example: C * H * W
    for (N, C, H, W), H * W for (N, H, W). samples, train: tensors or NumPy arrays, flat or not."""
    threshold = _positive(threshold, "threshold")
    if threshold is None:
        raise ValueError("memorized_fraction needs a threshold, e.g. PhaseClassifier(...).fit(...).delta_m_")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    metric = metric or PixelL2()
    samples, train = _same_dtype(as_images(samples, "generated samples"), as_images(train, "training data"))
    if samples is None or train is None:
        raise ValueError("memorized_fraction needs both the generated samples and the training data")
    check_images(samples, "generated samples")
    check_images(train, "training data")
    _check_same_size(samples, "generated samples", train, "training data")
    m = neighbours(metric, samples, train, 1).distances[:, 0]  # (N,) divided by sqrt(C * H * W) under L2
    n, count = int(m.shape[0]), int((m <= threshold).sum())
    low, high = wilson_interval(count, n, level)
    return Fraction(count / n, low, high, n)


class PhaseClassifier:
    """Memorized / spurious / generalized / off-manifold classifier (scikit-learn shape: parameters in
    __init__, thresholds learned in fit, samples labelled in predict).

    delta_m, delta_s: thresholds in the metric's units; None means calibrate from held-out data.
    quantile: share of held-out images allowed under the calibrated thresholds.
    copy_threshold: 'dataset' (delta_m against fit's `pool`, the same for every K) or 'per_k'.
    quality: 'manifold' (the k-NN manifold test, manifold_k neighbours, calibrated to accept
    manifold_quantile of held-out images) or 'none' (three classes).
    rule: 'threshold' (m <= delta_m) or 'ratio' (m / m2 < ratio) for the memorized test.

    Every input is a tensor or a NumPy array of examples (N, D), (N, H, W) or (N, C, H, W), compared in
    the widest of their float dtypes. fit's training set is kept as train_, so predict(samples) needs
    it only when fit_embedded() was used, or to classify against another training set.
    """

    def __init__(
        self,
        delta_m: float | None = None,
        delta_s: float | None = None,
        *,
        metric=None,
        quantile: float = 0.02,
        copy_threshold: str = "dataset",
        quality: str = "manifold",
        manifold_k: int = MANIFOLD_K,
        manifold_quantile: float = 0.98,
        rule: str = "threshold",
        ratio: float = 1 / 3,
        n_calibration_draws: int = 20,
        seed: int = 0,
    ):
        self.delta_m = _positive(delta_m, "delta_m")
        self.delta_s = _positive(delta_s, "delta_s")
        self.metric = metric or PixelL2()
        for name, value in (("quantile", quantile), ("manifold_quantile", manifold_quantile), ("ratio", ratio)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        for name, value, allowed in (
            ("rule", rule, RULES),
            ("copy_threshold", copy_threshold, COPY_THRESHOLDS),
            ("quality", quality, QUALITIES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")
        if rule == "ratio" and self.metric.name != "l2":
            raise ValueError(
                f"the ratio rule is the pixel-space criterion: use it with metric 'l2', not {self.metric.name!r}"
            )
        self.quantile, self.copy_threshold, self.quality = quantile, copy_threshold, quality
        self.manifold_k, self.manifold_quantile = manifold_k, manifold_quantile
        self.rule, self.ratio = rule, ratio
        self.n_calibration_draws = n_calibration_draws
        self.seed = seed

    def fit(
        self,
        train,
        held_out=None,
        *,
        pool=None,
        n_generated: int | None = None,
    ) -> PhaseClassifier:
        """Learn delta_m_, delta_s_ and the manifold_ (SCIENCE.md §5 calibration; see the module
        docstring). train, held_out, pool: examples (N, D), (N, H, W) or (N, C, H, W) as tensors or NumPy
        arrays, compared in the widest of their dtypes; pool is every example the model could have been
        trained on (copy_threshold 'dataset'; default: train). train is kept as train_, the default
        training set of predict(). n_generated: size of the generated sets to be classified, for the
        density-matched delta_s."""
        train = as_images(train, "training data")
        if train is None:
            raise ValueError("fit needs the training data: fit(train, held_out)")
        train, held_out, pool = _same_dtype(
            train, as_images(held_out, "held-out images"), as_images(pool, "training pool")
        )
        check_images(train, "training data")
        _check_same_size(held_out, "held-out images", train, "training data")
        _check_same_size(pool, "training pool", train, "training data")
        pool = train if pool is None else pool
        self.train_ = train
        need_m = self.delta_m is None and self.rule == "threshold"
        if not (need_m or self.delta_s is None or self.quality == "manifold"):
            return self._fit(None, None, n_generated)
        if held_out is None:
            needed = [n for n, need in (("delta_m", need_m), ("delta_s", self.delta_s is None)) if need]
            what = "the manifold test needs"
            if needed:
                what = f"{' and '.join(needed)} must be given or calibrated from"
            raise ValueError(
                f"{what} held-out images: train with n_held_out >= 2"
                + (", or set quality 'none'" if self.quality == "manifold" else "")
            )
        check_images(held_out, "held-out images")
        emb_h = self.metric.embed(held_out)
        d = None
        if need_m:
            reference = pool if self.copy_threshold == "dataset" else train
            d = neighbours(self.metric, emb_h, self.metric.embed(reference), 1, embedded=True).distances[:, 0]
            self.calibration_extra_ = {"copy_threshold": self.copy_threshold, "n_reference": int(reference.shape[0])}
        return self._fit(emb_h, d, n_generated)

    def fit_embedded(
        self,
        held_out_emb: Tensor,
        reference_distances: Tensor | None = None,
        *,
        n_reference: int | None = None,
        n_generated: int | None = None,
        calibration: str = "held_out",
    ) -> PhaseClassifier:
        """fit() from precomputed inputs, for training sets too large to embed at once: the held-out
        embeddings (R, E) and, when delta_m is calibrated, each held-out image's nearest distance to
        the training reference (R,) in the metric's units. calibration names where they came from
        ('held_out', or 'leave_one_out' when training images stand in for held-out ones)."""
        if held_out_emb.ndim != 2 or held_out_emb.shape[0] < 2:
            raise ValueError(
                f"calibration needs at least 2 held-out embeddings (R, E), got {tuple(held_out_emb.shape)}"
            )
        need_m = self.delta_m is None and self.rule == "threshold"
        if need_m and reference_distances is None:
            raise ValueError("delta_m is calibrated: pass the held-out images' nearest training distances")
        self.calibration_extra_ = {"copy_threshold": self.copy_threshold}
        self.train_ = None  # no training images: predict() needs them passed
        if n_reference is not None:
            self.calibration_extra_["n_reference"] = int(n_reference)
        return self._fit(held_out_emb, reference_distances if need_m else None, n_generated, calibration)

    def _fit(
        self, emb_h: Tensor | None, d_ref: Tensor | None, n_generated: int | None, calibration: str = "held_out"
    ) -> PhaseClassifier:
        """The thresholds from the held-out embeddings and their distances to the training reference."""
        need_s = self.delta_s is None
        self.calibration_: dict = {"rule": self.rule, "metric": self.metric.name}
        if emb_h is not None:
            if emb_h.shape[0] < 2:
                raise ValueError(f"calibration needs at least 2 held-out images, got {emb_h.shape[0]}")
            self.calibration_.update({"quantile": self.quantile, "n_held_out": int(emb_h.shape[0])})
        self.calibration_["calibration"] = calibration if d_ref is not None or need_s else "given"
        if d_ref is not None:
            self.delta_m_ = float(torch.quantile(d_ref.double().cpu(), self.quantile))
            self.calibration_.update(getattr(self, "calibration_extra_", {}))
        else:
            self.delta_m_ = self.delta_m if self.rule == "threshold" else None
        if need_s:
            self.delta_s_, matched = self._calibrate_s(emb_h, n_generated)
            self.calibration_["density_matched"] = matched
        else:
            self.delta_s_ = self.delta_s
        self.manifold_ = None
        if self.quality == "manifold":
            self.manifold_ = fit_manifold(self.metric, emb_h, k=self.manifold_k, quantile=self.manifold_quantile)
            self.calibration_["manifold"] = {
                "k": self.manifold_k,
                "scale": self.manifold_.scale,
                "quantile": self.manifold_quantile,
            }
        self.calibration_.update({"delta_m": self.delta_m_, "delta_s": self.delta_s_})
        return self

    def _calibrate_s(self, emb_h: Tensor, n_generated: int | None) -> tuple[float, bool]:
        n_h = emb_h.shape[0]
        if n_generated is None or n_generated >= n_h:
            d = neighbours(self.metric, emb_h, emb_h, 1, exclude_self=True, embedded=True).distances[:, 0]
            return float(torch.quantile(d, self.quantile)), n_generated is not None and n_generated == n_h
        if n_generated < 2:
            raise ValueError(f"the spurious test needs at least 2 generated samples, got {n_generated}")
        g = torch.Generator().manual_seed(self.seed)
        qs = []
        for _ in range(self.n_calibration_draws):
            sub = emb_h[torch.randperm(n_h, generator=g)[:n_generated]]
            d = neighbours(self.metric, sub, sub, 1, exclude_self=True, embedded=True).distances[:, 0]
            qs.append(float(torch.quantile(d, self.quantile)))
        return sum(qs) / len(qs), True

    def manifold_ratio(self, samples) -> Tensor | None:
        """rho(x) of every sample against the held-out manifold; None under quality 'none'."""
        self._check_fitted()
        if self.manifold_ is None:
            return None
        samples = as_images(samples, "generated samples")
        if samples is None:
            raise ValueError("manifold_ratio needs the generated samples (N, ...)")
        return self.manifold_.ratio(self.metric, self.metric.embed(samples))

    def predict(self, samples, train=None) -> Classification:
        """Labels of samples (N, ...) against the training set: fit's `train` (train_) unless another is
        given. Tensors or NumPy arrays, flat or not, compared in the wider of their dtypes."""
        self._check_fitted()
        if train is None:
            train = getattr(self, "train_", None)
            if train is None:
                raise ValueError(
                    "this classifier was fit from embeddings (fit_embedded) and holds no training images: "
                    "pass them, predict(samples, train)"
                )
        samples, train = _same_dtype(as_images(samples, "generated samples"), as_images(train, "training data"))
        if samples is None:
            raise ValueError("predict needs the generated samples (N, ...)")
        d = sample_distances(samples, train, self.metric)
        return self.classify_distances(d, self.manifold_ratio(samples))

    def _check_fitted(self) -> None:
        if not hasattr(self, "delta_s_"):
            raise ValueError("call fit() before predict()")

    def classify_distances(self, d: SampleDistances, manifold_ratio: Tensor | None = None) -> Classification:
        """Labels from precomputed distances; manifold_ratio (from manifold_ratio()) is needed under
        quality 'manifold'."""
        self._check_fitted()
        if self.manifold_ is not None and manifold_ratio is None:
            raise ValueError("quality 'manifold' needs the samples' manifold ratios: use predict(), or pass them")
        if self.rule == "threshold":
            mem = d.m <= self.delta_m_
        else:
            if not bool(torch.isfinite(d.m2).all()):
                raise ValueError("the ratio rule needs a second-nearest training example: K must be >= 2")
            mem = d.m < self.ratio * d.m2
        spur = ~mem & (d.s <= self.delta_s_)
        off = torch.zeros_like(mem)
        if self.manifold_ is not None:
            off = ~mem & ~spur & (manifold_ratio.to(d.m.device) > self.manifold_.scale)
        labels = [
            "memorized" if a else ("spurious" if b else ("off_manifold" if o else "generalized"))
            for a, b, o in zip(mem.tolist(), spur.tolist(), off.tolist(), strict=True)
        ]
        ratio = None if self.manifold_ is None else manifold_ratio.double().cpu()
        return Classification(labels, d, self.delta_m_, self.delta_s_, self.rule, dict(self.calibration_), ratio)


def transition_points(rows: list[dict]) -> dict:
    """From per-K fractions (rows with K, f_M, f_S, f_G): the largest K where most samples are
    memorized, the smallest K where most are generalized, and the K of the spurious peak."""
    if not rows:
        raise ValueError("no rows to find transitions in")
    rows = sorted(rows, key=lambda r: r["K"])
    memorizing = [r["K"] for r in rows if r["f_M"] > 0.5]
    generalizing = [r["K"] for r in rows if r["f_G"] > 0.5]
    peak = max(rows, key=lambda r: r["f_S"])
    return {
        "last_memorizing_K": max(memorizing) if memorizing else None,
        "first_generalizing_K": min(generalizing) if generalizing else None,
        "spurious_peak_K": peak["K"] if peak["f_S"] > 0 else None,  # no peak when no sample is spurious
        "spurious_peak_fraction": peak["f_S"],
    }


# --- transition points between grid values ------------------------------------------------------------------------
# SCIENCE.md §5-§7: the end of memorization A (f_M falls through 1/2), the onset of generalization B (f_G rises
# through 1/2) and the spurious peak (max f_S), estimated between the sweep's K values. Fractions are interpolated
# linearly in log K, the axis on which the sweep is spaced and the original study reports A and B. Each point has an
# interval from the fractions' confidence bands: for A and B, the K range between where the band's two edges cross
# 1/2 (where 1/2 lies inside the band, for a monotone band); for the peak, the K range around it where f_S's upper
# bound reaches the peak's lower bound (the K that could hold the maximum). An end the sweep does not reach is None.

HALF = 0.5  # "most samples": a fraction crosses 1/2
WHERE = ("inside", "below", "above", "none")  # inside the sweep, before its smallest K, past its largest, no point


@dataclass(frozen=True)
class TransitionPoint:
    """One transition point of a K sweep, estimated between its grid values (see the comment above)."""

    k: float | None  # the point estimate; None unless where == 'inside'
    low: float | None  # the interval's ends; None: past that end of the sweep (or no interval, has_interval False)
    high: float | None
    where: str  # one of WHERE: 'below' = before the smallest K, 'above' = past the largest, 'none' = no point
    has_interval: bool = True  # False when the rows carry no fraction intervals
    value: float | None = None  # the spurious peak's fraction f_S (the fitted parabola's top); None for A and B

    def to_dict(self, prefix: str) -> dict:
        """Flat phase-table columns: {prefix}_K, {prefix}_low, {prefix}_high, {prefix}_where."""
        return {
            f"{prefix}_K": self.k,
            f"{prefix}_low": self.low,
            f"{prefix}_high": self.high,
            f"{prefix}_where": self.where,
        }


@dataclass(frozen=True)
class Transitions:
    """A (memorization ends), B (generalization begins) and the spurious peak of one sweep over K."""

    memorization_end: TransitionPoint  # A
    generalization_onset: TransitionPoint  # B
    spurious_peak: TransitionPoint

    def to_dict(self) -> dict:
        return {
            **self.memorization_end.to_dict("A"),
            **self.generalization_onset.to_dict("B"),
            **self.spurious_peak.to_dict("peak"),
            "peak_f_S": self.spurious_peak.value,
        }


def _log_interp(k0: float, f0: float, k1: float, f1: float, level: float = HALF) -> float:
    """The K where the line through (log k0, f0) and (log k1, f1) takes the value level (f0 != f1)."""
    t = (f0 - level) / (f0 - f1)
    return k0 * (k1 / k0) ** t  # = exp(log k0 + t (log k1 - log k0)); exact at t = 0, 1/2 (squares), 1


def _falls_through(ks: list[int], fs: list[float]) -> tuple[float | None, str]:
    """Where f falls through 1/2 after the last K at which f > 1/2 (A's rule: the largest memorizing K, then
    interpolated towards the next K)."""
    above = [i for i, f in enumerate(fs) if f > HALF]
    if not above:
        return None, "below"
    i = above[-1]
    if i == len(ks) - 1:
        return None, "above"
    return _log_interp(ks[i], fs[i], ks[i + 1], fs[i + 1]), "inside"


def _rises_through(ks: list[int], fs: list[float]) -> tuple[float | None, str]:
    """Where f rises through 1/2 before the first K at which f > 1/2 (B's rule: the smallest generalizing K,
    interpolated towards the K before it)."""
    above = [i for i, f in enumerate(fs) if f > HALF]
    if not above:
        return None, "above"
    j = above[0]
    if j == 0:
        return None, "below"
    return _log_interp(ks[j - 1], fs[j - 1], ks[j], fs[j]), "inside"


def _envelope(candidates: list[tuple[float | None, str]], ks: list[int]) -> tuple[float | None, float | None]:
    """(low, high) spanning crossing candidates: one 'below' the sweep opens the low end (None), one 'above'
    it the high end; otherwise such a candidate bounds the other end at the sweep's first or last K."""
    lows = [ks[-1] if where == "above" else k for k, where in candidates if where != "below"]
    highs = [ks[0] if where == "below" else k for k, where in candidates if where != "above"]
    low = None if len(lows) < len(candidates) else min(lows)
    high = None if len(highs) < len(candidates) else max(highs)
    return low, high


def _crossing_point(rows: list[dict], key: str, rule) -> TransitionPoint:
    ks = [r["K"] for r in rows]
    k, where = rule(ks, [r[key] for r in rows])
    lo, hi = [r.get(f"{key}_low") for r in rows], [r.get(f"{key}_high") for r in rows]
    if any(v is None for v in lo + hi):
        return TransitionPoint(k, None, None, where, has_interval=False)
    low, high = _envelope([(k, where), rule(ks, lo), rule(ks, hi)], ks)
    return TransitionPoint(k, low, high, where)


def _parabola_top(x: list[float], f: list[float]) -> tuple[float, float]:
    """(x*, f(x*)) of the parabola through three points (x0 < x1 < x2) whose middle value is the largest:
    its vertex, which then lies in [x0, x2]; the middle point itself when the three are level."""
    s01, s12 = (f[1] - f[0]) / (x[1] - x[0]), (f[2] - f[1]) / (x[2] - x[1])
    a = (s12 - s01) / (x[2] - x[0])  # f(x) = f0 + s01 (x - x0) + a (x - x0)(x - x1), Newton's form; a <= 0
    if a >= 0:
        return x[1], f[1]
    top = min(max((x[0] + x[1]) / 2 - s01 / (2 * a), x[0]), x[2])
    return top, f[0] + s01 * (top - x[0]) + a * (top - x[0]) * (top - x[1])


def _reach(ks: list[int], hi: list[float], i: int, level: float, step: int) -> float | None:
    """From grid index i (where hi >= level) towards step (-1 or +1): the K where hi first drops below level,
    interpolated in log K; None when it never does inside the sweep."""
    j = i
    while 0 <= j + step < len(ks):
        if hi[j + step] < level:
            return _log_interp(ks[j], hi[j], ks[j + step], hi[j + step], level)
        j += step
    return None


def _peak_point(rows: list[dict]) -> TransitionPoint:
    ks, fs = [r["K"] for r in rows], [r["f_S"] for r in rows]
    i = max(range(len(fs)), key=fs.__getitem__)  # the first K of the largest f_S, as transition_points
    if fs[i] <= 0:
        return TransitionPoint(None, None, None, "none", has_interval=False)
    if 0 < i < len(ks) - 1:
        x = [math.log(k) for k in ks[i - 1 : i + 2]]
        top, value = _parabola_top(x, fs[i - 1 : i + 2])
        k, where, value = math.exp(top), "inside", min(1.0, value)
    else:
        k, where, value = None, "below" if i == 0 else "above", fs[i]
    lo, hi = [r.get("f_S_low") for r in rows], [r.get("f_S_high") for r in rows]
    if any(v is None for v in lo + hi):
        return TransitionPoint(k, None, None, where, has_interval=False, value=value)
    low, high = _reach(ks, hi, i, lo[i], -1), _reach(ks, hi, i, lo[i], +1)
    if k is not None:  # the fitted top may lie past where the band drops: keep it inside its interval
        low, high = None if low is None else min(low, k), None if high is None else max(high, k)
    return TransitionPoint(k, low, high, where, value=value)


def interpolated_transitions(rows: list[dict]) -> Transitions:
    """A, B and the spurious peak of per-K fraction rows (K, f_M, f_S, f_G, and f_*_low / f_*_high for the
    intervals), estimated between grid values in log K (see the comment above this function's section).

    A = where f_M falls through 1/2 between the largest K with f_M > 1/2 and the next K; B = where f_G rises
    through 1/2 between the K before the smallest K with f_G > 1/2 and that K; the peak = the top of the parabola
    in log K through the largest f_S and its two neighbours (at an end of the sweep: where 'below' or 'above')."""
    if not rows:
        raise ValueError("no rows to find transitions in")
    rows = sorted(rows, key=lambda r: r["K"])
    ks = [r["K"] for r in rows]
    if len(set(ks)) != len(ks):
        raise ValueError(f"K values repeat ({ks}): give one row per K (pool the seeds, or split the rows by size)")
    return Transitions(
        _crossing_point(rows, "f_M", _falls_through),
        _crossing_point(rows, "f_G", _rises_through),
        _peak_point(rows),
    )


__all__ = [
    "CALIBRATIONS",
    "CLASSES",
    "COPY_THRESHOLDS",
    "FRACTION_KEYS",
    "QUALITIES",
    "THREE_CLASSES",
    "as_images",
    "RULES",
    "Classification",
    "Fraction",
    "PhaseClassifier",
    "bootstrap_fractions",
    "memorized_fraction",
    "SampleDistances",
    "sample_distances",
    "transition_points",
]
