"""The training and evaluation tools take the model's named context (``context={"y": y}``): fit,
evaluate_elbo, log_likelihood, importance_log_weights, posterior_means, to_inference_data and gradient_samples on
a VAE conditioned on the digit label (encoder_context and decoder_context ``{"y": (10,)}``), and on a model/guide
pair around it.

Each comparison is deterministic: the tool against the same Pyro computation called by hand with the right rows
(the same seed, so the same draws), to float tolerance, and a hand computation with the rows shifted that differs,
so that a tool giving the points the wrong rows fails. False-failure rate zero; the loss-decrease test trains a
fixed seed.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

import pyro_vae
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.infer.variance import gradient_samples, gradient_statistics
from pyro_vae.models.context import check_context, declared_shapes

N, Z = 96, 3


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """``N`` binarized digits ``(N, 64)`` and their labels one-hot ``(N, 10)``."""
    train = pyro_vae.data.digits().train
    x = pyro_vae.data.binarize(train.x.flatten(1)[:N])
    y = F.one_hot(train.y[:N], 10).float()
    return x, y


def label_vae(seed: int = 0, **kw) -> pyro_vae.VAE:
    """A VAE whose encoder and decoder both take the label ``y``, built from ``seed`` with an empty store."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    kw.setdefault("hidden", (16,))
    return pyro_vae.VAE((64,), Z, encoder_context={"y": (10,)}, decoder_context={"y": (10,)}, **kw)


def shifted(y: torch.Tensor) -> torch.Tensor:
    """The rows of ``y`` moved by one point: every point given another point's label (most differ)."""
    return y.roll(1, dims=0)


def hand_log_weights(vae, x, y, k: int, batch_size: int) -> torch.Tensor:
    """``(N, k)`` log importance weights by hand: per batch, the guide traced under a plate of ``k`` particles
    with the batch's rows of ``y``, the model replayed, site log-densities summed per point. First one trace of
    the first batch, as the tools read the plate nesting off one (and draw its latents)."""
    out = []
    with torch.no_grad():
        g = poutine.trace(vae.guide).get_trace(x[:batch_size], y=y[:batch_size])
        poutine.trace(poutine.replay(vae.model, trace=g)).get_trace(x[:batch_size], y=y[:batch_size])
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i: i + batch_size], y[i: i + batch_size]
            with pyro.plate("particles", k, dim=-2):
                g = poutine.trace(vae.guide).get_trace(xb, y=yb)
                m = poutine.trace(poutine.replay(vae.model, trace=g)).get_trace(xb, y=yb)
            lw = sum(s["fn"].log_prob(s["value"]) for s in m.nodes.values() if s["type"] == "sample"
                     and s["name"] != "data") - g.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"])
            out.append(lw.reshape(k, -1).T)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- fit
def test_a_label_conditioned_vae_trains_under_fit_with_context(digits):
    x, y = digits
    vae = label_vae()
    history = pyro_vae.fit(vae, x[:80], context={"y": y[:80]}, val_data=x[80:], val_context={"y": y[80:]},
                           epochs=6, batch_size=16, lr=1e-2, progress=False)
    elbos = [r["train_elbo"] for r in history.epochs]
    assert elbos[-1] > elbos[0] + 5.0
    assert all(math.isfinite(r["val_elbo"]) for r in history.epochs)


def test_fit_with_context_matches_svi_step_for_step(digits):
    x, y = digits
    n, batch, seed = N, 32, 5
    vae = label_vae()
    pyro_vae.fit(vae, x, context={"y": y}, epochs=2, batch_size=batch, lr=1e-2, seed=seed, progress=False)
    fitted = {k: v.detach().clone() for k, v in vae.state_dict().items()}

    vae = label_vae()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    pyro.set_rng_seed(seed)
    for epoch in (1, 2):  # fit's shuffles: torch.randperm from a generator seeded seed + epoch
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for idx in perm.split(batch):
            svi.step(x[idx], num_data=n, y=y[idx])
    reference = vae.state_dict()
    moved = False
    for name, value in reference.items():
        assert torch.allclose(fitted[name], value, atol=1e-6, rtol=1e-5), name
        moved |= not torch.equal(value, label_vae().state_dict()[name])
    assert moved


def test_resume_with_context_continues_exactly(digits, tmp_path):
    x, y = digits
    kwargs = dict(context={"y": y}, batch_size=32, lr=1e-2, seed=3, progress=False)
    vae = label_vae()
    pyro_vae.fit(vae, x, epochs=2, **kwargs)
    whole = vae.state_dict()
    pyro_vae.fit(label_vae(), x, epochs=1, checkpoint_dir=tmp_path / "run", **kwargs)
    vae = label_vae(seed=9)  # other initial values: they come from the checkpoint; the context is passed again
    pyro_vae.fit(vae, x, epochs=2, checkpoint_dir=tmp_path / "run", resume_from=tmp_path / "run", **kwargs)
    for name, value in vae.state_dict().items():
        assert torch.equal(whole[name], value), name


def test_a_missing_context_name_is_the_vaes_clear_error(digits):
    x, y = digits
    with pytest.raises(ConfigError, match=r"encoder_context names \['y'\]"):
        pyro_vae.fit(label_vae(), x, epochs=1, progress=False)
    with pytest.raises(ConfigError, match=r"encoder_context names \['y'\]"):
        pyro_vae.evaluate_elbo(label_vae(), x)
    with pytest.raises(ConfigError, match="val_context"):  # the training rows cannot score the validation data
        pyro_vae.fit(label_vae(), x, context={"y": y}, val_data=x[:10], epochs=1, progress=False)
    with pytest.raises(ConfigError, match="val_data"):
        pyro_vae.fit(label_vae(), x, context={"y": y}, val_context={"y": y[:10]}, epochs=1, progress=False)
    with pytest.raises(ConfigError, match="context"):
        pyro_vae.fit(label_vae(), x, context=[y], epochs=1, progress=False)


def test_a_context_value_of_the_wrong_size_is_refused_naming_name_sizes_and_fix(digits, tmp_path):
    x, y = digits
    vae = label_vae()
    pattern = rf"context\['y'\]: expected one row per data point: a first dimension of {N}.*found shape " \
              rf"\({N - 1}, 10\): {N - 1} rows\. Fix: pass the y rows"
    with pytest.raises(DataError, match=pattern):
        pyro_vae.fit(vae, x, context={"y": y[1:]}, epochs=1, progress=False, checkpoint_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    with pytest.raises(DataError, match=pattern):
        pyro_vae.evaluate_elbo(vae, x, context={"y": y[1:]})
    with pytest.raises(DataError, match=pattern):
        pyro_vae.log_likelihood(vae, x, 4, context={"y": y[1:]})
    with pytest.raises(DataError, match=r"context\['y'\]: expected one row per data point: a first dimension "
                                        r"of 8"):
        gradient_samples(vae, x[:8], num_samples=2, context={"y": y[:9]})
    with pytest.raises(DataError, match=r"val_context\['y'\]"):
        pyro_vae.fit(vae, x, context={"y": y}, val_data=x[:10], val_context={"y": y[:11]}, epochs=1,
                     progress=False)


def test_check_context_reads_the_declared_shapes_and_passes_global_values(digits):
    x, y = digits
    vae = label_vae()
    assert declared_shapes(vae) == {"y": (10,)}
    one = y[0]  # one global label for every point: no data dimension
    assert check_context("context", {"y": one, "sigma": 0.5}, N, declared_shapes(vae))["y"] is one
    assert check_context("context", None, N) == {}
    # a global label reaches every point: evaluate_elbo takes it whole
    assert math.isfinite(pyro_vae.evaluate_elbo(vae, x[:8], context={"y": one}))


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluate_elbo_with_context_equals_trace_elbo_by_hand_on_the_right_rows(digits):
    x, y = digits
    vae = label_vae()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    xs, ys = x[perm], y[perm]  # the points in another order: each point keeps its label
    pyro.set_rng_seed(4)
    got = pyro_vae.evaluate_elbo(vae, xs, context={"y": ys}, batch_size=40)

    def by_hand(labels):
        pyro.set_rng_seed(4)
        with torch.no_grad():
            return -sum(Trace_ELBO().loss(vae.model, vae.guide, xs[i: i + 40], y=labels[i: i + 40])
                        for i in range(0, N, 40)) / N

    assert got == pytest.approx(by_hand(ys), rel=1e-6)
    assert abs(got - by_hand(shifted(ys))) > 1e-3  # the wrong rows give another value


def test_log_likelihood_with_context_equals_the_importance_weights_by_hand(digits):
    x, y = digits
    vae = label_vae()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(2))
    xs, ys = x[perm], y[perm]
    k, b = 8, 40
    pyro.set_rng_seed(6)
    ll = pyro_vae.log_likelihood(vae, xs, k, batch_size=b, chunk_size=k, context={"y": ys}, return_log_weights=True)
    pyro.set_rng_seed(6)
    lw = hand_log_weights(vae, xs, ys, k, b)
    assert torch.allclose(ll.log_weights, lw, atol=1e-4)
    assert torch.allclose(ll.per_point, lw.logsumexp(1) - math.log(k), atol=1e-4)
    pyro.set_rng_seed(6)
    assert not torch.allclose(ll.log_weights, hand_log_weights(vae, xs, shifted(ys), k, b), atol=1e-2)
    # importance_log_weights on one batch: the same weights
    pyro.set_rng_seed(6)
    w = pyro_vae.evaluation.importance_log_weights(vae, xs[:b], k, chunk_size=k, context={"y": ys[:b]})
    assert torch.allclose(w, lw[:b], atol=1e-4)


def test_posterior_means_and_active_units_follow_the_points(digits):
    x, y = digits
    vae = label_vae()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    means = pyro_vae.evaluation.posterior_means(vae, x, context={"y": y}, batch_size=40)
    assert torch.allclose(pyro_vae.evaluation.posterior_means(vae, x[perm], context={"y": y[perm]}, batch_size=32),
                          means[perm], atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(means, vae.encode(x, y=y), atol=1e-6)
    assert 0 <= pyro_vae.evaluation.active_units(vae, x, context={"y": y}) <= Z


def test_to_inference_data_with_context(digits):
    x, y = digits
    vae = label_vae()
    xs, ys = x[:40], y[:40]
    idata = pyro_vae.to_inference_data(vae, xs, 30, seed=8, context={"y": ys})
    assert idata.posterior["z"].shape == (1, 30, 40, Z)
    pyro.set_rng_seed(8)
    lw = hand_log_weights(vae, xs, ys, 30, 40)
    got = torch.as_tensor(idata.sample_stats["log_weight"].values[0]).T
    assert torch.allclose(got, lw, atol=1e-4)


def test_a_model_guide_pair_takes_the_context_as_keyword_arguments(digits):
    x, y = digits
    vae = label_vae(name="vae")

    def model(x, num_data=None, y=None):
        return vae.model(x, num_data=num_data, y=y)

    def guide(x, num_data=None, y=None):
        return vae.guide(x, num_data=num_data, y=y)

    pair = pyro_vae.ModelGuidePair(model, guide, modules=vae)
    pyro_vae.fit(pair, x, context={"y": y}, epochs=1, batch_size=32, progress=False)
    pyro.set_rng_seed(3)
    got = pyro_vae.evaluate_elbo(pair, x, context={"y": y}, batch_size=40)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        hand = -sum(Trace_ELBO().loss(model, guide, x[i: i + 40], num_data=N, y=y[i: i + 40]) * len(x[i: i + 40]) / N
                    for i in range(0, N, 40)) / N
    assert got == pytest.approx(hand, rel=1e-6)
    ll = pyro_vae.log_likelihood(pair, x, 4, context={"y": y})
    assert ll.per_point.shape == (N,) and math.isfinite(ll.mean)
    idata = pyro_vae.to_inference_data(pair, x[:40], 30, context={"y": y[:40]})
    assert idata.posterior["vae.z"].shape == (1, 30, 40, Z)
    with pytest.raises(DataError, match=r"context\['y'\]"):  # the pair's VAE declares y per data point
        pyro_vae.evaluate_elbo(pair, x, context={"y": y[:5]})


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("method", ["loop", "vectorized"])
def test_gradient_samples_with_context_equal_those_of_the_model_with_the_rows_bound(digits, method):
    x, y = digits
    xb, yb = x[:8], y[:8]
    vae = label_vae()

    def bound(labels):
        return pyro_vae.ModelGuidePair(lambda x, num_data=None: vae.model(x, y=labels),
                                       lambda x, num_data=None: vae.guide(x, y=labels), modules=vae)

    got = gradient_samples(vae, xb, num_samples=4, method=method, seed=0, context={"y": yb})
    assert got.shape[0] == 4 and bool(torch.isfinite(got).all())
    assert torch.allclose(got, gradient_samples(bound(yb), xb, num_samples=4, method=method, seed=0), atol=1e-5)
    assert not torch.allclose(got, gradient_samples(bound(shifted(yb)), xb, num_samples=4, method=method, seed=0),
                              atol=1e-3)
    stats = gradient_statistics(vae, xb, num_samples=4, method=method, seed=0, context={"y": yb})
    assert stats["all"]["num_samples"] == 4
    with pytest.raises(ConfigError, match=r"\['y'\] in both"):
        gradient_samples(vae, xb, num_samples=2, method=method, context={"y": yb}, y=yb)


def test_amortization_gap_with_context(digits):
    x, y = digits
    gap = pyro_vae.evaluation.amortization_gap(label_vae(), x[:8], num_steps=5, num_eval_samples=8,
                                               context={"y": y[:8]})
    assert gap.gap_per_point.shape == (8,) and math.isfinite(gap.gap)


def test_a_per_point_value_of_a_likelihood_follows_the_batches():
    """A context name no network declares: a tensor of N rows is per data point (each batch its rows), any other
    value global."""
    pyro.clear_param_store()
    n, d = 30, 5

    def likelihood(out, s, **context):
        return pyro.distributions.Normal(out, s[..., None] if s.dim() else s).to_event(1)

    vae = pyro_vae.VAE((d,), 2, hidden=(8,), likelihood=likelihood)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    s = torch.linspace(0.2, 3.0, n)
    pyro.set_rng_seed(1)
    got = pyro_vae.evaluate_elbo(vae, x, context={"s": s}, batch_size=7)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        hand = -sum(Trace_ELBO().loss(vae.model, vae.guide, x[i: i + 7], s=s[i: i + 7]) for i in range(0, n, 7)) / n
    assert got == pytest.approx(hand, rel=1e-6)
    assert math.isfinite(pyro_vae.evaluate_elbo(vae, x, context={"s": torch.tensor(0.5)}))  # global
