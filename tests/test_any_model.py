"""The training and evaluation tools on any Pyro model/guide pair (pyro_vae.ModelGuidePair), not only a VAE.

The step-for-step comparison with pyro.infer.SVI and the resume test are deterministic (same seed, same draws):
tolerances are float32 rounding, false-failure rate zero. The log-likelihood test is statistical: the estimate
against the closed form within 4 standard errors of the importance-sampling noise (false-failure rate about
6e-5).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_vae
from pyro_vae.errors import ConfigError, DataError, ModelError
from pyro_vae.infer.pair import ModelGuidePair, as_pair
from pyro_vae.models.linear_gaussian import exact_log_likelihood, linear_gaussian_vae, set_exact_guide

D, Z = 6, 3
ROOT = Path(__file__).resolve().parents[1]


def noise_pair(seed: int = 0) -> ModelGuidePair:
    """A VAE whose likelihood scale sigma is a global latent (LogNormal prior, AutoNormal guide): the pattern of
    examples/global_latent.py. Built from ``seed`` with a fresh param store."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    noise = {"sigma": torch.tensor(0.5)}
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), name="vae", likelihood=lambda out: dist.Normal(out, noise["sigma"]))

    def model(x=None, num_data=None, batch_size=None):
        noise["sigma"] = pyro.sample("sigma", dist.LogNormal(math.log(0.5), 0.5))
        return vae.model(x, num_data=num_data, batch_size=batch_size)

    auto = AutoNormal(poutine.block(model, expose=["sigma"]))

    def guide(x=None, num_data=None, batch_size=None):
        auto(x, num_data, batch_size)
        return vae.guide(x, num_data=num_data)

    return ModelGuidePair(model, guide, modules=vae)


def data(n: int = 24) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(3))


def store_values() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {k: store.get_param(k).detach().clone() for k in store.keys()}


# ------------------------------------------------------------------------------------ fit equals SVI
def test_fit_on_a_composed_model_matches_svi_step_for_step():
    x, n, batch, seed = data(), 24, 8, 7
    pair = noise_pair()
    pyro_vae.fit(pair, x, epochs=2, batch_size=batch, lr=1e-2, seed=seed, progress=False)
    fitted = store_values()

    pair = noise_pair()
    svi = SVI(pair.model, pair.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    with poutine.block():  # the autoguide sets itself up on a first call (drawing from the prior), as in fit
        pair.guide(x[:batch], num_data=n)
    pyro.set_rng_seed(seed)
    for epoch in (1, 2):  # fit's shuffles: torch.randperm from a generator seeded seed + epoch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for idx in perm.split(batch):
            svi.step(x[idx], num_data=n)
    reference = store_values()
    assert set(fitted) == set(reference) and "AutoNormal.locs.sigma" in fitted
    for name in reference:
        assert torch.allclose(fitted[name], reference[name], atol=1e-6, rtol=1e-5), name
    assert not torch.equal(reference["AutoNormal.locs.sigma"], torch.zeros(()))


def test_fit_trains_every_parameter_the_traces_touch_and_scales_only_the_local_sites():
    x = data()
    pair = noise_pair()
    trace = poutine.trace(pair.model).get_trace(x[:8], num_data=24)
    trace.compute_log_prob()
    assert trace.nodes["sigma"]["scale"] == 1.0 and trace.nodes["vae/z"]["scale"] == 3.0
    pair.guide(x[:8], num_data=24)  # creates the autoguide's parameters
    before = store_values()
    pyro_vae.fit(pair, x, epochs=1, batch_size=8, progress=False)
    after = store_values()
    assert all(not torch.equal(before[k], after[k]) for k in ("AutoNormal.locs.sigma", "AutoNormal.scales.sigma"))


def test_an_object_with_model_and_guide_methods_is_a_pair():
    class Grouped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal")

        def model(self, x, num_data=None):
            return self.vae.model(x, num_data=num_data)

        def guide(self, x, num_data=None):
            return self.vae.guide(x, num_data=num_data)

    obj = Grouped()
    pair = as_pair(obj)
    assert isinstance(pair, ModelGuidePair) and list(pair.parts) == [obj]
    history = pyro_vae.fit(obj, data(), epochs=1, batch_size=8, progress=False)
    assert math.isfinite(history.epochs[-1]["train_elbo"])
    # Without global latents the pair's ELBO is the VAE's own, and so is log p(x) (same seed, same draws).
    x = data()
    pyro.set_rng_seed(1)
    alone = pyro_vae.evaluate_elbo(obj.vae, x, batch_size=10)
    pyro.set_rng_seed(1)
    assert pyro_vae.evaluate_elbo(obj, x, batch_size=10) == pytest.approx(alone, rel=1e-5)
    pyro.set_rng_seed(2)
    ll_vae = pyro_vae.log_likelihood(obj.vae, x, 20, batch_size=10)
    pyro.set_rng_seed(2)
    ll_pair = pyro_vae.log_likelihood(obj, x, 20, batch_size=10)
    assert torch.allclose(ll_vae.per_point, ll_pair.per_point, atol=1e-5)
    assert ll_pair.global_source is None and ll_pair.global_values is None


# ------------------------------------------------------------------------------------------ resume
def test_resume_of_a_composed_model_continues_exactly(tmp_path):
    x = data()
    kwargs = dict(batch_size=8, lr=1e-2, seed=3, progress=False)
    pyro_vae.fit(noise_pair(), x, epochs=3, **kwargs)
    whole = store_values()

    pyro_vae.fit(noise_pair(), x, epochs=1, checkpoint_dir=tmp_path / "run", **kwargs)
    pair = noise_pair(seed=11)  # other initial values: all of them come from the checkpoint
    history = pyro_vae.fit(pair, x, epochs=3, checkpoint_dir=tmp_path / "run", resume_from=tmp_path / "run",
                           **kwargs)
    resumed = store_values()
    assert [r["epoch"] for r in history.epochs] == [1, 2, 3]
    assert set(whole) == set(resumed)
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


# --------------------------------------------------------------------------------- log-likelihood
def offset_pair(perturb: float = 0.05):
    """A linear-Gaussian VAE under a global offset o ~ N(0, I): x = W z + b + o + noise. Observing x - o under
    the VAE is the same density (a shift), so log p(x | o) is the linear-Gaussian VAE's exact log p(x - o)."""
    pyro.clear_param_store()
    vae = linear_gaussian_vae(data_dim=5, z_dim=2, noise_scale=0.5, seed=0)
    set_exact_guide(vae)
    with torch.no_grad():  # a guide near, not at, the exact posterior: importance weights that vary
        net = vae.encoder.net
        net.weight.add_(perturb * torch.randn(net.weight.shape, generator=torch.Generator().manual_seed(5)))

    def model(x, num_data=None):
        o = pyro.sample("offset", dist.Normal(torch.zeros(5), 1.0).to_event(1))
        vae.model(x - o, num_data=num_data)

    def guide(x, num_data=None):
        loc = pyro.param("offset_loc", torch.full((5,), 0.2))
        o = pyro.sample("offset", dist.Normal(loc, 0.05).to_event(1))
        vae.guide(x - o, num_data=num_data)

    return vae, ModelGuidePair(model, guide, modules=vae)


def test_log_likelihood_of_a_composed_model_at_a_point_value_matches_the_exact_value():
    vae, pair = offset_pair()
    o = torch.tensor([0.3, -0.2, 0.1, 0.0, 0.4])
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(2)) * 1.5 + o
    ll = pyro_vae.log_likelihood(pair, x, 64, batch_size=100, global_values={"offset": o})
    assert ll.global_source == "given" and torch.equal(ll.global_values["offset"], o)
    exact = exact_log_likelihood(vae, x - o).detach()
    diff = ll.per_point - exact
    se = float(diff.std()) / math.sqrt(len(diff))
    assert se > 0 and abs(float(diff.mean())) < 4 * se
    # Held at the guide's draw instead: the result says so and holds that draw.
    ll = pyro_vae.log_likelihood(pair, x[:20], 8)
    assert ll.global_source == "guide" and ll.global_values["offset"].shape == (5,)
    assert ll.to_dict()["global_source"] == "guide"


def test_importance_samples_share_the_global_value():
    vae, pair = offset_pair()
    seen = []

    def model(x, num_data=None):
        o = pyro.sample("offset", dist.Normal(torch.zeros(5), 1.0).to_event(1))
        seen.append(o)
        vae.model(x - o, num_data=num_data)

    pyro_vae.log_likelihood(ModelGuidePair(model, pair.guide, modules=vae), torch.randn(7, 5), 16, batch_size=4)
    # One value (5,), no particle dimension, in every run of the model: all K samples of every point share it.
    assert all(v.shape == (5,) for v in seen) and all(torch.equal(v, seen[-1]) for v in seen[-3:])


# ------------------------------------------------------------------------------------------ refusals
def test_a_model_without_a_guide_is_refused_by_every_tool():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal")
    x = data()
    for call in (lambda: pyro_vae.fit(vae.model, x, progress=False),
                 lambda: pyro_vae.evaluate_elbo(vae.model, x),
                 lambda: pyro_vae.log_likelihood(vae.model, x, 4),
                 lambda: pyro_vae.to_inference_data(vae.model, x, 30),
                 lambda: pyro_vae.gradient_samples(vae.model, x, num_samples=2, method="loop")):
        with pytest.raises(ConfigError, match="without a guide.*ModelGuidePair"):
            call()
    with pytest.raises(ConfigError, match="guide"):
        ModelGuidePair(vae.model, None)


def test_a_model_without_a_data_plate_is_refused():
    def model(x, num_data=None):
        with pyro.plate("points", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([x.shape[0], D]).to_event(1), obs=x)

    def guide(x, num_data=None):
        pass

    pair = ModelGuidePair(model, guide)
    for call in (lambda: pyro_vae.fit(pair, data(), progress=False),
                 lambda: pyro_vae.evaluate_elbo(pair, data()),
                 lambda: pyro_vae.log_likelihood(pair, data(), 4),
                 lambda: pyro_vae.to_inference_data(pair, data(), 30)):
        with pytest.raises(ConfigError, match="no plate named 'data'.*'points'.*data_plate="):
            call()
    # Named, it works; a name that is no plate of the model is refused.
    assert math.isfinite(pyro_vae.evaluate_elbo(ModelGuidePair(model, guide, data_plate="points"), data()))
    with pytest.raises(ConfigError, match="data_plate"):
        pyro_vae.evaluate_elbo(ModelGuidePair(model, guide, data_plate="rows"), data())


def test_a_model_that_ignores_num_data_is_refused_by_fit():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal")
    pair = ModelGuidePair(lambda x, num_data=None: vae.model(x), lambda x, num_data=None: vae.guide(x))
    with pytest.raises(ConfigError, match="full size 24.*num_data"):
        pyro_vae.fit(pair, data(), batch_size=8, progress=False)


def test_options_only_a_vae_has_are_refused_for_a_pair():
    pair = noise_pair()
    x = data().abs().clamp(max=1)
    with pytest.raises(ConfigError, match="dynamic_binarize"):
        pyro_vae.fit(pair, x, dynamic_binarize=True, progress=False)
    with pytest.raises(ConfigError, match="cuda_graph"):
        pyro_vae.fit(pair, x, cuda_graph=True, progress=False)
    with pytest.raises(ConfigError, match="KLWarmup schedule"):
        pyro_vae.fit(pair, x, callbacks=[pyro_vae.schedules.KLWarmup(10)], progress=False)
    with pytest.raises(ConfigError, match="global latent"):
        pyro_vae.log_likelihood(pair, x, 4, global_values={"vae/z": torch.zeros(Z)})
    with pytest.raises(DataError, match="finite"):
        pyro_vae.fit(pair, torch.full((4, D), math.nan), progress=False)


def grouped_pair(clash: bool):
    """An outer "groups" plate around the VAE, the group offsets in it; the offsets' guide an AutoNormal."""
    G = 3
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), name="vae", likelihood="normal")

    def model(x, num_data=None):  # x: (batch, G, D)
        with pyro.plate("groups", G, dim=-2):
            o = pyro.sample("offset", dist.Normal(0.0, 1.0).expand([1, 1, D]).to_event(1))
            vae.model(x.transpose(0, 1) - o, num_data=num_data)

    if clash:
        auto = AutoNormal(poutine.block(model, expose=["offset"]))

        def guide(x, num_data=None):
            with pyro.plate("groups", G, dim=-2):
                o = auto(x, num_data)["offset"]
                vae.guide(x.transpose(0, 1) - o, num_data=num_data)
    else:
        current = {}
        auto = AutoNormal(poutine.block(model, expose=["offset"]), create_plates=lambda *a, **k: current["groups"])

        def guide(x, num_data=None):
            current["groups"] = groups = pyro.plate("groups", G, dim=-2)
            o = auto(x, num_data)["offset"]
            with groups:
                vae.guide(x.transpose(0, 1) - o, num_data=num_data)

    return ModelGuidePair(model, guide, modules=vae)


def test_an_autoguide_that_recreates_the_outer_plate_gets_an_error_naming_the_recipe():
    x = torch.randn(10, 3, D)
    with pytest.raises(ModelError, match="plate 'groups'.*create_plates"):
        pyro_vae.fit(grouped_pair(clash=True), x, batch_size=5, progress=False)
    pyro.clear_param_store()
    history = pyro_vae.fit(grouped_pair(clash=False), x, epochs=2, batch_size=5, progress=False)
    assert math.isfinite(history.epochs[-1]["train_elbo"])


# ------------------------------------------------------------------------------- the grouped model
def grouped_example():
    spec = importlib.util.spec_from_file_location("grouped_model", ROOT / "examples" / "grouped_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_grouped_model_recovers_known_group_offsets():
    """The offsets are identified up to a shift common to all groups (the decoder's bias takes it), so estimates
    and truth are compared centred over the groups. The posterior sd of a group's offset is that of the group
    mean of its data, sd(x[:, g, d]) / sqrt(N), sqrt((G - 1) / G) times that once centred; each of the 12
    entries is within 4 of those of the truth: a false-failure rate below 12 * 6.3e-5 = 8e-4 for a posterior of
    that width (seeded; at seed 1 the largest is 1.9 of them)."""
    ex = grouped_example()
    truth = torch.tensor([[-1.0, 0.5, 0.0, 1.0], [0.0, -0.5, 1.0, 0.0], [1.0, 0.0, -1.0, -1.0]])
    G, n = truth.shape[0], 400
    x = ex.make_data(n, truth, 0.3, 2, seed=1)
    vae, model = ex.grouped_model(G, truth.shape[1])
    pair = ModelGuidePair(model, ex.hand_guide(vae, G, truth.shape[1]), modules=vae)
    pyro_vae.fit(pair, x, epochs=150, batch_size=50, lr=2e-2, seed=1, progress=False)
    est = pyro.param("offset_loc").detach().squeeze(1)
    sd = x.std(dim=0) / math.sqrt(n) * math.sqrt((G - 1) / G)
    err = (est - est.mean(0)) - (truth - truth.mean(0))
    assert bool((err.abs() < 4 * sd).all()), (err / sd)
    assert abs(float(pyro.param("scale_loc").exp()) - 0.3) < 0.1


def test_the_grouped_model_example_runs_in_quick_mode(tmp_path):
    out = tmp_path / "grouped.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "grouped_model.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "create_plates" in result["clash_error"] and "plate 'groups'" in result["clash_error"]
    assert result["log_likelihood_at_means"]["global_source"] == "given"
    assert result["log_likelihood_at_draw"]["global_source"] == "guide"
    assert abs(result["do_shift"] - 3.0) < 0.5 and math.isfinite(result["auto_train_elbo"])
    assert "posterior predictive" in proc.stdout


# ------------------------------------------------------------------------------------------ ArviZ
def test_to_inference_data_of_a_composed_model():
    pair = grouped_pair(clash=False)
    x = torch.randn(10, 3, D)
    idata = pyro_vae.to_inference_data(pair, x, 30, seed=0)
    z = idata.posterior["vae.z"]
    assert z.dims == ("chain", "draw", "point", "vae.z_dim_0", "vae.z_dim_1") and z.shape == (1, 30, 10, 3, Z)
    assert idata.constant_data["offset"].shape == (3, 1, D) and idata.attrs["global_source"] == "guide"
    assert idata.log_likelihood["x"].shape == (1, 30, 10) and len(idata.attrs["pareto_k"]) == 10
    # Held at given values instead: the result says so.
    held = {"offset": torch.as_tensor(idata.constant_data["offset"].values)}
    again = pyro_vae.to_inference_data(pair, x, 30, global_values=held)
    assert again.attrs["global_source"] == "given"


def test_the_functions_that_read_a_vae_refuse_a_pair_clearly():
    pair = noise_pair()
    for call in (lambda: pyro_vae.active_units(pair, data()),
                 lambda: pyro_vae.amortization_gap(pair, data()),
                 lambda: pyro_vae.evaluation.importance_log_weights(pair, data(), 4)):
        with pytest.raises(ConfigError, match="a pyro_vae.VAE .*any model/guide pair"):
            call()
    with pytest.raises(ConfigError, match="model, guide"):
        pyro_vae.log_likelihood(pair, data(), 4, guide=pair.guide)


def test_gradient_samples_of_a_pair():
    pair = noise_pair()

    class Plain:  # model and guide methods, no nn.Module
        model = staticmethod(pair.model)
        guide = staticmethod(pair.guide)

    x = data()[:8]
    for obj in (pair, Plain()):
        g = pyro_vae.gradient_samples(obj, x, num_samples=3, method="loop", seed=0, num_data=24)
        assert g.shape[0] == 3 and bool(torch.isfinite(g).all())
    with pytest.raises(ConfigError, match="without a guide"):
        pyro_vae.gradient_samples(pair.model, x, num_samples=3, method="loop")


def test_the_elbo_fit_reports_for_a_pair_has_kl_weight_one():
    vae = pyro_vae.VAE((D,), Z, hidden=(8,), likelihood="normal", beta=0.25)
    pair = ModelGuidePair(vae.model, vae.guide, modules=vae)
    record = pyro_vae.fit(pair, data(), epochs=1, batch_size=8, progress=False).epochs[-1]
    assert record["beta"] == 0.25 and vae.beta == 0.25
    assert record["train_objective"] > record["train_elbo"]  # the KL weighed by 0.25 < 1 in the objective
