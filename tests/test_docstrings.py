"""Every module, and every public class and function (the names in a module's ``__all__``), has a docstring; so
does every public method a class adds (methods that override a base class's, such as ``forward`` or
``log_prob``, keep the meaning the base documents). The API reference is generated from these docstrings."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings

import pyro_vae

# Old module paths kept for one release: they re-export their new homes.
SHIMS = {"vae", "conditional", "linear_gaussian", "relaxed", "kl", "estimators", "variance", "step", "distributed"}


def _modules():
    for info in pkgutil.walk_packages(pyro_vae.__path__, "pyro_vae."):
        short = info.name.split(".", 1)[1]
        if short == "__main__" or short in SHIMS:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield importlib.import_module(info.name)


def undocumented() -> list[str]:
    missing = []
    for module in _modules():
        if not (module.__doc__ or "").strip():
            missing.append(module.__name__)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != module.__name__:
                continue
            if not (obj.__doc__ or "").strip():
                missing.append(f"{module.__name__}.{name}")
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    override = any(attr in vars(base) for base in obj.__mro__[1:])
                    if attr.startswith("_") or override:
                        continue
                    fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                    if inspect.isfunction(fn) and not (fn.__doc__ or "").strip():
                        missing.append(f"{module.__name__}.{name}.{attr}")
    return missing


def test_every_public_name_has_a_docstring():
    assert undocumented() == []


def test_every_module_declares_its_public_names():
    assert [m.__name__ for m in _modules() if not hasattr(m, "__all__")] == []
