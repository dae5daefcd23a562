"""A fake study directory for the report tests: the files a K sweep writes, with small synthetic values.

Values are drawn from a seeded numpy generator, so tests recompute what the report should aggregate.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PARTS = ("study", "galleries", "basins", "energy", "curvature", "census", "collapse", "two_model", "landscape")
POINT_CLASSES = ("memorized", "spurious", "generalized", "training")
INJECTION = "<script>alert('x')</script> & \"quotes\""  # a config string that must come out escaped

# f_M, f_S, f_G per K: memorizing up to K = 16, spurious peak at K = 64, generalizing from K = 256
FRACTIONS = {4: (0.9, 0.05, 0.05), 16: (0.7, 0.2, 0.1), 64: (0.2, 0.45, 0.35), 256: (0.05, 0.15, 0.8)}
TRANSITIONS = {
    "last_memorizing_K": 16,
    "first_generalizing_K": 256,
    "spurious_peak_K": 64,
    "spurious_peak_fraction": 0.45,
}


def tiny_png(text: str, color: str = "tab:blue") -> bytes:
    fig, ax = plt.subplots(figsize=(2.0, 1.2), dpi=40)
    ax.imshow(np.linspace(-1, 1, 64).reshape(8, 8), cmap="gray_r")
    ax.set_title(text, fontsize=8, color=color)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def phase_rows(n_samples: int = 64, n_seeds: int = 2) -> list[dict]:
    rows = []
    for k, (fm, fs, fg) in FRACTIONS.items():
        row = {"K": k, "n_samples": n_samples, "n_seeds": n_seeds}
        for name, f in (("f_M", fm), ("f_S", fs), ("f_G", fg)):
            row.update({name: f, f"{name}_low": max(0.0, f - 0.08), f"{name}_high": min(1.0, f + 0.08)})
        row.update({"delta_m": 0.05, "delta_s": 0.04})
        rows.append(row)
    return rows


def make_study(
    root: Path, *, parts: tuple[str, ...] = PARTS, seeds: tuple[int, ...] = (0, 1), transitions: bool = True
) -> dict:
    """Write a study into root; returns the per-point values written, keyed by file and (K, class)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    phase = {"metric": "l2", "rows": phase_rows(n_seeds=len(seeds))}
    if transitions:
        phase["transitions"] = TRANSITIONS
    (root / "phase.json").write_text(json.dumps(phase))
    if "study" in parts:
        config = {"name": "toy-study", "data": {"name": "digits"}, "ks": list(FRACTIONS), "seeds": list(seeds)}
        config.update({"metric": {"name": "l2"}, "network": {"kind": "mlp"}, "comment": INJECTION})
        (root / "study.json").write_text(json.dumps({"config": config, "fingerprint": "0123456789abcdef" * 4}))
    written: dict = {"basins.csv": {}, "energy.csv": {}, "curvature.csv": {}, "collapse.csv": {}, "census": []}
    gallery = tiny_png("gallery") if "galleries" in parts else None
    for k in FRACTIONS:
        for seed in seeds:
            out = root / "jobs" / f"k-{k:04d}-seed-{seed}" / "analysis"
            out.mkdir(parents=True)
            (out / "classification.json").write_text(json.dumps({"K": k, "n_samples": 64, "metric": "l2"}))
            if gallery is not None:
                (out / "gallery.png").write_bytes(gallery)
            if "basins" in parts:
                rows = []
                for cls in POINT_CLASSES:
                    for i in range(3):
                        sigma_c = float(rng.uniform(0.05, 2.0)) if (i or cls != "generalized") else 0.0
                        status = "no_basin" if sigma_c == 0 else ("censored" if cls == "training" else "bracketed")
                        rows.append(
                            {
                                "class": cls,
                                "index": i,
                                "sigma_c": sigma_c,
                                "status": status,
                                "radius": float(rng.uniform(0, 3)),
                            }
                        )
                        written["basins.csv"].setdefault((k, cls), []).append(rows[-1])
                write_csv(out / "basins.csv", rows)
            if "energy" in parts:
                rows = [
                    {
                        "class": cls,
                        "index": i,
                        "energy_straight": float(rng.normal(-5, 2)),
                        "energy_arc": 0.0,
                        "discrepancy": float(rng.uniform(0, 0.1)),
                    }
                    for cls in POINT_CLASSES
                    for i in range(3)
                ]
                for r in rows:
                    written["energy.csv"].setdefault((k, r["class"]), []).append(r)
                write_csv(out / "energy.csv", rows)
            if "curvature" in parts:
                rows = [
                    {
                        "class": cls,
                        "index": i,
                        "lambda_min": float(rng.normal(1, 2)),
                        "lambda_max": float(rng.uniform(5, 25)),
                        "asymmetry": float(rng.uniform(0, 0.01)),
                    }
                    for cls in POINT_CLASSES
                    for i in range(3)
                ]
                for r in rows:
                    written["curvature.csv"].setdefault((k, r["class"]), []).append(r)
                write_csv(out / "curvature.csv", rows)
                (out / "curvature.json").write_text(json.dumps({"sigma": 0.2, "isotropic_curvature": 25.0}))
            if "collapse" in parts:
                rows = [
                    {
                        "index": i,
                        "class": cls,
                        "sigma_nearest": float(rng.uniform(0.01, 5)),
                        "sigma_posterior": float(rng.uniform(0.01, 5)),
                        "final_nearest": i,
                    }
                    for cls in POINT_CLASSES[:3]
                    for i in range(4)
                ]
                for r in rows:
                    written["collapse.csv"].setdefault((k, r["class"]), []).append(r)
                write_csv(out / "collapse.csv", rows)
            if "census" in parts:
                counts = {"memory": min(k, 20), "spurious": int(k == 64) * 3 + seed, "saddle": 2}
                shares = {"memory": 0.7, "spurious": 0.2, "saddle": 0.1}
                census = {"sigma": 0.2, "K": k, "n_starts": 50, "counts": counts, "shares": shares, "attractors": []}
                (out / "census.json").write_text(json.dumps(census))
                written["census"].append({"K": k, "seed": seed, **counts})
    if "two_model" in parts:
        rows = [
            {"K": k, "agreement": a, "mean_distance": 1 - a, "median_distance": 1 - a, "delta": 0.05, "n_samples": 64}
            for k, a in ((4, 0.0), (16, 0.05), (64, 0.4), (256, 0.9))
        ]
        (root / "two_model.json").write_text(json.dumps({"rows": rows}))
        written["two_model"] = rows
    if "landscape" in parts:
        (root / "landscape.png").write_bytes(tiny_png("landscape", "tab:red"))
        attractors = [{"kind": "memory"}, {"kind": "memory"}, {"kind": "spurious"}, {"kind": "saddle"}]
        panel = {"title": "circle, K = 9", "attractors": attractors, "ring_radius": None}
        (root / "landscape.json").write_text(json.dumps({"sigma": 0.25, "panels": [panel]}))
    return written
