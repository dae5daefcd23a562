"""Is a sample on the data manifold? The k-NN manifold of real images (SCIENCE.md §5, quality axis).

The real manifold is estimated from held-out images R (never trained on) as a union of balls: each
r in R gets the radius rad_k(r), the distance to its k-th nearest other held-out image (improved
precision and recall, Kynkaanniemi et al. 2019). A point x's manifold ratio is

    rho(x) = min_r d(x, r) / rad_k(r)        (<= 1: inside some real ball)

and x is on the manifold when rho(x) <= c. The scale c is calibrated so that a share `quantile`
(default 0.98) of held-out images pass when each is tested against the balls of the *other*
held-out images (leave one out): c is that quantile of rho over R. A sample that is neither a copy
nor a repeated novel state and fails this test is off-manifold: noise, blobs, a broken model.

Per generated set (samples F against held-out R, both in the metric's units):
- precision: share of samples inside some real ball (c = 1), Kynkaanniemi et al. 2019;
- recall: share of real images inside some sample ball (rad_k within F);
- density: mean number of real balls containing a sample, divided by k (Naeem et al. 2020);
- coverage: share of real images whose ball contains at least one sample (Naeem et al. 2020).
Each comes with a percentile bootstrap interval over the samples (real radii fixed; for recall the
sample radii too), and the Wilson interval of its count where that is wider, so 0 and 1 are never
reported with an empty interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmem.evaluate.metrics import neighbours

MANIFOLD_K = 3  # neighbours per real ball: Kynkaanniemi et al. use k = 3
CHUNK = 4096  # rows of a distance block: memory O(CHUNK x M)


def wilson_interval(k: float, n: int, level: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n at the given level: never empty at 0 or 1."""
    if n < 1:
        raise ValueError(f"a proportion needs n >= 1, got {n}")
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def pairwise(metric, a: Tensor, b: Tensor) -> Tensor:
    """The metric's distance between every row of embeddings a (N, E) and b (M, E), (N, M) float64,
    computed in blocks of CHUNK rows."""
    a, b = a.double(), b.double()
    dim = a.shape[1]
    return torch.cat([metric.value(torch.cdist(a[i : i + CHUNK], b), dim) for i in range(0, a.shape[0], CHUNK)])


def knn_radii(metric, emb: Tensor, k: int) -> Tensor:
    """rad_k of every row: the distance to its k-th nearest other row, (N,) float64."""
    if emb.shape[0] <= k:
        raise ValueError(f"the k-NN manifold with k = {k} needs more than {k} points, got {emb.shape[0]}")
    nb = neighbours(metric, emb, emb, k, exclude_self=True, embedded=True)
    return nb.distances[:, k - 1].double().cpu()


@dataclass(frozen=True)
class Manifold:
    """The k-NN manifold of the held-out images, calibrated (see the module docstring)."""

    reference: Tensor  # (R, E) held-out embeddings
    radii: Tensor  # (R,) rad_k within the held-out set
    k: int
    scale: float  # c: rho <= c is on the manifold
    quantile: float  # share of held-out images that pass (leave one out)

    def ratio(self, metric, emb: Tensor) -> Tensor:
        """rho(x) = min_r d(x, r) / rad_k(r) of every row of emb, (N,) float64."""
        d = pairwise(metric, emb.to(self.reference.device), self.reference).cpu()  # (N, R)
        return (d / self.radii.clamp_min(torch.finfo(torch.float64).tiny)).min(dim=1).values


def fit_manifold(metric, held_out_emb: Tensor, *, k: int = MANIFOLD_K, quantile: float = 0.98) -> Manifold:
    """Balls of radius rad_k around the held-out images, and the scale c at which `quantile` of them
    pass the test against the others' balls."""
    radii = knn_radii(metric, held_out_emb, k)
    d = pairwise(metric, held_out_emb, held_out_emb).cpu()  # (R, R)
    d.fill_diagonal_(math.inf)  # leave one out: an image is never inside its own ball
    loo = (d / radii.clamp_min(torch.finfo(torch.float64).tiny)).min(dim=1).values
    scale = float(torch.quantile(loo, quantile))
    return Manifold(held_out_emb, radii, k, scale, quantile)


@dataclass(frozen=True)
class Estimate:
    """A value with its interval, from n items."""

    value: float
    low: float
    high: float
    n: int


def quality_metrics(
    metric,
    fake_emb: Tensor,
    manifold: Manifold,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Estimate]:
    """precision, recall, density and coverage of generated samples against the held-out manifold."""
    k = manifold.k
    real_radii = manifold.radii
    fake_radii = knn_radii(metric, fake_emb, k)
    d = pairwise(metric, fake_emb.to(manifold.reference.device), manifold.reference).cpu()  # (F, R)
    in_real = d <= real_radii[None, :]  # sample j inside real ball i
    in_fake = d <= fake_radii[:, None]  # real i inside sample ball j
    n_fake, n_real = d.shape

    def metrics(rows: Tensor) -> Tensor:  # (B, F') sample indices -> (B, 4)
        real_hits = in_real[rows]  # (B, F', R)
        precision = real_hits.any(2).double().mean(1)
        density = real_hits.double().sum(2).mean(1) / k
        coverage = real_hits.any(1).double().mean(1)
        recall = in_fake[rows].any(1).double().mean(1)
        return torch.stack([precision, recall, density, coverage], dim=1)

    value = metrics(torch.arange(n_fake)[None])[0]
    g = torch.Generator().manual_seed(seed)
    per = max(1, 20_000_000 // (n_fake * n_real))  # resamples per block: (per, F, R) booleans stay small
    boot = torch.cat(
        [
            metrics(torch.randint(0, n_fake, (min(per, n_bootstrap - b), n_fake), generator=g))
            for b in range(0, n_bootstrap, per)
        ]
    )
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    out = {}
    sizes = {"precision": n_fake, "recall": n_real, "density": n_fake, "coverage": n_real}
    for i, (name, n) in enumerate(sizes.items()):
        low, high = (float(v) for v in torch.quantile(boot[:, i], q))
        if name != "density":  # a proportion: never an empty interval at 0 or 1
            w_low, w_high = wilson_interval(round(float(value[i]) * n), n, level)
            low, high = min(low, w_low), max(high, w_high)
        out[name] = Estimate(float(value[i]), low, high, n)
    return out


__all__ = [
    "MANIFOLD_K",
    "Estimate",
    "Manifold",
    "fit_manifold",
    "knn_radii",
    "pairwise",
    "quality_metrics",
    "wilson_interval",
]
