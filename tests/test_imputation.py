"""Imputation: masks, masked scoring, importance and pseudo-Gibbs completions against the exact conditional
mean of a linear-Gaussian VAE, the ``impute`` command and the example script.

For the linear-Gaussian VAE (tests/test_evaluation.py) p(x) = N(b, WW^T + s^2 I), so
E[x_mis | x_obs] is Gaussian conditioning in closed form. Statistical checks are seeded and use 4 standard
errors (false-failure rate below 1e-4 per comparison for an unseeded run).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from test_evaluation import D, linear_gaussian, make_run

import pyro_vae
from pyro_vae import imputation
from pyro_vae.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
MASK = torch.tensor([True, False, True, False, True, False])


def _conditional_mean(marginal, x, mask):
    c, mu = marginal.covariance_matrix, marginal.mean
    o, m = mask, ~mask
    return mu[m] + (x[:, o] - mu[o]) @ torch.linalg.solve(c[o][:, o], c[o][:, m])


def test_make_mask_hides_the_requested_part():
    m = imputation.make_mask((1, 8, 8), "bottom", 3)
    assert m.shape == (3, 1, 8, 8) and m.dtype == torch.bool
    assert m[:, :, :4].all() and not m[:, :, 4:].any()
    assert not imputation.make_mask((64,), "left", 1).reshape(8, 8)[:, :4].any()
    assert imputation.make_mask((64,), "right", 1).reshape(8, 8)[:, :4].all()
    r = imputation.make_mask((1, 28, 28), "random:0.3", 50, seed=1)
    assert abs(float((~r).float().mean()) - 0.3) < 4 * (0.3 * 0.7 / r.numel()) ** 0.5
    assert imputation.make_mask((6,), "top", 1).tolist() == [[False, False, False, True, True, True]]
    with pytest.raises(ConfigError, match="mask"):
        imputation.make_mask((64,), "middle")
    with pytest.raises(ConfigError, match="random:P"):
        imputation.make_mask((64,), "random:2")


def test_importance_imputation_converges_to_the_exact_conditional_mean():
    vae, marginal, _ = linear_gaussian()
    x = marginal.sample((300,))
    exact = _conditional_mean(marginal, x, MASK)
    errors = {}
    for k in (30, 1000):
        imp = imputation.impute(vae, x, MASK, num_samples=k, init=marginal.mean)
        assert torch.equal(imp[:, MASK], x[:, MASK])  # observed entries untouched
        errors[k] = (imp[:, ~MASK] - exact).pow(2).mean(0)
    cond_var = torch.tensor([0.66, 0.50, 0.66]) ** 2  # conditional variances of the hidden entries (about)
    assert torch.all(errors[1000] < 0.1 * cond_var)
    assert torch.all(errors[1000] < errors[30])


@pytest.mark.parametrize("method", ["metropolis", "gibbs"])
def test_chains_converge_to_the_exact_conditional_mean(method):
    # Metropolis-within-Gibbs targets p(x_mis | x_obs) for any guide; with the exact posterior as guide
    # pseudo-Gibbs is an exact Gibbs sampler too. Chain averages then approach E[x_mis | x_obs].
    vae, marginal, _ = linear_gaussian()
    x = marginal.sample((100,))
    exact = _conditional_mean(marginal, x, MASK)
    imp = imputation.impute(vae, x, MASK, method=method, num_iters=40, init=marginal.mean)
    assert torch.equal(imp[:, MASK], x[:, MASK])
    cond_var = torch.tensor([0.66, 0.50, 0.66]) ** 2
    assert torch.all((imp[:, ~MASK] - exact).pow(2).mean(0) < 0.15 * cond_var)


@pytest.mark.parametrize("method", imputation.METHODS)
def test_imputation_beats_the_per_entry_mean(method):
    vae, marginal, _ = linear_gaussian()
    x = marginal.sample((400,))
    train_mean = marginal.sample((2000,)).mean(0)
    imp = imputation.impute(vae, x, MASK, method=method, num_samples=300, num_iters=10)
    err = imputation.masked_error(x, imp, MASK)
    base = imputation.masked_error(x, torch.where(MASK, x, train_mean), MASK)
    diff = base - err
    assert diff.mean() > 4 * diff.std() / len(diff) ** 0.5


def test_missing_entries_are_never_scored():
    # Whatever the missing entries hold (NaN included), the result is the same: they are replaced before
    # the encoder sees them and masked out of the likelihood.
    vae, marginal, _ = linear_gaussian()
    x = marginal.sample((20,))
    results = []
    for fill in (0.0, 1e6, float("nan")):
        xf = torch.where(MASK, x, torch.full_like(x, fill))
        pyro.set_rng_seed(3)
        results.append(imputation.impute(vae, xf, MASK, num_samples=50))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_masked_importance_weights_score_only_observed_entries():
    # With everything observed the masked weights are the full ones; hiding entries changes them.
    from pyro_vae.infer.traces import particle_log_probs

    vae, marginal, _ = linear_gaussian()
    x = marginal.sample((4,))
    pyro.set_rng_seed(0)
    full = particle_log_probs(vae, vae.model, vae.guide, x, 5, -2)
    pyro.set_rng_seed(0)
    masked = particle_log_probs(vae, vae.model, vae.guide, x, 5, -2, obs_mask=torch.ones(D, dtype=torch.bool))
    assert torch.allclose(full.log_w, masked.log_w)
    pyro.set_rng_seed(0)
    half = particle_log_probs(vae, vae.model, vae.guide, x, 5, -2, obs_mask=MASK)
    assert torch.allclose(half.log_p_latent, full.log_p_latent)
    assert torch.all(half.log_p_obs != full.log_p_obs)


def test_bad_masks_and_arguments_raise():
    vae, marginal, _ = linear_gaussian()
    x = marginal.sample((3,))
    with pytest.raises(DataError, match="boolean"):
        imputation.impute(vae, x, MASK.float())
    with pytest.raises(DataError, match="mask"):
        imputation.impute(vae, x, torch.ones(D + 1, dtype=torch.bool))
    with pytest.raises(ConfigError, match="method"):
        imputation.impute(vae, x, MASK, method="mice")
    with pytest.raises(DataError, match="finite"):
        imputation.impute(vae, torch.full_like(x, float("nan")), torch.ones(D, dtype=torch.bool))


def test_cli_impute_writes_picture_and_scores(tmp_path, capsys):
    import json

    from pyro_vae.cli import main

    run = make_run(tmp_path / "run")
    assert main(["impute", str(run), "--mask", "bottom", "--n", "10", "--samples", "20", "--device", "cpu"]) == 0
    result = json.loads((run / "imputation.json").read_text())
    assert result["num_points"] == 10 and result["missing_fraction"] == pytest.approx(0.5)
    assert (run / "imputations.png").is_file()
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    mask[:, :, 4:] = False
    import numpy as np

    np.save(tmp_path / "mask.npy", mask.numpy())
    assert main(["impute", str(run), "--mask", str(tmp_path / "mask.npy"), "--method", "gibbs", "--iters", "3",
                 "--n", "5", "--device", "cpu"]) == 0
    assert json.loads((run / "imputation.json").read_text())["missing_fraction"] == pytest.approx(0.5)
    assert main(["impute", str(run), "--mask", "diagonal"]) == 2
    capsys.readouterr()


def test_example_impute_digits_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "impute_digits.py"), "--epochs", "1",
                          "--hidden", "16", "--z-dim", "2", "--n", "8", "--samples", "10", "--iters", "2",
                          "--device", "cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "per-pixel mean" in out.stdout
    assert (tmp_path / "imputations.png").is_file() and (tmp_path / "imputation.json").is_file()


@pytest.mark.slow
def test_trained_digits_model_imputes_the_bottom_half_better_than_the_pixel_mean():
    splits = pyro_vae.data.load("digits")
    train = splits.train.x.flatten(1)
    x = torch.cat([splits.test.x, splits.val.x]).flatten(1)
    vae = pyro_vae.VAE((64,), 8, hidden=(128,), likelihood="continuous-bernoulli")
    with pyro.validation_enabled(False):
        pyro_vae.fit(vae, train, elbo="meanfield", epochs=30, batch_size=64, lr=3e-3, progress=False)
    mask = imputation.make_mask((64,), "bottom", len(x))
    err = imputation.masked_error(x, imputation.impute(vae, x, mask, num_samples=500), mask)
    base = imputation.masked_error(x, torch.where(mask, x, train.mean(0)), mask)
    diff = base - err
    assert diff.mean() > 4 * diff.std() / len(diff) ** 0.5


# ------------------------------------------------------------------------------ every latent type, every method
def _tiny_vae(latent: str) -> pyro_vae.VAE:
    kw = {} if latent == "gaussian" else {"latent": "categorical", "categories": 5,
                                          "straight_through": latent == "categorical-st", "temperature": 0.3}
    return pyro_vae.VAE((4,), 2, hidden=(8,), likelihood="bernoulli", **kw)


@pytest.mark.parametrize("latent", ["gaussian", "categorical", "categorical-st"])
@pytest.mark.parametrize("method", imputation.METHODS)
def test_every_method_imputes_with_every_latent_type(method, latent):
    """Each method feeds the decoder what the model feeds it (for a categorical latent, exp of the log-space
    latent, flattened; with straight-through its hard one-hot): observed entries kept, missing ones Bernoulli
    means in (0, 1)."""
    vae = _tiny_vae(latent)
    x = (torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    mask = torch.tensor([True, True, False, False])
    out = pyro_vae.impute(vae, x, mask, method=method, num_iters=4, num_samples=20, seed=0)
    assert out.shape == x.shape and torch.equal(out[:, mask], x[:, mask])
    assert bool(((out[:, ~mask] > 0) & (out[:, ~mask] < 1)).all())


def _categorical_conditional_mean(vae, x, mask):
    """E[x_mis | x_obs] of a VAE with one relaxed categorical variable of two classes, by quadrature over the
    log-space latent z = log_softmax((s, 0)): the log-Concrete density is a density in s (it integrates to 1)."""
    vae = vae.double()
    s = torch.linspace(-120, 120, 200001, dtype=torch.float64)
    z = torch.log_softmax(torch.stack([s, torch.zeros_like(s)], -1), -1)[:, None, :]  # (G, 1, 2)
    with torch.no_grad():
        log_prior = vae.prior().log_prob(z)
        assert abs(float(log_prior.exp().sum() * (s[1] - s[0])) - 1) < 1e-6
        probs = vae.decode_dist(z).mean  # (G, D)
    log_obs = torch.distributions.Bernoulli(probs=probs[:, mask]).log_prob(x[mask].double()).sum(-1)
    w = log_prior + log_obs
    w = (w - w.max()).exp()
    vae.float()
    return (w[:, None] * probs[:, ~mask]).sum(0) / w.sum()


@pytest.mark.parametrize("method, kwargs", [("importance", {"num_samples": 500}),
                                            ("metropolis", {"num_iters": 60})])
def test_exact_methods_reach_the_conditional_mean_of_a_categorical_vae(method, kwargs):
    """Importance sampling and Metropolis-within-Gibbs on a relaxed categorical latent, against quadrature.
    100 independent copies of one point give the estimator's mean and its standard error; 4 standard errors
    (false-failure rate about 6e-5 per entry under the normal approximation). The chains' burn-in bias at 60
    iterations, measured with 1000 copies against 300-iteration chains (which agree with quadrature within
    0.4 standard errors), is about half of this test's standard error."""
    pyro.set_rng_seed(0)
    vae = pyro_vae.VAE((4,), 1, latent="categorical", categories=2, hidden=(8,), temperature=0.5,
                       likelihood="bernoulli")
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.mul_(3)  # a decoder whose output depends strongly on the class
    x1, mask = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([True, True, False, False])
    exact = _categorical_conditional_mean(vae, x1, mask).float()
    imp = pyro_vae.impute(vae, x1.expand(100, 4), mask, method=method, seed=1, **kwargs)[:, ~mask]
    mean, se = imp.mean(0), imp.std(0) / 100 ** 0.5
    assert bool(((mean - exact).abs() < 4 * se).all()), (mean, exact, se)


def test_cli_impute_metropolis_on_a_categorical_run(tmp_path, capsys):
    import json

    from pyro_vae import checkpoint
    from pyro_vae.cli import main

    vae = pyro_vae.VAE((1, 8, 8), 3, latent="categorical", categories=4, hidden=(16,),
                       likelihood="continuous-bernoulli")
    run = tmp_path / "run"
    checkpoint.save(vae, run, data={"data": "digits", "data_dir": None, "binarize": "none", "seed": 0},
                    train={"elbo": "trace", "particles": 1})
    pyro.clear_param_store()
    assert main(["impute", str(run), "--method", "metropolis", "--iters", "4", "--n", "5", "--device", "cpu"]) == 0
    assert json.loads((run / "imputation.json").read_text())["num_points"] == 5
    capsys.readouterr()
