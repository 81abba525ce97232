"""Many independent one-sample gradient estimates at fixed parameters, and their statistics.

:func:`gradient_samples` draws ``num_samples`` independent estimates of the gradient of the loss
(the negative ELBO of the batch ``x``, as Pyro's ``loss_and_grads`` leaves it in ``.grad``) under one
estimator of :mod:`pyro_vae.estimators`. Two implementations draw from the same distribution:

- ``method="loop"``, the reference: Pyro's own ``loss_and_grads`` called ``num_samples`` times;
- ``method="vectorized"``: ``torch.func.vmap`` of ``torch.func.grad`` of a ``functional_call`` of the
  model/guide pair, with the guide's noise passed in as the vmapped input (random draws cannot happen
  inside ``vmap`` over a Pyro trace). The per-sample surrogate loss is Pyro's ``Trace_ELBO`` surrogate
  (``score_parts`` of every site, ``log_r`` summed to each site's plates), minus the baseline for
  baseline estimators; for a VAE's single latent site this is ``TraceGraph_ELBO``'s downstream cost.

Baselines are held fixed while sampling: the decaying average is warmed up with Pyro's ``TraceGraph_ELBO``
and then frozen, the neural baseline is evaluated at its current parameters.

:func:`gradient_statistics` summarizes samples per parameter group (encoder, decoder, prior, likelihood):
the mean per-coordinate variance ``(1/D) tr Cov``, the total variance ``tr Cov``, the signal-to-noise ratio
``|mean| / std`` averaged over coordinates (Rainforth et al. 2018), and the bias against an exact
gradient when one is known (the linear-Gaussian VAE: :func:`exact_gradient`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Optional, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import is_identically_zero
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch import nn

from .errors import ConfigError, message
from .estimators import (BASELINE_PARAM, Estimator, EstimatorMessenger, NeuralBaseline, ScoreFunction,
                         _is_relaxed_categorical, _unwrap_independent, get_estimator, make_estimator_elbo)

__all__ = ["gradient_samples", "gradient_statistics", "parameter_groups", "exact_gradient", "flat_gradient",
           "summarize", "METHODS"]

METHODS = ("vectorized", "loop")
GROUPS = ("encoder", "decoder", "prior", "likelihood")


def parameter_groups(vae: nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """``{"encoder": [(name, param), ...], "decoder": ..., "prior": ..., "likelihood": ...}`` of the
    trainable parameters (empty groups left out; anything else under ``"other"``)."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in vae.named_parameters():
        if not p.requires_grad:
            continue
        head = name.split(".", 1)[0]
        groups.setdefault(head if head in GROUPS else "other", []).append((name, p))
    order = [g for g in (*GROUPS, "other") if g in groups]
    return {g: groups[g] for g in order}


def _split(flat: torch.Tensor, groups: dict[str, list[tuple[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for g, items in groups.items():
        n = sum(p.numel() for _, p in items)
        out[g] = flat[..., i: i + n]
        i += n
    return out


def flat_gradient(vae: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """Gradient of a scalar ``loss`` with respect to the trainable parameters, flattened in
    :func:`parameter_groups` order, ``(num_params,)``."""
    params = [p for items in parameter_groups(vae).values() for _, p in items]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def exact_gradient(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Exact gradient of the loss ``-sum(ELBO(x))`` of a linear-Gaussian VAE (see
    :mod:`pyro_vae.linear_gaussian`), by autograd of the closed form; ``(num_params,)``."""
    from .linear_gaussian import exact_elbo

    return flat_gradient(vae, -exact_elbo(vae, x).sum())


# --------------------------------------------------------------------------------- noise-driven guide
class _NoiseMessenger(Messenger):
    """Sets each latent guide site's value from given noise instead of drawing it: ``loc + scale * eps``
    for Normal, Gumbel-softmax / Gumbel-max for (relaxed) one-hot categoricals; detached when the site
    uses the score function."""

    def __init__(self, noise: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.noise = noise

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] in self.noise and not msg["is_observed"]:
            msg["value"] = _draw(msg["fn"], self.noise[msg["name"]], msg["name"])


def _noise_kind(fn: dist.Distribution, site: str) -> str:
    base = fn.base if isinstance(fn, ScoreFunction) else fn
    base, _ = _unwrap_independent(base)
    if isinstance(base, (torch.distributions.Normal,)):
        return "normal"
    if isinstance(base, torch.distributions.OneHotCategorical) or _is_relaxed_categorical(base):
        return "gumbel"
    raise ConfigError(message(
        f'guide site "{site}"', "a Normal or (relaxed) one-hot categorical guide for vectorized sampling",
        type(base).__name__, 'use method="loop"'))


def _one_hot_argmax(t: torch.Tensor) -> torch.Tensor:
    # F.one_hot checks its input's range with .item(), which vmap refuses
    return torch.zeros_like(t).scatter(-1, t.argmax(-1, keepdim=True), 1.0)


def _draw(fn: dist.Distribution, eps: torch.Tensor, site: str) -> torch.Tensor:
    detach = isinstance(fn, ScoreFunction) or not fn.has_rsample
    base = fn.base if isinstance(fn, ScoreFunction) else fn
    base, _ = _unwrap_independent(base)
    if isinstance(base, torch.distributions.Normal):
        value = base.loc + base.scale * eps
    elif isinstance(base, torch.distributions.OneHotCategorical):
        value = _one_hot_argmax(base.logits + eps)
    elif _is_relaxed_categorical(base):
        logx = torch.log_softmax((base.logits + eps) / base.temperature, dim=-1)
        soft = logx.exp()
        if getattr(base, "straight_through", False):
            hard = _one_hot_argmax(logx)
            value = hard + (soft - soft.detach())
        else:
            value = soft
        if detach:
            value, logx = value.detach(), logx.detach()
        from .relaxed import _LOG_ATTR

        setattr(value, _LOG_ATTR, logx)
        return value
    else:  # pragma: no cover - _noise_kind rejects it first
        raise ConfigError(message(f'guide site "{site}"', "a supported distribution", type(base).__name__,
                                  'use method="loop"'))
    return value.detach() if detach else value


def _standard_noise(kind: str, shape: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(shape, device=device, dtype=dtype)
    u = torch.rand(shape, device=device, dtype=dtype).clamp(torch.finfo(dtype).tiny, 1.0)
    return -torch.log((-torch.log(u)).clamp_min(torch.finfo(dtype).tiny))


class _ParamsFromModules(Messenger):
    """Inside ``functional_call``: answer ``pyro.param`` statements with the module's own (functional)
    tensors, leaving Pyro's global param store untouched."""

    def _pyro_param(self, msg: dict) -> None:
        if len(msg["args"]) > 1 and torch.is_tensor(msg["args"][1]):
            msg["value"] = msg["args"][1]


def _particles(fn: Callable, num_particles: int) -> Callable:
    if num_particles == 1:
        return fn
    return pyro.plate("num_particles_vectorized", num_particles, dim=-2)(fn)


class _Surrogate(nn.Module):
    """``forward(noise, x)``: the surrogate loss of one estimate (the quantity whose gradient is the
    estimator), averaged over ``num_particles``."""

    def __init__(self, vae: nn.Module, est: Estimator, num_particles: int, elbo: str,
                 baseline: Optional[dict[str, torch.Tensor]], kwargs: dict) -> None:
        super().__init__()
        self.vae = vae
        self.est = dataclasses.replace(est, baseline=None)  # baselines are subtracted in forward
        self.num_particles = num_particles
        self.elbo = elbo
        self.baseline = baseline or {}
        self.kwargs = kwargs

    def traces(self, noise: Optional[dict[str, torch.Tensor]], x: torch.Tensor):
        guide = EstimatorMessenger(self.est, "guide")(self.vae.guide)
        model = EstimatorMessenger(self.est, "model")(self.vae.model)
        guide, model = _particles(guide, self.num_particles), _particles(model, self.num_particles)
        if noise is not None:
            guide = _NoiseMessenger(noise)(guide)
        guide_tr = poutine.trace(guide).get_trace(x, **self.kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, **self.kwargs)
        return prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)

    def forward(self, noise: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with _ParamsFromModules(), pyro.validation_enabled(False), pyro.settings.context(module_local_params=True):
            model_tr, guide_tr = self.traces(noise, x)
            model_tr.compute_log_prob()
            guide_tr.compute_score_parts()
            elbo: Any = 0.0
            latent = set()
            if self.elbo == "meanfield":
                for name, site in model_tr.nodes.items():
                    if site["type"] != "sample" or site["is_observed"]:
                        continue
                    g = guide_tr.nodes[name]
                    kl = torch.distributions.kl_divergence(g["fn"], site["fn"])
                    elbo = elbo - (kl * g["scale"]).sum()
                    latent.add(name)
            for name, site in model_tr.nodes.items():
                if site["type"] == "sample" and name not in latent:
                    elbo = elbo + site["log_prob_sum"]
            log_r = None
            for name, site in guide_tr.nodes.items():
                if site["type"] != "sample" or name in latent:
                    continue
                _, score, entropy = site["score_parts"]
                if not is_identically_zero(entropy):
                    elbo = elbo - entropy.sum()
                if not is_identically_zero(score):
                    if log_r is None:
                        log_r = _compute_log_r(model_tr, guide_tr)
                    cost = log_r.sum_to(site["cond_indep_stack"])
                    if name in self.baseline:
                        cost = cost - self.baseline[name]
                    elbo = elbo + (cost.detach() * score).sum()
        return -elbo / self.num_particles


# ------------------------------------------------------------------------------------------- baselines
def _baselines(vae: nn.Module, x: torch.Tensor, est: Estimator, nn_baseline: Optional[nn.Module],
               warmup: int, kwargs: dict) -> tuple[dict[str, torch.Tensor], Optional[nn.Module]]:
    """Fixed baselines per latent guide site: the warmed-up decaying average or ``nn_baseline(x)``."""
    if est.baseline is None:
        return {}, None
    sites = [n for n, s in prune_subsample_sites(poutine.trace(vae.guide).get_trace(x, **kwargs)).nodes.items()
             if s["type"] == "sample" and not s["is_observed"]]
    if est.baseline == "neural":
        if nn_baseline is None:
            nn_baseline = NeuralBaseline(vae.data_shape).to(x.device)
        with torch.no_grad():
            b = nn_baseline(x).detach()
        return {s: b for s in sites}, nn_baseline
    loss_fn = make_estimator_elbo(est, "trace", 1)
    store = pyro.get_param_store()
    for s in sites:
        if BASELINE_PARAM + s in store:
            del store[BASELINE_PARAM + s]
    for _ in range(max(1, warmup)):
        loss_fn.loss_and_grads(vae.model, vae.guide, x, **kwargs)
    vae.zero_grad(set_to_none=True)
    return {s: store[BASELINE_PARAM + s].detach().clone() for s in sites}, None


# ---------------------------------------------------------------------------------------- the samplers
def _check(vae: nn.Module, x: torch.Tensor, num_samples: int, num_particles: int, method: str, elbo: str) -> None:
    for name, value in (("num_samples", num_samples), ("num_particles", num_particles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(message(name, "an integer >= 1", repr(value), f"pass {name}=1 or more"))
    if method not in METHODS:
        raise ConfigError(message("method", " or ".join(map(repr, METHODS)), repr(method), 'pass "vectorized"'))
    if elbo not in ("trace", "meanfield"):
        raise ConfigError(message("elbo", '"trace" or "meanfield"', repr(elbo), 'pass elbo="trace"'))
    if hasattr(vae, "check_data"):
        vae.check_data(x)


def _iter_loop(vae, x, est, num_samples, num_particles, elbo, baseline, nn_baseline, kwargs, chunk):
    groups = parameter_groups(vae)
    params = [p for items in groups.values() for _, p in items]
    loss_fn = make_estimator_elbo(est, elbo, num_particles, nn_baseline=nn_baseline)
    store = pyro.get_param_store()
    rows = []
    for i in range(num_samples):
        for s, b in baseline.items():
            if est.baseline == "decaying":
                shape = (num_particles, *b.shape) if num_particles > 1 else b.shape
                store[BASELINE_PARAM + s] = b.expand(shape).clone()
        for p in params:
            p.grad = None
        loss_fn.loss_and_grads(vae.model, vae.guide, x, **kwargs)
        rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                               for p in params]))
        if len(rows) == chunk or i == num_samples - 1:
            yield torch.stack(rows)
            rows = []
    for p in params:
        p.grad = None


def _iter_vectorized(vae, x, est, num_samples, num_particles, elbo, baseline, kwargs, chunk):
    from torch.func import functional_call, grad, vmap

    surrogate = _Surrogate(vae, est, num_particles, elbo, baseline, kwargs)
    groups = parameter_groups(vae)
    names = [f"vae.{n}" for items in groups.values() for n, _ in items]
    params = {n: p.detach() for n, p in zip(names, (p for items in groups.values() for _, p in items))}
    frozen = {n: t.detach() for n, t in surrogate.named_parameters() if n not in params}
    frozen.update({n: b for n, b in surrogate.named_buffers()})
    # One plain trace gives every latent guide site's shape and noise kind.
    with torch.no_grad(), pyro.validation_enabled(False), _ParamsFromModules(), \
            pyro.settings.context(module_local_params=True):
        _, guide_tr = surrogate.traces(None, x)
    shapes = {n: (tuple(s["value"].shape), _noise_kind(s["fn"], n)) for n, s in guide_tr.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and type(s["fn"]).__name__ != "_Subsample"}

    def loss(p: dict, noise: dict) -> torch.Tensor:
        return functional_call(surrogate, {**p, **frozen}, (noise, x))

    per_sample = vmap(grad(loss), in_dims=(None, 0))
    done = 0
    while done < num_samples:
        n = min(chunk, num_samples - done)
        noise = {s: _standard_noise(kind, (n, *shape), x.device, x.dtype) for s, (shape, kind) in shapes.items()}
        g = per_sample(params, noise)
        yield torch.cat([g[name].reshape(n, -1) for name in names], dim=1)
        done += n


def _default_chunk(x: torch.Tensor, num_particles: int, method: str) -> int:
    if method == "loop":
        return 256
    budget = 2**25 if x.device.type == "cuda" else 2**21
    return max(1, budget // max(1, num_particles * x.numel()))


def _iter_gradients(vae, x, estimator, num_samples, num_particles, method, elbo, nn_baseline, warmup,
                    chunk_size, kwargs):
    est = get_estimator(estimator)
    _check(vae, x, num_samples, num_particles, method, elbo)
    if elbo == "meanfield":
        make_estimator_elbo(est, elbo, 1, data_shape=getattr(vae, "data_shape", None))  # validates the pair
    baseline, nn_baseline = _baselines(vae, x, est, nn_baseline, warmup, kwargs)
    chunk = chunk_size or _default_chunk(x, num_particles, method)
    if method == "loop":
        return _iter_loop(vae, x, est, num_samples, num_particles, elbo, baseline, nn_baseline, kwargs, chunk)
    return _iter_vectorized(vae, x, est, num_samples, num_particles, elbo, baseline, kwargs, chunk)


def gradient_samples(vae: nn.Module, x: torch.Tensor, estimator: Union[str, Estimator] = "pathwise",
                     num_samples: int = 1000, *, num_particles: int = 1, method: str = "vectorized",
                     elbo: str = "trace", groups: bool = False, nn_baseline: Optional[nn.Module] = None,
                     baseline_warmup: int = 100, chunk_size: Optional[int] = None,
                     seed: Optional[int] = None, **model_kwargs: Any) -> Union[torch.Tensor, dict[str, torch.Tensor]]:
    """Independent estimates of the gradient of the loss ``-ELBO(x)`` at the VAE's current parameters.

    Args:
        vae: a :class:`pyro_vae.VAE` (any module with ``model``/``guide`` taking ``x`` works).
        x: the batch ``(batch, *data_shape)``; each estimate is the gradient of the loss of the whole batch.
        estimator: a name of :data:`pyro_vae.estimators.ESTIMATORS`.
        num_samples: number of independent estimates.
        num_particles: particles averaged inside each estimate (vectorized).
        method: ``"vectorized"`` (``torch.func.vmap``) or ``"loop"`` (Pyro's ``loss_and_grads``).
        elbo: ``"trace"`` (Monte Carlo KL) or ``"meanfield"`` (analytic KL; pathwise only).
        groups: return ``{"encoder": (num_samples, D_enc), "decoder": ..., ...}`` instead of one tensor.
        nn_baseline: baseline module for ``score-function-neural-baseline`` (default: a fresh one).
        baseline_warmup: ``TraceGraph_ELBO`` calls that warm up the decaying-average baseline before it is
            frozen for sampling.
        chunk_size: estimates computed per vmapped call (default from the batch size and the device).
        seed: seeds Pyro and torch first.
        **model_kwargs: passed to model and guide (e.g. ``num_data``).

    Returns:
        ``(num_samples, num_params)`` in :func:`parameter_groups` order, or a dict of them per group.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    out = torch.cat(list(_iter_gradients(vae, x, estimator, num_samples, num_particles, method, elbo,
                                         nn_baseline, baseline_warmup, chunk_size, model_kwargs)))
    return _split(out, parameter_groups(vae)) if groups else out


# ------------------------------------------------------------------------------------------ statistics
def summarize(samples: torch.Tensor, exact: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Statistics of ``(num_samples, D)`` gradient samples: ``mean_variance`` ``(1/D) tr Cov``,
    ``total_variance`` ``tr Cov``, ``snr`` (mean over coordinates of ``|mean| / std``, coordinates with
    zero variance left out), and with ``exact``: ``bias`` ``|mean - exact|_2``, ``relative_bias``
    ``|mean - exact| / |exact|`` and ``max_bias_z`` (the largest ``|mean - exact| / standard error``)."""
    s = samples.double()
    return _stats(s.shape[0], s.sum(0), s.pow(2).sum(0), exact)


def _stats(n: int, total: torch.Tensor, total_sq: torch.Tensor, exact: Optional[torch.Tensor]) -> dict[str, Any]:
    mean = total / n
    var = ((total_sq - n * mean.pow(2)) / max(n - 1, 1)).clamp_min(0)
    std = var.sqrt()
    live = std > 0
    out: dict[str, Any] = {
        "num_samples": n,
        "dim": int(mean.numel()),
        "mean_variance": float(var.mean()),
        "total_variance": float(var.sum()),
        "snr": float((mean[live].abs() / std[live]).mean()) if bool(live.any()) else math.nan,
        "mean_norm": float(mean.norm()),
        "bias": None, "relative_bias": None, "max_bias_z": None,
    }
    if exact is not None:
        e = exact.double().reshape(-1).to(mean.device)
        diff = mean - e
        se = std / math.sqrt(n)
        out["bias"] = float(diff.norm())
        out["relative_bias"] = float(diff.norm() / e.norm().clamp_min(1e-300))
        out["max_bias_z"] = float((diff[live].abs() / se[live]).max()) if bool(live.any()) else math.nan
    return out


def gradient_statistics(vae: nn.Module, x: torch.Tensor, estimator: Union[str, Estimator] = "pathwise",
                        num_samples: int = 1000, *, num_particles: int = 1, method: str = "vectorized",
                        elbo: str = "trace", exact: Optional[torch.Tensor] = None,
                        nn_baseline: Optional[nn.Module] = None, baseline_warmup: int = 100,
                        chunk_size: Optional[int] = None, seed: Optional[int] = None,
                        **model_kwargs: Any) -> dict[str, dict[str, Any]]:
    """Per-group (and ``"all"``) :func:`summarize` statistics of :func:`gradient_samples`, accumulated
    chunk by chunk so that ``num_samples x num_params`` never has to fit in memory. Also records
    ``seconds`` (wall time of the sampling, synchronized on CUDA; a baseline's warm-up is not counted).

    Args:
        exact: the exact gradient ``(num_params,)`` (e.g. :func:`exact_gradient`) for the bias.
        Others: as in :func:`gradient_samples`.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    groups = parameter_groups(vae)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    chunks = _iter_gradients(vae, x, estimator, num_samples, num_particles, method, elbo, nn_baseline,
                             baseline_warmup, chunk_size, model_kwargs)  # baselines warmed up here, untimed
    sync()
    start = time.perf_counter()
    total = total_sq = None
    n = 0
    for chunk in chunks:
        c = chunk.double()
        total = c.sum(0) if total is None else total + c.sum(0)
        total_sq = c.pow(2).sum(0) if total_sq is None else total_sq + c.pow(2).sum(0)
        n += c.shape[0]
    sync()
    seconds = time.perf_counter() - start
    parts_t, parts_q = _split(total, groups), _split(total_sq, groups)
    parts_e = _split(exact.reshape(-1), groups) if exact is not None else {}
    out = {g: _stats(n, parts_t[g], parts_q[g], parts_e.get(g)) for g in groups}
    out["all"] = _stats(n, total, total_sq, exact)
    for v in out.values():
        v["seconds"] = seconds
    return out
