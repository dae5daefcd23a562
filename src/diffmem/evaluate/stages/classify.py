"""Stage 'classify': memorized / spurious / generalized with calibrated thresholds and bootstrap
intervals (SCIENCE.md §5): classification.json, samples.csv (one row per sample), gallery.png."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from diffmem.evaluate.classify import ClassifyConfig
from diffmem.evaluate.quality import quality_metrics
from diffmem.evaluate.run import RunContext
from diffmem.evaluate.stages.base import Stage
from diffmem.io.files import write_csv_atomic, write_json_atomic
from diffmem.viz.figures import class_gallery


def run(ctx: RunContext, c: ClassifyConfig) -> list[Path]:
    samples, seeds = ctx.samples()
    clf = ctx.classifier()
    result = clf.classify_distances(ctx.distances(), clf.manifold_ratio(samples))
    boot = {"n_bootstrap": c.n_bootstrap, "seed": c.seed, "level": c.confidence}
    summary = {
        "K": ctx.k,
        "n_samples": len(result.labels),
        "metric": ctx.metric_config.name,
        "rule": result.rule,
        "classes": list(result.classes),
        "delta_m": result.delta_m,
        "delta_s": result.delta_s,
        "calibration": result.calibration,
        "counts": result.counts(),
        "fractions": {k: asdict(v) for k, v in result.fractions(**boot).items()},
        "three_class_fractions": {k: asdict(v) for k, v in result.three_class_fractions(**boot).items()},
        "distinct_nearest_training": int(result.distances.train_index.unique().numel()),
    }
    if clf.manifold_ is not None:
        quality = quality_metrics(clf.metric, clf.metric.embed(samples), clf.manifold_, **boot)
        summary["quality"] = {k: asdict(v) for k, v in quality.items()}
    write_csv_atomic(ctx.out / "samples.csv", result.rows(seeds.tolist()))
    write_json_atomic(ctx.out / "classification.json", summary)
    class_gallery(
        result,
        samples.reshape(-1, *ctx.event_shape).numpy(),
        ctx.train_x.reshape(-1, *ctx.event_shape).numpy(),
        ctx.out / "gallery.png",
        classes=result.classes,
        title=f"K = {ctx.k}: most and least typical samples per class",
    )
    return [ctx.out / "samples.csv", ctx.out / "classification.json", ctx.out / "gallery.png"]


STAGE = Stage("classify", "Classification", ClassifyConfig, run, ("sample", "distances"), result="classification.json")
