"""Memorization against K for trained models (SCIENCE.md §5, first measure): train one model per
nested training set, sample it, and count samples closer to the training set than held-out data is."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from diffmem.core import schedule_from_dict
from diffmem.io.data import load_dataset
from diffmem.viz.figures import memorization_plot
from diffmem.io.files import write_bytes_atomic, write_json_atomic
from diffmem.models.sampling import memorized_fraction, sample_denoiser, save_samples
from diffmem.models.train import TrainConfig, held_out_split, load_denoiser, train


def memorization_study(
    base: TrainConfig,
    ks: Sequence[int],
    out: str | Path,
    *,
    n_samples: int = 512,
    sample_steps: int = 50,
    quantile: float = 0.05,
    device: str = "cpu",
    progress: bool = True,
) -> list[dict]:
    """For each K: train (or resume) OUT/k-K, draw n_samples with DDIM, and report the fraction of
    samples whose nearest-training distance is below the `quantile` of the held-out images'
    nearest-training distances. Every K uses the same steps and the same held-out set."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"K values must be positive, got {list(ks)}")
    if base.n_held_out < 1:
        raise ValueError("the memorization measure needs held-out data: set n_held_out >= 1")
    out = Path(out)
    data = load_dataset(base.data, **base.data_options)
    rows = []
    for k in ks:
        config = replace(base, k=k)
        run = out / f"k-{k}"
        t0 = time.perf_counter()
        train(config, run, device=device, progress=progress)
        seconds = time.perf_counter() - t0
        den, _, train_x, event, _ = load_denoiser(run, device=device)
        samples, seeds = sample_denoiser(
            den, schedule_from_dict(config.schedule), n_samples, event, steps=sample_steps, device=device
        )
        held = data.x[held_out_split(config, len(data))]
        result = memorized_fraction(samples, train_x.cpu(), held, quantile=quantile)
        save_samples(run / "memorization_samples.npz", samples, seeds)
        rows.append({"K": k, "n_samples": n_samples, "n_held_out": len(held), "train_seconds": seconds, **result})
        write_json_atomic(out / "memorization.json", {"quantile": quantile, "config": base.to_dict(), "rows": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out / "memorization.csv", buf.getvalue().encode())
    memorization_plot(rows, out / "memorization.png", quantile=quantile, title=f"{base.data}: memorization vs K")
    return rows


__all__ = ["memorization_study"]
