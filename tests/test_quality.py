"""The quality axis: off-manifold samples are not "generalized", and the copy threshold means the
same at every K (SCIENCE.md §5)."""

import math

import pytest
import torch

from diffmem.core import VPNetworkDenoiser, VPSchedule, initial_noise, sample_ddim
from diffmem.evaluate.classify import PhaseClassifier
from diffmem.evaluate.metrics import PixelL2
from diffmem.evaluate.quality import fit_manifold, knn_radii, quality_metrics, wilson_interval
from diffmem.io.data import load_dataset, nested_order
from diffmem.models.nets import NetworkConfig, build_network


@pytest.fixture(scope="module")
def digits():
    """Training digits (K = 64), a held-out reference (297) and other real digits never seen (200)."""
    data = load_dataset("digits", dtype=torch.float64)
    order = nested_order(len(data), 0)
    return data.x[order[:64]], data.x[order[-297:]], data.x[order[64:264]], data.x[order[: len(data) - 297]]


def _classify(samples, train, held, pool=None, **kw):
    clf = PhaseClassifier(**kw).fit(train, held, pool=pool, n_generated=samples.shape[0])
    return clf.predict(samples, train)


def test_noise_is_off_manifold_not_generalized(digits):
    train, held, _, _ = digits
    g = torch.Generator().manual_seed(0)
    for noise in (2 * torch.rand(256, 64, generator=g, dtype=torch.float64) - 1, torch.randn(256, 64, generator=g)):
        counts = _classify(noise.double(), train, held).counts()
        assert counts["off_manifold"] >= 0.9 * 256, counts


def test_an_untrained_unet_is_off_manifold(digits):
    train, held, _, _ = digits
    torch.manual_seed(0)  # the network's random initialisation, as a fresh model would have it
    schedule = VPSchedule()
    net = NetworkConfig("unet", unet={"block_out_channels": [16, 32], "norm_num_groups": 4, "layers_per_block": 1})
    model = build_network(NetworkConfig.from_config(net.to_config()), (1, 8, 8), 1000).eval()
    den = VPNetworkDenoiser(model, schedule, timestep="continuous")
    sigmas = schedule.sampling_sigmas(20)
    x = initial_noise((128, 1, 8, 8), float(sigmas[0]), generator=torch.Generator().manual_seed(1), like=torch.zeros(0))
    with torch.no_grad():
        samples = sample_ddim(den, x, sigmas).reshape(128, 64).double()
    counts = _classify(samples, train, held).counts()
    assert counts["off_manifold"] >= 0.9 * 128, counts


def test_held_out_digits_are_generalized_and_copies_memorized(digits):
    train, held, unseen, _ = digits
    counts = _classify(held, train, held).counts()
    assert counts["generalized"] >= 0.9 * held.shape[0], counts
    # real digits outside both sets: each of the three tests errs on about 2% of real images
    counts = _classify(unseen, train, held).counts()
    assert counts["generalized"] >= 0.85 * unseen.shape[0], counts
    copies = train[torch.arange(128) % train.shape[0]]
    assert _classify(copies, train, held).counts()["memorized"] == 128


def test_three_class_view_merges_off_manifold_into_generalized(digits):
    train, held, unseen, _ = digits
    noise = torch.rand(50, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    result = _classify(torch.cat([unseen[:50], noise]), train, held)
    four, three = result.fractions(n_bootstrap=50), result.three_class_fractions(n_bootstrap=50)
    assert three["generalized"].value == pytest.approx(four["generalized"].value + four["off_manifold"].value)
    none = _classify(torch.cat([unseen[:50], noise]), train, held, quality="none")
    assert none.classes == ("memorized", "spurious", "generalized") and none.manifold_ratio is None
    assert none.fractions(n_bootstrap=50)["generalized"].value == pytest.approx(three["generalized"].value)


def test_manifold_calibration_accepts_the_stated_share_of_held_out_images(digits):
    _, held, unseen, _ = digits
    metric = PixelL2()
    manifold = fit_manifold(metric, metric.embed(held), k=3, quantile=0.95)  # the rule at any quantile
    # leave one out, by brute force: each held-out image against the other images' k-NN balls
    d = torch.cdist(held, held) / 8.0
    d.fill_diagonal_(math.inf)
    radii = d.topk(3, largest=False).values[:, 2]
    torch.testing.assert_close(manifold.radii, radii)
    loo = (d / radii[None, :]).min(1).values
    assert (loo <= manifold.scale).double().mean() == pytest.approx(0.95, abs=1 / held.shape[0])
    # unseen real digits pass at about the same rate
    passed = (manifold.ratio(metric, unseen) <= manifold.scale).double().mean()
    assert 0.85 <= float(passed) <= 1.0


def test_precision_recall_density_coverage_against_brute_force():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(60, 5, generator=g, dtype=torch.float64)
    fake = torch.cat([real[:30] + 0.01 * torch.randn(30, 5, generator=g, dtype=torch.float64), 50 + real[:20]])
    metric = PixelL2()
    manifold = fit_manifold(metric, real, k=3)
    q = quality_metrics(metric, fake, manifold, n_bootstrap=200)
    d = torch.cdist(fake, real) / math.sqrt(5)
    rr = knn_radii(metric, real, 3)
    fr = knn_radii(metric, fake, 3)
    inside = d <= rr[None]
    assert q["precision"].value == pytest.approx(float(inside.any(1).double().mean()))
    assert q["density"].value == pytest.approx(float(inside.double().sum(1).mean() / 3))
    assert q["coverage"].value == pytest.approx(float(inside.any(0).double().mean()))
    assert q["recall"].value == pytest.approx(float((d <= fr[:, None]).any(0).double().mean()))
    assert q["precision"].value == pytest.approx(30 / 50)  # the copies are inside, the far ones are not
    for e in q.values():
        assert e.low <= e.value <= e.high


def test_wilson_interval_is_never_empty():
    assert wilson_interval(0, 200, 0.95) == (0.0, pytest.approx(1.96**2 / (200 + 1.96**2), rel=1e-3))
    low, high = wilson_interval(200, 200, 0.95)
    assert high == 1.0 and low < 1.0
    low, high = wilson_interval(30, 100, 0.95)
    assert low < 0.3 < high and high - low == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 100), rel=0.05)


def test_the_copy_threshold_is_the_same_at_every_k(digits):
    _, held, _, pool = digits
    fixed = [PhaseClassifier(quality="none").fit(pool[:k], held, pool=pool).delta_m_ for k in (4, 64, 1000)]
    assert fixed[0] == fixed[1] == fixed[2]
    per_k = [PhaseClassifier(quality="none", copy_threshold="per_k").fit(pool[:k], held).delta_m_ for k in (4, 1000)]
    assert per_k[0] > per_k[1] and per_k[1] == pytest.approx(fixed[0], rel=0.2)  # loosens as K shrinks
