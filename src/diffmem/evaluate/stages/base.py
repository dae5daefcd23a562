"""The contract of an analysis stage.

A stage is one module under diffmem/evaluate/stages/ defining one `Stage`: its name, the config
section it reads and where that section sits in a study configuration, the stages whose outputs it
reads, `run(ctx, config) -> written paths`, what `analysis.json` shows of its results, and the
report section it contributes. The study runner, `diffmem analyze` and the report loop over the
registry in diffmem/evaluate/stages/__init__.py; adding a stage is one module plus one line there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffmem.evaluate.run import RunContext
from diffmem.io.config import Section
from diffmem.viz.html import ReportContext
from diffmem.viz.html import Section as ReportSection

TRAIN = "train"  # the input name of the trained run itself


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # its heading in the report
    help: str  # one line: what it measures (also the `diffmem analyze --NAME` help)
    config: type[Section]  # its section's class
    config_key: str  # where the section sits in a study config: 'sampling', 'analyses.basins', ...
    inputs: tuple[str, ...]  # stages (or 'train') whose outputs it reads; redoing one of them redoes it
    run: Callable[[RunContext, Section], list[Path]]  # writes into ctx.out, returns what it wrote
    optional: bool = False  # runs only when its section has enabled: true (analyses.*); else always
    result: Callable[[Path], dict] | None = None  # what analysis.json shows, read from the analysis directory
    report: Callable[[ReportContext], ReportSection | str] | None = None  # a section, or why it is omitted

    def section(self, analysis) -> Section:
        """This stage's section of an AnalysisConfig (or a StudyConfig: the same keys)."""
        value = analysis
        for part in self.config_key.split("."):
            value = getattr(value, part)
        return value


__all__ = ["TRAIN", "Stage"]
