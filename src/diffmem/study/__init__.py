"""A K sweep as one resumable study: configuration, crash-safe run store, executors, runner, and the
memorization and two-model presets (docs/api.md, section 5)."""

from diffmem.study.config import StudyConfig, load_study_config, parse_study_config
from diffmem.study.presets import MEMORIZATION_KS, TWO_MODEL_KS, MLPStudy, memorization_config, two_model_config
from diffmem.study.runner import StudyResult, format_phase_table, run_study

__all__ = [
    "MEMORIZATION_KS",
    "TWO_MODEL_KS",
    "MLPStudy",
    "StudyConfig",
    "StudyResult",
    "format_phase_table",
    "load_study_config",
    "memorization_config",
    "parse_study_config",
    "run_study",
    "two_model_config",
]
