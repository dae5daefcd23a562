"""Iterating a map to its fixed points, with per-sample convergence (SCIENCE.md §3, §6)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem.core._checks import check_finite_float, check_positive_int


@dataclass(frozen=True)
class FixedPointResult:
    x: Tensor  # (B, D) final states
    n_iter: Tensor  # (B,) map evaluations used (max_iter where not converged)
    converged: Tensor  # (B,) bool


def iterate_map(
    update: Callable[[Tensor, Tensor], Tensor], x: Tensor, *, tol: float, max_iter: int
) -> FixedPointResult:
    """Iterate x <- update(x, idx) on a flat batch x (B, D) until each row's update is small.

    update(x_active, idx) receives the still-active rows and their indices into the batch (so
    per-sample parameters can be gathered) and returns their new states. A row has converged when
    the RMS (||.|| / sqrt(D)) of its last change is <= tol; converged rows are frozen.
    """
    tol = check_finite_float(tol, "tol", low=0.0)
    max_iter = check_positive_int(max_iter, "max_iter")
    x = x.clone()
    n = x.shape[0]
    n_iter = torch.full((n,), max_iter, dtype=torch.int64, device=x.device)
    converged = torch.zeros(n, dtype=torch.bool, device=x.device)
    active = torch.arange(n, device=x.device)
    root_d = math.sqrt(x.shape[1])
    for it in range(1, max_iter + 1):
        if active.numel() == 0:
            break
        xa = x[active]
        new = update(xa, active)
        x[active] = new
        done = (new - xa).norm(dim=-1) / root_d <= tol
        n_iter[active[done]] = it
        converged[active[done]] = True
        active = active[~done]
    return FixedPointResult(x=x, n_iter=n_iter, converged=converged)
