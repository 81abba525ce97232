"""The variational autoencoder as a Pyro ``model`` / ``guide`` pair.

``model(x)`` samples ``z`` from the prior and scores ``x`` under the likelihood of the decoder's output;
``guide(x)`` samples ``z`` from the encoder's distribution. Both are ordinary Pyro callables with the same
signature and the same single plate, so they work under ``SVI`` with any ELBO, under ``Predictive``,
``poutine`` handlers, and inside a larger model.
"""

from __future__ import annotations

import functools
import importlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.params import param_with_module_name
from torch import nn

from pyro_vae.distributions.relaxed import (
    check_log_simplex,
    check_temperature,
    is_simplex_valued,
    log_class_probs,
    log_one_hot,
    straight_through_override,
    to_simplex,
)
from pyro_vae.distributions.relaxed_bernoulli import (
    bernoulli_logits,
    is_bernoulli,
    is_logit_bernoulli,
    to_unit,
    unwrap_distribution,
)
from pyro_vae.encoders import BernoulliEncoder, Encoder, GaussianEncoder, RelaxedCategoricalEncoder
from pyro_vae.errors import ConfigError, DataError, ModelError, PyroVAEError, ShapeError, message, warn_deprecated
from pyro_vae.likelihoods import Likelihood, build_likelihood
from pyro_vae.models.context import binds, call_with_context, check_context, check_context_shapes, is_per_point
from pyro_vae.models.sites import Sites
from pyro_vae.networks import ContextMLP, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from pyro_vae.priors import build_prior
from pyro_vae.pyro_internals import unconstrained_params
from pyro_vae.validation import beta as check_beta
from pyro_vae.validation import cast_data, check_memory, integer

__all__ = ["VAE"]

NETS = ("mlp", "conv", "linear", "nonlinear", "nonlinear-leaky")
LATENTS = ("gaussian", "categorical", "bernoulli")
#: The fixed networks of the discrete-estimator papers, as (hidden sizes, activation): ``"linear"`` one affine map
#: (784-200 in the papers), ``"nonlinear"`` two hidden layers of 200 tanh units (Grathwohl et al. 2018, after
#: Tucker et al. 2017), ``"nonlinear-leaky"`` two of 200 LeakyReLU(0.3) units (Dong et al. 2020). ``hidden`` does
#: not apply to them.
FIXED_NETS: dict[str, tuple[tuple[int, ...], Callable[[], nn.Module]]] = {
    "linear": ((), nn.Tanh),
    "nonlinear": ((200, 200), nn.Tanh),
    "nonlinear-leaky": ((200, 200), functools.partial(nn.LeakyReLU, 0.3)),
}


class VAE(Sites):
    """A VAE whose parts are all swappable.

    Args:
        data_shape: shape of one data point, e.g. ``(64,)`` or ``(1, 28, 28)``.
        z_dim: number of latent dimensions.
        encoder: ``"mlp"``, ``"conv"``, ``"linear"``, ``"nonlinear"``, ``"nonlinear-leaky"`` (the fixed networks of
            :data:`FIXED_NETS`), an :class:`~pyro_vae.encoders.Encoder` (used as the guide
            distribution as is), or any ``nn.Module`` mapping ``(batch, *data_shape)`` to
            ``(batch, 2 * z_dim)``, wrapped in a :class:`~pyro_vae.encoders.GaussianEncoder` (for a
            categorical latent: ``(batch, z_dim * categories)`` logits, wrapped in a
            :class:`~pyro_vae.encoders.RelaxedCategoricalEncoder`).
        decoder: a name as for ``encoder``, or any ``nn.Module`` mapping ``(..., z_dim)`` to
            ``(..., *data_shape)`` (``(..., z_dim * categories)`` for a categorical latent).
        prior: ``None`` (standard normal; uniform relaxed categorical for a categorical latent), a name
            of :data:`pyro_vae.priors.PRIORS` / ``CATEGORICAL_PRIORS``, a config dict
            (``{"name": "mixture", "components": 10}``), or a callable returning a distribution with event
            shape ``(z_dim,)`` (``(z_dim, categories)``); an ``nn.Module`` prior learns with the rest.
        likelihood: ``"bernoulli"``, ``"continuous-bernoulli"``, ``"normal"``, ``"normal-learned"``, a
            config dict, or a callable ``decoder_output -> Distribution``.
        hidden: hidden layer sizes of the MLP networks.
        name: prefix for every Pyro site and module name (``"a"`` gives sites ``"a/z"``, ``"a/x"`` and
            the plate ``"a/data"``), so several VAEs can live in one model.
        beta: weight of the latent site (KL weighting, Higgins et al. 2017), applied with
            ``poutine.scale`` in both model and guide.
        latent: ``"gaussian"`` (diagonal Gaussian guide) or ``"categorical"``: ``z_dim`` relaxed one-hot
            categorical variables of ``categories`` classes (Gumbel-softmax, Jang et al. 2017), latent
            event shape ``(z_dim, categories)``. The site's value is the *log* of the relaxed one-hot point
            (:class:`~pyro_vae.distributions.ExpRelaxedOneHotCategorical`), so its density is exact at any
            temperature; the decoder is fed ``exp`` of it flattened to ``z_dim * categories``
            (:meth:`decoder_input`). ``"bernoulli"``: ``z_dim`` binary variables, a sigmoid belief net layer
            (:class:`~pyro_vae.encoders.BernoulliEncoder`, the encoder ending in ``z_dim`` logits; prior
            ``"bernoulli"`` with ``p = 1/2`` or ``"bernoulli-learned"``), values in ``{0, 1}`` fed to the decoder as
            floats; with ``relaxed=True`` the binary Concrete in logit space instead (see ``relaxed``).
        categories: classes per categorical variable (``latent="categorical"`` only).
        temperature: starting relaxation temperature of a categorical latent (> 0).
        straight_through: the decoder sees the hard one-hot of the relaxed draw, with the relaxed draw's
            gradient (categorical latent; the latent and its densities are unchanged). For a Bernoulli latent: the
            decoder sees ``z > 0`` of the relaxed logit-space draw with its relaxed gradient (implies ``relaxed``).
        relaxed: Bernoulli latent only: the site is the binary Concrete at ``temperature``
            (:class:`~pyro_vae.distributions.LogitRelaxedBernoulli`, Maddison et al. 2017), its values the *logits*
            of the relaxed draw, which the decoder sees as ``sigmoid(z)``; the pathwise estimator then applies,
            and the score-function estimators use the exact Bernoulli in the same representation (``+-inf``).
        encoder_context: ``{name: shape}``: the context values the encoder is conditioned on, each named and
            given the event shape of one data point's value (``{"y": (10,)}`` for a one-hot label). The
            ``"mlp"`` encoder then concatenates ``x`` and them (:class:`~pyro_vae.networks.ContextMLP`); a
            module of yours is called ``net(x, y=...)`` and an :class:`~pyro_vae.encoders.Encoder`
            ``distribution(x, y=...)``. A value is ``(batch, *shape)`` per data point or ``shape`` global.
        decoder_context: the same for the decoder: ``decoder(z, y=...)``, the ``"mlp"`` decoder concatenating
            ``z`` and the values.

    Context: ``model(x, **context)`` and ``guide(x, **context)`` take named context from the enclosing model
    (a covariate per data point, a global latent sampled outside, a constant). Inside the data plate the model
    calls ``prior(**context)`` and ``likelihood(decoder_output, **context)`` with all of it, and the encoder and
    decoder with their ``encoder_context`` / ``decoder_context`` names; see :meth:`model`.

    Sites (with ``name=""``): plate ``"data"`` over the batch, latent ``"z"`` of shape
    ``(batch, *latent_shape)`` (``(batch, z_dim)``; ``(batch, z_dim, categories)`` in log space for a
    categorical latent), observed ``"x"`` of shape ``(batch, *data_shape)``.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        z_dim: int,
        *,
        encoder: str | nn.Module = "mlp",
        decoder: str | nn.Module = "mlp",
        prior: str | dict | Callable[[], dist.TorchDistribution] | None = None,
        likelihood: str | dict | Callable[[torch.Tensor], dist.TorchDistribution] = "bernoulli",
        hidden: Sequence[int] = (400,),
        name: str = "",
        beta: float = 1.0,
        latent: str = "gaussian",
        categories: int | None = None,
        temperature: float = 1.0,
        straight_through: bool = False,
        relaxed: bool = False,
        encoder_context: Mapping[str, Sequence[int]] | None = None,
        decoder_context: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(data_shape, int):
            data_shape = (data_shape,)
        self.data_shape = tuple(integer("data_shape entries", s, 1) for s in data_shape)
        if not self.data_shape:
            raise ConfigError(message("data_shape", "at least one dimension", "()", "pass e.g. data_shape=(64,)"))
        self.z_dim = integer("z_dim", z_dim, 1)
        self.hidden = tuple(integer("hidden entries", h, 1) for h in hidden)
        self.name = str(name)
        self.beta = beta
        self._config: dict[str, Any] = {"data_shape": list(self.data_shape), "z_dim": self.z_dim,
                                        "hidden": list(self.hidden), "name": self.name}
        self._init_latent(latent, categories, temperature, straight_through, relaxed)
        self._init_context(encoder_context, decoder_context, prior)
        self._check_network_size(encoder, decoder)

        try:
            self.encoder = self._build_encoder(encoder)
            self.decoder = self._build_decoder(decoder)
            self.prior = build_prior(prior, self.z_dim, categories=self.categories, encoder=self.encoder,
                                     data_shape=self.data_shape, latent=self.latent)
            self.likelihood = build_likelihood(likelihood, self.data_shape)
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(e, MemoryError) and "memory" not in str(e):
                raise
            raise ConfigError(message(
                "VAE", "parts that fit in memory", f"an allocation that failed ({str(e).splitlines()[0][:160]})",
                "lower z_dim, hidden or the prior's size (components, flows)")) from None
        for key, part in (("prior", self.prior), ("likelihood", self.likelihood)):
            cfg = getattr(part, "config", None)
            self._config[key] = cfg() if callable(cfg) else None
        self._check_shapes()

    # ----------------------------------------------------------------------------------- building
    def _init_latent(self, latent: str, categories: int | None, temperature: float,
                     straight_through: bool, relaxed: bool = False) -> None:
        if latent not in LATENTS:
            raise ConfigError(message("latent", f"one of {LATENTS}", repr(latent), 'pass latent="categorical"'))
        self.latent = latent
        self._relaxed = False
        if relaxed and latent != "bernoulli":
            raise ConfigError(message("relaxed", 'latent="bernoulli" (a categorical latent is always relaxed)',
                                      f"latent={latent!r}", 'pass latent="bernoulli" or drop relaxed'))
        if latent == "categorical":
            self.categories: int | None = integer("categories", categories, 2)
            self._temperature0 = check_temperature(temperature)
            self._straight_through = bool(straight_through)
            self._config.update(latent=latent, categories=self.categories, temperature=self._temperature0,
                                straight_through=self._straight_through)
            self._encoder_features = self._decoder_features = self.z_dim * self.categories
        elif latent == "bernoulli":
            if categories is not None:
                raise ConfigError(message("categories", 'latent="categorical"', 'latent="bernoulli"',
                                          "drop categories (a Bernoulli latent has z_dim binary variables)"))
            self.categories = None
            self._temperature0 = check_temperature(temperature)
            self._straight_through = bool(straight_through)
            self._relaxed = bool(relaxed) or self._straight_through
            self._config.update(latent=latent, relaxed=self._relaxed, temperature=self._temperature0,
                                straight_through=self._straight_through)
            self._encoder_features = self._decoder_features = self.z_dim
        else:
            if categories is not None or straight_through:
                raise ConfigError(message("categories / straight_through", 'latent="categorical"',
                                          f"latent={latent!r}", 'pass latent="categorical" or drop them'))
            self.categories = None
            self._encoder_features, self._decoder_features = 2 * self.z_dim, self.z_dim

    def _init_context(self, encoder_context: Any, decoder_context: Any, prior: Any) -> None:
        self.encoder_context = check_context_shapes("encoder_context", encoder_context)
        self.decoder_context = check_context_shapes("decoder_context", decoder_context)
        for key, spec in (("encoder_context", self.encoder_context), ("decoder_context", self.decoder_context)):
            if spec:
                self._config[key] = {k: list(v) for k, v in spec.items()}
        if self.encoder_context and (prior == "vamp" or isinstance(prior, dict) and prior.get("name") == "vamp"):
            raise ConfigError(message("prior", "a prior that does not run the encoder when the encoder takes context",
                                      '"vamp" with encoder_context', "drop encoder_context or pick another prior"))

    def _check_network_size(self, encoder: Any, decoder: Any) -> None:
        """Refuse, before allocating them, built-in networks whose weights alone exceed the machine's memory
        (a huge ``z_dim`` or ``hidden`` would otherwise fail inside torch or be killed by the system)."""
        d = math.prod(self.data_shape)
        count = 0
        for kind, n_in, n_out in ((encoder, d, self._encoder_features), (decoder, self._decoder_features, d)):
            if kind == "mlp" or kind in FIXED_NETS:
                sizes = (n_in, *(self.hidden if kind == "mlp" else FIXED_NETS[kind][0]), n_out)
                count += sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
            elif kind == "conv" and len(self.data_shape) in (2, 3):
                h, w = self.data_shape[-2:]
                area = ((h + 1) // 2 + 1) // 2 * (((w + 1) // 2 + 1) // 2)  # the map after two stride-2 layers
                count += 9 * (16 + 16 * 32 + 32) + 33 * area * (n_out if n_in == d else n_in)
        check_memory("VAE networks", count * torch.finfo(torch.get_default_dtype()).bits // 8, "cpu",
                     "lower z_dim or hidden", f"{count:.3g} weights for data_shape={self.data_shape}, "
                     f"z_dim={self.z_dim}, hidden={self.hidden}")

    def _wrap_encoder(self, net: nn.Module) -> Encoder:
        if self.latent == "bernoulli":
            return BernoulliEncoder(net, self.z_dim, self._relaxed, self._temperature0, self._straight_through)
        if self.categories is not None:  # latent == "categorical"
            return RelaxedCategoricalEncoder(net, self.z_dim, self.categories, self._temperature0,
                                             self._straight_through)
        return GaussianEncoder(net, self.z_dim)

    @property
    def latent_shape(self) -> tuple:
        """Event shape of the latent site: ``(z_dim,)``, or ``(z_dim, categories)`` for a categorical latent."""
        return (self.z_dim,) if self.categories is None else (self.z_dim, self.categories)

    @property
    def straight_through(self) -> bool:
        """Whether the decoder sees the hard one-hot of a categorical latent (with the relaxed gradient): the
        encoder's ``straight_through`` attribute when it has one, else the constructor's argument. During a
        step of ``make_estimator_elbo("straight-through")`` / ``("relaxed")`` the estimator decides instead."""
        return bool(getattr(self.encoder, "straight_through", self._straight_through)) \
            if self.latent != "gaussian" else False

    @property
    def relaxed(self) -> bool:
        """Whether the latent site is a relaxed (Concrete) one: always for a categorical latent; for a Bernoulli
        latent the encoder's ``relaxed`` attribute when it has one, else the constructor's argument."""
        if self.latent == "bernoulli":
            return bool(getattr(self.encoder, "relaxed", self._relaxed))
        return self.latent == "categorical"

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's input for latents ``z`` in the site's representation, as the model computes it.

        Gaussian latent: ``z`` ``(..., z_dim)`` unchanged. Categorical latent: ``z`` ``(..., z_dim,
        categories)`` is the *log* of a relaxed one-hot point (the value of the latent site, see
        :mod:`pyro_vae.distributions.relaxed`); the decoder sees ``exp(z)`` (with :attr:`straight_through`, the
        one-hot of its arg-max in the forward pass and the gradient of ``exp(z)`` in the backward pass), flattened to
        ``(..., z_dim * categories)``. Bernoulli latent: ``z`` ``(..., z_dim)`` unchanged (values in ``{0, 1}``, or
        any in ``[0, 1]``); relaxed, ``z`` is the logit of the relaxed draw and the decoder sees ``sigmoid(z)``
        (:attr:`straight_through`: ``z > 0`` in the forward pass, the gradient of ``sigmoid(z)`` in the backward).
        """
        if self.latent == "bernoulli" and self.relaxed:
            straight = straight_through_override(self.site("z"))
            return to_unit(z, self.straight_through if straight is None else straight)
        if self.categories is None:
            return z
        straight = straight_through_override(self.site("z"))
        y = to_simplex(z, self.straight_through if straight is None else straight)
        return y.reshape(*y.shape[:-2], self._decoder_features)

    def _check_latents(self, z: Any, what: str = "z") -> None:
        """:class:`ShapeError` unless ``z`` is ``(..., *latent_shape)``; for a categorical latent,
        :class:`DataError` unless it is in log space (see :meth:`decoder_input`)."""
        shape = self.latent_shape
        if not torch.is_tensor(z) or z.dim() < len(shape) or tuple(z.shape[z.dim() - len(shape):]) != shape:
            found = f"shape {tuple(z.shape)}" if torch.is_tensor(z) else type(z).__name__
            raise ShapeError(message(what, f"a tensor of shape (..., {', '.join(map(str, shape))}) (latent_shape)",
                                     found, "pass latents shaped like the latent site's values, e.g. from "
                                     "pyro_vae.generation.sample_latents"))
        if self.categories is not None:
            check_log_simplex(z, what)

    def _check_latent_representation(self, prior: dist.TorchDistribution, q: dist.TorchDistribution) -> None:
        """A categorical latent is carried in log space: refuse a prior or guide whose values lie on the simplex
        (a density of the simplex point would be applied to its log). A Bernoulli latent: refuse a prior or guide
        in the other representation (values in ``{0, 1}`` or ``(0, 1)`` for a relaxed latent, whose values are
        logits; a logit-space relaxed Bernoulli for an exact one)."""
        if self.latent == "bernoulli":
            self._check_bernoulli_representation(prior, q)
        if self.categories is None:
            return
        for part, d in (("prior", prior), ("encoder", q)):
            if is_simplex_valued(d):
                raise ConfigError(message(
                    f'{part} at site "{self.site("z")}"',
                    "a distribution over the log of the relaxed one-hot point (the categorical latent's values "
                    "are in log space)", f"{type(d).__name__} with values on the simplex",
                    "return pyro_vae.distributions.ExpRelaxedOneHotCategorical(temperature, logits=...).to_event(1) "
                    "(torch's ExpRelaxedCategorical works too)"))

    def _check_bernoulli_representation(self, prior: dist.TorchDistribution, q: dist.TorchDistribution) -> None:
        relaxed = self.relaxed
        for part, d in (("prior", prior), ("encoder", q)):
            unit_valued = is_bernoulli(d) or isinstance(unwrap_distribution(d), torch.distributions.RelaxedBernoulli)
            if relaxed and unit_valued:
                raise ConfigError(message(
                    f'{part} at site "{self.site("z")}"', "a distribution over the logits of the relaxed draw (a "
                    "relaxed Bernoulli latent's values are in logit space)",
                    f"{type(d).__name__} with values in [0, 1]",
                    "return pyro_vae.distributions.LogitRelaxedBernoulli(temperature, logits=...).to_event(1), or "
                    "build the VAE without relaxed=True"))
            if not relaxed and is_logit_bernoulli(d):
                raise ConfigError(message(
                    f'{part} at site "{self.site("z")}"', "a distribution over {0, 1} (an exact Bernoulli latent)",
                    f"{type(d).__name__} with logit-space values",
                    "return dist.Bernoulli(logits=...).to_event(1), or build the VAE with relaxed=True"))

    def _build_encoder(self, encoder: str | nn.Module) -> Encoder:
        if isinstance(encoder, Encoder):
            self._config["encoder"] = None
            return encoder
        if isinstance(encoder, str):
            self._config["encoder"] = encoder
            if encoder in FIXED_NETS and self.encoder_context:
                raise ConfigError(message("encoder", '"mlp" or a module of yours with encoder_context',
                                          repr(encoder), "pass a module taking net(x, **context)"))
            if encoder in FIXED_NETS:
                hidden, activation = FIXED_NETS[encoder]
                return self._wrap_encoder(MLPEncoder(self.data_shape, self._encoder_features, hidden, activation))
            if encoder == "mlp" and self.encoder_context:
                net: nn.Module = ContextMLP(self.data_shape, self.encoder_context, (self._encoder_features,),
                                            self.hidden)
            elif encoder == "mlp":
                net = MLPEncoder(self.data_shape, self._encoder_features, self.hidden)
            elif encoder == "conv" and self.encoder_context:
                raise ConfigError(message("encoder", '"mlp" or a module of yours with encoder_context',
                                          '"conv"', "pass a module taking net(x, **context)"))
            elif encoder == "conv":
                net = ConvEncoder(self.data_shape, self._encoder_features)
            else:
                raise ConfigError(message("encoder", f"one of {NETS} or an nn.Module", repr(encoder),
                                          "pick a known network or pass your own module"))
            return self._wrap_encoder(net)
        if isinstance(encoder, nn.Module):
            self._config["encoder"] = None
            return self._wrap_encoder(encoder)
        raise ConfigError(message("encoder", f"one of {NETS} or an nn.Module", type(encoder).__name__,
                                  "pass a name or an nn.Module"))

    def _build_decoder(self, decoder: str | nn.Module) -> nn.Module:
        if isinstance(decoder, str):
            self._config["decoder"] = decoder
            if decoder in FIXED_NETS and self.decoder_context:
                raise ConfigError(message("decoder", '"mlp" or a module of yours with decoder_context',
                                          repr(decoder), "pass a module taking decoder(z, **context)"))
            if decoder in FIXED_NETS:
                hidden, activation = FIXED_NETS[decoder]
                return MLPDecoder(self._decoder_features, self.data_shape, hidden, activation)
            if decoder == "mlp" and self.decoder_context:
                return ContextMLP((self._decoder_features,), self.decoder_context, self.data_shape, self.hidden)
            if decoder == "mlp":
                return MLPDecoder(self._decoder_features, self.data_shape, self.hidden)
            if decoder == "conv" and self.decoder_context:
                raise ConfigError(message("decoder", '"mlp" or a module of yours with decoder_context',
                                          '"conv"', "pass a module taking decoder(z, **context)"))
            if decoder == "conv":
                return ConvDecoder(self._decoder_features, self.data_shape)
            raise ConfigError(message("decoder", f"one of {NETS} or an nn.Module", repr(decoder),
                                      "pick a known network or pass your own module"))
        if isinstance(decoder, nn.Module):
            self._config["decoder"] = None
            return decoder
        raise ConfigError(message("decoder", f"one of {NETS} or an nn.Module", type(decoder).__name__,
                                  "pass a name or an nn.Module"))

    @torch.no_grad()
    def _check_shapes(self) -> None:
        """Run every part once on a dummy batch of two and compare shapes with ``data_shape``/``z_dim``."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            device = next((t.device for t in self.parameters()), torch.device("cpu"))
            x = torch.zeros(2, *self.data_shape, device=device, dtype=self._dtype())
            dummy = {k: torch.zeros(2, *shape, device=device, dtype=self._dtype())
                     for k, shape in {**self.encoder_context, **self.decoder_context}.items()}
            q = self._guide_dist(x, **dummy)
            # A prior or likelihood that needs context values is checked when the model gives them.
            if binds(self.prior):
                prior = self._prior_dist()
                if tuple(prior.event_shape) != tuple(q.event_shape):
                    raise ShapeError(message(
                        f'prior at site "{self.site("z")}"', f"event shape {tuple(q.event_shape)} (the guide's)",
                        f"event shape {tuple(prior.event_shape)} from {type(prior).__name__}",
                        "return a distribution over the whole latent vector, e.g. "
                        "dist.Normal(loc, scale).to_event(1)"))
                self._check_latent_representation(prior, q)
            if tuple(q.batch_shape) != (2,):
                raise ShapeError(message(
                    f'guide at site "{self.site("z")}"', "batch shape (batch,) = (2,) for an input batch of 2",
                    f"batch shape {tuple(q.batch_shape)}", "make the encoder return (batch, 2 * z_dim)"))
            z = q.sample()
            out = self._decode_raw(z, **dummy)
            if tuple(out.shape[:1]) != (2,):
                raise ShapeError(message("decoder output", "leading batch dimension 2 for a batch of 2 latents",
                                         f"shape {tuple(out.shape)}",
                                         "keep the batch dimensions of z in front of the decoder's output"))
            if binds(self.likelihood, out):
                self.likelihood_dist(out, batch_shape=(2,))
        finally:
            for m, mode in modes:
                m.training = mode

    # ---------------------------------------------------------------------------------- Pyro sites
    _registered = False  # True inside modules_registered(): the modules are in Pyro's param store already

    @contextmanager
    def modules_registered(self) -> Iterator[None]:
        """Within this context :meth:`model` and :meth:`guide` do not call ``pyro.module`` on the VAE's networks:
        for the training steps after the first (:func:`pyro_vae.train.svi_step` with ``validate=False``), whose
        ELBO differentiates the modules' own parameters, once a first call has registered them."""
        previous, self._registered = self._registered, True
        try:
            yield
        finally:
            self._registered = previous

    def _register(self, key: str, module: Any) -> None:
        if self._registered or not isinstance(module, nn.Module) or next(module.parameters(), None) is None:
            return
        name = self.site(key)
        if not pyro.settings.get("module_local_params"):
            store = pyro.get_param_store()
            for pname, param in module.named_parameters():
                full = param_with_module_name(name, pname)
                if unconstrained_params(store).get(full, param) is not param:
                    raise ConfigError(message(
                        f'Pyro param "{full}"', "the parameter of this VAE's module",
                        "a parameter of another module registered under the same name",
                        "call pyro.clear_param_store() before building a new VAE, or give each VAE its own name="))
        pyro.module(name, module)

    @property
    def beta(self) -> float:
        """KL weight of the latent site, a finite number > 0 (1 gives the ELBO); setting it validates it."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = check_beta("beta", value)
        if self._beta != 1.0:
            _WEIGHTED.add(self)
        else:
            _WEIGHTED.discard(self)

    def _part_error(self, part: str, expected: str, found: str, fix: str) -> ModelError:
        return ModelError(message(part, expected, found, fix))

    @staticmethod
    def _first_line(e: BaseException) -> str:
        text = (str(e).strip().splitlines() or [""])[0].rstrip(":")[:240]
        return f"invalid parameters ({type(e).__name__}: {text})"

    @staticmethod
    def _is_broadcast_error(e: RuntimeError) -> bool:
        """Whether ``e`` is torch's refusal to broadcast two shapes (not, say, an out-of-memory error)."""
        text = str(e)
        return not isinstance(e, torch.OutOfMemoryError) and (
            "must match the size of tensor" in text or "broadcast" in text or "shape" in text)

    def _context_shape_error(self, what: str, context: Mapping[str, Any], e: RuntimeError,
                             out: torch.Tensor | None = None) -> ShapeError:
        """The :class:`ShapeError` for a part (``what``: the prior or the likelihood) whose context values do not
        broadcast against the data plate: the context's shapes, the decoder output's (``out``), and the fix."""
        shapes = ", ".join(f"{k}: {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}"
                           for k, v in context.items())
        event = self.data_shape if out is not None else self.latent_shape
        found = (f"context {{{shapes}}}" + (f" with the decoder output of shape {tuple(out.shape)}"
                                            if out is not None else "")
                 + f", which do not broadcast ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:240]})")
        trailing = "[..., " + ", ".join(["None"] * len(event)) + "]"
        return ShapeError(message(
            what, "context values that broadcast against the data plate: a per-data-point value (batch, ...) or a "
            f"global value aligned to the plate dimensions, with one trailing dimension of size 1 per event "
            f"dimension {tuple(event)}", found,
            "give each global value one trailing dimension of size 1 per event dimension; under vectorized particles "
            "(num_particles >= 2) a global latent drawn outside the data plate has shape (P, 1, ..., 1) (one 1 per "
            f"plate dimension): pass value{trailing} (value.reshape(value.shape + {(1,) * len(event)})), or sample "
            f"it with event shape {(1,) * len(event)} "
            "(dist.LogNormal(0., 1.).expand([" + ", ".join(["1"] * len(event)) + "]).to_event("
            f"{len(event)})); a per-data-point value needs one row per data point of the plate"))

    def _prior_dist(self, **context: Any) -> dist.TorchDistribution:
        """``self.prior(**context)``, or :class:`ModelError` naming the prior when it fails or returns no
        distribution (:class:`ConfigError` when it does not take the context, :class:`ShapeError` when its
        context values do not broadcast)."""
        what = f'prior at site "{self.site("z")}"'
        try:
            p: dist.TorchDistribution = call_with_context(what, self.prior, context=context,
                                  fix="pass the values the prior needs to vae.model / vae.sample as keyword arguments")
        except PyroVAEError:
            raise
        except RuntimeError as e:
            if context and self._is_broadcast_error(e):
                raise self._context_shape_error(what, context, e) from e
            raise
        except ValueError as e:  # a distribution built from NaN or infinite parameters
            raise self._part_error(what, "a distribution with valid parameters", self._first_line(e),
                                   "check the prior's parameters for NaN or infinite values") from e
        if not isinstance(p, torch.distributions.Distribution):
            raise self._part_error(what, "a distribution (e.g. dist.Normal(loc, scale).to_event(1))",
                                   f"{type(p).__name__}", "return a pyro.distributions object from the prior, "
                                   "not a sample or a tensor")
        return p

    def part_context(self, part: str, context: Mapping[str, Any]) -> dict[str, Any]:
        """The values of ``context`` that the ``"encoder"`` or ``"decoder"`` takes (its ``encoder_context`` /
        ``decoder_context`` names).

        Raises:
            ConfigError: a name the part takes has no value in ``context``.
        """
        names = self.encoder_context if part == "encoder" else self.decoder_context
        missing = [k for k in names if k not in context]
        if missing:
            raise ConfigError(message(
                f"context of the {part}", f"values for its {part}_context names {list(names)}",
                f"none for {missing} (context given: {sorted(context)})",
                f"pass them as keyword arguments, e.g. vae.model(x, {missing[0]}=...) and vae.guide(x, "
                f"{missing[0]}=...)"))
        return {k: context[k] for k in names}

    def check_context_rows(self, n: int, context: Mapping[str, Any]) -> None:
        """Check that each per-data-point value of ``context`` (a name of ``encoder_context`` /
        ``decoder_context`` with a leading data dimension) has ``n`` rows, one per data point, through
        :func:`~pyro_vae.models.context.check_context` (as the training and evaluation tools check it).

        Raises:
            DataError: such a value whose first dimension is not ``n``, naming it, both row counts and the fix.
        """
        check_context("context", context, n, {**self.encoder_context, **self.decoder_context})

    def _guide_dist(self, x: torch.Tensor, **context: Any) -> dist.TorchDistribution:
        """``self.encoder.distribution(x, **encoder context)``, or :class:`ModelError` naming the encoder."""
        what = f'encoder at site "{self.site("z")}"'
        try:
            ctx = self.part_context("encoder", context)
            q = self.encoder.distribution(x, **ctx) if ctx else self.encoder.distribution(x)
        except PyroVAEError:
            raise
        except ValueError as e:
            raise self._part_error(what, "a distribution with valid parameters", self._first_line(e),
                                   "check the encoder network for NaN or infinite outputs (e.g. a learning rate "
                                   "too high, or non-finite data)") from e
        if not isinstance(q, torch.distributions.Distribution):
            raise self._part_error(what, "a distribution from encoder.distribution(x)", type(q).__name__,
                                   "return a pyro.distributions object")
        return q

    def _decode_raw(self, z: torch.Tensor, **context: Any) -> torch.Tensor:
        """The decoder's output for latents ``z`` (and its context), or :class:`ModelError` when it is not a
        tensor."""
        ctx = self.part_context("decoder", context)
        out = self.decoder(self.decoder_input(z), **ctx) if ctx else self.decoder(self.decoder_input(z))
        if not torch.is_tensor(out):
            raise self._part_error("decoder", "a tensor (..., *data_shape) of the likelihood's parameters",
                                   type(out).__name__, "return one tensor from the decoder's forward")
        return out

    def kl_scale(self) -> ExitStack:
        """A context that scales the latent site's log-densities by the KL weight ``beta`` (empty when it is 1)."""
        stack = ExitStack()
        if self.beta != 1.0 and not _UNIT_KL_WEIGHT:
            stack.enter_context(poutine.scale(scale=self.beta))
        return stack

    def likelihood_dist(self, out: torch.Tensor, batch_shape: tuple | None = None,
                        **context: Any) -> dist.TorchDistribution:
        """p(x | z) for decoder output ``out`` ``(..., *decoder_shape)``: ``likelihood(out, **context)`` with the
        data dimensions as its event shape (its batch shape checked against ``batch_shape`` when given).

        Raises:
            ModelError: the likelihood refused ``out`` (e.g. a non-finite decoder output), naming the part.
            ConfigError: the likelihood does not take the context given, or needs a value not given.
            ShapeError: the distribution's event shape is not ``data_shape`` or its batch shape not ``batch_shape``;
                or context values that do not broadcast against ``out`` (e.g. a global latent of shape ``(P, 1)``
                under vectorized particles without a trailing dimension per data dimension), naming their shapes.
        """
        what = f'likelihood at site "{self.site("x")}"'
        try:
            px: dist.TorchDistribution = call_with_context(what, self.likelihood, out, context=context,
                                   fix="pass the values the likelihood needs to vae.model / vae.sample as keyword "
                                   "arguments")
        except PyroVAEError:
            raise
        except RuntimeError as e:
            if context and self._is_broadcast_error(e):
                raise self._context_shape_error(what, context, e, out) from e
            raise
        except ValueError as e:
            bad = ~torch.isfinite(out)
            if bool(bad.any()):
                raise self._part_error(f'decoder (input of the likelihood at site "{self.site("x")}")',
                                       "finite outputs", f"{int(bad.sum())} NaN or infinite values",
                                       "check the decoder network (e.g. a learning rate too high)") from e
            raise self._part_error(what, "a distribution with valid parameters", self._first_line(e),
                                   "check how the likelihood maps the decoder's output to parameters") from e
        if not isinstance(px, torch.distributions.Distribution):
            raise self._part_error(what, "a distribution (e.g. dist.Bernoulli(logits=out))", type(px).__name__,
                                   "return a pyro.distributions object from the likelihood")
        extra = len(self.data_shape) - len(px.event_shape)
        if extra > 0:
            px = px.to_event(extra)
        if tuple(px.event_shape) != self.data_shape or (
            batch_shape is not None and tuple(px.batch_shape) != tuple(batch_shape)
        ):
            raise ShapeError(message(
                f'likelihood at site "{self.site("x")}"',
                f"event shape data_shape = {self.data_shape}" + (f", batch shape {batch_shape}" if batch_shape else ""),
                f"event shape {tuple(px.event_shape)}, batch shape {tuple(px.batch_shape)}",
                "make the decoder return (..., *data_shape) and the likelihood one value per data entry"))
        return px

    def _dtype(self) -> torch.dtype:
        """The dtype of the VAE's floating-point parameters (data are cast to it)."""
        t = next((p for p in self.parameters() if p.is_floating_point()), None)
        return t.dtype if t is not None else torch.get_default_dtype()

    def _check_shape(self, x: Any, what: str, data_set: bool) -> None:
        if not torch.is_tensor(x):
            raise DataError(message(what, "a torch.Tensor", type(x).__name__, "convert with torch.as_tensor(x)"))
        nd = len(self.data_shape)
        shape = ", ".join(map(str, self.data_shape))
        if x.dim() < nd + 1 or tuple(x.shape[-nd:]) != self.data_shape:
            raise DataError(message(
                what, f"shape (batch, *data_shape) = (batch, {shape})", f"shape {tuple(x.shape)}",
                "reshape the data or build the VAE with data_shape matching one data point"))
        if data_set and x.dim() != nd + 1:
            raise DataError(message(
                what, f"a data set of shape (N, *data_shape) = (N, {shape}), one data point per row",
                f"shape {tuple(x.shape)} ({x.dim() - nd} leading dimensions)",
                f"reshape it to (N, {shape}) (x.reshape(-1, {shape})), or build the VAE with "
                f"data_shape={tuple(x.shape[1:])} if each row of shape {tuple(x.shape[1:])} is one data point"))
        if x.shape[0] == 0 or x.numel() == 0:
            raise DataError(message(what, "at least one data point", "an empty batch", "pass non-empty data"))

    def as_data(self, x: Any, what: str = "x", *, data_set: bool = False) -> torch.Tensor:
        """``x`` checked for shape and cast to the dtype of the VAE's parameters (floating-point, integer and
        bool data are cast; complex data raise :class:`~pyro_vae.errors.DataError`). Values are not checked:
        see :meth:`check_data`.

        Args:
            x: ``(batch, *data_shape)``; with ``data_set=True`` exactly ``(N, *data_shape)`` (the model and
                guide also take leading dimensions of the caller's outer plates).
            what: the name used in error messages.
        """
        self._check_shape(x, what, data_set)
        return cast_data(x, self._dtype(), what)

    def check_data(self, x: torch.Tensor, what: str = "x", *, data_set: bool = False) -> None:
        """Raise :class:`~pyro_vae.errors.DataError` unless ``x`` is a non-empty ``(batch, *data_shape)``
        tensor of real numbers (floating point, integer or bool: the model and guide cast them to the dtype of
        the VAE's parameters) whose values are finite in that dtype and inside the likelihood's support.
        ``data_set=True``: exactly ``(N, *data_shape)``, as :func:`~pyro_vae.fit` and the evaluation
        functions take it."""
        x = self.as_data(x, what, data_set=data_set)
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            raise DataError(message(what, "finite values", f"{int((~finite).sum())} NaN or infinite values",
                                    "drop or impute the non-finite entries first"))
        if isinstance(self.likelihood, Likelihood):
            self.likelihood.check_data(x, what)

    def _batch_size(self, x: torch.Tensor) -> int:
        # The "data" plate covers the dimension just left of data_shape; any further leading dimensions of x
        # belong to the caller's outer plates (declared with dim=-2 or lower).
        return x.shape[x.dim() - len(self.data_shape) - 1]

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        """The model's and guide's ``x``: its shape checked, cast to the parameters' dtype, and under Pyro's
        validation its values checked too."""
        if is_validation_enabled():
            self.check_data(x)
        else:
            self._check_shape(x, "x", False)
        dtype = self._dtype()
        return x if x.dtype == dtype else cast_data(x, dtype, "x")

    def model(self, x: torch.Tensor | None = None, num_data: int | None = None, batch_size: int | None = None, *,
              subsample_size: int | None = None, **context: Any) -> torch.Tensor:
        """p(z) p(x | z) over a batch.

        Inside the data plate (and the KL weight's ``poutine.scale``) the model samples ``"z"`` from
        ``prior(**context)``, decodes it (the decoder given its ``decoder_context`` values) and observes ``"x"``
        under ``likelihood(decoder_output, **context)``. A ``pyro.sample`` inside a custom prior or likelihood is
        therefore inside the plate: one value per data point. Sample a global latent in the enclosing model,
        outside this call, and pass its value as context.

        Args:
            x: ``(batch, *data_shape)`` observations, or ``None`` to sample ``x``. With ``subsample_size``: the
                full data set ``(N, *data_shape)``.
            num_data: size of the full data set when ``x`` is a minibatch (scales the ELBO).
            batch_size: number of points to generate when ``x`` is ``None``.
            subsample_size: draw a random subsample of this many points of ``x`` in the data plate (Pyro's
                ``pyro.plate(..., subsample_size=...)``; the guide draws the indices and the model replays them
                under SVI); log-densities are scaled by ``N / subsample_size``.
            context: named context for the parts. A value is per data point when it is a tensor whose first
                dimension is the plate's (``batch``; ``N`` with ``subsample_size``, where the plate's indices
                select its rows as they select ``x``'s); every other value (a tensor without that dimension, a
                number, another site's value) is global and passed as it is.

        Returns:
            The decoder output ``(batch, *data_shape)`` (logits or means, per the likelihood).

        Raises:
            ConfigError: a part that does not take the context given, a value the encoder or decoder needs that
                is missing, or a bad ``batch_size`` / ``subsample_size``.
            DataError: a per-data-point context value of ``num_data`` rows for a minibatch ``x``.
        """
        self.register_with_pyro("decoder", "prior", "likelihood")
        if x is not None:
            x = self._check_x(x)
            batch, device = self._batch_size(x), x.device
        else:
            if batch_size is None:
                raise ConfigError(message("batch_size", "an integer when x is None", "None",
                                          "call model(batch_size=n) to generate n points"))
            batch, device = integer("batch_size", batch_size, 1), self.device
        with self.context_plate(x, batch, num_data, subsample_size, device, context) as (x, context):
            with self.kl_scale():
                z = pyro.sample(self.site("z"), self._prior_dist(**context))
            out = self._decode_raw(z, **context)
            pyro.sample(self.site("x"), self.likelihood_dist(out, **context), obs=x)
        return out

    def guide(self, x: torch.Tensor, num_data: int | None = None, batch_size: int | None = None, *,
              subsample_size: int | None = None, **context: Any) -> torch.Tensor:
        """q(z | x) over a batch; same signature as :meth:`model` (``batch_size`` is unused; the encoder gets the
        values of its ``encoder_context`` names, the rest of the context is unused).

        Returns:
            The latent sample ``(batch, *latent_shape)`` (log space for a categorical latent).
        """
        self.register_with_pyro("encoder")
        if x is None:
            raise ConfigError(message("guide x", "a data batch", "None",
                                      "the guide encodes data: sample from the prior with vae.sample(n)"))
        x = self._check_x(x)
        with self.context_plate(x, self._batch_size(x), num_data, subsample_size, x.device, context) as (x, context):
            with self.kl_scale():
                return pyro.sample(self.site("z"), self._guide_dist(x, **context))

    @contextmanager
    def context_plate(self, x: torch.Tensor | None, batch: int, num_data: int | None, subsample_size: int | None,
                      device: torch.device, context: Mapping[str, Any]
                      ) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The data plate of :meth:`model` and :meth:`guide`, yielding ``(x, context)`` as the plate sees them.

        Without ``subsample_size``: :meth:`plate` over ``batch`` points (from ``num_data``), ``x`` and the context
        as given. With it: ``pyro.plate(site("data"), batch, subsample_size=...)``, whose indices select the rows
        of ``x`` and of each per-data-point context value (:func:`~pyro_vae.models.context.is_per_point`).

        Raises:
            ConfigError: ``subsample_size`` not an integer >= 1, given without ``x``, or with a ``num_data`` other
                than ``x``'s size.
            DataError: without ``subsample_size``, a per-data-point context value of ``num_data`` rows for a
                minibatch of ``batch < num_data`` points (its rows would not be the minibatch's).
        """
        if subsample_size is None:
            if num_data is not None and num_data != batch:
                for k, v in context.items():
                    if is_per_point(v, num_data):
                        raise DataError(message(
                            f"context {k!r}", f"the minibatch's rows ({batch}, like x) or a global value",
                            f"shape {tuple(v.shape)}: num_data = {num_data} rows",
                            f"pass {k}={k}[idx] for the minibatch x = data[idx], or the full data with "
                            f"subsample_size={batch}"))
            with self.plate(batch, num_data, device):
                yield x, dict(context)
            return
        if x is None:
            raise ConfigError(message("subsample_size", "the full data set x to subsample", "x=None",
                                      "pass x, or batch_size=n to generate n points"))
        size = integer("subsample_size", subsample_size, 1)
        if num_data is not None and num_data != batch:
            raise ConfigError(message("num_data", f"None or x's size {batch} with subsample_size (x is the full "
                                      "data set)", repr(num_data), "drop num_data"))
        with pyro.plate(self.site("data"), batch, subsample_size=size, device=device) as idx:  # type: ignore[arg-type]
            rows = cast(torch.Tensor, idx)
            at = x.dim() - len(self.data_shape) - 1
            yield x.index_select(at, rows.to(x.device)), {
                k: v.index_select(0, rows.to(v.device)) if is_per_point(v, batch) else v for k, v in context.items()}

    # ------------------------------------------------------------------------------- plain torch use
    @torch.no_grad()
    def encode(self, x: torch.Tensor, **context: Any) -> torch.Tensor:
        """The posterior's location for each data point, in the latent site's representation.

        Gaussian latent: the posterior means ``E_q[z | x]``, ``(batch, z_dim)``. Categorical latent: the log
        class probabilities ``log q(c | x)``, ``(batch, z_dim, categories)``, the log-space point of the mean
        of the categorical the Concrete relaxes (``.exp()`` gives the probabilities); :meth:`decode` takes it.
        Bernoulli latent: the probabilities ``q(z_i = 1 | x)``, ``(batch, z_dim)`` (the exact latent's mean);
        with ``relaxed=True`` the logits of those probabilities, ``(batch, z_dim)``, the relaxed site's
        logit-space representation that :meth:`decode` takes, where the decoder sees ``sigmoid`` of it, the
        probabilities, as for the exact latent.
        ``context``: as for :meth:`model`; a per-data-point value is ``(batch, ...)``, one row per data point.

        Raises:
            DataError: a per-data-point context value whose rows are not ``x``'s (:meth:`check_context_rows`).
        """
        x = self.as_data(x)
        self.check_context_rows(x.shape[0], context)
        q = self._guide_dist(x, **context)
        logits = bernoulli_logits(q) if self.latent == "bernoulli" and self.relaxed else None
        if logits is not None:  # relaxed Bernoulli: the logits of a 1 (the value's space); exact: q.mean below
            return logits
        log_p = log_class_probs(q)
        return q.mean if log_p is None else log_p

    def decode_dist(self, z: torch.Tensor, **context: Any) -> dist.TorchDistribution:
        """The model's likelihood ``p(x | z)`` at latents ``z`` ``(..., *latent_shape)`` (for a categorical
        latent, the log of relaxed one-hot points, see :meth:`decoder_input`): a distribution of batch shape
        ``z``'s batch dimensions and event shape ``data_shape``. ``context``: as for :meth:`model` (the decoder
        gets its ``decoder_context`` values, the likelihood all of them); a per-data-point value is
        ``(batch, ...)`` for ``z`` of ``(batch, *latent_shape)``, and the batch shape is then the broadcast of
        both.

        Raises:
            ShapeError: ``z`` not shaped ``(..., *latent_shape)``.
            DataError: a categorical ``z`` that is not in log space (e.g. a one-hot: pass ``z.log()``).
            ConfigError: a part that does not take the context, or a missing decoder context value.
        """
        self._check_latents(z)
        return self.likelihood_dist(self._decode_raw(z, **context), **context)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, mean: bool = True, **context: Any) -> torch.Tensor:
        """Likelihood means (``mean=True``) or draws, ``(..., *data_shape)``, for latents ``z``
        ``(..., *latent_shape)`` in the latent site's representation (categorical: log space, e.g.
        ``F.one_hot(c, k).float().log()`` for hard classes ``c``); context and errors as :meth:`decode_dist`."""
        px = self.decode_dist(z, **context)
        return px.mean if mean else px.sample()

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, source: str = "prior", data: torch.Tensor | None = None,
               **kwargs: Any) -> torch.Tensor:
        """``n`` ancestral samples ``(n, *data_shape)``: ``z ~ p(z)``, then the likelihood's mean
        (``mean=True``) or a draw from it. For a categorical latent ``z`` is the hard one-hot of the prior's
        draw (its arg-max is an exact draw of the categorical it relaxes).

        With ``source="prior"`` the ``kwargs`` are the model's context, as ``model(None, batch_size=n,
        **context)`` takes it: the ``n`` samples are the points of one data plate, so a per-data-point value is
        ``(n, ...)`` (one row per sample; repeat a row to draw several samples for it) and a global value is
        passed whole. The result is always ``(n, *data_shape)``: a prior or likelihood whose batch shape under the
        context is not ``()`` or ``(n,)`` is a :class:`~pyro_vae.errors.ShapeError`.

        ``source="aggregate"`` or ``"mixture"`` (with ``data`` and the ``kwargs`` of
        :func:`pyro_vae.generation.sample`) still draws from the aggregate posterior or a mixture fitted to it,
        for this release only, with a ``DeprecationWarning``: call ``pyro_vae.generation.sample(vae, n,
        source=..., data=...)``, where those samplers live.

        Raises:
            ConfigError: ``n`` is not an integer >= 1 whose samples fit in memory (or, through
                :func:`pyro_vae.generation.sample`, a bad ``source`` or missing ``data``).
            DataError: a per-data-point context value whose first dimension is not ``n``
                (:meth:`check_context_rows`).
        """
        if source != "prior":
            extra = "".join(f", {k}=..." for k in kwargs)
            warn_deprecated(f"VAE.sample(source={source!r}) moved to pyro_vae.generation.sample(vae, n, "
                            f"source={source!r}, data=...{extra}); VAE.sample will draw from the prior only")
            # pyro_vae.generation sits above the models (it evaluates them): reached at call time, for this
            # deprecated route only
            generation = importlib.import_module("pyro_vae.generation")
            return generation.sample(self, n, source, data=data, mean=mean, **kwargs)
        n = self.check_sample_size(n)
        self.check_context_rows(n, kwargs)
        z = self.sample_prior(n, **kwargs)
        if self.categories is not None:
            # arg-max of a Concrete draw is an exact draw of the categorical it relaxes (Gumbel-max); the
            # decoder sees its one-hot (log space: 0 at the class, -inf elsewhere)
            z = log_one_hot(z.argmax(-1), self.categories, z.dtype)
        elif self.latent == "bernoulli" and self.relaxed:
            # the sign of a binary Concrete draw is an exact Bernoulli draw: its hard value in logit space is +-inf
            z = torch.where(z > 0, math.inf, -math.inf).to(z.dtype)
        out = self.decode(z, mean=mean, **kwargs)
        if tuple(out.shape) != (n, *self.data_shape):
            raise ShapeError(message(
                f'likelihood at site "{self.site("x")}" under the context {sorted(kwargs)}',
                f"one distribution per sample, samples of shape (n, *data_shape) = {(n, *self.data_shape)}",
                f"samples of shape {tuple(out.shape)}",
                f"pass global context values without leading dimensions, or per-data-point values of {n} rows"))
        return out

    @torch.no_grad()
    def sample_prior(self, n: int, **context: Any) -> torch.Tensor:
        """``n`` draws of the latent site from ``prior(**context)``, ``(n, *latent_shape)``, as the model draws
        them in a data plate of ``n`` points: the prior's batch shape must be ``()`` (one distribution for all
        points) or ``(n,)`` (one per point, from per-data-point context of ``n`` rows).

        Raises:
            ShapeError: the prior's batch shape is neither.
            ConfigError: the prior does not take the context, or needs a value not given.
        """
        p = self._prior_dist(**context)
        shape = tuple(p.batch_shape)
        if shape == ():
            return p.sample((n,))
        if shape == (n,):
            return p.sample()
        raise ShapeError(message(
            f'prior at site "{self.site("z")}" under the context {sorted(context)}',
            f"batch shape () (global context) or ({n},) (one context row per sample)", f"batch shape {shape}",
            f"pass global context values without leading dimensions, or per-data-point values of {n} rows"))

    def check_sample_size(self, n: Any, name: str = "n") -> int:
        """``n`` as an int >= 1 whose samples (with their latents and the decoder's activations) fit in the
        memory of the VAE's device, else :class:`~pyro_vae.errors.ConfigError`."""
        n = integer(name, n, 1)
        per_point = 2 * (math.prod(self.data_shape) + self._decoder_features + sum(self.hidden))
        check_memory(name, n * per_point * torch.finfo(self._dtype()).bits // 8, self.device,
                     "draw fewer samples at once", f"{n} samples of shape {self.data_shape}")
        return n

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mean: bool = True, **context: Any) -> torch.Tensor:
        """Decode :meth:`encode` of each data point (the posterior mean; for a categorical latent the class
        probabilities): ``(batch, *data_shape)``. ``context`` goes to both, as for :meth:`model`.

        Raises:
            DataError: a per-data-point context value whose rows are not ``x``'s (:meth:`check_context_rows`).
        """
        return self.decode(self.encode(x, **context), mean=mean, **context)

    @property
    def config(self) -> dict[str, Any] | None:
        """JSON-able description that rebuilds this VAE (``None`` when a part is a user object)."""
        if any(self._config.get(k) is None for k in ("encoder", "decoder", "prior", "likelihood")):
            return None
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VAE:
        """A new VAE built from :attr:`config` (its parameters freshly initialized: load the weights after).

        Raises:
            KeyError: ``config`` lacks ``data_shape``, ``z_dim``, ``encoder``, ``decoder``, ``prior``,
                ``likelihood`` or ``hidden``.
            ConfigError: a value the constructor refuses.
        """
        cfg = dict(config)
        return cls(cfg.pop("data_shape"), cfg.pop("z_dim"), encoder=cfg.pop("encoder"), decoder=cfg.pop("decoder"),
                   prior=cfg.pop("prior"), likelihood=cfg.pop("likelihood"), hidden=cfg.pop("hidden"),
                   name=cfg.pop("name", ""), latent=cfg.pop("latent", "gaussian"),
                   categories=cfg.pop("categories", None), temperature=cfg.pop("temperature", 1.0),
                   straight_through=cfg.pop("straight_through", False),
                   relaxed=cfg.pop("relaxed", False),
                   encoder_context=cfg.pop("encoder_context", None), decoder_context=cfg.pop("decoder_context", None))

    def extra_repr(self) -> str:
        return f"data_shape={self.data_shape}, z_dim={self.z_dim}, name={self.name!r}"


def num_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())


#: Open :func:`unit_kl_weight` blocks (a stack, so that they nest).
_UNIT_KL_WEIGHT: list[bool] = []
#: The VAEs whose ``beta`` is not 1 (weakly held).
_WEIGHTED: weakref.WeakSet[VAE] = weakref.WeakSet()


def _vaes_in(obj: Any) -> list[VAE]:
    """The :class:`VAE` instances reachable from ``obj``: the object itself, the owner of a bound method
    (``vae.model``), and the submodules of an ``nn.Module``."""
    owner = getattr(obj, "__self__", obj)
    if isinstance(owner, nn.Module):
        return [m for m in owner.modules() if isinstance(m, VAE)]
    return []


@contextmanager
def unit_kl_weight(*objs: Any) -> Iterator[None]:
    """Within the block every :class:`VAE` reachable from ``objs`` (VAEs, modules holding them, or their bound
    ``model``/``guide``) weighs its latent sites with ``beta = 1``, so Pyro's ELBO on their traces is the ELBO
    itself, not the beta-weighted training objective ``E_q[log p(x|z)] - beta KL``. Each ``beta`` is restored
    on exit. Inside the block, every VAE, also one the block cannot reach (called from a user's own model
    function), ignores its ``beta``: :meth:`VAE.kl_scale` is empty. Every quantity named ELBO or log p(x) is
    computed inside it."""
    saved = [(v, v.beta) for obj in objs for v in _vaes_in(obj)]
    _UNIT_KL_WEIGHT.append(True)
    try:
        for v, _ in saved:
            v.beta = 1.0
        yield
    finally:
        _UNIT_KL_WEIGHT.pop()
        for v, beta in reversed(saved):
            v.beta = beta


def kl_weighted_vaes() -> list[VAE]:
    """The live :class:`VAE` instances whose KL weight ``beta`` is not 1 (their training objective is not the
    ELBO): what a tool checks when it cannot see which VAEs a user's own model calls."""
    return list(_WEIGHTED)
