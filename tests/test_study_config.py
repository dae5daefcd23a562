"""The study config: typed sections, loud errors with key paths, round trips and fingerprints."""

import copy
import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffmem.core import VPSchedule
from diffmem.models.nets import NetworkConfig
from diffmem.models.train import TrainConfig, TrainOptions
from diffmem.study.config import (
    ConfigError,
    StudyConfig,
    StudyJob,
    format_resolved,
    load_study_config,
    parse_study_config,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits-study.yaml"
MINIMAL = {"ks": [8, 32], "n_held_out": 10}


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def study(**overrides) -> StudyConfig:
    return StudyConfig.from_dict({**MINIMAL, **overrides})


# --- the example and the defaults -------------------------------------------------------------------------------------


def test_example_holds_the_digits_sweep():
    c = load_study_config(EXAMPLE)
    assert c.name == "digits-study" and c.data.name == "digits" and c.data.options == {}
    assert c.ks == (8, 32, 128, 512, 1500) and c.seeds == (0,) and c.n_held_out == 297
    assert c.network.kind == "mlp"
    assert {k: c.network.mlp[k] for k in ("hidden", "depth", "embedding")} == {
        "hidden": 512,
        "depth": 4,
        "embedding": "sinusoidal",
    }
    t = c.train
    assert (t.prediction_type, t.steps, t.batch_size, t.lr, t.warmup_steps, t.lr_schedule, t.ema_decay) == (
        "sample",
        6000,
        128,
        1e-3,
        200,
        "cosine",
        0.999,
    )
    assert (c.sampling.sampler, c.sampling.steps, c.sampling.n_samples, c.sampling.eta) == ("ddim", 50, 512, 0.0)
    assert c.analyses.enabled() == ("basins", "energy", "curvature")
    assert c.jobs() == tuple(StudyJob(k, 0) for k in (8, 32, 128, 512, 1500))
    c.check_dataset_size(1797)  # the digits (SCIENCE.md §8): K = 1500 is exactly what 1797 - 297 leaves
    with pytest.raises(ConfigError, match=r"^ks: K=1500 exceeds the 1499 examples left"):
        c.check_dataset_size(1796)


def test_example_job_trains_like_the_memorization_command():
    tc = load_study_config(EXAMPLE).train_config(1500, 0)
    # the configuration `diffmem memorization` builds, with the network's defaults written out
    ref = TrainConfig(
        data="digits",
        k=1500,
        n_held_out=297,
        steps=6000,
        lr_schedule="cosine",
        warmup_steps=200,
        network=NetworkConfig("mlp", {"hidden": 512, "depth": 4}),
    )
    got, want = tc.to_dict(), ref.to_dict()
    assert got.pop("network") == {
        "kind": "mlp",
        "mlp": {"hidden": 512, "depth": 4, "embedding": "sinusoidal", "emb_dim": 64, "fourier_scale": 16.0},
    }
    want.pop("network")
    assert got == want
    assert TrainConfig.from_dict(json.loads(json.dumps(tc.to_dict()))) == tc


def test_train_options_mirror_train_config():
    study_set = {"data", "data_options", "k", "split_seed", "n_held_out", "subset", "network", "seed"}
    options = {f.name for f in dataclasses.fields(TrainOptions)}
    assert options | study_set == {f.name for f in dataclasses.fields(TrainConfig)}
    assert not options & study_set
    defaults, ref = TrainOptions(), TrainConfig()
    for name in options:
        assert getattr(defaults, name) == getattr(ref, name), name


def test_minimal_config_resolves_every_default():
    c = study()
    d = c.to_dict()
    assert d["train"]["schedule"] == VPSchedule().to_dict()
    assert d["network"] == {
        "kind": "mlp",
        "mlp": {"hidden": 256, "depth": 3, "embedding": "sinusoidal", "emb_dim": 64, "fourier_scale": 16.0},
    }
    assert d["classify"]["calibration"] == "held_out" and d["executor"]["kind"] == "local"
    assert StudyConfig.from_dict(d) == c
    text = format_resolved(c)
    assert text.startswith("# study study: 2 job(s)") and c.fingerprint() in text
    assert yaml.safe_load(text) == d
    assert parse_study_config(text) == c


def test_direct_construction_is_checked_and_frozen():
    c = StudyConfig(ks=(4, 16), n_held_out=5, network=NetworkConfig("unet", unet={"block_out_channels": (16, 32)}))
    assert c.network.unet["block_out_channels"] == [16, 32] and c.network.unet["norm_num_groups"] == 8
    assert c == StudyConfig.from_dict(c.to_dict())
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.ks = (1,)
    with pytest.raises(ConfigError, match=r"^network\.unet\.in_channels: set from the data"):
        StudyConfig(ks=(4,), n_held_out=5, network=NetworkConfig("unet", unet={"in_channels": 3}))


def test_train_config_of_a_job():
    c = study(
        seeds=[3, 1], split_seed=7, train={"steps": 50, "warmup_steps": 5, "schedule": {"num_train_timesteps": 100}}
    )
    tc = c.train_config(32, 1, subset="pair_b")
    assert (tc.k, tc.seed, tc.split_seed, tc.n_held_out, tc.subset, tc.steps) == (32, 1, 7, 10, "pair_b", 50)
    assert tc.schedule["num_train_timesteps"] == 100 and tc.schedule["type"] == "vp"
    tc.data_options["x"] = 1  # a copy: the frozen study config is untouched
    assert c.data.options == {}
    with pytest.raises(ConfigError, match=r"K=16 is not one of this study's ks \[8, 32\]"):
        c.train_config(16, 1)
    with pytest.raises(ConfigError, match=r"seed 0 is not one of this study's seeds \[3, 1\]"):
        c.job_fingerprint(8, 0)
    assert [(j.k, j.seed) for j in c.jobs()] == [(8, 3), (8, 1), (32, 3), (32, 1)]


def test_check_dataset_size():
    c = study(ks=[8, 100], analyses={"two_model": {"enabled": True, "ks": [8, 100]}})
    with pytest.raises(ConfigError, match=r"^n_held_out: 10 leaves no training data"):
        c.check_dataset_size(10)
    with pytest.raises(ConfigError, match=r"^ks: K=100 exceeds the 90 examples left after holding out 10 of 100"):
        c.check_dataset_size(100)
    with pytest.raises(ConfigError, match=r"^analyses\.two_model\.ks: the two-model test at K=100 needs 2K = 200"):
        c.check_dataset_size(150)
    c.check_dataset_size(210)


# --- errors -----------------------------------------------------------------------------------------------------------

GIVEN = {"calibration": "given", "delta_m": 0.03, "delta_s": 0.02}
BAD = [
    (
        {"analyses": {"basins": {"n_trails": 3}}},
        r"^analyses\.basins\.n_trails: unknown key \(did you mean n_trials\?\)",
    ),
    ({"train": {"lr": "abc"}}, r"^train\.lr: expected a number, got 'abc' \(str\)$"),
    ({"train": {"lr": "1e-3"}}, r"^train\.lr: expected a number, got '1e-3' \(str\); quoted, it is text: write 1e-3"),
    ({"train": {"steps": True}}, r"^train\.steps: expected an integer, got True \(bool\)"),
    ({"train": {"lr": -1.0}}, r"^train\.lr: must lie in \(0, 10\], got -1\.0"),
    ({"train": {"ema_decay": 1.0}}, r"^train.ema_decay: must lie in \[0, 1\)"),
    ({"train": {"lr": math.nan}}, r"^train\.lr: expected a finite number, got nan"),
    ({"train": {"schedule": {"type": "ve"}}}, r"^train\.schedule\.type: training uses a VP \(DDPM\) schedule"),
    ({"train": {"schedule": {"kind": "cubic"}}}, r"^train\.schedule: unknown VP schedule kind 'cubic'"),
    ({"train": {"schedule": {"num_train_timesteps": 10**9}}}, r"^train\.schedule\.num_train_timesteps: must be <="),
    ({"train": None}, r"^train: expected a mapping of keys to values, got None"),
    ({"ks": [32, 8]}, r"^ks: must be sorted ascending, got \[32, 8\]; write \[8, 32\]"),
    ({"ks": [8, 8]}, r"^ks: values must be unique"),
    ({"ks": [0, 8]}, r"^ks: training-set sizes must be >= 1"),
    ({"ks": []}, r"^ks: give at least one"),
    ({"ks": [8, "x"]}, r"^ks\[1\]: expected an integer, got 'x' \(str\)"),
    ({"ks": 8}, r"^ks: expected a list of integers, got 8 \(int\)"),
    ({"seeds": [2, 2]}, r"^seeds: values must be unique"),
    ({"seeds": [-1]}, r"^seeds\[0\]: must lie in \[0, 9223372036854775807\], got -1"),
    ({"split_seed": 1.0}, r"^split_seed: expected an integer, got 1\.0 \(float\)"),
    ({"name": "a/b"}, r"^name: use letters, digits"),
    ({"n_held_out": 4}, r"^classify\.quality: the manifold test needs held-out images: set n_held_out >= 5 \(got 4\)"),
    (
        {"n_held_out": 1, "classify": {"quality": "none"}},
        r"^classify\.calibration: 'held_out' calibration needs held-out images: set n_held_out >= 2",
    ),
    ({"data": {"name": "imagenet"}}, r"^data\.name: unknown value 'imagenet'; choose one of digits, circle"),
    ({"data": {"name": "mnist"}}, r"^data\.options\.root: data\.name 'mnist' is read from files you provide"),
    ({"data": {"options": {"root": "/d"}}}, r"^data\.options\.root: data\.name 'digits' is built in"),
    ({"data": {"options": {"n": 5}}}, r"^data\.options\.n: unknown option for data\.name 'digits'; it takes none"),
    ({"data": {"name": "circle", "options": {"n": "many"}}}, r"^data\.options\.n: expected an integer"),
    ({"network": {"kind": "transformer"}}, r"^network\.kind: unknown value 'transformer'; choose one of mlp, unet"),
    ({"network": {"mlp": {"hidden": 0}}}, r"^network\.mlp: mlp\.hidden must be a positive integer"),
    ({"network": {"mlp": {"emb_dim": 7}}}, r"^network\.mlp: mlp\.emb_dim must be even"),
    ({"network": {"mlp": {"dim": 64}}}, r"^network\.mlp\.dim: set from the data"),
    ({"network": {"unet": {"layers_per_block": 2}}}, r"^network\.unet: given, but network\.kind is 'mlp'"),
    ({"network": {"kind": "unet", "unet": {"block_out_channels": [30, 64]}}}, r"^network\.unet: every .*divisible"),
    ({"network": {"kind": "unet", "unet": {"down_block_types": [1]}}}, r"^network\.unet\.down_block_types\[0\]"),
    ({"sampling": {"sampler": "dpm"}}, r"^sampling\.sampler: unknown value 'dpm'; choose one of .*ddim"),
    ({"sampling": {"n_samples": 1}}, r"^sampling\.n_samples: the spurious test compares samples: need >= 2"),
    ({"sampling": {"sampler": "ddpm", "eta": 0.5}}, r"^sampling\.eta: only the ddim sampler takes eta"),
    ({"sampling": {"eta": 2.0}}, r"^sampling\.eta: must lie in \[0, 1\], got 2\.0"),
    ({"metric": {"name": "ssim"}}, r"^metric\.name: unknown value 'ssim'; choose one of l2, lpips"),
    ({"metric": {"resize": 0}}, r"^metric\.resize: must be >= 1, got 0"),
    ({"classify": {"calibration": "guess"}}, r"^classify\.calibration: unknown value 'guess'"),
    ({"classify": {"calibration": "given", "delta_s": 0.1}}, r"^classify\.delta_m: classify\.rule 'threshold'"),
    ({"classify": {"delta_m": 0.1, "delta_s": 0.2}}, r"^classify\.calibration: 'held_out' calibrates .* given"),
    ({"classify": {"rule": "ratio", "delta_m": 0.1}}, r"^classify\.delta_m: classify\.rule 'ratio' uses no delta_m"),
    ({"classify": {"delta_m": 0.0}}, r"^classify\.delta_m: must be > 0, got 0\.0"),
    ({"classify": {"quantile": 1.0}}, r"^classify\.quantile: must lie in \(0, 1\), got 1\.0"),
    ({"analyses": {"basins": {"p": 1.5}}}, r"^analyses\.basins\.p: must lie in \(0, 1\), got 1\.5"),
    ({"analyses": {"energy": {"n_nodes": 1}}}, r"^analyses\.energy\.n_nodes: must be >= 2"),
    (
        {"analyses": {"two_model": {"enabled": True, "ks": [16]}}},
        r"^analyses\.two_model\.ks\[0\]: 16 is not one of ks \[8, 32\]",
    ),
    (
        {"analyses": {"two_model": {"enabled": True, "ks": [32, 8]}}},
        r"^analyses\.two_model\.ks: must be a non-empty ascending",
    ),
    ({"analyses": {"census": []}}, r"^analyses\.census: expected a mapping"),
    (
        {"n_held_out": 0, "classify": {**GIVEN, "quality": "none"}, "analyses": {"two_model": {"enabled": True}}},
        r"^analyses\.two_model\.delta: null calibrates it from held-out images: set n_held_out >= 2",
    ),
    ({"device": "tpu"}, r"^device: use cpu, cuda or cuda:N, got 'tpu'"),
    ({"executor": {"kind": "slurm"}}, r"^executor\.kind: unknown value 'slurm'; choose one of local, pool, ray"),
    ({"executor": {"workers": 4}}, r"^executor\.workers: executor\.kind 'local' runs one job at a time"),
    ({"executor": {"address": "ray://h:10001"}}, r"^executor\.address: only executor\.kind 'ray'"),
    ({"executor": {"gpus_per_job": 1}}, r"^executor\.gpus_per_job: 1\.0 GPUs per job, but device is 'cpu'"),
    ({"device": "cuda", "executor": {"kind": "ray"}}, r"^executor\.gpus_per_job: Ray hides the GPUs"),
    ({"hyperparameters": {}}, r"^hyperparameters: unknown key; allowed: name, run, data, ks"),
    ({7: 1}, r"^top level: keys must be strings, got 7 \(int\)"),
]


@pytest.mark.parametrize(("overlay", "message"), BAD, ids=[m[1:40] for _, m in BAD])
def test_bad_values_name_the_key(overlay, message):
    with pytest.raises(ConfigError, match=message):
        StudyConfig.from_dict({**MINIMAL, **overlay})


def test_required_keys_and_non_mappings():
    with pytest.raises(ConfigError, match=r"^ks: required key missing"):
        StudyConfig.from_dict({"n_held_out": 10})
    with pytest.raises(ConfigError, match=r"^top level: expected a mapping of keys to values, got \[1, 2\]"):
        StudyConfig.from_dict([1, 2])


def test_config_error_is_a_value_error_with_the_key():
    with pytest.raises(ValueError) as info:
        study(train={"lr": -1.0})
    assert isinstance(info.value, ConfigError) and info.value.key == "train.lr"
    with pytest.raises(ConfigError) as info:
        study(network={"mlp": {"depth": 0}})
    assert info.value.key == "network.mlp.depth"


# --- files ------------------------------------------------------------------------------------------------------------


def test_file_errors_name_the_path_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such file"):
        load_study_config(tmp_path / "missing.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.yaml: is a directory"):
        load_study_config(tmp_path / "dir.yaml")
    with pytest.raises(ConfigError, match=r"study\.ini: unknown config format '\.ini'; use \.yaml"):
        load_study_config(tmp_path / "study.ini")
    cases = {
        "binary.yaml": (b"ks: [8]\xff\n", r"binary\.yaml: not UTF-8 text \(invalid byte at offset 7\)"),
        "syntax.yaml": (b"ks: [8, 32\nname: x\n", r"syntax\.yaml:2:5: invalid YAML: expected ',' or ']'"),
        "list.yaml": (b"- 8\n- 32\n", r"list\.yaml: the top level must be a mapping .* got \[8, 32\] \(list\)"),
        "empty.yaml": (b"# nothing\n", r"empty\.yaml: the file is empty"),
        "date.yaml": (b"ks: [8]\nname: 2024-13-01\n", r"date\.yaml: invalid YAML: month must be in 1\.\.12"),
        "tag.yaml": (b"ks: !!python/object:os.system x\n", r"tag\.yaml:1:5: invalid YAML: could not determine"),
        "key.yaml": (
            b"ks: [8]\nn_held_out: 10\nanalyses:\n  basins:\n    enabled: true\n    n_trails: 3\n",
            r"key\.yaml:6: analyses\.basins\.n_trails: unknown key",
        ),
        "item.yaml": (b"n_held_out: 10\nks:\n  - 8\n  - x\n", r"item\.yaml:4: ks\[1\]: expected an integer"),
        "syntax.toml": (b"ks = [8]\nn_held_out = \n", r"syntax\.toml: invalid TOML: .*line 2"),
        "syntax.json": (b'{"ks": [8,]}', r"syntax\.json:1:11: invalid JSON"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=message):
            load_study_config(tmp_path / name)


def test_toml_json_and_yaml_agree(tmp_path):
    (tmp_path / "s.toml").write_text(
        'name = "t"\nks = [8, 32]\nn_held_out = 10\n[train]\nlr = 2e-3\nsteps = 10\n'
        "[analyses.basins]\nenabled = true\np = 0.8\n"
    )
    (tmp_path / "s.yaml").write_text(
        "name: t\nks: [8, 32]\nn_held_out: 10\ntrain: {lr: 2.0e-3, steps: 10}\n"
        "analyses: {basins: {enabled: true, p: 0.8}}\n"
    )
    toml_config = load_study_config(tmp_path / "s.toml")
    assert toml_config == load_study_config(tmp_path / "s.yaml")
    assert toml_config.train.lr == 2e-3 and toml_config.analyses.basins.p == 0.8
    (tmp_path / "s.json").write_text(json.dumps(toml_config.to_dict()))
    assert load_study_config(tmp_path / "s.json") == toml_config
    (tmp_path / "r.yaml").write_text(format_resolved(toml_config))
    assert load_study_config(tmp_path / "r.yaml") == toml_config


# --- fingerprints -----------------------------------------------------------------------------------------------------


def _canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_fingerprint_is_the_hash_of_the_result_settings():
    c = load_study_config(EXAMPLE)
    settings_ = c.results_settings()
    assert _canonical_sha256(settings_) == c.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", c.fingerprint())
    for left_out in ("name", "device", "executor"):
        assert left_out not in settings_
    assert "batch_size" not in settings_["sampling"] and "log_every" not in settings_["train"]
    assert settings_["metric"] == {"name": "l2"}
    assert settings_["analyses"]["census"] == {"enabled": False}
    assert settings_["train"]["lr"] == 1e-3 and settings_["ks"] == [8, 32, 128, 512, 1500]


def _changed(c: StudyConfig, path: str, value) -> StudyConfig:
    d = c.to_dict()
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[last] = value
    return StudyConfig.from_dict(d)


SAME_RESULTS = [
    ("name", "renamed"),
    ("device", "cuda:1"),
    ("executor", {"kind": "ray", "workers": 8, "address": "auto", "cpus_per_job": 2, "gpus_per_job": 0}),
    ("sampling.batch_size", 7),
    ("train.log_every", 3),
    ("train.checkpoint_every", 500),
    ("metric.lpips_net", "vgg"),  # the l2 metric reads no LPIPS option
    ("analyses.census.n_starts", 5),  # disabled
    ("analyses.two_model.ks", [8, 32]),  # disabled
]
OTHER_RESULTS = [
    ("train.lr", 2e-3),
    ("ks", [8, 32, 128, 512]),
    ("seeds", [0, 1]),
    ("split_seed", 1),
    ("n_held_out", 300),
    ("sampling.n_samples", 256),
    ("classify.quantile", 0.1),
    ("analyses.basins.p", 0.8),
    ("analyses.census.enabled", True),
    ("network.mlp.hidden", 256),
]


@pytest.mark.parametrize(("path", "value"), SAME_RESULTS, ids=[p for p, _ in SAME_RESULTS])
def test_fingerprint_ignores_execution_settings(path, value):
    c = load_study_config(EXAMPLE)
    other = _changed(c, path, value)
    assert other != c
    assert other.fingerprint() == c.fingerprint()
    assert other.job_fingerprint(8, 0) == c.job_fingerprint(8, 0)


@pytest.mark.parametrize(("path", "value"), OTHER_RESULTS, ids=[p for p, _ in OTHER_RESULTS])
def test_fingerprint_follows_result_settings(path, value):
    c = load_study_config(EXAMPLE)
    assert _changed(c, path, value).fingerprint() != c.fingerprint()


def test_job_fingerprint_depends_on_its_job_only():
    c = study(analyses={"two_model": {"enabled": True, "ks": [32]}})
    more = _changed(_changed(c, "ks", [8, 32, 64]), "seeds", [0, 5])
    assert more.fingerprint() != c.fingerprint()
    assert more.job_fingerprint(8, 0) == c.job_fingerprint(8, 0)
    assert more.job_fingerprint(32, 0) == c.job_fingerprint(32, 0)
    assert len({c.job_fingerprint(8, 0), c.job_fingerprint(32, 0), more.job_fingerprint(8, 5)}) == 3
    # K = 8 runs no two-model test, so its settings do not reach that job
    two = _changed(c, "analyses.two_model.n_samples", 64)
    assert two.job_fingerprint(8, 0) == c.job_fingerprint(8, 0)
    assert two.job_fingerprint(32, 0) != c.job_fingerprint(32, 0)
    # ks null means every K of the study
    every = study(analyses={"two_model": {"enabled": True}})
    assert every.fingerprint() == _changed(every, "analyses.two_model.ks", [8, 32]).fingerprint()


def test_fingerprint_keeps_the_quantile_only_where_it_is_read():
    given_ = study(classify=GIVEN)
    assert _changed(given_, "classify.quantile", 0.2).fingerprint() == given_.fingerprint()
    # a two-model test without delta calibrates it with the quantile
    two = study(classify=GIVEN, analyses={"two_model": {"enabled": True}})
    assert _changed(two, "classify.quantile", 0.2).fingerprint() != two.fingerprint()
    assert _changed(two, "analyses.two_model.delta", 0.1).fingerprint() != two.fingerprint()
    ratio = study(classify={"rule": "ratio"})
    assert _changed(ratio, "classify.ratio", 0.2).fingerprint() != ratio.fingerprint()
    assert _changed(study(), "classify.ratio", 0.2).fingerprint() == study().fingerprint()


# --- property-based: valid configs round-trip ------------------------------------------------------------------------

POSITIVE = st.floats(1e-6, 1e3, allow_nan=False)
UNIT_OPEN = st.floats(0.001, 0.999)


def _maybe(draw, d: dict, key: str, strategy) -> None:
    if draw(st.booleans()):
        d[key] = draw(strategy)


@st.composite
def valid_dicts(draw) -> dict:
    ks = sorted(draw(st.lists(st.integers(1, 5000), min_size=1, max_size=5, unique=True)))
    d: dict = {"ks": ks, "n_held_out": draw(st.integers(5, 400))}  # the manifold test needs k + 2 = 5
    _maybe(draw, d, "name", st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True))
    _maybe(draw, d, "seeds", st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=3, unique=True))
    _maybe(draw, d, "split_seed", st.integers(0, 2**63 - 1))
    data = draw(
        st.sampled_from(
            [
                {"name": "digits"},
                {"name": "circle", "options": {"n": 500, "spacing": "uniform"}},
                {"name": "mnist", "options": {"root": "/data/mnist", "split": "test"}},
                {"name": "gaussian_mixture", "options": {"std": 1, "dim": 3}},
            ]
        )
    )
    _maybe(draw, d, "data", st.just(data))
    if draw(st.booleans()):
        mlp: dict = {}
        _maybe(draw, mlp, "hidden", st.integers(1, 2048))
        _maybe(draw, mlp, "depth", st.integers(1, 8))
        _maybe(draw, mlp, "embedding", st.sampled_from(["sinusoidal", "fourier"]))
        _maybe(draw, mlp, "emb_dim", st.integers(1, 128).map(lambda n: 2 * n))
        _maybe(draw, mlp, "fourier_scale", POSITIVE)
        d["network"] = {"kind": "mlp", "mlp": mlp}
    elif draw(st.booleans()):
        groups = draw(st.integers(1, 8))
        n = draw(st.integers(1, 3))
        unet = {
            "block_out_channels": [groups * draw(st.integers(1, 8)) for _ in range(n)],
            "down_block_types": ["DownBlock2D"] * n,
            "up_block_types": ["UpBlock2D"] * n,
            "norm_num_groups": groups,
        }
        _maybe(draw, unet, "layers_per_block", st.integers(1, 3))
        d["network"] = {"kind": "unet", "unet": unet}
    train: dict = {}
    _maybe(draw, train, "steps", st.integers(1, 10_000))
    _maybe(draw, train, "warmup_steps", st.integers(0, 10_000))
    _maybe(draw, train, "lr", st.floats(1e-6, 10.0))
    _maybe(draw, train, "weight_decay", st.floats(0, 1))
    _maybe(draw, train, "lr_schedule", st.sampled_from(["constant", "cosine"]))
    _maybe(draw, train, "prediction_type", st.sampled_from(["epsilon", "sample"]))
    _maybe(draw, train, "ema_decay", st.floats(0, 0.9999))
    _maybe(draw, train, "grad_clip", POSITIVE)
    _maybe(draw, train, "batch_size", st.integers(1, 4096))
    _maybe(draw, train, "checkpoint_every", st.integers(0, 1000))
    _maybe(
        draw,
        train,
        "schedule",
        st.sampled_from([{}, {"type": "vp", "num_train_timesteps": 100}, {"kind": "scaled_linear", "beta_end": 0.012}]),
    )
    _maybe(draw, d, "train", st.just(train))
    sampling: dict = {}
    _maybe(draw, sampling, "n_samples", st.integers(2, 4096))
    _maybe(draw, sampling, "steps", st.integers(1, 1000))
    _maybe(draw, sampling, "batch_size", st.integers(1, 4096))
    if draw(st.booleans()):
        _maybe(draw, sampling, "eta", st.floats(0, 1))
    else:
        _maybe(draw, sampling, "sampler", st.sampled_from(["ddpm", "ddim", "euler", "heun", "ode"]))
    _maybe(draw, d, "sampling", st.just(sampling))
    _maybe(
        draw,
        d,
        "metric",
        st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["l2", "lpips"]),
                "lpips_net": st.sampled_from(["alex", "vgg"]),
                "weights_dir": st.one_of(st.none(), st.text(max_size=20)),
                "resize": st.one_of(st.none(), st.integers(1, 512)),
            },
        ),
    )
    classify = draw(
        st.sampled_from(
            [
                {},
                {"delta_m": 0.03},
                {"calibration": "given", "delta_m": 0.03, "delta_s": 0.02},
                {"rule": "ratio", "ratio": 0.25},
                {"rule": "ratio", "calibration": "given", "delta_s": 0.5},
            ]
        )
    )
    classify |= draw(
        st.fixed_dictionaries(
            {},
            optional={
                "quantile": UNIT_OPEN,
                "n_bootstrap": st.integers(1, 10_000),
                "confidence": UNIT_OPEN,
                "n_calibration_draws": st.integers(1, 100),
            },
        )
    )
    _maybe(draw, d, "classify", st.just(classify))
    flag = st.booleans()
    analyses = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "basins": st.fixed_dictionaries(
                    {},
                    optional={"enabled": flag, "n_points": st.integers(1, 64), "p": UNIT_OPEN, "delta": POSITIVE},
                ),
                "energy": st.fixed_dictionaries({}, optional={"enabled": flag, "n_nodes": st.integers(2, 64)}),
                "curvature": st.fixed_dictionaries({}, optional={"enabled": flag, "k": st.integers(1, 64)}),
                "census": st.fixed_dictionaries({}, optional={"enabled": flag, "sigma": POSITIVE}),
                "collapse": st.fixed_dictionaries({}, optional={"enabled": flag}),
                "two_model": st.fixed_dictionaries(
                    {},
                    optional={
                        "enabled": flag,
                        "delta": st.one_of(st.none(), POSITIVE),
                        "ks": st.one_of(st.none(), st.just(ks[:1])),
                    },
                ),
                "seed": st.integers(0, 1000),
            },
        )
    )
    _maybe(draw, d, "analyses", st.just(analyses))
    device = draw(st.sampled_from([None, "cpu", "cuda", "cuda:1"]))
    if device is not None:
        d["device"] = device
    gpu = device not in (None, "cpu")
    executor = draw(
        st.sampled_from(
            [
                {},
                {"kind": "local"},
                {"kind": "pool", "workers": 4},
                {"kind": "ray", "workers": 16, "address": "auto", "gpus_per_job": 0.25 if gpu else 0},
            ]
        )
    )
    _maybe(draw, d, "executor", st.just(executor))
    return d


@fuzz(60)
@given(valid_dicts())
def test_valid_configs_round_trip(d):
    c = StudyConfig.from_dict(d)
    resolved = c.to_dict()
    assert StudyConfig.from_dict(resolved) == c
    assert StudyConfig.from_dict(json.loads(json.dumps(resolved))) == c
    assert parse_study_config(format_resolved(c)) == c
    again = StudyConfig.from_dict(resolved)
    assert again.fingerprint() == c.fingerprint()
    assert again.job_fingerprint(c.ks[0], c.seeds[0]) == c.job_fingerprint(c.ks[0], c.seeds[0])
    job = c.train_config(c.ks[-1], c.seeds[-1])
    assert (job.k, job.seed, job.network.kind) == (c.ks[-1], c.seeds[-1], c.network.kind)


# --- property-based: corruptions fail with a ConfigError naming the key ----------------------------------------------


def _paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out.extend(_paths(v, (*prefix, k)))
    return out


def _mappings(d: dict) -> list[tuple]:
    return [()] + [p for p in _paths(d) if isinstance(_get(d, p), dict)]


def _get(d: dict, path: tuple):
    for k in path:
        d = d[k]
    return d


# diverse resolved configs to corrupt (fixed, so that the examples go to the corruptions)
BASES = [
    {**MINIMAL, "analyses": {"two_model": {"enabled": True, "ks": [32]}, "basins": {"enabled": True}}},
    {
        **MINIMAL,
        "data": {"name": "mnist", "options": {"root": "/data/mnist", "split": "test"}},
        "network": {"kind": "unet", "unet": {"block_out_channels": [16, 32], "norm_num_groups": 4}},
        "metric": {"name": "lpips", "weights_dir": "/w", "resize": 64},
        "classify": {"calibration": "given", "delta_m": 0.03, "delta_s": 0.02},
        "device": "cuda",
        "executor": {"kind": "ray", "workers": 8, "address": "auto", "gpus_per_job": 0.5},
    },
    {
        **MINIMAL,
        "data": {"name": "circle", "options": {"n": 200, "spacing": "uniform"}},
        "train": {"steps": 50, "warmup_steps": 5, "lr_schedule": "cosine", "schedule": {"kind": "squaredcos_cap_v2"}},
        "sampling": {"eta": 0.5, "n_samples": 64},
        "classify": {"rule": "ratio", "ratio": 0.25},
        "executor": {"kind": "pool", "workers": 2},
    },
]
BASES = [StudyConfig.from_dict(d).to_dict() for d in BASES] + [load_study_config(EXAMPLE).to_dict()]
resolved_dicts = st.sampled_from(BASES).map(copy.deepcopy)


@fuzz(80)
@given(resolved_dicts, st.data())
def test_unknown_keys_at_any_depth_are_named(d, data):
    path = data.draw(st.sampled_from(_mappings(d)))
    name = "zz_" + data.draw(st.text(min_size=1, max_size=8))
    _get(d, path)[name] = data.draw(st.sampled_from([1, "x", None, {}]))
    with pytest.raises(ConfigError) as info:
        StudyConfig.from_dict(d)
    assert str(info.value).startswith(".".join((*path, name)) + ": unknown ")


BAD_VALUES = ["abc", "", "1e-3", [1, 2], {"a": 1}, None, True, False, 0, -1, 1.5, -0.5, 10**30, math.nan, -math.inf]


@fuzz(150)
@given(resolved_dicts, st.data())
def test_wrong_values_are_named(d, data):
    path = data.draw(st.sampled_from(_paths(d)))
    _get(d, path[:-1])[path[-1]] = data.draw(st.sampled_from(BAD_VALUES))
    try:
        StudyConfig.from_dict(d)
    except ConfigError as e:  # anything else fails the test
        assert path[0] in str(e) and path[-1] in str(e), (path, str(e))


@fuzz(60)
@given(resolved_dicts, st.data())
def test_missing_keys_are_named_or_defaulted(d, data):
    path = data.draw(st.sampled_from(_paths(d)))
    del _get(d, path[:-1])[path[-1]]
    try:
        StudyConfig.from_dict(d)
    except ConfigError as e:
        assert path[-1] in str(e), (path, str(e))


@fuzz(150)
@given(st.text(max_size=200), st.sampled_from(["yaml", "toml", "json"]))
def test_random_text_raises_only_config_errors(text, fmt):
    try:
        parse_study_config(text, fmt=fmt, source="fuzz")
    except ConfigError as e:
        assert str(e).startswith("fuzz")


@fuzz(60)
@given(st.data())
def test_edited_example_raises_only_config_errors(data):
    text = EXAMPLE.read_text()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 40)))
        insert = data.draw(st.sampled_from(["", ":", "- ", "\n", "  ", "[", "{", "'", "&a ", "*a", "!!set ", "x: "]))
        text = text[:i] + insert + text[j:]
    try:
        c = parse_study_config(text, source="edited.yaml")
    except ConfigError as e:
        assert str(e).startswith("edited.yaml")
    else:
        assert parse_study_config(c.to_yaml()) == c
