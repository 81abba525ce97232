"""Exact Bernoulli latents: the default estimator (resolved and recorded by name), the pathwise estimator refused at
a guide site without rsample, the mean-field ELBO refused before training, and traversals that set bits."""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_vae
from pyro_vae.errors import ConfigError
from pyro_vae.generation import traverse
from pyro_vae.infer.elbo import evaluate_elbo, make_elbo
from pyro_vae.infer.estimators import check_estimator, default_estimator
from pyro_vae.infer.pair import ModelGuidePair


def make_vae(z_dim=3, **kw):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    return pyro_vae.VAE((12,), z_dim, latent="bernoulli", hidden=(8,), **kw)


def binary(n=16, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=g) < 0.4).float()


def signature(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=False)["signature"]


# ------------------------------------------------------------------------------------------ the default
def test_default_rule():
    assert default_estimator(make_vae()) == "score-function"
    assert default_estimator(make_vae(relaxed=True)) == "pathwise"
    assert default_estimator(make_vae(straight_through=True)) == "pathwise"
    pyro.clear_param_store()
    assert default_estimator(pyro_vae.VAE((12,), 2, hidden=(8,))) == "pathwise"
    pyro.clear_param_store()
    assert default_estimator(pyro_vae.VAE((12,), 2, latent="categorical", categories=3, hidden=(8,))) == "pathwise"


@pytest.mark.parametrize("kw, name", [({}, "score-function"), ({"relaxed": True}, "pathwise")])
def test_fit_default_trains_and_records_the_resolved_name(tmp_path, kw, name):
    vae = make_vae(**kw)
    hist = pyro_vae.fit(vae, binary(), epochs=2, batch_size=8, progress=False, checkpoint_dir=tmp_path / "run")
    assert all(math.isfinite(e["train_elbo"]) for e in hist.epochs)
    assert signature(tmp_path / "run")["estimator"] == name


def test_default_equals_the_explicit_score_function_step_for_step():
    x = binary()
    vae = make_vae()
    a = pyro_vae.fit(vae, x, epochs=2, batch_size=8, progress=False)
    vae = make_vae()
    b = pyro_vae.fit(vae, x, epochs=2, batch_size=8, progress=False, estimator="score-function")
    assert a["train_elbo"] == b["train_elbo"]


def test_resume_of_a_default_run_with_the_explicit_name(tmp_path):
    x = binary()
    pyro_vae.fit(make_vae(), x, epochs=1, batch_size=8, progress=False, checkpoint_dir=tmp_path / "run")
    h = pyro_vae.fit(make_vae(), x, epochs=2, batch_size=8, progress=False, checkpoint_dir=tmp_path / "run",
                     resume_from=tmp_path / "run", estimator="score-function")
    assert len(h) == 2


def test_pair_default_reads_the_guide():
    """A model/guide pair whose guide samples an exact Bernoulli gets the score function by default."""
    x = binary(8, 4)

    def model(x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(torch.full((x.shape[0], 4), 0.5)).to_event(1))
            pyro.sample("x", dist.Bernoulli(probs=0.2 + 0.6 * z).to_event(1), obs=x)

    def guide(x, num_data=None):
        logits = pyro.param("q_logits", torch.zeros(4))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logits.expand(x.shape[0], 4)).to_event(1))

    pyro.clear_param_store()
    pair = ModelGuidePair(model, guide)
    hist = pyro_vae.fit(pair, x, epochs=1, batch_size=8, progress=False)
    assert math.isfinite(hist.epochs[0]["train_elbo"])
    pyro.clear_param_store()
    with pytest.raises(ConfigError, match='estimator "pathwise" at site "z"'):
        pyro_vae.fit(pair, x, epochs=1, batch_size=8, progress=False, estimator="pathwise")


# -------------------------------------------------------------------------------------- pathwise refused
def test_explicit_pathwise_on_an_exact_latent_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError) as err:
        pyro_vae.fit(make_vae(), binary(), epochs=1, progress=False, estimator="pathwise",
                     checkpoint_dir=tmp_path / "run")
    text = str(err.value)
    assert 'estimator "pathwise" at site "z"' in text and "reparameterizable latent" in text
    assert "found Bernoulli, which has no rsample" in text
    assert 'estimator="score-function"' in text and '"rloo"' in text and "relaxed=True" in text
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_make_elbo_pathwise_refuses_a_site_without_rsample_and_evaluate_still_reports():
    vae, x = make_vae(), binary(4)
    with pytest.raises(ConfigError, match='estimator "pathwise" at site "z"'):
        make_elbo("trace").loss(vae.model, vae.guide, x)
    with pytest.raises(ConfigError, match='estimator "pathwise" at site "z"'):
        make_elbo("trace", 2).differentiable_loss(vae.model, vae.guide, x)
    assert isinstance(make_elbo("trace"), pyro.infer.Trace_ELBO)
    for elbo in ("trace", "meanfield"):
        assert math.isfinite(evaluate_elbo(vae, x, elbo=elbo))


def test_pathwise_still_trains_relaxed_latents():
    x = binary()
    for kw in ({"relaxed": True}, {"straight_through": True}):
        vae = make_vae(**kw)
        hist = pyro_vae.fit(vae, x, epochs=1, batch_size=8, progress=False, estimator="pathwise")
        assert math.isfinite(hist.epochs[0]["train_elbo"])


# ------------------------------------------------------------------------------------ mean-field refused
@pytest.mark.parametrize("estimator", [None, "pathwise", "score-function", "score-function-baseline", "stl"])
def test_meanfield_with_an_estimator_not_per_site_is_refused_before_training(tmp_path, estimator):
    with pytest.raises(ConfigError) as err:
        pyro_vae.fit(make_vae(), binary(), epochs=1, progress=False, elbo="meanfield", estimator=estimator,
                     checkpoint_dir=tmp_path / "run")
    text = str(err.value)
    assert 'elbo "meanfield" (TraceMeanField_ELBO)' in text and 'at site "z"' in text
    assert 'elbo="trace"' in text and '"rloo"' in text and '"arm"' in text and '"disarm"' in text
    assert "All distributions in the guide" not in text
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("estimator", ["rloo", "disarm"])
def test_meanfield_with_a_per_site_estimator_trains(estimator):
    hist = pyro_vae.fit(make_vae(), binary(), epochs=1, batch_size=8, progress=False, elbo="meanfield",
                        estimator=estimator, num_particles=2)
    assert math.isfinite(hist.epochs[0]["train_elbo"])


# ---------------------------------------------------------------------------------------- command line
def test_cli_default_estimator_and_meanfield_refusal(tmp_path, capsys):
    from pyro_vae.cli import build_parser, main

    assert build_parser().parse_args(["train"]).estimator is None
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: pathwise, score-function for an exact --latent bernoulli" in text
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--binarize", "static", "--latent", "bernoulli", "--z-dim", "3",
                 "--hidden", "8", "--likelihood", "bernoulli", "--epochs", "1", "--batch-size", "512",
                 "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["estimator"] == "score-function" and train["elbo"] == "trace"
    assert signature(out)["estimator"] == "score-function"
    assert main(["interpolate", str(out), "--device", "cpu", "--pairs", "1", "--steps", "3"]) == 0  # bits 0 and 1
    assert (out / "traversals.png").is_file()
    capsys.readouterr()
    assert main(["train", "--data", "digits", "--latent", "bernoulli", "--elbo", "meanfield", "--epochs", "1",
                 "--out", str(tmp_path / "mf")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert 'elbo "meanfield" (TraceMeanField_ELBO)' in err and "--elbo trace" in err
    assert not (tmp_path / "mf").exists()


# -------------------------------------------------------------------------------------------- traversal
def test_traverse_sets_bits_on_an_exact_latent():
    vae, x = make_vae(4), binary(2)
    seen = []
    decode = vae.decode
    vae.decode = lambda z, **kw: (seen.append(z.clone()), decode(z, **kw))[1]
    out = traverse(vae, x[0], dims=[0, 2])
    assert out.shape == (2, 2, 12)
    z = seen[-1]
    assert z.shape == (2, 2, 4)
    assert torch.equal(z[0, :, 0], torch.tensor([0.0, 1.0])) and torch.equal(z[1, :, 2], torch.tensor([0.0, 1.0]))
    held = z[0, :, [1, 2, 3]]
    assert bool(((held >= 0) & (held <= 1)).all())  # the other bits at their posterior probabilities
    assert traverse(vae).shape == (4, 2, 12)
    assert bool(((seen[-1] >= 0) & (seen[-1] <= 1)).all())
    assert traverse(vae, dims=[1], values=[1, 0, 1]).shape == (1, 3, 12)
    with pytest.raises(ConfigError, match=r"values: expected bits in \{0, 1\}"):
        traverse(vae, values=[-3.0, 3.0])
    with pytest.raises(ConfigError, match=r"values: expected bits in \{0, 1\}"):
        traverse(vae, values=[0.5])


@pytest.mark.parametrize("kw", [{"relaxed": True}, {"straight_through": True}])
def test_traverse_sets_logit_space_bits_on_a_relaxed_latent(kw):
    vae, x = make_vae(3, **kw), binary(2)
    seen = []
    decode = vae.decode
    vae.decode = lambda z, **k: (seen.append(z.clone()), decode(z, **k))[1]
    for point in (x[0], None):
        out = traverse(vae, point, dims=[1])
        assert out.shape == (1, 2, 12)
        z = seen[-1]
        assert z.shape == (1, 2, 3)
        assert torch.equal(z[0, :, 1], torch.tensor([-math.inf, math.inf]))
        assert bool(torch.isfinite(z[0, :, [0, 2]]).all())  # the other bits at their logits
        assert torch.isfinite(out).all()
    # the decoder sees bits 0 and 1 where the traversal sets them
    assert torch.equal(vae.decoder_input(seen[-1])[0, :, 1], torch.tensor([0.0, 1.0]))


def test_relaxed_estimators_on_an_exact_bernoulli_latent_name_its_fixes():
    pyro.clear_param_store()
    vae = pyro_vae.VAE(data_shape=(6,), z_dim=3, latent="bernoulli", hidden=(8,))
    for est in ("relaxed", "straight-through"):
        with pytest.raises(ConfigError, match=r"relaxed=True \(--relaxed\).*\"arm\""):
            check_estimator(est, vae)
