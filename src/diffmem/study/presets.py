"""Studies with a single purpose, as configurations of the one study runner (run_study):

- memorization: one MLP per nested K, sampled and classified; the memorized fraction against K is
  the phase table's f_M (a sample is memorized when its nearest training example is within delta_m,
  calibrated as the 2% quantile of held-out images' nearest-training distances; SCIENCE.md §5);
- two-model: two MLPs per K on disjoint training sets, sampled from the same noise; their agreement
  against K (SCIENCE.md §6);
- capacity: the memorization study for each of several MLP widths; the transition points A and B against
  the width (SCIENCE.md §6-§7: smaller networks stop memorizing and start generalizing at smaller K).

Both write the study layout of diffmem.study.runner, resume like any study, and load back with
`diffmem report` / `diffmem status`. Each preset takes the options of `MLPStudy` as keywords.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from diffmem.study.config import StudyConfig

MEMORIZATION_KS = (8, 32, 128, 512, 1500)
TWO_MODEL_KS = (8, 32, 128, 512)
CAPACITY_KS = (4, 12, 36, 108, 324, 1000, 1500)  # about a factor 3 apart, up to the digits' 1,500
CAPACITY_WIDTHS = (32, 128, 512)


@dataclass(frozen=True)
class MLPStudy:
    """What both presets share: the data, the held-out split and the MLP trained for every K."""

    data: str = "digits"
    root: str | None = None  # folder of a file-based dataset
    n_held_out: int = 297
    steps: int = 6000  # optimizer steps, the same for every K
    hidden: int = 512
    depth: int = 4
    device: str = "cpu"

    def config(self, name: str, ks: Sequence[int], **sections) -> StudyConfig:
        return StudyConfig.from_dict(
            {
                "name": name,
                "data": {"name": self.data, "options": {"root": self.root} if self.root else {}},
                "ks": sorted(set(int(k) for k in ks)),
                "n_held_out": self.n_held_out,
                "network": {"kind": "mlp", "mlp": {"hidden": self.hidden, "depth": self.depth}},
                "train": {"steps": self.steps, "lr_schedule": "cosine", "warmup_steps": min(200, self.steps)},
                "device": self.device,
                **sections,
            }
        )


def memorization_config(
    *, ks: Sequence[int] = MEMORIZATION_KS, n_samples: int = 512, study: MLPStudy | None = None, **options
) -> StudyConfig:
    """The memorization study: sample, distances and classify for each nested K (run 'phase').
    `study`, or MLPStudy(**options), says what is trained."""
    study = study or MLPStudy(**options)
    return study.config("memorization", ks, run="phase", sampling={"n_samples": n_samples})


def two_model_config(
    *,
    ks: Sequence[int] = TWO_MODEL_KS,
    n_samples: int = 256,
    delta: float | None = None,
    study: MLPStudy | None = None,
    **options,
) -> StudyConfig:
    """The two-model test alone (run 'two_model'); delta None calibrates it from held-out images.
    `study`, or MLPStudy(**options), says what is trained."""
    two = {"enabled": True, "n_samples": n_samples, "delta": delta}
    return (study or MLPStudy(**options)).config("two-model", ks, run="two_model", analyses={"two_model": two})


def capacity_config(
    *,
    ks: Sequence[int] = CAPACITY_KS,
    widths: Sequence[int] = CAPACITY_WIDTHS,
    n_samples: int = 256,
    study: MLPStudy | None = None,
    **options,
) -> StudyConfig:
    """The memorization study at each MLP width (run 'phase', sizes = widths; `study.hidden` is unused).
    `study`, or MLPStudy(**options), says what else is trained."""
    study = study or MLPStudy(**options)
    sizes = sorted(set(int(w) for w in widths))
    return study.config("capacity", ks, run="phase", sizes=sizes, sampling={"n_samples": n_samples})


__all__ = [
    "CAPACITY_KS",
    "CAPACITY_WIDTHS",
    "MEMORIZATION_KS",
    "TWO_MODEL_KS",
    "MLPStudy",
    "capacity_config",
    "memorization_config",
    "two_model_config",
]
