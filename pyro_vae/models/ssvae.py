"""The semi-supervised model M2 of Kingma et al. (2014), "Semi-supervised learning with deep generative models",
as a Pyro ``model`` / ``guide`` pair: ``y ~ Cat(uniform)``, ``z ~ p(z | y)``, ``x ~ p(x | y, z)``; the guide is
``q(y | x) q(z | x, y)``. ``y`` is observed for labelled points and, unobserved, is summed out exactly by Pyro's
``TraceEnum_ELBO`` when the guide is wrapped in ``config_enumerate``
(:func:`pyro_vae.train.semisupervised.fit_semisupervised` trains it so).

Every network broadcasts the leading (batch) dimensions of its inputs against each other
(:class:`~pyro_vae.networks.ConcatMLP`), so an enumerated label of shape ``(K, 1)`` meets a batch of ``(B, D)``
data and gives ``(K, B, ...)`` outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine

from pyro_vae.encoders import CategoricalEncoder, ConditionalGaussianEncoder
from pyro_vae.errors import ConfigError, DataError, message
from pyro_vae.likelihoods import build_likelihood
from pyro_vae.models.sites import Sites
from pyro_vae.networks import ConcatMLP, Shape, as_shape
from pyro_vae.priors import ClassConditionalNormal, StandardNormal, Unconditional
from pyro_vae.validation import integer, number

__all__ = ["SSVAE", "split_labelled", "accuracy"]


class SSVAE(Sites):
    """The semi-supervised VAE M2 (Kingma et al. 2014) as a Pyro model / guide pair.

    Model: ``y ~ Categorical(uniform)``, ``z ~ p(z | y)``, ``x ~ p(x | decoder(z, y))`` in one plate.
    Guide: ``y ~ q(y | x)`` (only where ``y`` is not given), ``z ~ q(z | x, y)``. Train with
    ``TraceEnum_ELBO(max_plate_nesting=1)`` and ``config_enumerate(ssvae.guide)`` to sum ``y`` out exactly
    (:func:`pyro_vae.train.semisupervised.fit_semisupervised` does this).

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
            (:class:`~pyro_vae.priors.ClassConditionalNormal`), or a callable ``y -> Distribution`` of event
            shape ``(z_dim,)``.
        aux_weight: weight of the classification term per labelled point.
        name: prefix of every site, module and the plate (``"a"`` gives ``"a/y"``, ``"a/z"``, ``"a/x"``).

    Sites (``name=""``): plate ``"data"``; ``"y"`` ``(batch,)`` integer labels; ``"z"`` ``(batch, z_dim)``;
    ``"x"`` ``(batch, *data_shape)``; ``"y_aux"`` ``(batch,)`` on labelled batches when ``aux_weight > 0``.

    Raises:
        ConfigError: a shape, ``num_classes``, ``z_dim``, ``aux_weight`` or ``prior`` that is not one of the above.
    """

    def __init__(self, data_shape: Shape, num_classes: int, z_dim: int, *, hidden: Sequence[int] = (500,),
                 likelihood: str | dict | Callable[[torch.Tensor], dist.TorchDistribution] = "bernoulli",
                 prior: str | Callable[[torch.Tensor], dist.TorchDistribution] | None = None,
                 aux_weight: float = 1.0, name: str = "") -> None:
        super().__init__()
        self.data_shape = as_shape(data_shape)
        self.num_classes = integer("num_classes", num_classes, 2)
        self.z_dim = integer("z_dim", z_dim, 1)
        self.aux_weight = number("aux_weight", aux_weight, 0.0, strict=False,
                                 fix="pass e.g. aux_weight=0.1 * num_data / num_labelled")
        self.name = str(name)
        k, hidden = self.num_classes, tuple(hidden)
        self.classifier = CategoricalEncoder(ConcatMLP([self.data_shape], (k,), hidden), k)
        self.encoder = ConditionalGaussianEncoder(ConcatMLP([self.data_shape, (k,)], (2 * self.z_dim,), hidden),
                                                  self.z_dim)
        self.decoder = ConcatMLP([(self.z_dim,), (k,)], self.data_shape, hidden)
        if prior is None:
            self.prior: Callable[[torch.Tensor], dist.TorchDistribution] = Unconditional(StandardNormal(self.z_dim))
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

    def model(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
              num_data: int | None = None, batch_size: int | None = None) -> torch.Tensor:
        """``p(y) p(z | y) p(x | y, z)`` over a batch.

        Args:
            x: ``(batch, *data_shape)`` observations, or ``None`` to generate.
            y: ``(batch,)`` integer labels, or ``None`` where unknown (the guide then samples or enumerates).
            num_data: size of the full labelled or unlabelled set the batch is drawn from.
            batch_size: number of points to generate when both ``x`` and ``y`` are ``None``.

        Returns:
            The decoder output ``(batch, *data_shape)`` (with enumeration dimensions on the left).

        Raises:
            ConfigError: none of ``x``, ``y`` and ``batch_size`` given.
            DataError: ``x`` or ``y`` of the wrong shape, dtype or values.
        """
        self.register_with_pyro("decoder", "prior", "likelihood")
        if x is not None:
            self.check_batch(x, "x", self.data_shape, likelihood=True)
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
                self.register_with_pyro("classifier")
                with poutine.scale(scale=self.aux_weight):
                    pyro.sample(self.site("y_aux"), self.classifier.distribution(x), obs=y)
        return out

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None,
              batch_size: int | None = None) -> torch.Tensor:
        """``q(y | x) q(z | x, y)``; same signature as :meth:`model`. Returns the latent ``z`` ``(batch, z_dim)``.

        Raises:
            ConfigError: ``x`` is ``None`` (the guide encodes data).
            DataError: ``x`` or ``y`` of the wrong shape, dtype or values.
        """
        self.register_with_pyro("classifier", "encoder")
        if x is None:
            raise ConfigError(message("guide x", "a data batch", "None",
                                      "generate with Predictive(ssvae.model, num_samples=n)(None, y)"))
        self.check_batch(x, "x", self.data_shape)
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


def split_labelled(y: torch.Tensor, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``per_class`` labelled points of every class, chosen by ``seed``, and of all the others.

    Args:
        y: ``(N,)`` integer labels.
        per_class: labelled points to keep per class.

    Returns:
        ``(labelled, unlabelled)``: two long index tensors, ``(per_class * num_classes,)`` and the rest.

    Raises:
        ConfigError: ``per_class`` is not an integer >= 1.
        DataError: a class has fewer than ``per_class`` points.
    """
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
    """Fraction of ``pred == y`` (``(N,)`` labels each), in [0, 1]."""
    return float((pred.cpu() == y.cpu()).float().mean())
