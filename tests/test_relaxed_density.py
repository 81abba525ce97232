"""A relaxed-categorical latent's log-density is a function of its value, whichever way the value was obtained.

The latent is carried in log space (:mod:`pyro_vae.distributions.relaxed`), so the guide's and the prior's
log-densities of a draw must be the same whether they score the sample site's own value or a copy of it (``.sample()``,
``expand``, ``torch.where``, ``clone``/``detach``, a float64 round trip, ``torch.save``/``load``,
``poutine.condition``, ``poutine.replay`` of a trace holding a cloned value), and equal to the closed-form
log-Concrete density (Maddison et al. 2017) computed in float64 from the same value, at temperatures down to 0.1
and with peaked logits (a spread of 50 nats), where the simplex point's small entries underflow in float32.
"""

from __future__ import annotations

import copy
import io
import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from torch import nn

import pyro_vae
from pyro_vae.distributions.relaxed import ExpRelaxedOneHotCategorical

N, K, DATA = 3, 10, 8


def reference(x: torch.Tensor, logits: torch.Tensor, t: float) -> torch.Tensor:
    """Closed-form log-Concrete density of log-space values ``x`` ``(..., n, k)`` summed over the ``n``
    variables, in float64: log((k-1)!) + (k-1) log t + sum_i (l_i - t x_i) - k logsumexp_i(l_i - t x_i)."""
    x, logits = x.double(), torch.log_softmax(logits.double(), -1)
    k = x.shape[-1]
    s = logits - t * x
    return (math.lgamma(k) + (k - 1) * math.log(t) + s.sum(-1) - k * s.logsumexp(-1)).sum(-1)


def tolerance(x: torch.Tensor, logits: torch.Tensor, t: float) -> torch.Tensor:
    """Float32 rounding of the scores ``l - t x`` (a few ulps of each summed magnitude), per data point."""
    mag = (torch.log_softmax(logits.double(), -1).abs() + t * x.double().abs()).sum((-1, -2))
    return 1e-5 + 4 * (K + 1) * torch.finfo(torch.float32).eps * mag


class FixedLogits(nn.Module):
    """An encoder network whose logits ``(batch, n * k)`` are fixed: a spread of ``spread`` nats between classes."""

    def __init__(self, spread: float, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(spread * torch.rand(N * K, generator=g))
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits + self.scale * x.sum(-1, keepdim=True)


def categorical_vae(t: float, spread: float) -> pyro_vae.VAE:
    pyro.clear_param_store()
    return pyro_vae.VAE((DATA,), N, latent="categorical", categories=K, temperature=t, hidden=(8,),
                        encoder=FixedLogits(spread), likelihood="bernoulli")


def _site_log_prob(trace, name: str = "z") -> torch.Tensor:
    trace.compute_log_prob()
    return trace.nodes[name]["log_prob"]


def routes(vae: pyro_vae.VAE, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, dict, dict]:
    """One guide draw and its guide / prior log-densities ``(batch,)`` through every route."""
    pyro.set_rng_seed(seed)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    z = guide_tr.nodes["z"]["value"]
    q, p = guide_tr.nodes["z"]["fn"], vae.prior()
    copies = {
        "site value": z,
        "expand": z.expand(2, *z.shape)[1],
        "torch.where": torch.where(torch.ones_like(z, dtype=torch.bool), z, torch.zeros_like(z)),
        "detach().clone()": z.detach().clone(),
        "float64 round trip": z.double().float(),
    }
    buf = io.BytesIO()
    torch.save(z.detach(), buf)
    buf.seek(0)
    copies["torch.save/load"] = torch.load(buf)
    log_q = {name: q.log_prob(v) for name, v in copies.items()}
    log_p = {name: p.log_prob(v) for name, v in copies.items()}
    log_q["expanded distribution"] = q.expand((2, x.shape[0])).log_prob(z.expand(2, *z.shape))[1]
    log_p["expanded distribution"] = p.expand((2, x.shape[0])).log_prob(z.expand(2, *z.shape))[1]
    # the same draw through .sample(): the same noise as the trace's, no gradient path
    pyro.set_rng_seed(seed)
    copied = q.sample()
    assert torch.equal(copied, z) and not copied.requires_grad
    log_q[".sample()"], log_p[".sample()"] = q.log_prob(copied), p.log_prob(copied)
    # Pyro handlers
    data = {"z": z.detach().clone()}
    log_q["poutine.condition"] = _site_log_prob(poutine.trace(poutine.condition(vae.guide, data=data)).get_trace(x))
    log_p["poutine.condition"] = _site_log_prob(poutine.trace(poutine.condition(vae.model, data=data)).get_trace(x))
    replayed = copy.copy(guide_tr)
    replayed.nodes = {k: dict(v) for k, v in guide_tr.nodes.items()}
    replayed.nodes["z"]["value"] = z.detach().clone()
    log_p["poutine.replay (cloned value)"] = _site_log_prob(
        poutine.trace(poutine.replay(vae.model, trace=replayed)).get_trace(x))
    log_q["poutine.replay (cloned value)"] = _site_log_prob(
        poutine.trace(poutine.replay(vae.guide, trace=replayed)).get_trace(x))
    return z, log_q, log_p


@pytest.mark.parametrize("t", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("spread", [0.0, 50.0])
def test_every_route_gives_the_closed_form_density(t, spread):
    vae = categorical_vae(t, spread)
    x = torch.bernoulli(torch.full((16, DATA), 0.5, ), generator=torch.Generator().manual_seed(1))
    z, log_q, log_p = routes(vae, x)
    q_logits = vae.encoder(x)
    ref_q, ref_p = reference(z, q_logits, t), reference(z, torch.zeros(N, K), t)
    tol_q, tol_p = tolerance(z, q_logits, t), tolerance(z, torch.zeros(N, K), t)
    if spread and t < 1:  # the simplex point underflows in float32: nothing on the simplex could score it
        assert bool((z.exp() == 0).any())
    for name in log_q:
        assert bool(((log_q[name].double() - ref_q).abs() <= tol_q).all()), (name, log_q[name] - ref_q)
        assert bool(((log_p[name].double() - ref_p).abs() <= tol_p).all()), (name, log_p[name] - ref_p)


def test_importance_weights_and_the_elbo_use_the_value_not_its_history():
    """log_likelihood's importance weights score the guide's values through replay: with a peaked encoder at
    t = 0.1 the mean log-weight equals the closed-form densities of the drawn values."""
    t = 0.1
    vae = categorical_vae(t, 50.0)
    x = torch.bernoulli(torch.full((4, DATA), 0.5), generator=torch.Generator().manual_seed(2))
    from pyro_vae.infer.traces import particle_log_probs

    pyro.set_rng_seed(3)
    out = particle_log_probs(vae, vae.model, vae.guide, x, 5, -2, keep=("z",))
    z = out.z  # (5, 4, N, K)
    assert torch.allclose(out.log_q.double(), reference(z, vae.encoder(x), t), atol=1e-3, rtol=0)
    assert torch.allclose(out.log_p_latent.double(), reference(z, torch.zeros(N, K), t), atol=1e-3, rtol=0)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(k=st.integers(2, 12), n=st.integers(1, 4), t=st.floats(0.1, 3.0), spread=st.floats(0.0, 50.0),
       seed=st.integers(0, 2**16))
def test_density_is_a_function_of_the_value(k, n, t, spread, seed):
    """Any number of classes, temperature, logit spread: the copies of a draw score as the draw, and as the
    float64 closed form."""
    g = torch.Generator().manual_seed(seed)
    logits = spread * torch.rand(5, n, k, generator=g)
    d = ExpRelaxedOneHotCategorical(torch.tensor(t), logits=logits).to_event(1)
    torch.manual_seed(seed)
    x = d.rsample()

    def model():
        with pyro.plate("data", 5):
            return pyro.sample("z", d)

    conditioned = poutine.trace(poutine.condition(model, data={"z": x.detach().clone()})).get_trace()
    values = [x, x.detach().clone(), x.double().float(), torch.where(x < 1, x, x),
              x.expand(3, *x.shape)[2], conditioned.nodes["z"]["value"]]
    ref = reference(x, logits, t)
    mag = (torch.log_softmax(logits.double(), -1).abs() + t * x.double().abs()).sum((-1, -2))
    tol = 1e-5 + 4 * (k + 1) * torch.finfo(torch.float32).eps * mag
    for v in values:
        assert bool(((d.log_prob(v).double() - ref).abs() <= tol).all())
    assert bool(((_site_log_prob(conditioned).double() - ref).abs() <= tol).all())


# ---------------------------------------------------------------------------- the representation, refused loudly
def test_a_simplex_valued_prior_or_guide_is_refused():
    import pyro.distributions as dist

    simplex = lambda: dist.RelaxedOneHotCategorical(torch.tensor(0.5), logits=torch.zeros(N, K)).to_event(1)  # noqa
    with pytest.raises(pyro_vae.ConfigError, match="log space"):
        pyro_vae.VAE((DATA,), N, latent="categorical", categories=K, hidden=(8,), prior=simplex)
    from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

    log_space = lambda: dist.Independent(ExpRelaxedCategorical(torch.tensor(0.5), logits=torch.zeros(N, K)), 1)  # noqa
    pyro_vae.VAE((DATA,), N, latent="categorical", categories=K, hidden=(8,), prior=log_space)  # torch's own works


def test_decode_takes_log_space_latents_and_refuses_simplex_points():
    vae = categorical_vae(0.5, 0.0)
    hard = F.one_hot(torch.randint(K, (4, N)), K).float()
    with pytest.raises(pyro_vae.DataError, match="not its log"):
        vae.decode(hard)
    with pytest.raises(pyro_vae.ShapeError, match=r"\(\.\.\., 3, 10\)"):
        vae.decode(torch.zeros(4, N * K))
    out = vae.decode(hard.log())
    expected = torch.sigmoid(vae.decoder(hard.reshape(4, N * K)))
    assert torch.allclose(out, expected)
    x = torch.bernoulli(torch.full((4, DATA), 0.5))
    log_p = vae.encode(x)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(4, N))
    assert torch.allclose(vae.reconstruct(x), torch.sigmoid(vae.decoder(log_p.exp().reshape(4, N * K))))
