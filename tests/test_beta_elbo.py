"""A number called ELBO is the ELBO, KL weight 1, whatever ``beta`` the VAE trains with; the beta-weighted
training objective is reported under its own name.

Statistical tests here compare Monte Carlo estimates with the linear-Gaussian VAE's closed forms at 4 standard
errors of the estimate (two-sided normal false-failure rate about 6e-5 per comparison), with fixed seeds.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_vae
from pyro_vae.models.linear_gaussian import exact_elbo, exact_log_likelihood, linear_gaussian_vae

ROOT = Path(__file__).resolve().parents[1]


def _data(n=200, seed=0):
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed)) * 2


def _elbo_se(vae, x):
    """Standard error of a one-particle Monte Carlo ELBO over ``x``'s points: it bounds the error of the
    mean-field and many-particle estimates used below, which have less variance."""
    with torch.no_grad():
        per_point = pyro_vae.log_likelihood(vae, x, 1).elbo_per_point
    return float(per_point.std() / math.sqrt(len(x)))


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
@pytest.mark.parametrize("beta", [0.1, 0.25, 4.0])
def test_evaluate_elbo_is_the_elbo_whatever_the_kl_weight(elbo, beta):
    x = _data()
    vae = linear_gaussian_vae(5, 2, orthogonal=False)
    vae.beta = beta
    with torch.no_grad():
        exact = float(exact_elbo(vae, x).mean())
    pyro.set_rng_seed(1)
    got = pyro_vae.evaluate_elbo(vae, x, elbo=elbo, num_particles=64)
    assert abs(got - exact) < 4 * _elbo_se(vae, x)
    assert vae.beta == beta  # restored
    vae.beta = 1.0
    pyro.set_rng_seed(1)
    assert pyro_vae.evaluate_elbo(vae, x, elbo=elbo, num_particles=64) == got  # the same draws, the same number


def test_the_beta_objective_differs_from_the_elbo_by_the_weighted_kl():
    """The history's train_objective is E[log p(x|z)] - beta KL, its train_elbo E[log p(x|z)] - KL; with the
    learning rate 0 the parameters stay put and both are checked against the closed forms."""
    x = _data(256)
    vae = linear_gaussian_vae(5, 2, orthogonal=False)
    beta = 0.25
    vae.beta = beta
    with torch.no_grad():
        elbo = exact_elbo(vae, x)
        m, scale = vae.encoder(x)
        kl = 0.5 * (scale.pow(2) + m.pow(2) - 1 - scale.pow(2).log()).sum(-1)
    exact_objective = float((elbo + (1 - beta) * kl).mean())
    history = pyro_vae.fit(vae, x, elbo="meanfield", epochs=40, batch_size=256, lr=1e-12, device="cpu",
                           progress=False, seed=0)
    train_elbo = sum(history["train_elbo"]) / len(history)
    objective = sum(history["train_objective"]) / len(history)
    se = _elbo_se(vae, x) / math.sqrt(len(history))
    assert abs(train_elbo - float(elbo.mean())) < 4 * se
    assert abs(objective - exact_objective) < 4 * se
    assert abs((objective - train_elbo) - (1 - beta) * float(kl.mean())) < 4 * math.sqrt(2) * se
    assert set(history["beta"]) == {beta}


class _StepKL:
    """Sums, over the optimizer steps of ``fit``, the analytic KL(q(z|x) || N(0, I)) of each step's minibatch at
    the parameters the step's gradient was taken at (read in the optimizer's step pre-hook; the minibatch is the
    encoder's last input with gradients on, the step's own forward pass), per epoch."""

    def __init__(self, vae):
        self.vae, self.batch, self.per_epoch, self.epoch = vae, None, [], 0.0
        vae.encoder.register_forward_hook(self._record)

    def _record(self, module, args, out):
        if torch.is_grad_enabled():
            self.batch = args[0].detach()

    def _before_update(self, optimizer, args, kwargs):
        with torch.no_grad():
            m, scale = self.vae.encoder(self.batch)
            self.epoch += float((0.5 * (scale.pow(2) + m.pow(2) - 1) - scale.log()).double().sum())

    def on_fit_start(self, state):
        state.optimizer.register_step_pre_hook(self._before_update)

    def on_epoch_end(self, state):
        self.per_epoch.append(self.epoch)
        self.epoch = 0.0


def test_train_objective_and_train_elbo_are_measured_at_the_same_parameters_with_the_same_draws():
    """With beta = 0.5 under TraceMeanField_ELBO (analytic KL), the step's objective and the reported ELBO of
    each minibatch are evaluated at the same parameters (before the update) from the same random state, so they
    share the decoder's log-likelihood term exactly and differ by (1 - beta) times the analytic KL, which is >= 0.
    Summed over an epoch: train_objective - train_elbo = (1 - beta) KL / N to float precision, and
    train_objective >= train_elbo in every epoch. (The user's case: the continuous Bernoulli VAE on digits.)"""
    beta = 0.5
    x = pyro_vae.data.load("digits").train.x.flatten(1)[:600]
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = pyro_vae.VAE((64,), 8, hidden=(64,), likelihood="continuous-bernoulli", beta=beta)
    kl = _StepKL(vae)
    history = pyro_vae.fit(vae, x, epochs=4, batch_size=128, lr=3e-3, elbo="meanfield", device="cpu",
                           progress=False, seed=0, callbacks=[kl])
    assert len(kl.per_epoch) == len(history) == 4
    for record, kl_sum in zip(history.epochs, kl.per_epoch, strict=True):
        assert record["train_objective"] >= record["train_elbo"], record
        expected = (1 - beta) * kl_sum / len(x)
        assert expected > 0.1
        assert record["train_objective"] - record["train_elbo"] == pytest.approx(expected, rel=1e-5, abs=1e-5)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(beta=st.floats(0.02, 8.0), schedule=st.sampled_from(["vae", "constant", "warmup"]))
def test_reported_elbos_never_exceed_log_px(beta, schedule):
    """Under any KL weight or schedule, every ELBO fit reports for the validation data is at most the exact
    log p(x) of the parameters it was computed with (plus 4 standard errors), and best.json's choice uses it."""
    pyro.clear_param_store()
    x, xv = _data(256, 0), _data(128, 1)
    vae = linear_gaussian_vae(5, 2, orthogonal=False)
    callbacks = []
    if schedule == "vae":
        vae.beta = beta
    elif schedule == "constant":
        callbacks = [pyro_vae.schedules.ConstantBeta(beta)]
    else:
        callbacks = [pyro_vae.schedules.KLWarmup(4, end=beta)]

    class Check:
        def on_epoch_end(self, state):
            record = state.history.epochs[-1]
            with torch.no_grad():
                log_px = float(exact_log_likelihood(state.vae, xv).mean())
            assert record["val_elbo"] <= log_px + 4 * _elbo_se(state.vae, xv)

    pyro_vae.fit(vae, x, val_data=xv, epochs=3, batch_size=64, lr=1e-2, device="cpu", progress=False, seed=0,
                 callbacks=[*callbacks, Check()])
    with torch.no_grad():
        log_px = float(exact_log_likelihood(vae, xv).mean())
        elbo = float(exact_elbo(vae, xv).mean())
    pyro.set_rng_seed(3)
    reported = pyro_vae.evaluate_elbo(vae, xv, num_particles=32)
    assert abs(reported - elbo) < 4 * _elbo_se(vae, xv) and elbo <= log_px


def test_amortization_gap_optimizes_the_elbo_not_the_beta_objective():
    """Per-point guides optimized against the beta-weighted objective end at a worse ELBO than the encoder at
    the exact posterior; optimized against the ELBO they cannot (up to noise) beat log p(x)."""
    from pyro_vae.models.linear_gaussian import set_exact_guide

    x = _data(20)
    vae = linear_gaussian_vae(5, 2, orthogonal=True)
    set_exact_guide(vae)
    vae.beta = 0.1
    gap = pyro_vae.amortization_gap(vae, x, num_steps=100, num_eval_samples=512, seed=0)
    with torch.no_grad():
        log_px = exact_log_likelihood(vae, x)
    # the encoder is the exact posterior: its ELBO is log p(x), and no optimized guide does better
    torch.testing.assert_close(gap.elbo_amortized, log_px, atol=1e-3, rtol=0)
    assert float(gap.elbo_optimized.mean()) <= float(log_px.mean()) + 1e-3
    assert abs(gap.gap) < 0.05


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "pyro_vae", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_metrics_hold_one_labelled_value_per_quantity_under_a_kl_weight(tmp_path):
    out = tmp_path / "run"
    proc = _cli("train", "--data", "digits", "--z-dim", "2", "--epochs", "2", "--hidden", "32", "--beta", "0.2",
                "--likelihood", "continuous-bernoulli", "--elbo", "meanfield", "--device", "cpu", "--no-progress",
                "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"test ELBO {metrics['test_elbo']:.2f}" in proc.stdout
    for key in ("train_elbo", "val_elbo", "test_elbo", "train_objective"):
        assert metrics["how"][key]["command"] == "train" and metrics["how"][key]["points"] > 0
    assert "KL weight 1" in metrics["how"]["test_elbo"]["estimate"]
    assert "beta = 0.2" in metrics["how"]["train_objective"]["estimate"]
    history = json.loads((out / "history.json").read_text())["epochs"]
    assert all(e["beta"] == pytest.approx(0.2) and math.isfinite(e["train_objective"]) for e in history)

    proc = _cli("evaluate", str(out), "--iw-samples", "200", "--device", "cpu")
    metrics = json.loads((out / "metrics.json").read_text())
    assert not {"elbo", "elbo_iw", "elbo_particles"} & set(metrics)
    assert metrics["how"]["test_elbo"]["command"] == "evaluate"
    assert metrics["gap"] == pytest.approx(metrics["log_likelihood"] - metrics["test_elbo"], abs=1e-4)
    assert metrics["test_elbo"] <= metrics["log_likelihood"]
    assert f"test ELBO {metrics['test_elbo']:.3f}" in proc.stdout
