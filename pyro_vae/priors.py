"""Priors p(z): callables of the model's named context (``prior(**context)``; none by default) returning a Pyro
distribution of event shape ``(z_dim,)`` (``(n, k)`` for a categorical latent, over log-space values: the log of
a relaxed one-hot point, as :class:`~pyro_vae.distributions.ExpRelaxedOneHotCategorical` draws; a simplex-valued
prior is refused).

The built-in priors take any context and ignore it. Any such callable works (one that takes no context is
called with none; see :mod:`pyro_vae.models.context`); an ``nn.Module`` prior is registered with Pyro by the
model, so its parameters learn with the rest of the VAE. Built in: :class:`StandardNormal`,
:class:`MixtureOfGaussians`, :class:`VampPrior`, :class:`FlowPrior`, :class:`Laplace`, :class:`StudentT`, for
categorical latents :class:`RelaxedCategoricalPrior` (uniform or learnable logits), and for Bernoulli latents
:class:`BernoulliPrior` (fixed ``p = 1/2`` or learnable logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.encoders import ConditionalGaussianEncoder, Encoder
from pyro_vae.errors import ConfigError, message
from pyro_vae.networks import ConcatMLP, Shape
from pyro_vae.validation import integer, positive

__all__ = ["StandardNormal", "MixtureOfGaussians", "VampPrior", "FlowPrior", "Laplace", "StudentT",
           "RelaxedCategoricalPrior", "BernoulliPrior", "PRIORS", "CATEGORICAL_PRIORS", "BERNOULLI_PRIORS",
           "build_prior", "Unconditional",
           "ClassConditionalNormal", "ConditionalNormalPrior"]

PriorFn = Callable[[], dist.TorchDistribution]


class StandardNormal(nn.Module):
    """``N(0, I)`` over ``z_dim`` dimensions; buffers follow the module across devices."""

    name = "normal"
    loc: torch.Tensor
    scale: torch.Tensor

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(int(z_dim)))
        self.register_buffer("scale", torch.ones(int(z_dim)))

    def config(self) -> dict[str, Any]:
        """The JSON-able spec :func:`build_prior` rebuilds this prior from: ``{"name": "normal"}``."""
        return {"name": self.name}

    def forward(self, **context: Any) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class MixtureOfGaussians(nn.Module):
    """Learnable mixture of ``components`` diagonal Gaussians: weights, means and scales all learn.

    ``p(z) = sum_c pi_c N(z; mu_c, diag(sigma_c^2))`` with ``pi = softmax(logits)`` and
    ``sigma = softplus(raw) + 1e-4``. Means start at seeded ``N(0, I)`` draws so the components differ.
    There is no closed-form KL from a Gaussian to a mixture: under ``TraceMeanField_ELBO`` the latent site
    falls back to Monte Carlo.

    Args:
        z_dim: latent dimensions.
        components: number of mixture components ``C``.
    """

    name = "mixture"

    def __init__(self, z_dim: int, components: int = 10) -> None:
        super().__init__()
        self.z_dim, self.components = int(z_dim), integer("components", components, 1)
        self.logits = nn.Parameter(torch.zeros(self.components))
        self.locs = nn.Parameter(torch.randn(self.components, self.z_dim))
        self.raw_scales = nn.Parameter(torch.full((self.components, self.z_dim), 0.5413))  # softplus -> 1.0

    def config(self) -> dict[str, Any]:
        """The JSON-able spec :func:`build_prior` rebuilds this prior from: ``{"name": "mixture", "components": C}``
        (the learned weights, means and scales travel in the state dict)."""
        return {"name": self.name, "components": self.components}

    def forward(self, **context: Any) -> dist.TorchDistribution:
        scales = F.softplus(self.raw_scales) + 1e-4
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits),
                                      dist.Normal(self.locs, scales).to_event(1))


class VampPrior(nn.Module):
    """Variational mixture of posteriors (Tomczak & Welling 2018): ``p(z) = 1/C sum_c q(z | u_c)``, the
    encoder's own distribution at ``C`` learnable pseudo-inputs ``u_c`` of shape ``data_shape``.

    The encoder is held by reference, not as a submodule: its parameters stay registered once (by the
    guide) and receive gradients from both the guide and this prior. :class:`pyro_vae.VAE` builds it from
    ``prior="vamp"`` (or ``{"name": "vamp", "components": C}``) with its own encoder; build it by hand as
    ``VampPrior(encoder, data_shape)`` for a VAE given that encoder.

    Args:
        encoder: an :class:`~pyro_vae.encoders.Encoder` (``distribution(u)`` gives ``q(z | u)``).
        data_shape: shape of one data point.
        components: number of pseudo-inputs ``C``.
        init: optional ``(C, *data_shape)`` starting pseudo-inputs (e.g. a random data subset); default
            uniform draws in [0, 1].
    """

    name = "vamp"
    needs_encoder = True

    def __init__(self, encoder: Encoder, data_shape: Sequence[int], components: int = 50,
                 init: torch.Tensor | None = None) -> None:
        super().__init__()
        if not hasattr(encoder, "distribution"):
            raise ConfigError(message("VampPrior encoder", "an Encoder with distribution(x)",
                                      type(encoder).__name__, "pass vae.encoder or build the VAE with prior='vamp'"))
        self.data_shape = tuple(int(s) for s in data_shape)
        self.components = integer("components", components, 1)
        self._encoder = (encoder,)  # a tuple hides it from nn.Module: not a submodule, not in state_dict
        if init is None:
            init = torch.rand(self.components, *self.data_shape)
        elif tuple(init.shape) != (self.components, *self.data_shape):
            raise ConfigError(message("VampPrior init", f"shape (components, *data_shape) = "
                                      f"{(self.components, *self.data_shape)}", f"shape {tuple(init.shape)}",
                                      "pass e.g. x[torch.randperm(len(x))[:components]]"))
        self.pseudo_inputs = nn.Parameter(init.detach().clone().float())

    @property
    def encoder(self) -> Encoder:
        """The encoder whose distribution at the pseudo-inputs is the prior (held by reference)."""
        return self._encoder[0]

    def config(self) -> dict[str, Any]:
        """The JSON-able spec :func:`build_prior` rebuilds this prior from, with the VAE's encoder:
        ``{"name": "vamp", "components": C}`` (the pseudo-inputs travel in the state dict)."""
        return {"name": self.name, "components": self.components}

    def forward(self, **context: Any) -> dist.TorchDistribution:
        q = self.encoder.distribution(self.pseudo_inputs)
        mix = dist.Categorical(logits=torch.zeros(self.components, device=self.pseudo_inputs.device))
        return dist.MixtureSameFamily(mix, q)


class FlowPrior(nn.Module):
    """Normalizing-flow prior built from Pyro's own transforms (``pyro.distributions.transforms``):
    ``z = f_L(... f_1(e))``, ``e ~ N(0, I)``, with ``flows`` autoregressive layers (affine: MAF,
    Papamakarios et al. 2017; or rational-quadratic spline: Durkan et al. 2019) and a reversal of the
    dimensions between layers.

    Each layer is used in its inverse direction, so ``log_prob(z)`` (needed at every training step) is one
    pass through the autoregressive networks; sampling (generation only) is the sequential direction.

    Args:
        z_dim: latent dimensions.
        flows: number of autoregressive layers.
        kind: ``"affine"`` or ``"spline"`` (with ``z_dim = 1``: an elementwise spline either way).
        hidden: hidden sizes of each layer's autoregressive network (default ``(4 * z_dim,) * 2``).
    """

    name = "flow"
    KINDS = ("affine", "spline")
    loc: torch.Tensor
    scale: torch.Tensor

    def __init__(self, z_dim: int, flows: int = 2, kind: str = "affine", hidden: Sequence[int] | None = None) -> None:
        super().__init__()
        from pyro.distributions import transforms as T

        self.z_dim, self.flows = int(z_dim), integer("flows", flows, 1)
        if kind not in self.KINDS:
            raise ConfigError(message("flow kind", f"one of {self.KINDS}", repr(kind), "pass kind='affine'"))
        self.kind = kind
        self.hidden = [int(h) for h in hidden] if hidden is not None else [max(8, 4 * self.z_dim)] * 2
        layers = []
        for _ in range(self.flows):
            if self.z_dim == 1:
                layers.append(T.Spline(1))  # one dimension: nothing to condition on
            elif kind == "affine":
                layers.append(T.affine_autoregressive(self.z_dim, hidden_dims=self.hidden))
            else:
                layers.append(T.spline_autoregressive(self.z_dim, hidden_dims=self.hidden))
        self.layers = nn.ModuleList(layers)
        self.register_buffer("loc", torch.zeros(self.z_dim))
        self.register_buffer("scale", torch.ones(self.z_dim))

    def config(self) -> dict[str, Any]:
        """The JSON-able spec :func:`build_prior` rebuilds this prior from: ``{"name": "flow", "flows": L,
        "kind": ..., "hidden": [...]}`` (the layers' weights travel in the state dict)."""
        return {"name": self.name, "flows": self.flows, "kind": self.kind, "hidden": list(self.hidden)}

    def forward(self, **context: Any) -> dist.TorchDistribution:
        from pyro.distributions import transforms as T

        reverse = T.Permute(torch.arange(self.z_dim - 1, -1, -1, device=self.loc.device))
        transforms: list = []
        for i, layer in enumerate(self.layers):
            if i:
                transforms.append(reverse)
            transforms.append(layer.inv)
        return dist.TransformedDistribution(dist.Normal(self.loc, self.scale).to_event(1), transforms)


class Laplace(nn.Module):
    """Heavy-tailed ``Laplace(0, scale)`` on every dimension (analytic KL from a diagonal Gaussian guide)."""

    name = "laplace"

    def __init__(self, z_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale_value = positive("scale", scale)
        self.register_buffer("loc", torch.zeros(int(z_dim)))
        self.register_buffer("scale", torch.full((int(z_dim),), self.scale_value))

    def config(self) -> dict[str, Any]:
        """The JSON-able spec :func:`build_prior` rebuilds this prior from: ``{"name": "laplace", "scale": s}``."""
        return {"name": self.name, "scale": self.scale_value}

    def forward(self, **context: Any) -> dist.TorchDistribution:
        return dist.Laplace(self.loc, self.scale).to_event(1)


class StudentT(nn.Module):
    """Heavy-tailed Student-t with ``df`` degrees of freedom on every dimension (no closed-form KL from a
    Gaussian: Monte Carlo under ``TraceMeanField_ELBO``)."""

    name = "student-t"

    def __init__(self, z_dim: int, df: float = 3.0, scale: float = 1.0) -> None:
        super().__init__()
        self.df_value, self.scale_value = positive("df", df), positive("scale", scale)
        self.register_buffer("df", torch.full((int(z_dim),), self.df_value))
        self.register_buffer("loc", torch.zeros(int(z_dim)))
        self.register_buffer("scale", torch.full((int(z_dim),), self.scale_value))

    def config(self) -> dict[str, Any]:
        """The JSON-able spec :func:`build_prior` rebuilds this prior from: ``{"name": "student-t", "df": df,
        "scale": s}``."""
        return {"name": self.name, "df": self.df_value, "scale": self.scale_value}

    def forward(self, **context: Any) -> dist.TorchDistribution:
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


class RelaxedCategoricalPrior(nn.Module):
    """Relaxed one-hot categorical prior over ``n`` variables of ``k`` classes, event shape ``(n, k)``:
    uniform (``learnable=False``, Jang et al. 2017) or with learnable logits.

    Its temperature follows the guide's: built by :class:`pyro_vae.VAE` it reads
    ``vae.encoder.temperature`` at every call, so an annealing schedule moves both. Standalone
    (``prior=RelaxedCategoricalPrior(n, k, temperature=0.5)``) it keeps its own fixed ``temperature``:
    Maddison et al. (2017) recommend a prior temperature different from the posterior's (1/2 vs 2/3). The
    distribution is :class:`~pyro_vae.distributions.ExpRelaxedOneHotCategorical`, over the log-space values the
    guide draws (the log of a relaxed one-hot sample), scored exactly from the value at any temperature.

    Args:
        n: number of categorical variables.
        k: classes per variable.
        learnable: learn the logits (start uniform).
        temperature: used when no encoder is attached.
        encoder: an object with a ``temperature`` attribute to follow (held by reference).
    """

    name = "categorical"

    def __init__(self, n: int, k: int, learnable: bool = False, temperature: float = 1.0,
                 encoder: nn.Module | None = None) -> None:
        super().__init__()
        from pyro_vae.distributions.relaxed import check_temperature

        self.n, self.k = integer("n", n, 1), integer("categories", k, 1)
        self.learnable = bool(learnable)
        self._temperature = check_temperature(temperature)
        # an object with a `temperature` attribute (the VAE's encoder), held by reference: not a submodule
        self._encoder: tuple[Any, ...] = (encoder,) if encoder is not None else ()
        if self.learnable:
            self.logits = nn.Parameter(torch.zeros(self.n, self.k))
        else:
            self.register_buffer("logits", torch.zeros(self.n, self.k))

    @property
    def temperature(self) -> float:
        """The relaxation temperature (> 0): the attached encoder's (setting it sets the encoder's), else the
        prior's own. Setting it checks the value: :class:`~pyro_vae.errors.ConfigError` unless finite and > 0."""
        return float(self._encoder[0].temperature) if self._encoder else self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        from pyro_vae.distributions.relaxed import check_temperature

        if self._encoder:
            self._encoder[0].temperature = value
        else:
            self._temperature = check_temperature(value)

    def config(self) -> dict[str, Any]:
        """The JSON-able spec :func:`build_prior` rebuilds this prior from: ``{"name": "categorical"}`` or
        ``{"name": "categorical-learned"}``, with its ``"temperature"`` when it keeps its own (no encoder
        attached; the learned logits travel in the state dict)."""
        cfg: dict[str, Any] = {"name": "categorical-learned" if self.learnable else "categorical"}
        if not self._encoder:
            cfg["temperature"] = self._temperature  # a fixed temperature of its own
        return cfg

    def forward(self, **context: Any) -> dist.TorchDistribution:
        from pyro_vae.distributions.relaxed import ExpRelaxedOneHotCategorical

        t = torch.tensor(self.temperature, dtype=self.logits.dtype, device=self.logits.device)
        return ExpRelaxedOneHotCategorical(t, logits=self.logits).to_event(1)


def _categorical_learned(n: int, k: int, **kwargs: Any) -> RelaxedCategoricalPrior:
    return RelaxedCategoricalPrior(n, k, learnable=True, **kwargs)


class BernoulliPrior(nn.Module):
    """Factorized Bernoulli prior over ``z_dim`` binary variables, event shape ``(z_dim,)``: fixed ``p = 1/2``
    (``learnable=False``) or with learnable logits starting at 0 (the learned prior of the sigmoid belief net
    papers, e.g. Grathwohl et al. 2018, Dong et al. 2020).

    Built by :class:`pyro_vae.VAE` (``prior="bernoulli"`` / ``"bernoulli-learned"``) it follows the encoder: an
    exact ``Bernoulli(logits).to_event(1)`` (values in ``{0, 1}``) for an exact latent, and for a relaxed one
    the binary Concrete :class:`~pyro_vae.distributions.LogitRelaxedBernoulli` over logit-space values at the
    encoder's temperature, read at every call so an annealing schedule moves both. Standalone it is exact
    unless given ``relaxed=True`` and its own ``temperature``.

    Args:
        z_dim: number of binary variables.
        learnable: learn the logits (start at 0, ``p = 1/2``).
        relaxed, temperature: the relaxed variant and its temperature, used when no encoder is attached.
        encoder: an object with ``relaxed`` and ``temperature`` attributes to follow (held by reference).
    """

    name = "bernoulli"

    def __init__(self, z_dim: int, learnable: bool = False, relaxed: bool = False, temperature: float = 1.0,
                 encoder: nn.Module | None = None) -> None:
        super().__init__()
        from pyro_vae.distributions.relaxed import check_temperature

        self.z_dim = integer("z_dim", z_dim, 1)
        self.learnable = bool(learnable)
        self._relaxed = bool(relaxed)
        self._temperature = check_temperature(temperature)
        self._encoder: tuple[Any, ...] = (encoder,) if encoder is not None else ()
        if self.learnable:
            self.logits = nn.Parameter(torch.zeros(self.z_dim))
        else:
            self.register_buffer("logits", torch.zeros(self.z_dim))

    @property
    def relaxed(self) -> bool:
        """Whether the prior is the binary Concrete (the attached encoder's setting, else the prior's own)."""
        return bool(getattr(self._encoder[0], "relaxed", False)) if self._encoder else self._relaxed

    @property
    def temperature(self) -> float:
        """The relaxation temperature (> 0): the attached encoder's, else the prior's own."""
        return float(self._encoder[0].temperature) if self._encoder else self._temperature

    def config(self) -> dict[str, Any]:
        """The JSON-able spec :func:`build_prior` rebuilds this prior from: ``{"name": "bernoulli"}`` or
        ``{"name": "bernoulli-learned"}``, with ``"relaxed"`` and ``"temperature"`` when it keeps its own (no
        encoder attached; the learned logits travel in the state dict)."""
        cfg: dict[str, Any] = {"name": "bernoulli-learned" if self.learnable else "bernoulli"}
        if not self._encoder:
            cfg.update(relaxed=self._relaxed, temperature=self._temperature)
        return cfg

    def forward(self, **context: Any) -> dist.TorchDistribution:
        """``p(z)``, event shape ``(z_dim,)`` (the named ``context`` is ignored)."""
        if not self.relaxed:
            return dist.Bernoulli(logits=self.logits).to_event(1)
        from pyro_vae.distributions.relaxed_bernoulli import LogitRelaxedBernoulli

        t = torch.tensor(self.temperature, dtype=self.logits.dtype, device=self.logits.device)
        return LogitRelaxedBernoulli(t, logits=self.logits).to_event(1)


def _bernoulli_learned(z_dim: int, **kwargs: Any) -> BernoulliPrior:
    return BernoulliPrior(z_dim, learnable=True, **kwargs)


PRIORS: dict[str, Callable[..., nn.Module]] = {
    "normal": StandardNormal, "mixture": MixtureOfGaussians, "vamp": VampPrior, "flow": FlowPrior,
    "laplace": Laplace, "student-t": StudentT,
}
CATEGORICAL_PRIORS: dict[str, Callable[..., nn.Module]] = {
    "categorical": RelaxedCategoricalPrior, "categorical-learned": _categorical_learned,
}
BERNOULLI_PRIORS: dict[str, Callable[..., nn.Module]] = {
    "bernoulli": BernoulliPrior, "bernoulli-learned": _bernoulli_learned,
}


def build_prior(spec: str | dict | PriorFn | None, z_dim: int, *, categories: int | None = None,
                encoder: nn.Module | None = None, data_shape: Sequence[int] | None = None,
                latent: str | None = None) -> PriorFn:
    """A prior from a name, a config dict (``{"name": ..., **options}``) or a callable (returned as is).

    Args:
        spec: ``None`` (standard normal, or the uniform relaxed categorical when ``categories`` is given),
            a name of :data:`PRIORS` / :data:`CATEGORICAL_PRIORS`, a config dict, or a callable.
        z_dim: latent dimensions (the number of categorical variables ``n`` for a categorical latent).
        categories: classes per variable for a categorical latent, ``None`` for a Gaussian one.
        encoder: the VAE's encoder (for ``vamp``, and the temperature of the categorical priors).
        data_shape: shape of one data point (for ``vamp``).
        latent: ``"bernoulli"`` for a Bernoulli latent (:data:`BERNOULLI_PRIORS`, default ``"bernoulli"``, the
            prior following ``encoder``'s ``relaxed`` and ``temperature``); otherwise decided by ``categories``.
    """
    if latent == "bernoulli":
        return _build_bernoulli_prior(spec, z_dim, encoder)
    table = CATEGORICAL_PRIORS if categories is not None else PRIORS
    if spec is None:
        spec = "categorical" if categories is not None else "normal"
    if callable(spec):
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        spec = kwargs.pop("name", None)
    if spec not in table:
        other = PRIORS if categories is not None else CATEGORICAL_PRIORS
        hint = (f"{spec!r} is a prior for a {'Gaussian' if categories is not None else 'categorical'} latent; "
                if spec in other else "")
        raise ConfigError(
            message(
                "prior",
                "one of " + ", ".join(sorted(table)) + " or a callable returning a distribution",
                repr(spec),
                hint + "pick one of the known names or pass your own callable",
            )
        )
    try:
        if categories is not None:  # a given temperature is fixed; otherwise it follows the encoder's
            return table[spec](z_dim, categories, encoder=None if "temperature" in kwargs else encoder, **kwargs)
        if getattr(table[spec], "needs_encoder", False):
            if encoder is None or data_shape is None:
                raise ConfigError(message(f"prior {spec!r}", "the VAE's encoder and data_shape", "none",
                                          f"build it through VAE(..., prior={spec!r})"))
            return table[spec](encoder, data_shape, **kwargs)
        return table[spec](z_dim, **kwargs)
    except TypeError as e:
        raise ConfigError(message(f"prior {spec!r} options", "the constructor's keyword arguments",
                                  f"{sorted(kwargs)} ({e})", f"see help(pyro_vae.priors) for {spec!r}")) from None


def _build_bernoulli_prior(spec: str | dict | PriorFn | None, z_dim: int, encoder: nn.Module | None) -> PriorFn:
    if spec is None:
        spec = "bernoulli"
    if callable(spec):
        return spec
    kwargs: dict[str, Any] = dict(spec) if isinstance(spec, dict) else {}
    name = kwargs.pop("name", None) if isinstance(spec, dict) else spec
    if name not in BERNOULLI_PRIORS:
        hint = f"{name!r} is a prior for another latent; " if name in PRIORS or name in CATEGORICAL_PRIORS else ""
        raise ConfigError(message("prior", "one of " + ", ".join(sorted(BERNOULLI_PRIORS)) + " (a Bernoulli "
                                  "latent) or a callable returning a distribution", repr(name),
                                  hint + 'pass prior="bernoulli" (p = 1/2) or "bernoulli-learned"'))
    try:  # a given relaxation is the prior's own; otherwise it follows the encoder's
        own = "temperature" in kwargs or "relaxed" in kwargs
        return BERNOULLI_PRIORS[name](z_dim, encoder=None if own else encoder, **kwargs)
    except TypeError as e:
        raise ConfigError(message(f"prior {name!r} options", "the constructor's keyword arguments",
                                  f"{sorted(kwargs)} ({e})", f"see help(pyro_vae.priors) for {name!r}")) from None


# ------------------------------------------------------------------------------ conditional priors
class Unconditional(nn.Module):
    """A prior that ignores its conditioning inputs: ``Unconditional(StandardNormal(8))(y)`` is ``N(0, I)``,
    whatever ``y``."""

    def __init__(self, prior: Callable[[], dist.TorchDistribution]) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, *_: torch.Tensor) -> dist.TorchDistribution:
        return self.prior()


class ClassConditionalNormal(nn.Module):
    """``p(z | y) = N(loc[y], diag(scale[y]^2))``: one learnable Gaussian per class (a Gaussian-mixture prior
    once ``y`` is summed out).

    ``forward(y)`` takes integer labels of any shape ``(...)``, enumerated ones included, and returns a
    distribution of batch shape ``(...)`` and event shape ``(z_dim,)``.
    """

    def __init__(self, num_classes: int, z_dim: int, init_spread: float = 1.0) -> None:
        super().__init__()
        self.num_classes = integer("num_classes", num_classes, 2)
        self.z_dim = integer("z_dim", z_dim, 1)
        self.loc = nn.Parameter(init_spread * torch.randn(self.num_classes, self.z_dim))
        self.raw_scale = nn.Parameter(torch.full((self.num_classes, self.z_dim), math.log(math.expm1(1.0))))

    def forward(self, y: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(self.loc[y], F.softplus(self.raw_scale[y]) + 1e-4).to_event(1)


class ConditionalNormalPrior(nn.Module):
    """``p(z | c) = N(loc(c), diag(scale(c)^2))`` computed by an MLP of the context (the prior network of
    Sohn et al. 2015, "Learning structured output representation using deep conditional generative models").
    ``forward(c)`` takes ``(..., *context_shape)`` and returns a distribution of batch shape ``(...)`` and event
    shape ``(z_dim,)``."""

    def __init__(self, context_shape: Shape, z_dim: int, hidden: Sequence[int] = (400,)) -> None:
        super().__init__()
        self.z_dim = integer("z_dim", z_dim, 1)
        self.net = ConditionalGaussianEncoder(ConcatMLP([context_shape], (2 * self.z_dim,), hidden), self.z_dim)

    def forward(self, context: torch.Tensor) -> dist.TorchDistribution:
        return self.net.distribution(context)
