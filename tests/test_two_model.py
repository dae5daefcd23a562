"""The two-model test: agreement of two models' samples from the same noise."""

import json
import math

import pytest
import torch

from diffmem.study.runner import run_study
from diffmem.study.config import StudyConfig
from diffmem.models.train import TrainConfig
from diffmem.evaluate.two_model import agreement, two_model_study

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


def test_two_model_study_trains_disjoint_pairs(tmp_path):
    base = TrainConfig(steps=10, batch_size=8, warmup_steps=2, n_held_out=50, network=SMALL)
    rows = two_model_study(base, [4, 8], tmp_path, n_samples=12, sample_steps=4, progress=False)
    assert [r["K"] for r in rows] == [4, 8]
    for r in rows:
        assert 0 <= r["agreement"] <= 1 and r["delta"] > 0 and r["n_samples"] == 12
    a = json.loads((tmp_path / "k-4-a" / "checkpoint.json").read_text())["train_indices"]
    b = json.loads((tmp_path / "k-4-b" / "checkpoint.json").read_text())["train_indices"]
    assert len(a) == len(b) == 4 and not set(a) & set(b)  # disjoint training sets
    assert (tmp_path / "two_model.png").stat().st_size > 5_000
    with pytest.raises(ValueError, match="sorted ascending"):
        two_model_study(base, [8, 4], tmp_path)


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
