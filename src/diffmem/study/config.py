"""The configuration of a K sweep (SCIENCE.md §5-§7): one YAML, TOML or JSON file parsed into typed,
validated, frozen dataclasses.

A study trains one model per (K, seed) on the nested training set of size K, samples it, measures
nearest-neighbour distances, classifies the samples as memorized / spurious / generalized and runs
the enabled attractor analyses. Every problem is a ConfigError naming its key path, e.g.
``analyses.basins.p: must lie in (0, 1), got 1.5``; nothing is silently corrected.

Fingerprints hash what results depend on. Left out as pure execution settings: name, device,
executor, sampling.batch_size (a sample's noise depends on its seed only), train.log_every and
train.checkpoint_every (a resumed run equals an uninterrupted one), and the file locations
data.options.root and metric.weights_dir (the files there are assumed to be the same). Settings
that nothing reads are left out too: those of disabled analyses, the LPIPS options of the l2
metric, n_calibration_draws (and quantile, unless the two-model test calibrates its delta) when
calibration is 'given', and ratio under rule 'threshold'.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import inspect
import json
import math
import re
import reprlib
import tomllib
import types
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Self, get_args, get_origin, get_type_hints

import torch
import yaml

from diffmem.core import SAMPLERS, VPSchedule, schedule_from_dict
from diffmem.io.data import DATASETS, FILE_DATASETS, dataset_options
from diffmem.models.nets import NETWORKS, MLPConfig, NetworkConfig, UNetConfig
from diffmem.models.train import TrainConfig

METRICS = ("l2", "lpips")
LPIPS_NETS = ("alex", "vgg")
CALIBRATIONS = ("held_out", "given")  # thresholds left null are calibrated from held-out images | all given
RULES = ("threshold", "ratio")  # memorized test: m <= delta_m | m / m2 < ratio
EXECUTORS = ("local", "pool", "ray")
DEVICE_TYPES = ("cpu", "cuda")
FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
FINGERPRINT_VERSION = 1  # bump when the meaning of a fingerprinted setting changes
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes at most 64 bits
MAX_TIMESTEPS = 100_000  # a sanity bound on T (DDPM uses 1000): the schedule is built while validating
# network fields that build_network fills in from the data and the schedule
NETWORK_FROM_DATA = {"mlp": ("dim", "num_train_timesteps"), "unet": ("in_channels", "sample_size")}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ConfigError(ValueError):
    """An invalid study configuration. `key` is the offending key path (e.g. 'train.lr') when known."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _error(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {problem}", key=key)


_REPR = reprlib.Repr()  # bounded: a value in a message is never printed whole
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 8, 4, 2


def _show(value: Any) -> str:
    return f"{_REPR.repr(value)} ({type(value).__name__})"


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _mapping(value: Any, key: str) -> Mapping:
    where = key or "top level"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {_show(value)}", key=key or None)
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: keys must be strings, got {_show(name)}", key=key or None)
    return value


def _reraise(key: str, names, e: ValueError) -> ConfigError:
    """A ValueError of a checked class (TrainConfig, MLPConfig, ...) as a ConfigError prefixed with the
    section's key path; its key names the field when the message names exactly one."""
    message = str(e).removeprefix(f"{key.rpartition('.')[2]}: ")
    named = [n for n in names if re.search(rf"(?<![A-Za-z0-9_]){n}(?![A-Za-z0-9_])", message)]
    return ConfigError(f"{key}: {message}", key=_join(key, named[0]) if len(named) == 1 else key)


def _check_keys(d: Mapping, allowed: list[str], key: str) -> None:
    for name in d:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise _error(_join(key, name), f"unknown key{hint}; allowed: {', '.join(allowed)}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """value checked against a field's type (bool is not a number; ints are accepted as floats)."""
    if isinstance(hint, type) and issubclass(hint, _Section):
        return value if isinstance(value, hint) else hint.from_dict(_mapping(value, key))
    if hint is NetworkConfig:
        return _network(value)
    if get_origin(hint) is types.UnionType:  # X | None
        if value is None:
            return None
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return _coerce(value, inner, key)
    if get_origin(hint) is tuple:  # tuple[X, ...], written as a list
        item = get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise _error(key, f"expected a list of {_WHAT[item]}s, got {_show(value)}")
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is dict:
        return dict(_mapping(value, key))
    if hint is bool:
        if not isinstance(value, bool):
            raise _error(key, f"expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(key, f"expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _error(key, f"expected a number, got {_show(value)}{_yaml_number_hint(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise _error(key, f"number too large: {_show(value)}") from None
        if not math.isfinite(number):
            raise _error(key, f"expected a finite number, got {value}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise _error(key, f"expected a string, got {_show(value)}")
        return value
    raise TypeError(f"{key}: no check for the field type {hint!r}")


_WHAT = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _yaml_number_hint(value: Any) -> str:
    """YAML 1.1 (PyYAML) reads 1e-3 as text: only 1.0e-3 is a float."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return "; write it with a decimal point and a signed exponent, e.g. 1.0e-3, for YAML to read a number"
    return ""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _in_range(key: str, value: float, *, low: float | None = None, high: float | None = None, closed=(True, True)):
    """Fail unless low <= value <= high (or < where that end of `closed` is False)."""
    lo_ok = low is None or (value >= low if closed[0] else value > low)
    hi_ok = high is None or (value <= high if closed[1] else value < high)
    if lo_ok and hi_ok:
        return
    if high is None:
        raise _error(key, f"must be {'>=' if closed[0] else '>'} {low}, got {value}")
    if low is None:
        raise _error(key, f"must be {'<=' if closed[1] else '<'} {high}, got {value}")
    interval = f"{'[' if closed[0] else '('}{low}, {high}{']' if closed[1] else ')'}"
    raise _error(key, f"must lie in {interval}, got {value}")


def _choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise _error(key, f"unknown value {value!r}; choose one of {', '.join(allowed)}")


def _plain(value: Any) -> Any:
    """JSON/YAML form: sections as dicts, tuples as lists."""
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, NetworkConfig):
        return {"kind": value.kind, value.kind: _plain(getattr(value, value.kind))}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Section:
    """A frozen config section: fields are type-checked from their annotations, then `_check`ed.
    `_key` is the section's key path in the file ('' for the top level)."""

    _key = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self._at(f.name)))
        self._check()

    def _check(self) -> None:
        pass

    @classmethod
    def _at(cls, name: str) -> str:
        return _join(cls._key, name)

    @classmethod
    def from_dict(cls, d: Mapping) -> Self:
        d = _mapping(d, cls._key)
        _check_keys(d, [f.name for f in fields(cls)], cls._key)
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in d:
                raise _error(cls._at(f.name), "required key missing")
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


# --- sections --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig(_Section):
    _key = "data"
    name: str = "digits"  # a dataset of diffmem.io.data.DATASETS
    options: dict = field(default_factory=dict)  # load_dataset options, e.g. root for file datasets

    def _check(self) -> None:
        _choice(self._at("name"), self.name, tuple(DATASETS))
        params = inspect.signature(DATASETS[self.name]).parameters
        allowed = list(dataset_options(self.name)) + (["root"] if self.name in FILE_DATASETS else [])
        options = {}
        for name, value in self.options.items():
            key = self._at(f"options.{name}")
            if name == "root" and self.name not in FILE_DATASETS:
                raise _error(key, f"data.name {self.name!r} is built in and reads no files; remove root")
            if name not in allowed:
                takes = f"allowed: {', '.join(allowed)}" if allowed else "it takes none"
                raise _error(key, f"unknown option for data.name {self.name!r}; {takes}")
            hint = str if name == "root" else type(params[name].default)  # the loader's default says the type
            if hint not in _WHAT:
                raise _error(key, f"the option {name!r} cannot be set from a config file")
            options[name] = _coerce(value, hint, key)
        if self.name in FILE_DATASETS and "root" not in options:
            raise _error(
                self._at("options.root"),
                f"data.name {self.name!r} is read from files you provide (nothing is downloaded): "
                f"set root to {FILE_DATASETS[self.name]}",
            )
        object.__setattr__(self, "options", options)


@dataclass(frozen=True)
class TrainOptions(_Section):
    """TrainConfig's fields that are the same for every job (its defaults); data, k, split_seed,
    n_held_out, network and seed come from the rest of the study."""

    _key = "train"
    prediction_type: str = "epsilon"  # 'epsilon' (DDPM) or 'sample' (x0)
    schedule: dict = field(default_factory=lambda: VPSchedule().to_dict())  # VP (DDPM) schedule
    steps: int = 2000  # optimizer steps, the same for every K
    batch_size: int = 128
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    lr_schedule: str = "constant"  # after warm-up: 'constant' or 'cosine'
    grad_clip: float = 1.0  # max global gradient norm
    ema_decay: float = 0.999
    loss_buckets: int = 10  # noise-level buckets of the logged loss
    log_every: int = 100
    checkpoint_every: int = 0  # 0: only at the end

    def _check(self) -> None:
        object.__setattr__(self, "schedule", _vp_schedule(self.schedule, self._at("schedule")))
        _in_range(self._at("weight_decay"), self.weight_decay, low=0)
        try:
            TrainConfig(**self._train_fields())
        except ValueError as e:
            raise _reraise("train", [f.name for f in fields(self)], e) from None

    def _train_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"schedule": dict(self.schedule)}


def _vp_schedule(value: Mapping, key: str) -> dict:
    """The resolved VP schedule dict (defaults filled in); training needs a VP schedule."""
    d = dict(_mapping(value, key))
    kind = d.pop("type", "vp")
    if kind != "vp":
        raise _error(f"{key}.type", f"training uses a VP (DDPM) schedule: set type: vp, got {_show(kind)}")
    init = [f for f in fields(VPSchedule) if f.init]
    _check_keys(d, ["type"] + [f.name for f in init], key)
    hints = _hints(VPSchedule)
    d = {name: _coerce(v, hints[name], f"{key}.{name}") for name, v in d.items()}
    if d.get("num_train_timesteps", 0) > MAX_TIMESTEPS:
        raise _error(f"{key}.num_train_timesteps", f"must be <= {MAX_TIMESTEPS}, got {d['num_train_timesteps']}")
    try:
        return schedule_from_dict({"type": "vp", **d}).to_dict()
    except ValueError as e:
        raise _reraise(key, [f.name for f in init], e) from None


def _network(value: Any) -> NetworkConfig:
    """NetworkConfig with its active kind's options resolved (defaults filled in, as JSON lists)."""
    if isinstance(value, NetworkConfig):
        value = asdict(value)
    d = _mapping(value, "network")
    _check_keys(d, ["kind", "mlp", "unet"], "network")
    kind = _coerce(d.get("kind", "mlp"), str, "network.kind")
    _choice("network.kind", kind, NETWORKS)
    other = "unet" if kind == "mlp" else "mlp"
    if d.get(other):
        raise _error(f"network.{other}", f"given, but network.kind is {kind!r}; remove it or set network.kind: {other}")
    key = f"network.{kind}"
    given = _mapping(d.get(kind, {}), key)
    cls = MLPConfig if kind == "mlp" else UNetConfig
    for name in NETWORK_FROM_DATA[kind]:
        if name in given:
            raise _error(f"{key}.{name}", "set from the data and the noise schedule; remove it")
    allowed = [f for f in fields(cls) if f.name not in NETWORK_FROM_DATA[kind]]
    _check_keys(given, [f.name for f in allowed], key)
    hints = _hints(cls)
    options = {f.name: _coerce(given.get(f.name, f.default), hints[f.name], f"{key}.{f.name}") for f in allowed}
    if kind == "unet":
        for name in ("layers_per_block", "norm_num_groups"):
            _in_range(f"{key}.{name}", options[name], low=1)
        if not options["block_out_channels"] or min(options["block_out_channels"]) < 1:
            raise _error(
                f"{key}.block_out_channels", f"needs positive channel counts, got {options['block_out_channels']}"
            )
    placeholders = {"dim": 1, "num_train_timesteps": 1} if kind == "mlp" else {}
    try:
        cls(**placeholders, **options)
    except ValueError as e:
        raise _reraise(key, list(options), e) from None
    return NetworkConfig(kind=kind, **{kind: _plain(options)})


@dataclass(frozen=True)
class SamplingConfig(_Section):
    _key = "sampling"
    sampler: str = "ddim"  # a sampler of diffmem.core.SAMPLERS
    steps: int = 50  # noise levels of the sampling grid
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 DDPM ancestral (ddim only)
    n_samples: int = 512  # N per job; a spurious basin is seen once it receives two samples
    batch_size: int = 1024  # samples per denoiser call (does not change the samples)
    seed: int = 0  # sample i starts from the noise of seed * 1_000_003 + i

    def _check(self) -> None:
        _choice(self._at("sampler"), self.sampler, tuple(SAMPLERS))
        _in_range(self._at("steps"), self.steps, low=1)
        _in_range(self._at("eta"), self.eta, low=0, high=1)
        if self.eta and self.sampler != "ddim":
            raise _error(self._at("eta"), "only the ddim sampler takes eta; set eta: 0 or sampler: ddim")
        if self.n_samples < 2:
            raise _error(self._at("n_samples"), f"the spurious test compares samples: need >= 2, got {self.n_samples}")
        _in_range(self._at("batch_size"), self.batch_size, low=1)
        # sample i uses seed * 1_000_003 + i, which must stay a 64-bit seed
        _in_range(self._at("seed"), self.seed, low=0, high=(MAX_SEED - self.n_samples) // 1_000_003)


@dataclass(frozen=True)
class MetricConfig(_Section):
    _key = "metric"
    name: str = "l2"  # 'l2' (pixel L2 / sqrt(D)) or 'lpips'
    lpips_net: str = "alex"  # LPIPS backbone: 'alex' or 'vgg'
    weights_dir: str | None = None  # LPIPS weight files; null: $DIFFMEM_WEIGHTS or ~/.cache/diffmem/weights
    resize: int | None = None  # upsample small images to this side before LPIPS; null: as they are

    def _check(self) -> None:
        _choice(self._at("name"), self.name, METRICS)
        _choice(self._at("lpips_net"), self.lpips_net, LPIPS_NETS)
        if self.resize is not None:
            _in_range(self._at("resize"), self.resize, low=1)


@dataclass(frozen=True)
class ClassifyConfig(_Section):
    """Memorized / spurious / generalized (SCIENCE.md §5), the parameters of classify.PhaseClassifier."""

    _key = "classify"
    delta_m: float | None = None  # memorized iff m <= delta_m; null: calibrated
    delta_s: float | None = None  # spurious iff not memorized and s <= delta_s; null: calibrated
    calibration: str = "held_out"  # 'held_out': thresholds left null come from held-out images; 'given'
    quantile: float = 0.05  # share of held-out images under a calibrated threshold
    n_calibration_draws: int = 20  # held-out subsets of size N averaged for delta_s
    rule: str = "threshold"  # memorized test: 'threshold' (m <= delta_m) or 'ratio' (m / m2 < ratio)
    ratio: float = 1 / 3  # nearest over second-nearest training distance, rule 'ratio'
    n_bootstrap: int = 1000  # resamples of the fractions' confidence intervals
    confidence: float = 0.95  # level of those intervals
    seed: int = 0  # calibration draws and bootstrap resamples

    def _check(self) -> None:
        for name in ("delta_m", "delta_s"):
            if getattr(self, name) is not None:
                _in_range(self._at(name), getattr(self, name), low=0, closed=(False, True))
        _choice(self._at("calibration"), self.calibration, CALIBRATIONS)
        _choice(self._at("rule"), self.rule, RULES)
        _in_range(self._at("quantile"), self.quantile, low=0, high=1, closed=(False, False))
        _in_range(self._at("n_calibration_draws"), self.n_calibration_draws, low=1)
        _in_range(self._at("ratio"), self.ratio, low=0, high=1, closed=(False, False))
        _in_range(self._at("n_bootstrap"), self.n_bootstrap, low=1)
        _in_range(self._at("confidence"), self.confidence, low=0, high=1, closed=(False, False))
        _in_range(self._at("seed"), self.seed, low=0, high=MAX_SEED)
        if self.rule == "ratio" and self.delta_m is not None:
            raise _error(self._at("delta_m"), "classify.rule 'ratio' uses no delta_m; remove it or set rule: threshold")
        needed = [n for n in ("delta_m", "delta_s") if n in self.thresholds_used() and getattr(self, n) is None]
        if self.calibration == "given" and needed:
            raise _error(
                self._at(needed[0]),
                f"classify.rule {self.rule!r} with calibration 'given' needs {needed[0]}; give it or set "
                "calibration: held_out",
            )
        if self.calibration == "held_out" and not needed:
            raise _error(
                self._at("calibration"),
                f"'held_out' calibrates the thresholds left null, but {' and '.join(self.thresholds_used())} "
                f"(all that classify.rule {self.rule!r} uses) are given; set calibration: given",
            )

    def thresholds_used(self) -> tuple[str, ...]:
        return ("delta_m", "delta_s") if self.rule == "threshold" else ("delta_s",)


@dataclass(frozen=True)
class BasinsConfig(_Section):
    """Critical noise level of each point: noise it, denoise back, recovered within delta (SCIENCE.md §6)."""

    _key = "analyses.basins"
    enabled: bool = False
    n_points: int = 32  # points per class
    n_trials: int = 10  # noise draws per point and level
    p: float = 0.9  # recovery probability that defines the basin
    delta: float = 0.1  # recovered iff distance(result, x) <= delta, in the metric's units
    steps: int = 20  # DDIM steps of one recovery

    def _check(self) -> None:
        for name in ("n_points", "n_trials", "steps"):
            _in_range(self._at(name), getattr(self, name), low=1)
        _in_range(self._at("p"), self.p, low=0, high=1, closed=(False, False))
        _in_range(self._at("delta"), self.delta, low=0, closed=(False, True))


@dataclass(frozen=True)
class EnergyConfig(_Section):
    """Relative energies by Gauss-Legendre quadrature of the learned score along paths (SCIENCE.md §6)."""

    _key = "analyses.energy"
    enabled: bool = False
    n_points: int = 32  # points per class
    n_nodes: int = 32  # Gauss-Legendre nodes per path
    sigma: float = 0.2  # noise level of the energy

    def _check(self) -> None:
        _in_range(self._at("n_points"), self.n_points, low=1)
        _in_range(self._at("n_nodes"), self.n_nodes, low=2)
        _in_range(self._at("sigma"), self.sigma, low=0, closed=(False, True))


@dataclass(frozen=True)
class CurvatureConfig(_Section):
    """Spectrum of the Hessian of -log p, (I - J_D) / sigma^2 (SCIENCE.md §6)."""

    _key = "analyses.curvature"
    enabled: bool = False
    n_points: int = 32  # points per class
    k: int = 16  # top and bottom eigenvalues when D is too large for the full spectrum
    sigma: float = 0.2

    def _check(self) -> None:
        _in_range(self._at("n_points"), self.n_points, low=1)
        _in_range(self._at("k"), self.k, low=1)
        _in_range(self._at("sigma"), self.sigma, low=0, closed=(False, True))


@dataclass(frozen=True)
class CensusConfig(_Section):
    """Fixed points of x <- D(x, sigma) from many starts, labelled memory / spurious / saddle (SCIENCE.md §6)."""

    _key = "analyses.census"
    enabled: bool = False
    sigma: float = 0.2
    n_starts: int = 200

    def _check(self) -> None:
        _in_range(self._at("sigma"), self.sigma, low=0, closed=(False, True))
        _in_range(self._at("n_starts"), self.n_starts, low=1)


@dataclass(frozen=True)
class CollapseConfig(_Section):
    """Noise level at which sampling trajectories commit to one training example (SCIENCE.md §4)."""

    _key = "analyses.collapse"
    enabled: bool = False
    n_samples: int = 256

    def _check(self) -> None:
        _in_range(self._at("n_samples"), self.n_samples, low=1)


@dataclass(frozen=True)
class TwoModelConfig(_Section):
    """Two models on disjoint training sets of size K, sampled from the same noise (SCIENCE.md §6)."""

    _key = "analyses.two_model"
    enabled: bool = False
    n_samples: int = 256
    delta: float | None = None  # 'the same image' within delta; null: the held-out calibration of delta_m
    ks: tuple[int, ...] | None = None  # the Ks to test (2K examples each); null: every K of the study

    def _check(self) -> None:
        _in_range(self._at("n_samples"), self.n_samples, low=1)
        if self.delta is not None:
            _in_range(self._at("delta"), self.delta, low=0, closed=(False, True))


@dataclass(frozen=True)
class AnalysesConfig(_Section):
    _key = "analyses"
    basins: BasinsConfig = field(default_factory=BasinsConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    curvature: CurvatureConfig = field(default_factory=CurvatureConfig)
    census: CensusConfig = field(default_factory=CensusConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    two_model: TwoModelConfig = field(default_factory=TwoModelConfig)
    seed: int = 0  # point selection and every random draw of the analyses

    def _check(self) -> None:
        _in_range(self._at("seed"), self.seed, low=0, high=MAX_SEED)

    def enabled(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if f.name != "seed" and getattr(self, f.name).enabled)


@dataclass(frozen=True)
class ExecutorConfig(_Section):
    """Where jobs run: 'local' (one after another in this process), 'pool' (local worker processes)
    or 'ray' (a Ray cluster; address null starts a local one)."""

    _key = "executor"
    kind: str = "local"
    workers: int = 1  # jobs at once (pool, ray)
    address: str | None = None  # Ray cluster address (ray only)
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0  # fractions share a GPU (ray)

    def _check(self) -> None:
        _choice(self._at("kind"), self.kind, EXECUTORS)
        _in_range(self._at("workers"), self.workers, low=1)
        if self.kind == "local" and self.workers != 1:
            raise _error(
                self._at("workers"),
                f"executor.kind 'local' runs one job at a time; set workers: 1 or kind: pool, got {self.workers}",
            )
        if self.address is not None and self.kind != "ray":
            raise _error(self._at("address"), f"only executor.kind 'ray' connects to an address, got {self.kind!r}")
        _in_range(self._at("cpus_per_job"), self.cpus_per_job, low=0, closed=(False, True))
        _in_range(self._at("gpus_per_job"), self.gpus_per_job, low=0)


@dataclass(frozen=True)
class StudyJob:
    """One training job of a study: the nested training set of size k, trained with seed."""

    k: int
    seed: int


@dataclass(frozen=True, kw_only=True)
class StudyConfig(_Section):
    """A K sweep: for each K in ks and each training seed, one model on the nested training set of size K."""

    name: str = "study"  # a label, safe as a directory name
    data: DataConfig = field(default_factory=DataConfig)
    ks: tuple[int, ...]  # training-set sizes, ascending
    seeds: tuple[int, ...] = (0,)  # training seeds: one job per (K, seed)
    split_seed: int = 0  # seed of the permutation shared by every K (nested training sets)
    n_held_out: int = 0  # examples at the far end of that permutation, never trained on
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainOptions = field(default_factory=TrainOptions)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    analyses: AnalysesConfig = field(default_factory=AnalysesConfig)
    device: str = "cpu"  # cpu, cuda or cuda:N
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def _check(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise _error("name", f"use letters, digits, '.', '_' and '-' (a directory name), got {self.name!r}")
        self._check_ks()
        if not self.seeds:
            raise _error("seeds", "give at least one training seed")
        for i, seed in enumerate(self.seeds):
            _in_range(f"seeds[{i}]", seed, low=0, high=MAX_SEED)
        if len(set(self.seeds)) != len(self.seeds):
            raise _error("seeds", f"values must be unique, got {list(self.seeds)}")
        _in_range("split_seed", self.split_seed, low=0, high=MAX_SEED)
        _in_range("n_held_out", self.n_held_out, low=0)
        if self.classify.calibration == "held_out" and self.n_held_out < 2:
            raise _error(
                "classify.calibration",
                f"'held_out' calibration needs held-out images: set n_held_out >= 2 (got {self.n_held_out}) "
                "or give the thresholds and set calibration: given",
            )
        two = self.analyses.two_model
        if two.enabled and two.delta is None and self.n_held_out < 2:
            raise _error(
                "analyses.two_model.delta",
                f"null calibrates it from held-out images: set n_held_out >= 2 (got {self.n_held_out}) or give delta",
            )
        for i, k in enumerate(two.ks or ()):
            if k not in self.ks:
                raise _error(f"analyses.two_model.ks[{i}]", f"{k} is not one of ks {list(self.ks)}")
        if two.ks is not None and (not two.ks or list(two.ks) != sorted(set(two.ks))):
            raise _error(
                "analyses.two_model.ks", f"must be a non-empty ascending list without repeats, got {list(two.ks)}"
            )
        self._check_device()

    def _check_ks(self) -> None:
        ks = list(self.ks)
        if not ks:
            raise _error("ks", "give at least one training-set size K")
        if min(ks) < 1:
            raise _error("ks", f"training-set sizes must be >= 1, got {ks}")
        if len(set(ks)) != len(ks):
            raise _error("ks", f"values must be unique, got {ks}")
        if ks != sorted(ks):
            raise _error("ks", f"must be sorted ascending, got {ks}; write {sorted(ks)}")

    def _check_device(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            device = None
        if device is None or device.type not in DEVICE_TYPES:
            raise _error("device", f"use cpu, cuda or cuda:N, got {self.device!r}")
        gpus = self.executor.gpus_per_job
        if gpus > 0 and device.type == "cpu":
            raise _error("executor.gpus_per_job", f"{gpus} GPUs per job, but device is 'cpu'; set 0 or device: cuda")
        if gpus == 0 and device.type == "cuda" and self.executor.kind == "ray":
            raise _error(
                "executor.gpus_per_job", "Ray hides the GPUs from a job that asks for none; set it > 0 for device cuda"
            )

    # --- jobs -----------------------------------------------------------------------------------------------------

    def jobs(self) -> tuple[StudyJob, ...]:
        """Every (K, seed) of the study, K ascending, then seeds in the given order."""
        return tuple(StudyJob(k, seed) for k in self.ks for seed in self.seeds)

    def two_model_ks(self) -> tuple[int, ...]:
        """The Ks of the two-model test (empty when it is disabled)."""
        two = self.analyses.two_model
        return (two.ks or self.ks) if two.enabled else ()

    def _check_job(self, k: int, seed: int) -> None:
        if k not in self.ks:
            raise ConfigError(f"K={k!r} is not one of this study's ks {list(self.ks)}", key="ks")
        if seed not in self.seeds:
            raise ConfigError(f"seed {seed!r} is not one of this study's seeds {list(self.seeds)}", key="seeds")

    def train_config(self, k: int, seed: int, *, subset: str = "nested") -> TrainConfig:
        """The training configuration of job (k, seed); subset 'pair_a' / 'pair_b' for the two-model test."""
        self._check_job(k, seed)
        network = NetworkConfig(self.network.kind, mlp=_plain(self.network.mlp), unet=_plain(self.network.unet))
        return TrainConfig(
            data=self.data.name,
            data_options=dict(self.data.options),
            k=k,
            split_seed=self.split_seed,
            n_held_out=self.n_held_out,
            subset=subset,
            network=network,
            seed=seed,
            **self.train._train_fields(),
        )

    def check_dataset_size(self, n: int) -> None:
        """Fail early when a dataset of n examples cannot hold the largest K (or the two-model test's
        2K) next to the n_held_out examples that no job trains on."""
        if self.n_held_out >= n:
            raise _error("n_held_out", f"{self.n_held_out} leaves no training data in the {n} examples of the data")
        left = n - self.n_held_out
        if self.ks[-1] > left:
            raise _error(
                "ks",
                f"K={self.ks[-1]} exceeds the {left} examples left after holding out {self.n_held_out} of {n}; "
                "lower the largest K or n_held_out",
            )
        two = self.two_model_ks()
        if two and 2 * two[-1] > left:
            raise _error(
                "analyses.two_model.ks",
                f"the two-model test at K={two[-1]} needs 2K = {2 * two[-1]} examples but {left} are left after "
                f"holding out {self.n_held_out} of {n}; list smaller Ks under analyses.two_model.ks",
            )

    # --- serialisation and fingerprints ---------------------------------------------------------------------------

    def to_yaml(self) -> str:
        """Sections as blocks in field order, lists on one line; yaml.safe_load reads it back to to_dict()."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)

    def results_settings(self) -> dict:
        """The settings every result of the study depends on (see the module docstring for what is left out)."""
        d = self.to_dict()
        for name in ("name", "device", "executor"):
            del d[name]
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
        del d["ks"], d["seeds"]
        two = d["analyses"]["two_model"]
        if two["enabled"]:
            enabled = k in two.pop("ks")
            d["analyses"]["two_model"] = two if enabled else {"enabled": False}
        return {**d, "k": k, "seed": seed}

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of results_settings()."""
        return _sha256(self.results_settings())

    def job_fingerprint(self, k: int, seed: int) -> str:
        """sha256 of the canonical JSON of job_settings(k, seed): unchanged when other Ks or seeds are added."""
        return _sha256(self.job_settings(k, seed))


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(list, lambda dumper, v: dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _sha256(settings: dict) -> str:
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def format_resolved(config: StudyConfig) -> str:
    """The fully resolved config (every default filled in) as YAML, for --dry-run; loads back to the same config."""
    n_jobs = len(config.jobs())
    header = (
        f"# study {config.name}: {n_jobs} job(s) ({len(config.ks)} K x {len(config.seeds)} seed(s))\n"
        f"# fingerprint {config.fingerprint()}\n"
    )
    return header + config.to_yaml()


# --- reading files ---------------------------------------------------------------------------------------------------


def parse_study_config(text: str, *, fmt: str = "yaml", source: str = "<string>") -> StudyConfig:
    """The study config in `text` (fmt 'yaml', 'toml' or 'json'); errors name `source` and, for YAML,
    the line of the offending key."""
    data = _parse_text(text, fmt, source)
    if data is None:
        raise ConfigError(f"{source}: the file is empty; a study needs at least ks and n_held_out")
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (name, data, ks, ...), got {_show(data)}"
        )
    try:
        return StudyConfig.from_dict(data)
    except ConfigError as e:
        line = _yaml_line(text, e.key) if fmt == "yaml" and e.key else None
        raise ConfigError(f"{source}:{line}: {e}" if line else f"{source}: {e}", key=e.key) from None


def _parse_text(text: str, fmt: str, source: str) -> Any:
    if fmt == "yaml":
        try:
            return yaml.safe_load(text)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
            raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:  # e.g. the date 2024-13-01
            raise ConfigError(f"{source}: invalid YAML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    if fmt == "toml":
        try:
            return tomllib.loads(text)
        except ValueError as e:  # TOMLDecodeError, or an integer too long to convert
            raise ConfigError(f"{source}: invalid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{source}: invalid TOML: nested too deeply") from None
    if fmt == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        except ValueError as e:  # an integer too long to convert
            raise ConfigError(f"{source}: invalid JSON: {e}") from None
        except RecursionError:
            raise ConfigError(f"{source}: invalid JSON: nested too deeply") from None
    raise ConfigError(f"{source}: unknown config format {fmt!r}; choose one of yaml, toml, json")


def _yaml_line(text: str, key: str) -> int | None:
    """1-based line of the key path (or its nearest listed parent) in the YAML text."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return None
    lines: dict[str, int] = {}
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        path, node = stack.pop()
        if node is None or id(node) in seen:  # aliases share nodes
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    sub = _join(path, k.value)
                    lines.setdefault(sub, k.start_mark.line + 1)
                    stack.append((sub, v))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines.setdefault(f"{path}[{i}]", v.start_mark.line + 1)
                stack.append((f"{path}[{i}]", v))
    while key:
        if key in lines:
            return lines[key]
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key)
        key = parent if parent != key else ""
    return None


def load_study_config(path: str | Path) -> StudyConfig:
    """Read a study config from a .yaml/.yml (yaml.safe_load), .toml or .json file."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use .yaml, .yml, .toml or .json")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    return parse_study_config(text, fmt=fmt, source=str(path))
