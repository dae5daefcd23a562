"""One trained run as the analysis stages see it: the denoiser, its training and held-out data, the
settings of the analysis, and readers of what earlier stages wrote into the analysis directory."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from diffmem.evaluate.classify import CLASSES, ClassifyConfig, PhaseClassifier, SampleDistances
from diffmem.evaluate.metrics import MetricConfig, metric_from_config
from diffmem.io.files import PickledArrayError, read_npz, write_csv_atomic, write_json_atomic
from diffmem.models.sampling import SamplingConfig, sampling_denoiser, save_samples
from diffmem.models.train import held_out_split, load_denoiser

WITH_TRAINING = (*CLASSES, "training")
SEED_STRIDE = 1_000_003  # sample i of sampling seed s starts from the noise of seed s * SEED_STRIDE + i
SAMPLE_OPTIONS = ("sampler", "steps", "eta", "clip")  # what `diffmem sample`'s JSON records of a SamplingConfig


def load_npz(path: Path, stage: str) -> dict[str, np.ndarray]:
    """The arrays of an npz an earlier stage wrote, read by io.files.read_npz (bounded, never unpickled)."""
    if not path.is_file():
        raise ValueError(f"{path} is missing: run the '{stage}' stage first")
    try:
        return read_npz(path)
    except PickledArrayError:
        raise ValueError(f"{path} holds pickled objects and is refused (loading them could run code)") from None
    except ValueError as e:
        raise ValueError(f"{e}; delete it to recompute") from None


def load_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} is missing: run the '{stage}' stage first")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to recompute") from None


def summary(values: list[float]) -> dict:
    """Count, median and quartiles of the finite values."""
    v = torch.tensor([x for x in values if x is not None and math.isfinite(x)], dtype=torch.float64)
    if v.numel() == 0:
        return {"n": 0, "median": None, "q25": None, "q75": None}
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"n": int(v.numel()), "median": float(q[1]), "q25": float(q[0]), "q75": float(q[2])}


def by_class(rows: list[dict], key: str, classes: tuple[str, ...] = WITH_TRAINING) -> dict:
    """summary of rows[key] for each class."""
    return {cls: summary([r[key] for r in rows if r["class"] == cls]) for cls in classes}


def point_rows(labels: list[str], index: list[int], **columns: torch.Tensor) -> list[dict]:
    """One CSV row per point: its class, its index, then each column's value at that point."""
    return [
        {"class": labels[i], "index": index[i], **{name: v[i].item() for name, v in columns.items()}}
        for i in range(len(labels))
    ]


@dataclass(frozen=True, eq=False)
class SamplesFile:
    """Samples drawn from a run earlier (`diffmem sample`'s samples.npz, or an analysis's), read and
    checked against the run (RunContext.read_samples_file), to adopt as the 'sample' stage's output."""

    path: Path
    samples: torch.Tensor  # (N, D) float32
    seeds: np.ndarray  # (N,) int64
    sampling: SamplingConfig  # what drew them as far as the files say: N, the seed, sample.json's options
    options_file: Path | None  # the JSON beside the npz that `diffmem sample` wrote, when there is one
    reproducible: bool  # their seeds are seed * SEED_STRIDE + i and the EMA weights drew them, so a
    # stage that re-runs their trajectories from the sampling section (collapse) sees the same samples


def _sample_options(path: Path) -> tuple[dict, Path | None]:
    """The sampling options `diffmem sample` recorded beside `path` (FILE.json for --out FILE.npz,
    sample.json in a samples-NNNNN directory): the SAMPLE_OPTIONS and 'weights' found, and the file."""
    for meta in (path.with_suffix(".json"), path.parent / "sample.json"):
        if not meta.is_file():
            continue
        try:
            d = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta} (the options of {path.name}) is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{meta} (the options of {path.name}) must be a JSON object")
        return {k: d[k] for k in (*SAMPLE_OPTIONS, "weights") if k in d}, meta
    return {}, None


class RunContext:
    """A run directory written by `diffmem train` (or a study job), opened for analysis; results go to
    out_dir (default RUN_DIR/analysis). `sampling`, `metric` and `classify` are the sections every
    stage shares; `seed` drives point selection and the analyses' random draws; data_root: where a
    file-based dataset is now, when it moved since training."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        sampling: SamplingConfig,
        metric: MetricConfig,
        classify: ClassifyConfig,
        seed: int = 0,
        device: str = "cpu",
        out_dir: str | Path | None = None,
        data_root: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise ValueError(f"run directory not found: {self.run_dir}")
        self.sampling, self.metric_config, self.classify_config, self.seed = sampling, metric, classify, seed
        self.device = device
        run = load_denoiser(self.run_dir, device=device, data_root=data_root)
        self.denoiser, self.train_config, self.event_shape, self.model = (
            run.denoiser,
            run.config,
            run.event_shape,
            run.model,
        )
        self.train_x = run.train_x.cpu().float()
        self.schedule, self.data_range = run.schedule, run.data_range
        data = run.data  # loaded once, by load_denoiser (from data_root when the data moved)
        held = held_out_split(self.train_config, len(data)) if self.train_config.n_held_out else None
        self.held_out = data.x[held].float() if held is not None else None
        # every example outside the held-out set: the largest training pool of any K, for a copy
        # threshold that means the same at every K
        pool = torch.ones(len(data), dtype=torch.bool)
        if held is not None:
            pool[held] = False
        self.pool = data.x[pool].float()
        self.out = Path(out_dir) if out_dir is not None else self.run_dir / "analysis"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the analysis directory {self.out}: {e.strerror}") from None
        self._metric = None

    @property
    def k(self) -> int:
        return self.train_config.k

    def read_samples_file(self, path: str | Path) -> SamplesFile:
        """Samples drawn from this run earlier, checked, with the sampling section that drew them;
        nothing is written (adopt_samples does that). The npz is read by io.files.read_npz (never
        unpickled) and must hold `samples` (N, *example shape) or (N, D) and their `seeds` (N,). The
        sampling section is this context's with n_samples = N, the sampling seed when the seeds are
        seed * SEED_STRIDE + i, and sampler, steps, eta and clip from the JSON `diffmem sample` wrote
        beside the file."""
        path = Path(path)
        arrays = read_npz(path, what="samples file")
        event, dim = tuple(self.event_shape), math.prod(self.event_shape)
        fix = f"sample this run with `diffmem sample {self.run_dir}` and pass its samples.npz"
        if "samples" not in arrays or "seeds" not in arrays:
            raise ValueError(f"{path} must hold the arrays 'samples' and 'seeds', it holds {sorted(arrays)}; {fix}")
        x, seeds = arrays["samples"], arrays["seeds"]
        if x.ndim < 2 or x.shape[1:] not in (event, (dim,)) or not np.issubdtype(x.dtype, np.floating):
            raise ValueError(
                f"{path}: samples of shape {x.shape} ({x.dtype}) do not match the run {self.run_dir}, whose examples "
                f"have shape {event} (D = {dim}): expected floats of shape (N, {dim}); {fix}"
            )
        n = x.shape[0]
        if seeds.shape != (n,) or not np.issubdtype(seeds.dtype, np.integer):
            raise ValueError(f"{path}: 'seeds' must hold one integer per sample, shape ({n},), got {seeds.shape}")
        if n < 2:
            raise ValueError(f"{path} holds {n} sample(s); the spurious test compares samples: need >= 2")
        if not np.isfinite(x).all():
            raise ValueError(f"{path} holds NaN or Inf samples; they cannot be classified")
        options, meta = _sample_options(path)
        seed, offset = divmod(int(seeds[0]), SEED_STRIDE)
        one_seed = offset == 0 and bool((seeds == seeds[0] + np.arange(n)).all())
        try:
            sampling = replace(
                self.sampling,
                n_samples=n,
                seed=seed if one_seed else self.sampling.seed,
                **{k: options[k] for k in SAMPLE_OPTIONS if k in options},
            )
        except ValueError as e:
            raise ValueError(f"{meta or path}: {e}") from None
        reproducible = one_seed and options.get("weights", "ema") == "ema"
        samples = torch.from_numpy(x.reshape(n, dim)).float()
        return SamplesFile(path, samples, seeds.astype(np.int64), sampling, meta, reproducible)

    def adopt_samples(self, found: SamplesFile) -> None:
        """Make `found` the 'sample' stage's output (OUT/samples.npz) and its sampling section this
        context's, so that the later stages classify and analyse these samples."""
        target = self.out / "samples.npz"
        if not (target.is_file() and target.resolve() == found.path.resolve()):
            save_samples(target, found.samples, found.seeds.tolist())
        self.sampling = found.sampling

    @property
    def sampling_denoiser(self):
        """The denoiser sampling paths call (clipped as the sampling section says); energies,
        curvature and the census use the unclipped `denoiser`."""
        return sampling_denoiser(self.denoiser, self.sampling, self.data_range)

    @property
    def metric(self):
        if self._metric is None:
            self._metric = metric_from_config(self.metric_config, self.event_shape, self.device)
        return self._metric

    def samples(self) -> tuple[torch.Tensor, np.ndarray]:
        d = load_npz(self.out / "samples.npz", "sample")
        return torch.from_numpy(d["samples"]).float(), d["seeds"]

    def distances(self) -> SampleDistances:
        d = load_npz(self.out / "distances.npz", "distances")
        if str(d["metric"]) != self.metric_config.name:
            raise ValueError(
                f"{self.out / 'distances.npz'} was computed with metric {d['metric']}, not {self.metric_config.name}"
            )
        t = {k: torch.from_numpy(v) for k, v in d.items() if k != "metric"}
        return SampleDistances(t["m"], t["m2"], t["train_index"], t["s"], t["gen_index"], str(d["metric"]))

    def classifier(self) -> PhaseClassifier:
        c = self.classify_config
        clf = PhaseClassifier(
            c.delta_m,
            c.delta_s,
            metric=self.metric,
            quantile=c.quantile,
            copy_threshold=c.copy_threshold,
            quality=c.quality,
            manifold_k=c.manifold_k,
            manifold_quantile=c.manifold_quantile,
            rule=c.rule,
            ratio=c.ratio,
            n_calibration_draws=c.n_calibration_draws,
            seed=c.seed,
        )
        return clf.fit(self.train_x, self.held_out, pool=self.pool, n_generated=self.sampling.n_samples)

    def labels(self) -> list[str]:
        path = self.out / "samples.csv"
        if not path.is_file():
            raise ValueError(f"{path} is missing: run the 'classify' stage first")
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        if len(rows) != self.sampling.n_samples:
            raise ValueError(f"{path} has {len(rows)} rows, expected {self.sampling.n_samples}")
        return [r["class"] for r in rows]

    def points_by_class(self, n_points: int) -> dict[str, list[int]]:
        """Up to n_points sample indices per class, drawn at random (seeded)."""
        labels = self.labels()
        g = torch.Generator().manual_seed(self.seed)
        out = {}
        for cls in CLASSES:
            idx = [i for i, c in enumerate(labels) if c == cls]
            perm = torch.randperm(len(idx), generator=g).tolist()
            out[cls] = sorted(idx[i] for i in perm[:n_points])
        return out

    def points(self, n_points: int) -> tuple[torch.Tensor, list[str], list[int]]:
        """Up to n_points samples of every class plus n_points training examples ('training'), as
        (points (n, D), class labels, indices into the samples or the training set)."""
        samples, _ = self.samples()
        chosen = self.points_by_class(n_points)
        xs, labels, index = [], [], []
        for cls, idx in chosen.items():
            xs.append(samples[idx])
            labels += [cls] * len(idx)
            index += idx
        g = torch.Generator().manual_seed(self.seed + 1)
        t = torch.randperm(self.train_x.shape[0], generator=g)[:n_points].tolist()
        xs.append(self.train_x[t])
        labels += ["training"] * len(t)
        index += t
        return torch.cat(xs), labels, index

    def write_results(self, name: str, rows: list[dict], summary: dict) -> list[Path]:
        """A per-point stage's outputs: NAME.csv (one row per point) and NAME.json (its summary)."""
        write_csv_atomic(self.out / f"{name}.csv", rows)
        write_json_atomic(self.out / f"{name}.json", summary)
        return [self.out / f"{name}.csv", self.out / f"{name}.json"]

    def as_images(self, x: torch.Tensor) -> torch.Tensor:
        """Flat points (n, D) in the run's example shape, on its device."""
        return x.reshape(-1, *self.event_shape).to(self.device)


__all__ = [
    "SAMPLE_OPTIONS",
    "SEED_STRIDE",
    "WITH_TRAINING",
    "RunContext",
    "SamplesFile",
    "by_class",
    "load_json",
    "load_npz",
    "point_rows",
    "summary",
]
