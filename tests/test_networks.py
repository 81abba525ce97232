"""Networks are plain torch modules: shapes for every data shape they accept, any leading batch dims."""

import pytest
import torch

from pyro_vae.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (8, 8), (3, 32, 32), (1, 7, 9)])
def test_conv_pair_round_trips_shapes(shape):
    enc, dec = ConvEncoder(shape, 10), ConvDecoder(5, shape)
    assert enc(torch.zeros(2, 3, *shape)).shape == (2, 3, 10)
    assert dec(torch.zeros(2, 3, 5)).shape == (2, 3, *shape)


def test_seed_conv_architecture_on_28x28():
    enc = ConvEncoder((1, 28, 28), 40)
    convs = [m for m in enc.net if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 40]
    assert convs[-1].kernel_size == (7, 7) and convs[0].stride == (2, 2)


def test_mlp_pair_flattens_data_dims():
    enc, dec = MLPEncoder((1, 8, 8), 6, (32,)), MLPDecoder(3, (1, 8, 8), (32, 16))
    assert enc(torch.zeros(4, 1, 8, 8)).shape == (4, 6)
    assert dec(torch.zeros(7, 4, 3)).shape == (7, 4, 1, 8, 8)
