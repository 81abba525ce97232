"""The private parts of Pyro this package relies on, each behind one function (one mixin for a method override).

Pyro has no public API for these; each docstring says which private name it reads, what it assumes of it and
why the package needs it. ``tests/test_pyro_internals.py`` checks every assumption against the installed
Pyro, so a release that changes one of them fails there, by name, before anything else breaks in a
surprising way. ``pyproject.toml`` pins ``pyro-ppl`` below 1.10 for them: raise the pin once those tests pass
on the new release.

This module imports only Pyro and torch, so any module of the package may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO, trace_elbo
from pyro.infer.util import MultiFrameTensor
from pyro.params.param_store import ParamStoreDict
from pyro.poutine import runtime
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace
from torch.distributions.constraints import Constraint

__all__ = ["particle_traces", "particle_loss", "ParticleHandlerMixin", "trace_log_r", "active_messengers",
           "unconstrained_params", "param_constraints"]


def particle_traces(elbo: ELBO, model: Callable, guide: Callable, args: tuple,
                    kwargs: dict) -> Iterator[tuple[Trace, Trace]]:
    """The ``(model_trace, guide_trace)`` pairs ``elbo`` computes its estimate from: ``num_particles`` pairs,
    or one pair whose sites carry the particles in an outer plate when ``elbo.vectorize_particles``.

    Relies on ``ELBO._get_traces(model, guide, args, kwargs)``, the generator every Pyro ELBO's ``loss``,
    ``loss_and_grads`` and ``differentiable_loss`` iterate over. :func:`pyro_vae.infer.losses.elbo_loss` reads
    the traces through it to build the loss as tensors without the ``.item()`` host synchronizations of
    those public methods; calling the methods would bring the synchronizations back."""
    return elbo._get_traces(model, guide, args, kwargs)


def particle_loss(elbo_class: type[Trace_ELBO]) -> Callable[[Any, Trace, Trace], tuple[Any, torch.Tensor]]:
    """The function ``(elbo, model_trace, guide_trace) -> (loss, surrogate_loss)`` with which ``elbo_class``
    computes one particle's loss (a Python float) and the surrogate loss it differentiates.

    Relies on ``Trace_ELBO._differentiable_loss_particle`` (and ``TraceMeanField_ELBO``'s override of it).
    :mod:`pyro_vae.infer.losses` calls it for particles with a score-function term, so that those keep
    Pyro's own definition, and compares it between a class and its base to know that a subclass has not
    changed the particle loss (then the sync-free loss is the same quantity)."""
    return elbo_class._differentiable_loss_particle


class ParticleHandlerMixin:
    """Mixin for a Pyro ELBO class (list it before the ELBO: ``class E(ParticleHandlerMixin, Trace_ELBO)``):
    :meth:`handle_particle` may wrap the model and guide of every particle in effect handlers before Pyro
    traces them, whichever method draws the traces (``loss``, ``loss_and_grads``, ``differentiable_loss``,
    :func:`particle_traces`) and whether the particles are sequential or vectorized.

    Relies on ``ELBO._get_trace(model, guide, args, kwargs)``: every Pyro 1.9 ELBO traces each particle (or
    the one vectorized pair, whose model and guide are already wrapped in the particle plate) through it.
    Wrapping the callables before calling a public method would miss the sync-free loss of
    :func:`particle_traces` and would not see the particle's ``args``; the gradient estimators of
    :mod:`pyro_vae.infer.estimators` need both. (An ELBO built with ``max_plate_nesting=inf`` first runs
    model and guide once outside this method to guess it; pass a finite value.)"""

    def handle_particle(self, model: Callable, guide: Callable, args: tuple,
                        kwargs: dict) -> tuple[Callable, Callable]:
        """The model and guide to trace for one particle (``args``/``kwargs``: those the ELBO method was
        called with). The default returns them unchanged."""
        return model, guide

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
        model, guide = self.handle_particle(model, guide, args, kwargs)
        return super()._get_trace(model, guide, args, kwargs)  # type: ignore[misc]


def trace_log_r(model_trace: Trace, guide_trace: Trace) -> MultiFrameTensor:
    """``log p(x, z) - log q(z)`` of a model/guide trace pair (``compute_log_prob`` done on both), detached and
    kept per plate frame, so that ``.sum_to(site["cond_indep_stack"])`` gives the downstream cost of a
    score-function site as ``Trace_ELBO`` weights it.

    Relies on ``pyro.infer.trace_elbo._compute_log_r``, the helper ``Trace_ELBO`` itself uses.
    :mod:`pyro_vae.infer.variance` calls it so that its vectorized gradient samples weight each
    score-function term exactly as the Pyro ELBO they are checked against."""
    return trace_elbo._compute_log_r(model_trace, guide_trace)


def active_messengers() -> tuple[Messenger, ...]:
    """The effect handlers active now, outermost first (empty outside any handler).

    Relies on ``pyro.poutine.runtime._PYRO_STACK``, the list Pyro pushes a ``Messenger`` onto when it is
    entered and pops it from on exit. :func:`pyro_vae.distributions.relaxed.straight_through_override` reads it:
    code that runs inside a model but outside a sample statement (the decoder's input of a categorical
    latent) asks which gradient estimator the enclosing ELBO applies."""
    return tuple(runtime._PYRO_STACK)


def unconstrained_params(store: ParamStoreDict | None = None) -> Mapping[str, torch.Tensor]:
    """A read-only view of the param store (default: Pyro's global one), param name -> the unconstrained
    leaf tensor that optimizers update; no copy is made. The view follows the entries set and deleted after it
    was taken, not a ``clear()`` (nor a ``scope()``), which gives the store new dicts: take it where it is used.

    Relies on ``ParamStore._params``, the dict behind the public ``named_parameters()`` (which gives only
    ``(name, tensor)`` pairs, no lookup by name); ``store[name]`` would give the constrained value, a new
    tensor for a constrained param. Used to look the leaves up by name: :mod:`pyro_vae.infer.variance`
    differentiates them, :class:`pyro_vae.VAE` checks a module registration against them."""
    store = pyro.get_param_store() if store is None else store
    return MappingProxyType(store._params)


def param_constraints(store: ParamStoreDict | None = None) -> Mapping[str, Constraint]:
    """A read-only view of the param store (default: Pyro's global one), param name -> its constraint; it
    follows the store as :func:`unconstrained_params` does.

    Relies on ``ParamStore._constraints``; the only public way to them, ``get_state()``, copies the store and
    strips each param's ``unconstrained`` weak reference. :mod:`pyro_vae.infer.variance` maps unconstrained
    values to constrained ones with them when it evaluates the traces on functional tensors."""
    store = pyro.get_param_store() if store is None else store
    return MappingProxyType(store._constraints)
