"""The registry of analysis stages, in the order a job runs them, and the `analyses` config section
built from the optional ones. To add a stage, write its module (see base.py) and list it here."""

from __future__ import annotations

from dataclasses import field, fields, make_dataclass

from diffmem.evaluate.stages import basins, census, classify, collapse, curvature, distances, energy, sample
from diffmem.evaluate.stages.base import TRAIN, Stage
from diffmem.evaluate.two_model import TwoModelConfig
from diffmem.io.config import SEED, Section

STAGES: dict[str, Stage] = {
    m.STAGE.name: m.STAGE for m in (sample, distances, classify, basins, energy, curvature, census, collapse)
}
OPTIONAL = tuple(name for name, s in STAGES.items() if s.optional)  # analyses.<name>.enabled switches them on


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown analysis stage {name!r}; choose from {', '.join(STAGES)}")
    return STAGES[name]


def _enabled(self) -> tuple[str, ...]:
    """The optional stages (and the two-model test) this section switches on."""
    return tuple(f.name for f in fields(self) if f.name != "seed" and getattr(self, f.name).enabled)


# analyses: one section per optional stage, the two-model test (a study-level job), and the seed of
# point selection and every random draw of the analyses
AnalysesConfig = make_dataclass(
    "AnalysesConfig",
    [(name, STAGES[name].config, field(default_factory=STAGES[name].config)) for name in OPTIONAL]
    + [("two_model", TwoModelConfig, field(default_factory=TwoModelConfig)), ("seed", int, field(default=0))],
    bases=(Section,),
    frozen=True,
    namespace={"_key": "analyses", "_bounds": {"seed": SEED}, "enabled": _enabled, "__module__": __name__},
)

__all__ = ["OPTIONAL", "STAGES", "TRAIN", "AnalysesConfig", "Stage", "get_stage"]
