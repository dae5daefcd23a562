"""The classical Hopfield reference (SCIENCE.md §3): retrieval capacity and three-pattern mixtures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmem.core import hopfield as hf

DEFAULT_ALPHAS = (0.04, 0.06, 0.08, 0.1, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.18, 0.2, 0.22, 0.25)


def drop_point(alphas: Sequence[float], overlaps: Sequence[float], level: float = 0.9) -> float | None:
    """First load at which the mean overlap falls below `level`, linearly interpolated; None if never."""
    for i in range(1, len(alphas)):
        if overlaps[i] < level <= overlaps[i - 1]:
            a0, a1, m0, m1 = alphas[i - 1], alphas[i], overlaps[i - 1], overlaps[i]
            return a0 + (m0 - level) * (a1 - a0) / (m0 - m1)
    return None


def capacity_curve(
    ns: Sequence[int] = (200, 500, 1000),
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    *,
    spins_per_point: int = 40_000,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Mean overlap after zero-temperature retrieval started at a stored pattern, against alpha = P/N.

    Each point averages over max(4, spins_per_point // N) independent networks (new patterns each).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    out = {"alphas": list(alphas), "curves": {}, "alpha_drop_0.9": {}}
    bar = tqdm(total=len(ns) * len(alphas), desc="hopfield capacity", disable=not progress)
    for n in ns:
        nets = max(4, spins_per_point // n)
        means, sems, conv = [], [], []
        for alpha in alphas:
            p = max(1, round(alpha * n))
            pats = hf.random_patterns(nets, p, n, generator=g)
            res = hf.run(hf.hebbian_weights(pats), pats[:, 0])
            m = hf.overlap(res.s, pats[:, 0]).double()
            means.append(float(m.mean()))
            sems.append(float(m.std() / nets**0.5) if nets > 1 else 0.0)
            conv.append(float(res.converged.double().mean()))
            bar.update()
        out["curves"][n] = {"n_networks": nets, "overlap": means, "sem": sems, "converged": conv}
        out["alpha_drop_0.9"][n] = drop_point(alphas, means)
    bar.close()
    return out


def mixture_check(n: int = 1000, p: int = 5, *, n_nets: int = 10, seed: int = 0, device: str = "cpu") -> dict:
    """Symmetric mixtures sign(xi_1 + xi_2 + xi_3) at low load: are they fixed points, and at what
    energy per spin (theory, low-load limit: -3/8 against -1/2 for a stored pattern)?"""
    g = torch.Generator(device=device).manual_seed(seed)
    pats = hf.random_patterns(n_nets, p, n, generator=g)
    w = hf.hebbian_weights(pats)
    mix = hf.mixture_state(pats)
    res = hf.run(w, mix)
    unstable = ((mix * (w @ mix[..., None])[..., 0]) < 0).double().mean(dim=1)  # spins disagreeing with their field
    return {
        "N": n,
        "P": p,
        "n_networks": n_nets,
        "fixed_point_fraction": float((res.n_flips == 0).double().mean()),
        "unstable_spin_fraction": float(unstable.mean()),
        "overlap_after_dynamics": float(hf.overlap(res.s, mix).mean()),
        "energy_per_spin_mixture": float((hf.energy(w, mix) / n).mean()),
        "energy_per_spin_pattern": float((hf.energy(w, pats[:, 0]) / n).mean()),
        "theory_mixture": -3 / 8,
        "theory_pattern": -1 / 2,
        "mixture_overlaps_with_parents": np.round(
            (hf.overlap(mix[:, None, :], pats[:, :3]).mean(0)).numpy().astype(float), 4
        ).tolist(),
    }
