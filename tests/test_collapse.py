"""Collapse times along sampling trajectories."""

import pytest
import torch

from diffmem.core import EmpiricalDenoiser, VPSchedule, initial_noise
from diffmem.core.collapse import _last_run_start, collapse_times
from diffmem.io.data import load_dataset


def test_last_run_start():
    flags = torch.tensor(
        [
            [True, True, True, True],  # committed from the start
            [False, True, False, True],  # only the last step
            [True, False, True, True],
            [True, True, True, False],  # never at the end
        ]
    )
    assert _last_run_start(flags).tolist() == [0, 3, 2, 4]


def test_exact_denoiser_trajectories_commit_to_their_end_point():
    data = load_dataset("digits", dtype=torch.float64)
    train = data.x[:16]
    den = EmpiricalDenoiser(train)
    sigmas = VPSchedule().sampling_sigmas(40).double()
    g = torch.Generator().manual_seed(0)
    x = initial_noise((32, 64), float(sigmas[0]), generator=g, like=train)
    res = collapse_times(den, x, sigmas, train)
    assert float(res.final_distance.max()) < 1e-6  # the exact model memorizes
    assert torch.equal(res.nearest_path[:, -1], res.final_index)
    # the collapse level is where the final run of "nearest == final" starts, from the recorded path
    for i in range(32):
        same = (res.nearest_path[i] == res.final_index[i]).tolist()
        j = len(same)
        while j > 0 and same[j - 1]:
            j -= 1
        assert float(res.sigma_nearest[i]) == pytest.approx(float(sigmas[j]))
    # the posterior is one-hot at the end and committed before the last step
    assert float(res.top_weight_path[:, -1].min()) > 0.99
    assert bool((res.sigma_posterior > 0).all())
    # both readings lie inside the sampling range
    assert float(res.sigma_nearest.max()) <= float(sigmas[0])


def test_collapse_needs_matching_shapes():
    train = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="differ in example size"):
        collapse_times(EmpiricalDenoiser(train), torch.zeros(2, 5), VPSchedule().sampling_sigmas(5), train)
