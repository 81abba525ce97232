"""Property-based tests over data shapes, batch sizes, z_dim, categories, temperatures, priors, likelihoods and
data values: every combination either works (finite ELBO, right shapes) or raises one of the package's
documented errors (:class:`pyro_vae.PyroVAEError`), never an unrelated exception. A bounded run in the fast
suite, a longer one marked slow."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_vae
from pyro_vae.errors import PyroVAEError
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.priors import CATEGORICAL_PRIORS, PRIORS

FAST = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DATA_KINDS = ("binary", "grey", "real", "negative", "nan", "empty")


GOOD_DATA = {"bernoulli": ("binary",), "continuous-bernoulli": ("binary", "grey"),
             "normal": ("binary", "grey", "real", "negative"), "normal-learned": ("real", "negative")}


@st.composite
def configs(draw):
    """Mostly valid configurations (so the success path is exercised), each field bad one time in six."""

    def bad() -> bool:
        return draw(st.integers(0, 5)) == 0

    latent = draw(st.sampled_from(["gaussian", "categorical"]))
    priors = sorted(PRIORS) if latent == "gaussian" else sorted(CATEGORICAL_PRIORS)
    likelihood = draw(st.sampled_from(sorted(LIKELIHOODS)))
    return {
        "data_shape": tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))),
        "z_dim": draw(st.integers(-1, 0) if bad() else st.integers(1, 4)),
        "latent": latent,
        "categories": (draw(st.integers(0, 1) if bad() else st.integers(2, 4)) if latent == "categorical"
                       else None),
        "temperature": draw(st.sampled_from([0.0, -1.0, math.inf, math.nan] if bad() else [1.0, 0.3, 1e-3])),
        "prior": draw(st.sampled_from(sorted(PRIORS) + sorted(CATEGORICAL_PRIORS) + ["nonsense"]) if bad()
                      else st.sampled_from(priors)),
        "likelihood": "nonsense" if bad() else likelihood,
        "batch": draw(st.integers(1, 5)),
        "data": draw(st.sampled_from(DATA_KINDS) if bad() else st.sampled_from(GOOD_DATA[likelihood])),
        "elbo": draw(st.sampled_from(["trace", "meanfield"])),
        "particles": draw(st.integers(1, 3)),
    }


def _data(kind: str, batch: int, shape: tuple) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(batch, *shape, generator=g)
    if kind == "binary":
        return (u > 0.5).float()
    if kind == "grey":
        return u
    if kind == "real":
        return torch.randn(batch, *shape, generator=g) * 3
    if kind == "negative":
        return -u - 0.1
    if kind == "nan":
        return u.masked_fill(u > 0.8, float("nan")).index_fill(0, torch.tensor([0]), float("nan"))
    return torch.zeros(0, *shape)


def _check(cfg: dict) -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    kwargs = {k: cfg[k] for k in ("latent", "temperature", "prior", "likelihood")}
    if cfg["categories"] is not None:
        kwargs["categories"] = cfg["categories"]
    try:
        vae = pyro_vae.VAE(cfg["data_shape"], cfg["z_dim"], hidden=(8,), **kwargs)
        x = _data(cfg["data"], cfg["batch"], cfg["data_shape"])
        vae.check_data(x)
        elbo = pyro_vae.make_elbo(cfg["elbo"], cfg["particles"])
        loss = elbo.loss(vae.model, vae.guide, x)
        z = vae.guide(x)
        out = vae.model(x)
        samples = vae.sample(2)
    except PyroVAEError:
        return
    assert math.isfinite(loss)
    event = (cfg["z_dim"],) if cfg["latent"] == "gaussian" else (cfg["z_dim"], cfg["categories"])
    assert tuple(z.shape) == (cfg["batch"], *event)
    assert tuple(out.shape) == (cfg["batch"], *cfg["data_shape"])
    assert tuple(samples.shape) == (2, *cfg["data_shape"])


@FAST
@given(configs())
def test_fuzz_model_guide_and_elbo(cfg):
    _check(cfg)


@st.composite
def fit_args(draw):
    def bad() -> bool:
        return draw(st.integers(0, 5)) == 0

    return {
        "batch_size": draw(st.sampled_from([-1, 0]) if bad() else st.sampled_from([1, 3, 7, 64])),
        "lr": draw(st.sampled_from([0.0, -1.0, math.nan]) if bad() else st.sampled_from([1e-2, 1e-3])),
        "epochs": draw(st.just(0) if bad() else st.integers(1, 2)),
        "clip_norm": draw(st.sampled_from([0.0, -1.0]) if bad() else st.sampled_from([None, 1.0])),
        "n": draw(st.integers(0, 9)),
        "data": draw(st.sampled_from(DATA_KINDS) if bad() else st.sampled_from(["binary", "grey"])),
    }


def _check_fit(args: dict) -> None:
    pyro.clear_param_store()
    vae = pyro_vae.VAE((4,), 2, hidden=(8,), likelihood="continuous-bernoulli")
    x = _data(args["data"], max(args["n"], 1), (4,))[: args["n"]] if args["data"] != "empty" else torch.zeros(0, 4)
    try:
        hist = pyro_vae.fit(vae, x, epochs=args["epochs"], batch_size=args["batch_size"], lr=args["lr"],
                            clip_norm=args["clip_norm"], progress=False, device="cpu")
    except PyroVAEError:
        return
    assert len(hist) == args["epochs"]
    assert all(math.isfinite(e) for e in hist["train_elbo"])


@FAST
@given(fit_args())
def test_fuzz_fit_arguments(args):
    _check_fit(args)


@pytest.mark.slow
@SLOW
@given(configs())
def test_fuzz_model_guide_and_elbo_long(cfg):
    _check(cfg)


@pytest.mark.slow
@SLOW
@given(fit_args())
def test_fuzz_fit_arguments_long(args):
    _check_fit(args)
