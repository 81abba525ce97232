"""The ``pyro.param`` sites a training run optimizes beyond the VAE's modules (those of a user's prior,
likelihood or encoder), and their values in the param store, as a checkpoint saves and restores them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.params import user_param_name

from pyro_vae.errors import ConfigError, message
from pyro_vae.infer.pair import ModelGuidePair
from pyro_vae.models.vae import VAE
from pyro_vae.pyro_internals import unconstrained_params

__all__ = ["collect_user_params", "check_no_new_params", "pyro_param_values", "set_pyro_param_values"]


def collect_user_params(loss_fn: ELBO, vae: VAE | ModelGuidePair, xb: torch.Tensor, num_data: int,
                        own: Sequence[torch.Tensor], dynamic_binarize: bool = False,
                        context: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The unconstrained tensors of the ``pyro.param`` sites that the model and guide traces touch and that
    are not parameters of the VAE's (or the ELBO's) modules: what ``pyro.infer.SVI`` would optimize beyond
    them, e.g. a ``pyro.param`` declared inside a user prior, likelihood or encoder. One evaluation of the
    loss on ``xb`` (and its named ``context``, the model's keyword arguments), with the random streams left as
    they were."""
    dev = xb.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad():
        if dynamic_binarize:  # the batch as the steps see it
            xb = torch.bernoulli(xb)
        with poutine.trace(param_only=True) as capture:
            # every Pyro ELBO defines loss; the ELBO base class does not declare it
            loss_fn.loss(vae.model, vae.guide, xb, num_data=num_data, **(context or {}))  # type: ignore[attr-defined]
    known = {id(p) for p in own}
    found: dict[str, torch.Tensor] = {}
    for name, site in capture.trace.nodes.items():
        value: Any = site["value"]  # a constrained tensor carries Pyro's `unconstrained` weak reference
        unconstrained = value.unconstrained() if hasattr(value, "unconstrained") else value
        if id(unconstrained) not in known and unconstrained.requires_grad:
            found[name] = unconstrained
            known.add(id(unconstrained))
    return found


def _in_module(name: str) -> bool:
    """Whether the param-store entry ``name`` is a parameter of a module registered with ``pyro.module`` (Pyro
    names those ``module_name + separator + parameter_name``)."""
    return user_param_name(name) != name


def check_no_new_params(user_params: dict[str, torch.Tensor], own_count: int) -> None:
    """Refuse a ``pyro.param`` first created after training started that the steps differentiate: the optimizer
    was built without it. (Entries Pyro updates itself, such as ``TraceGraph_ELBO``'s average baselines, have no
    gradient and pass.)"""
    store = pyro.get_param_store()
    if len(store) <= own_count:
        return
    new = [name for name, leaf in store.named_parameters() if not _in_module(name) and name not in user_params
           and leaf.grad is not None]  # differentiated, yet not optimized
    if new:
        raise ConfigError(message(
            f"pyro.param {new[0]!r}", "every pyro.param of the model and guide created by their first call",
            "a pyro.param first created after training started, which the optimizer does not hold",
            "create it unconditionally when the part is called (or in the part's __init__ as an nn.Parameter)"))


def pyro_param_values(optimized: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Unconstrained values of the Pyro param-store entries outside the VAE's own modules: those that belong to
    no ``nn.Module`` (a ``pyro.param`` of a user part, ``TraceGraph_ELBO``'s decaying-average baselines) and
    the ``optimized`` ones, which include the parameters of a module a user part registers with
    ``pyro.module``; the VAE's module parameters travel in its state dict."""
    store = pyro.get_param_store()
    keep = set(optimized)
    return {name: leaf.detach().cpu() for name, leaf in store.named_parameters()
            if not _in_module(name) or name in keep}


@torch.no_grad()
def set_pyro_param_values(values: dict[str, torch.Tensor]) -> None:
    """Write checkpointed unconstrained values into the param store, in place where the param exists (the
    optimizer holds those tensors)."""
    store = pyro.get_param_store()
    for name, value in values.items():
        if name in store:
            target = unconstrained_params(store)[name]
            target.copy_(value.to(device=target.device, dtype=target.dtype))
        else:
            store[name] = value
