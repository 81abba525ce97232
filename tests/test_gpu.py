"""CUDA: the same model/guide, fit, evaluation and checkpoints on a GPU (skipped without one)."""

import pytest
import torch

import pyro_vae

pytestmark = pytest.mark.gpu


def test_fit_on_cuda_keeps_everything_on_the_device(tmp_path):
    splits = pyro_vae.data.load("digits")
    vae = pyro_vae.VAE(splits.data_shape, 4, likelihood="continuous-bernoulli", encoder="conv", decoder="conv")
    hist = pyro_vae.fit(vae, splits.train, val_data=splits.val, epochs=3, batch_size=128, lr=3e-3,
                        device="cuda", progress=False, checkpoint_dir=tmp_path)
    assert all(p.is_cuda for p in vae.parameters())
    assert hist["val_elbo"][-1] > hist["val_elbo"][0]
    assert vae.sample(4).is_cuda


def test_cuda_checkpoint_loads_on_cpu(tmp_path):
    vae = pyro_vae.VAE((1, 8, 8), 2, likelihood="continuous-bernoulli").cuda()
    pyro_vae.save(vae, tmp_path)
    cpu = pyro_vae.load(tmp_path)
    for a, b in zip(vae.state_dict().values(), cpu.state_dict().values()):
        assert torch.equal(a.cpu(), b)
