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

from pyro_vae.errors import ConfigError, message

__all__ = ["call_with_context", "binds", "context_rows", "is_per_point", "check_context_shapes"]


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
