"""The training step: the sync-free loss and its gradients are Pyro's, step for step.

Every comparison here is deterministic (same seed, same random draws), so the tolerances are float32 rounding
(the sync-free surrogate adds the same terms in the same order as Pyro's, so most agree to the last bit);
nothing is statistical and the false-failure rate is zero.
"""

from __future__ import annotations

import copy
import functools
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled

import pyro_vae
from pyro_vae.infer import elbo_loss
from pyro_vae.train import CUDAGraphStep, svi_step

N = 1000
ROOT = Path(__file__).resolve().parents[1]


def _data(batch: int = 32, dim: int = 12, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.full((batch, dim), 0.3), generator=g).to(device)


def _vae(dim: int = 12) -> pyro_vae.VAE:
    pyro.set_rng_seed(123)
    return pyro_vae.VAE((dim,), 3, hidden=(16,))


def _pyro_svi_run(vae: pyro_vae.VAE, elbo: pyro.infer.ELBO, x: torch.Tensor, steps: int) -> list[float]:
    pyro.clear_param_store()
    pyro.set_rng_seed(7)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    return [svi.step(x, num_data=N) for _ in range(steps)]


def _our_run(vae: pyro_vae.VAE, elbo: pyro.infer.ELBO, x: torch.Tensor, steps: int) -> list[float]:
    pyro.clear_param_store()
    pyro.set_rng_seed(7)
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    return [float(svi_step(elbo, vae, x, N, opt, params, validate=None if i == 0 else False, check_finite=False))
            for i in range(steps)]


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("particles", [1, 3])
def test_step_matches_pyro_svi(elbo_cls, particles):
    """Five optimized steps give Pyro SVI's losses and parameters (Pyro's Adam is torch's, per parameter)."""
    x = _data()
    ref, ours = _vae(), _vae()
    ours.load_state_dict(ref.state_dict())

    def make():
        return elbo_cls(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)

    losses_ref = _pyro_svi_run(ref, make(), x, 5)
    losses_ours = _our_run(ours, make(), x, 5)
    assert losses_ours == pytest.approx(losses_ref, rel=1e-5)
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert len(set(losses_ref)) == 5  # the steps moved: the comparison is not between frozen parameters


def test_subclasses_that_keep_the_estimator_take_the_fast_path():
    x = _data()
    ref, ours = _vae(), _vae()
    ours.load_state_dict(ref.state_dict())
    losses_ref = _pyro_svi_run(ref, Trace_ELBO(max_plate_nesting=1), x, 3)
    losses_ours = _our_run(ours, _OwnTraces(max_plate_nesting=1), x, 3)
    assert losses_ours == pytest.approx(losses_ref, rel=1e-5)
    assert elbo_loss(_OwnTraces(max_plate_nesting=1), ours.model, ours.guide, x) is not None


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_gradients_match_loss_and_grads(elbo_cls):
    x = _data()
    vae = _vae()
    pyro.set_rng_seed(3)
    loss_ref = elbo_cls(max_plate_nesting=1).loss_and_grads(vae.model, vae.guide, x, num_data=N)
    grads_ref = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(3)
    loss, surrogate = elbo_loss(elbo_cls(max_plate_nesting=1), vae.model, vae.guide, x, num_data=N)
    surrogate.backward()
    assert torch.is_tensor(loss) and not loss.requires_grad
    assert float(loss) == pytest.approx(loss_ref, rel=1e-6)
    for g_ref, p in zip(grads_ref, vae.parameters()):
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-6, atol=1e-7)


def test_score_function_sites_use_pyros_estimator():
    """A non-reparameterized guide site takes Pyro's own particle loss: same value and gradient, and the
    surrogate differs from the loss by the score-function term."""
    x = torch.tensor([0.5, 1.5, -0.3])

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        pyro.sample("z", dist.Normal(loc, 1.0).has_rsample_(False))

    pyro.set_rng_seed(5)
    loss_ref = Trace_ELBO().loss_and_grads(model, guide)
    grad_ref = pyro.param("loc").unconstrained().grad.clone()
    pyro.param("loc").unconstrained().grad = None
    pyro.set_rng_seed(5)
    loss, surrogate = elbo_loss(Trace_ELBO(), model, guide)
    surrogate.backward()
    assert float(loss) == pytest.approx(loss_ref, rel=1e-6)
    torch.testing.assert_close(pyro.param("loc").unconstrained().grad, grad_ref)
    assert float(surrogate.detach()) != pytest.approx(float(loss))


def test_other_elbos_go_through_pyro():
    x = _data()
    vae = _vae()
    assert elbo_loss(TraceGraph_ELBO(), vae.model, vae.guide, x) is None
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=0.0)  # the parameters stay put: the two evaluations see the same model
    pyro.set_rng_seed(2)
    loss = svi_step(TraceGraph_ELBO(max_plate_nesting=1), vae, x, N, opt, params)
    assert all(p.grad is not None for p in params)
    pyro.set_rng_seed(2)
    expected = TraceGraph_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x, num_data=N)
    assert torch.is_tensor(loss) and float(loss) == pytest.approx(expected, rel=1e-6)


class _OwnLossAndGrads(Trace_ELBO):
    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(model, guide, *args, **kwargs)


class _OwnTraces(Trace_ELBO):
    def _get_trace(self, model, guide, args, kwargs):
        return super()._get_trace(model, guide, args, kwargs)


@pytest.mark.parametrize("elbo_cls", [TraceGraph_ELBO, _OwnLossAndGrads])
def test_unvalidated_steps_under_other_elbos_still_train(elbo_cls):
    """Pyro's Trace_ELBO.loss_and_grads differentiates only when the trace holds param sites, so a step
    under an ELBO that goes through it keeps registering the modules even with validate=False."""
    x = _data()
    vae = _vae()
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    loss_fn = elbo_cls(max_plate_nesting=1)
    assert elbo_loss(loss_fn, vae.model, vae.guide, x) is None
    svi_step(loss_fn, vae, x, N, opt, params)
    before = [p.detach().clone() for p in params]
    svi_step(loss_fn, vae, x, N, opt, params, validate=False)
    assert all(p.grad is not None for p in params)
    assert all(not torch.equal(a, p) for a, p in zip(before, params))


def test_non_finite_loss_skips_the_step():
    x = _data()
    x[0, 0] = math.nan
    vae = _vae()
    before = copy.deepcopy(vae.state_dict())
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    loss = svi_step(Trace_ELBO(max_plate_nesting=1), vae, x, N, opt, params, validate=False)
    assert not math.isfinite(float(loss))
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_hot_loop_restores_validation_and_registration():
    x = _data()
    vae = _vae()
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    svi_step(Trace_ELBO(max_plate_nesting=1), vae, x, N, opt, params)  # first step registers the modules
    assert "encoder$$$net.mlp.net.0.weight" in pyro.get_param_store().keys()
    svi_step(Trace_ELBO(max_plate_nesting=1), vae, x, N, opt, params, validate=False)
    assert is_validation_enabled() and not vae._registered
    # the stored parameter is still the module's own tensor, stepped in place
    assert pyro.get_param_store()["encoder$$$net.mlp.net.0.weight"] is vae.encoder.net.mlp.net[0].weight
    # bad data under validation is still an error
    with pytest.raises(pyro_vae.DataError, match="binary"):
        svi_step(Trace_ELBO(max_plate_nesting=1), vae, x * 0.5 + 0.25, N, opt, params)


def test_cuda_graph_step_needs_cuda():
    vae = _vae()
    params = list(vae.parameters())
    with pytest.raises(pyro_vae.ConfigError, match="CUDA"):
        CUDAGraphStep(Trace_ELBO(), vae, _data(), N, torch.optim.Adam(params), params)


@pytest.mark.gpu
@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_cuda_graph_step_trains_like_the_eager_step(elbo_cls):
    """200 graphed steps on a fixed batch lower the loss as much as 200 eager steps (same start, different
    noise: compared within 5% of the drop, which the two runs' Monte Carlo noise stays far below)."""
    x = _data(256, 12, "cuda")
    runs = []
    for graphed in (False, True):
        vae = _vae().cuda()
        pyro.clear_param_store()
        params = list(vae.parameters())
        opt = torch.optim.Adam(params, lr=1e-2, capturable=graphed)
        loss_fn = elbo_cls(max_plate_nesting=1)
        step = (CUDAGraphStep(loss_fn, vae, x, N, opt, params) if graphed else
                functools.partial(svi_step, loss_fn, vae, num_data=N, optimizer=opt, params=params, validate=False,
                                  check_finite=False))
        losses = torch.stack([step(x).clone() for _ in range(200)])
        assert bool(torch.isfinite(losses).all())
        with torch.no_grad():
            runs.append(elbo_cls(num_particles=200, vectorize_particles=True, max_plate_nesting=1).loss(
                vae.model, vae.guide, x, num_data=N))
        if graphed:
            odd = step(x[:100])  # another shape: the eager step
            assert math.isfinite(float(odd))
    pyro.clear_param_store()
    fresh = _vae().cuda()
    with torch.no_grad():
        start = elbo_cls(num_particles=200, vectorize_particles=True, max_plate_nesting=1).loss(
            fresh.model, fresh.guide, x, num_data=N)
    assert runs[1] < start
    assert abs(runs[1] - runs[0]) < 0.05 * (start - runs[0])


@pytest.mark.gpu
@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_step_does_not_synchronize_on_cuda(elbo_cls):
    """After the first (validated) step, ``svi_step(validate=False, check_finite=False)`` queues its work
    without waiting for the GPU: CUDA's sync debug mode turns any synchronizing call into an error."""
    x = _data(128, 12, "cuda")
    vae = _vae().cuda()
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    loss_fn = elbo_cls(max_plate_nesting=1)
    svi_step(loss_fn, vae, x, N, opt, params)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [svi_step(loss_fn, vae, x, N, opt, params, validate=False, check_finite=False) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(float(v)) for v in losses)


def test_throughput_benchmark_quick(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick",
                          "--configs", "digits-mlp-b128", "--skip", "pythae", "pyro-before", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    report = json.loads((tmp_path / "throughput.json").read_text())
    assert report["versions"]["pyro"] == pyro.__version__ and report["date"]
    rows = report["results"][0]["results"]
    assert {"torch", "fit-trace", "fit-meanfield"} <= set(rows)
    assert rows["torch"]["ratio_to_torch"] == 1.0 and rows["fit-trace"]["images_per_s"] > 0
    assert (tmp_path / "throughput.png").stat().st_size > 0


MNIST = Path("/work/shared/data/mnist")


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="needs the MNIST files")
def test_likelihood_benchmark_quick(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "likelihood.py"), "--quick",
                          "--lr-schedule", "burda", "--full-train", "--device", "cpu", "--data-dir", str(MNIST),
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    report = json.loads((tmp_path / "likelihood.json").read_text())
    test = report["test"]
    # the IWAE bound at K=50 lies above the ELBO estimated from the same samples (Jensen), per point
    assert test["num_samples"] == 50 and test["num_points"] == 200
    assert test["log_likelihood"] >= test["elbo"] and test["log_likelihood_se"] > 0
    assert report["epochs_run"] == 1 and report["device"] == "cpu"
    assert (tmp_path / "likelihood.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs, found", [
    ({}, "device cpu"),
    ({"callbacks": [pyro_vae.schedules.KLWarmup(10)]}, "KLWarmup"),
    ({"estimator": "score-function"}, "score-function"),
    ({"elbo": pyro.infer.RenyiELBO()}, "RenyiELBO"),
])
def test_fit_refuses_a_cuda_graph_it_cannot_replay(kwargs, found):
    """Every refusal names cuda_graph, what it found and the fix, before any training."""
    vae = _vae()
    with pytest.raises(pyro_vae.ConfigError, match="cuda_graph=True") as err:
        pyro_vae.fit(vae, _data(64), epochs=1, device="cpu", progress=False, cuda_graph=True, **kwargs)
    assert found in str(err.value) and "cuda_graph=False" in str(err.value)


def test_fit_refuses_a_cuda_graph_for_a_categorical_latent():
    vae = pyro_vae.VAE((12,), 3, latent="categorical", categories=4)
    with pytest.raises(pyro_vae.ConfigError, match="latent='categorical'"):
        pyro_vae.fit(vae, _data(64), epochs=1, device="cpu", progress=False, cuda_graph=True)


def _steps(vae, loss_fn, x, n):
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    return [float(svi_step(loss_fn, vae, x, N, opt, params, validate=None if i == 0 else False)) for i in range(n)]


class _SwitchablePenaltyPrior(torch.nn.Module):
    """N(0, I) prior that adds ``pyro.factor("penalty", -100)`` per batch once switched on: its trace structure
    depends on its own state while the part itself stays the same object."""

    def __init__(self, z_dim):
        super().__init__()
        self.penalize = False
        self.register_buffer("loc", torch.zeros(z_dim))

    def forward(self):
        if self.penalize:
            pyro.factor("penalty", torch.tensor(-100.0))
        return dist.Normal(self.loc, 1.0).to_event(1)


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_every_step_scores_a_part_whose_structure_changes_as_pyro_does(elbo_cls):
    """Steps after the first still run Pyro's traces: a factor switched on after three steps is in the loss
    (the penalty, scaled by num_data / batch inside the data plate, is 100 * N / batch * batch = 100 N nats)."""
    vae = pyro_vae.VAE((12,), 3, hidden=(16,), prior=_SwitchablePenaltyPrior(3))
    x = _data()
    params = list(vae.parameters())
    opt = torch.optim.Adam(params, lr=0.0)
    loss_fn = elbo_cls(max_plate_nesting=1)
    for i in range(3):
        svi_step(loss_fn, vae, x, N, opt, params, validate=None if i == 0 else False)
    vae.prior.penalize = True
    pyro.set_rng_seed(5)
    with pyro.validation_enabled(False):
        step_loss = float(svi_step(loss_fn, vae, x, N, opt, params, validate=False))
    pyro.set_rng_seed(5)
    with pyro.validation_enabled(False):
        pyro_loss = loss_fn.loss(vae.model, vae.guide, x, num_data=N)
    assert step_loss == pytest.approx(pyro_loss, rel=1e-6)
    vae.prior.penalize = False
    pyro.set_rng_seed(5)
    with pyro.validation_enabled(False):
        plain = loss_fn.loss(vae.model, vae.guide, x, num_data=N)
    assert pyro_loss - plain == pytest.approx(100.0 * N, rel=1e-6)


def _param_prior():
    """A user prior whose location and (positive) scale are ``pyro.param``s, not module parameters."""
    loc = pyro.param("prior_loc", torch.zeros(3))
    scale = pyro.param("prior_scale", torch.ones(3), constraint=dist.constraints.positive)
    return dist.Normal(loc, scale).to_event(1)


class _ModulePrior(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(3))

    def forward(self):
        return dist.Normal(self.loc, 1.0).to_event(1)


@pytest.mark.parametrize("prior", ["pyro.param", "nn.Parameter"])
def test_fit_optimizes_every_parameter_svi_does(prior):
    """fit() takes the same steps as pyro.infer.SVI on a prior's pyro.params (constrained too) and on its
    nn.Parameters. One repeated data row makes the minibatch order irrelevant, so the two runs see the same
    batches and the same noise: losses and parameters agree to float rounding."""
    x = _data(1).expand(32, 12).contiguous()

    def build():
        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        return pyro_vae.VAE((12,), 3, hidden=(16,), prior=_param_prior if prior == "pyro.param" else _ModulePrior())

    ref = build()
    pyro.set_rng_seed(7)
    svi = SVI(ref.model, ref.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(max_plate_nesting=1))
    ref_losses = [svi.step(x, num_data=32) for _ in range(5)]
    ref_state = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    ours = build()
    history = pyro_vae.fit(ours, x, epochs=5, batch_size=32, lr=1e-2, seed=7, device="cpu", progress=False)
    assert [-e["train_elbo"] * 32 for e in history.epochs] == pytest.approx(ref_losses, rel=1e-5)
    moved = 0
    for name, value in ref_state.items():
        torch.testing.assert_close(pyro.param(name).detach(), value, rtol=1e-5, atol=1e-6, msg=name)
        moved += "prior" in name
    assert moved >= 1
    if prior == "pyro.param":
        assert float((pyro.param("prior_scale").detach() - 1).abs().max()) > 1e-3  # it trained


def test_fit_refuses_a_pyro_param_created_after_training_started():
    calls = {"n": 0}

    def late_prior():
        calls["n"] += 1
        loc = pyro.param("late_loc", torch.zeros(3)) if calls["n"] > 3 else torch.zeros(3)
        return dist.Normal(loc, 1.0).to_event(1)

    vae = pyro_vae.VAE((12,), 3, hidden=(16,), prior=late_prior)
    with pytest.raises(pyro_vae.ConfigError, match="late_loc"):
        pyro_vae.fit(vae, _data(), epochs=3, batch_size=8, device="cpu", progress=False)


def test_a_user_parts_pyro_params_are_checkpointed_and_resume_bit_for_bit(tmp_path):
    x = _data()

    def run(epochs, **kwargs):
        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        vae = pyro_vae.VAE((12,), 3, hidden=(16,), prior=_param_prior)
        pyro_vae.fit(vae, x, epochs=epochs, batch_size=8, lr=1e-2, seed=3, device="cpu", progress=False, **kwargs)
        return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    whole = run(4)
    run(2, checkpoint_dir=tmp_path / "run")
    resumed = run(4, checkpoint_dir=tmp_path / "run", resume_from=tmp_path / "run")
    assert set(whole) == set(resumed)
    assert not torch.equal(whole["prior_scale"], torch.ones(3))  # trained: the comparison is not of frozen values
    for name in ("prior_loc", "prior_scale"):
        assert torch.equal(whole[name], resumed[name]), name


class _ModuleRegisteringPrior:
    """A prior whose location goes through a module it registers with pyro.module (not a VAE submodule)."""

    def __init__(self):
        self.net = torch.nn.Linear(3, 3)

    def __call__(self):
        pyro.module("extnet", self.net)
        return dist.Normal(self.net(torch.zeros(3)), 1.0).to_event(1)


def test_a_module_registered_by_a_user_part_is_checkpointed_and_resumes_bit_for_bit(tmp_path):
    x = _data()

    def run(epochs, **kwargs):
        pyro.clear_param_store()
        pyro.set_rng_seed(123)
        prior = _ModuleRegisteringPrior()
        vae = pyro_vae.VAE((12,), 3, hidden=(16,), prior=prior)
        pyro_vae.fit(vae, x, epochs=epochs, batch_size=8, lr=1e-2, seed=3, device="cpu", progress=False, **kwargs)
        return [p.detach().clone() for p in prior.net.parameters()], [p.detach().clone() for p in vae.parameters()]

    whole = run(4)
    run(2, checkpoint_dir=tmp_path / "run")
    resumed = run(4, checkpoint_dir=tmp_path / "run", resume_from=tmp_path / "run")
    initial = [p.detach() for p in _fresh_net()]
    assert not all(torch.equal(a, b) for a, b in zip(whole[0], initial))  # it trained
    for a, b in zip(whole[0] + whole[1], resumed[0] + resumed[1]):
        assert torch.equal(a, b)


def _fresh_net():
    pyro.set_rng_seed(123)  # run() builds the prior's module first, from the same draws
    return list(torch.nn.Linear(3, 3).parameters())
