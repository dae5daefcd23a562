"""The two-model test (SCIENCE.md §6): two models trained on disjoint training sets of the same
size K, sampled from identical noise. Memorizing models return their own (different) training
images; generalizing models return nearly the same image. The agreement fraction against K is a
threshold-free view of the transition (delta only fixes what "the same image" means)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from diffmem.evaluate.metrics import PixelL2, check_images


@dataclass(frozen=True)
class Agreement:
    fraction: float  # share of noise seeds whose two samples lie within delta
    mean_distance: float
    median_distance: float
    delta: float
    n: int
    distances: Tensor  # (N,) per seed, in the metric's units


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
    quantile: float = 0.05,
    metric_options: dict | None = None,
    sample_options: dict | None = None,
    device: str = "cpu",
) -> Agreement:
    """Agreement of two trained runs (diffmem train) sampled from the same seeds.

    delta None: the held-out calibration of the memorized threshold (the `quantile` of held-out
    images' distances to run A's training set), so "the same image" means as close as a copy.
    metric_options: keyword arguments of diffmem.evaluate.metrics.make_metric (name, lpips_net, ...);
    sample_options: of diffmem.models.sampling.sample_denoiser (sampler, steps, eta, seed, batch_size)."""
    from diffmem.evaluate.classify import PhaseClassifier
    from diffmem.core import schedule_from_dict
    from diffmem.io.data import load_dataset
    from diffmem.evaluate.metrics import make_metric
    from diffmem.models.sampling import sample_denoiser
    from diffmem.models.train import held_out_split, load_denoiser

    samples = []
    for run in (run_a, run_b):
        den, config, train_x, event, _ = load_denoiser(run, device=device)
        s, _ = sample_denoiser(
            den, schedule_from_dict(config.schedule), n_samples, event, device=device, **(sample_options or {})
        )
        samples.append(s)
        if not samples[1:]:  # run A: its training set calibrates delta
            config_a, train_a = config, train_x.cpu()
    options = dict(metric_options or {"name": "l2"})
    metric = make_metric(options.pop("name"), event, device=device, **options)
    if delta is None:
        if config_a.n_held_out < 2:
            raise ValueError("give delta or train with n_held_out >= 2 so that delta can be calibrated")
        data = load_dataset(config_a.data, dtype=torch.float32, **config_a.data_options)
        held = data.x[held_out_split(config_a, len(data))]
        delta = PhaseClassifier(delta_s=1.0, metric=metric, quantile=quantile).fit(train_a, held).delta_m_
    return agreement(samples[0], samples[1], delta, metric=metric)


def two_model_study(
    base,
    ks: Sequence[int],
    out: str | Path,
    *,
    n_samples: int = 256,
    sample_steps: int = 50,
    delta: float | None = None,
    quantile: float = 0.05,
    device: str = "cpu",
    progress: bool = True,
) -> list[dict]:
    """For each K: train models on the disjoint sets 'pair_a' and 'pair_b' (OUT/k-K-a, OUT/k-K-b,
    resumable), sample both from the same seeds, and measure their agreement.

    delta None: the held-out calibration of the memorized threshold (the `quantile` of held-out
    images' distances to model A's training set), so "the same image" means as close as a copy."""
    from diffmem.viz.figures import two_model_plot
    from diffmem.io.files import write_json_atomic
    from diffmem.models.train import train

    ks = [int(k) for k in ks]
    if not ks or ks != sorted(set(ks)) or ks[0] < 1:
        raise ValueError(f"K values must be positive, unique and sorted ascending, got {list(ks)}")
    if delta is None and base.n_held_out < 2:
        raise ValueError("give delta or train with n_held_out >= 2 so that delta can be calibrated")
    out = Path(out)
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        for side in ("a", "b"):
            train(replace(base, k=k, subset=f"pair_{side}"), out / f"k-{k}-{side}", device=device, progress=progress)
        result = runs_agreement(
            out / f"k-{k}-a",
            out / f"k-{k}-b",
            n_samples,
            delta=delta,
            quantile=quantile,
            sample_options={"steps": sample_steps},
            device=device,
        )
        rows.append(
            {
                "K": k,
                "n_samples": n_samples,
                "delta": result.delta,
                "agreement": result.fraction,
                "mean_distance": result.mean_distance,
                "median_distance": result.median_distance,
                "seconds": time.perf_counter() - t0,
            }
        )
        write_json_atomic(out / "two_model.json", {"config": base.to_dict(), "rows": rows})
    two_model_plot(rows, out / "two_model.png", title=f"{base.data}: two models on disjoint training sets")
    return rows


__all__ = ["Agreement", "agreement", "runs_agreement", "two_model_study"]
