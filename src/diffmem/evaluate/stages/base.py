"""The contract of an analysis stage.

A stage is one module under diffmem/evaluate/stages/ defining one `STAGE = Stage(...)`: its name and
report title, the config section it reads (whose `_key` says where the section sits in a study
config), `run(ctx, section) -> written paths`, the stages whose outputs it reads, the JSON file that
`analysis.json` shows of its results, and the report section it contributes. The study runner,
`diffmem analyze` and the report loop over the registry in diffmem/evaluate/stages/__init__.py;
adding a stage is one module plus one line there (docs/architecture.md walks through one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffmem.evaluate.run import RunContext, load_json
from diffmem.io.config import Section
from diffmem.viz.html import ReportContext
from diffmem.viz.html import Section as ReportSection

TRAIN = "train"  # the input name of the trained run itself


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # its heading in the report
    config: type[Section]  # its section's class; the class docstring's first line is the stage's help
    run: Callable[[RunContext, Section], list[Path]]  # writes into ctx.out, returns what it wrote
    inputs: tuple[str, ...]  # stages (or 'train') whose outputs it reads; redoing one of them redoes it
    optional: bool = False  # runs only when its section has enabled: true (analyses.*); else always
    result: str | None = "{name}.json"  # the JSON file of the analysis directory that analysis.json shows
    result_key: str | None = None  # only this key of it
    report: Callable[[ReportContext], ReportSection | str] | None = None  # a section, or why it is omitted

    @property
    def config_key(self) -> str:
        """Where the section sits in a study config: 'sampling', 'analyses.basins', ..."""
        return self.config._key

    @property
    def help(self) -> str:
        """One line on what the stage measures (also `diffmem analyze --NAME`'s help)."""
        return (self.config.__doc__ or self.title).strip().splitlines()[0]

    def section(self, analysis) -> Section:
        """This stage's section of an AnalysisConfig (or a StudyConfig: the same keys)."""
        value = analysis
        for part in self.config_key.split("."):
            value = getattr(value, part)
        return value

    def read_result(self, out: Path) -> dict | None:
        """Its result as analysis.json shows it, read from the analysis directory `out`."""
        if self.result is None:
            return None
        d = load_json(out / self.result.format(name=self.name), self.name)
        return d if self.result_key is None else d.get(self.result_key)


__all__ = ["TRAIN", "Stage"]
