"""Any Pyro model/guide pair as the training and evaluation tools take it.

:func:`pyro_vae.fit`, :func:`pyro_vae.evaluate_elbo`, :func:`pyro_vae.log_likelihood`,
:func:`pyro_vae.to_inference_data` and :func:`pyro_vae.infer.gradient_samples` take a :class:`pyro_vae.VAE` or a
:class:`ModelGuidePair`: a model and a guide of the signature ``model(x, num_data=None)`` /
``guide(x, num_data=None)``, where ``x`` is a minibatch ``(batch, ...)`` of the data set (its first dimension the
data points) and ``num_data`` the size of the full data set. The model runs its per-data-point sites inside one
vectorized plate over the batch, the *data plate*, built with ``pyro.plate(name, num_data,
subsample=torch.arange(batch))`` when ``num_data`` is given (a VAE's ``vae.model(x, num_data=num_data)`` does
this), so Pyro scales those sites by ``num_data / batch``; sites outside it (global latents) are not scaled, as
under ``pyro.infer.SVI``. The data plate is named by ``data_plate`` or found: the one plate named ``"data"`` or
ending in ``"/data"`` (a VAE built with ``name="vae"`` has ``"vae/data"``). The tools' ``context={name: value}``
reaches the model and guide as keyword arguments, ``model(x, num_data=None, **context)``, each batch given the rows
of its points of the per-data-point values (:func:`pyro_vae.models.context.check_context`).

Any object with ``model`` and ``guide`` methods (an ``nn.Module`` holding a VAE, say) is taken as such a pair by
:func:`as_pair`; a ``torch.nn.Module`` is then moved to the device, switched to eval mode for evaluation and
checkpointed with its state dict, and every ``pyro.param`` the traces touch is trained and checkpointed by
:func:`pyro_vae.fit`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from torch import nn

from pyro_vae.data import as_tensor_data
from pyro_vae.errors import ConfigError, DataError, ModelError, message
from pyro_vae.infer.traces import trace_guide_and_model
from pyro_vae.models.vae import VAE
from pyro_vae.validation import cast_data

__all__ = ["ModelGuidePair", "PairStructure", "as_pair", "as_data_rows", "is_vae", "plate_clash_explained",
           "pair_structure", "AUTOGUIDE_PLATE_RECIPE"]

AUTOGUIDE_PLATE_RECIPE = (
    "an autoguide builds the plates of its sites itself, so it must not run inside, nor next to, a plate of the "
    "same name that the guide opens: build it as AutoNormal(poutine.block(model, expose=[...global sites...]), "
    "create_plates=lambda *args, **kwargs: groups) where `groups` is the plate object the guide itself opens "
    "(create it once per guide call, call the autoguide, then `with groups:` run the local part), or write the "
    "global part of the guide by hand (pyro.param and pyro.sample inside the guide's own plate); see the "
    "user guide's page 'Composing models'")
"""The working recipe named by the error of an autoguide re-creating a plate of the guide."""

_CLASH = re.compile(r"Multiple sample sites named '([^']+)'|duplicate plate '([^']+)'")


def is_vae(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`pyro_vae.VAE` (the tools then use its data shape, checks and extras)."""
    return isinstance(obj, VAE)


class ModelGuidePair(nn.Module):
    """A Pyro model and guide that the training and evaluation tools take in place of a :class:`pyro_vae.VAE`.

    Args:
        model, guide: Pyro callables ``model(x, num_data=None)`` and ``guide(x, num_data=None)``: ``x`` a
            minibatch ``(batch, ...)``, ``num_data`` the full data-set size (see the module's description).
        data_plate: the name of the plate over the data points (``None``: the one plate named ``"data"`` or
            ending in ``"/data"``).
        modules: ``torch.nn.Module`` s the model and guide use (a VAE, your networks): moved to the device by
            :func:`pyro_vae.fit`, put in eval mode for evaluation, saved in checkpoints with their state dicts;
            a VAE among them is evaluated with KL weight 1. Parameters of modules not listed are trained and
            saved through Pyro's param store (``pyro.module`` / ``pyro.param``) as ``pyro.infer.SVI`` would.

    Raises:
        ConfigError: ``model`` or ``guide`` not callable, ``data_plate`` not a string, or ``modules`` holding
            something that is not an ``nn.Module``.
    """

    def __init__(self, model: Callable[..., Any], guide: Callable[..., Any], *, data_plate: str | None = None,
                 modules: nn.Module | Sequence[nn.Module] = ()) -> None:
        super().__init__()
        for what, fn in (("model", model), ("guide", guide)):
            if not callable(fn):
                raise ConfigError(message(what, "a Pyro callable fn(x, num_data=None)", type(fn).__name__,
                                          f"pass the {what} function (e.g. vae.{what} or your own)"))
        if data_plate is not None and not isinstance(data_plate, str):
            raise ConfigError(message("data_plate", "the name of the plate over the data points (a str) or None",
                                      type(data_plate).__name__, 'pass data_plate="data" (or "vae/data")'))
        mods = [modules] if isinstance(modules, nn.Module) else list(modules)
        for m in mods:
            if not isinstance(m, nn.Module):
                raise ConfigError(message("modules", "torch.nn.Module objects", type(m).__name__,
                                          "pass the modules the model and guide use, or nothing"))
        self._model, self._guide = model, guide
        self.data_plate = data_plate
        self.parts = nn.ModuleList(mods)

    def model(self, x: Any = None, num_data: int | None = None, **kwargs: Any) -> Any:
        """The model, called as ``model(x, num_data=num_data, **kwargs)``."""
        return self._model(x, num_data=num_data, **kwargs)

    def guide(self, x: Any = None, num_data: int | None = None, **kwargs: Any) -> Any:
        """The guide, called as ``guide(x, num_data=num_data, **kwargs)``."""
        return self._guide(x, num_data=num_data, **kwargs)

    def extra_repr(self) -> str:
        return f"model={getattr(self._model, '__name__', self._model)!s}, " \
               f"guide={getattr(self._guide, '__name__', self._guide)!s}, data_plate={self.data_plate!r}"


def as_pair(obj: Any, what: str = "vae") -> VAE | ModelGuidePair:
    """``obj`` as the tools take it: a :class:`pyro_vae.VAE` or a :class:`ModelGuidePair` as they are; any other
    object with callable ``model`` and ``guide`` attributes wrapped in a :class:`ModelGuidePair` (its
    ``data_plate`` attribute, if any, names the data plate; an ``nn.Module`` is one of its ``modules``).

    Raises:
        ConfigError: ``obj`` (named ``what``) has no callable ``model`` or ``guide``.
    """
    if isinstance(obj, (VAE, ModelGuidePair)):
        return obj
    model, guide = getattr(obj, "model", None), getattr(obj, "guide", None)
    if callable(model) and callable(guide):
        return ModelGuidePair(model, guide, data_plate=getattr(obj, "data_plate", None),
                              modules=(obj,) if isinstance(obj, nn.Module) else ())
    if callable(obj) and not callable(guide):
        found = f"a callable {getattr(obj, '__name__', type(obj).__name__)} without a guide"
    else:
        missing = " and ".join(n for n, f in (("model", model), ("guide", guide)) if not callable(f))
        found = f"{type(obj).__name__} without a callable {missing}"
    raise ConfigError(message(what, "a pyro_vae.VAE, a pyro_vae.ModelGuidePair, or an object with methods "
                              "model(x, num_data=None) and guide(x, num_data=None)", found,
                              "pass pyro_vae.ModelGuidePair(model, guide) (the guide may be an AutoGuide "
                              "joined to vae.guide in a function)"))


def as_data_rows(pair: ModelGuidePair, data: Any, what: str = "data") -> torch.Tensor:
    """The data set ``(N, ...)`` of ``data`` (a tensor or :class:`pyro_vae.data.Dataset`) for a model/guide pair:
    cast to the floating-point dtype of the pair's parameters (the default dtype without any), finite.

    Raises:
        DataError: ``data`` (named ``what``) is not a tensor, has no data point, is not numeric or is not finite.
    """
    dtype = next((p.dtype for p in pair.parameters() if p.is_floating_point()), torch.get_default_dtype())
    x = cast_data(as_tensor_data(data, what), dtype, what)
    if x.dim() == 0 or x.shape[0] == 0:
        raise DataError(message(what, "a data set of shape (N, ...), N >= 1 data points along the first dimension",
                                f"shape {tuple(x.shape)}", "pass at least one data point"))
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise DataError(message(what, "finite values", f"{int(bad.sum())} NaN or infinite values",
                                "drop or impute the non-finite entries first"))
    return x


@contextlib.contextmanager
def plate_clash_explained(plates: Callable[[], Collection[str]] | None = None) -> Iterator[None]:
    """Turn Pyro's errors for a plate opened twice in one trace (``ValueError: duplicate plate 'groups'``, and
    ``RuntimeError: Multiple sample sites named 'groups'`` where ``'groups'`` is among ``plates()``, the model's
    plates), which an autoguide gives when it re-creates a plate of the guide, into a
    :class:`~pyro_vae.errors.ModelError` naming the recipe that works (:data:`AUTOGUIDE_PLATE_RECIPE`)."""
    try:
        yield
    except (RuntimeError, ValueError) as e:
        found = _CLASH.search(str(e))
        if found is None:
            raise
        name = found.group(1) or found.group(2)
        if found.group(1) and (plates is None or name not in plates()):
            raise  # a sample site, not a plate, named twice: Pyro's own message says it
        raise ModelError(message(f"plate {name!r} of the guide", "each plate entered from one plate object per "
                                 "trace", f"a second plate named {name!r} ({str(e).splitlines()[0]})",
                                 AUTOGUIDE_PLATE_RECIPE)) from e


@dataclass(frozen=True)
class PairStructure:
    """What the tools read off one trace of a pair's guide and model on a batch.

    Attributes:
        data_plate: the name of the plate over the data points.
        max_plate_nesting: the vectorized plate dimensions the pair uses (for the ELBO).
        global_sites: the model's latent sample sites outside the data plate (global latents), in trace order.
        local_sites: the model's latent sample sites inside the data plate.
        non_reparameterized: the guide's latent sample sites without ``rsample`` (exact discrete latents).
    """

    data_plate: str
    max_plate_nesting: int
    global_sites: tuple[str, ...]
    local_sites: tuple[str, ...]
    non_reparameterized: tuple[str, ...] = ()


def _plates(trace: Trace) -> dict[str, Any]:
    """The vectorized plate frames of the sample sites of ``trace``, by name."""
    return {f.name: f for site in trace.nodes.values() if site["type"] == "sample"
            for f in site["cond_indep_stack"] if f.vectorized}


def _find_data_plate(plates: dict[str, Any], given: str | None) -> str:
    if given is not None:
        if given not in plates:
            raise ConfigError(message("data_plate", "the name of a plate of the model over the data points",
                                      f"{given!r}, not among the model's plates {sorted(plates)}",
                                      "pass data_plate= one of those names"))
        return given
    candidates = [n for n in plates if n == "data" or n.endswith("/data")]
    if len(candidates) == 1:
        return candidates[0]
    found = (f"no plate named 'data' or '.../data' (the model's plates: {sorted(plates) or 'none'})"
             if not candidates else f"several: {sorted(candidates)}")
    raise ConfigError(message("data plate", "one plate over the data points, named 'data' or ending in '/data'",
                              found, "pass ModelGuidePair(model, guide, data_plate=name), or run the "
                              "per-data-point sites inside pyro.plate('data', num_data, subsample=...) "
                              "(a VAE's model does)"))


def pair_structure(pair: ModelGuidePair, x: torch.Tensor, num_data: int | None = None, *,
                   context: Mapping[str, Any] | None = None) -> PairStructure:
    """Trace ``pair``'s guide, then its model replayed against it, on the batch ``x`` (with ``num_data`` and the
    batch's named ``context``, passed as keyword arguments), outside
    any enclosing handler, without gradients and with torch's random streams left as they were; a
    ``pyro.param`` not yet in the store is created, as a first ``SVI`` step creates it.

    Raises:
        ConfigError: no data plate found (or ``data_plate`` not a plate of the model); the data plate is not over
            ``x``'s first dimension (``batch`` points, subsampled from ``num_data`` when given); an observed
            site outside it.
        ModelError: a plate of the guide opened twice (an autoguide re-creating it,
            :func:`plate_clash_explained`).
    """
    batch = x.shape[0]
    dev = x.device
    def model_plates() -> Collection[str]:
        with poutine.block():
            return _plates(poutine.trace(pair.model).get_trace(x, num_data=num_data, **kwargs))

    kwargs = dict(context or {})
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.no_grad(), poutine.block(), \
            plate_clash_explained(model_plates):
        guide_trace, model_trace = trace_guide_and_model(pair.model, pair.guide, x, num_data=num_data, **kwargs)
    plates = _plates(model_trace)
    name = _find_data_plate(plates, pair.data_plate)
    frame = plates[name]
    full = num_data if num_data is not None else batch
    if frame.size != batch or (frame.full_size or frame.size) != full:
        raise ConfigError(message(
            f"data plate {name!r}", f"over the batch's {batch} points (x.shape[0]), of full size {full}"
            + (" (num_data)" if num_data is not None else ""),
            f"size {frame.size}" + (f", full size {frame.full_size}" if frame.full_size else ""),
            "build it as pyro.plate(name, num_data, subsample=torch.arange(len(x))) when num_data is given and "
            "pass num_data on to vae.model / vae.guide, with the data points along x's first dimension"))
    sites = [s for s in model_trace.nodes.values() if s["type"] == "sample" and s["name"] not in plates]
    outside = [str(s["name"]) for s in sites if all(f.name != name for f in s["cond_indep_stack"])]
    observed_outside = [str(s["name"]) for s in sites if s["is_observed"] and s["name"] in outside]
    if observed_outside:
        raise ConfigError(message(f"observed site {observed_outside[0]!r}", f"inside the data plate {name!r}",
                                  "an observed site outside it (it would not be scaled to the data set)",
                                  "observe the data inside the data plate"))
    nesting = max((-f.dim for tr in (guide_trace, model_trace) for f in _plates(tr).values() if f.dim is not None),
                  default=1)
    discrete = tuple(str(s["name"]) for s in guide_trace.nodes.values() if s["type"] == "sample"
                     and not s["is_observed"] and s["name"] not in _plates(guide_trace)
                     and type(s["fn"]).__name__ != "_Subsample" and not getattr(s["fn"], "has_rsample", True))
    return PairStructure(name, nesting, tuple(str(s["name"]) for s in sites if s["name"] in outside),
                         tuple(str(s["name"]) for s in sites if s["name"] not in outside and not s["is_observed"]),
                         discrete)
