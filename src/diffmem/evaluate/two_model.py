"""The two-model test (SCIENCE.md §6): two models trained on disjoint training sets of the same
size K, sampled from identical noise. Memorizing models return their own (different) training
images; generalizing models return nearly the same image. The agreement fraction against K is a
threshold-free view of the transition (delta only fixes what "the same image" means).

By default the two models also start from different weights and see different batches, timesteps
and noise (init 'independent', seeds from pair_seeds), so that shared randomness does not inflate
their agreement; init 'shared' trains both from the same seed, so that only the data differ."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from diffmem.evaluate.classify import PhaseClassifier
from diffmem.evaluate.metrics import MetricConfig, PixelL2, check_images, metric_from_config
from diffmem.io.config import AT_LEAST_1, MAX_SEED, POSITIVE, Section, choice, in_range
from diffmem.models.sampling import SamplingConfig, sample_with
from diffmem.models.train import held_out_split, load_denoiser

TWO_MODEL_INITS = ("independent", "shared")  # model b's training seed: its own, or model a's
PAIR_SEED_OFFSET = 1_000_003  # a prime far above the small seeds studies list (0, 1, 2, ...)


def pair_seeds(seed: int, init: str) -> tuple[int, int]:
    """The training seeds (a, b) of the two-model pair of job seed `seed`.

    'shared': (seed, seed), both models start from the same weights and draw the same batches,
    timesteps and noise. 'independent': (seed, (seed + PAIR_SEED_OFFSET) mod 2^63), inside the seed
    bounds [0, MAX_SEED] and never equal to seed; for the usual small seeds, above every seed listed."""
    in_range("seed", seed, low=0, high=MAX_SEED)
    choice("analyses.two_model.init", init, TWO_MODEL_INITS)
    if init == "shared":
        return seed, seed
    return seed, (seed + PAIR_SEED_OFFSET) % (MAX_SEED + 1)


@dataclass(frozen=True)
class Agreement:
    fraction: float  # share of noise seeds whose two samples lie within delta
    mean_distance: float
    median_distance: float
    delta: float
    n: int
    distances: Tensor  # (N,) per seed, in the metric's units


@dataclass(frozen=True)
class TwoModelConfig(Section):
    """Two models on disjoint training sets of size K, sampled from the same noise (SCIENCE.md §6)."""

    _key = "analyses.two_model"
    enabled: bool = False
    n_samples: int = 256
    delta: float | None = None  # 'the same image' within delta; null: the held-out calibration of delta_m
    ks: tuple[int, ...] | None = None  # the Ks to test (2K examples each); null: every K of the study
    init: str = "independent"  # 'independent': model b trains from its own seed (pair_seeds); 'shared': a's seed

    _bounds = {"n_samples": AT_LEAST_1, "delta": POSITIVE}

    def _check(self) -> None:
        choice(self._at("init"), self.init, TWO_MODEL_INITS)


def agreement(samples_a: Tensor, samples_b: Tensor, delta: float, *, metric=None) -> Agreement:
    """Agreement of two models' samples drawn from the same noise (row i of both from seed i)."""
    metric = metric or PixelL2()
    a, b = check_images(samples_a, "samples of model A"), check_images(samples_b, "samples of model B")
    if a.shape != b.shape:
        raise ValueError(
            f"the two models' samples differ in shape: {tuple(samples_a.shape)} vs {tuple(samples_b.shape)}"
        )
    if not (isinstance(delta, int | float) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be a positive number, got {delta!r}")
    ea, eb = metric.embed(samples_a), metric.embed(samples_b)
    d = metric.value((ea.double() - eb.double()).norm(dim=1), a.shape[1])
    return Agreement(
        float((d <= delta).double().mean()), float(d.mean()), float(d.median()), float(delta), int(d.shape[0]), d
    )


def runs_agreement(
    run_a: str | Path,
    run_b: str | Path,
    n_samples: int,
    *,
    delta: float | None = None,
    quantile: float = 0.02,
    metric: MetricConfig | None = None,
    sampling: SamplingConfig | None = None,
    device: str = "cpu",
    data_root: str | None = None,
) -> Agreement:
    """Agreement of two trained runs (diffmem train) sampled from the same seeds, n_samples each,
    with the sampler settings of `sampling` (its n_samples aside) in the `metric` (default pixel L2).

    delta None: the held-out calibration of the memorized threshold (the `quantile` of held-out
    images' distances to run A's training set), so "the same image" means as close as a copy."""
    s = sampling or SamplingConfig()
    samples = []
    for run in (run_a, run_b):
        trained = load_denoiser(run, device=device, data_root=data_root)
        event = trained.event_shape
        x, _ = sample_with(
            trained.denoiser, trained.schedule, event, s, n=n_samples, device=device, data_range=trained.data_range
        )
        samples.append(x)
        if not samples[1:]:  # run A: its training set calibrates delta
            config_a, train_a, data = trained.config, trained.train_x.cpu(), trained.data
    metric = metric_from_config(metric or MetricConfig(), event, device)
    if delta is None:
        if config_a.n_held_out < 2:
            raise ValueError("give delta or train with n_held_out >= 2 so that delta can be calibrated")
        held = data.x[held_out_split(config_a, len(data))]
        clf = PhaseClassifier(delta_s=1.0, metric=metric, quantile=quantile, copy_threshold="per_k", quality="none")
        delta = clf.fit(train_a, held).delta_m_  # "the same image": as close as a copy of A's training set
    return agreement(samples[0], samples[1], delta, metric=metric)


__all__ = [
    "PAIR_SEED_OFFSET",
    "TWO_MODEL_INITS",
    "Agreement",
    "TwoModelConfig",
    "agreement",
    "pair_seeds",
    "runs_agreement",
]
