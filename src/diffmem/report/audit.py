"""The files of an audit (diffmem.evaluate.audit) in a new run directory:

- summary.json: the verdict, the class fractions with intervals, the thresholds and how they were
  calibrated, the most-copied training images, the inputs and the conversion applied to them;
- samples.csv: per generated image its class, m, m2, s, manifold ratio and nearest training image;
- copies.csv: per copied training image how many samples copy it and whether it has a near-duplicate;
- duplicates.csv: pairs of training images closer than delta_m (duplicates drive memorization);
- extraction.png, distances.png: the closest pairs side by side, the nearest-distance distributions;
- samples.npz: the images drawn from a model (with their seeds), when a model was audited;
- report.html: all of it on one self-contained page.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from diffmem.evaluate.audit import AuditResult
from diffmem.io.files import prepare_out_dir, write_bytes_atomic, write_csv_atomic, write_json_atomic, write_npz_atomic
from diffmem.viz.audit_figures import distance_figure, extraction_figure
from diffmem.viz.html import CSS, escape, figure, fmt, table

AUDIT_PREFIX = "diffmem-audit"
SAMPLE_COLUMNS = (
    "index",
    "name",
    "class",
    "m",
    "m2",
    "s",
    "manifold_ratio",
    "nearest_train",
    "nearest_train_name",
    "nearest_generated",
)
COPY_COLUMNS = ("train_index", "name", "n_copies", "closest_copy", "nearest_other_training", "duplicate_of")
DUPLICATE_COLUMNS = ("a", "b", "name_a", "name_b", "distance")
CLASS_LABELS = {
    "memorized": "memorized (copies)",
    "spurious": "spurious",
    "generalized": "generalized",
    "off_manifold": "off-manifold",
}


def audit_dir(out: str | os.PathLike | None) -> Path:
    """A new ./diffmem-audit-NNNNN, or the user's --out, which must not hold an audit already."""
    if out is not None and ((Path(out) / "summary.json").exists() or (Path(out) / "report.html").exists()):
        raise ValueError(f"{out} already holds an audit; choose another --out (nothing there is overwritten)")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    return prepare_out_dir(out, AUDIT_PREFIX)


def write_audit(result: AuditResult, out: str | os.PathLike | None = None) -> Path:
    """Write the audit's files (see the module docstring) and return the directory."""
    out = audit_dir(out)
    c, size_mode = result.classification, (result.image["shape"][-1], result.image["mode"])
    write_csv_atomic(out / "samples.csv", result.sample_rows(), SAMPLE_COLUMNS)
    write_csv_atomic(out / "copies.csv", result.copies, COPY_COLUMNS)
    write_csv_atomic(out / "duplicates.csv", result.duplicates, DUPLICATE_COLUMNS)
    if result.model is not None and result.samples.pixels is not None:
        seeds = np.asarray([int(n.split()[-1]) for n in result.samples.names], dtype=np.int64)
        write_npz_atomic(out / "samples.npz", samples=result.samples.pixels, seeds=seeds)
    figures = {}
    if result.pairs:
        d = c.distances
        figures["extraction.png"] = extraction_figure(
            result.samples.images(result.pairs, *size_mode),
            result.train.images([int(d.train_index[i]) for i in result.pairs], *size_mode),
            [float(d.m[i]) for i in result.pairs],
            [c.labels[i] for i in result.pairs],
            delta_m=result.thresholds["delta_m"],
            metric=result.thresholds["metric"],
        )
    figures["distances.png"] = distance_figure(
        c.distances.m.numpy(),
        result.reference_distances,
        delta_m=result.thresholds["delta_m"],
        metric=result.thresholds["metric"],
        reference=_reference_name(result),
    )
    for name, png in figures.items():
        write_bytes_atomic(out / name, png)
    summary = result.summary()
    summary["files"] = sorted([*figures, "samples.csv", "copies.csv", "duplicates.csv", "report.html"])
    write_json_atomic(out / "summary.json", summary)
    write_bytes_atomic(out / "report.html", audit_html(result, figures).encode())
    return out


def _reference_name(result: AuditResult) -> str:
    if result.calibration == "held_out":
        return "held-out images"
    return "training images, leave one out"


def fraction_rows(result: AuditResult) -> list[list]:
    rows = []
    for cls, f in result.fractions.items():
        rows.append([CLASS_LABELS[cls], round(f.value * f.n), f"{f.value:.3f} [{f.low:.3f}, {f.high:.3f}]"])
    return rows


def audit_html(result: AuditResult, figures: dict[str, bytes]) -> str:
    """The self-contained page of an audit."""
    t = result.thresholds
    inputs = [("training images", f"{result.train.source} ({len(result.train)})")]
    if result.held_out is not None:
        inputs.append(("held-out images", f"{result.held_out.source} ({len(result.held_out)})"))
    if result.model is not None:
        m = result.model
        inputs.append(
            (
                "model",
                f"{m['source']} ({m['scheduler']}, {m['sampler']} {m['steps']} steps, "
                f"prediction {m['prediction_type']}, seed {m['seed']})",
            )
        )
    inputs.append(("generated images", f"{result.samples.source} ({len(result.samples)})"))
    inputs.append(("image size", f"{result.image['shape']} ({result.image['mode']}); others converted to it"))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>diffmem audit</title><style>{CSS}</style></head><body><main>",
        "<h1>Audit: is the model copying its training images?</h1>",
        f"<p class='transitions'><b>Verdict.</b> {escape(result.verdict())}.</p>",
        "<p class='meta'>" + "<br>".join(f"<b>{escape(k)}</b>: {escape(v)}" for k, v in inputs) + "</p>",
    ]
    if result.calibration == "leave_one_out":
        parts.append(
            "<p class='notes'>No held-out images were given: the thresholds are calibrated on the training images "
            "themselves (each against the others). This is weaker than held-out calibration: near-duplicates in "
            "the training data pull delta_m down, and the manifold test is that of the training images.</p>"
        )
    parts.append("<h2 id='classes'>Classes of the generated images</h2>")
    parts.append(table(["class", "samples", "fraction [95% interval]"], fraction_rows(result), text_columns=1))
    parts.append(
        "<p>"
        + escape(
            f"memorized: nearest training image within delta_m = {fmt(t['delta_m'], 4)} ({t['metric']}), the "
            f"{t['quantile']:g} quantile of unseen real images' nearest training distances; spurious: another sample "
            f"within delta_s = {fmt(t['delta_s'], 4)}; generalized or off-manifold by the {t['manifold_k']}-NN "
            f"manifold test (scale {fmt(t['manifold_scale'], 3)}, accepting {t['manifold_quantile']:g} of unseen "
            "real images). Intervals: bootstrap over samples widened to Wilson's, never empty at 0 or 1."
        )
        + "</p>"
    )
    if t["calibration"].get("density_matched") is False:
        parts.append(
            "<p class='notes'>"
            + escape(
                f"delta_s is not density-matched: {t['calibration'].get('n_held_out')} reference images against "
                f"{result.n_samples} samples, so it is too large (nearest-neighbour distances shrink as a set grows) "
                "and errs towards calling samples spurious."
            )
            + "</p>"
        )
    if result.quality is not None:
        rows = [[k, f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"] for k, e in result.quality.items()]
        parts.append(table(["against held-out images", "value [95% interval]"], rows, text_columns=1))
    if "extraction.png" in figures:
        parts.append("<h2 id='extraction'>Closest pairs</h2>")
        parts.append(
            figure(
                figures["extraction.png"],
                "closest generated and training pairs",
                "Each sample above its nearest training image, closest first. A framed pair is a copy.",
            )
        )
    parts.append("<h2 id='copies'>Which training images are copied</h2>")
    if result.copies:
        rows = [
            [r["name"], r["n_copies"], fmt(r["closest_copy"], 4), r["duplicate_of"] or "-"] for r in result.copies[:50]
        ]
        parts.append(table(["training image", "copies", "closest copy", "near-duplicate in training"], rows, 1))
        if len(result.copies) > 50:
            parts.append(f"<p class='meta'>{len(result.copies) - 50} more in copies.csv.</p>")
    else:
        parts.append("<p>No generated image is a copy of a training image.</p>")
    parts.append("<h2 id='duplicates'>Near-duplicates in the training data</h2>")
    if result.duplicates:
        rows = [[r["name_a"], r["name_b"], fmt(r["distance"], 4)] for r in result.duplicates[:50]]
        parts.append(
            "<p>Training images closer than delta_m to another training image: a model sees such an image several "
            "times per epoch, which drives its memorization.</p>" + table(["image", "duplicate", "distance"], rows, 2)
        )
    else:
        parts.append("<p>No two training images are closer than delta_m.</p>")
    parts.append("<h2 id='distances'>Distances to the training set</h2>")
    parts.append(
        figure(
            figures["distances.png"],
            "nearest training distances",
            f"Generated samples against {_reference_name(result)}: copies sit left of the dashed line.",
        )
    )
    if result.basins:
        rows = [
            [
                r["name"],
                r["n_copies"],
                fmt(r["sigma_c"]),
                f"[{fmt(r['sigma_c_low'])}, {fmt(r['sigma_c_high'])}]",
                r["status"],
            ]
            for r in result.basins
        ]
        parts.append("<h2 id='basins'>Basins of the copied images</h2>")
        parts.append(
            "<p>The noise level sigma_c up to which the model, started from a noised copy of the image, returns it "
            "with probability 0.9 (SCIENCE.md §6): a wide basin is a strong memory.</p>"
            + table(["training image", "copies", "sigma_c", "90% interval", "status"], rows, 1)
        )
    parts.append(
        "<details><summary>Summary (JSON)</summary><pre>"
        + escape(json.dumps(result.summary(), indent=2, default=str))
        + "</pre></details>"
    )
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


__all__ = ["AUDIT_PREFIX", "audit_dir", "audit_html", "write_audit"]
