"""Every estimator's gradient under minibatch scaling: for a model whose sites all sit in the data plate, the
ELBO (or the IWAE bound) of a batch scored with ``num_data=N`` is ``N / B`` times the batch's own, so with the
same random draws the loss and the gradient of every parameter of the model and guide scale by exactly that
factor; every other combination of latent, estimator and objective is refused with a ConfigError, never a raw
error. An estimator that scales one of its terms twice, or not at all (a score-function term of a
non-reparameterized site, a control variate, a leave-one-out signal), fails here. Deterministic: the same seed
gives the same draws at both scalings; learned parts of an estimator are reset between the two calls.

Left out: ``score-function-neural-baseline``, whose baseline (Pyro's ``TraceGraph_ELBO`` ``nn_baseline``) is
regressed on the scaled downstream cost: unbiased at any scale, but not linear in it."""

from __future__ import annotations

import copy

import pyro
import pytest
import torch

import pyro_vae
from pyro_vae.errors import ConfigError
from pyro_vae.infer.elbo import make_elbo
from pyro_vae.infer.estimators import BASELINE_PARAM, ESTIMATORS

B, FACTOR = 8, 3
LATENTS = {
    "bernoulli": dict(latent="bernoulli", prior="bernoulli-learned"),
    "gaussian": dict(latent="gaussian"),
    "categorical": dict(latent="categorical", categories=3),
}


def _gradients(vae, loss_fn, x, num_data, seed):
    pyro.set_rng_seed(seed)
    vae.zero_grad(set_to_none=True)
    store = pyro.get_param_store()
    for key in [k for k in store.keys() if k.startswith(BASELINE_PARAM)]:
        del store[key]  # the decaying-average baseline starts afresh at both scalings
    loss = loss_fn.loss_and_grads(vae.model, vae.guide, x, num_data=num_data)
    return float(loss), {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("elbo", ["trace", "iwae"])
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
@pytest.mark.parametrize("latent", sorted(LATENTS))
def test_loss_and_every_gradient_scale_with_num_data(latent, estimator, elbo):
    if estimator == "score-function-neural-baseline":
        pytest.skip("the learned baseline is fit to the scaled cost (module docstring)")
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = pyro_vae.VAE(data_shape=(6,), z_dim=3, hidden=(8,), likelihood="bernoulli", **LATENTS[latent])
    x = torch.bernoulli(torch.full((B, 6), 0.4))
    try:
        loss_fn = make_elbo(elbo, 3, estimator, data_shape=(6,))
        modules = loss_fn.extra_modules() if hasattr(loss_fn, "extra_modules") else []
        states = [copy.deepcopy(m.state_dict()) for m in modules]
        loss_1, grads_1 = _gradients(vae, loss_fn, x, B, seed=1)
    except ConfigError:
        return  # an estimator that does not apply to this latent or objective is refused with a clear error
    assert any(bool(g.abs().sum() > 0) for g in grads_1.values())
    for module, state in zip(modules, states, strict=True):
        module.load_state_dict(state)
    loss_n, grads_n = _gradients(vae, loss_fn, x, FACTOR * B, seed=1)
    assert loss_n == pytest.approx(FACTOR * loss_1, rel=1e-5, abs=1e-6)
    assert grads_n.keys() == grads_1.keys()
    for name, g in grads_1.items():
        torch.testing.assert_close(grads_n[name], FACTOR * g, rtol=1e-4, atol=1e-6, msg=f"parameter {name}")


@pytest.mark.parametrize("estimator", ["nvil", "muprop", "relax"])
def test_learned_parts_work_in_nats_per_data_point(estimator):
    """The learned parts of NVIL, MuProp and RELAX (baselines, NVIL's running mean and variance, RELAX's
    surrogate) are in nats per data point: with them away from their initial values (NVIL's variance
    normalization active), scoring the batch with ``num_data = 3 B`` still scales every gradient of the model and
    guide by exactly 3; what the learned parts themselves are trained on does not change (NVIL, MuProp), or is
    RELAX's ``|G|^2``, 9 times as large. Deterministic (same draws at both scalings)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = pyro_vae.VAE(data_shape=(6,), z_dim=3, hidden=(8,), likelihood="bernoulli", **LATENTS["bernoulli"])
    x = torch.bernoulli(torch.full((B, 6), 0.4))
    loss_fn = make_elbo("trace", 1, estimator, data_shape=(6,))
    modules = loss_fn.extra_modules()
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(0.3 * torch.randn_like(p))
            for name, buf in module.named_buffers():  # NVIL: mean -5 nats, variance 9 (normalization active)
                buf.fill_(9.0 if name.endswith("var") else -5.0)
    states = [copy.deepcopy(m.state_dict()) for m in modules]
    own = []
    for num_data in (B, FACTOR * B):
        for module, state in zip(modules, states, strict=True):
            module.load_state_dict(state)
            module.zero_grad(set_to_none=True)
        own.append(_gradients(vae, loss_fn, x, num_data, seed=1)[1])
        own.append({n: p.grad.clone() for m in modules for n, p in m.named_parameters() if p.grad is not None})
    grads_1, learned_1, grads_n, learned_n = own
    assert any(bool(g.abs().sum() > 0) for n, g in grads_1.items() if n.startswith("encoder"))
    for name, g in grads_1.items():
        torch.testing.assert_close(grads_n[name], FACTOR * g, rtol=1e-4, atol=1e-6, msg=f"parameter {name}")
    assert learned_1 and learned_n.keys() == learned_1.keys()
    factor = FACTOR ** 2 if estimator == "relax" else 1
    for name, g in learned_1.items():
        torch.testing.assert_close(learned_n[name], factor * g, rtol=1e-4, atol=1e-6, msg=f"learned {name}")
    pyro.clear_param_store()


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.01])
def test_cost_units_are_the_minibatch_scale_whatever_the_kl_weight(beta, monkeypatch):
    """``SiteContext.cost_units`` is the data plate's ``num_data / batch`` only: the VAE's KL weight (a
    ``poutine.scale`` on the latent site) is not part of the per-data-point units of the learned parts."""
    from pyro_vae.infer import site_context

    seen = []
    units = site_context.SiteContext.cost_units.fget
    monkeypatch.setattr(site_context.SiteContext, "cost_units", property(lambda self: seen.append(units(self))
                                                                        or seen[-1]))
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = pyro_vae.VAE(data_shape=(6,), z_dim=3, hidden=(8,), likelihood="bernoulli", beta=beta,
                       **LATENTS["bernoulli"])
    x = torch.bernoulli(torch.full((B, 6), 0.4))
    make_elbo("trace", 1, "nvil", data_shape=(6,)).loss_and_grads(vae.model, vae.guide, x, num_data=10 * B)
    assert seen and all(u == 10.0 for u in seen), seen
    pyro.clear_param_store()
