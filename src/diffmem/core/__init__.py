"""The pure math core of diffmem: torch only, no file I/O, no global RNG, no default device.

Everything else in diffmem imports from here; nothing here imports from the rest (a test
enforces it). See docs/architecture.md.
"""

from diffmem.core.basins import BasinEstimator, CriticalTime, KarrasGrid, RecoveryCurve, TruncatedGrid, critical_time
from diffmem.core.collapse import CollapseTimes, collapse_times
from diffmem.core.consistency import LevelConsistency, level_consistency
from diffmem.core.curvature import CurvatureSpectrum, hessian_spectrum, summarize_by_class
from diffmem.core.denoisers import (
    PREDICTION_TYPES,
    ClippedDenoiser,
    Denoiser,
    EmpiricalDenoiser,
    VPNetworkDenoiser,
    score,
    vp_model,
)
from diffmem.core.energy import RelativeEnergy, relative_energy
from diffmem.core.knn import Neighbours, knn
from diffmem.core.likelihood import LikelihoodResult, log_likelihood
from diffmem.core.memory import DenseAM, RetrievalResult
from diffmem.core.noise import (
    VESchedule,
    VPSchedule,
    alpha_bar_to_sigma,
    beta_to_sigma,
    schedule_from_dict,
    sigma_to_alpha_bar,
    sigma_to_beta,
    ve_to_vp,
    vp_to_ve,
)
from diffmem.core.random import randn, seeded_generators
from diffmem.core.samplers import (
    SAMPLERS,
    ddim_step,
    ddpm_step,
    get_sampler,
    initial_noise,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_heun,
)

__all__ = [
    "BasinEstimator",
    "CollapseTimes",
    "CriticalTime",
    "CurvatureSpectrum",
    "KarrasGrid",
    "LevelConsistency",
    "LikelihoodResult",
    "Neighbours",
    "RecoveryCurve",
    "RelativeEnergy",
    "TruncatedGrid",
    "collapse_times",
    "critical_time",
    "hessian_spectrum",
    "knn",
    "level_consistency",
    "log_likelihood",
    "relative_energy",
    "summarize_by_class",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "DenseAM",
    "Denoiser",
    "EmpiricalDenoiser",
    "RetrievalResult",
    "VESchedule",
    "VPNetworkDenoiser",
    "ClippedDenoiser",
    "VPSchedule",
    "alpha_bar_to_sigma",
    "beta_to_sigma",
    "ddim_step",
    "ddpm_step",
    "get_sampler",
    "initial_noise",
    "randn",
    "sample_ddim",
    "sample_ddpm",
    "sample_euler",
    "sample_heun",
    "schedule_from_dict",
    "score",
    "seeded_generators",
    "sigma_to_alpha_bar",
    "sigma_to_beta",
    "ve_to_vp",
    "vp_model",
    "vp_to_ve",
]
