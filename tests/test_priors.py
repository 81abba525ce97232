"""The prior zoo: shapes, finite densities, normalization, learning under fit, configuration round trips,
wrong event shapes, and the custom-prior example."""

import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_vae
from pyro_vae.errors import ConfigError, ShapeError
from pyro_vae.priors import PRIORS, FlowPrior, RelaxedCategoricalPrior, build_prior

ROOT = Path(__file__).resolve().parents[1]
Z = 3
GAUSSIAN = {
    "normal": "normal",
    "mixture": {"name": "mixture", "components": 4},
    "vamp": {"name": "vamp", "components": 5},
    "flow": {"name": "flow", "flows": 2},
    "flow-spline": {"name": "flow", "flows": 1, "kind": "spline"},
    "laplace": {"name": "laplace", "scale": 0.5},
    "student-t": {"name": "student-t", "df": 4.0},
}
LEARNABLE = ["mixture", "vamp", "flow", "flow-spline"]


@pytest.fixture(scope="module")
def digits():
    return pyro_vae.data.load("digits").train.x.flatten(1)[:128]


def make_vae(prior, **kw):
    return pyro_vae.VAE((64,), Z, prior=prior, likelihood="continuous-bernoulli", hidden=(16,), **kw)


def test_every_name_is_covered():
    assert {v if isinstance(v, str) else v["name"] for v in GAUSSIAN.values()} == set(PRIORS)


@pytest.mark.parametrize("key", sorted(GAUSSIAN))
def test_samples_shapes_and_finite_log_prob(key):
    vae = make_vae(GAUSSIAN[key])
    p = vae.prior()
    assert tuple(p.event_shape) == (Z,)
    z = p.sample((5,))
    assert z.shape == (5, Z)
    lp = p.log_prob(z)
    assert lp.shape == (5,) and torch.isfinite(lp).all()
    assert torch.isfinite(p.log_prob(torch.randn(7, Z) * 3)).all()


@pytest.mark.parametrize("key", LEARNABLE)
def test_learnable_priors_get_gradients_and_change_under_fit(key, digits):
    vae = make_vae(GAUSSIAN[key])
    params = dict(vae.prior.named_parameters())
    assert params
    # the model's log density reaches every prior parameter
    tr = poutine.trace(vae.guide).get_trace(digits[:8])
    mtr = poutine.trace(poutine.replay(vae.model, trace=tr)).get_trace(digits[:8])
    mtr.compute_log_prob()
    mtr.nodes["z"]["log_prob_sum"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values()), key
    before = {k: v.detach().clone() for k, v in params.items()}
    pyro_vae.fit(vae, digits, epochs=1, batch_size=64, lr=1e-2, progress=False, device="cpu")
    assert all(not torch.equal(before[k], v.detach()) for k, v in vae.prior.named_parameters())


def test_learnable_categorical_prior_changes_under_fit(digits):
    vae = pyro_vae.VAE((64,), 3, latent="categorical", categories=4, prior="categorical-learned",
                       likelihood="continuous-bernoulli", hidden=(16,))
    before = vae.prior.logits.detach().clone()
    pyro_vae.fit(vae, digits, epochs=1, batch_size=64, lr=1e-2, progress=False, device="cpu")
    assert not torch.equal(before, vae.prior.logits.detach())


def test_vamp_prior_is_the_encoders_mixture_and_reaches_the_encoder(digits):
    vae = make_vae({"name": "vamp", "components": 5})
    assert vae.prior.encoder is vae.encoder
    assert not any(n.startswith("encoder") for n, _ in vae.prior.named_parameters())  # not duplicated
    z = torch.randn(6, Z)
    q = vae.encoder.distribution(vae.prior.pseudo_inputs)
    expected = torch.logsumexp(q.log_prob(z.unsqueeze(1)), -1) - math.log(5)
    assert torch.allclose(vae.prior().log_prob(z), expected, atol=1e-5)
    vae.prior().log_prob(z).sum().backward()
    assert all(p.grad is not None for p in vae.encoder.parameters())
    # under SVI each parameter is in Pyro's param store once: the pseudo-inputs under "prior"
    pyro.infer.Trace_ELBO().loss_and_grads(vae.model, vae.guide, digits[:8])
    names = [n for n in pyro.get_param_store().keys() if n.startswith("prior")]
    assert names == ["prior$$$pseudo_inputs"]


@pytest.mark.parametrize("kind", ["affine", "spline"])
def test_flow_prior_density_integrates_to_one(kind):
    # 2-D midpoint rule over [-10, 10]^2 (301^2 points); the flow's tails are Gaussian, the mass outside the
    # box is < 1e-6, and the quadrature error on this smooth density is far below the 2e-2 tolerance.
    torch.manual_seed(0)
    prior = FlowPrior(2, flows=2, kind=kind, hidden=[8])
    g = torch.linspace(-10, 10, 301)
    zz = torch.cartesian_prod(g, g)
    with torch.no_grad():
        mass = prior().log_prob(zz).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(float(mass) - 1) < 2e-2


@pytest.mark.parametrize("key", sorted(GAUSSIAN))
def test_save_load_round_trip(key, tmp_path, digits):
    vae = make_vae(GAUSSIAN[key])
    with torch.no_grad():
        for p in vae.prior.parameters():
            p.add_(0.1 * torch.randn_like(p))
    pyro_vae.save(vae, tmp_path / key)
    pyro.clear_param_store()
    loaded = pyro_vae.load(tmp_path / key)
    z = torch.randn(4, Z)
    with torch.no_grad():
        assert torch.allclose(vae.prior().log_prob(z), loaded.prior().log_prob(z), atol=1e-5)
    assert loaded.config == vae.config


@pytest.mark.parametrize("prior", ["categorical", "categorical-learned"])
def test_categorical_priors_shapes(prior):
    vae = pyro_vae.VAE((64,), 3, latent="categorical", categories=4, prior=prior, hidden=(8,))
    p = vae.prior()
    assert tuple(p.event_shape) == (3, 4)
    z = p.sample((5,))
    assert z.shape == (5, 3, 4) and torch.isfinite(p.log_prob(z)).all()
    standalone = RelaxedCategoricalPrior(3, 4, temperature=0.2)
    assert float(standalone().base_dist.temperature) == pytest.approx(0.2)


def test_prior_of_wrong_event_shape_is_refused():
    with pytest.raises(ShapeError, match=r"event shape \(3,\).*found event shape \(5,\)"):
        make_vae(lambda: dist.Normal(torch.zeros(5), 1.0).to_event(1))
    with pytest.raises(ShapeError, match=r"found event shape \(\)"):
        make_vae(lambda: dist.Normal(torch.zeros(3), 1.0))  # forgot .to_event(1)


@pytest.mark.parametrize("spec, match", [
    ("cauchy", "one of"),
    ("categorical", "categorical latent"),
    ({"name": "mixture", "components": 0}, "components"),
    ({"name": "laplace", "bogus": 1}, "options"),
    ({"name": "flow", "kind": "radial"}, "kind"),
    ({"name": "student-t", "df": -1.0}, "df"),
])
def test_bad_prior_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        make_vae(spec)


def test_vamp_needs_an_encoder():
    with pytest.raises(ConfigError, match="encoder"):
        build_prior("vamp", 3)


def test_custom_prior_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, "examples/custom_prior.py", "--epochs", "1", "--limit", "128",
                           "--hidden", "16"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "analytic" in proc.stdout and "ELBO" in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("key", sorted(GAUSSIAN))
def test_every_prior_trains_on_cuda(key, digits):
    vae = make_vae(GAUSSIAN[key])
    pyro_vae.fit(vae, digits, epochs=1, batch_size=64, progress=False, device="cuda", elbo="meanfield")
    assert vae.sample(4).device.type == "cuda"
    assert torch.isfinite(vae.prior().log_prob(torch.randn(3, Z, device="cuda"))).all()
