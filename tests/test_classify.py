"""Memorized / spurious / generalized classification (SCIENCE.md §5)."""

import math

import pytest
import torch

from diffmem.core import EmpiricalDenoiser, VPSchedule, initial_noise, sample_ddim
from diffmem.evaluate.classify import PhaseClassifier, sample_distances, transition_points
from diffmem.io.data import load_dataset, nested_order


def _scene(seed=0, d=16):
    """Training set of 6 points far apart; 3 near-copies, 2 pairs of duplicates away from the data,
    3 lone points away from everything."""
    g = torch.Generator().manual_seed(seed)
    train = 10 * torch.randn(6, d, generator=g, dtype=torch.float64)
    copies = train[:3] + 1e-3 * torch.randn(3, d, generator=g, dtype=torch.float64)
    centres = 10 * torch.randn(2, d, generator=g, dtype=torch.float64)
    pairs = centres.repeat_interleave(2, 0) + 1e-3 * torch.randn(4, d, generator=g, dtype=torch.float64)
    lone = 10 * torch.randn(3, d, generator=g, dtype=torch.float64)
    samples = torch.cat([copies, pairs, lone])
    return train, samples, ["memorized"] * 3 + ["spurious"] * 4 + ["generalized"] * 3


def test_given_thresholds_label_a_constructed_scene():
    train, samples, expected = _scene()
    clf = PhaseClassifier(delta_m=0.01, delta_s=0.01, quality="none").fit(train)
    result = clf.predict(samples, train)
    assert result.labels == expected
    assert result.counts() == {"memorized": 3, "spurious": 4, "generalized": 3}
    assert result.distances.train_index[:3].tolist() == [0, 1, 2]
    # duplicates point at each other, never at themselves
    assert result.distances.gen_index[3:7].tolist() == [4, 3, 6, 5]


def test_distances_equal_brute_force_and_exclude_self_by_index():
    train, samples, _ = _scene(1)
    samples = torch.cat([samples, samples[:1]])  # an exact duplicate: s = 0 for both copies
    d = sample_distances(samples, train)
    dim = samples.shape[1]
    full = torch.cdist(samples, train) / math.sqrt(dim)
    two = full.topk(2, largest=False).values
    torch.testing.assert_close(d.m, two[:, 0])
    torch.testing.assert_close(d.m2, two[:, 1])
    gen = torch.cdist(samples, samples) / math.sqrt(dim)
    gen.fill_diagonal_(math.inf)
    torch.testing.assert_close(d.s, gen.min(1).values)
    assert d.s[0] == 0 and d.s[-1] == 0
    assert d.gen_index[0] == samples.shape[0] - 1 and d.gen_index[-1] == 0


def test_calibration_rule_matches_brute_force_quantiles():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(50, 8, generator=g, dtype=torch.float64)
    held = torch.randn(40, 8, generator=g, dtype=torch.float64)
    clf = PhaseClassifier(quantile=0.1).fit(train, held, n_generated=100)
    dm = (torch.cdist(held, train).min(1).values / math.sqrt(8)).quantile(0.1)
    hh = torch.cdist(held, held)
    hh.fill_diagonal_(math.inf)
    ds = (hh.min(1).values / math.sqrt(8)).quantile(0.1)
    assert clf.delta_m_ == pytest.approx(float(dm), rel=1e-12)
    assert clf.delta_s_ == pytest.approx(float(ds), rel=1e-12)
    assert clf.calibration_["density_matched"] is False
    # fewer samples than held-out images: subsets of the samples' size, whose neighbours lie farther
    small = PhaseClassifier(quantile=0.1).fit(train, held, n_generated=10)
    assert small.calibration_["density_matched"] is True
    assert small.delta_s_ > clf.delta_s_


def test_exact_denoiser_samples_are_all_memorized_with_calibrated_thresholds():
    data = load_dataset("digits", dtype=torch.float64)
    order = nested_order(len(data), 0)
    train, held = data.x[order[:32]], data.x[order[-200:]]
    den = EmpiricalDenoiser(train)
    sigmas = VPSchedule().sampling_sigmas(50).double()
    g = torch.Generator().manual_seed(0)
    x = initial_noise((64, 64), float(sigmas[0]), generator=g, like=train)
    samples = sample_ddim(den, x, sigmas)
    result = PhaseClassifier().fit(train, held, n_generated=64).predict(samples, train)
    assert result.counts()["memorized"] == 64
    assert result.delta_m > 0.1  # held-out digits are far from the training digits; the samples sit on them
    assert float(result.distances.m.max()) < 1e-6


def test_bootstrap_intervals_have_the_binomial_width():
    labels = ["memorized"] * 300 + ["generalized"] * 700
    train, samples, _ = _scene()
    clf = PhaseClassifier(delta_m=0.01, delta_s=0.01, quality="none").fit(train)
    base = clf.predict(samples, train)
    from dataclasses import replace

    result = replace(base, labels=labels)
    fr = result.fractions(n_bootstrap=2000, seed=1)
    f = fr["memorized"]
    assert f.value == 0.3 and f.n == 1000
    assert f.low < 0.3 < f.high
    expected = 2 * 1.96 * math.sqrt(0.3 * 0.7 / 1000)
    assert f.high - f.low == pytest.approx(expected, rel=0.15)
    # 0 of 1000: the Wilson interval, not an empty [0, 0]; its upper end is about 1.96^2 / n
    assert fr["spurious"].value == 0 and fr["spurious"].low == 0
    assert fr["spurious"].high == pytest.approx(1.96**2 / (1000 + 1.96**2), rel=1e-3)


def test_ratio_rule_uses_nearest_over_second_nearest():
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    samples = torch.tensor([[1.0, 0.0], [4.0, 0.0], [30.0, 30.0], [30.0, 30.1]], dtype=torch.float64)
    clf = PhaseClassifier(delta_s=0.2, rule="ratio", quality="none").fit(train)
    labels = clf.predict(samples, train).labels
    # 1 / 9 < 1/3: memorized; 4 / 6 is not; the last two are a pair away from the data
    assert labels == ["memorized", "generalized", "spurious", "spurious"]


def test_typical_orders_by_the_class_score():
    train, samples, _ = _scene()
    result = PhaseClassifier(delta_m=0.01, delta_s=0.01, quality="none").fit(train).predict(samples, train)
    mem = result.typical("memorized", 3)
    m = result.distances.m
    assert [float(m[i]) for i in mem] == sorted(float(m[i]) for i in mem)
    gen = result.typical("generalized", 3)
    assert float(m[gen[0]]) == max(float(m[i]) for i in gen)
    rows = result.rows(seeds=list(range(100, 110)))
    assert rows[4]["class"] == "spurious" and rows[4]["nearest_generated"] == 3 and rows[4]["seed"] == 104


def test_transition_points():
    rows = [
        {"K": 8, "f_M": 0.9, "f_S": 0.05, "f_G": 0.05},
        {"K": 32, "f_M": 0.6, "f_S": 0.2, "f_G": 0.2},
        {"K": 128, "f_M": 0.2, "f_S": 0.4, "f_G": 0.4},
        {"K": 512, "f_M": 0.0, "f_S": 0.1, "f_G": 0.9},
    ]
    t = transition_points(rows[::-1])
    assert t == {
        "last_memorizing_K": 32,
        "first_generalizing_K": 512,
        "spurious_peak_K": 128,
        "spurious_peak_fraction": 0.4,
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"delta_m": 0.0}, "delta_m must be a positive number"),
        ({"delta_s": -1.0}, "delta_s must be a positive number"),
        ({"delta_m": float("nan")}, "delta_m must be a positive number"),
        ({"quantile": 1.0}, "quantile must lie in"),
        ({"rule": "nearest"}, "unknown rule"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PhaseClassifier(**kwargs)


def test_bad_inputs():
    train, samples, _ = _scene()
    clf = PhaseClassifier(delta_m=0.1, delta_s=0.1, quality="none")
    with pytest.raises(ValueError, match="call fit"):
        clf.predict(samples, train)
    clf.fit(train)
    with pytest.raises(ValueError, match="differ in shape"):
        clf.predict(samples[:, :4], train)
    with pytest.raises(ValueError, match="at least 2 generated samples"):
        clf.predict(samples[:1], train)
    bad = samples.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 10"):
        clf.predict(bad, train)
    with pytest.raises(ValueError, match="calibrated from held-out"):
        PhaseClassifier().fit(train)
    with pytest.raises(ValueError, match="the manifold test needs held-out images"):
        PhaseClassifier(delta_m=0.1, delta_s=0.1).fit(train)
    with pytest.raises(ValueError, match="at least 2 held-out"):
        PhaseClassifier().fit(train, train[:1])


def test_ratio_rule_needs_pixel_l2_and_two_training_examples():
    class FakeLPIPS:
        name = "lpips"

    with pytest.raises(ValueError, match="use it with metric 'l2'"):
        PhaseClassifier(delta_s=0.1, rule="ratio", metric=FakeLPIPS())
    train = torch.zeros(1, 4, dtype=torch.float64)
    samples = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    clf = PhaseClassifier(delta_s=0.1, rule="ratio", quality="none").fit(train)
    with pytest.raises(ValueError, match="K must be >= 2"):
        clf.predict(samples, train)
    with pytest.raises(ValueError, match=r"delta_s must be given or calibrated from held-out images"):
        PhaseClassifier(rule="ratio", quality="none").fit(train)


def test_no_spurious_peak_without_spurious_samples():
    rows = [{"K": 8, "f_M": 1.0, "f_S": 0.0, "f_G": 0.0}, {"K": 64, "f_M": 0.0, "f_S": 0.0, "f_G": 1.0}]
    assert transition_points(rows)["spurious_peak_K"] is None
