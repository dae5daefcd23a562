"""The two-model test: agreement of two models' samples from the same noise."""

import json
import math

import pytest
import torch

from diffmem.evaluate.two_model import PAIR_SEED_OFFSET, TwoModelConfig, agreement, pair_seeds
from diffmem.io.config import MAX_SEED
from diffmem.models.train import TrainConfig, build_model
from diffmem.study.config import StudyConfig
from diffmem.study.presets import memorization_config, two_model_config
from diffmem.study.runner import run_study

SMALL = {"kind": "mlp", "mlp": {"hidden": 16, "depth": 1, "emb_dim": 8}}


def test_agreement_counts_pairs_within_delta():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100, 16, generator=g, dtype=torch.float64)
    b = a.clone()
    b[:30] += 10.0  # 30 pairs far apart: ||10 * 1|| / sqrt(16) = 10
    r = agreement(a, b, delta=0.5)
    assert r.fraction == pytest.approx(0.7) and r.n == 100
    assert r.mean_distance == pytest.approx(0.3 * 10.0)
    assert float(r.distances[0]) == pytest.approx(10.0) and float(r.distances[-1]) == 0.0
    assert agreement(a, a, delta=1e-9).fraction == 1.0


def test_agreement_bad_input():
    a = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        agreement(a, torch.zeros(5, 3), 0.1)
    with pytest.raises(ValueError, match="delta must be a positive number"):
        agreement(a, a, 0.0)
    with pytest.raises(ValueError, match="delta must be a positive number"):
        agreement(a, a, math.nan)
    bad = a.clone()
    bad[1, 1] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        agreement(a, bad, 0.1)


def test_two_model_preset_trains_disjoint_pairs_only(tmp_path):
    config = two_model_config(ks=[4, 8], n_held_out=50, steps=10, hidden=16, depth=1, n_samples=12)
    config = type(config).from_dict(
        {**config.to_dict(), "sampling": {"steps": 4}, "network": SMALL, "train": {"steps": 10, "batch_size": 8}}
    )
    result = run_study(config, tmp_path / "s", progress=False)
    assert [r["K"] for r in result.two_model] == [4, 8] and result.rows == []
    for r in result.two_model:
        assert 0 <= r["agreement"] <= 1 and r["delta"] > 0 and r["n_samples"] == 12
    job = tmp_path / "s" / "two-model-k-0004-seed-0"
    a = json.loads((job / "a" / "checkpoint.json").read_text())["train_indices"]
    b = json.loads((job / "b" / "checkpoint.json").read_text())["train_indices"]
    assert len(a) == len(b) == 4 and not set(a) & set(b)  # disjoint training sets
    assert not (tmp_path / "s" / "k-0004-seed-0").exists()  # run 'two_model': no nested job
    assert not (tmp_path / "s" / "phase.json").exists()


def test_presets_validate_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="ks: training-set sizes must be >= 1"):
        two_model_config(ks=[0, 4])
    with pytest.raises(ValueError, match="analyses.two_model.delta: null calibrates it from held-out images"):
        two_model_config(n_held_out=0)
    assert two_model_config(n_held_out=0, delta=0.1).analyses.two_model.delta == 0.1
    with pytest.raises(ValueError, match="the manifold test needs held-out images"):
        memorization_config(n_held_out=0)
    m = memorization_config(ks=[32, 8])
    assert m.run == "phase" and m.ks == (8, 32) and m.two_model_ks() == ()


def test_two_model_jobs_in_a_study(tmp_path):
    config = StudyConfig.from_dict(
        {
            "ks": [4, 8],
            "n_held_out": 50,
            "network": SMALL,
            "train": {"steps": 10, "batch_size": 8, "warmup_steps": 2},
            "sampling": {"steps": 4, "n_samples": 8},
            "classify": {"n_bootstrap": 50},
            "analyses": {"two_model": {"enabled": True, "n_samples": 10, "ks": [8]}},
        }
    )
    result = run_study(config, tmp_path / "s", progress=False)
    assert [r["K"] for r in result.two_model] == [8]
    saved = json.loads((tmp_path / "s" / "two_model.json").read_text())["rows"]
    assert saved == result.two_model and saved[0]["n_samples"] == 10


def test_pair_seeds_rule():
    assert pair_seeds(0, "shared") == (0, 0) and pair_seeds(7, "shared") == (7, 7)
    assert pair_seeds(0, "independent") == (0, PAIR_SEED_OFFSET) == (0, 1_000_003)
    assert pair_seeds(5, "independent") == (5, 5 + 1_000_003)
    # near the top of the seed range the rule wraps around, staying a valid seed different from a's
    a, b = pair_seeds(MAX_SEED, "independent")
    assert a == MAX_SEED and b == PAIR_SEED_OFFSET - 1 and 0 <= b <= MAX_SEED
    with pytest.raises(ValueError, match="unknown value 'same'"):
        pair_seeds(0, "same")
    with pytest.raises(ValueError, match="seed"):
        pair_seeds(-1, "shared")


def test_two_model_config_init_round_trips_and_is_checked():
    assert TwoModelConfig().init == "independent"  # the default: independent seeds
    for init in ("independent", "shared"):
        c = TwoModelConfig(enabled=True, init=init)
        assert TwoModelConfig.from_dict(c.to_dict()) == c and c.to_dict()["init"] == init
    with pytest.raises(ValueError, match="analyses.two_model.init: unknown value 'both'"):
        TwoModelConfig.from_dict({"init": "both"})
    study = StudyConfig.from_dict(
        {
            "ks": [4],
            "n_held_out": 50,
            "run": "two_model",
            "analyses": {"two_model": {"enabled": True, "init": "shared"}},
        }
    )
    assert StudyConfig.from_dict(study.to_dict()) == study
    other = StudyConfig.from_dict({**study.to_dict(), "analyses": {"two_model": {"enabled": True}}})
    assert other.job_fingerprint(4, 0) != study.job_fingerprint(4, 0)  # the choice is part of the job's results


@pytest.mark.parametrize("init", ["independent", "shared"])
def test_two_model_pair_training_seeds(tmp_path, init):
    config = StudyConfig.from_dict(
        {
            "ks": [4],
            "seeds": [3],
            "n_held_out": 50,
            "run": "two_model",
            "network": SMALL,
            "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
            "sampling": {"steps": 2},
            "analyses": {"two_model": {"enabled": True, "n_samples": 4, "init": init}},
        }
    )
    run_study(config, tmp_path / "s", progress=False)
    job = tmp_path / "s" / "two-model-k-0004-seed-3"
    trained = {
        side: TrainConfig.from_dict(json.loads((job / side / "checkpoint.json").read_text())["config"])
        for side in ("a", "b")
    }
    expected_b = 3 + 1_000_003 if init == "independent" else 3
    assert trained["a"].seed == 3 and trained["b"].seed == expected_b
    # what differs between the two runs besides the seed is the training set, as before
    assert {trained["a"].subset, trained["b"].subset} == {"pair_a", "pair_b"}
    # the initial weights of the two networks, rebuilt from the configs they were trained with
    init_a, init_b = (build_model(trained[s], (64,), torch.device("cpu")).state_dict() for s in ("a", "b"))
    same = all(torch.equal(init_a[name], init_b[name]) for name in init_a)
    assert same == (init == "shared")
    record = {"init": init, "seed": 3, "seed_a": 3, "seed_b": expected_b}
    saved = json.loads((job / "agreement.json").read_text())
    assert {key: saved[key] for key in record} == record
    per_seed = json.loads((tmp_path / "s" / "two_model.json").read_text())["per_seed"]
    assert [{key: r[key] for key in record} for r in per_seed] == [record]
