"""The pure math core of diffmem: torch only, no file I/O, no global RNG, no default device.

Everything else in diffmem imports from here; nothing here imports from the rest (a test
enforces it). See docs/architecture.md.
"""

from diffmem.core.denoisers import (
    PREDICTION_TYPES,
    Denoiser,
    EmpiricalDenoiser,
    VPNetworkDenoiser,
    score,
    vp_model,
)
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
    "PREDICTION_TYPES",
    "SAMPLERS",
    "DenseAM",
    "Denoiser",
    "EmpiricalDenoiser",
    "RetrievalResult",
    "VESchedule",
    "VPNetworkDenoiser",
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
