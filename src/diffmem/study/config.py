"""The configuration of a K sweep (SCIENCE.md §5-§7): one YAML, TOML or JSON file parsed into typed,
validated, frozen dataclasses.

A study trains one model per (K, seed) on the nested training set of size K, samples it, measures
nearest-neighbour distances, classifies the samples as memorized / spurious / generalized and runs
the enabled attractor analyses. With `sizes` (the capacity axis, SCIENCE.md §6-§7) it does so for each
network size: each size is a full sweep over K, its jobs named w-SIZE-k-K-seed-S.

Every problem is a ConfigError naming its key path, e.g. ``analyses.basins.p: must lie in (0, 1), got 1.5``;
nothing is silently corrected. Files are read strictly (diffmem.io.config): a key given twice is an error, and
YAML numbers and booleans follow YAML 1.2 (1e-3 is a number, yes and 1_000 are text, 032 is refused).

A relative data.options.root in a config file is taken relative to the file's folder, not to the
working directory, so a study runs the same from anywhere; load_study_config makes it absolute.
parse_study_config, which has no file, keeps it as written.

Fingerprints hash what results depend on. Left out as pure execution settings: name, device,
executor, sampling.batch_size (a sample's noise depends on its seed only), train.log_every and
train.checkpoint_every (a resumed run equals an uninterrupted one), and the file locations
data.options.root and metric.weights_dir (the files there are assumed to be the same). Settings
that nothing reads are left out too: those of disabled analyses, the LPIPS options of the l2
metric, n_calibration_draws (and quantile, unless the two-model test calibrates its delta) when
calibration is 'given', and ratio under rule 'threshold'.

A config without sizes writes, fingerprints and lays out its study as before sizes existed (sizes is left out of
its dictionary). A job of size W has the fingerprint of the same job in the single-size study whose network has
size W (`sized(W)`): its results do not depend on the other sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from diffmem.evaluate.analysis import AnalysisConfig
from diffmem.evaluate.classify import ClassifyConfig
from diffmem.evaluate.metrics import MetricConfig
from diffmem.evaluate.stages import AnalysesConfig
from diffmem.io.config import (
    MAX_SEED,
    ConfigError,
    Section,
    choice,
    error,
    in_range,
    parse_text,
    plain,
    read_config_file,
    show,
    to_yaml,
    yaml_line,
)
from diffmem.io.data import DataConfig
from diffmem.io.files import canonical_json_hash
from diffmem.models.nets import NetworkConfig
from diffmem.models.sampling import SamplingConfig
from diffmem.models.train import TrainConfig, TrainOptions
from diffmem.study.executors import ExecutorConfig
from diffmem.study.store import job_name

DEVICE_TYPES = ("cpu", "cuda")
RUNS = ("all", "phase", "two_model")  # the jobs a study runs
FINGERPRINT_VERSION = 3  # bump when the meaning of a fingerprinted setting changes (3: fitted critical levels)
MAX_TIMESTEPS = 100_000  # a sanity bound on T (DDPM uses 1000): the schedule is built while validating
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SIZED_JOB = re.compile(r"w-(\d+)-(k-\d+-seed-\d+)")  # the directory name of a job of one network size
# what a network size sets, per network kind (SCIENCE.md §7 compares U-Nets by their base channel count)
SIZE_AXES = {
    "mlp": "MLP width (network.mlp.hidden)",
    "unet": "U-Net base channels (network.unet.block_out_channels[0])",
}


# --- sections --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyJob:
    """One training job of a study: the nested training set of size k, trained with seed (by the network of
    this size, in a study over sizes)."""

    k: int
    seed: int
    size: int | None = None  # None: the study's network as configured (a study without sizes)

    @property
    def name(self) -> str:
        """Its directory: k-0032-seed-0, or w-0128-k-0032-seed-0 for size 128."""
        return sized_job_name(self.k, self.seed, self.size)


def sized_job_name(k: int, seed: int, size: int | None) -> str:
    """The directory name of a job: store.job_name(k, seed), prefixed by w-SIZE in a study over sizes."""
    return job_name(k, seed) if size is None else f"w-{size:04d}-{job_name(k, seed)}"


def job_size(name: str) -> int | None:
    """The network size a job's directory name carries (w-0128-k-0032-seed-0 -> 128); None for k-0032-seed-0."""
    m = _SIZED_JOB.fullmatch(name)
    return int(m.group(1)) if m else None


def sized_network(network: NetworkConfig, size: int) -> NetworkConfig:
    """The network at this size: an MLP of width size, or the U-Net with block_out_channels scaled so that the
    first (the base channel count) is size, keeping the ratios between levels (DDPM's 1, 2, 2, 2)."""
    if network.kind == "mlp":
        return NetworkConfig.from_config({"kind": "mlp", "mlp": {**network.mlp, "hidden": size}})
    channels = list(network.unet["block_out_channels"])
    scaled = [c * size // channels[0] for c in channels]
    if any(c * size % channels[0] for c in channels):
        raise ValueError(
            f"size {size} does not scale network.unet.block_out_channels {channels} to whole channel counts; "
            f"use multiples of {channels[0] // math.gcd(*channels)}"
        )
    return NetworkConfig.from_config({"kind": "unet", "unet": {**network.unet, "block_out_channels": scaled}})


@dataclass(frozen=True, kw_only=True)
class StudyConfig(Section):
    """A K sweep: for each K in ks and each training seed, one model on the nested training set of size K."""

    name: str = "study"  # a label, safe as a directory name
    run: str = "all"  # which jobs: 'all', 'phase' (one model per K and seed, classified), 'two_model' (pairs only)
    data: DataConfig = field(default_factory=DataConfig)
    ks: tuple[int, ...]  # training-set sizes, ascending
    seeds: tuple[int, ...] = (0,)  # training seeds: one job per (K, seed)
    split_seed: int = 0  # seed of the permutation shared by every K (nested training sets)
    n_held_out: int = 0  # examples at the far end of that permutation, never trained on
    network: NetworkConfig = field(default_factory=NetworkConfig)
    sizes: tuple[int, ...] = ()  # the capacity axis: network sizes (MLP width, U-Net base channels), ascending
    train: TrainOptions = field(default_factory=TrainOptions)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    analyses: AnalysesConfig = field(default_factory=AnalysesConfig)
    device: str = "cpu"  # cpu, cuda or cuda:N
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def _check(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise error("name", f"use letters, digits, '.', '_' and '-' (a directory name), got {self.name!r}")
        choice("run", self.run, RUNS)
        self._check_ks()
        self._check_sizes()
        if not self.seeds:
            raise error("seeds", "give at least one training seed")
        for i, seed in enumerate(self.seeds):
            in_range(f"seeds[{i}]", seed, low=0, high=MAX_SEED)
        if len(set(self.seeds)) != len(self.seeds):
            raise error("seeds", f"values must be unique, got {list(self.seeds)}")
        in_range("split_seed", self.split_seed, low=0, high=MAX_SEED)
        in_range("n_held_out", self.n_held_out, low=0)
        if self.run == "two_model" and not self.analyses.two_model.enabled:
            raise error("analyses.two_model.enabled", "run 'two_model' runs only the two-model test: set it true")
        needed = self.classify.manifold_k + 2  # the manifold test's balls need k other held-out images
        if self.run != "two_model" and self.classify.quality == "manifold" and self.n_held_out < needed:
            raise error(
                "classify.quality",
                f"the manifold test needs held-out images: set n_held_out >= {needed} (got {self.n_held_out}) "
                "or quality: none",
            )
        if self.run != "two_model" and self.classify.calibration == "held_out" and self.n_held_out < 2:
            raise error(
                "classify.calibration",
                f"'held_out' calibration needs held-out images: set n_held_out >= 2 (got {self.n_held_out}) "
                "or give the thresholds and set calibration: given",
            )
        two = self.analyses.two_model
        if two.enabled and two.delta is None and self.n_held_out < 2:
            raise error(
                "analyses.two_model.delta",
                f"null calibrates it from held-out images: set n_held_out >= 2 (got {self.n_held_out}) or give delta",
            )
        if two.enabled and self.run != "phase":  # its Ks are read only then (two_model_ks)
            self._check_two_model_ks(two.ks)
        self._check_device()

    def _check_ks(self) -> None:
        ks = list(self.ks)
        if not ks:
            raise error("ks", "give at least one training-set size K")
        if min(ks) < 1:
            raise error("ks", f"training-set sizes must be >= 1, got {ks}")
        if len(set(ks)) != len(ks):
            raise error("ks", f"values must be unique, got {ks}")
        if ks != sorted(ks):
            raise error("ks", f"must be sorted ascending, got {ks}; write {sorted(ks)}")

    def _check_sizes(self) -> None:
        sizes = list(self.sizes)
        if not sizes:
            return
        if min(sizes) < 1 or len(set(sizes)) != len(sizes) or sizes != sorted(sizes):
            raise error("sizes", f"give distinct network sizes >= 1 in ascending order, got {sizes}")
        for i, size in enumerate(sizes):
            try:
                sized_network(self.network, size)
            except ValueError as e:
                raise error(f"sizes[{i}]", f"size {size} makes no valid {self.network.kind}: {e}") from None
        if self.run != "phase" and self.analyses.two_model.enabled:
            raise error(
                "analyses.two_model.enabled",
                "a study over sizes runs no two-model test (its table is per K only); set it false, set run: phase, "
                "or remove sizes",
            )

    def _check_two_model_ks(self, ks: tuple[int, ...] | None) -> None:
        for i, k in enumerate(ks or ()):
            if k not in self.ks:
                raise error(f"analyses.two_model.ks[{i}]", f"{k} is not one of ks {list(self.ks)}")
        if ks is not None and (not ks or list(ks) != sorted(set(ks))):
            raise error("analyses.two_model.ks", f"must be a non-empty ascending list without repeats, got {list(ks)}")

    def _check_device(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            device = None
        if device is None or device.type not in DEVICE_TYPES:
            raise error("device", f"use cpu, cuda or cuda:N, got {self.device!r}")
        gpus = self.executor.gpus_per_job
        if gpus > 0 and device.type == "cpu":
            raise error("executor.gpus_per_job", f"{gpus} GPUs per job, but device is 'cpu'; set 0 or device: cuda")
        if gpus == 0 and device.type == "cuda" and self.executor.kind == "ray":
            raise error(
                "executor.gpus_per_job", "Ray hides the GPUs from a job that asks for none; set it > 0 for device cuda"
            )

    # --- jobs -----------------------------------------------------------------------------------------------------

    def analysis_config(self) -> AnalysisConfig:
        """The sections every job's analysis reads (the same objects, not copies)."""
        return AnalysisConfig(
            sampling=self.sampling, metric=self.metric, classify=self.classify, analyses=self.analyses
        )

    def jobs(self) -> tuple[StudyJob, ...]:
        """Every (K, seed) trained on its nested set and classified, K ascending, then seeds in the
        given order (none under run 'two_model'); with sizes, all of them for each size in turn."""
        if self.run == "two_model":
            return ()
        return tuple(StudyJob(k, seed, size) for size in self.sizes or (None,) for k in self.ks for seed in self.seeds)

    @property
    def size_axis(self) -> str:
        """What a size sets, in words (SIZE_AXES)."""
        return SIZE_AXES[self.network.kind]

    def sized(self, size: int) -> StudyConfig:
        """The single-size study of this network size: its jobs are those of size `size` here, with the same
        settings and fingerprints."""
        if size not in self.sizes:
            raise ConfigError(f"size {size!r} is not one of this study's sizes {list(self.sizes)}", key="sizes")
        return replace(self, sizes=(), network=sized_network(self.network, size))

    def two_model_ks(self) -> tuple[int, ...]:
        """The Ks of the two-model test (empty when it is disabled)."""
        two = self.analyses.two_model
        return (two.ks or self.ks) if two.enabled and self.run != "phase" else ()

    def _check_job(self, k: int, seed: int) -> None:
        if self.sizes:
            raise ConfigError(
                f"this study sweeps sizes {list(self.sizes)}: take the job's settings from config.sized(size)",
                key="sizes",
            )
        if k not in self.ks:
            raise ConfigError(f"K={k!r} is not one of this study's ks {list(self.ks)}", key="ks")
        if seed not in self.seeds:
            raise ConfigError(f"seed {seed!r} is not one of this study's seeds {list(self.seeds)}", key="seeds")

    def train_config(self, k: int, seed: int, *, subset: str = "nested") -> TrainConfig:
        """The training configuration of job (k, seed); subset 'pair_a' / 'pair_b' for the two-model test."""
        self._check_job(k, seed)
        network = NetworkConfig(self.network.kind, mlp=plain(self.network.mlp), unet=plain(self.network.unet))
        return TrainConfig.for_run(
            self.train,
            data=self.data.name,
            data_options=dict(self.data.options),
            k=k,
            split_seed=self.split_seed,
            n_held_out=self.n_held_out,
            subset=subset,
            network=network,
            seed=seed,
        )

    def check_dataset_size(self, n: int) -> None:
        """Fail early when a dataset of n examples cannot hold the largest K (or the two-model test's
        2K) next to the n_held_out examples that no job trains on."""
        if self.n_held_out >= n:
            raise error("n_held_out", f"{self.n_held_out} leaves no training data in the {n} examples of the data")
        left = n - self.n_held_out
        if self.ks[-1] > left:
            raise error(
                "ks",
                f"K={self.ks[-1]} exceeds the {left} examples left after holding out {self.n_held_out} of {n}; "
                "lower the largest K or n_held_out",
            )
        two = self.two_model_ks()
        if two and 2 * two[-1] > left:
            raise error(
                "analyses.two_model.ks",
                f"the two-model test at K={two[-1]} needs 2K = {2 * two[-1]} examples but {left} are left after "
                f"holding out {self.n_held_out} of {n}; list smaller Ks under analyses.two_model.ks",
            )

    # --- serialisation and fingerprints ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Section.to_dict, without sizes when there are none: a single-size study reads as it always has."""
        d = super().to_dict()
        if not self.sizes:
            del d["sizes"]
        return d

    def to_yaml(self) -> str:
        """Sections as blocks in field order, lists on one line; yaml.safe_load reads it back to to_dict()."""
        return to_yaml(self.to_dict())

    def results_settings(self) -> dict:
        """The settings every result of the study depends on (see the module docstring for what is left out)."""
        d = self.to_dict()
        for name in ("name", "device", "executor"):
            del d[name]
        if self.sizes and self.network.kind == "mlp":
            del d["network"]["mlp"]["hidden"]  # every size sets it
        d["data"]["options"].pop("root", None)
        del d["sampling"]["batch_size"], d["train"]["log_every"], d["train"]["checkpoint_every"]
        if self.metric.name == "l2":
            d["metric"] = {"name": "l2"}
        else:
            del d["metric"]["weights_dir"]
        two = self.analyses.two_model
        if self.classify.calibration == "given":
            del d["classify"]["n_calibration_draws"]
            if not (two.enabled and two.delta is None):  # the two-model test calibrates with the quantile
                del d["classify"]["quantile"]
        if self.classify.rule == "threshold":
            del d["classify"]["ratio"]
        for name in self.analyses.to_dict():
            if name != "seed" and not getattr(self.analyses, name).enabled:
                d["analyses"][name] = {"enabled": False}
        if two.enabled:
            d["analyses"]["two_model"]["ks"] = list(self.two_model_ks())
        return {"fingerprint_version": FINGERPRINT_VERSION, **d}

    def job_settings(self, k: int, seed: int) -> dict:
        """The settings one job's results depend on: those of the study without the other Ks and seeds."""
        self._check_job(k, seed)
        d = self.results_settings()
        del d["ks"], d["seeds"], d["run"]  # a job computes the same under every run
        two = d["analyses"]["two_model"]
        if two["enabled"]:
            enabled = k in two.pop("ks")
            d["analyses"]["two_model"] = two if enabled else {"enabled": False}
        return {**d, "k": k, "seed": seed}

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of results_settings()."""
        return canonical_json_hash(self.results_settings())

    def job_fingerprint(self, k: int, seed: int) -> str:
        """sha256 of the canonical JSON of job_settings(k, seed): unchanged when other Ks or seeds are added."""
        return canonical_json_hash(self.job_settings(k, seed))


def format_resolved(config: StudyConfig) -> str:
    """The fully resolved config (every default filled in) as YAML, for --dry-run; loads back to the same config."""
    n_jobs = len(config.jobs())
    sizes = f"{len(config.sizes)} size(s) x " if config.sizes else ""
    header = (
        f"# study {config.name}: {n_jobs} job(s) ({sizes}{len(config.ks)} K x {len(config.seeds)} seed(s))\n"
        f"# fingerprint {config.fingerprint()}\n"
    )
    return header + config.to_yaml()


# --- reading files ---------------------------------------------------------------------------------------------------


def parse_study_config(text: str, *, fmt: str = "yaml", source: str = "<string>") -> StudyConfig:
    """The study config in `text` (fmt 'yaml', 'toml' or 'json'); errors name `source` and, for YAML,
    the line of the offending key."""
    data = parse_text(text, fmt, source)
    if data is None:
        raise ConfigError(f"{source}: the file is empty; a study needs at least ks and n_held_out")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (name, data, ks, ...), got {show(data)}"
        )
    try:
        return StudyConfig.from_dict(data)
    except ConfigError as e:
        line = yaml_line(text, e.key) if fmt == "yaml" and e.key else None
        raise ConfigError(f"{source}:{line}: {e}" if line else f"{source}: {e}", key=e.key) from None


def load_study_config(path: str | Path) -> StudyConfig:
    """Read a study config from a .yaml/.yml, .toml or .json file; a relative data.options.root is
    resolved against the file's folder (an absolute one is kept)."""
    text, fmt, source = read_config_file(path)
    config = parse_study_config(text, fmt=fmt, source=source)
    root = config.data.options.get("root")
    if root is None or Path(root).is_absolute():
        return config
    options = {**config.data.options, "root": str(Path(path).absolute().parent / root)}
    return replace(config, data=DataConfig(config.data.name, options))
