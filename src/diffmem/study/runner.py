"""A K sweep as one resumable study (SCIENCE.md §5-§6): one job per (K, seed) in a crash-safe run
store, run by a local, process-pool or Ray executor, aggregated into the phase diagram.

Layout of a study directory DIR:

  DIR/study.json                     the resolved configuration and its fingerprint
  DIR/metrics.jsonl                  the driver's append-only log
  DIR/k-0032-seed-0/run/             the trained model (checkpoint, config, training metrics)
  DIR/k-0032-seed-0/analysis/        samples, distances, classification, basins, energy, ... (analysis.py)
  DIR/k-0032-seed-0/manifest.json    stages done, with content hashes of their outputs
  DIR/w-0128-k-0032-seed-0/          the same job for network size 128, in a study over sizes (no k-... folders)
  DIR/two-model-k-0032-seed-0/       the two-model test at K = 32: runs a/ and b/, agreement.json
  DIR/phase.json, DIR/phase.csv      f_M, f_S, f_G per K (per size and K) with bootstrap intervals; the
                                     transition points, on the grid and interpolated (transition_table)
  DIR/two_model.json                 agreement against K (when enabled)
  DIR/report/report.html             the report (diffmem report DIR)

A job runs its stages in order and skips those the manifest records as done with unchanged
outputs and inputs, so a killed study resumes where it stopped and ends with the same results as an
uninterrupted run (training resumes from its last checkpoint, bit-exact on the CPU; a checkpoint
carries a random save id, so its tensors, not its bytes, are equal).

Execution settings (device, executor, sampling batch size) come from the command that runs the
study, not from study.json: they do not change results, so a study started on one machine can be
finished on another.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from diffmem.evaluate.analysis import RunAnalysis
from diffmem.evaluate.classify import (
    FRACTION_KEYS,
    THREE_CLASSES,
    bootstrap_fractions,
    interpolated_transitions,
    transition_points,
)
from diffmem.evaluate.stages import STAGES, TRAIN
from diffmem.evaluate.two_model import pair_seeds, runs_agreement
from diffmem.io.data import load_dataset
from diffmem.io.files import read_jsonl, write_csv_atomic, write_json_atomic
from diffmem.models.train import METRICS_FILE, train
from diffmem.study.config import StudyConfig, job_size, sized_job_name
from diffmem.study.executors import JobSpec, run_jobs
from diffmem.study.store import StudyStore, job_name, study_status

TWO_MODEL_PREFIX = "two-model-"


def stage_inputs(stage: str) -> tuple[str, ...]:
    """What a stage reads: redoing a stage invalidates only the stages that read its outputs."""
    return STAGES[stage].inputs


def job_stages(c: StudyConfig) -> tuple[str, ...]:
    """train, then the analysis stages this study runs, in order."""
    return (TRAIN, *c.analysis_config().stages())


@contextlib.contextmanager
def _job_threads(c: StudyConfig) -> Iterator[None]:
    """A job on the CPU runs on executor.cpus_per_job torch threads whatever the executor: the thread
    count sets the order of float reductions, so local, pool and Ray jobs give the same bits."""
    if torch.device(c.device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(c.executor.cpus_per_job)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execution_settings(c: StudyConfig) -> dict:
    """The settings of a study that change how, not what, it computes: the device, the executor, the
    sampling batch size, and where a file-based dataset is now (data.options.root)."""
    return {
        "device": c.device,
        "executor": c.executor.to_dict(),
        "batch_size": c.sampling.batch_size,
        "data_root": c.data.options.get("root"),
    }


def _fingerprint_of(config: dict) -> str:
    """The fingerprint a stored study config has (the store checks it on every open)."""
    return StudyConfig.from_dict(config).fingerprint()


def _job_config(store: StudyStore, execution: dict | None) -> StudyConfig:
    """The study's config with the driver's execution settings."""
    d = store.config
    if execution is not None:
        d = {**d, "device": execution["device"], "executor": execution["executor"]}
        d["sampling"] = {**d["sampling"], "batch_size": execution["batch_size"]}
        if execution.get("data_root") is not None:
            d["data"] = {**d["data"], "options": {**d["data"]["options"], "root": execution["data_root"]}}
    return StudyConfig.from_dict(d)


def run_study_job(spec: JobSpec, execution: dict | None = None) -> dict:
    """One (K, seed) job: train, then analyse; every stage is skipped when already done.
    Module-level so process pools and Ray can import it; `execution` carries the driver's device,
    executor and batch size (default: those stored with the study)."""
    store = StudyStore.open(spec.root, fingerprint_of=_fingerprint_of)
    config = _job_config(store, execution)
    size = job_size(spec.name)
    if size is not None:  # a job of a study over sizes runs as the job of the single-size study of its size
        config = config.sized(size)
    with _job_threads(config):
        if spec.name.startswith(TWO_MODEL_PREFIX):
            return _run_two_model_job(store, config, spec)
        return _run_phase_job(store, config, spec)


def _run_phase_job(store: StudyStore, config: StudyConfig, spec: JobSpec) -> dict:
    """Train on the nested set of size K, then the analysis stages."""
    job = store.job(spec.name)
    fp = config.job_fingerprint(spec.k, spec.seed)
    run_dir = job.path / "run"
    seconds: dict[str, float] = {}
    with job.lock():

        def train_stage(_job) -> list[Path]:
            train(config.train_config(spec.k, spec.seed), run_dir, device=config.device, progress=False)
            return [run_dir / "checkpoint.safetensors", run_dir / "checkpoint.json", run_dir / "config.json"]

        seconds["train"] = job.run_stage("train", train_stage, fp, inputs=()).seconds
        analysis: RunAnalysis | None = None
        for stage in job_stages(config)[1:]:

            def analysis_stage(_job, stage=stage) -> list[Path]:
                nonlocal analysis
                if analysis is None:
                    analysis = RunAnalysis(
                        run_dir,
                        config.analysis_config(),
                        device=config.device,
                        out_dir=job.path / "analysis",
                        data_root=config.data.options.get("root"),
                    )
                return analysis.run(stage)

            seconds[stage] = job.run_stage(stage, analysis_stage, fp, inputs=stage_inputs(stage)).seconds
    summary = json.loads((job.path / "analysis" / "classification.json").read_text())
    return {"name": spec.name, "K": spec.k, "seed": spec.seed, "seconds": seconds, "classification": summary}


def _run_two_model_job(store: StudyStore, config: StudyConfig, spec: JobSpec) -> dict:
    """Train models a and b on the two disjoint sets of size K, from the training seeds of
    analyses.two_model.init (two_model.pair_seeds), then their agreement from the same noise."""
    job = store.job(spec.name)
    fp = config.job_fingerprint(spec.k, spec.seed)
    two = config.analyses.two_model
    seeds = dict(zip(("a", "b"), pair_seeds(spec.seed, two.init), strict=True))
    with job.lock():
        for side in ("a", "b"):

            def train_side(_job, side=side) -> list[Path]:
                run = job.path / side
                tc = replace(config.train_config(spec.k, spec.seed, subset=f"pair_{side}"), seed=seeds[side])
                train(tc, run, device=config.device, progress=False)
                return [run / "checkpoint.safetensors", run / "checkpoint.json", run / "config.json"]

            job.run_stage(f"train_{side}", train_side, fp, inputs=())

        def agree(_job) -> list[Path]:
            r = runs_agreement(
                job.path / "a",
                job.path / "b",
                two.n_samples,
                delta=two.delta,
                quantile=config.classify.quantile,
                metric=config.metric,
                sampling=config.sampling,
                device=config.device,
                data_root=config.data.options.get("root"),
            )
            out = job.path / "agreement.json"
            write_json_atomic(
                out,
                {
                    "K": spec.k,
                    "seed": spec.seed,
                    "init": two.init,
                    "seed_a": seeds["a"],
                    "seed_b": seeds["b"],
                    "n_samples": r.n,
                    "delta": r.delta,
                    "agreement": r.fraction,
                    "mean_distance": r.mean_distance,
                    "median_distance": r.median_distance,
                },
            )
            return [out]

        job.run_stage("agreement", agree, fp, inputs=("train_a", "train_b"))
    return {"name": spec.name, "K": spec.k, "seed": spec.seed, **json.loads((job.path / "agreement.json").read_text())}


@dataclass(frozen=True)
class StudyResult:
    out: Path
    rows: list[dict]  # the phase table: one row per K (per size and K, with a size column, in a study over sizes)
    transitions: dict  # transition_points of the rows; over sizes, one such dict per size keyed by str(size)
    two_model: list[dict]
    seconds: float
    transition_table: list[dict] = field(default_factory=list)  # transition_table(rows): A, B, peak per size


def _pooled_fractions(labels_by_seed: list[list[str]], classes: tuple[str, ...], c) -> dict:
    """The class fractions of one K over every seed's samples, with intervals that include the
    variation between the seeds' trained models (classify.bootstrap_fractions), as phase-table
    columns f_M, f_S, f_G (and f_O), plus f_G3 of the three-class view (off-manifold counted as
    generalized)."""
    boot = {"n_bootstrap": c.n_bootstrap, "seed": c.seed, "level": c.confidence}
    fr = bootstrap_fractions(labels_by_seed, classes=classes, **boot)
    out = {}
    for cls, f in fr.items():
        key = FRACTION_KEYS[cls]
        out[key], out[f"{key}_low"], out[f"{key}_high"] = f.value, f.low, f.high
    if "off_manifold" in classes:
        merged = [["generalized" if x == "off_manifold" else x for x in labels] for labels in labels_by_seed]
        g3 = bootstrap_fractions(merged, classes=THREE_CLASSES, **boot)["generalized"]
        out["f_G3"], out["f_G3_low"], out["f_G3_high"] = g3.value, g3.low, g3.high
    return out


def _pooled_quality(summaries: list[dict]) -> dict:
    """Precision, recall, density and coverage of one K: the mean over seeds, the widest interval."""
    out = {}
    for name in ("precision", "recall", "density", "coverage"):
        values = [s["quality"][name] for s in summaries if name in s.get("quality", {})]
        if values:
            out[name] = sum(v["value"] for v in values) / len(values)
            out[f"{name}_low"], out[f"{name}_high"] = min(v["low"] for v in values), max(v["high"] for v in values)
    return out


def _two_model_by_k(per_seed: list[dict]) -> list[dict]:
    """Agreement per K: means over seeds, with their range."""
    rows = []
    for k in sorted({r["K"] for r in per_seed}):
        rs = [r for r in per_seed if r["K"] == k]
        mean = {
            key: sum(r[key] for r in rs) / len(rs) for key in ("agreement", "mean_distance", "median_distance", "delta")
        }
        rows.append(
            {
                "K": k,
                **mean,
                "agreement_min": min(r["agreement"] for r in rs),
                "agreement_max": max(r["agreement"] for r in rs),
                "n_samples": sum(r["n_samples"] for r in rs),
                "n_seeds": len(rs),
            }
        )
    return rows


def _job_labels(out: Path, name: str) -> tuple[list[str], dict]:
    """The classes of one job's samples and its classification summary."""
    adir = out / name / "analysis"
    summary = json.loads((adir / "classification.json").read_text())
    labels = [r["class"] for r in csv.DictReader(io.StringIO((adir / "samples.csv").read_text()))]
    return labels, summary


def _phase_row(out: Path, config: StudyConfig, k: int, size: int | None) -> dict:
    """One row of the phase table: the seeds of (size, K) pooled."""
    c = config.classify
    per_seed = [_job_labels(out, sized_job_name(k, seed, size)) for seed in config.seeds]
    labels = [lab for lab, _ in per_seed]
    dm = [s["delta_m"] for _, s in per_seed]
    ds = [s["delta_s"] for _, s in per_seed]
    row = {} if size is None else {"size": size}
    row.update({"K": k, "n_samples": sum(map(len, labels)), "n_seeds": len(config.seeds)})
    classes = tuple(per_seed[0][1].get("classes", THREE_CLASSES))
    row.update(_pooled_fractions(labels, classes, c))
    row.update(_pooled_quality([s for _, s in per_seed]))
    row["delta_m"] = None if None in dm else sum(dm) / len(dm)
    row["delta_s"] = sum(ds) / len(ds)
    return row


def rows_by_size(rows: list[dict]) -> dict[int | None, list[dict]]:
    """The phase rows of each network size, sorted by K (one group, keyed None, without a size column)."""
    groups: dict[int | None, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("size"), []).append(r)
    return {size: sorted(g, key=lambda r: r["K"]) for size, g in sorted(groups.items(), key=lambda kv: kv[0] or 0)}


def phase_transitions(rows: list[dict]) -> dict:
    """transition_points of the rows; in a study over sizes, those of each size keyed by str(size) (JSON keys)."""
    groups = rows_by_size(rows)
    if None in groups:
        return transition_points(groups[None])
    return {str(size): transition_points(g) for size, g in groups.items()}


def transition_table(rows: list[dict]) -> list[dict]:
    """A, B and the spurious peak of each size (classify.interpolated_transitions), one row each with the
    sweep's ends K_min and K_max (a point 'below' or 'above' the sweep lies past one of them)."""
    table = []
    for size, group in rows_by_size(rows).items():
        head = {} if size is None else {"size": size}
        ends = {"K_min": group[0]["K"], "K_max": group[-1]["K"], "n_K": len(group)}
        table.append({**head, **ends, **interpolated_transitions(group).to_dict()})
    return table


def aggregate_phase(out: Path, config: StudyConfig) -> tuple[list[dict], dict]:
    """The phase table (seeds of one K pooled; one row per size and K in a study over sizes) and its transition
    points, written to phase.json and phase.csv; nothing under run 'two_model'."""
    ks = sorted({j.k for j in config.jobs()})
    rows = [_phase_row(out, config, k, size) for size in config.sizes or (None,) for k in ks]
    if not rows:
        return [], {}
    transitions = phase_transitions(rows)
    phase = {"metric": config.metric.name, "confidence": config.classify.confidence}
    if config.sizes:
        phase.update(size_axis=config.size_axis, sizes=list(config.sizes))
    phase.update(rows=rows, transitions=transitions, transition_table=transition_table(rows))
    write_json_atomic(out / "phase.json", phase)
    write_csv_atomic(out / "phase.csv", rows)
    return rows, transitions


def aggregate_two_model(out: Path, config: StudyConfig) -> list[dict]:
    """Agreement against K (two_model.json) from the two-model jobs; [] when there are none."""
    per_seed = [
        json.loads((out / f"{TWO_MODEL_PREFIX}{job_name(k, seed)}" / "agreement.json").read_text())
        for k in config.two_model_ks()
        for seed in config.seeds
    ]
    two_rows = _two_model_by_k(per_seed)
    if two_rows:
        write_json_atomic(out / "two_model.json", {"rows": two_rows, "per_seed": per_seed})
    return two_rows


def aggregate(out: str | Path, config: StudyConfig) -> tuple[list[dict], dict, list[dict]]:
    """phase.json / phase.csv from the jobs' classifications, and two_model.json from the two-model jobs."""
    out = Path(out)
    rows, transitions = aggregate_phase(out, config)
    return rows, transitions, aggregate_two_model(out, config)


def study_jobs(config: StudyConfig, out: Path) -> list[JobSpec]:
    specs = [JobSpec(j.k, j.seed, root=str(out), name=j.name) for j in config.jobs()]
    for k in config.two_model_ks():
        for seed in config.seeds:
            specs.append(JobSpec(k, seed, root=str(out), name=f"{TWO_MODEL_PREFIX}{job_name(k, seed)}"))
    return specs


TRAIN_RUN_DIRS = {"train": "run", "train_a": "a", "train_b": "b"}  # a job's training stage -> its run folder


@dataclass(frozen=True)
class TrainingProgress:
    """Where one job's training is, from its run's metrics.jsonl (written every log_every steps)."""

    job: str
    stage: str  # 'train', or 'train_a' / 'train_b' of the two-model test
    status: str  # the stage's status in the store: running, interrupted, failed
    step: int  # the last logged step
    steps: int  # the run's total
    loss: float | None  # the mean loss since the previous record
    seconds: float | None  # training time up to that step

    @property
    def eta_seconds(self) -> float | None:
        """The remaining time at the rate so far (None before the first record)."""
        if not self.step or not self.seconds:
            return None
        return self.seconds / self.step * (self.steps - self.step)

    def line(self) -> str:
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        eta = self.eta_seconds
        left = "" if eta is None or self.status != "running" else f", about {_duration(eta)} left"
        return f"{self.job} {self.stage}: step {self.step}/{self.steps}, loss {loss} ({self.status}{left})"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def training_progress(root: str | Path) -> list[TrainingProgress]:
    """Every training stage of the study at root that has started and not finished: its last logged step
    and loss, and the time left at its rate so far."""
    out = []
    for row in study_status(root):
        if row.stage not in TRAIN_RUN_DIRS or row.status == "done":
            continue
        run = Path(root) / row.job / TRAIN_RUN_DIRS[row.stage]
        records = [r for r in read_jsonl(run / METRICS_FILE) if isinstance(r.get("step"), int)]
        try:
            steps = int(json.loads((run / "config.json").read_text())["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not started far enough to have written its configuration
        last = records[-1] if records else {}
        loss, seconds = last.get("loss"), last.get("seconds")
        out.append(
            TrainingProgress(
                row.job,
                row.stage,
                row.status,
                int(last.get("step", 0)),
                steps,
                float(loss) if isinstance(loss, int | float) else None,
                float(seconds) if isinstance(seconds, int | float) else None,
            )
        )
    return out


def _training_postfix(root: Path) -> str:
    """The jobs bar's note while jobs train: each running training's step and loss."""
    try:
        running = [p for p in training_progress(root) if p.status == "running"]
    except ValueError:  # a manifest being rewritten: the next poll reads it
        return ""
    return "; ".join(f"{p.job} step {p.step}/{p.steps} loss {p.loss:.3f}" for p in running if p.loss is not None)


def run_study(
    config: StudyConfig,
    out: str | Path,
    *,
    progress: bool = True,
) -> StudyResult:
    """Run (or resume) every job of the study in DIR = out with the configured executor, then write
    the phase table (diffmem.report.write_report draws the report from it). A directory made by a different
    configuration is refused."""
    t0 = time.perf_counter()
    out = Path(out).resolve()
    data = load_dataset(config.data.name, **config.data.options)
    config.check_dataset_size(len(data))
    store = StudyStore.create_or_open(out, config.to_dict(), config.fingerprint(), fingerprint_of=_fingerprint_of)
    store.log_metrics({"event": "study_start", "executor": config.executor.kind})
    run_jobs(
        study_jobs(config, out),
        partial(run_study_job, execution=execution_settings(config)),
        config.executor,
        progress=progress,
        monitor=partial(_training_postfix, out),
    )
    rows, transitions, two_rows = aggregate(out, config)
    seconds = time.perf_counter() - t0
    store.log_metrics({"event": "study_done", "seconds": seconds})
    table = transition_table(rows) if rows else []
    return StudyResult(out, rows, transitions, two_rows, seconds, table)


def format_phase_table(rows: list[dict]) -> str:
    """The phase table as text: (the size,) K, N and each class fraction with its interval."""
    names = [(cls, key) for cls, key in FRACTION_KEYS.items() if rows and key in rows[0]]
    sized = bool(rows) and "size" in rows[0]
    head = f"{'size':>6} " if sized else ""
    lines = [f"{head}{'K':>6} {'N':>6} " + " ".join(f"{cls.replace('_', '-'):>20}" for cls, _ in names)]
    for r in rows:
        cells = [f"{r[k]:.3f} [{r[k + '_low']:.2f}, {r[k + '_high']:.2f}]" for _, k in names]
        size = f"{r['size']:>6} " if sized else ""
        lines.append(f"{size}{r['K']:>6} {r['n_samples']:>6} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def format_k(k: float | None) -> str:
    """A training-set size estimated between grid values: three significant digits, thousands separated."""
    if k is None:
        return "-"
    return f"{k:.3g}" if k < 100 else f"{round(k, -int(math.floor(math.log10(k))) + 2):,.0f}"


def transition_cell(row: dict, prefix: str) -> str:
    """One point of a transition_table row as text: 'K [low, high]', '< K_min' or '> K_max' when the sweep
    does not hold it, with '<' or '>' for an interval end past the sweep."""
    where = row[f"{prefix}_where"]
    if where == "none":
        return "none"
    k_min, k_max = format_k(row["K_min"]), format_k(row["K_max"])
    point = {"inside": format_k(row[f"{prefix}_K"]), "below": f"< {k_min}", "above": f"> {k_max}"}[where]
    low, high = row[f"{prefix}_low"], row[f"{prefix}_high"]
    reaches_in = {"inside": True, "below": high is not None and high > row["K_min"]}
    if not reaches_in.get(where, low is not None and low < row["K_max"]):  # the whole interval is past the end
        return point
    lo = f"< {k_min}" if low is None else format_k(low)
    hi = f"> {k_max}" if high is None else format_k(high)
    return f"{point} [{lo}, {hi}]"


def format_transition_table(table: list[dict]) -> str:
    """transition_table as text: per size, A (f_M falls through 1/2), B (f_G rises through 1/2) and the
    spurious peak, each with its interval, interpolated in log K."""
    sized = bool(table) and "size" in table[0]
    head = f"{'size':>6}  " if sized else ""
    lines = [f"{head}{'A: f_M = 1/2':<26}{'B: f_G = 1/2':<26}spurious peak (f_S)"]
    for r in table:
        size = f"{r['size']:>6}  " if sized else ""
        peak = transition_cell(r, "peak") + (f" ({r['peak_f_S']:.2f})" if r.get("peak_f_S") is not None else "")
        lines.append(f"{size}{transition_cell(r, 'A'):<26}{transition_cell(r, 'B'):<26}{peak}")
    return "\n".join(lines)


__all__ = [
    "StudyResult",
    "aggregate",
    "format_k",
    "format_phase_table",
    "format_transition_table",
    "job_stages",
    "run_study",
    "run_study_job",
    "phase_transitions",
    "rows_by_size",
    "study_jobs",
    "transition_cell",
    "transition_table",
]
