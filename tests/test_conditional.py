"""Conditional networks and priors, the semi-supervised M2 model and the conditional VAE."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate

from pyro_vae import ShapeError
from pyro_vae.errors import ConfigError, DataError
from pyro_vae.models.cvae import CVAE
from pyro_vae.models.ssvae import SSVAE, split_labelled
from pyro_vae.networks import ConcatMLP
from pyro_vae.priors import ClassConditionalNormal, ConditionalNormalPrior
from pyro_vae.train.semisupervised import fit_semisupervised

K, D, Z, B = 3, 4, 2, 5
ROOT = Path(__file__).resolve().parents[1]


def test_concat_mlp_broadcasts_enumerated_inputs():
    net = ConcatMLP([(D,), (K,)], (2, 3), hidden=(8,))
    x = torch.randn(B, D)
    y = F.one_hot(torch.arange(K), K).float().reshape(K, 1, K)  # an enumerated label: (K, 1, K)
    out = net(x, y)
    assert out.shape == (K, B, 2, 3)
    # Each enumerated value gives what the network gives on that label alone.
    assert torch.allclose(out[1], net(x, y[1].expand(B, K)), atol=1e-6)
    with pytest.raises(ShapeError, match="ConcatMLP input 1"):
        net(x, torch.randn(B, K + 1))
    with pytest.raises(ShapeError, match="2 tensors"):
        net(x)


def test_class_conditional_prior_indexes_by_label():
    prior = ClassConditionalNormal(K, Z)
    d = prior(torch.arange(K).reshape(K, 1))
    assert d.batch_shape == (K, 1) and d.event_shape == (Z,)
    assert torch.equal(d.mean[2, 0], prior.loc[2])


def test_conditional_prior_network_shapes():
    prior = ConditionalNormalPrior((6,), Z, hidden=(8,))
    d = prior(torch.randn(B, 6))
    assert d.batch_shape == (B,) and d.event_shape == (Z,)


@pytest.mark.parametrize("prior", [None, "class-conditional"])
def test_enumeration_sums_y_out_exactly(prior):
    """TraceEnum_ELBO with config_enumerate equals the explicit sum over classes,
    sum_k q(k|x) [log p(x, k, z_k) - log q(z_k | x, k) - log q(k | x)], on the same draws z_k."""
    ss = SSVAE((D,), K, Z, hidden=(8,), likelihood="normal", prior=prior, aux_weight=0.0)
    x = torch.randn(B, D)
    guide = config_enumerate(ss.guide, "parallel")
    pyro.set_rng_seed(1)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(ss.model, guide, x)

    pyro.set_rng_seed(1)
    gtrace = poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(x)
    z = gtrace.nodes["z"]["value"]
    assert z.shape == (K, B, Z)  # one draw of z per class and data point
    with torch.no_grad():
        log_qy = torch.log_softmax(ss.classifier(x), -1)  # (B, K)
        elbo = torch.zeros(())
        for k in range(K):
            yk = torch.full((B,), k)
            mtrace = poutine.trace(poutine.condition(ss.model, data={"z": z[k]})).get_trace(x, yk)
            mtrace.compute_log_prob()
            log_p = sum(mtrace.nodes[s]["log_prob"] for s in ("y", "z", "x"))  # (B,)
            log_qz = ss.encoder.distribution(x, F.one_hot(yk, K).float()).log_prob(z[k])
            elbo = elbo + (log_qy[:, k].exp() * (log_p - log_qz - log_qy[:, k])).sum()
    assert loss == pytest.approx(-float(elbo), rel=1e-5, abs=1e-4)


def _sample_sites(trace) -> set[str]:
    return {n for n, site in trace.nodes.items() if site["type"] == "sample"}


def test_ssvae_sites_with_and_without_labels():
    ss = SSVAE((D,), K, Z, hidden=(8,), likelihood="normal", aux_weight=2.0, name="ss")
    x, y = torch.randn(B, D), torch.randint(K, (B,))
    gtrace = poutine.trace(ss.guide).get_trace(x)
    mtrace = poutine.trace(poutine.replay(ss.model, trace=gtrace)).get_trace(x)
    assert _sample_sites(gtrace) == {"ss/data", "ss/y", "ss/z"}
    assert _sample_sites(mtrace) == {"ss/data", "ss/y", "ss/z", "ss/x"}
    labelled = poutine.trace(ss.model).get_trace(x, y)
    assert labelled.nodes["ss/y"]["is_observed"] and labelled.nodes["ss/y_aux"]["scale"] == 2.0
    assert "ss/y" not in poutine.trace(ss.guide).get_trace(x, y).nodes  # y observed: nothing to infer
    # Generation given labels: x is drawn, one per label.
    assert ss.model(None, torch.arange(K)).shape == (K, D)
    assert math.isfinite(Trace_ELBO().loss(ss.model, ss.guide, x, y))


def test_ssvae_rejects_bad_labels_and_arguments():
    ss = SSVAE((D,), K, Z, hidden=(8,), likelihood="normal")
    x = torch.randn(B, D)
    with pytest.raises(DataError, match="labels in 0..2"):
        ss.model(x, torch.full((B,), K))
    with pytest.raises(DataError, match="integer class labels"):
        ss.model(x, torch.zeros(B))
    with pytest.raises(ConfigError, match="aux_weight"):
        SSVAE((D,), K, Z, aux_weight=-1.0)
    with pytest.raises(ConfigError, match="prior"):
        SSVAE((D,), K, Z, prior="nope")


def test_split_labelled_takes_per_class_points():
    y = torch.arange(10).repeat(7)
    lab, unlab = split_labelled(y, 3, seed=0)
    assert torch.equal(torch.bincount(y[lab]), torch.full((10,), 3))
    assert len(unlab) == 40 and not set(lab.tolist()) & set(unlab.tolist())
    with pytest.raises(DataError, match="at least 8"):
        split_labelled(y, 8)


def test_cvae_sites_completions_and_training():
    cvae = CVAE((D,), (6,), Z, hidden=(8,), likelihood="normal", name="c")
    c, x = torch.randn(B, 6), torch.randn(B, D)
    gtrace = poutine.trace(cvae.guide).get_trace(c, x)
    assert gtrace.nodes["c/z"]["value"].shape == (B, Z)
    assert cvae.complete(c, num_samples=7).shape == (7, B, D)
    post = pyro.infer.Predictive(cvae.model, num_samples=3)(c)
    assert post["c/z"].shape == (3, B, Z) and post["c/x"].shape == (3, B, D)
    with pytest.raises(ConfigError, match="Predictive"):
        cvae.guide(c)
    with pytest.raises(DataError, match="batch size"):
        cvae.model(c, x[:2])
    svi = pyro.infer.SVI(cvae.model, cvae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(c, x) for _ in range(50)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("enumeration", ["parallel", "sequential", None])
def test_fit_semisupervised_runs_with_each_treatment_of_y(enumeration):
    ss = SSVAE((D,), K, Z, hidden=(8,), likelihood="normal", aux_weight=1.0)
    x, y = torch.randn(12, D), torch.arange(12) % K
    history = fit_semisupervised(ss, x[:6], y[:6], x[6:], epochs=2, batch_size=4, enumeration=enumeration)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h["loss_unlabelled"]) and math.isfinite(h["loss_labelled"]) for h in history)
    with pytest.raises(ConfigError, match="enumeration"):
        fit_semisupervised(ss, x[:6], y[:6], x[6:], epochs=1, enumeration="exact")


def _run_ss_example(tmp_path, *args: str) -> dict:
    spec = importlib.util.spec_from_file_location("ss_vae_example", ROOT / "examples" / "ss_vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--device", "cpu", "--threads", "1", "--out", str(tmp_path / "ss.json"),
                        "--plot", str(tmp_path / "ss.png"), *args])


@pytest.mark.slow
def test_semisupervised_beats_the_labelled_only_classifier_on_digits(tmp_path):
    """M2 with 10 labels per class on the 8x8 digits (examples/ss_vae.py defaults, seed 0, 30 epochs, about
    25 s of CPU): q(y|x) is more accurate on the 180 test digits than the same network trained on the 100
    labelled points alone. Measured: 0.922 vs 0.883. Seeded and deterministic on one platform; the margin is
    7 test digits, so a change of thread count or torch version could in principle flip a few predictions."""
    result = _run_ss_example(tmp_path)
    assert result["num_labelled"] == 100 and result["epochs_run"] == 30
    assert result["test_accuracy"] > result["baseline_test_accuracy"]


def test_semisupervised_beats_the_labelled_only_classifier_on_digits_fast(tmp_path):
    """The same comparison stopped after 15 epochs (about 12 s of CPU); measured 0.917 vs 0.883."""
    result = _run_ss_example(tmp_path, "--epochs", "15")
    assert result["epochs_run"] == 15
    assert result["test_accuracy"] > result["baseline_test_accuracy"]
