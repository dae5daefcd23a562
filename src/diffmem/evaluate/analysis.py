"""Evaluation of one trained run (SCIENCE.md §5, §6), as resumable stages.

Stages write into RUN_DIR/analysis/ and read only what earlier stages wrote there, so a sweep can
run, skip or redo each of them on its own:

  sample      samples.npz           N samples, each identified by its seed
  distances   distances.npz         m, m2, s and neighbour indices in the chosen metric
  classify    classification.json   thresholds, fractions with bootstrap intervals; samples.csv; gallery.png
  basins      basins.csv/.json      critical noise levels per class (and for training examples)
  energy      energy.csv/.json      -log p relative to the training mean, along two paths
  curvature   curvature.csv/.json   Hessian spectra of -log p per class
  census      census.json           fixed points of the trained denoiser at one noise level
  collapse    collapse.csv/.json    the level where each trajectory commits to one training example
"""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from diffmem.evaluate.classify import CLASSES, RULES, PhaseClassifier, SampleDistances
from diffmem.core import SAMPLERS, schedule_from_dict
from diffmem.evaluate.metrics import METRICS, make_metric
from diffmem.io.files import write_bytes_atomic, write_json_atomic

STAGES = ("sample", "distances", "classify", "basins", "energy", "curvature", "census", "collapse")


@dataclass(frozen=True)
class AnalysisConfig:
    # samples
    n_samples: int = 512
    sampler: str = "ddim"
    sample_steps: int = 50
    eta: float = 0.0
    sample_seed: int = 0
    batch_size: int = 1024
    # distances and classification (SCIENCE.md §5)
    metric: str = "l2"  # 'l2' (pixel L2 / sqrt(D)) or 'lpips'
    lpips_net: str = "alex"
    weights_dir: str | None = None  # LPIPS weight files; None: $DIFFMEM_WEIGHTS or ~/.cache/diffmem/weights
    lpips_resize: int | None = None  # upsample small images to this side before LPIPS
    delta_m: float | None = None  # None: calibrated from held-out data
    delta_s: float | None = None
    quantile: float = 0.05  # calibration quantile of held-out distances
    rule: str = "threshold"  # memorized test: 'threshold' (m <= delta_m) or 'ratio' (m / m2 < ratio)
    ratio: float = 1 / 3
    n_bootstrap: int = 1000
    confidence: float = 0.95  # level of the bootstrap intervals
    n_calibration_draws: int = 20  # held-out subsets of the samples' size averaged for delta_s
    # attractor measurements (SCIENCE.md §6), each on up to *_points samples per class and as many training examples
    basin_points: int = 32
    energy_points: int = 32
    curvature_points: int = 32
    basin_trials: int = 10
    basin_p: float = 0.9
    basin_delta: float = 0.1  # recovery radius, in the metric's units
    basin_steps: int = 20
    basin_sigma_min: float = 0.01  # search range of the critical level
    basin_sigma_max: float = 80.0
    basin_rtol: float = 0.02  # relative resolution of the critical level
    energy_sigma: float = 0.2
    energy_nodes: int = 32
    curvature_sigma: float = 0.2
    curvature_k: int = 16  # top and bottom eigenvalues when D is too large for the full spectrum
    census_sigma: float = 0.2
    census_starts: int = 200
    collapse_samples: int = 256
    seed: int = 0  # point selection and every random draw of the analyses
    classify_seed: int = 0  # calibration draws and bootstrap resamples

    def __post_init__(self) -> None:
        for name in ("n_samples", "sample_steps", "batch_size", "n_bootstrap", "basin_trials", "n_calibration_draws"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("basin_steps", "energy_nodes", "curvature_k", "census_starts", "collapse_samples", "basin_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.n_samples < 2:
            raise ValueError(f"the spurious test needs at least 2 generated samples; n_samples = {self.n_samples}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {sorted(SAMPLERS)}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose one of {METRICS}")
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {RULES}")
        for name in ("delta_m", "delta_s"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number (or None to calibrate), got {v!r}")
        for name in ("energy_sigma", "curvature_sigma", "census_sigma", "basin_delta"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile must lie in (0, 1), got {self.quantile}")
        for name in ("energy_points", "curvature_points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")
        if not 0 < self.basin_p < 1:
            raise ValueError(f"basin_p must lie in (0, 1), got {self.basin_p}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AnalysisConfig:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown analysis options {unknown}; allowed: {sorted(allowed)}")
        return cls(**d)


def write_csv_atomic(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())


def _save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    write_bytes_atomic(path, buf.getvalue())


def _load_npz(path: Path, stage: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ValueError(f"{path} is missing: run the '{stage}' stage first")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(f"{path} holds pickled objects and is refused (loading them could run code)") from None
        raise ValueError(f"{path} is not a readable npz file ({e}); delete it to recompute") from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path} is not a readable npz file ({e}); delete it to recompute") from None


def _load_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} is missing: run the '{stage}' stage first")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to recompute") from None


def _summary(values: list[float]) -> dict:
    """Count, median and quartiles of the finite values."""
    v = torch.tensor([x for x in values if x is not None and math.isfinite(x)], dtype=torch.float64)
    if v.numel() == 0:
        return {"n": 0, "median": None, "q25": None, "q75": None}
    q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"n": int(v.numel()), "median": float(q[1]), "q25": float(q[0]), "q75": float(q[2])}


WITH_TRAINING = (*CLASSES, "training")


def _by_class(rows: list[dict], key: str, classes: tuple[str, ...] = WITH_TRAINING) -> dict:
    """_summary of rows[key] for each class."""
    return {cls: _summary([r[key] for r in rows if r["class"] == cls]) for cls in classes}


class RunAnalysis:
    """The analyses of one run directory written by `diffmem train` (see the module docstring); results
    go to out_dir (default RUN_DIR/analysis)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: AnalysisConfig | None = None,
        *,
        device: str = "cpu",
        out_dir: str | Path | None = None,
    ):
        from diffmem.io.data import load_dataset
        from diffmem.models.train import held_out_split, load_denoiser

        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise ValueError(f"run directory not found: {self.run_dir}")
        self.config = config or AnalysisConfig()
        self.device = device
        self.denoiser, self.train_config, train_x, self.event_shape, self.model = load_denoiser(
            self.run_dir, device=device
        )
        self.train_x = train_x.cpu().float()
        self.schedule = schedule_from_dict(self.train_config.schedule)
        data = load_dataset(self.train_config.data, dtype=torch.float32, **self.train_config.data_options)
        n_held = self.train_config.n_held_out
        self.held_out = data.x[held_out_split(self.train_config, len(data))].float() if n_held else None
        self.out = Path(out_dir) if out_dir is not None else self.run_dir / "analysis"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the analysis directory {self.out}: {e.strerror}") from None
        self._metric = None

    # --- shared pieces ---------------------------------------------------------------------

    @property
    def metric(self):
        if self._metric is None:
            c = self.config
            self._metric = make_metric(
                c.metric,
                self.event_shape,
                lpips_net=c.lpips_net,
                weights_dir=c.weights_dir,
                resize=c.lpips_resize,
                device=self.device,
            )
        return self._metric

    def samples(self) -> tuple[torch.Tensor, np.ndarray]:
        d = _load_npz(self.out / "samples.npz", "sample")
        return torch.from_numpy(d["samples"]).float(), d["seeds"]

    def classifier(self) -> PhaseClassifier:
        c = self.config
        clf = PhaseClassifier(
            c.delta_m,
            c.delta_s,
            metric=self.metric,
            quantile=c.quantile,
            rule=c.rule,
            ratio=c.ratio,
            n_calibration_draws=c.n_calibration_draws,
            seed=c.classify_seed,
        )
        return clf.fit(self.train_x, self.held_out, n_generated=c.n_samples)

    def labels(self) -> list[str]:
        path = self.out / "samples.csv"
        if not path.is_file():
            raise ValueError(f"{path} is missing: run the 'classify' stage first")
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        if len(rows) != self.config.n_samples:
            raise ValueError(f"{self.out / 'samples.csv'} has {len(rows)} rows, expected {self.config.n_samples}")
        return [r["class"] for r in rows]

    def points_by_class(self, n_points: int) -> dict[str, list[int]]:
        """Up to n_points sample indices per class, drawn at random (seeded)."""
        labels = self.labels()
        g = torch.Generator().manual_seed(self.config.seed)
        out = {}
        for cls in CLASSES:
            idx = [i for i, c in enumerate(labels) if c == cls]
            perm = torch.randperm(len(idx), generator=g).tolist()
            out[cls] = sorted(idx[i] for i in perm[:n_points])
        return out

    def _points(self, n_points: int) -> tuple[torch.Tensor, list[str], list[int]]:
        """Up to n_points samples of every class plus n_points training examples ('training')."""
        samples, _ = self.samples()
        chosen = self.points_by_class(n_points)
        xs, labels, index = [], [], []
        for cls, idx in chosen.items():
            xs.append(samples[idx])
            labels += [cls] * len(idx)
            index += idx
        g = torch.Generator().manual_seed(self.config.seed + 1)
        t = torch.randperm(self.train_x.shape[0], generator=g)[:n_points].tolist()
        xs.append(self.train_x[t])
        labels += ["training"] * len(t)
        index += t
        return torch.cat(xs), labels, index

    # --- stages -------------------------------------------------------------------------------

    def run_sample(self) -> list[Path]:
        from diffmem.models.sampling import sample_denoiser

        c = self.config
        samples, seeds = sample_denoiser(
            self.denoiser,
            self.schedule,
            c.n_samples,
            self.event_shape,
            sampler=c.sampler,
            steps=c.sample_steps,
            eta=c.eta,
            seed=c.sample_seed,
            batch_size=c.batch_size,
            device=self.device,
        )
        if not bool(torch.isfinite(samples).all()):
            raise ValueError("the model produced NaN or Inf samples; the run cannot be analysed")
        _save_npz(self.out / "samples.npz", samples=samples.numpy(), seeds=np.asarray(seeds, dtype=np.int64))
        return [self.out / "samples.npz"]

    def run_distances(self) -> list[Path]:
        from diffmem.evaluate.classify import sample_distances

        samples, _ = self.samples()
        d = sample_distances(samples, self.train_x, self.metric)
        _save_npz(
            self.out / "distances.npz",
            m=d.m.numpy(),
            m2=d.m2.numpy(),
            s=d.s.numpy(),
            train_index=d.train_index.numpy(),
            gen_index=d.gen_index.numpy(),
            metric=np.asarray(d.metric),
        )
        return [self.out / "distances.npz"]

    def distances(self) -> SampleDistances:
        d = _load_npz(self.out / "distances.npz", "distances")
        if str(d["metric"]) != self.config.metric:
            raise ValueError(
                f"{self.out / 'distances.npz'} was computed with metric {d['metric']}, not {self.config.metric}"
            )
        t = {k: torch.from_numpy(v) for k, v in d.items() if k != "metric"}
        return SampleDistances(t["m"], t["m2"], t["train_index"], t["s"], t["gen_index"], str(d["metric"]))

    def run_classify(self) -> list[Path]:
        from diffmem.viz.figures import class_gallery

        c = self.config
        result = self.classifier().classify_distances(self.distances())
        samples, seeds = self.samples()
        fr = result.fractions(n_bootstrap=c.n_bootstrap, seed=c.classify_seed, level=c.confidence)
        summary = {
            "K": self.train_config.k,
            "n_samples": len(result.labels),
            "metric": c.metric,
            "rule": result.rule,
            "delta_m": result.delta_m,
            "delta_s": result.delta_s,
            "calibration": result.calibration,
            "counts": result.counts(),
            "fractions": {k: asdict(v) for k, v in fr.items()},
            "distinct_nearest_training": int(result.distances.train_index.unique().numel()),
        }
        write_csv_atomic(self.out / "samples.csv", result.rows(seeds.tolist()))
        write_json_atomic(self.out / "classification.json", summary)
        class_gallery(
            result,
            samples.reshape(-1, *self.event_shape).numpy(),
            self.train_x.reshape(-1, *self.event_shape).numpy(),
            self.out / "gallery.png",
            title=f"K = {self.train_config.k}: most and least typical samples per class",
        )
        return [self.out / "samples.csv", self.out / "classification.json", self.out / "gallery.png"]

    def run_basins(self) -> list[Path]:
        from diffmem.core.basins import BasinEstimator, KarrasGrid

        c = self.config
        x, labels, index = self._points(c.basin_points)
        metric = self.metric

        def distance(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            ey, et = metric.embed(y.reshape(y.shape[0], -1)), metric.embed(target.reshape(target.shape[0], -1))
            return metric.value((ey.double() - et.double()).norm(dim=1), ey.shape[1]).to(y.dtype)

        floor = float(self.schedule.sigmas.min())  # below it the network was never trained
        est = BasinEstimator(
            self.denoiser,
            sigma_grid=KarrasGrid(sigma_floor=floor),
            n_trials=c.basin_trials,
            p=c.basin_p,
            delta=c.basin_delta,
            steps=c.basin_steps,
            sigma_min=c.basin_sigma_min,
            sigma_max=c.basin_sigma_max,
            rtol=c.basin_rtol,
            distance=None if metric.name == "l2" else distance,
        )
        g = torch.Generator(device=self.device).manual_seed(c.seed)
        with torch.no_grad():
            res = est.critical_times(x.reshape(-1, *self.event_shape).to(self.device), generator=g)
        rows = []
        for i, r in enumerate(res):
            rows.append({"class": labels[i], "index": index[i], **_flat(r)})
        write_csv_atomic(self.out / "basins.csv", rows)
        per_class = _by_class(rows, "sigma_c")
        radius = _by_class(rows, "radius_normalized")
        no_basin = {cls: sum(r["status"] == "no_basin" for r in rows if r["class"] == cls) for cls in WITH_TRAINING}
        calls = sum(int(r["n_calls"]) for r in rows)
        write_json_atomic(
            self.out / "basins.json",
            {
                "sigma_c": per_class,
                "radius_normalized": radius,
                "no_basin": no_basin,
                "denoiser_calls": calls,
                "options": _basin_options(c),
            },
        )
        return [self.out / "basins.csv", self.out / "basins.json"]

    def run_energy(self) -> list[Path]:
        from diffmem.core.energy import relative_energy

        c = self.config
        x, labels, index = self._points(c.energy_points)
        anchor = self.train_x.mean(0, keepdim=True).expand_as(x)
        with torch.no_grad():
            r = relative_energy(
                self.denoiser,
                c.energy_sigma,
                anchor.reshape(-1, *self.event_shape).to(self.device),
                x.reshape(-1, *self.event_shape).to(self.device),
                n_nodes=c.energy_nodes,
            )
        rows = [
            {
                "class": labels[i],
                "index": index[i],
                "energy_straight": float(r.straight[i]),
                "energy_arc": float(r.arc[i]),
                "discrepancy": float(r.discrepancy[i]),
            }
            for i in range(len(labels))
        ]
        write_csv_atomic(self.out / "energy.csv", rows)
        summary = {
            "sigma": c.energy_sigma,
            "reference": "the training mean: values are -log p(x) + log p(mean) in nats",
            "energy": _by_class(rows, "energy_straight"),
            "discrepancy": _by_class(rows, "discrepancy"),
        }
        write_json_atomic(self.out / "energy.json", summary)
        return [self.out / "energy.csv", self.out / "energy.json"]

    def run_curvature(self) -> list[Path]:
        from diffmem.core.curvature import hessian_spectrum, summarize_by_class

        c = self.config
        x, labels, index = self._points(c.curvature_points)
        g = torch.Generator(device=self.device).manual_seed(c.seed)
        spec = hessian_spectrum(
            self.denoiser,
            x.reshape(-1, *self.event_shape).to(self.device),
            c.curvature_sigma,
            k=c.curvature_k,
            generator=g,
            event_shape=self.event_shape,
        )
        rows = [
            {
                "class": labels[i],
                "index": index[i],
                "lambda_min": float(spec.lambda_min[i]),
                "lambda_max": float(spec.lambda_max[i]),
                "asymmetry": float(spec.asymmetry[i]),
            }
            for i in range(len(labels))
        ]
        write_csv_atomic(self.out / "curvature.csv", rows)
        summary = {
            "sigma": c.curvature_sigma,
            "exact": bool(spec.exact),
            "isotropic_curvature": 1 / c.curvature_sigma**2,
            "by_class": summarize_by_class(spec, labels),
        }
        write_json_atomic(self.out / "curvature.json", summary)
        return [self.out / "curvature.csv", self.out / "curvature.json"]

    def run_census(self) -> list[Path]:
        from diffmem.experiments.attractors import split_starts
        from diffmem.core.census import DenoiserLandscape, census, make_starts

        c = self.config
        pats = self.train_x.to(self.device)
        dim = pats.shape[1]
        g = torch.Generator().manual_seed(c.seed)
        land = DenoiserLandscape(
            self.denoiser,
            c.census_sigma,
            dim,
            event_shape=self.event_shape,
            generator=torch.Generator().manual_seed(c.seed),
        )
        starts, labels = make_starts(pats.cpu(), c.census_sigma, split_starts(c.census_starts), generator=g)
        result = census(
            land, pats, starts.to(self.device), start_labels=labels, tol=1e-5, max_iter=2000, saddle_search="none"
        )
        write_json_atomic(self.out / "census.json", result.to_dict())
        return [self.out / "census.json"]

    def run_collapse(self) -> list[Path]:
        from diffmem.core import initial_noise, seeded_generators
        from diffmem.core.collapse import collapse_times

        c = self.config
        n = min(c.collapse_samples, c.n_samples)
        sigmas = self.schedule.sampling_sigmas(c.sample_steps)
        seeds = [c.sample_seed * 1_000_003 + i for i in range(n)]  # the first n samples' own seeds
        gens = seeded_generators(seeds, "cpu")
        x = initial_noise((n, *self.event_shape), float(sigmas[0]), generator=gens, like=torch.zeros(0))
        kw = {"eta": c.eta} if c.sampler == "ddim" else {}
        with torch.no_grad():
            res = collapse_times(
                self.denoiser,
                x.to(self.device),
                sigmas,
                self.train_x.to(self.device),
                sampler=c.sampler,
                generator=gens,
                **kw,
            )
        labels = self.labels()[:n]
        rows = [
            {
                "index": i,
                "class": labels[i],
                "sigma_nearest": float(res.sigma_nearest[i]),
                "sigma_posterior": float(res.sigma_posterior[i]),
                "final_nearest": int(res.final_index[i]),
            }
            for i in range(n)
        ]
        write_csv_atomic(self.out / "collapse.csv", rows)
        summary = {
            "n": n,
            "sigma_nearest": _by_class(rows, "sigma_nearest", CLASSES),
            "sigma_posterior": _by_class(rows, "sigma_posterior", CLASSES),
            "all": {
                "sigma_nearest": _summary([r["sigma_nearest"] for r in rows]),
                "sigma_posterior": _summary([r["sigma_posterior"] for r in rows]),
            },
        }
        write_json_atomic(self.out / "collapse.json", summary)
        return [self.out / "collapse.csv", self.out / "collapse.json"]

    def run(self, stage: str) -> list[Path]:
        if stage not in STAGES:
            raise ValueError(f"unknown analysis stage {stage!r}; choose from {STAGES}")
        return getattr(self, f"run_{stage}")()


def _flat(result) -> dict:
    """A basin result as a flat CSV row (the recovery curve, if any, left out)."""
    d = asdict(result) if hasattr(result, "__dataclass_fields__") else dict(result)
    skip = {"curve_sigmas", "curve_p_hat"}
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in d.items() if k not in skip}


def _basin_options(c: AnalysisConfig) -> dict:
    return {
        "n_trials": c.basin_trials,
        "p": c.basin_p,
        "delta": c.basin_delta,
        "steps": c.basin_steps,
        "sigma_range": [c.basin_sigma_min, c.basin_sigma_max],
        "rtol": c.basin_rtol,
    }


def analyze_run(
    run_dir: str | Path, config: AnalysisConfig | None = None, *, extra: tuple[str, ...] = (), device: str = "cpu"
) -> dict:
    """sample, distances and classify, then the `extra` stages (basins, energy, curvature, census,
    collapse); returns and writes RUN_DIR/analysis/analysis.json."""
    unknown = [s for s in extra if s not in STAGES[3:]]
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {STAGES[3:]}")
    a = RunAnalysis(run_dir, config, device=device)
    written: dict[str, list[str]] = {}
    for stage in ("sample", "distances", "classify", *[s for s in STAGES[3:] if s in extra]):
        written[stage] = [str(p) for p in a.run(stage)]
    result = {
        "run": str(a.run_dir),
        "K": a.train_config.k,
        "config": a.config.to_dict(),
        "classification": _load_json(a.out / "classification.json", "classify"),
        "outputs": written,
    }
    for stage in extra:
        if stage != "census":
            result[stage] = _load_json(a.out / f"{stage}.json", stage)
        else:
            result["census"] = _load_json(a.out / "census.json", "census").get("counts")
    write_json_atomic(a.out / "analysis.json", result)
    return result


__all__ = ["STAGES", "AnalysisConfig", "RunAnalysis", "analyze_run", "write_csv_atomic"]
