"""REBAR, RELAX, VIMCO and Gumbel-Rao through make_elbo, gradient_samples and fit.

Toys: the Bernoulli toy of Tucker et al. / Grathwohl et al. (``b ~ Bern(sigmoid(theta))``, ``f(b) = (b - t)^2``,
``t = 0.499``; exact gradient ``sigmoid'(theta) (1 - 2t)``, REINFORCE's one-draw variance 0.0156251 at ``theta = 0``)
and the three-variable toy with a shared logit (exact gradient -0.045), written as a Pyro model/guide pair whose
ELBO gradient with respect to the guide's logit is the toy's (the prior equals the guide at the test point, the
cost is a ``pyro.factor``); a tiny Bernoulli VAE (2 or 4 latent bits) whose ELBO and K-sample bound are computed
exactly by enumerating every latent configuration (every K-tuple for the bound).

Statistical tests are seeded; each compares a mean with its exact value at 4 standard errors (normal
approximation: a false-failure rate of about 6e-5 per coordinate, below 2e-3 per test over the coordinates
compared) and a variance with an upper bound at 4 standard errors of the sample variance (its standard error from
the fourth moment; the same rate). Gumbel-Rao is biased by design: its bias is reported in z-scores and its mean
compared with straight-through's (the difference of the two means at 4 standard errors of the difference).
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_vae
from pyro_vae.errors import ConfigError
from pyro_vae.infer.elbo import make_elbo
from pyro_vae.infer.estimators import ESTIMATORS
from pyro_vae.infer.gumbel_rao import conditional_gumbel
from pyro_vae.infer.rebar import CoordinateSurrogate, RebarControl, conditional_logistic
from pyro_vae.infer.variance import gradient_samples, parameter_groups
from pyro_vae.infer.vimco import leave_one_out_bounds, vimco_learning_signals
from pyro_vae.models.enumeration import exact_elbo_gradient as enumerated_elbo_gradient
from pyro_vae.models.enumeration import exact_iwae_bound

T = 0.499


class Toy(nn.Module):
    """``b ~ Bern(sigmoid(logit))`` (one logit shared by ``len(targets)`` coordinates); the model's prior is the
    guide at ``theta`` and its cost ``-sum (b - t)^2``, so the loss's gradient in ``logit`` at ``theta`` is
    ``d/dtheta E sum (b_i - t_i)^2``."""

    data_shape = (1,)

    def __init__(self, theta: float, targets: list[float]) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(float(theta)))
        self.register_buffer("prior_logit", torch.tensor(float(theta)))
        self.register_buffer("t", torch.tensor(targets))

    def guide(self, x):
        pyro.module("toy", self)
        pyro.sample("b", dist.Bernoulli(logits=self.logit.expand(self.t.shape)).to_event(1))

    def model(self, x):
        pyro.module("toy", self)
        b = pyro.sample("b", dist.Bernoulli(logits=self.prior_logit.expand(self.t.shape)).to_event(1))
        pyro.factor("f", -((b - self.t) ** 2).sum(-1))


def _toy_exact(theta: float, targets: list[float]) -> float:
    s = 1 / (1 + math.exp(-theta))
    return s * (1 - s) * sum(1 - 2 * t for t in targets)


class TinyBernoulliVAE(nn.Module):
    """A sigmoid belief net of ``bits`` latent bits and ``pixels`` binary pixels, linear encoder and decoder, a
    learnable prior; small enough to enumerate."""

    def __init__(self, bits: int = 2, pixels: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.data_shape = (pixels,)
        self.enc = nn.Parameter(torch.randn(pixels, bits, generator=g))
        self.enc_b = nn.Parameter(0.5 * torch.randn(bits, generator=g))
        self.dec = nn.Parameter(torch.randn(bits, pixels, generator=g))
        self.dec_b = nn.Parameter(0.5 * torch.randn(pixels, generator=g))
        self.prior_logits = nn.Parameter(0.5 * torch.randn(bits, generator=g))

    def guide(self, x):
        pyro.module("tiny", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=(2 * x - 1) @ self.enc + self.enc_b).to_event(1))

    def model(self, x):
        pyro.module("tiny", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=self.prior_logits.expand(x.shape[0], -1)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ self.dec + self.dec_b).to_event(1), obs=x)

    def log_weights(self, x, z):
        """``log p(x, z) - log q(z | x)`` and ``log q(z | x)`` for every data point and latent ``z`` ``(..., bits)``
        broadcast against ``x`` ``(n, pixels)``."""
        q = dist.Bernoulli(logits=(2 * x - 1) @ self.enc + self.enc_b).to_event(1)
        p = dist.Bernoulli(logits=self.prior_logits).to_event(1)
        lik = dist.Bernoulli(logits=z @ self.dec + self.dec_b).to_event(1)
        log_q = q.log_prob(z)
        return p.log_prob(z) + lik.log_prob(x) - log_q, log_q

    def configurations(self) -> torch.Tensor:
        bits = self.enc.shape[1]
        return torch.tensor(list(itertools.product([0.0, 1.0], repeat=bits)))


def _flat_grad(module: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(module.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def exact_elbo_gradient(vae: TinyBernoulliVAE, x: torch.Tensor) -> torch.Tensor:
    """The gradient of ``-sum_n ELBO(x_n)``, every configuration enumerated."""
    configs = vae.configurations()  # (C, bits)
    log_w, log_q = vae.log_weights(x.unsqueeze(0), configs.unsqueeze(1))  # (C, n)
    return _flat_grad(vae, -(log_q.exp() * log_w).sum())


def exact_bound_gradient(vae: TinyBernoulliVAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """The gradient of ``-sum_n E log (1/K) sum_k w_k``, every K-tuple of configurations enumerated."""
    configs = vae.configurations()
    c = configs.shape[0]
    log_w, log_q = vae.log_weights(x.unsqueeze(0), configs.unsqueeze(1))  # (C, n)
    tuples = torch.tensor(list(itertools.product(range(c), repeat=k)))  # (C^K, K)
    lw, lq = log_w[tuples], log_q[tuples]  # (C^K, K, n)
    bound = lw.logsumexp(1) - math.log(k)
    return _flat_grad(vae, -(lq.sum(1).exp() * bound).sum())


def _assert_mean(samples: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    s = samples.double()
    se = s.std(0) / math.sqrt(s.shape[0])
    z = (s.mean(0) - exact.double()) / se.clamp_min(1e-12)
    assert bool((z.abs() < 4).all()), f"{what}: z-scores {z.tolist()}"


def _variance_upper(samples: torch.Tensor) -> tuple[float, float]:
    """The sample variance of a column and its standard error (from the fourth central moment)."""
    s = samples.double().reshape(-1)
    n = s.shape[0]
    d = s - s.mean()
    var = float(d.pow(2).mean() * n / (n - 1))
    m4 = float(d.pow(4).mean())
    return var, math.sqrt(max(m4 - var ** 2, 0.0) / n)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_and_objectives():
    for name in ("rebar", "relax", "gumbel-rao", "vimco"):
        assert name in ESTIMATORS and ESTIMATORS[name].description
    assert ESTIMATORS["vimco"].objectives == ("iwae",) and ESTIMATORS["gumbel-rao"].cv_samples == 10
    with pytest.raises(ConfigError, match="K >= 2"):
        make_elbo("iwae", 1, "vimco")
    with pytest.raises(ConfigError, match="IWAE bound"):
        make_elbo("trace", 2, "vimco")


def test_rebar_elbo_holds_its_control_variate():
    loss = make_elbo("trace", 1, "rebar", data_shape=(1,))
    (control,) = loss.extra_modules()
    assert isinstance(control, RebarControl) and control.surrogate is None
    assert float(control.temperature.detach()) == pytest.approx(0.5) and float(control.eta.detach()) == 1.0
    (control,) = make_elbo("trace", 1, "relax", data_shape=(1,)).extra_modules()
    assert isinstance(control.surrogate, CoordinateSurrogate)
    with pytest.raises(ConfigError, match="temperature"):
        RebarControl(temperature=0.0)


# ------------------------------------------------------------------------------------------------ samplers
def test_conditional_logistic_has_the_law_of_the_relaxation_given_b():
    """``(b, z~ | b)`` has the law of ``(H(z), z)``: the conditional draws fall on ``b``'s side, and their mixture
    over ``b`` has the logistic CDF (Kolmogorov distance below 0.02 at 20000 draws; its 4-standard-error band
    under the null is about 0.013)."""
    torch.manual_seed(0)
    theta = torch.tensor(0.7)
    n = 20000
    b = (torch.rand(n) < torch.sigmoid(theta)).float()
    z = conditional_logistic(theta, b, torch.rand(n).clamp(1e-6, 1 - 1e-6))
    assert bool(((z >= 0) == (b > 0.5)).all())
    grid = torch.linspace(-4, 5, 50)
    empirical = (z.unsqueeze(0) <= grid.unsqueeze(1)).double().mean(1)
    assert float((empirical - torch.sigmoid(grid - theta).double()).abs().max()) < 0.02


def test_conditional_gumbel_keeps_the_category():
    """Every conditional draw has the given arg-max, and the top entry's law is Gumbel(logsumexp(logits)): mean
    ``logsumexp + 0.5772`` within 4 standard errors (pi / sqrt(6 n))."""
    torch.manual_seed(0)
    logits = torch.log_softmax(torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]]), -1)
    index = torch.tensor([0, 1])
    draws = conditional_gumbel(logits, index, 20000)
    assert bool((draws.argmax(-1) == index).all())
    top = draws.gather(-1, index.expand(20000, 2).unsqueeze(-1)).squeeze(-1)
    se = math.pi / math.sqrt(6 * 20000)
    assert float((top.mean(0) - (logits.logsumexp(-1) + 0.5772157)).abs().max()) < 4 * se


# ------------------------------------------------------------------------------------------------ VIMCO
def test_vimco_learning_signals_match_their_definition():
    torch.manual_seed(0)
    log_w = torch.randn(4, 3)  # K = 4 draws along dim 0, 3 points
    loo = leave_one_out_bounds(log_w, 0)
    for k in range(4):
        others = torch.cat([log_w[:k], log_w[k + 1:]])
        replaced = torch.cat([others, others.mean(0, keepdim=True)])
        torch.testing.assert_close(loo[k], replaced.logsumexp(0) - math.log(4))
    bound = log_w.logsumexp(0) - math.log(4)
    torch.testing.assert_close(vimco_learning_signals(log_w, 0), bound - loo)


def test_vimco_mean_is_the_exact_gradient_of_the_k_sample_bound():
    """VIMCO's mean gradient (every parameter: encoder, decoder, prior) of ``-sum_n L_K(x_n)``, K = 2, against the
    enumeration of all K-tuples of a 2-bit sigmoid belief net; 4 standard errors per coordinate."""
    vae = TinyBernoulliVAE(bits=2, pixels=3, seed=1)
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    exact = exact_bound_gradient(vae, x, 2)
    samples = gradient_samples(vae, x, "vimco", 250, num_particles=2, elbo="iwae", method="loop", seed=3)
    _assert_mean(samples, exact, "vimco K=2")


def _vae_exact(vae, x, gradient: dict[str, torch.Tensor]) -> torch.Tensor:
    """A gradient by parameter name, negated (the loss's) and flattened in gradient_samples' column order."""
    order = [n for items in parameter_groups(vae).values() for n, _ in items]
    return -torch.cat([gradient[n].reshape(-1) for n in order])


def _bernoulli_vae(z_dim: int, pixels: int = 6, seed: int = 0):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    vae = pyro_vae.VAE((pixels,), z_dim, latent="bernoulli", prior="bernoulli-learned", hidden=(8,))
    x = (torch.rand(16, pixels, generator=torch.Generator().manual_seed(seed + 1)) < 0.5).float()
    return vae, x


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loop", "vectorized"])
def test_vimco_on_a_bernoulli_vae_is_the_exact_bound_gradient(method):
    """pyro_vae.VAE(latent="bernoulli"), 2 bits, K = 3: every one of the 4^3 K-tuples enumerated
    (models.enumeration.exact_iwae_bound); 4 standard errors per coordinate."""
    vae, x = _bernoulli_vae(2, pixels=4, seed=2)
    x = x[:4]
    params = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(exact_iwae_bound(vae, x, 3).sum(), [p for _, p in params], allow_unused=True)
    exact = _vae_exact(vae, x, {n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(params, grads)})
    samples = gradient_samples(vae, x, "vimco", 800, num_particles=3, elbo="iwae", method=method, seed=4)
    _assert_mean(samples, exact, f"vimco K=3 {method}")


# ------------------------------------------------------------------------------------------------ REBAR, RELAX
def test_relaxed_bernoulli_log_density_is_the_linear_interpolation():
    """The cost REBAR evaluates at a relaxed value y in (0, 1): torch's Bernoulli log-density is
    ``y log p + (1 - y) log(1 - p)`` there (smooth, linear in y), read without the support check."""
    logits = torch.tensor([-1.0, 0.3, 2.0])
    y = torch.tensor([0.2, 0.5, 0.9])
    lp = dist.Bernoulli(logits=logits, validate_args=False).log_prob(y)
    p = torch.sigmoid(logits)
    torch.testing.assert_close(lp, y * p.log() + (1 - y) * (1 - p).log())


def test_variance_gradient_reaches_the_control_variate_only():
    """One backward pass of the surrogate: the toy's logit gets the same gradient whether or not the control
    variate is trained (same random draws), and the control variate's parameters get the variance gradient."""
    grads = []
    for trained in (False, True):
        toy = Toy(0.3, [0.6, 0.51, 0.48])
        loss = make_elbo("trace", 1, "relax", data_shape=(1,))
        control = loss.extra_modules()[0]
        for p in control.parameters():
            p.requires_grad_(trained)
        pyro.set_rng_seed(5)
        loss.loss_and_grads(toy.model, toy.guide, torch.zeros(1))
        grads.append(toy.logit.grad.clone())
        if trained:
            assert control.log_temperature.grad is not None and control.eta.grad is not None
            assert float(control.eta.grad.abs()) > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("estimator", ["rebar", "relax"])
def test_rebar_relax_refuse_other_families(estimator):
    vae = pyro_vae.VAE((6,), 2, latent="categorical", categories=3, hidden=(8,))
    with pytest.raises(ConfigError, match="a Bernoulli guide distribution"):
        gradient_samples(vae, torch.rand(4, 6).round(), estimator, 1, method="loop")


def test_gumbel_rao_refuses_a_bernoulli_latent():
    with pytest.raises(ConfigError, match="relaxed one-hot categorical|categorical latents"):
        gradient_samples(_bernoulli_vae(2)[0], torch.rand(4, 6).round(), "gumbel-rao", 1, method="loop")


def test_fit_checkpoints_and_resumes_the_control_variate(tmp_path):
    """fit holds REBAR's temperature and eta in its optimizer and checkpoint: two epochs straight and one epoch
    then a resumed second give the same weights and the same control variate, which has moved from its
    initial values."""
    def run(folder, epochs, resume=False):
        vae, x = _bernoulli_vae(3, seed=7)
        pyro_vae.fit(vae, x, estimator="rebar", epochs=epochs, batch_size=8, lr=0.05, seed=1, progress=False,
                     device="cpu", checkpoint_dir=str(folder), resume_from=str(folder) if resume else None)
        state = torch.load(folder / "checkpoint.pt", weights_only=False)
        return vae, state["extra_modules"][0]

    straight, control = run(tmp_path / "a", 2)
    run(tmp_path / "b", 1)
    resumed, control_b = run(tmp_path / "b", 2, resume=True)
    assert set(control) == {"log_temperature", "eta"}
    assert abs(float(control["eta"]) - 1.0) > 1e-4 and abs(float(control["log_temperature"]) - math.log(0.5)) > 1e-4
    for k in control:
        torch.testing.assert_close(control[k], control_b[k])
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)


def _train_control(toy: Toy, estimator: str, steps: int, lr: float = 0.05) -> nn.Module:
    """The control variate of ``estimator`` after ``steps`` steps of its variance gradient (the toy's logit
    held fixed), through the ELBO's own surrogate."""
    loss = make_elbo("trace", 1, estimator, data_shape=(1,))
    control = loss.extra_modules()[0]
    opt = torch.optim.Adam(control.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        toy.zero_grad()
        loss.loss_and_grads(toy.model, toy.guide, torch.zeros(1))
        opt.step()
    return control


REINFORCE_VARIANCE = {0.0: 0.0156251, 1.0: 0.012243}


@pytest.mark.slow
@pytest.mark.parametrize("theta", [0.0, 1.0])
@pytest.mark.parametrize("estimator", ["rebar", "relax"])
def test_bernoulli_toy_unbiased_with_variance_at_most_reinforce(estimator, theta):
    """After 600 steps of variance training (as in the papers), the mean is the exact gradient (4 s.e.) and the
    one-estimate variance at most REINFORCE's (4 s.e. of the sample variance). On this toy REBAR's
    variance-optimal eta is about 0 (the relaxed cost (sigmoid(z / lambda) - t)^2 is nearly uncorrelated with the
    REINFORCE term at t = 0.499), so its variance reaches REINFORCE's, not below; RELAX's falls far below."""
    pyro.set_rng_seed(11)
    toy = Toy(theta, [T])
    control = _train_control(toy, estimator, 600)
    samples = gradient_samples(toy, torch.zeros(1), estimator, 2000, method="loop", nn_baseline=control, seed=12)
    _assert_mean(samples, torch.tensor([_toy_exact(theta, [T])]), f"{estimator} theta={theta}")
    var, se = _variance_upper(samples)
    assert var <= REINFORCE_VARIANCE[theta] + 4 * se, (var, se)
    if estimator == "relax":
        assert var < 0.1 * REINFORCE_VARIANCE[theta]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["rebar", "relax"])
def test_three_variable_toy_unbiased(estimator):
    """Shared logit 0, f = sum_i (b_i - p_i)^2, p = (0.6, 0.51, 0.48): exact gradient -0.045 (4 s.e.)."""
    toy = Toy(0.0, [0.6, 0.51, 0.48])
    samples = gradient_samples(toy, torch.zeros(1), estimator, 1000, method="loop", seed=13)
    _assert_mean(samples, torch.tensor([-0.045]), estimator)


@pytest.mark.slow
def test_relax_variance_training_lowers_the_variance():
    """RELAX at its initial control variate (REBAR's) and after 300 steps of variance training, theta = 0: the
    variance falls by more than 4 standard errors of the first."""
    pyro.set_rng_seed(21)
    toy = Toy(0.0, [T])
    loss = make_elbo("trace", 1, "relax", data_shape=(1,))
    before = gradient_samples(toy, torch.zeros(1), "relax", 1000, method="loop", nn_baseline=loss.extra_modules()[0],
                              seed=22)
    control = _train_control(toy, "relax", 300)
    after = gradient_samples(toy, torch.zeros(1), "relax", 1000, method="loop", nn_baseline=control, seed=22)
    (v0, se0), (v1, _) = _variance_upper(before), _variance_upper(after)
    assert v1 < v0 - 4 * se0, (v0, se0, v1)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["rebar", "relax"])
def test_bernoulli_vae_mean_is_the_exact_elbo_gradient(estimator):
    """pyro_vae.VAE(latent="bernoulli"), 4 bits, 16 points: the mean gradient of every parameter equals the exact
    ELBO gradient of the 16 enumerated configurations (models.enumeration), 4 s.e. per coordinate; the encoder's
    variance is below the score function's."""
    vae, x = _bernoulli_vae(4)
    exact = _vae_exact(vae, x, enumerated_elbo_gradient(vae, x))
    samples = gradient_samples(vae, x, estimator, 400, method="loop", seed=31, groups=True)
    flat = torch.cat(list(samples.values()), 1)
    _assert_mean(flat, exact, estimator)
    reinforce = gradient_samples(vae, x, "score-function", 400, method="loop", seed=31, groups=True)
    assert float(samples["encoder"].var(0).sum()) < float(reinforce["encoder"].var(0).sum())


# ------------------------------------------------------------------------------------------------ Gumbel-Rao
def _categorical_vae():
    pyro.clear_param_store()
    torch.manual_seed(3)
    vae = pyro_vae.VAE((6,), 2, latent="categorical", categories=3, hidden=(8,), temperature=0.7)
    x = (torch.rand(8, 6, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    return vae, x


def test_gumbel_rao_loop_and_vectorized_draw_finite_gradients():
    vae, x = _categorical_vae()
    for method in ("loop", "vectorized"):
        samples = gradient_samples(vae, x, "gumbel-rao", 3, method=method, seed=1)
        assert samples.shape[0] == 3 and bool(torch.isfinite(samples).all())


@pytest.mark.slow
def test_gumbel_rao_has_the_mean_of_straight_through_and_no_larger_variance():
    """Gumbel-Rao (M = 10) and straight-through on a categorical VAE (2 variables of 3 classes): equal means
    (the difference within 4 s.e. of the difference, per coordinate) and an encoder variance (trace) no larger.
    Both are biased for the ELBO's gradient by design: their bias against the unbiased score-function mean is
    reported in z-scores (printed; not asserted)."""
    vae, x = _categorical_vae()
    gr = gradient_samples(vae, x, "gumbel-rao", 3000, method="vectorized", seed=41, groups=True)
    st = gradient_samples(vae, x, "straight-through", 3000, method="vectorized", seed=42, groups=True)
    for group in gr:
        a, b = gr[group].double(), st[group].double()
        se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
        live = se > 0
        z = (a.mean(0) - b.mean(0))[live] / se[live]
        assert bool((z.abs() < 4).all()), (group, z.abs().max())
    assert float(gr["encoder"].var(0).sum()) <= float(st["encoder"].var(0).sum())
    sf = gradient_samples(vae, x, "score-function", 3000, method="vectorized", seed=43, groups=True)
    for name, est in (("gumbel-rao", gr), ("straight-through", st)):
        a, b = est["encoder"].double(), sf["encoder"].double()
        z = (a.mean(0) - b.mean(0)) / (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
        print(f"{name}: encoder bias against the score function, max |z| {float(z.abs().max()):.1f}, "
              f"median |z| {float(z.abs().median()):.1f}")


def test_vimco_gradient_scales_with_num_data():
    """Under minibatch scaling every gradient of the bound is ``num_data / batch`` times the batch's own, the
    encoder's (VIMCO's learning-signal term: Pyro leaves a site's score-function part unscaled) as the decoder's.
    Same draws at both scales: deterministic."""
    x = (torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    grads = []
    for num_data in (6, 12):
        pyro.clear_param_store()
        torch.manual_seed(0)
        vae = pyro_vae.VAE((5,), 3, latent="bernoulli", prior="bernoulli-learned", hidden=(8,))
        pyro.set_rng_seed(1)
        make_elbo("iwae", 4, "vimco", vae.data_shape).loss_and_grads(vae.model, vae.guide, x, num_data=num_data)
        grads.append({n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None})
    assert any(n.startswith("encoder") for n in grads[0])
    for n, g in grads[0].items():
        assert torch.allclose(grads[1][n], 2 * g, rtol=1e-4, atol=1e-5), n
    pyro.clear_param_store()


@pytest.mark.parametrize("k", [None, 1])
def test_vimco_terms_refuse_fewer_than_two_samples(k):
    """VIMCO's leave-one-out learning signal needs K >= 2 draws: traces without a particle plate, or with one of
    size 1, are refused, never scored without the encoder's term."""
    from pyro_vae.infer.iwae import importance_weighted_terms, iwae_traces

    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = pyro_vae.VAE((5,), 3, latent="bernoulli", hidden=(8,))
    x = (torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) > 0.5).float()

    def traced(fn):
        if k is None:
            return fn
        return lambda *a, **kw: pyro.plate("num_particles_vectorized", k, dim=-2)(fn)(*a, **kw)

    model_trace, guide_trace, _ = iwae_traces(traced(vae.model), traced(vae.guide), (x,), {})
    with pytest.raises(ConfigError, match="K >= 2"):
        importance_weighted_terms(model_trace, guide_trace, -2, learning_signals=True)
    pyro.clear_param_store()
