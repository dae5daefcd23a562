"""Collapse times along sampling trajectories (SCIENCE.md §4, §6).

Along a trajectory x_{sigma_0} -> ... -> x_0 the denoised estimate D(x_{sigma_i}, sigma_i) has a
nearest training example at every step. The collapse level is the noise level from which on that
nearest example no longer changes: the trajectory has committed to one memory. For the empirical
distribution of the training set the posterior p(xi_mu | x_sigma) = w_mu(x; 1/sigma^2) gives a second
reading: the level from which on the final example's posterior weight stays above 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem.core.denoisers import EmpiricalDenoiser
from diffmem.core.knn import knn
from diffmem.core.samplers import get_sampler


@dataclass(frozen=True)
class CollapseTimes:
    sigma_nearest: Tensor  # (N,) level from which on the nearest training example of D(x) is final
    sigma_posterior: Tensor  # (N,) level from which on the final example's posterior weight is >= 1/2 (0 if never)
    final_index: Tensor  # (N,) nearest training example of the end point
    final_distance: Tensor  # (N,) its distance, ||x_0 - xi|| / sqrt(D)
    sigmas: Tensor  # (S + 1,) the sampling grid
    nearest_path: Tensor  # (N, S) nearest training example of D(x_{sigma_i}, sigma_i) per step
    top_weight_path: Tensor  # (N, S) max_mu w_mu(x_{sigma_i}) per step


def _last_run_start(flags: Tensor) -> Tensor:
    """(N,) index of the first step of the final run of True in flags (N, S); S if the last is False."""
    s = flags.shape[1]
    # position after the last False (S - (number of trailing Trues))
    rev = torch.flip(flags, dims=[1]).to(torch.int64)
    trailing = torch.cumprod(rev, dim=1).sum(dim=1)
    return s - trailing


def collapse_times(
    denoiser,
    x: Tensor,
    sigmas: Tensor,
    train: Tensor,
    *,
    sampler: str = "ddim",
    generator: torch.Generator | list[torch.Generator] | None = None,
    **sampler_kw,
) -> CollapseTimes:
    """Run `sampler` from x (N, *event) at sigmas[0] over the grid `sigmas` (descending, ending at 0)
    and measure each trajectory's collapse levels against the training set train (K, *event)."""
    flat_train = train.reshape(train.shape[0], -1)
    if x.reshape(x.shape[0], -1).shape[1] != flat_train.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and training data {tuple(train.shape)} differ in example size")
    posterior = EmpiricalDenoiser(flat_train.to(x.dtype))
    nearest, top, top_index = [], [], []
    state = {"x": x}

    def record(info: dict) -> None:
        den = info["denoised"].reshape(x.shape[0], -1)
        nearest.append(knn(den, flat_train.to(den.dtype), 1).indices[:, 0])
        w = posterior.posterior_weights(state["x"].reshape(x.shape[0], -1), info["sigma"])  # (N, K)
        top_w, top_i = w.max(dim=1)
        top.append(top_w)
        top_index.append(top_i)
        state["x"] = info["x"].to(x.dtype)

    out = get_sampler(sampler)(denoiser, x, sigmas, generator=generator, callback=record, **sampler_kw)
    end = out.reshape(x.shape[0], -1)
    nb = knn(end, flat_train.to(end.dtype), 1)
    near = torch.stack(nearest, dim=1)  # (N, S)
    weight = torch.stack(top, dim=1)  # (N, S)
    grid = sigmas.to(dtype=torch.float64, device=near.device)[: near.shape[1]]
    grid0 = torch.cat([grid, grid.new_zeros(1)])  # level S means "never before the end"
    final = nb.indices[:, :1]
    i_near = _last_run_start(near == final)
    # committed: the posterior's top pattern is the final one, with weight above 1/2
    i_post = _last_run_start((weight >= 0.5) & (torch.stack(top_index, dim=1) == final))
    scale = flat_train.shape[1] ** 0.5
    return CollapseTimes(
        grid0[i_near], grid0[i_post], nb.indices[:, 0], nb.distances[:, 0] / scale, sigmas, near, weight
    )


__all__ = ["CollapseTimes", "collapse_times"]
