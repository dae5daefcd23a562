"""The classical Hopfield reference: energy descent, capacity collapse near alpha = 0.14, 3-mixtures."""

import pytest
import torch

from diffmem.core import hopfield as hf
from diffmem.experiments.hopfield import capacity_curve, drop_point, mixture_check


def test_dynamics_descends_and_stops_at_fixed_points():
    g = torch.Generator().manual_seed(0)
    pats = hf.random_patterns(6, 30, 200, generator=g)
    w = hf.hebbian_weights(pats)
    assert torch.all(torch.diagonal(w, dim1=-2, dim2=-1) == 0)
    start = torch.where(torch.rand(6, 200, generator=g) < 0.3, -pats[:, 0], pats[:, 0])  # 30% flipped
    res = hf.run(w, start)
    assert res.converged.all()
    assert (hf.energy(w, res.s) < hf.energy(w, start)).all()
    h = (w @ res.s[..., None])[..., 0]
    assert (res.s * h >= 0).all()  # no spin disagrees with its field


def test_capacity_collapses_near_0_14():
    res = capacity_curve((500,), (0.05, 0.1, 0.25), spins_per_point=8000, progress=False)
    m = res["curves"][500]["overlap"]
    assert m[0] > 0.99 and m[1] > 0.95 and m[2] < 0.6
    a = res["alpha_drop_0.9"][500]
    assert 0.1 < a < 0.25


def test_drop_point_interpolates():
    assert drop_point([0.1, 0.2], [1.0, 0.8]) == pytest.approx(0.15)
    assert drop_point([0.1, 0.2], [1.0, 0.95]) is None


def test_symmetric_three_mixtures_are_stable_with_energy_three_eighths():
    res = mixture_check(1000, 5, n_nets=6)
    assert res["fixed_point_fraction"] == 1.0 and res["overlap_after_dynamics"] == 1.0
    assert res["energy_per_spin_mixture"] == pytest.approx(-3 / 8, abs=0.02)
    assert res["energy_per_spin_pattern"] == pytest.approx(-1 / 2, abs=0.01)
    assert res["mixture_overlaps_with_parents"] == pytest.approx([0.5, 0.5, 0.5], abs=0.05)


def test_bad_hopfield_input():
    with pytest.raises(ValueError, match="need w"):
        hf.run(torch.zeros(2, 3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="P >= 3"):
        hf.mixture_state(torch.ones(1, 2, 10))
