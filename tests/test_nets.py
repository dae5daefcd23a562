"""Networks: shapes, timestep embeddings, configuration errors."""

import pytest
import torch

from diffmem.models.nets import MLPConfig, MLPNet, NetworkConfig, TimestepEmbedding, build_network


@pytest.mark.parametrize("kind", ["sinusoidal", "fourier"])
def test_embeddings_distinguish_timesteps_and_accept_fractions(kind):
    emb = TimestepEmbedding(kind, 16, 1000, 16.0)
    e = emb(torch.tensor([0.0, 10.0, 10.5, 999.0]))
    assert e.shape == (4, 16)
    assert (e[1] - e[2]).norm() > 0 and (e[0] - e[3]).norm() > 0.5


def test_mlp_keeps_the_input_shape():
    net = build_network(NetworkConfig("mlp", {"hidden": 16, "depth": 2}), (8, 8), 1000)
    assert isinstance(net, MLPNet) and net.config.dim == 64
    x = torch.randn(3, 8, 8)
    assert net(x, torch.tensor([1, 2, 3])).shape == (3, 8, 8)
    assert net(x, torch.tensor(5)).shape == (3, 8, 8)  # one timestep for the whole batch


def test_network_configuration_errors():
    with pytest.raises(ValueError, match="square images"):
        build_network(NetworkConfig("unet"), (1, 8, 6), 1000)
    with pytest.raises(ValueError, match="square images"):
        build_network(NetworkConfig("unet"), (64,), 1000)
    with pytest.raises(ValueError, match="unknown MLPConfig keys"):
        build_network(NetworkConfig("mlp", {"width": 3}), (4,), 1000)
    with pytest.raises(ValueError, match="emb_dim must be even"):
        MLPConfig(dim=4, emb_dim=15)
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        build_network(NetworkConfig("unet", unet={"block_out_channels": [10, 20]}), (1, 8, 8), 1000)
