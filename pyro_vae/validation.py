"""One layer of argument and data checks, shared by the library and the command line.

Each check returns the value in its canonical type (``int``, ``float``, ``Path``, a tensor of the right
dtype) or raises :class:`~pyro_vae.errors.ConfigError` (an argument) or :class:`~pyro_vae.errors.DataError`
(data) with one line in the form of :func:`pyro_vae.errors.message`: what, what was expected, what was
found, and the fix. The command line uses the same checks as ``argparse`` types (:func:`arg_type`), so
``--batch-size 0`` and ``batch_size=0`` are refused in the same words, before anything runs or is written.

    >>> integer("batch_size", 0)
    Traceback (most recent call last):
    ...
    pyro_vae.errors.ConfigError: batch_size: expected an integer >= 1, found 0. Fix: pass batch_size >= 1
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.errors import ConfigError, DataError, message

__all__ = ["integer", "number", "positive", "beta", "boolean", "image_path", "describe_path", "memory_bytes",
           "check_memory", "data_dtype", "cast_data", "unit_interval", "arg_type", "resolve_device", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
"""File types the pictures can be written as (matplotlib's own formats that need no extra package)."""


# ------------------------------------------------------------------------------------------- numbers
def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (Python or NumPy scalar, 0-dim real tensor), else None.
    Booleans are not numbers here."""
    if torch.is_tensor(value):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _integral(value: Any) -> int | None:
    if torch.is_tensor(value):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            return None
        return int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _range_text(minimum: float | None, maximum: float | None, strict: bool, fmt: str = "g") -> str:
    lo = None if minimum is None else f"{minimum:{fmt}}"
    hi = None if maximum is None else f"{maximum:{fmt}}"
    if lo is not None and hi is not None:
        return f"in {'(' if strict else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if strict else '>='} {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def integer(name: str, value: Any, minimum: int = 1, maximum: int | None = None, *,
            fix: str | None = None) -> int:
    """``value`` as an ``int`` (Python or NumPy integer, 0-dim integer tensor; not a bool or a float) with
    ``minimum <= value <= maximum``, else :class:`ConfigError` naming ``name``."""
    v = _integral(value)
    if v is None or v < minimum or (maximum is not None and v > maximum):
        expected = f"an integer {_range_text(minimum, maximum, False, 'd')}".strip()
        if fix is None:
            fix = (f"pass {name} >= {minimum}" if maximum is None
                   else f"pass {name} between {minimum} and {maximum}")
        raise ConfigError(message(name, expected, repr(value), fix))
    return v


def number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
           strict: bool = True, fix: str | None = None) -> float:
    """``value`` as a finite ``float`` above ``minimum`` (``strict``: ``>``, else ``>=``) and at most
    ``maximum``, else :class:`ConfigError` naming ``name``. Strings are refused, not parsed."""
    v = _real(value)
    ok = (v is not None and math.isfinite(v) and (minimum is None or (v > minimum if strict else v >= minimum))
          and (maximum is None or v <= maximum))
    if v is None or not ok:
        expected = f"a finite number {_range_text(minimum, maximum, strict)}".strip()
        raise ConfigError(message(name, expected, repr(value), fix or f"pass a finite {name} "
                                  f"{_range_text(minimum, maximum, strict)}".strip()))
    return float(v)


def positive(name: str, value: Any, *, fix: str | None = None) -> float:
    """A finite ``float > 0``."""
    return number(name, value, 0.0, fix=fix)


def beta(name: str, value: Any) -> float:
    """A KL weight: a finite ``float > 0``. ``poutine.scale`` needs a positive scale; beta = 1 is the ELBO."""
    return number(name, value, 0.0, fix=f"pass {name} > 0 (1 gives the ELBO; a KL warm-up starts from a small "
                                        "positive weight)")


def boolean(name: str, value: Any) -> bool:
    """``value`` as a ``bool`` when it is one (Python or NumPy bool), else :class:`ConfigError` naming ``name``:
    ``1``, ``"yes"`` or ``None`` for a switch is refused, not read as true or false."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ConfigError(message(name, "True or False", repr(value), f"pass {name}=True or {name}=False"))


def image_path(name: str, value: str | Path) -> Path:
    """A path for a picture: its suffix one of :data:`IMAGE_SUFFIXES`."""
    path = Path(value)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(message(name, f"a picture file ending in {', '.join(IMAGE_SUFFIXES)}",
                                  f"{str(value)!r} (suffix {path.suffix!r})" if path.suffix else repr(str(value)),
                                  f"pass e.g. {name} {path.with_suffix('.png').name}"))
    return path


def describe_path(path: str | os.PathLike, limit: int = 6, hide: Callable[[str], bool] | None = None) -> str:
    """What is at ``path``, in words, for an error message: nothing, a file of N bytes, an empty folder, a folder
    holding a, b, ... (at most ``limit`` names, those for which ``hide(name)`` is true left out)."""
    path = Path(path)
    try:
        if path.is_dir():
            names = sorted(n for n in os.listdir(path) if hide is None or not hide(n))
            if not names:
                return "an empty folder"
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            return "a folder holding " + ", ".join(names[:limit]) + more
        if path.is_file():
            return f"a file of {path.stat().st_size} bytes"
        if path.exists():
            return "something that is neither a file nor a folder"
    except OSError as e:
        return f"something that cannot be read ({e.strerror or type(e).__name__})"
    return "nothing (it does not exist)"


# -------------------------------------------------------------------------------------------- memory
def memory_bytes(device: str | torch.device | None = None) -> int | None:
    """Total memory of ``device`` in bytes (physical memory for the CPU, the GPU's memory for CUDA), or
    ``None`` where it cannot be read."""
    dev = torch.device(device if device is not None else "cpu")
    try:
        if dev.type == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(dev).total_memory)
        if dev.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    return None


def _size_text(n: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2 ** 10:.1f} KiB"


def check_memory(what: str, nbytes: float, device: str | torch.device | None, fix: str,
                 detail: str = "") -> None:
    """:class:`ConfigError` when ``nbytes`` exceed the total memory of ``device`` (checked before the
    allocation, which would otherwise fail inside torch or be killed by the operating system). ``detail``
    says what the bytes are for."""
    total = memory_bytes(device)
    if total is not None and nbytes > total:
        dev = torch.device(device if device is not None else "cpu")
        raise ConfigError(message(what, f"a size that fits in the {_size_text(total)} of memory of {dev}",
                                  f"{_size_text(nbytes)} needed" + (f" ({detail})" if detail else ""), fix))


# ---------------------------------------------------------------------------------------------- data
def data_dtype(x: torch.Tensor, what: str = "x") -> None:
    """:class:`DataError` unless ``x``'s dtype holds real numbers that cast to a floating-point dtype
    (floating point, integer or bool; not complex or quantized)."""
    dt = x.dtype
    if dt.is_complex:
        raise DataError(message(what, "real numbers (a floating-point, integer or bool tensor)",
                                f"dtype {dt}", "pass the real part or the magnitude (x.real or x.abs())"))
    if x.is_quantized or not (dt.is_floating_point or dt == torch.bool or _is_integer_dtype(dt)):
        raise DataError(message(what, "real numbers (a floating-point, integer or bool tensor)",
                                f"dtype {dt}", "convert with x.float() (x.dequantize() for quantized data)"))


def _is_integer_dtype(dt: torch.dtype) -> bool:
    try:
        return not dt.is_floating_point and not dt.is_complex and dt != torch.bool and torch.iinfo(dt) is not None
    except (TypeError, RuntimeError):
        return False


def cast_data(x: torch.Tensor, dtype: torch.dtype, what: str = "x") -> torch.Tensor:
    """``x`` in ``dtype`` (the dtype of the VAE's parameters): floating-point, integer and bool data are
    cast (values are kept; 8-bit images are *not* rescaled here); other dtypes raise :class:`DataError`.
    Values that overflow ``dtype`` (e.g. 1e300 in float32) are refused rather than turned into infinity."""
    if x.dtype == dtype:
        return x
    data_dtype(x, what)
    out = x.to(dtype)
    if x.is_floating_point() and torch.finfo(dtype).max < torch.finfo(x.dtype).max:
        overflow = torch.isinf(out) & torch.isfinite(x)
        if bool(overflow.any()):
            raise DataError(message(what, f"values within the range of {dtype} (|x| <= {torch.finfo(dtype).max:.3g}), "
                                    "the dtype of the VAE's parameters", f"{int(overflow.sum())} values beyond it "
                                    f"(dtype {x.dtype})", f"rescale the data, or build the VAE in {x.dtype} "
                                    f"(vae.to({x.dtype}))"))
    return out


UNIT_FIX = ("scale the data to [0, 1] first: divide 8-bit grey levels by 255 (data.load(..., scale=255), "
            "--scale 255 on the command line), or drop binarization and pick a likelihood for these values")


def unit_interval(x: torch.Tensor, what: str, purpose: str = "grey levels in [0, 1] (the probability of a one)",
                  fix: str = UNIT_FIX) -> None:
    """:class:`DataError` unless every value of ``x`` is finite and in [0, 1]; binarization draws a one with
    probability the value, so anything else must be refused before it is clamped or passed to
    ``torch.bernoulli``."""
    if x.numel() == 0:
        return
    xf = x if x.is_floating_point() else x.to(torch.float32)
    finite = torch.isfinite(xf)
    if not bool(finite.all()):
        raise DataError(message(what, f"finite {purpose}", f"{int((~finite).sum())} NaN or infinite values",
                                "drop or impute the non-finite entries first"))
    lo, hi = float(xf.min()), float(xf.max())
    if lo < 0 or hi > 1:
        raise DataError(message(what, purpose, f"values in [{lo:.4g}, {hi:.4g}]", fix))


# -------------------------------------------------------------------------------------- command line
def arg_type(flag: str, check: Callable[..., Any], *, parse: Callable[[str], Any] | None = None,
             **kwargs: Any) -> Callable[[str], Any]:
    """An ``argparse`` type: parse the text (``int`` also takes ``1e3``; ``float`` takes ``nan``, which the
    check then refuses) and run ``check(flag, value, **kwargs)``. A refusal becomes argparse's error
    ``argument FLAG: expected ..., found .... Fix: ...`` (one line, exit status 2)."""
    if parse is None:
        parse = int if check is integer else (float if check in (number, positive, beta) else str)
    if parse is int:
        parse = _parse_int

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except (TypeError, ValueError):
            kind = "an integer" if parse is _parse_int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, found {text!r}. Fix: pass {flag} with {kind}") from None
        try:
            return check(flag, value, **kwargs)
        except ConfigError as e:
            text_e = str(e)
            raise argparse.ArgumentTypeError(text_e[len(flag) + 2:] if text_e.startswith(f"{flag}: ") else text_e
                                             ) from None

    convert.__name__ = getattr(check, "__name__", "value")
    convert.check, convert.kwargs = check, dict(kwargs)  # type: ignore[attr-defined]  # what it accepts
    return convert


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        v = float(text)  # "1e3": an integer written in scientific notation
        if not math.isfinite(v) or not v.is_integer():
            raise
        return int(v)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The ``torch.device`` of ``device``: ``"auto"`` is CUDA when it is available, else the CPU; a device this
    machine does not have, or a name torch does not know, raises :class:`ConfigError`."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(message("device", '"auto", "cpu", "cuda" or "cuda:N"', repr(device),
                                  "pass --device auto")) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(message("device", "a device this machine has", f"{device} without CUDA available",
                                  "pass --device cpu or auto"))
    return dev
