"""Evaluation of generated samples: metrics (pixel L2, LPIPS), nearest neighbours, the
memorized / spurious / generalized classifier, sample quality, the audit of models trained elsewhere,
the two-model agreement, and the analysis stages of a trained run (docs/api.md, section 4).

The classifier and the names around it are exported here: `from diffmem.evaluate import PhaseClassifier`.
"""

from diffmem.evaluate.classify import (
    CLASSES,
    THREE_CLASSES,
    Classification,
    ClassifyConfig,
    Fraction,
    PhaseClassifier,
    SampleDistances,
    bootstrap_fractions,
    memorized_fraction,
    sample_distances,
    transition_points,
)

__all__ = [
    "CLASSES",
    "THREE_CLASSES",
    "Classification",
    "ClassifyConfig",
    "Fraction",
    "PhaseClassifier",
    "SampleDistances",
    "bootstrap_fractions",
    "memorized_fraction",
    "sample_distances",
    "transition_points",
]
