"""Generation: prior, aggregate-posterior and fitted-mixture sampling, reconstructions, lerp/slerp
interpolation, traversals and the ``sample`` / ``interpolate`` commands.

Fast tests use linear-Gaussian VAEs with a known exact posterior (see tests/test_evaluation.py), so the
aggregate posterior is known: on data from the model's own marginal it equals the prior; on data from a
compact cluster it does not. Statistical checks are seeded and use 4 standard errors (false-failure rate
below 1e-4 per comparison for an unseeded run).
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from test_evaluation import D, d, linear_gaussian, make_run
from torch.distributions import MultivariateNormal

import pyro_vae
from pyro_vae import generation
from pyro_vae.errors import ConfigError


def _nn_distance(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Distance from each sample to its nearest reference point, ``(n,)``."""
    return torch.cdist(samples.flatten(1), reference.flatten(1)).min(1).values


def test_prior_samples_have_the_model_mean():
    vae, marginal, _ = linear_gaussian()
    x = vae.sample(4000)
    assert x.shape == (4000, D)
    decoded_var = torch.diagonal(marginal.covariance_matrix) - 0.25  # Var(Wz) = diag(WW^T); s^2 = 0.25
    se = (decoded_var / 4000).sqrt()
    assert torch.all((x.mean(0) - marginal.mean).abs() < 4 * se)
    assert generation.sample(vae, 5, "prior").shape == (5, D)


def test_aggregate_posterior_of_the_models_own_data_is_the_prior():
    # With the exact posterior as guide and data from p(x), mean_n p(z | x_n) -> p(z) = N(0, I).
    vae, marginal, _ = linear_gaussian()
    data = marginal.sample((4000,))
    z = generation.sample_latents(vae, 4000, "aggregate", data=data)
    assert z.shape == (4000, d)
    assert torch.all(z.mean(0).abs() < 4 / math.sqrt(4000))
    assert torch.all((z.var(0) - 1).abs() < 4 * math.sqrt(2 / 4000))


def test_aggregate_and_mixture_samples_land_closer_to_held_out_data_than_prior_samples():
    """Data from a compact cluster (latents N(m, 0.2^2 I) with |m| = 2) under a VAE with a N(0, I) prior:
    the aggregate posterior sits on the cluster, the prior does not, so decoded aggregate (and fitted
    mixture) samples are nearer to held-out data by many standard errors."""
    vae, _, _ = linear_gaussian()
    w, b = vae.decoder.weight.detach(), vae.decoder.bias.detach()
    m = torch.tensor([2.0, -1.0, 1.0]) * 2 / math.sqrt(6)
    true = MultivariateNormal(w @ m + b, 0.04 * w @ w.T + 0.25 * torch.eye(D))
    train, held_out = true.sample((1000,)), true.sample((500,))
    n = 400
    dist = {src: _nn_distance(generation.sample(vae, n, src, data=train, n_components=3), held_out)
            for src in ("prior", "aggregate", "mixture")}
    for src in ("aggregate", "mixture"):
        diff = dist["prior"].mean() - dist[src].mean()
        se = math.sqrt(dist["prior"].var() / n + dist[src].var() / n)
        assert diff > 4 * se, src


def test_aggregate_and_mixture_samplers_live_in_generation_and_vae_sample_delegates_with_a_warning():
    vae, marginal, _ = linear_gaussian()
    data = marginal.sample((50,))
    assert generation.sample(vae, 7, source="aggregate", data=data).shape == (7, D)
    assert generation.sample(vae, 7, source="mixture", data=data, n_components=2).shape == (7, D)
    gmm = generation.fit_mixture(vae, data, n_components=2)
    assert generation.sample(vae, 9, "mixture", mixture=gmm).shape == (9, D)
    with pytest.raises(ConfigError, match="data"):
        generation.sample(vae, 3, source="aggregate")
    for source in ("aggregate", "mixture"):  # VAE.sample delegates for one release, naming the function
        with pytest.warns(DeprecationWarning, match=rf"pyro_vae\.generation\.sample\(vae, n, source='{source}'"):
            assert vae.sample(7, source=source, data=data).shape == (7, D)
    with pytest.raises(ConfigError, match="source"):
        generation.sample(vae, 3, "posterior", data=data)
    with pytest.raises(ConfigError, match="n"):
        generation.sample(vae, 0)


def test_reconstruct_decodes_the_posterior_mean():
    vae, marginal, posterior = linear_gaussian()
    x = marginal.sample((5,))
    expected = vae.decoder(posterior(x).mean).detach()
    assert torch.allclose(generation.reconstruct(vae, x), expected, atol=1e-5)
    assert torch.allclose(generation.reconstruct(vae, x), vae.reconstruct(x), atol=1e-6)
    assert generation.reconstruct(vae, x, draw_z=True).shape == x.shape


def test_lerp_and_slerp_paths():
    z0, z1 = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    t = torch.linspace(0, 1, 5)
    for f in (generation.lerp, generation.slerp):
        path = f(z0, z1, t)
        assert path.shape == (1, 5, 2)
        assert torch.allclose(path[:, 0], z0) and torch.allclose(path[:, -1], z1, atol=1e-6)
    assert torch.allclose(generation.lerp(z0, z1, t)[0, 2], torch.tensor([1.5, 1.5]))
    # slerp between equal-norm points keeps the norm; the midpoint is at 45 degrees
    path = generation.slerp(z0, z1, t)
    assert torch.allclose(path.norm(dim=-1), torch.full((1, 5), 3.0), atol=1e-5)
    assert torch.allclose(path[0, 2], torch.tensor([3.0, 3.0]) / math.sqrt(2), atol=1e-5)
    # parallel endpoints fall back to lerp instead of dividing by sin(0)
    same = generation.slerp(z0, 2 * z0, t)
    assert torch.isfinite(same).all() and torch.allclose(same, generation.lerp(z0, 2 * z0, t))


def test_interpolate_and_traverse_shapes_and_values():
    vae, marginal, posterior = linear_gaussian()
    x = marginal.sample((4,))
    paths = generation.interpolate(vae, x[:2], x[2:], steps=6, method="lerp")
    assert paths.shape == (2, 6, D)
    assert torch.allclose(paths[:, 0], vae.reconstruct(x[:2]), atol=1e-5)
    assert torch.allclose(paths[:, -1], vae.reconstruct(x[2:]), atol=1e-5)
    assert generation.interpolate(vae, x[0], x[1], steps=3).shape == (3, D)
    values = torch.tensor([-1.0, 0.0, 1.0])
    grid = generation.traverse(vae, x[0], values=values)
    assert grid.shape == (d, 3, D)
    w = vae.decoder.weight.detach()
    for j in range(d):  # a linear decoder moves along column j of W only
        assert torch.allclose(grid[j, 2] - grid[j, 1], w[:, j], atol=1e-5)
    assert generation.traverse(vae, dims=[1]).shape == (1, 9, D)
    with pytest.raises(ConfigError, match="dims"):
        generation.traverse(vae, dims=[d])
    with pytest.raises(ConfigError, match="method"):
        generation.interpolate(vae, x[0], x[1], method="cubic")


def _categorical_vae(straight_through: bool = False) -> pyro_vae.VAE:
    return pyro_vae.VAE((16,), 3, latent="categorical", categories=4, hidden=(16,), likelihood="bernoulli",
                        temperature=0.3, straight_through=straight_through)


def _decoded(vae, z):
    """What the VAE's likelihood mean is at log-space latents z, computed by hand: sigmoid(decoder(exp z))."""
    return torch.sigmoid(vae.decoder(z.exp().reshape(*z.shape[:-2], -1)))


def test_categorical_latents_sample_from_every_source():
    x = torch.bernoulli(torch.full((20, 16), 0.3))
    vae = _categorical_vae()
    z = generation.sample_latents(vae, 6, "prior")  # hard classes, in log space
    assert z.shape == (6, 3, 4) and torch.equal(z.exp().sum(-1), torch.ones(6, 3))
    assert bool(((z == 0) | (z == -math.inf)).all())
    z = generation.sample_latents(vae, 6, "aggregate", data=x)  # relaxed draws of q(z | x), in log space
    assert z.shape == (6, 3, 4) and torch.allclose(z.logsumexp(-1), torch.zeros(6, 3), atol=1e-5)
    assert generation.sample(vae, 5, "prior").shape == (5, 16)
    assert generation.sample(vae, 5, "aggregate", data=x).shape == (5, 16)
    with pytest.raises(ConfigError, match="categorical latent"):
        generation.sample(vae, 5, "mixture", data=x)


@pytest.mark.parametrize("draw_z", [False, True])
def test_categorical_reconstructions_decode_what_the_model_decodes(draw_z):
    x = torch.bernoulli(torch.full((5, 16), 0.3))
    vae = _categorical_vae()
    pyro.set_rng_seed(1)
    out = generation.reconstruct(vae, x, draw_z=draw_z)
    pyro.set_rng_seed(1)
    z = generation.posterior_samples(vae, x) if draw_z else vae.encode(x)
    assert torch.allclose(out, _decoded(vae, z), atol=1e-6)
    if not draw_z:  # the class probabilities q(c | x)
        assert torch.allclose(z.exp(), torch.softmax(vae.encoder.net(x).reshape(5, 3, 4), -1), atol=1e-6)
        assert torch.allclose(vae.reconstruct(x), out)


@pytest.mark.parametrize("method", ["lerp", "slerp"])
def test_categorical_interpolation_stays_on_the_simplex(method):
    x = torch.bernoulli(torch.full((6, 16), 0.3), generator=torch.Generator().manual_seed(3))
    vae = _categorical_vae()
    paths = generation.interpolate(vae, x[:3], x[3:], steps=5, method=method)
    assert paths.shape == (3, 5, 16)
    assert torch.allclose(paths[:, 0], vae.reconstruct(x[:3]), atol=1e-6)
    assert torch.allclose(paths[:, -1], vae.reconstruct(x[3:]), atol=1e-6)
    # between two hard classes: lerp and the Fisher-Rao geodesic both pass through (1/2, 1/2) at t = 1/2;
    # at t = 1/4 lerp gives (3/4, 1/4), the geodesic (cos^2(pi/8), sin^2(pi/8))
    p0, p1 = torch.tensor([[[1.0, 0.0]]]).log(), torch.tensor([[[0.0, 1.0]]]).log()
    path = generation._simplex_path(p0, p1, torch.tensor([0.0, 0.25, 0.5, 1.0]), method).exp()[0, :, 0]
    quarter = [0.75, 0.25] if method == "lerp" else [math.cos(math.pi / 8) ** 2, math.sin(math.pi / 8) ** 2]
    expected = torch.tensor([[1.0, 0.0], quarter, [0.5, 0.5], [0.0, 1.0]])
    assert torch.allclose(path, expected, atol=1e-6)


def test_categorical_traversals_set_one_variable_to_each_class():
    x = torch.bernoulli(torch.full((1, 16), 0.3))
    vae = _categorical_vae()
    grid = generation.traverse(vae, x[0])
    assert grid.shape == (3, 4, 16)
    base = vae.encode(x)[0]
    z = base.clone()
    z[1] = torch.tensor([0.0, 1.0, 0.0, 0.0]).log()  # variable 1 set to class 1
    assert torch.allclose(grid[1, 1], _decoded(vae, z), atol=1e-6)
    assert generation.traverse(vae, dims=[2], values=[3, 0]).shape == (1, 2, 16)  # around the prior
    with pytest.raises(ConfigError, match="class indices"):
        generation.traverse(vae, x[0], values=[0.5])


def test_cli_interpolate_on_a_categorical_run(tmp_path, capsys):
    from pyro_vae import checkpoint
    from pyro_vae.cli import main

    vae = pyro_vae.VAE((1, 8, 8), 3, latent="categorical", categories=4, hidden=(16,),
                       likelihood="continuous-bernoulli")
    run = tmp_path / "run"
    checkpoint.save(vae, run, data={"data": "digits", "data_dir": None, "binarize": "none", "seed": 0},
                    train={"elbo": "trace", "particles": 1})
    pyro.clear_param_store()
    assert main(["interpolate", str(run), "--pairs", "2", "--steps", "4", "--device", "cpu"]) == 0
    assert (run / "interpolations.png").is_file() and (run / "traversals.png").is_file()
    assert main(["sample", str(run), "--from", "aggregate", "--n", "4", "--device", "cpu"]) == 0
    capsys.readouterr()


def test_cli_sample_from_each_source_and_interpolate(tmp_path, capsys):
    from pyro_vae.cli import main

    run = make_run(tmp_path / "run")
    for source, name in (("prior", "samples.png"), ("aggregate", "samples-aggregate.png"),
                         ("mixture", "samples-mixture.png")):
        assert main(["sample", str(run), "--from", source, "--n", "16", "--components", "3",
                     "--device", "cpu"]) == 0
        assert (run / name).is_file()
    assert main(["interpolate", str(run), "--pairs", "3", "--steps", "5", "--device", "cpu"]) == 0
    assert (run / "interpolations.png").is_file() and (run / "traversals.png").is_file()
    assert main(["interpolate", str(run), "--steps", "1"]) == 2
    capsys.readouterr()


@pytest.mark.slow
def test_trained_digits_model_aggregate_samples_are_closer_to_held_out_digits():
    """A digits VAE trained with beta = 0.2 (a weak pull of q towards the prior, so the aggregate posterior
    differs from it): aggregate-posterior samples are nearer to held-out digits than prior samples."""
    splits = pyro_vae.data.load("digits")
    train, test = splits.train.x.flatten(1), splits.test.x.flatten(1)
    vae = pyro_vae.VAE((64,), 8, hidden=(128,), likelihood="continuous-bernoulli", beta=0.2)
    with pyro.validation_enabled(False):
        pyro_vae.fit(vae, train, elbo="meanfield", epochs=30, batch_size=64, lr=3e-3, progress=False)
    n = 300
    prior = _nn_distance(generation.sample(vae, n, "prior"), test)
    aggregate = _nn_distance(generation.sample(vae, n, "aggregate", data=train), test)
    se = math.sqrt(prior.var() / n + aggregate.var() / n)
    assert prior.mean() - aggregate.mean() > 4 * se


def test_plots_draw_non_image_data(tmp_path):
    from pyro_vae import plots

    vae, marginal, _ = linear_gaussian()
    x = marginal.sample((4,))
    paths = generation.interpolate(vae, x[:2], x[2:], steps=4)
    assert plots.save_interpolations(paths, tmp_path / "i.png").stat().st_size > 0
    values = [-1.0, 0.0, 1.0]
    assert plots.save_traversals(generation.traverse(vae, x[0], values=values), tmp_path / "t.png",
                                 values).stat().st_size > 0
    mask = torch.tensor([True, False] * 3)
    assert plots.save_imputations(x, mask, x, tmp_path / "m.png").stat().st_size > 0
    assert plots.save_pareto_k(torch.tensor([0.1, 0.6, 0.9]), tmp_path / "k.png").stat().st_size > 0


def test_image_grid_lays_images_out_row_by_row_in_a_white_frame():
    import numpy as np

    from pyro_vae import plots

    h, w, pad = 2, 3, 1
    images = np.stack([np.full((h, w), k / 10) for k in range(5)])
    grid = plots.image_grid(images, ncol=3, pad=pad)
    assert grid.dtype == np.float32 and grid.shape == (2 * (h + pad) + pad, 3 * (w + pad) + pad)
    for k in range(5):
        r, c = divmod(k, 3)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        assert np.all(grid[top: top + h, left: left + w] == np.float32(k / 10))
        grid[top: top + h, left: left + w] = 1.0
    assert np.all(grid == 1.0)  # the frame, the gaps and the empty sixth place are white
    assert plots.image_grid(images).shape == (2 * (h + pad) + pad, 3 * (w + pad) + pad)  # ceil(sqrt(5)) = 3 a row
