"""The estimators for discrete guide sites (enumeration, REINFORCE, RLOO, ARM, DisARM, MuProp, NVIL), each through the
library's own per-site machinery on a Pyro model/guide pair: gradient_samples of the loss, vectorized and looped.

The toys (../shared reference values; Tucker et al. 2017, Grathwohl et al. 2018, Kool et al. 2020): one Bernoulli
site ``b`` with logit ``theta`` (a ``pyro.param``) in the guide, the same distribution with the logit held fixed
(detached) in the model, and the cost ``f(b)`` as ``pyro.factor(-f(b))``. The model's and the guide's log-densities
then cancel at every value, so the loss is ``E f`` and its gradient ``d/dtheta E f``, and no estimator gets a term
of its own from ``log p - log q``.

Seeded statistical tests; the false-failure rates under the normal approximation: a mean within 4 standard errors,
6.3e-5 per check; a one-estimate variance within 4 standard errors (the standard error of a sample variance from the
fourth central moment, ``sqrt((m4 - s^4) / n)``), about the same; the Bernoulli VAE checks every coordinate of the
gradient at 4 standard errors, 6.3e-5 times the number of coordinates (190): about 1.2e-2 per estimator
(Bonferroni). Tests marked slow repeat the checks with 10 to 20 times more estimates.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_vae
from pyro_vae import checkpoint
from pyro_vae.cli import build_parser
from pyro_vae.errors import ConfigError
from pyro_vae.infer.discrete import MAX_CONFIGURATIONS, MuPropParameters, NVILBaseline
from pyro_vae.infer.elbo import make_elbo
from pyro_vae.infer.estimators import ESTIMATORS
from pyro_vae.infer.site_gradients import SITE_GRADIENTS, evaluations
from pyro_vae.infer.variance import flat_gradient, gradient_samples
from pyro_vae.models.enumeration import exact_elbo

T = 0.499
#: theta -> (exact gradient, one-estimate variance of REINFORCE, RLOO with 2 draws, ARM, DisARM)
REFERENCE = {
    0.0: (5.0e-4, {"score-function": 0.0156251, "rloo": 2.5e-7, "arm": 8.3333e-8, "disarm": 0.0}),
    1.0: (3.93224e-4, {"score-function": 0.012243, "rloo": 2.38599e-7, "arm": 1.45813e-7, "disarm": 1.32845e-7}),
}
P3 = (0.6, 0.51, 0.48)
PARTICLES = {"rloo": 2}


class Toy(torch.nn.Module):
    """``b ~ Bernoulli(sigmoid(theta))`` (``size`` coordinates sharing the logit), cost ``sum_i (b_i - t_i)^2``."""

    def __init__(self, theta: float, targets: tuple[float, ...] | None = None) -> None:
        super().__init__()
        self.theta0 = float(theta)
        self.targets = targets
        self.data_shape = (1,)

    def _logits(self, detach: bool) -> torch.Tensor:
        theta = pyro.param("theta", torch.tensor(self.theta0))
        theta = theta.detach() if detach else theta
        return theta if self.targets is None else theta.expand(len(self.targets))

    def _dist(self, detach: bool):
        d = dist.Bernoulli(logits=self._logits(detach))
        return d if self.targets is None else d.to_event(1)

    def model(self, x: torch.Tensor) -> None:
        b = pyro.sample("b", self._dist(True))
        t = torch.tensor(T) if self.targets is None else torch.tensor(self.targets)
        pyro.factor("f", -(b - t).pow(2).sum(-1) if self.targets is not None else -(b - t).pow(2))

    def guide(self, x: torch.Tensor) -> None:
        pyro.sample("b", self._dist(False))


X = torch.zeros(1, 1)


def _samples(toy: Toy, estimator: str, n: int, method: str = "vectorized", module=None, seed: int = 0):
    return gradient_samples(toy, X, estimator, n, num_particles=PARTICLES.get(estimator, 1), method=method,
                            nn_baseline=module, seed=seed).double().squeeze(-1)


def _mean_z(g: torch.Tensor, exact: float) -> float:
    se = g.std() / math.sqrt(g.shape[0])
    return float((g.mean() - exact).abs() / se)


def _var_se(g: torch.Tensor) -> tuple[float, float]:
    d = g - g.mean()
    var = float(d.pow(2).mean())
    m4 = float(d.pow(4).mean())
    return var, math.sqrt(max(m4 - var * var, 0.0) / g.shape[0])


def _trained(toy: Toy, estimator: str, steps: int = 300):
    """The estimator's learned module after ``steps`` Adam steps on the toy (theta held fixed)."""
    loss_fn = make_elbo("trace", 1, estimator, data_shape=(1,))
    module = loss_fn.extra_modules()[0]
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn.loss_and_grads(toy.model, toy.guide, X)
        opt.step()
    pyro.get_param_store()["theta"].grad = None
    return module


@pytest.mark.parametrize("theta", [0.0, 1.0])
@pytest.mark.parametrize("estimator", ["score-function", "rloo", "arm", "disarm"])
def test_bernoulli_toy_mean_and_variance_are_the_reference(estimator, theta):
    exact, variances = REFERENCE[theta]
    g = _samples(Toy(theta), estimator, 20000)
    var, se = _var_se(g)
    if variances[estimator] == 0.0:  # DisARM at theta = 0: every estimate is the exact gradient
        assert var < 1e-16 and float((g - exact).abs().max()) < 1e-8
        return
    assert _mean_z(g, exact) < 4.0
    assert abs(var - variances[estimator]) < 4 * se, (var, variances[estimator], se)


@pytest.mark.parametrize("theta", [0.0, 1.0])
def test_bernoulli_toy_enumeration_is_exact(theta):
    exact = REFERENCE[theta][0]
    for method in ("vectorized", "loop"):
        g = _samples(Toy(theta), "enumerate", 50, method)
        assert torch.allclose(g, torch.full_like(g, exact), rtol=1e-4, atol=0), method


@pytest.mark.parametrize("theta", [0.0, 1.0])
@pytest.mark.parametrize("estimator", ["muprop", "nvil"])
def test_bernoulli_toy_learned_estimators_are_unbiased_below_reinforce(estimator, theta):
    """After their learned parts are trained on the toy, MuProp and NVIL are unbiased with a variance far below
    REINFORCE's (at least 10 times lower; both reach about 1e-4 of it or less)."""
    exact, variances = REFERENCE[theta]
    toy = Toy(theta)
    module = _trained(toy, estimator)
    assert isinstance(module, MuPropParameters if estimator == "muprop" else NVILBaseline)
    g = _samples(toy, estimator, 20000, module=module)
    assert _mean_z(g, exact) < 4.0
    assert float(g.var()) < variances["score-function"] / 10


@pytest.mark.parametrize("estimator", ["score-function", "rloo", "arm", "disarm", "enumerate", "muprop", "nvil"])
def test_three_variable_toy_is_unbiased(estimator):
    """Shared logit eta = 0, f = sum_i (x_i - p_i)^2: exact gradient -0.045 (the learned parts untrained)."""
    g = _samples(Toy(0.0, P3), estimator, 20000)
    if estimator == "enumerate":
        assert torch.allclose(g, torch.full_like(g, -0.045), rtol=1e-4, atol=0)
        return
    assert _mean_z(g, -0.045) < 4.0
    if estimator == "score-function":
        var, se = _var_se(g)
        assert abs(var - 0.43842) < 4 * se, (var, se)


def _loop_and_vectorized(estimator: str, n_loop: int, n_vec: int) -> None:
    toy = Toy(1.0, P3)
    loop = _samples(toy, estimator, n_loop, "loop", seed=1)
    vec = _samples(toy, estimator, n_vec, seed=2)
    if estimator == "enumerate":
        assert torch.allclose(loop, vec[: loop.shape[0]], rtol=1e-5)
        return
    se = math.sqrt(loop.var() / loop.shape[0] + vec.var() / vec.shape[0])
    assert abs(float(loop.mean() - vec.mean())) < 4.5 * se
    (v1, s1), (v2, s2) = _var_se(loop), _var_se(vec)
    assert abs(v1 - v2) < 4.5 * math.hypot(s1, s2)


@pytest.mark.parametrize("estimator", ["rloo", "arm", "disarm", "enumerate", "muprop", "nvil"])
def test_loop_and_vectorized_draw_the_same_distribution(estimator):
    """Pyro's loss_and_grads (the reference, 60 estimates) and the vmapped surrogate (2000): means within 4.5
    standard errors of their difference, variances within 4.5 standard errors of theirs; enumeration equal."""
    _loop_and_vectorized(estimator, 5 if estimator == "enumerate" else 60, 2000)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["rloo", "arm", "disarm", "muprop", "nvil"])
def test_loop_and_vectorized_draw_the_same_distribution_many(estimator):
    """As above with 1000 looped and 10000 vectorized estimates."""
    _loop_and_vectorized(estimator, 1000, 10000)


def test_registry_cli_and_evaluations():
    for name, kind in (("enumerate", "enumerate"), ("arm", "arm"), ("disarm", "disarm"), ("muprop", "muprop"),
                       ("nvil", "nvil")):
        assert ESTIMATORS[name].site_gradient == kind and kind in SITE_GRADIENTS
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    choices = next(a.choices for a in train._actions if "--estimator" in a.option_strings)
    assert {"enumerate", "rloo", "arm", "disarm", "muprop", "nvil"} <= set(choices)
    assert [evaluations(ESTIMATORS[e], 4) for e in ("enumerate", "arm", "disarm", "muprop", "nvil")] == [17, 2, 2, 3, 1]


def test_refusals_name_the_site_and_the_fix():
    gaussian = pyro_vae.VAE((6,), 2, hidden=(8,))
    x = (torch.rand(3, 6) > 0.5).float()
    for est in ("arm", "disarm", "muprop"):
        with pytest.raises(ConfigError, match=rf'estimator "{est}" at site "z": expected a Bernoulli guide'):
            gradient_samples(gaussian, x, est, 2, method="loop")
    with pytest.raises(ConfigError, match=r'estimator "enumerate" at site "z": expected a guide distribution with a '
                                          r"finite support"):
        gradient_samples(gaussian, x, "enumerate", 2)
    pyro.clear_param_store()
    big = pyro_vae.VAE((6,), 13, latent="bernoulli", hidden=(8,))
    with pytest.raises(ConfigError, match=rf"at most {MAX_CONFIGURATIONS} configurations.*2\^13 = 8192"):
        gradient_samples(big, x, "enumerate", 1, method="loop")
    with pytest.raises(ConfigError, match="data_shape"):
        make_elbo("trace", 1, "nvil")
    pyro.clear_param_store()
    cat = pyro_vae.VAE((6,), 2, latent="categorical", categories=3, hidden=(8,), temperature=0.5)
    with pytest.raises(ConfigError, match=r'estimator "muprop" at site "z": expected a Bernoulli'):
        gradient_samples(cat, x, "muprop", 2, method="loop")


def test_categorical_latents_enumerate_and_nvil():
    """On a categorical VAE (2 groups of 3: 9 configurations) enumeration and NVIL run on the exact categorical,
    vectorized and looped."""
    cat = pyro_vae.VAE((6,), 2, latent="categorical", categories=3, hidden=(8,), temperature=0.5)
    x = (torch.rand(3, 6) > 0.5).float()
    for est in ("enumerate", "nvil"):
        for method in ("vectorized", "loop"):
            g = gradient_samples(cat, x, est, 3, method=method, seed=0)
            assert torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("estimator", ["arm", "disarm", "muprop", "nvil", "enumerate"])
def test_fit_trains_a_bernoulli_vae_and_checkpoints_the_learned_parts(estimator, tmp_path):
    """fit with each estimator on a Bernoulli VAE; MuProp's and NVIL's learned parts are in the checkpoint, trained
    (moved from their initial values), and a resumed run starts from them."""
    x = (torch.rand(32, 6) > 0.5).float()
    vae = pyro_vae.VAE((6,), 3, latent="bernoulli", hidden=(8,))
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = pyro_vae.fit(vae, x, estimator=estimator, epochs=1, batch_size=16, progress=False, device="cpu",
                               checkpoint_dir=run, checkpoint_every=1)
    assert all(math.isfinite(v) for v in history["train_elbo"])
    saved = checkpoint.load_training_state(run)["extra_modules"]
    if estimator not in ("muprop", "nvil"):
        assert saved == []
        return
    (state,) = saved
    if estimator == "muprop":
        assert not torch.equal(state["eta"], torch.ones(2))
    else:
        assert float(state["mean"]) != 0.0 and float(state["var"]) > 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyro.clear_param_store()
        resumed = pyro_vae.VAE((6,), 3, latent="bernoulli", hidden=(8,))
        pyro_vae.fit(resumed, x, estimator=estimator, epochs=2, batch_size=16, progress=False, device="cpu",
                     checkpoint_dir=run, checkpoint_every=1, resume_from=run)
    (state2,) = checkpoint.load_training_state(run)["extra_modules"]
    assert state2.keys() == state.keys()


UNBIASED = ["score-function", "rloo", "arm", "disarm", "enumerate", "muprop", "nvil"]


def _bernoulli_vae():
    torch.manual_seed(3)
    vae = pyro_vae.VAE((6,), 4, latent="bernoulli", prior="bernoulli-learned", hidden=(8,))
    x = (torch.rand(16, 6, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    return vae, x


def _check_against_enumeration(estimator: str, n: int, limit: float = 4.0) -> None:
    vae, x = _bernoulli_vae()
    exact = flat_gradient(vae, -exact_elbo(vae, x).sum(), x).double()
    g = gradient_samples(vae, x, estimator, n, num_particles=PARTICLES.get(estimator, 1), seed=0).double()
    assert g.shape[1] == exact.shape[0] == 190
    se = g.std(0) / math.sqrt(n)
    diff = (g.mean(0) - exact).abs()
    live = se > 1e-6 * (1 + exact.abs())
    assert bool((diff[~live] < 1e-4 * (1 + exact[~live].abs())).all())  # no spread: the exact value itself
    z = diff[live] / se[live]
    assert float(z.max()) < limit, (estimator, float(z.max()), int(z.argmax()))


@pytest.mark.parametrize("estimator", UNBIASED)
def test_bernoulli_vae_mean_gradient_is_the_exact_gradient(estimator):
    """4 latent bits, 16 data points, a learned Bernoulli prior: the mean of 2000 estimates of the gradient of the
    ELBO (190 coordinates: encoder, decoder, prior) is the exact gradient summed over all 16 configurations
    (pyro_vae.models.enumeration), every coordinate within 4 standard errors (1.2e-2 per estimator, Bonferroni)."""
    _check_against_enumeration(estimator, 2000)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", UNBIASED)
def test_bernoulli_vae_mean_gradient_is_the_exact_gradient_many(estimator):
    """As above with 40000 estimates (a 20 times tighter check of the bias), every coordinate within 4.5 standard
    errors: 190 x 6.8e-6 = 1.3e-3 per estimator (at 4, the seven estimators together would fail by chance about
    8% of the time)."""
    _check_against_enumeration(estimator, 40000, 4.5)
