"""Temperature and KL schedules: their values, that fit applies them, and that they reach the latent site."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch.distributions import kl_divergence

import pyro_vae
from pyro_vae.errors import ConfigError
from pyro_vae.schedules import ConstantBeta, ConstantTemperature, ExponentialTemperature, KLWarmup


@pytest.fixture(scope="module")
def digits():
    return pyro_vae.data.load("digits").train.x.flatten(1)[:256]


def categorical_vae(**kw):
    return pyro_vae.VAE((64,), 3, latent="categorical", categories=4, likelihood="continuous-bernoulli",
                        hidden=(16,), **kw)


def gaussian_vae(**kw):
    return pyro_vae.VAE((64,), 2, likelihood="continuous-bernoulli", hidden=(16,), **kw)


def test_exponential_temperature_values():
    s = ExponentialTemperature(1.0, rate=3e-5, minimum=0.5)
    assert s.value(0) == 1.0
    assert s.value(10_000) == pytest.approx(math.exp(-0.3))
    assert s.value(10 ** 6) == 0.5  # the floor
    stepped = ExponentialTemperature(2.0, rate=1e-3, minimum=0.1, every=1000)
    assert stepped.value(999) == 2.0 and stepped.value(1000) == pytest.approx(2 * math.exp(-1))
    assert ConstantTemperature(0.7).value(123) == 0.7


def test_kl_warmup_values():
    s = KLWarmup(steps=100)
    assert s.value(0) == pytest.approx(0.01) and s.value(50) == pytest.approx(0.505)
    assert s.value(100) == 1.0 and s.value(10 ** 6) == 1.0
    assert KLWarmup(10, start=0.2, end=0.6).value(5) == pytest.approx(0.4)
    assert ConstantBeta(4.0).value(7) == 4.0


def test_fit_anneals_the_temperature_the_guide_samples_with(digits):
    """The temperature of the guide's distribution changes step by step during fit, and ends where the
    schedule says (a categorical VAE that never anneals because of a default is the bug this guards)."""
    vae = categorical_vae(temperature=1.0)
    schedule = ExponentialTemperature(1.0, rate=0.05, minimum=0.3)
    used = []
    distribution = vae.encoder.distribution

    def spy(x):
        d = distribution(x)
        used.append(float(d.base_dist.temperature))
        return d

    vae.encoder.distribution = spy
    history = pyro_vae.fit(vae, digits, epochs=2, batch_size=32, progress=False, callbacks=[schedule],
                           device="cpu")
    steps = history["step"][-1]
    assert steps == 16
    train_used = used[-steps:]
    assert train_used == pytest.approx([schedule.value(s) for s in range(steps)], rel=1e-6)
    assert vae.encoder.temperature == pytest.approx(schedule.value(steps))
    assert vae.prior.temperature == vae.encoder.temperature  # the prior follows the guide
    assert len(set(train_used)) == steps


def test_kl_warmup_sets_beta_during_fit(digits):
    vae = gaussian_vae()
    seen = []

    class Spy:
        def on_step(self, state):
            seen.append(state.vae.beta)

    warmup = KLWarmup(steps=10)
    pyro_vae.fit(vae, digits, epochs=1, batch_size=32, progress=False, callbacks=[warmup, Spy()], device="cpu")
    assert seen == pytest.approx([warmup.value(s) for s in range(1, 9)])


@pytest.mark.parametrize("make", [gaussian_vae, categorical_vae])
def test_beta_reaches_the_latent_site_in_model_and_guide(make, digits):
    vae = make()
    beta = KLWarmup(steps=4, start=0.1).apply(vae, 2)
    assert beta == pytest.approx(0.55)
    gtr = poutine.trace(vae.guide).get_trace(digits[:5])
    mtr = poutine.trace(poutine.replay(vae.model, trace=gtr)).get_trace(digits[:5])
    assert gtr.nodes["z"]["scale"] == pytest.approx(beta) and mtr.nodes["z"]["scale"] == pytest.approx(beta)
    assert mtr.nodes["x"]["scale"] == 1.0


def test_beta_weights_the_analytic_kl_exactly(digits):
    """-ELBO(beta) = -E[log p(x|z)] + beta * KL: with the same guide draw, two betas differ by exactly
    (beta1 - beta2) * KL, the closed form."""
    vae = gaussian_vae()
    x = digits[:16]
    losses = {}
    for beta in (1.0, 0.3):
        ConstantBeta(beta).apply(vae, 0)
        pyro.set_rng_seed(3)
        losses[beta] = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    with torch.no_grad():
        kl = float(kl_divergence(vae.encoder.distribution(x), vae.prior()).sum())
    assert losses[1.0] - losses[0.3] == pytest.approx(0.7 * kl, rel=1e-4)


def test_schedules_resume_from_the_step(digits):
    vae = categorical_vae()
    s = ExponentialTemperature(1.0, rate=0.01, minimum=0.1)

    class State:
        pass

    state = State()
    state.vae, state.step = vae, 50
    s.on_fit_start(state)
    assert vae.encoder.temperature == pytest.approx(math.exp(-0.5))


@pytest.mark.parametrize("make, match", [
    (lambda: ExponentialTemperature(0.0), "initial temperature"),
    (lambda: ExponentialTemperature(1.0, rate=-1.0), "anneal rate"),
    (lambda: ExponentialTemperature(0.5, minimum=0.9), "minimum temperature"),
    (lambda: ExponentialTemperature(1.0, every=0), "every"),
    (lambda: ConstantTemperature(-2), "temperature"),
    (lambda: KLWarmup(0), "warm-up steps"),
    (lambda: KLWarmup(10, start=0.0), "start beta"),
    (lambda: ConstantBeta(float("inf")), "beta"),
])
def test_bad_schedule_arguments(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_temperature_schedule_needs_a_categorical_latent():
    with pytest.raises(ConfigError, match="categorical"):
        ConstantTemperature(0.5).apply(gaussian_vae(), 0)
