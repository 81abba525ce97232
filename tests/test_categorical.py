"""Relaxed-categorical (Gumbel-softmax / Concrete) latents: numerics at low temperature, straight-through,
generation, configuration, and the example script."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_vae
from pyro_vae.distributions.relaxed import ExpOneHotCategorical, ExpRelaxedOneHotCategorical
from pyro_vae.errors import ConfigError, ShapeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return pyro_vae.data.load("digits").train.x.flatten(1)


def make_vae(**kw):
    kw.setdefault("temperature", 1.0)
    return pyro_vae.VAE((64,), 4, latent="categorical", categories=5, likelihood="continuous-bernoulli",
                        hidden=(32,), **kw)


# ------------------------------------------------------------------------------------- the distribution
def test_log_prob_is_torchs_simplex_density_plus_the_jacobian_where_that_is_finite():
    # y = exp(x): log p_simplex(y) = log p(x) - sum_k x_k (torch's RelaxedOneHotCategorical is exp of
    # ExpRelaxedCategorical). In float64 at moderate temperatures nothing underflows.
    logits = torch.randn(6, 5, dtype=torch.float64)
    for t in (0.5, 1.0, 2.0):
        ours = ExpRelaxedOneHotCategorical(torch.tensor(t, dtype=torch.float64), logits=logits)
        ref = dist.RelaxedOneHotCategorical(torch.tensor(t, dtype=torch.float64), logits=logits)
        x = ours.rsample()
        assert torch.allclose(ours.log_prob(x) - x.sum(-1), ref.log_prob(x.exp()), atol=1e-8)


@pytest.mark.parametrize("t", [0.1, 0.3, 1.0])
def test_density_integrates_to_one_for_two_classes(t):
    # K = 2: x = log_softmax((s, 0)); the log-space density is with respect to ds, s = x_1 - x_2. Midpoint
    # rule on a fine grid wide enough for the tails (they decay like exp(-t |s|)), error well below 1e-4.
    d = ExpRelaxedOneHotCategorical(torch.tensor(t, dtype=torch.float64),
                                    logits=torch.tensor([0.3, -0.4], dtype=torch.float64))
    s = torch.linspace(-40 / t, 40 / t, 400001, dtype=torch.float64)
    x = torch.log_softmax(torch.stack([s, torch.zeros_like(s)], -1), -1)
    assert abs(float(d.log_prob(x).exp().sum() * (s[1] - s[0])) - 1.0) < 1e-4


def test_density_integrates_to_one_for_three_classes():
    # K = 3 on a 2-D grid of s = (x_1 - x_3, x_2 - x_3) at t = 1: midpoint rule, error well below 1e-3.
    d = ExpRelaxedOneHotCategorical(torch.tensor(1.0, dtype=torch.float64),
                                    logits=torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64))
    g = torch.linspace(-45, 45, 1801, dtype=torch.float64)
    s1, s2 = torch.meshgrid(g, g, indexing="ij")
    x = torch.log_softmax(torch.stack([s1, s2, torch.zeros_like(s1)], -1), -1)
    assert abs(float(d.log_prob(x).exp().sum() * (g[1] - g[0]) ** 2) - 1.0) < 1e-3


def test_low_temperature_stays_finite_where_the_simplex_value_underflows():
    # Logit gaps of ~30 at temperature 0.05 push the small entries of exp(x) below float32's range: Pyro's
    # simplex-valued class then scores -inf / NaN, the log-space value stays exact and finite.
    logits = (torch.randn(64, 20, 10) * 30).requires_grad_()
    t = torch.tensor(0.05)
    ours = ExpRelaxedOneHotCategorical(t, logits=logits)
    x = ours.rsample()
    naive = dist.RelaxedOneHotCategorical(t, logits=logits.detach(), validate_args=False).log_prob(x.detach().exp())
    assert not torch.isfinite(naive).all()  # the failure the log-space latent exists for
    lp = ours.log_prob(x)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_boundary_points_score_minus_infinity_and_simplex_points_are_refused():
    d = ExpRelaxedOneHotCategorical(torch.tensor(0.5), logits=torch.zeros(3, 4))
    hard = F.one_hot(torch.tensor([0, 2, 3]), 4).float()
    assert torch.equal(d.log_prob(hard.log()), torch.full((3,), -math.inf))  # the Concrete density is 0 there
    with pytest.raises(pyro_vae.DataError, match="not its log"):
        d.log_prob(hard)
    with pytest.raises(pyro_vae.DataError, match="logsumexp"):
        d.log_prob(torch.full((3, 4), float("nan")))


def test_exact_categorical_in_log_space():
    logits = torch.randn(7, 4)
    d = ExpOneHotCategorical(logits=logits)
    z = d.sample((50,))
    assert bool(((z == 0) | (z == -math.inf)).all()) and torch.equal((z == 0).sum(-1), torch.ones(50, 7).long())
    ref = torch.distributions.Categorical(logits=logits).log_prob(z.argmax(-1))
    assert torch.allclose(d.log_prob(z), ref)
    assert torch.equal(d.enumerate_support().exp(), torch.eye(4)[:, None].expand(4, 7, 4))
    with pytest.raises(pyro_vae.DataError, match="one-hot"):
        d.log_prob(z.exp())


def test_straight_through_decoder_input_is_one_hot_with_relaxed_gradients():
    vae = make_vae(temperature=0.1, straight_through=True)
    logits = torch.randn(8, 4, 5, requires_grad=True)
    x = ExpRelaxedOneHotCategorical(torch.tensor(0.1), logits=logits).rsample()
    y = vae.decoder_input(x).reshape(8, 4, 5)
    assert torch.equal(y.detach().sum(-1), torch.ones(8, 4)) and set(y.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y.detach().argmax(-1), x.detach().argmax(-1))
    (y * torch.randn(8, 4, 5)).sum().backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()
    soft = make_vae(temperature=0.1).decoder_input(x.detach())
    assert torch.allclose(soft, x.detach().exp().reshape(8, 20))


# ------------------------------------------------------------------------------------------ in the VAE
@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_no_nan_in_loss_or_gradients(digits, temperature, elbo, straight_through):
    vae = make_vae(temperature=temperature, straight_through=straight_through, prior="categorical-learned")
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    loss_fn = elbo()
    for _ in range(3):
        opt.zero_grad()
        loss = loss_fn.loss_and_grads(vae.model, vae.guide, digits[:64], num_data=len(digits))
        assert math.isfinite(loss)
        grads = [p.grad for p in vae.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()


def test_sites_have_event_shape_n_by_k(digits):
    vae = make_vae(straight_through=True)
    tr = poutine.trace(vae.guide).get_trace(digits[:7])
    z = tr.nodes["z"]
    assert z["fn"].event_shape == (4, 5) and z["fn"].batch_shape == (7,) and z["value"].shape == (7, 4, 5)
    mtr = poutine.trace(poutine.replay(vae.model, trace=tr)).get_trace(digits[:7])
    assert mtr.nodes["z"]["fn"].event_shape == (4, 5)
    assert torch.isfinite(mtr.log_prob_sum())


def test_straight_through_trains_on_digits(digits):
    pyro.set_rng_seed(1)
    x = digits[:512]
    vae = make_vae(straight_through=True, temperature=0.5)
    before = pyro_vae.evaluate_elbo(vae, x, num_particles=4)
    enc0 = [p.detach().clone() for p in vae.encoder.parameters()]
    pyro_vae.fit(vae, x, epochs=2, batch_size=32, lr=1e-2, progress=False, device="cpu")
    after = pyro_vae.evaluate_elbo(vae, x, num_particles=4)
    # The encoder learns through the straight-through gradient and the ELBO rises (by about 60 nats in
    # 32 steps) far beyond the Monte Carlo noise of the evaluation (well under 1 nat here).
    assert any(not torch.equal(a, b.detach()) for a, b in zip(enc0, vae.encoder.parameters()))
    assert after > before + 20, (before, after)


def test_sample_decodes_hard_one_hot_prior_draws():
    vae = make_vae(temperature=0.7)
    seen = []
    decode = vae.decode
    vae.decode = lambda z, mean=True: seen.append(z) or decode(z, mean)
    x = vae.sample(11)
    assert x.shape == (11, 64)
    z = seen[0].exp()  # the latent is carried in log space: log of a one-hot
    assert z.shape == (11, 4, 5) and torch.equal(z.sum(-1), torch.ones(11, 4))
    assert set(z.unique().tolist()) == {0.0, 1.0}


def test_sample_frequencies_follow_the_learned_prior():
    # argmax of a Concrete draw is an exact categorical draw (Gumbel-max), whatever the temperature.
    # 20000 draws of a 5-class categorical: each frequency has standard error <= 0.0036; 5 SE bounds it
    # (false-failure rate < 1e-5 over the 20 cells).
    vae = make_vae(prior="categorical-learned", temperature=0.3)
    with torch.no_grad():
        vae.prior.logits.copy_(torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0]).expand(4, 5))
    seen = []
    decode = vae.decode
    vae.decode = lambda z, mean=True: seen.append(z) or decode(z, mean)
    vae.sample(20000)
    freq = seen[0].exp().mean(0)
    p = torch.softmax(vae.prior.logits.detach(), -1)
    se = (p * (1 - p) / 20000).sqrt()
    assert ((freq - p).abs() < 5 * se).all()


def test_prior_temperature_follows_the_encoder():
    vae = make_vae(temperature=0.9)
    vae.encoder.temperature = 0.3
    assert vae.prior.temperature == 0.3 and float(vae.prior().base_dist.temperature) == pytest.approx(0.3)


def test_config_round_trip_and_save_load(tmp_path, digits):
    vae = make_vae(temperature=0.4, straight_through=True, prior="categorical-learned")
    cfg = json.loads(json.dumps(vae.config))
    assert cfg["latent"] == "categorical" and cfg["categories"] == 5
    pyro_vae.save(vae, tmp_path / "run")
    pyro.clear_param_store()
    loaded = pyro_vae.load(tmp_path / "run")
    assert loaded.encoder.temperature == 0.4 and loaded.encoder.straight_through
    for (k, a), (k2, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert torch.allclose(vae.encode(digits[:3]), loaded.encode(digits[:3]))


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"categories": 1}, "categories"),
    ({"categories": None}, "categories"),
    ({"prior": "mixture"}, "Gaussian latent"),
])
def test_bad_categorical_configuration(kwargs, match):
    base = {"latent": "categorical", "categories": 5, "likelihood": "continuous-bernoulli", "hidden": (8,)}
    base.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        pyro_vae.VAE((64,), 4, **base)


def test_bad_temperature_set_later_and_other_latents():
    vae = make_vae()
    with pytest.raises(ConfigError, match="temperature"):
        vae.encoder.temperature = -1.0
    with pytest.raises(ConfigError, match="latent"):
        pyro_vae.VAE((64,), 4, latent="dirichlet")
    with pytest.raises(ConfigError, match="categorical"):
        pyro_vae.VAE((64,), 4, categories=3)


def test_prior_of_wrong_event_shape_is_refused():
    bad = lambda: ExpRelaxedOneHotCategorical(torch.tensor(1.0), logits=torch.zeros(4, 6)).to_event(1)  # noqa
    with pytest.raises(ShapeError, match=r"event shape \(4, 5\).*found event shape \(4, 6\)"):
        make_vae(prior=bad)


def test_example_runs(tmp_path):
    out = tmp_path / "cat.json"
    proc = subprocess.run([sys.executable, "examples/categorical_vae.py", "--data", "digits", "--epochs", "1",
                           "--limit", "128", "--vars", "3", "--categories", "4", "--hidden", "16",
                           "--eval-samples", "2", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["negative_elbo"]) == {"discrete", "jang_style", "relaxed"}
    assert all(math.isfinite(v) for v in result["negative_elbo"].values())
    assert result["reference_jang_2017"]["gumbel-softmax"] == 101.5


def test_command_line_trains_and_samples_a_categorical_vae(tmp_path, capsys):
    from pyro_vae.cli import main

    out = tmp_path / "run"
    cmd = ["train", "--data", "digits", "--latent", "categorical",
           "--categories", "4", "--z-dim", "3", "--temperature", "1.0", "--temperature-min", "0.5",
           "--anneal-rate", "0.05", "--straight-through", "--prior", "categorical-learned", "--epochs", "1",
           "--hidden", "16", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert main(cmd) == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())["vae"]
    assert (cfg["latent"], cfg["categories"], cfg["straight_through"]) == ("categorical", 4, True)
    assert cfg["prior"] == {"name": "categorical-learned"}
    loaded = pyro_vae.load(out)
    assert loaded.sample(5).shape == (5, 1, 8, 8)


def test_command_line_refuses_categorical_flags_on_a_gaussian_latent(tmp_path, capsys):
    from pyro_vae.cli import main

    assert main(["train", "--data", "digits", "--anneal-rate", "0.1", "--out", str(tmp_path / "bad")]) == 2
    assert "--latent categorical" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("straight_through", [False, True])
def test_categorical_vae_trains_on_cuda(straight_through, digits):
    from pyro_vae.schedules import ExponentialTemperature

    vae = make_vae(straight_through=straight_through, temperature=0.5, prior="categorical-learned")
    history = pyro_vae.fit(vae, digits[:256], epochs=2, batch_size=64, progress=False, device="cuda",
                           callbacks=[ExponentialTemperature(0.5, rate=0.05, minimum=0.1)])
    assert all(math.isfinite(e["train_elbo"]) for e in history.epochs)
    assert vae.encoder.temperature < 0.5
    x = vae.sample(8)
    assert x.device.type == "cuda" and x.shape == (8, 64)


def test_a_fixed_temperature_prior_keeps_it_through_save_and_load(tmp_path):
    from pyro_vae.priors import RelaxedCategoricalPrior

    vae = make_vae(temperature=0.9, prior=RelaxedCategoricalPrior(4, 5, temperature=0.5))
    vae.encoder.temperature = 0.7
    assert vae.prior.temperature == 0.5
    pyro_vae.save(vae, tmp_path / "run")
    pyro.clear_param_store()
    loaded = pyro_vae.load(tmp_path / "run")
    loaded.encoder.temperature = 0.3
    assert loaded.prior.temperature == 0.5
    assert make_vae(prior={"name": "categorical", "temperature": 0.25}).prior.temperature == 0.25
