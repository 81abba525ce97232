"""The model/guide pair against closed forms (linear-Gaussian VAE), under SVI, Predictive and poutine.

Statistical tests: each compares a Monte Carlo mean with a closed form at 4 standard errors of the estimate
(R = 40 independent replicate means; false-failure rate about 6e-5 per comparison under normality, about 3e-4
with the t distribution on 39 degrees of freedom), seeded, so a failure is a real regression.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

import pyro_vae
from pyro_vae.models.linear_gaussian import exact_elbo, exact_log_likelihood, linear_gaussian_vae, set_exact_guide


def _replicates(elbo, vae, x, reps=40):
    with torch.no_grad():
        return torch.tensor([-elbo.loss(vae.model, vae.guide, x) for _ in range(reps)], dtype=torch.float64)


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_monte_carlo_elbo_matches_closed_form(elbo_cls):
    vae = linear_gaussian_vae(data_dim=5, z_dim=2, seed=1)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2)) * 2
    elbo = elbo_cls(num_particles=200, vectorize_particles=True, max_plate_nesting=1)
    est = _replicates(elbo, vae, x)
    exact = exact_elbo(vae, x).sum().item()
    se = est.std().item() / math.sqrt(len(est))
    assert se > 0
    assert abs(est.mean().item() - exact) < 4 * se, (est.mean().item(), exact, se)


def test_elbo_never_exceeds_log_likelihood_and_is_tight_at_the_exact_posterior():
    vae = linear_gaussian_vae(data_dim=6, z_dim=3, seed=3)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        gap = exact_log_likelihood(vae, x) - exact_elbo(vae, x)
        assert (gap > 1e-3).all()  # a random guide is strictly worse
        set_exact_guide(vae)
        gap = exact_log_likelihood(vae, x) - exact_elbo(vae, x)
    assert gap.abs().max() < 1e-4
    # With the exact posterior, log p(x, z) - log q(z | x) = log p(x) for every z: zero variance.
    est = _replicates(Trace_ELBO(num_particles=10, vectorize_particles=True, max_plate_nesting=1), vae, x, reps=5)
    assert est.std() < 1e-3
    assert est.mean().item() == pytest.approx(exact_log_likelihood(vae, x).sum().item(), abs=1e-3)


def test_analytic_kl_matches_the_standard_formula():
    vae = pyro_vae.VAE((64,), 8)
    x = torch.rand(16, 64).round()
    q = vae.encoder.distribution(x)
    m, s = vae.encoder(x)
    formula = -0.5 * (1 + torch.log(s**2) - m**2 - s**2).sum(-1)
    kl = torch.distributions.kl_divergence(q, vae.prior().expand([16]))
    torch.testing.assert_close(kl, formula, rtol=1e-5, atol=1e-5)


def test_meanfield_uses_the_analytic_kl():
    vae = linear_gaussian_vae(seed=5)
    x = torch.randn(4, 5)
    with torch.no_grad():
        pyro.set_rng_seed(9)
        loss = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(9)  # the same draw of z
        tr = poutine.trace(vae.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(vae.model, trace=tr)).get_trace(x)
        ll = model_tr.nodes["x"]["fn"].log_prob(x).sum()
        kl = torch.distributions.kl_divergence(tr.nodes["z"]["fn"], model_tr.nodes["z"]["fn"]).sum()
    assert loss == pytest.approx(-(ll - kl).item(), rel=1e-5)


def test_sites_plate_and_shapes():
    vae = pyro_vae.VAE((1, 8, 8), 3, likelihood="continuous-bernoulli")
    x = torch.rand(5, 1, 8, 8)
    tr = poutine.trace(vae.model).get_trace(x, num_data=50)
    assert tr.nodes["z"]["value"].shape == (5, 3)
    assert tr.nodes["x"]["value"].shape == (5, 1, 8, 8) and tr.nodes["x"]["is_observed"]
    assert tr.nodes["z"]["scale"] == pytest.approx(10.0)  # minibatch of 5 scaled to 50
    assert [f.name for f in tr.nodes["z"]["cond_indep_stack"]] == ["data"]
    gtr = poutine.trace(vae.guide).get_trace(x, num_data=50)
    assert gtr.nodes["z"]["fn"].event_shape == (3,) and gtr.nodes["z"]["value"].shape == (5, 3)
    params = {n for n, s in list(tr.nodes.items()) + list(gtr.nodes.items()) if s["type"] == "param"}
    assert any(n.startswith("decoder$$$") for n in params) and any(n.startswith("encoder$$$") for n in params)


def test_svi_trains_and_predictive_returns_documented_shapes():
    vae = pyro_vae.VAE((64,), 4, likelihood="continuous-bernoulli", hidden=(32,))
    x = pyro_vae.data.load("digits").train.x.flatten(1)[:256]
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    losses = [svi.step(x[torch.randint(256, (64,))], num_data=256) for _ in range(150)]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 50
    post = Predictive(vae.model, guide=vae.guide, num_samples=3)(x[:7])
    assert post["z"].shape == (3, 7, 4) and post["x"].shape == (3, 7, 64)
    prior = Predictive(vae.model, num_samples=2)(None, batch_size=6)
    assert prior["z"].shape == (2, 6, 4) and prior["x"].shape == (2, 6, 64)


def test_vectorized_particles_broadcast_through_networks():
    for net in ("mlp", "conv"):
        pyro.clear_param_store()
        vae = pyro_vae.VAE((1, 8, 8), 2, encoder=net, decoder=net, likelihood="continuous-bernoulli")
        loss = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1).loss(
            vae.model, vae.guide, torch.rand(3, 1, 8, 8))
        assert math.isfinite(loss)


def test_called_inside_a_larger_model_with_a_prefix():
    a, b = pyro_vae.VAE((4,), 2, name="a", likelihood="normal"), pyro_vae.VAE((6,), 3, name="b", likelihood="normal")

    def model(xa, xb):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        a.model(xa - shift)
        b.model(xb)

    tr = poutine.trace(model).get_trace(torch.randn(5, 4), torch.randn(5, 6))
    assert {"shift", "a/z", "a/x", "b/z", "b/x"} <= set(tr.nodes)
    tr.compute_log_prob()


def test_learnable_prior_module_is_registered_and_learns():
    class LearnedLoc(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.zeros(2))

        def forward(self):
            return dist.Normal(self.loc, 1.0).to_event(1)

    prior = LearnedLoc()
    vae = pyro_vae.VAE((64,), 2, prior=prior, likelihood="continuous-bernoulli", hidden=(16,))
    x = pyro_vae.data.load("digits").train.x.flatten(1)[:128]
    pyro_vae.fit(vae, x, epochs=2, batch_size=64, lr=1e-2, progress=False, device="cpu")
    assert prior.loc.abs().sum() > 0


def test_fit_improves_validation_elbo_on_digits():
    splits = pyro_vae.data.load("digits", seed=0)
    vae = pyro_vae.VAE(splits.data_shape, 8, likelihood="continuous-bernoulli", hidden=(128,))
    before = pyro_vae.evaluate_elbo(vae, splits.val)
    hist = pyro_vae.fit(vae, splits.train, val_data=splits.val, elbo="meanfield", epochs=5, batch_size=64,
                        lr=3e-3, progress=False, device="cpu")
    assert len(hist) == 5 and hist["val_elbo"][-1] == pytest.approx(pyro_vae.evaluate_elbo(vae, splits.val), abs=2)
    # From about -80 nats untrained to above +20 after five epochs: a clear margin, far beyond MC noise.
    assert hist["val_elbo"][-1] > before + 60


def test_fit_is_reproducible_for_a_seed():
    x = pyro_vae.data.load("digits").train.x[:200]
    runs = []
    for _ in range(2):
        pyro.clear_param_store()
        torch.manual_seed(123)
        vae = pyro_vae.VAE((1, 8, 8), 2, likelihood="continuous-bernoulli", hidden=(16,))
        runs.append(pyro_vae.fit(vae, x, epochs=2, batch_size=50, progress=False, device="cpu", seed=7)["train_elbo"])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------- bad input
def test_grey_values_under_bernoulli_are_refused():
    vae = pyro_vae.VAE((64,), 2, likelihood="bernoulli")
    with pytest.raises(pyro_vae.DataError, match=r'under the "bernoulli" likelihood: expected binary.*Fix: binarize'):
        vae.model(torch.full((3, 64), 0.5))


def test_negative_values_under_continuous_bernoulli_are_refused():
    vae = pyro_vae.VAE((64,), 2, likelihood="continuous-bernoulli")
    with pytest.raises(pyro_vae.DataError, match=r"expected values in \[0, 1\], found values in \[-1"):
        pyro_vae.fit(vae, torch.full((10, 64), -1.0), epochs=1, progress=False)


def test_wrong_data_shape_is_refused():
    vae = pyro_vae.VAE((64,), 2)
    with pytest.raises(pyro_vae.DataError,
                       match=r"expected shape \(batch, \*data_shape\) = \(batch, 64\), found shape \(3, 32\)"):
        vae.guide(torch.zeros(3, 32))


def test_non_finite_data_is_refused():
    vae = pyro_vae.VAE((4,), 2, likelihood="normal")
    x = torch.zeros(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(pyro_vae.DataError, match="expected finite values, found 1 NaN"):
        vae.model(x)


@pytest.mark.parametrize("z_dim", [0, -1, 2.5, True])
def test_bad_z_dim_is_refused(z_dim):
    with pytest.raises(pyro_vae.ConfigError, match=r"z_dim: expected an integer >= 1"):
        pyro_vae.VAE((64,), z_dim)


def test_prior_of_the_wrong_event_shape_is_refused():
    with pytest.raises(pyro_vae.ShapeError,
                       match=r'prior at site "z": expected event shape \(4,\).*found event shape \(\)'):
        pyro_vae.VAE((64,), 4, prior=lambda: dist.Normal(torch.zeros(4), 1.0))


def test_user_encoder_of_the_wrong_width_is_refused():
    with pytest.raises(pyro_vae.ShapeError, match=r"expected last dimension 2 \* z_dim = 8"):
        pyro_vae.VAE((64,), 4, encoder=nn.Linear(64, 4))


def test_user_decoder_of_the_wrong_shape_is_refused():
    with pytest.raises(pyro_vae.ShapeError, match=r'likelihood at site "x": expected event shape data_shape = \(64,\)'):
        pyro_vae.VAE((64,), 4, decoder=nn.Linear(4, 32))


def test_conv_needs_an_image_shape():
    with pytest.raises(pyro_vae.ConfigError, match=r"data_shape: expected an image shape"):
        pyro_vae.VAE((64,), 4, encoder="conv")


def test_unknown_likelihood_lists_the_known_ones():
    with pytest.raises(pyro_vae.ConfigError, match="bernoulli, continuous-bernoulli, normal, normal-learned"):
        pyro_vae.VAE((64,), 4, likelihood="poisson")


def test_param_store_clash_is_explained():
    pyro_vae.VAE((4,), 2, likelihood="normal").model(torch.zeros(2, 4))
    with pytest.raises(pyro_vae.ConfigError, match="clear_param_store"):
        pyro_vae.VAE((4,), 2, likelihood="normal").model(torch.zeros(2, 4))


def test_early_stopping_counts_epochs_without_improvement():
    from pyro_vae.train import History, TrainState

    stopper = pyro_vae.EarlyStopping(patience=2, min_delta=0.5)
    state = TrainState(vae=None, optimizer=None, history=History())
    stops = []
    for val in (1.0, 2.0, 2.3, 2.4, 3.0, 3.1, 3.2):  # 2.3 and 2.4 are within min_delta of 2.0
        state.history.epochs.append({"val_elbo": val, "train_elbo": 0.0})
        stopper.on_epoch_end(state)
        stops.append(state.stop)
    assert stops == [False, False, False, True, True, True, True]
    resumed = pyro_vae.EarlyStopping(patience=2, min_delta=0.5)
    resumed.on_fit_start(state)  # re-reads the history of a resumed run
    assert (resumed.best, resumed.bad_epochs) == (3.0, 2)


def test_fit_stops_early():
    x = pyro_vae.data.load("digits").train.x[:100]
    vae = pyro_vae.VAE((1, 8, 8), 2, likelihood="continuous-bernoulli", hidden=(8,))
    hist = pyro_vae.fit(vae, x, epochs=20, batch_size=50, lr=1e-9, progress=False, device="cpu",
                        callbacks=[pyro_vae.EarlyStopping(patience=2, min_delta=5.0)])
    assert len(hist) == 3  # lr 1e-9 cannot improve the ELBO by 5 nats: epochs 2 and 3 count, then stop
