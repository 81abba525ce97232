"""CUDA: the same model/guide, fit, evaluation and checkpoints on a GPU (skipped without one)."""

import math

import pyro
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


def _count_captures(monkeypatch):
    from pyro_vae.train import CUDAGraphStep

    counts = []
    original = CUDAGraphStep._capture

    def counting(self):
        counts.append(1)
        original(self)

    monkeypatch.setattr(CUDAGraphStep, "_capture", counting)
    return counts


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_fit_with_a_cuda_graph_trains_like_the_eager_fit(monkeypatch, elbo):
    """Same data and seed, 15 epochs on digits (a short last batch every epoch, which runs eagerly): the
    graphed fit records its step once and ends within 5% of the eager fit's improvement of the validation
    ELBO (the runs draw different noise; their final ELBOs differ by far less than that)."""
    splits = pyro_vae.data.load("digits")
    counts = _count_captures(monkeypatch)
    finals = []
    for graphed in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = pyro_vae.VAE(splits.data_shape, 4, likelihood="continuous-bernoulli")
        hist = pyro_vae.fit(vae, splits.train, val_data=splits.val, elbo=elbo, epochs=15, batch_size=128, lr=3e-3,
                            device="cuda", progress=False, cuda_graph=graphed)
        finals.append(hist["val_elbo"])
    assert len(counts) == 1
    eager, graph = finals
    assert graph[-1] > graph[0] and eager[-1] > eager[0]
    assert abs(graph[-1] - eager[-1]) < 0.05 * (eager[-1] - eager[0])


def test_fit_with_a_cuda_graph_records_again_after_a_learning_rate_change(monkeypatch):
    class HalveAtEpoch2:
        def on_epoch_end(self, state):
            if state.epoch == 2:
                for g in state.optimizer.param_groups:
                    g["lr"] = g["lr"] / 2

    splits = pyro_vae.data.load("digits")
    counts = _count_captures(monkeypatch)
    vae = pyro_vae.VAE(splits.data_shape, 4, likelihood="continuous-bernoulli")
    hist = pyro_vae.fit(vae, splits.train, epochs=4, batch_size=128, lr=3e-3, device="cuda", progress=False,
                        cuda_graph=True, callbacks=[HalveAtEpoch2()])
    assert len(counts) == 2
    assert all(math.isfinite(v) for v in hist["train_elbo"])


def test_fit_with_a_cuda_graph_reports_the_first_non_finite_step():
    """A parameter turned NaN after step 20 shows up as the loss and gradient of step 21, read back from
    the flags the captured step writes on the device."""
    class Poison:
        def on_step(self, state):
            if state.step == 20:
                with torch.no_grad():
                    next(state.vae.parameters()).fill_(float("nan"))

    splits = pyro_vae.data.load("digits")
    vae = pyro_vae.VAE(splits.data_shape, 4, likelihood="continuous-bernoulli")
    with pytest.raises(pyro_vae.NonFiniteLossError, match="step 21"):
        pyro_vae.fit(vae, splits.train, epochs=4, batch_size=128, device="cuda", progress=False, cuda_graph=True,
                     callbacks=[Poison()])


def test_fit_with_a_cuda_graph_resumes_from_its_checkpoints_and_from_eager_ones(tmp_path):
    splits = pyro_vae.data.load("digits")
    kwargs = dict(batch_size=128, lr=3e-3, device="cuda", progress=False, checkpoint_dir=tmp_path)

    def vae():
        pyro.clear_param_store()
        return pyro_vae.VAE(splits.data_shape, 4, likelihood="continuous-bernoulli")

    pyro_vae.fit(vae(), splits.train, epochs=2, cuda_graph=True, **kwargs)
    hist = pyro_vae.fit(vae(), splits.train, epochs=3, resume_from=tmp_path, **kwargs)  # eager from graphed
    assert len(hist) == 3
    hist = pyro_vae.fit(vae(), splits.train, epochs=4, resume_from=tmp_path, cuda_graph=True, **kwargs)
    assert len(hist) == 4 and all(math.isfinite(v) for v in hist["train_elbo"])
    assert hist["train_elbo"][-1] > hist["train_elbo"][0]
