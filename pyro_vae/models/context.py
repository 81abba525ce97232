"""Named context: the values an enclosing Pyro model passes to a VAE's parts.

``vae.model(x, **context)`` calls ``prior(**context)`` and ``likelihood(decoder_output, **context)`` inside the
data plate, and the encoder and decoder with the context names they were built to take
(``VAE(..., encoder_context={"y": (10,)})``). A context value is either per data point (a tensor whose first
dimension runs over the data points, like ``x``'s) or global (any other value: a tensor without that dimension,
a number, another latent site's value). This module holds what the VAE and the functions built on it share:
calling a part with its context and a clear error when the part does not take it, and the rows of the
per-data-point context values for a batch of data points.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pyro_vae.errors import ConfigError, DataError, message

__all__ = ["call_with_context", "binds", "context_rows", "is_per_point", "check_context_shapes", "declared_shapes",
           "check_context"]


def _signature(fn: Callable) -> inspect.Signature | None:
    target = fn.forward if isinstance(fn, nn.Module) else fn
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a readable signature
        return None


def call_with_context(part: str, fn: Callable, *args: Any, context: Mapping[str, Any], fix: str = "") -> Any:
    """``fn(*args, **context)``, with a clear error when ``fn``'s signature does not take that context.

    The part is called first; only when it raises ``TypeError`` is its signature read: if the arguments do not
    bind to it (a context name it does not take, or a parameter it needs that no context value gives), the
    error names the part, the context names and the fix; otherwise the part's own ``TypeError`` propagates.

    Args:
        part: the part's name in the error, e.g. ``'prior at site "z"'``.
        fn: the part (a function or an ``nn.Module``).
        args: its positional arguments (the decoder's output for a likelihood, none for a prior).
        context: the named context.
        fix: how to pass a missing context value (added to the error when the part needs one).

    Raises:
        ConfigError: ``fn`` does not accept the context given, or needs a context value that is missing.
    """
    try:
        return fn(*args, **context)
    except TypeError as e:
        sig = _signature(fn)
        if sig is None:
            raise
        try:
            sig.bind(*args, **context)
        except TypeError as bind_error:
            names = ", ".join(repr(k) for k in context) or "none"
            params = ", ".join(str(p) for p in sig.parameters.values())
            takes_all = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
            unknown = [k for k in context if k not in sig.parameters]
            if unknown and not takes_all:
                todo = ("add **context to its signature (def prior(**context), def likelihood(out, **context)), so "
                        "that it takes the context and ignores what it does not use (it does not take "
                        f"{', '.join(map(repr, unknown))})")
                expected = f"a callable that takes the context it is given (context names: {names})"
            else:
                todo = fix or "pass the context values the part needs as keyword arguments"
                expected = f"the context values its signature needs (context given: {names})"
            raise ConfigError(message(part, expected, f"the signature ({params}), which refuses it ({bind_error})",
                                      todo)) from e
        raise


def binds(fn: Callable, *args: Any, **context: Any) -> bool:
    """Whether ``fn(*args, **context)`` matches ``fn``'s signature (``True`` when the signature cannot be read):
    ``binds(prior)`` is ``False`` for a prior that needs a context value."""
    sig = _signature(fn)
    if sig is None:
        return True
    try:
        sig.bind(*args, **context)
    except TypeError:
        return False
    return True


def is_per_point(value: Any, n: int) -> bool:
    """Whether a context value is per data point for a batch of ``n`` points: a tensor of at least one dimension
    whose first dimension is ``n``. Every other value (a number, a tensor without that dimension, an object) is
    global: passed whole to every batch."""
    return torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == n


def context_rows(context: Mapping[str, Any], n: int, index: slice | torch.Tensor) -> dict[str, Any]:
    """The context of the data points ``index`` (a slice or an index tensor) out of ``n``: each per-data-point
    value (:func:`is_per_point`) indexed along its first dimension, every global value as it is."""
    return {k: v[index] if is_per_point(v, n) else v for k, v in context.items()}


def check_context_shapes(argument: str, spec: Any) -> dict[str, tuple[int, ...]]:
    """``spec`` (``{name: shape}``, the event shape of one data point's context value) as a dict of int tuples.

    Raises:
        ConfigError: ``spec`` is not a mapping of names to shapes of positive integers.
    """
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError(message(argument, "a dict {name: shape of one data point's value}, e.g. {'y': (10,)}",
                                  type(spec).__name__, f"pass {argument}={{'y': (10,)}}"))
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in spec.items():
        shape = (shape,) if isinstance(shape, int) else shape
        try:
            dims = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            dims = ()
        if not isinstance(name, str) or not name.isidentifier() or not dims or min(dims) < 1 or \
                any(isinstance(s, bool) or int(s) != s for s in shape):
            raise ConfigError(message(f"{argument}[{name!r}]", "an identifier mapped to a shape of positive "
                                      "integers, e.g. 'y': (10,)", repr(shape), f"pass {argument}={{'y': (10,)}}"))
        out[name] = dims
    return out


def declared_shapes(obj: Any) -> dict[str, tuple[int, ...]]:
    """The context names the encoders and decoders of ``obj`` take per data point, with the event shape of one
    data point's value: the ``encoder_context`` and ``decoder_context`` of ``obj`` and of every module it holds
    (a VAE, or the VAEs among a model/guide pair's modules). ``{}`` for an object that declares none."""
    shapes: dict[str, tuple[int, ...]] = {}
    parts = obj.modules() if isinstance(obj, nn.Module) else (obj,)
    for part in parts:
        for key in ("encoder_context", "decoder_context"):
            spec = getattr(part, key, None)
            if isinstance(spec, Mapping):
                shapes.update({str(k): tuple(v) for k, v in spec.items()})
    return shapes


def check_context(argument: str, context: Mapping[str, Any] | None, n: int,
                  shapes: Mapping[str, tuple[int, ...]] | None = None,
                  device: torch.device | None = None) -> dict[str, Any]:
    """The named context of a data set of ``n`` points as the training and evaluation tools take it
    (``fit(vae, x, context={"y": y})``): a plain dict, its tensors moved to ``device`` (when given).

    A value is per data point when :func:`is_per_point` (its first dimension is ``n``); the tools then give each
    batch its rows (:func:`context_rows`). A value for a name in ``shapes`` (the per-data-point event shapes the
    encoder and decoder declare, :func:`declared_shapes`) that has more dimensions than that event shape must be
    per data point: a first dimension other than ``n`` is refused (its rows would not be the data's). Every other
    value is global and passed whole.

    Args:
        argument: the argument's name in errors (``"context"``, ``"val_context"``).
        context: ``{name: value}`` or ``None`` (no context).
        n: the number of data points (the data's first dimension).
        shapes: ``{name: event shape of one data point's value}``.
        device: where the tensors go.

    Raises:
        ConfigError: ``context`` is not a mapping of identifier names to values.
        DataError: a per-data-point value (a name of ``shapes`` with a leading data dimension) whose first
            dimension is not ``n``.
    """
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise ConfigError(message(argument, "a dict {name: value} of named context, e.g. {'y': labels}",
                                  type(context).__name__, f"pass {argument}={{'y': y}}"))
    out: dict[str, Any] = {}
    for name, value in context.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(message(f"{argument} name {name!r}", "a keyword-argument name (an identifier)",
                                      repr(name), f"pass {argument}={{'y': y}}"))
        event = (shapes or {}).get(name)
        if torch.is_tensor(value) and event is not None and value.dim() > len(event) and value.shape[0] != n:
            raise DataError(message(
                f"{argument}[{name!r}]", f"one row per data point: a first dimension of {n} (the data's "
                f"points), shape ({n}, {', '.join(map(str, event))})", f"shape {tuple(value.shape)}: "
                f"{value.shape[0]} rows", f"pass the {name} rows of the data points, in the data's order "
                f"({name}[idx] for data[idx]), or one global value of shape {tuple(event)}"))
        out[name] = value.to(device) if device is not None and torch.is_tensor(value) else value
    return out
