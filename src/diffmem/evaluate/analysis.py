"""Evaluation of one trained run (SCIENCE.md §5, §6) as the registered stages, in order.

Stages write into RUN_DIR/analysis/ and read only what earlier stages wrote there, so a sweep can
run, skip or redo each of them on its own (diffmem/evaluate/stages/ lists them, one module each):

  sample      samples.npz           N samples, each identified by its seed
  distances   distances.npz         m, m2, s and neighbour indices in the chosen metric
  classify    classification.json   thresholds, fractions with bootstrap intervals; samples.csv; gallery.png
  basins      basins.csv/.json      critical noise levels per class (and for training examples)
  energy      energy.csv/.json      -log p relative to the training mean, along two paths
  curvature   curvature.csv/.json   Hessian spectra of -log p per class
  census      census.json           fixed points of the trained denoiser at one noise level
  collapse    collapse.csv/.json    the level where each trajectory commits to one training example
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from diffmem.evaluate.classify import ClassifyConfig
from diffmem.evaluate.metrics import MetricConfig
from diffmem.evaluate.run import RunContext
from diffmem.evaluate.stages import OPTIONAL, STAGES, AnalysesConfig, get_stage
from diffmem.io.config import Section
from diffmem.io.files import write_json_atomic
from diffmem.models.sampling import SamplingConfig


@dataclass(frozen=True)
class AnalysisConfig(Section):
    """What the analysis of one run reads: the same sections, under the same keys, as a study config."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metric: MetricConfig = field(default_factory=MetricConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    analyses: AnalysesConfig = field(default_factory=AnalysesConfig)

    def enable(self, *names: str) -> AnalysisConfig:
        """This config with the optional stages `names` switched on."""
        unknown = [n for n in names if n not in OPTIONAL]
        if unknown:
            raise ValueError(f"unknown analyses {unknown}; choose from {OPTIONAL}")
        on = {n: replace(getattr(self.analyses, n), enabled=True) for n in names}
        return replace(self, analyses=replace(self.analyses, **on))

    def stages(self) -> tuple[str, ...]:
        """The stages this config runs, in order: every required one, then the enabled optional ones."""
        return tuple(n for n, s in STAGES.items() if not s.optional or s.section(self).enabled)


class RunAnalysis:
    """The stages of one run directory (RunContext), each run on its own by name."""

    def __init__(
        self,
        run_dir: str | Path,
        config: AnalysisConfig | None = None,
        *,
        device: str = "cpu",
        out_dir: str | Path | None = None,
        data_root: str | None = None,
    ):
        self.config = config or AnalysisConfig()
        c = self.config
        self.ctx = RunContext(
            run_dir,
            sampling=c.sampling,
            metric=c.metric,
            classify=c.classify,
            seed=c.analyses.seed,
            device=device,
            out_dir=out_dir,
            data_root=data_root,
        )

    @property
    def out(self) -> Path:
        return self.ctx.out

    def run(self, stage: str) -> list[Path]:
        s = get_stage(stage)
        return s.run(self.ctx, s.section(self.config))


# stages that re-run the sampling trajectories from the sampling section's seeds, so they need
# samples that those seeds reproduce
REDRAWS_SAMPLES = ("collapse",)


def analyze_run(
    run_dir: str | Path,
    config: AnalysisConfig | None = None,
    *,
    device: str = "cpu",
    samples_file: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Every stage the config runs (config.stages()), then RUN_DIR/analysis/analysis.json, which is
    also returned: each stage's result and the files it wrote.

    samples_file: a samples.npz drawn from this run earlier (`diffmem sample`), classified and
    analysed in place of the 'sample' stage's new samples (RunContext.read_samples_file; the sampling
    section becomes what drew them). progress: called with one line as each stage starts and ends."""
    say = progress or (lambda line: None)
    say(f"analyze: loading {run_dir}")
    a = RunAnalysis(run_dir, config, device=device)
    stages = a.config.stages()
    adopted = None
    if samples_file is not None:
        redraws = [s for s in REDRAWS_SAMPLES if s in stages]
        adopted = a.ctx.read_samples_file(samples_file)
        if redraws and not adopted.reproducible:
            raise ValueError(
                f"{', '.join(redraws)} re-runs each sample's trajectory from its seed with the EMA weights, but the "
                f"samples in {adopted.path} are not seed * 1000003 + i of one sampling seed drawn with the EMA "
                "weights; leave it out, or analyse new samples (without --samples FILE)"
            )
        a.ctx.adopt_samples(adopted)
        a.config = replace(a.config, sampling=a.ctx.sampling)
        stages = tuple(s for s in stages if s != "sample")
        say(f"analyze: {len(adopted.seeds)} samples from {adopted.path} (no new samples drawn)")
    written: dict[str, list[str]] = {}
    for i, stage in enumerate(stages, 1):
        say(f"analyze [{i}/{len(stages)}] {stage} ...")
        start = time.perf_counter()
        written[stage] = [str(p) for p in a.run(stage)]
        say(f"analyze [{i}/{len(stages)}] {stage} done in {time.perf_counter() - start:.1f} s")
    result = {"run": str(a.ctx.run_dir), "K": a.ctx.k, "config": a.config.to_dict(), "outputs": written}
    if adopted is not None:
        result["samples_file"] = {
            "path": str(adopted.path),
            "options_file": None if adopted.options_file is None else str(adopted.options_file),
            "reproducible": adopted.reproducible,
        }
    for stage in written:
        if STAGES[stage].result is not None:
            result["classification" if stage == "classify" else stage] = STAGES[stage].read_result(a.out)
    write_json_atomic(a.out / "analysis.json", result)
    return result


__all__ = ["AnalysisConfig", "RunAnalysis", "analyze_run"]
