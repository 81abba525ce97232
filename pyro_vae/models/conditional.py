"""Conditional pieces for VAEs inside larger Pyro models.

Networks that take extra inputs (a label, a context) beside ``x`` or ``z``, encoders and priors built on them,
and two models assembled from these parts as plain Pyro ``model`` / ``guide`` pairs:

* :class:`SSVAE`, the semi-supervised model M2 of Kingma et al. (2014), "Semi-supervised learning with deep
  generative models": ``y ~ Cat(uniform)``, ``z ~ p(z | y)``, ``x ~ p(x | y, z)``; the guide is
  ``q(y | x) q(z | x, y)``. ``y`` is observed for labelled points and, unobserved, is summed out exactly by
  Pyro's ``TraceEnum_ELBO`` when the guide is wrapped in ``config_enumerate``.
* :class:`CVAE`, the conditional VAE of Sohn et al. (2015), "Learning structured output representation using
  deep conditional generative models": ``z ~ p(z | c)``, ``x ~ p(x | z, c)``, guide ``q(z | x, c)``.

Every network broadcasts the leading (batch) dimensions of its inputs against each other, so an enumerated
label of shape ``(K, 1)`` meets a batch of ``(B, D)`` data and gives ``(K, B, ...)`` outputs.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyro_vae.encoders import Encoder
from pyro_vae.errors import ConfigError, DataError, NonFiniteLossError, ShapeError, message
from pyro_vae.likelihoods import Likelihood, build_likelihood
from pyro_vae.models.vae import data_plate
from pyro_vae.networks import MLP
from pyro_vae.priors import StandardNormal
from pyro_vae.validation import integer

__all__ = [
    "ConcatMLP",
    "ConditionalGaussianEncoder",
    "CategoricalEncoder",
    "ClassConditionalNormal",
    "ConditionalNormalPrior",
    "Unconditional",
    "SSVAE",
    "CVAE",
    "fit_semisupervised",
    "fit_classifier",
    "split_labelled",
    "accuracy",
]

Shape = Union[int, Sequence[int]]


def _shape(s: Shape) -> tuple[int, ...]:
    shape = (int(s),) if isinstance(s, int) else tuple(int(v) for v in s)
    if not shape or any(v < 1 for v in shape):
        raise ConfigError(message("shape", "a non-empty tuple of positive integers", repr(s), "pass e.g. (64,)"))
    return shape


class ConcatMLP(nn.Module):
    """An MLP over several inputs, flattened and concatenated along the features.

    Args:
        in_shapes: the event shape of each input, e.g. ``[(64,), (10,)]`` for an image and a one-hot label.
        out_shape: event shape of the output, e.g. ``(2 * z_dim,)`` or ``data_shape``.
        hidden: hidden layer sizes.

    ``forward(*inputs)`` takes tensors of shapes ``(*batch_i, *in_shapes[i])``; the ``batch_i`` broadcast
    against each other and the output is ``(*broadcast_batch, *out_shape)``.
    """

    def __init__(self, in_shapes: Sequence[Shape], out_shape: Shape, hidden: Sequence[int] = (400,),
                 activation: type[nn.Module] = nn.Softplus) -> None:
        super().__init__()
        self.in_shapes = [_shape(s) for s in in_shapes]
        self.out_shape = _shape(out_shape)
        hidden = tuple(integer("hidden entries", h, 1) for h in hidden)
        self.mlp = MLP((sum(math.prod(s) for s in self.in_shapes), *hidden, math.prod(self.out_shape)), activation)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.in_shapes):
            raise ShapeError(message("ConcatMLP inputs", f"{len(self.in_shapes)} tensors", f"{len(inputs)}",
                                     "pass one tensor per entry of in_shapes"))
        flat, batches = [], []
        for i, (t, shape) in enumerate(zip(inputs, self.in_shapes)):
            n = t.dim() - len(shape)
            if n < 0 or tuple(t.shape[n:]) != shape:
                raise ShapeError(message(f"ConcatMLP input {i}", f"shape (..., {', '.join(map(str, shape))})",
                                         f"shape {tuple(t.shape)}", "reshape the input or fix in_shapes"))
            batches.append(t.shape[:n])
            flat.append(t.reshape(*t.shape[:n], -1))
        batch = torch.broadcast_shapes(*batches)
        h = torch.cat([f.expand(*batch, f.shape[-1]) for f in flat], dim=-1)
        return self.mlp(h).reshape(*batch, *self.out_shape)


class ConditionalGaussianEncoder(Encoder):
    """``q(z | x, c) = N(loc, diag(scale^2))`` from a network of ``(x, *context)`` whose last output dimension
    is ``2 * z_dim`` (mean, then pre-softplus scale; ``scale = softplus(raw) + min_scale``)."""

    def __init__(self, net: nn.Module, z_dim: int, min_scale: float = 1e-4) -> None:
        super().__init__()
        self.net = net
        self.z_dim = integer("z_dim", z_dim, 1)
        self.min_scale = float(min_scale)

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(..., z_dim)``."""
        h = self.net(x, *context)
        if h.shape[-1] != 2 * self.z_dim:
            raise ShapeError(message("encoder network output", f"last dimension 2 * z_dim = {2 * self.z_dim}",
                                     f"shape {tuple(h.shape)}",
                                     f"make the encoder network end in {2 * self.z_dim} features"))
        loc, raw = h.split(self.z_dim, dim=-1)
        return loc, F.softplus(raw) + self.min_scale

    def distribution(self, x: torch.Tensor, *context: torch.Tensor) -> dist.Distribution:
        loc, scale = self(x, *context)
        return dist.Normal(loc, scale).to_event(1)


class CategoricalEncoder(Encoder):
    """``q(y | x) = Categorical(logits=net(x))`` for a network ending in ``num_classes`` features."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = integer("num_classes", num_classes, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., num_classes)``."""
        logits = self.net(x)
        if logits.shape[-1] != self.num_classes:
            raise ShapeError(message("classifier output", f"last dimension num_classes = {self.num_classes}",
                                     f"shape {tuple(logits.shape)}", "make the network end in num_classes features"))
        return logits

    def distribution(self, x: torch.Tensor) -> dist.Distribution:
        return dist.Categorical(logits=self(x))


class Unconditional(nn.Module):
    """A prior that ignores its conditioning inputs: ``Unconditional(StandardNormal(8))(y)`` is ``N(0, I)``."""

    def __init__(self, prior: Callable[[], dist.Distribution]) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, *_: torch.Tensor) -> dist.Distribution:
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

    def forward(self, y: torch.Tensor) -> dist.Distribution:
        return dist.Normal(self.loc[y], F.softplus(self.raw_scale[y]) + 1e-4).to_event(1)


class ConditionalNormalPrior(nn.Module):
    """``p(z | c) = N(loc(c), diag(scale(c)^2))`` computed by an MLP of the context (the prior network of
    Sohn et al. 2015). ``forward(c)`` takes ``(..., *context_shape)``."""

    def __init__(self, context_shape: Shape, z_dim: int, hidden: Sequence[int] = (400,)) -> None:
        super().__init__()
        self.z_dim = integer("z_dim", z_dim, 1)
        self.net = ConditionalGaussianEncoder(ConcatMLP([context_shape], (2 * self.z_dim,), hidden), self.z_dim)

    def forward(self, context: torch.Tensor) -> dist.Distribution:
        return self.net.distribution(context)


class _Sites(nn.Module):
    """Site naming, module registration, plates and likelihood handling shared by the models below."""

    name: str
    data_shape: tuple[int, ...]
    likelihood: Callable[[torch.Tensor], dist.Distribution]

    def site(self, key: str) -> str:
        """The Pyro site name of ``key``, prefixed with ``self.name + "/"`` when the model has a name."""
        return f"{self.name}/{key}" if self.name else key

    def _register(self, *keys: str) -> None:
        for key in keys:
            module = getattr(self, key)
            if isinstance(module, nn.Module) and next(module.parameters(), None) is not None:
                pyro.module(self.site(key), module)

    def plate(self, batch: int, num_data: Optional[int], device: torch.device) -> pyro.plate:
        """The data plate (site ``site("data")``) over a batch of ``batch`` points, subsampled from ``num_data``
        when given (:func:`data_plate`)."""
        return data_plate(self.site("data"), batch, num_data, device)

    def likelihood_dist(self, out: torch.Tensor) -> dist.Distribution:
        """p(x | decoder output): the likelihood of ``out``, with the data dimensions as its event shape."""
        px = self.likelihood(out)
        extra = len(self.data_shape) - len(px.event_shape)
        return px.to_event(extra) if extra > 0 else px

    def _check(self, t: torch.Tensor, what: str, shape: tuple[int, ...], likelihood: bool = False) -> None:
        if not torch.is_tensor(t):
            raise DataError(message(what, "a torch.Tensor", type(t).__name__, "convert with torch.as_tensor"))
        if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != shape:
            raise DataError(message(what, f"shape (batch, {', '.join(map(str, shape))})", f"shape {tuple(t.shape)}",
                                    "reshape the data to (batch, *shape)"))
        if is_validation_enabled():
            if not bool(torch.isfinite(t).all()):
                raise DataError(message(what, "finite values", "NaN or infinite values", "drop or impute them"))
            if likelihood and isinstance(self.likelihood, Likelihood):
                self.likelihood.check_data(t, what)

    @property
    def device(self) -> torch.device:
        """The device of the parameters (of the buffers when there are none; the CPU when there are neither)."""
        t = next(self.parameters(), None)
        return t.device if t is not None else torch.device("cpu")


class SSVAE(_Sites):
    """The semi-supervised VAE M2 (Kingma et al. 2014) as a Pyro model / guide pair.

    Model: ``y ~ Categorical(uniform)``, ``z ~ p(z | y)``, ``x ~ p(x | decoder(z, y))`` in one plate.
    Guide: ``y ~ q(y | x)`` (only where ``y`` is not given), ``z ~ q(z | x, y)``. Train with
    ``TraceEnum_ELBO(max_plate_nesting=1)`` and ``config_enumerate(ssvae.guide)`` to sum ``y`` out exactly
    (:func:`fit_semisupervised` does this).

    Labelled batches also score the classifier, ``aux_weight * log q(y | x)``, as an observed site
    ``"y_aux"`` of the model: the classification term Kingma et al. add to the bound (their alpha, with
    ``aux_weight = alpha / num_labelled``; they use ``alpha = 0.1 * num_data``).

    Args:
        data_shape: shape of one data point, e.g. ``(64,)``.
        num_classes: number of classes ``K``.
        z_dim: latent dimensions.
        hidden: hidden layer sizes of the classifier, encoder and decoder MLPs.
        likelihood: as for :class:`pyro_vae.VAE` (``"bernoulli"``, ``"continuous-bernoulli"``, ...).
        prior: ``None`` (``N(0, I)`` whatever ``y``, as in M2), ``"class-conditional"``
            (:class:`ClassConditionalNormal`), or a callable ``y -> Distribution`` of event shape ``(z_dim,)``.
        aux_weight: weight of the classification term per labelled point.
        name: prefix of every site, module and the plate (``"a"`` gives ``"a/y"``, ``"a/z"``, ``"a/x"``).

    Sites (``name=""``): plate ``"data"``; ``"y"`` ``(batch,)`` integer labels; ``"z"`` ``(batch, z_dim)``;
    ``"x"`` ``(batch, *data_shape)``; ``"y_aux"`` ``(batch,)`` on labelled batches when ``aux_weight > 0``.
    """

    def __init__(self, data_shape: Shape, num_classes: int, z_dim: int, *, hidden: Sequence[int] = (500,),
                 likelihood: Union[str, dict, Callable[[torch.Tensor], dist.Distribution]] = "bernoulli",
                 prior: Union[str, Callable[[torch.Tensor], dist.Distribution], None] = None,
                 aux_weight: float = 1.0, name: str = "") -> None:
        super().__init__()
        self.data_shape = _shape(data_shape)
        self.num_classes = integer("num_classes", num_classes, 2)
        self.z_dim = integer("z_dim", z_dim, 1)
        if not (isinstance(aux_weight, (int, float)) and math.isfinite(aux_weight) and aux_weight >= 0):
            raise ConfigError(message("aux_weight", "a finite number >= 0", repr(aux_weight),
                                      "pass e.g. aux_weight=0.1 * num_data / num_labelled"))
        self.aux_weight = float(aux_weight)
        self.name = str(name)
        k, hidden = self.num_classes, tuple(hidden)
        self.classifier = CategoricalEncoder(ConcatMLP([self.data_shape], (k,), hidden), k)
        self.encoder = ConditionalGaussianEncoder(ConcatMLP([self.data_shape, (k,)], (2 * self.z_dim,), hidden),
                                                  self.z_dim)
        self.decoder = ConcatMLP([(self.z_dim,), (k,)], self.data_shape, hidden)
        if prior is None:
            self.prior: Callable[[torch.Tensor], dist.Distribution] = Unconditional(StandardNormal(self.z_dim))
        elif prior == "class-conditional":
            self.prior = ClassConditionalNormal(k, self.z_dim)
        elif callable(prior):
            self.prior = prior
        else:
            raise ConfigError(message("prior", 'None, "class-conditional" or a callable y -> Distribution',
                                      repr(prior), "pass one of those"))
        self.likelihood = build_likelihood(likelihood, self.data_shape)

    def _one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).to(like.dtype)

    def _check_y(self, y: torch.Tensor, batch: int) -> None:
        if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32) or tuple(y.shape) != (batch,):
            found = f"dtype {y.dtype}, shape {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
            raise DataError(message("y", f"integer class labels of shape ({batch},)", found,
                                    "pass y as a torch.long tensor, one label per data point"))
        if bool(((y < 0) | (y >= self.num_classes)).any()):
            raise DataError(message("y", f"labels in 0..{self.num_classes - 1}",
                                    f"values in [{int(y.min())}, {int(y.max())}]", "relabel the classes 0..K-1"))

    def model(self, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
              num_data: Optional[int] = None, batch_size: Optional[int] = None) -> torch.Tensor:
        """``p(y) p(z | y) p(x | y, z)`` over a batch.

        Args:
            x: ``(batch, *data_shape)`` observations, or ``None`` to generate.
            y: ``(batch,)`` integer labels, or ``None`` where unknown (the guide then samples or enumerates).
            num_data: size of the full labelled or unlabelled set the batch is drawn from.
            batch_size: number of points to generate when both ``x`` and ``y`` are ``None``.

        Returns:
            The decoder output ``(batch, *data_shape)`` (with enumeration dimensions on the left).
        """
        self._register("decoder", "prior", "likelihood")
        if x is not None:
            self._check(x, "x", self.data_shape, likelihood=True)
            batch, device = x.shape[0], x.device
        elif y is not None:
            batch, device = y.shape[0], y.device
        elif batch_size is not None:
            batch, device = integer("batch_size", batch_size, 1), self.device
        else:
            raise ConfigError(message("model arguments", "x, y or batch_size", "none of them",
                                      "call model(batch_size=n) to generate n points"))
        if y is not None:
            self._check_y(y, batch)
        with self.plate(batch, num_data, device):
            label = pyro.sample(self.site("y"), dist.Categorical(logits=torch.zeros(self.num_classes,
                                                                                     device=device)), obs=y)
            z = pyro.sample(self.site("z"), self.prior(label))
            out = self.decoder(z, self._one_hot(label, z))
            pyro.sample(self.site("x"), self.likelihood_dist(out), obs=x)
            if x is not None and y is not None and self.aux_weight > 0:
                self._register("classifier")
                with poutine.scale(scale=self.aux_weight):
                    pyro.sample(self.site("y_aux"), self.classifier.distribution(x), obs=y)
        return out

    def guide(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, num_data: Optional[int] = None,
              batch_size: Optional[int] = None) -> torch.Tensor:
        """``q(y | x) q(z | x, y)``; same signature as :meth:`model`. Returns the latent ``z``."""
        self._register("classifier", "encoder")
        if x is None:
            raise ConfigError(message("guide x", "a data batch", "None",
                                      "generate with Predictive(ssvae.model, num_samples=n)(None, y)"))
        self._check(x, "x", self.data_shape)
        if y is not None:
            self._check_y(y, x.shape[0])
        with self.plate(x.shape[0], num_data, x.device):
            if y is None:
                y = pyro.sample(self.site("y"), self.classifier.distribution(x))
            return pyro.sample(self.site("z"), self.encoder.distribution(x, self._one_hot(y, x)))

    @torch.no_grad()
    def classify(self, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """Most probable class under ``q(y | x)``: ``(batch,)`` long."""
        return torch.cat([self.classifier(xb).argmax(-1) for xb in x.split(batch_size)])


class CVAE(_Sites):
    """The conditional VAE (Sohn et al. 2015) as a Pyro model / guide pair.

    Model: ``z ~ p(z | c)``, ``x ~ p(x | decoder(z, c))``; guide: ``z ~ q(z | x, c)``. With the context ``c``
    the observed part of an image and ``x`` the rest, ``Predictive(cvae.model, num_samples=n)(c)`` draws
    completions.

    Args:
        data_shape: shape of the predicted part ``x``.
        context_shape: shape of the context ``c``.
        z_dim: latent dimensions.
        hidden: hidden layer sizes of the MLPs.
        likelihood: as for :class:`pyro_vae.VAE`.
        prior: ``"conditional"`` (a learned :class:`ConditionalNormalPrior`), ``None`` (``N(0, I)``), or a
            callable ``c -> Distribution`` of event shape ``(z_dim,)``.
        name: prefix of every site, module and the plate.

    Sites (``name=""``): plate ``"data"``; ``"z"`` ``(batch, z_dim)``; ``"x"`` ``(batch, *data_shape)``.
    """

    def __init__(self, data_shape: Shape, context_shape: Shape, z_dim: int, *, hidden: Sequence[int] = (400,),
                 likelihood: Union[str, dict, Callable[[torch.Tensor], dist.Distribution]] = "bernoulli",
                 prior: Union[str, Callable[[torch.Tensor], dist.Distribution], None] = "conditional",
                 name: str = "") -> None:
        super().__init__()
        self.data_shape, self.context_shape = _shape(data_shape), _shape(context_shape)
        self.z_dim = integer("z_dim", z_dim, 1)
        self.name = str(name)
        hidden = tuple(hidden)
        self.encoder = ConditionalGaussianEncoder(
            ConcatMLP([self.data_shape, self.context_shape], (2 * self.z_dim,), hidden), self.z_dim)
        self.decoder = ConcatMLP([(self.z_dim,), self.context_shape], self.data_shape, hidden)
        if prior == "conditional":
            self.prior: Callable[[torch.Tensor], dist.Distribution] = ConditionalNormalPrior(
                self.context_shape, self.z_dim, hidden)
        elif prior is None:
            self.prior = Unconditional(StandardNormal(self.z_dim))
        elif callable(prior):
            self.prior = prior
        else:
            raise ConfigError(message("prior", '"conditional", None or a callable c -> Distribution',
                                      repr(prior), "pass one of those"))
        self.likelihood = build_likelihood(likelihood, self.data_shape)

    def model(self, context: torch.Tensor, x: Optional[torch.Tensor] = None,
              num_data: Optional[int] = None) -> torch.Tensor:
        """``p(z | c) p(x | z, c)``.

        Args:
            context: ``(batch, *context_shape)``.
            x: ``(batch, *data_shape)`` observations, or ``None`` to draw completions.
            num_data: full data-set size when the batch is a minibatch.

        Returns:
            The decoder output ``(batch, *data_shape)``.
        """
        self._register("decoder", "prior", "likelihood")
        self._check(context, "context", self.context_shape)
        if x is not None:
            self._check(x, "x", self.data_shape, likelihood=True)
            if x.shape[0] != context.shape[0]:
                raise DataError(message("x", f"batch size {context.shape[0]} (the context's)", f"{x.shape[0]}",
                                        "pass one context per data point"))
        with self.plate(context.shape[0], num_data, context.device):
            z = pyro.sample(self.site("z"), self.prior(context))
            out = self.decoder(z, context)
            pyro.sample(self.site("x"), self.likelihood_dist(out), obs=x)
        return out

    def guide(self, context: torch.Tensor, x: Optional[torch.Tensor] = None,
              num_data: Optional[int] = None) -> torch.Tensor:
        """``q(z | x, c)``; same signature as :meth:`model`. Returns ``z``."""
        self._register("encoder")
        if x is None:
            raise ConfigError(message("guide x", "the data to encode", "None",
                                      "draw completions from the model: Predictive(cvae.model, num_samples=n)(c)"))
        self._check(context, "context", self.context_shape)
        self._check(x, "x", self.data_shape)
        with self.plate(context.shape[0], num_data, context.device):
            return pyro.sample(self.site("z"), self.encoder.distribution(x, context))

    @torch.no_grad()
    def complete(self, context: torch.Tensor, num_samples: int = 1, mean: bool = True) -> torch.Tensor:
        """``num_samples`` completions per context, ``(num_samples, batch, *data_shape)``: ``z ~ p(z | c)``,
        then the likelihood's mean (``mean=True``) or a draw."""
        z = self.prior(context).sample((integer("num_samples", num_samples, 1),))
        px = self.likelihood_dist(self.decoder(z, context))
        return px.mean if mean else px.sample()


def split_labelled(y: torch.Tensor, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``per_class`` labelled points of every class, chosen by ``seed``, and of all the others."""
    per_class = integer("per_class", per_class, 1)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for k in torch.unique(y).tolist():
        idx = torch.nonzero(y == k).flatten()
        if len(idx) < per_class:
            raise DataError(message(f"labels of class {k}", f"at least {per_class} points", f"{len(idx)}",
                                    "ask for fewer labels per class"))
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    labelled = torch.cat(chosen)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[labelled] = False
    return labelled, torch.nonzero(mask).flatten()


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``pred == y``."""
    return float((pred.cpu() == y.cpu()).float().mean())


def fit_classifier(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 2000, lr: float = 1e-3,
                   weight_decay: float = 0.0) -> nn.Module:
    """Fit ``net`` (inputs ``(N, ...)`` to logits ``(N, K)``) by full-batch Adam on the cross-entropy: the
    labelled-points-only baseline a semi-supervised model has to beat."""
    optim = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    net.train()
    for _ in range(integer("steps", steps, 1)):
        loss = F.cross_entropy(net(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
    net.eval()
    return net


def fit_semisupervised(
    ssvae: SSVAE,
    x_labelled: torch.Tensor,
    y_labelled: torch.Tensor,
    x_unlabelled: torch.Tensor,
    *,
    epochs: int = 50,
    batch_size: int = 128,
    lr: float = 1e-3,
    enumeration: Optional[str] = "parallel",
    dynamic_binarize: bool = False,
    seed: int = 0,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
    time_budget: Optional[float] = None,
) -> list[dict[str, float]]:
    """Train an :class:`SSVAE` by minibatch SVI under ``TraceEnum_ELBO``.

    Each step takes one unlabelled batch (``y`` enumerated in the guide with ``config_enumerate``, or
    sampled, with a score-function gradient, when ``enumeration=None``) and one labelled batch (``y``
    observed), each scaled to its full set, so each pair of steps is an unbiased estimate of the whole
    objective of Kingma et al. (2014): the labelled and the unlabelled bounds plus the classification term.

    Args:
        ssvae: the model, already on its device (the data are moved there).
        x_labelled, y_labelled: ``(N_l, *data_shape)`` and ``(N_l,)``.
        x_unlabelled: ``(N_u, *data_shape)``.
        enumeration: ``"parallel"`` (exact sum over ``y``), ``"sequential"``, or ``None`` (score function).
        dynamic_binarize: draw binary data from the grey levels afresh each batch.
        callback: called as ``callback(epoch, record)`` after each epoch.
        time_budget: stop after the epoch during which this many seconds have passed.

    Returns:
        One record per epoch, nats per point: ``epoch``; ``loss_unlabelled``, the negative bound on
        ``log p(x)``; ``loss_labelled``, the labelled points' training objective: the negative bound on
        ``log p(x, y)`` minus ``aux_weight * log q(y | x)`` (a bound only when ``aux_weight`` is 0);
        ``seconds``.
    """
    if enumeration not in ("parallel", "sequential", None):
        raise ConfigError(message("enumeration", '"parallel", "sequential" or None', repr(enumeration),
                                  'pass enumeration="parallel"'))
    device = ssvae.device
    if dynamic_binarize:  # grey levels are probabilities of a one: refused outside [0, 1], never clamped
        from pyro_vae.data import check_binarizable

        check_binarizable(x_labelled, "x_labelled (dynamic_binarize=True)")
        check_binarizable(x_unlabelled, "x_unlabelled (dynamic_binarize=True)")
    xl, yl, xu = x_labelled.to(device), y_labelled.to(device), x_unlabelled.to(device)
    n_l, n_u = xl.shape[0], xu.shape[0]
    guide = config_enumerate(ssvae.guide, enumeration) if enumeration else ssvae.guide
    # Sampled y: Trace_ELBO adds the score-function term for it.
    elbo_u = TraceEnum_ELBO(max_plate_nesting=1) if enumeration else Trace_ELBO(max_plate_nesting=1)
    elbo_l = Trace_ELBO(max_plate_nesting=1)  # nothing to enumerate where y is observed
    gen = torch.Generator().manual_seed(seed)
    pyro.set_rng_seed(seed)
    optim = torch.optim.Adam(ssvae.parameters(), lr=lr)

    def step(xb: torch.Tensor, yb: Optional[torch.Tensor], n: int) -> float:
        if dynamic_binarize:
            xb = torch.bernoulli(xb)
        elbo = elbo_u if yb is None else elbo_l
        loss = elbo.differentiable_loss(ssvae.model, guide, xb, yb, n)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLossError(message("SSVAE loss", "a finite value", str(loss.item()),
                                             "lower the learning rate or check the data"))
        optim.zero_grad()
        loss.backward()
        optim.step()
        return float(loss.detach())

    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bl = min(batch_size, n_l)
    for epoch in range(1, integer("epochs", epochs, 1) + 1):
        ssvae.train()
        lu = ll = 0.0
        perm = torch.randperm(n_u, generator=gen).to(device)
        batches = perm.split(batch_size)
        for idx in batches:
            lab = torch.randperm(n_l, generator=gen)[:bl].to(device)
            lu += step(xu[idx], None, n_u)
            ll += step(xl[lab], yl[lab], n_l)
        record = {"epoch": epoch, "loss_unlabelled": lu / (len(batches) * n_u),
                  "loss_labelled": ll / (len(batches) * n_l), "seconds": time.perf_counter() - start}
        history.append(record)
        if callback is not None:
            callback(epoch, record)
        if time_budget is not None and record["seconds"] > time_budget:
            break
    ssvae.eval()
    return history
