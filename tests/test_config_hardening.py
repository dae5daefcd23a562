"""Config hardening: duplicate keys, YAML 1.2 scalars, roots relative to the config file, bounded network sizes,
integers beyond 64 bits."""

import math

import pytest
import torch

from diffmem.io.config import MAX_INT, ConfigError, coerce, parse_text, show
from diffmem.models.nets import (
    MAX_CHANNELS,
    MAX_DEPTH,
    MAX_LEVELS,
    MAX_WIDTH,
    MLPConfig,
    NetworkConfig,
    UNetConfig,
    build_network,
    config_from_dict,
)
from diffmem.models.train import TrainConfig
from diffmem.study.config import StudyConfig, format_resolved, load_study_config, parse_study_config

MINIMAL = "ks: [8, 32]\nn_held_out: 10\n"


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- 1. duplicate keys ------------------------------------------------------------------------------------------------

STEPS_TWICE = """\
name: dup
ks: [8, 32]
n_held_out: 10
train:
  lr: 1.0e-3
  warmup_steps: 5
  batch_size: 16
  log_every: 10
  steps: 100
  ema_decay: 0.99
  grad_clip: 1.0
  steps: 200
"""


def test_yaml_duplicate_key_names_the_path_and_both_lines(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_study_config(_write(tmp_path, "study.yaml", STEPS_TWICE))
    assert str(info.value) == f"{tmp_path / 'study.yaml'}:12: train.steps: duplicate key (first at line 9)"
    assert info.value.key == "train.steps"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "ks: [8]\n", r"^s\.yaml:3: ks: duplicate key \(first at line 1\)$"),
        (MINIMAL + "train: {steps: 5, steps: 6}\n", r"^s\.yaml:3: train\.steps: duplicate key \(first at line 3\)$"),
        (MINIMAL + "train: {'steps': 5, steps: 6}\n", r"^s\.yaml:3: train\.steps: duplicate key"),  # quoted or not
        ("a:\n  - {b: 1}\n  - {b: 1,\n     b: 2}\n", r"^s\.yaml:4: a\[1\]\.b: duplicate key \(first at line 3\)$"),
    ],
)
def test_yaml_duplicates_anywhere(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_study_config(text, source="s.yaml")


def test_yaml_merge_keys_still_override():
    # '<<: *base' merges a mapping; the keys written beside it override the merged ones (not duplicates)
    d = parse_text("base: &b {steps: 5, lr: 0.1}\ntrain:\n  <<: *b\n  steps: 7\n", "yaml", "s.yaml")
    assert d["train"] == {"steps": 7, "lr": 0.1}


def test_json_duplicate_keys_name_the_path_and_lines(tmp_path):
    text = '{\n  "ks": [8, 32],\n  "n_held_out": 10,\n  "train": {\n    "steps": 100,\n    "steps": 200\n  }\n}\n'
    with pytest.raises(ConfigError) as info:
        load_study_config(_write(tmp_path, "s.json", text))
    assert str(info.value) == f"{tmp_path / 's.json'}:6: train.steps: duplicate key (first at line 5)"
    assert info.value.key == "train.steps"
    # the same key inside a nested object (or a list of objects) is not a duplicate of the outer one
    nested = '{"a": [{"a": {"a": 1}}],\n "b": {"a": 2},\n "a": 3}'
    with pytest.raises(ConfigError, match=r"^s\.json:3: a: duplicate key \(first at line 1\)$"):
        parse_text(nested, "json", "s.json")
    assert parse_text('{"a": {"b": 1}, "b": [{"b": 2}]}', "json", "s.json") == {"a": {"b": 1}, "b": [{"b": 2}]}


def test_toml_duplicate_keys_are_config_errors(tmp_path):
    text = MINIMAL.replace(": ", " = ") + "[train]\nsteps = 5\nsteps = 6\n"
    with pytest.raises(ConfigError, match=r"s\.toml: invalid TOML: Cannot overwrite a value \(at line 5"):
        load_study_config(_write(tmp_path, "s.toml", text))


# --- 2. YAML 1.2 scalars ----------------------------------------------------------------------------------------------

SCALARS = [
    ("1e-3", 0.001),  # YAML 1.1: the text '1e-3'
    ("-2.5E+2", -250.0),
    (".5", 0.5),
    ("0x1F", 31),
    ("0o17", 15),
    ("-7", -7),
    ("0", 0),
    ("1_000", "1_000"),  # YAML 1.1: 1000
    ("0b101", "0b101"),  # YAML 1.1: 5
    ("1:30", "1:30"),  # YAML 1.1: 90 (base 60)
    ("yes", "yes"),  # YAML 1.1: True
    ("off", "off"),  # YAML 1.1: False
    ("True", True),
    ("false", False),
    ("=", "="),
    ("~", None),
]


@pytest.mark.parametrize(("text", "value"), SCALARS, ids=[t for t, _ in SCALARS])
def test_yaml_reads_scalars_by_the_yaml_1_2_core_schema(text, value):
    got = parse_text(f"a: {text}\n", "yaml", "s.yaml")["a"]
    assert got == value and type(got) is type(value)


def test_yaml_reads_infinities_and_nan():
    d = parse_text("a: .inf\nb: -.Inf\nc: .NaN\n", "yaml", "s.yaml")
    assert d["a"] == math.inf and d["b"] == -math.inf and math.isnan(d["c"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  steps: 032\n", r"^s\.yaml:4: train\.steps: 032 has a leading zero: YAML 1\.1 reads octal 26, "),
        (
            "seeds: [1, 032]\n",
            r"^s\.yaml:3: seeds\[1\]: 032 has a leading zero: .* YAML 1\.2 reads 32; write 32 or '032'$",
        ),
        (
            "name: 08\n",
            r"^s\.yaml:3: name: 08 has a leading zero: YAML 1\.1 reads text, YAML 1\.2 reads 8; write 8 or '08'$",
        ),
        ("train: {steps: !!int 010}\n", r"^s\.yaml:3: train\.steps: 010 has a leading zero"),
    ],
)
def test_yaml_refuses_leading_zeros(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_study_config(MINIMAL + text, source="s.yaml")
    assert info.value.key in ("train.steps", "seeds[1]", "name")


def test_yaml_1_2_numbers_reach_the_config():
    c = parse_study_config(MINIMAL + "train: {lr: 1e-3, steps: 0x20}\nsplit_seed: 0o10\n")
    assert (c.train.lr, c.train.steps, c.split_seed) == (1e-3, 32, 8)
    c = parse_study_config(MINIMAL + "name: '032'\n")  # quoted: text, as written
    assert c.name == "032"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train: {steps: 1_000}",
            r"^s\.yaml:3: train\.steps: expected an integer, got '1_000' \(str\); '1_000' is text: write 1000$",
        ),
        ("train: {steps: 0b101}", r"train\.steps: expected an integer, got '0b101' \(str\); '0b101' is text: write 5$"),
        ("train: {steps: 1:30}", r"train\.steps: expected an integer, got '1:30' \(str\)$"),
        ("train: {steps: 1e3}", r"train\.steps: expected an integer, got 1000\.0 \(float\); write 1000, without a"),
        ("train: {lr: '1e-3'}", r"train\.lr: expected a number, got '1e-3' \(str\); quoted, it is text: write 1e-3 wi"),
        ("analyses: {basins: {enabled: yes}}", r"enabled: expected true or false, got 'yes' \(str\); write true or f"),
        ("analyses: {basins: {enabled: on}}", r"enabled: expected true or false, got 'on' \(str\)"),
    ],
)
def test_yaml_1_1_forms_are_refused_with_a_hint(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_study_config(MINIMAL + text + "\n", source="s.yaml")


@pytest.mark.parametrize("name", ["1e3", "08", "1_000", "0x1F", "yes", "1.5", "1.", "0o7"])
def test_strings_that_look_like_numbers_round_trip(name):
    c = StudyConfig.from_dict({"ks": [8], "n_held_out": 10, "name": name})
    assert parse_study_config(format_resolved(c)) == c


# --- 3. a relative data root is relative to the config file -----------------------------------------------------------

MNIST = MINIMAL + "data:\n  name: mnist\n  options: {root: %s, split: test}\n"


def test_relative_root_resolves_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = _write(folder, "s.yaml", MNIST % "../data/mnist")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = str(folder / "../data/mnist")
    assert load_study_config(path).data.options == {"root": expected, "split": "test"}
    monkeypatch.chdir(tmp_path)  # a relative config path: its folder still decides
    c = load_study_config("configs/s.yaml")
    assert c.data.options["root"] == expected
    # without a file, the root stays as written; the fingerprint leaves it out either way
    text = (folder / "s.yaml").read_text()
    raw = parse_study_config(text)
    assert raw.data.options["root"] == "../data/mnist"
    assert raw.fingerprint() == c.fingerprint()
    assert load_study_config(_write(tmp_path, "r.yaml", format_resolved(c))) == c  # absolute now: stays


def test_absolute_root_and_built_in_data_are_kept(tmp_path):
    absolute = tmp_path / "mnist"
    c = load_study_config(_write(tmp_path, "abs.yaml", MNIST % absolute))
    assert c.data.options["root"] == str(absolute)
    assert load_study_config(_write(tmp_path, "b.yaml", MINIMAL)).data.options == {}


# --- 4. network sizes are bounded on every path -----------------------------------------------------------------------

TOO_BIG_MLP = [
    ({"hidden": 10**7}, rf"mlp\.hidden must be <= {MAX_WIDTH}, got 10000000$"),
    ({"depth": 10**4}, rf"mlp\.depth must be <= {MAX_DEPTH}, got 10000$"),
    ({"emb_dim": 2**20}, rf"mlp\.emb_dim must be <= {MAX_WIDTH}, got 1048576$"),
    ({"fourier_scale": 0.0}, r"mlp\.fourier_scale must be a positive finite number, got 0\.0$"),
]


@pytest.mark.parametrize(("options", "message"), TOO_BIG_MLP)
def test_mlp_sizes_are_bounded_in_study_configs(options, message):
    with pytest.raises(ConfigError, match="^network\\.mlp: " + message) as info:
        StudyConfig.from_dict({"ks": [8], "n_held_out": 10, "network": {"mlp": options}})
    assert info.value.key == f"network.mlp.{next(iter(options))}"


def test_checkpoint_configs_are_bounded():
    """A run's checkpoint.json goes through TrainConfig.from_dict: refused before any tensor is built."""
    stored = TrainConfig().to_dict()
    with pytest.raises(ConfigError, match=rf"^network\.mlp: mlp\.hidden must be <= {MAX_WIDTH}, got 10000000$"):
        TrainConfig.from_dict({**stored, "network": {"kind": "mlp", "mlp": {"hidden": 10**7}}})
    with pytest.raises(ConfigError, match=r"^network\.mlp\.hidden: expected an integer, got 10000000\.0 \(float\)"):
        TrainConfig.from_dict({**stored, "network": {"kind": "mlp", "mlp": {"hidden": 1e7}}})
    schedule = stored["schedule"]
    with pytest.raises(ConfigError, match=r"^schedule\.num_train_timesteps: must be <= 100000, got 2000000000$"):
        TrainConfig.from_dict({**stored, "schedule": {**schedule, "num_train_timesteps": 2 * 10**9}})
    with pytest.raises(ConfigError, match=r"^schedule\.num_train_timesteps: expected an integer, got 2000000000\.0"):
        TrainConfig.from_dict({**stored, "schedule": {**schedule, "num_train_timesteps": 2e9}})
    unet = {"block_out_channels": [16, 2**14], "down_block_types": ["DownBlock2D"] * 2}
    with pytest.raises(ConfigError, match=rf"^network\.unet: unet\.block_out_channels\[1\] must be <= {MAX_CHANNELS}"):
        TrainConfig.from_dict({**stored, "network": {"kind": "unet", "unet": unet}})


@pytest.mark.parametrize(
    ("cls", "d", "message"),
    [
        (MLPConfig, {"dim": 2**30}, r"mlp\.dim must be <= 16777216, got 1073741824"),
        (MLPConfig, {"dim": 4, "hidden": 65537}, r"mlp\.hidden must be <= 65536, got 65537"),
        (MLPConfig, {"dim": 4, "hidden": 8.0}, r"mlp\.hidden must be a positive integer, got 8\.0 \(float\)"),
        (MLPConfig, {"dim": 4, "fourier_scale": math.nan}, r"mlp\.fourier_scale must be a positive finite number"),
        (UNetConfig, {"layers_per_block": 1000}, rf"unet\.layers_per_block must be <= {MAX_DEPTH}, got 1000"),
        (UNetConfig, {"sample_size": 10**6}, r"unet\.sample_size must be <= 16384"),
        (UNetConfig, {"in_channels": 0}, r"unet\.in_channels must be a positive integer, got 0 \(int\)"),
        (
            UNetConfig,
            {"block_out_channels": [8] * 9},
            rf"unet\.block_out_channels needs 1 to {MAX_LEVELS} levels, got 9",
        ),
        (UNetConfig, {"block_out_channels": 64}, r"unet\.block_out_channels must be a list, got 64"),
    ],
)
def test_hand_made_network_configs_are_bounded(cls, d, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(cls, d)


def test_build_network_refuses_huge_sizes_before_building():
    with pytest.raises(ValueError, match=rf"^mlp\.hidden must be <= {MAX_WIDTH}, got 10000000$"):
        build_network(NetworkConfig("mlp", {"hidden": 10**7}), (4,), 1000)  # a direct NetworkConfig is unchecked
    with pytest.raises(ValueError, match=r"^mlp\.dim must be <= 16777216"):
        build_network(NetworkConfig("mlp"), (3, 4096, 4096), 1000)


THREE_LEVELS = NetworkConfig(
    "unet",
    unet={
        "block_out_channels": [8, 16, 32],
        "down_block_types": ["DownBlock2D"] * 3,
        "up_block_types": ["UpBlock2D"] * 3,
    },
)


def test_unet_needs_an_image_side_its_levels_divide():
    # 3 levels halve the side twice: 3 -> 2 -> 1 cannot be doubled back to 3 (a size mismatch mid-training before)
    with pytest.raises(ConfigError) as info:
        build_network(THREE_LEVELS, (1, 3, 3), 1000)
    assert str(info.value) == (
        "network.unet.block_out_channels: the U-Net with 3 levels needs an image side divisible by 4, got 3x3; "
        "side 3 allows at most 1 level: drop entries of block_out_channels and the block types, or resize the images"
    )
    with pytest.raises(ConfigError, match=r"divisible by 4, got 6x6; side 6 allows at most 2 levels"):
        build_network(THREE_LEVELS, (1, 6, 6), 1000)
    net = build_network(THREE_LEVELS, (1, 12, 12), 1000)  # 12 -> 6 -> 3 and back
    assert net(torch.zeros(2, 1, 12, 12), torch.tensor([1, 2])).shape == (2, 1, 12, 12)


# --- 5. integers beyond 64 bits, non-finite floats --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"train": {"steps": 10**30}}, r"^train\.steps: integer too large: 1000000000000000000000000000000 \(int\); "),
        ({"train": {"log_every": -(10**19)}}, r"^train\.log_every: integer too large"),
        ({"data": {"name": "circle", "options": {"n": 2**64}}}, r"^data\.options\.n: integer too large"),
        (
            {"analyses": {"basins": {"n_points": 10**5000}}},
            r"^analyses\.basins\.n_points: integer too large: <a 16610-bit",
        ),
        ({"train": {"lr": math.inf}}, r"^train\.lr: expected a finite number, got inf"),
        ({"train": {"grad_clip": 10**400}}, r"^train\.grad_clip: number too large"),
    ],
)
def test_integers_beyond_64_bits_and_infinite_floats_are_refused(overlay, message):
    with pytest.raises(ConfigError, match=message):
        StudyConfig.from_dict({"ks": [8], "n_held_out": 10, **overlay})


def test_the_64_bit_cap_is_inclusive():
    assert coerce(MAX_INT, int, "k") == MAX_INT and coerce(-MAX_INT, int, "k") == -MAX_INT
    with pytest.raises(ConfigError, match=r"^k: integer too large"):
        coerce(MAX_INT + 1, int, "k")
    assert show(10**5000) == "<a 16610-bit integer> (int)"


def test_yaml_infinities_are_refused_by_float_fields():
    with pytest.raises(ConfigError, match=r"^s\.yaml:3: train\.lr: expected a finite number, got inf$"):
        parse_study_config(MINIMAL + "train: {lr: .inf}\n", source="s.yaml")
