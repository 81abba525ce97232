"""The private parts of Pyro that pyro_vae.pyro_internals relies on still exist and behave as its docstrings say.

Each test names the Pyro attribute it checks: when a Pyro release changes one, the failure here says which, before
the training step, the gradient estimators or the variance study break in a less obvious way."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import MultiFrameTensor
from torch.distributions import constraints

from pyro_vae import pyro_internals
from pyro_vae.pyro_internals import (
    ParticleHandlerMixin,
    active_messengers,
    param_constraints,
    particle_loss,
    particle_traces,
    trace_log_r,
    unconstrained_params,
)

X = torch.tensor([0.3, -1.2, 2.0])


def model(x):
    loc = pyro.param("prior_loc", torch.tensor(0.5))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = pyro.param("q_loc", torch.zeros(x.shape[0]))
    scale = pyro.param("q_scale", torch.ones(x.shape[0]), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale))


def test_the_private_names_exist():
    """``ELBO._get_traces``/``_get_trace``, ``Trace_ELBO._differentiable_loss_particle``,
    ``trace_elbo._compute_log_r``, ``runtime._PYRO_STACK``, ``ParamStoreDict._params``/``_constraints``."""
    from pyro.infer import trace_elbo
    from pyro.poutine import runtime

    assert callable(ELBO._get_traces) and callable(ELBO._get_trace)
    for cls in (Trace_ELBO, TraceMeanField_ELBO):
        assert callable(cls._differentiable_loss_particle)
    assert callable(trace_elbo._compute_log_r)
    assert isinstance(runtime._PYRO_STACK, list)
    store = pyro.get_param_store()
    assert isinstance(store._params, dict) and isinstance(store._constraints, dict)


@pytest.mark.parametrize("vectorize", [False, True])
def test_particle_traces_are_the_pairs_the_elbo_sums(vectorize):
    """``ELBO._get_traces``: ``num_particles`` (model, guide) trace pairs, or one pair with the particles in an outer
    plate; ``Trace_ELBO.loss`` is minus the mean of ``log p - log q`` over them."""
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=vectorize, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    pairs = list(particle_traces(elbo, model, guide, (X,), {}))
    assert len(pairs) == (1 if vectorize else 4)
    total = 0.0
    for model_trace, guide_trace in pairs:
        assert model_trace.nodes["x"]["is_observed"] and "z" in guide_trace.nodes
        assert model_trace.nodes["z"]["value"] is guide_trace.nodes["z"]["value"]  # replayed
        assert guide_trace.nodes["z"]["value"].shape == ((4, 3) if vectorize else (3,))
        total += float(model_trace.log_prob_sum().detach() - guide_trace.log_prob_sum().detach())
    pyro.set_rng_seed(0)
    assert elbo.loss(model, guide, X) == pytest.approx(-total / 4, rel=1e-5)


def test_particle_loss_is_the_loss_of_one_particle():
    """``_differentiable_loss_particle(model_trace, guide_trace)``: ``(loss, surrogate_loss)``, the loss a float
    equal to ``-(log p - log q)``; ``TraceMeanField_ELBO`` overrides it, subclasses that do not keep it."""
    elbo = Trace_ELBO(max_plate_nesting=1)
    ((model_trace, guide_trace),) = particle_traces(elbo, model, guide, (X,), {})
    loss, surrogate = particle_loss(Trace_ELBO)(elbo, model_trace, guide_trace)
    assert isinstance(loss, float) and torch.is_tensor(surrogate) and surrogate.requires_grad
    expected = -float(model_trace.log_prob_sum().detach() - guide_trace.log_prob_sum().detach())
    assert loss == pytest.approx(expected, rel=1e-5)
    assert float(surrogate.detach()) == pytest.approx(loss, rel=1e-5)  # a reparameterized guide: no score-function term

    class Sub(Trace_ELBO):
        pass

    assert particle_loss(Sub) is particle_loss(Trace_ELBO)
    assert particle_loss(TraceMeanField_ELBO) is not particle_loss(Trace_ELBO)


@pytest.mark.parametrize("elbo_class", [Trace_ELBO, TraceMeanField_ELBO, TraceGraph_ELBO])
@pytest.mark.parametrize("vectorize", [False, True])
def test_particle_handler_sees_every_particle_of_every_method(elbo_class, vectorize):
    """``ELBO._get_trace`` is where every method of every ELBO traces a particle: the handler is applied once per
    particle (once for vectorized particles) by ``loss``, ``loss_and_grads``, ``differentiable_loss`` and
    ``_get_traces``, and what it returns is what is traced."""
    seen = []

    class Scaled(ParticleHandlerMixin, elbo_class):
        def handle_particle(self, model, guide, args, kwargs):
            seen.append(args)
            return poutine.mask(model, mask=False), poutine.mask(guide, mask=False)

    elbo = Scaled(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=1)
    per_call = 1 if vectorize else 3
    assert elbo.loss(model, guide, X) == 0.0  # every log-density masked out
    assert len(seen) == per_call and seen[0] == (X,)
    elbo.loss_and_grads(model, guide, X)
    calls = 2
    if hasattr(elbo, "differentiable_loss"):  # TraceGraph_ELBO has none
        assert float(elbo.differentiable_loss(model, guide, X)) == 0.0
        calls += 1
    pairs = list(particle_traces(elbo, model, guide, (X,), {}))
    assert len(seen) == (calls + 1) * per_call and len(pairs) == per_call
    assert all(pair[0].nodes["x"]["mask"] is False for pair in pairs)


def test_trace_log_r_is_log_p_minus_log_q_per_plate_frame():
    """``trace_elbo._compute_log_r``: a ``MultiFrameTensor`` of detached ``log p - log q`` whose ``sum_to`` the
    site's plates gives the per-data-point cost of a score-function term."""
    ((model_trace, guide_trace),) = particle_traces(Trace_ELBO(max_plate_nesting=1), model, guide, (X,), {})
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_r = trace_log_r(model_trace, guide_trace)
    assert isinstance(log_r, MultiFrameTensor)
    cost = log_r.sum_to(guide_trace.nodes["z"]["cond_indep_stack"])
    expected = (model_trace.nodes["x"]["log_prob"] + model_trace.nodes["z"]["log_prob"]
                - guide_trace.nodes["z"]["log_prob"])
    assert cost.shape == (3,) and not cost.requires_grad
    assert torch.allclose(cost, expected.detach())


def test_active_messengers_are_the_handler_stack_outermost_first():
    """``runtime._PYRO_STACK``: the entered handlers, outermost first, and nothing outside them."""
    assert active_messengers() == ()
    with poutine.trace() as outer, poutine.scale(scale=2.0) as inner:
        assert active_messengers() == (outer, inner)

        def body():
            return active_messengers()

        assert poutine.block(body)()[:2] == (outer, inner)  # a handler applied to a callable joins while it runs
    assert active_messengers() == ()


def test_param_store_views_are_the_leaves_and_constraints():
    """``ParamStoreDict._params``: the unconstrained leaves ``named_parameters()`` gives, by name;
    ``_constraints``: each param's constraint. Read-only views that follow later entries."""
    store = pyro.get_param_store()
    pyro.param("a", torch.tensor([1.0, 2.0]), constraint=constraints.positive)
    leaves, cons = unconstrained_params(), param_constraints()
    assert leaves["a"] is dict(store.named_parameters())["a"]
    assert torch.allclose(leaves["a"], torch.tensor([1.0, 2.0]).log()) and leaves["a"].requires_grad
    assert cons["a"] is constraints.positive
    pyro.param("b", torch.zeros(1))
    assert "b" in leaves and cons["b"] is constraints.real  # live
    del store["b"]
    assert "b" not in leaves and "b" not in cons
    with pytest.raises(TypeError):
        leaves["c"] = torch.zeros(1)  # type: ignore[index]
    other = pyro.params.param_store.ParamStoreDict()
    other["d"] = torch.ones(1)
    assert set(unconstrained_params(other)) == {"d"} and set(param_constraints(other)) == {"d"}


def test_the_module_imports_only_pyro_and_torch():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(pyro_internals.__file__).read_text())
    nodes = list(ast.walk(tree))
    roots = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in nodes if isinstance(node, ast.ImportFrom) and node.module}
    assert roots <= {"__future__", "collections", "types", "typing", "pyro", "torch"}
