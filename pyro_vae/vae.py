"""The variational autoencoder as a Pyro ``model`` / ``guide`` pair.

``model(x)`` samples ``z`` from the prior and scores ``x`` under the likelihood of the decoder's output;
``guide(x)`` samples ``z`` from the encoder's distribution. Both are ordinary Pyro callables with the same
signature and the same single plate, so they work under ``SVI`` with any ELBO, under ``Predictive``,
``poutine`` handlers, and inside a larger model.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any, Callable, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.params import param_with_module_name
from torch import nn

from .encoders import Encoder, GaussianEncoder
from .errors import ConfigError, DataError, ShapeError, message
from .likelihoods import Likelihood, build_likelihood
from .networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from .priors import build_prior

__all__ = ["VAE"]

NETS = ("mlp", "conv")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(message(name, f"an integer >= {minimum}", repr(value), f"pass {name} >= {minimum}"))
    return value


class VAE(nn.Module):
    """A VAE whose parts are all swappable.

    Args:
        data_shape: shape of one data point, e.g. ``(64,)`` or ``(1, 28, 28)``.
        z_dim: number of latent dimensions.
        encoder: ``"mlp"``, ``"conv"``, an :class:`~pyro_vae.encoders.Encoder` (used as the guide
            distribution as is), or any ``nn.Module`` mapping ``(batch, *data_shape)`` to
            ``(batch, 2 * z_dim)``, wrapped in a :class:`~pyro_vae.encoders.GaussianEncoder`.
        decoder: ``"mlp"``, ``"conv"``, or any ``nn.Module`` mapping ``(..., z_dim)`` to
            ``(..., *data_shape)``.
        prior: ``None`` (standard normal), a name, or a callable returning a distribution with event
            shape ``(z_dim,)``; an ``nn.Module`` prior learns with the rest.
        likelihood: ``"bernoulli"``, ``"continuous-bernoulli"``, ``"normal"``, ``"normal-learned"``, a
            config dict, or a callable ``decoder_output -> Distribution``.
        hidden: hidden layer sizes of the MLP networks.
        name: prefix for every Pyro site and module name (``"a"`` gives sites ``"a/z"``, ``"a/x"`` and
            the plate ``"a/data"``), so several VAEs can live in one model.
        beta: weight of the latent site (KL weighting, Higgins et al. 2017), applied with
            ``poutine.scale`` in both model and guide.

    Sites (with ``name=""``): plate ``"data"`` over the batch, latent ``"z"`` of shape
    ``(batch, z_dim)``, observed ``"x"`` of shape ``(batch, *data_shape)``.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        z_dim: int,
        *,
        encoder: Union[str, nn.Module] = "mlp",
        decoder: Union[str, nn.Module] = "mlp",
        prior: Union[str, dict, Callable[[], dist.Distribution], None] = None,
        likelihood: Union[str, dict, Callable[[torch.Tensor], dist.Distribution]] = "bernoulli",
        hidden: Sequence[int] = (400,),
        name: str = "",
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(data_shape, int):
            data_shape = (data_shape,)
        self.data_shape = tuple(_check_int("data_shape entries", int(s) if not isinstance(s, bool) else s, 1)
                                for s in data_shape)
        if not self.data_shape:
            raise ConfigError(message("data_shape", "at least one dimension", "()", "pass e.g. data_shape=(64,)"))
        self.z_dim = _check_int("z_dim", z_dim, 1)
        self.hidden = tuple(int(h) for h in hidden)
        self.name = str(name)
        self.beta = beta
        self._config: dict[str, Any] = {"data_shape": list(self.data_shape), "z_dim": self.z_dim,
                                        "hidden": list(self.hidden), "name": self.name}

        self.encoder = self._build_encoder(encoder)
        self.decoder = self._build_decoder(decoder)
        self.prior = build_prior(prior, self.z_dim)
        self.likelihood = build_likelihood(likelihood, self.data_shape)
        for key, part in (("prior", self.prior), ("likelihood", self.likelihood)):
            cfg = getattr(part, "config", None)
            self._config[key] = cfg() if callable(cfg) else None
        self._check_shapes()

    # ----------------------------------------------------------------------------------- building
    def _build_encoder(self, encoder: Union[str, nn.Module]) -> Encoder:
        if isinstance(encoder, Encoder):
            self._config["encoder"] = None
            return encoder
        if isinstance(encoder, str):
            self._config["encoder"] = encoder
            if encoder == "mlp":
                net: nn.Module = MLPEncoder(self.data_shape, 2 * self.z_dim, self.hidden)
            elif encoder == "conv":
                net = ConvEncoder(self.data_shape, 2 * self.z_dim)
            else:
                raise ConfigError(message("encoder", f"one of {NETS} or an nn.Module", repr(encoder),
                                          "pick a known network or pass your own module"))
            return GaussianEncoder(net, self.z_dim)
        if isinstance(encoder, nn.Module):
            self._config["encoder"] = None
            return GaussianEncoder(encoder, self.z_dim)
        raise ConfigError(message("encoder", f"one of {NETS} or an nn.Module", type(encoder).__name__,
                                  "pass a name or an nn.Module"))

    def _build_decoder(self, decoder: Union[str, nn.Module]) -> nn.Module:
        if isinstance(decoder, str):
            self._config["decoder"] = decoder
            if decoder == "mlp":
                return MLPDecoder(self.z_dim, self.data_shape, self.hidden)
            if decoder == "conv":
                return ConvDecoder(self.z_dim, self.data_shape)
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
            x = torch.zeros(2, *self.data_shape, device=device)
            q = self.encoder.distribution(x)
            prior = self.prior()
            if tuple(prior.event_shape) != tuple(q.event_shape):
                raise ShapeError(message(
                    f'prior at site "{self._site("z")}"', f"event shape {tuple(q.event_shape)} (the guide's)",
                    f"event shape {tuple(prior.event_shape)} from {type(prior).__name__}",
                    "return a distribution over the whole latent vector, e.g. dist.Normal(loc, scale).to_event(1)"))
            if tuple(q.batch_shape) != (2,):
                raise ShapeError(message(
                    f'guide at site "{self._site("z")}"', "batch shape (batch,) = (2,) for an input batch of 2",
                    f"batch shape {tuple(q.batch_shape)}", "make the encoder return (batch, 2 * z_dim)"))
            z = q.sample()
            out = self.decoder(z)
            if tuple(out.shape[:1]) != (2,):
                raise ShapeError(message("decoder output", "leading batch dimension 2 for a batch of 2 latents",
                                         f"shape {tuple(out.shape)}",
                                         "keep the batch dimensions of z in front of the decoder's output"))
            self._likelihood_dist(out, batch_shape=(2,))
        finally:
            for m, mode in modes:
                m.training = mode

    # ---------------------------------------------------------------------------------- Pyro sites
    def _site(self, name: str) -> str:
        return f"{self.name}/{name}" if self.name else name

    def _register(self, key: str, module: Any) -> None:
        if not isinstance(module, nn.Module) or next(module.parameters(), None) is None:
            return
        name = self._site(key)
        if not pyro.settings.get("module_local_params"):
            store = pyro.get_param_store()
            for pname, param in module.named_parameters():
                full = param_with_module_name(name, pname)
                if full in store._params and store._params[full] is not param:
                    raise ConfigError(message(
                        f'Pyro param "{full}"', "the parameter of this VAE's module",
                        "a parameter of another module registered under the same name",
                        "call pyro.clear_param_store() before building a new VAE, or give each VAE its own name="))
        pyro.module(name, module)

    def _plate(self, batch: int, num_data: Optional[int], device: torch.device) -> pyro.plate:
        if num_data is None or num_data == batch:
            return pyro.plate(self._site("data"), batch, device=device)
        if num_data < batch:
            raise ConfigError(message("num_data", f"the full data-set size, >= the batch size {batch}",
                                      repr(num_data), "pass num_data=len(train_data)"))
        # Minibatch: the plate has the full size, so Pyro scales log-densities by num_data / batch.
        return pyro.plate(self._site("data"), num_data, subsample=torch.arange(batch, device=device))

    def _kl_scale(self) -> ExitStack:
        stack = ExitStack()
        if self.beta != 1.0:
            stack.enter_context(poutine.scale(scale=self.beta))
        return stack

    def _likelihood_dist(self, out: torch.Tensor, batch_shape: Optional[tuple] = None) -> dist.Distribution:
        px = self.likelihood(out)
        extra = len(self.data_shape) - len(px.event_shape)
        if extra > 0:
            px = px.to_event(extra)
        if tuple(px.event_shape) != self.data_shape or (
            batch_shape is not None and tuple(px.batch_shape) != tuple(batch_shape)
        ):
            raise ShapeError(message(
                f'likelihood at site "{self._site("x")}"',
                f"event shape data_shape = {self.data_shape}" + (f", batch shape {batch_shape}" if batch_shape else ""),
                f"event shape {tuple(px.event_shape)}, batch shape {tuple(px.batch_shape)}",
                "make the decoder return (..., *data_shape) and the likelihood one value per data entry"))
        return px

    def check_data(self, x: torch.Tensor, what: str = "x") -> None:
        """Raise :class:`~pyro_vae.errors.DataError` unless ``x`` is a non-empty, finite
        ``(batch, *data_shape)`` tensor inside the likelihood's support."""
        if not torch.is_tensor(x):
            raise DataError(message(what, "a torch.Tensor", type(x).__name__, "convert with torch.as_tensor(x)"))
        if x.dim() < len(self.data_shape) + 1 or tuple(x.shape[-len(self.data_shape):]) != self.data_shape:
            raise DataError(message(
                what, f"shape (batch, *data_shape) = (batch, {', '.join(map(str, self.data_shape))})",
                f"shape {tuple(x.shape)}",
                "reshape the data or build the VAE with data_shape matching one data point"))
        if x.shape[0] == 0:
            raise DataError(message(what, "at least one data point", "an empty batch", "pass non-empty data"))
        if not x.is_floating_point():
            raise DataError(message(what, "a floating-point tensor", f"dtype {x.dtype}",
                                    "convert with x.float() (and scale 8-bit images to [0, 1])"))
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

    def _check_x(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.data_shape:
            self.check_data(x)  # raises with the shape message
        if is_validation_enabled():
            self.check_data(x)

    def model(self, x: Optional[torch.Tensor] = None, num_data: Optional[int] = None,
              batch_size: Optional[int] = None) -> torch.Tensor:
        """p(z) p(x | z) over a batch.

        Args:
            x: ``(batch, *data_shape)`` observations, or ``None`` to sample ``x``.
            num_data: size of the full data set when ``x`` is a minibatch (scales the ELBO).
            batch_size: number of points to generate when ``x`` is ``None``.

        Returns:
            The decoder output ``(batch, *data_shape)`` (logits or means, per the likelihood).
        """
        self._register("decoder", self.decoder)
        self._register("prior", self.prior)
        self._register("likelihood", self.likelihood)
        if x is not None:
            self._check_x(x)
            batch, device = self._batch_size(x), x.device
        else:
            if batch_size is None:
                raise ConfigError(message("batch_size", "an integer when x is None", "None",
                                          "call model(batch_size=n) to generate n points"))
            batch, device = _check_int("batch_size", batch_size, 1), self._device()
        with self._plate(batch, num_data, device):
            with self._kl_scale():
                z = pyro.sample(self._site("z"), self.prior())
            out = self.decoder(z)
            pyro.sample(self._site("x"), self._likelihood_dist(out), obs=x)
        return out

    def guide(self, x: torch.Tensor, num_data: Optional[int] = None,
              batch_size: Optional[int] = None) -> torch.Tensor:
        """q(z | x) over a batch; same signature as :meth:`model` (``batch_size`` is unused).

        Returns:
            The latent sample ``(batch, z_dim)``.
        """
        self._register("encoder", self.encoder)
        if x is None:
            raise ConfigError(message("guide x", "a data batch", "None",
                                      "the guide encodes data: sample from the prior with vae.sample(n)"))
        self._check_x(x)
        with self._plate(self._batch_size(x), num_data, x.device):
            with self._kl_scale():
                return pyro.sample(self._site("z"), self.encoder.distribution(x))

    # ------------------------------------------------------------------------------- plain torch use
    def _device(self) -> torch.device:
        t = next(self.parameters(), None)
        if t is None:
            t = next(self.buffers(), None)
        return t.device if t is not None else torch.device("cpu")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior means ``E_q[z | x]``, ``(batch, z_dim)``."""
        return self.encoder.distribution(x).mean

    @torch.no_grad()
    def decode(self, z: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """Likelihood means (``mean=True``) or draws for latents ``(..., z_dim)``."""
        px = self._likelihood_dist(self.decoder(z))
        return px.mean if mean else px.sample()

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """``n`` ancestral samples ``(n, *data_shape)``: ``z ~ p(z)``, then the likelihood's mean
        (``mean=True``) or a draw from it."""
        n = _check_int("n", n, 1)
        z = self.prior().sample((n,))
        return self.decode(z, mean=mean)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """Decode the posterior mean of each data point: ``(batch, *data_shape)``."""
        return self.decode(self.encode(x), mean=mean)

    @property
    def config(self) -> Optional[dict[str, Any]]:
        """JSON-able description that rebuilds this VAE (``None`` when a part is a user object)."""
        if any(self._config.get(k) is None for k in ("encoder", "decoder", "prior", "likelihood")):
            return None
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "VAE":
        cfg = dict(config)
        return cls(cfg.pop("data_shape"), cfg.pop("z_dim"), encoder=cfg.pop("encoder"), decoder=cfg.pop("decoder"),
                   prior=cfg.pop("prior"), likelihood=cfg.pop("likelihood"), hidden=cfg.pop("hidden"),
                   name=cfg.pop("name", ""))

    def extra_repr(self) -> str:
        return f"data_shape={self.data_shape}, z_dim={self.z_dim}, name={self.name!r}"


def num_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
