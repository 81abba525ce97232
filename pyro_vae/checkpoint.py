"""Run folders and checkpoints: JSON configuration, tensors loaded with ``weights_only=True``, every file
written atomically (temporary file, fsync, rename), so a crash never leaves a half-written checkpoint."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .errors import CheckpointError, message
from .vae import VAE

__all__ = ["atomic_write_bytes", "write_json", "read_json", "save_tensors", "load_tensors", "save", "load",
           "check_writable", "rng_state", "set_rng_state", "load_training_state", "CONFIG", "WEIGHTS", "METRICS",
           "HISTORY", "CHECKPOINT", "BEST", "FORMAT"]

CONFIG, WEIGHTS, METRICS, HISTORY = "config.json", "model.pt", "metrics.json", "history.json"
CHECKPOINT, BEST = "checkpoint.pt", "best.pt"
FORMAT = 1
PathLike = Union[str, os.PathLike]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(message("file", "an existing JSON file", f"no file at {path}",
                                      "check the path (a run folder holds config.json)")) from None
    except json.JSONDecodeError as e:
        raise CheckpointError(message(f"file {path}", "valid JSON", f"a parse error ({e})",
                                      "restore the file from the run or retrain")) from None


def save_tensors(path: PathLike, obj: Any) -> None:
    """``torch.save`` into memory, then an atomic write."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_tensors(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(..., weights_only=True)``: a file that needs arbitrary unpickling is refused."""
    if not Path(path).is_file():
        raise CheckpointError(message("checkpoint", "an existing file", f"nothing at {path}",
                                      "check the run folder path"))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError for unsafe or corrupt files
        raise CheckpointError(message(f"checkpoint {path}", "a tensors-only file (torch.load weights_only=True)",
                                      f"a file that cannot be loaded safely ({type(e).__name__})",
                                      "load only checkpoints written by pyro-vae; never unpickle untrusted files"
                                      )) from None


def save(vae: VAE, run_dir: PathLike, **extra: Any) -> Path:
    """Write ``config.json`` (the VAE's config plus ``extra`` sections) and ``model.pt`` into ``run_dir``."""
    from . import __version__

    if vae.config is None:
        raise CheckpointError(message("vae", "a VAE built from named parts (so its config is JSON)",
                                      "a VAE with a user-supplied module or callable",
                                      "save vae.state_dict() yourself and rebuild the VAE in code"))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG, {"version": __version__, "vae": vae.config, **extra})
    save_tensors(run_dir / WEIGHTS, {k: v.detach().cpu() for k, v in vae.state_dict().items()})
    return run_dir


def load(run_dir: PathLike, map_location: Any = "cpu", weights: str = WEIGHTS) -> VAE:
    """Rebuild the VAE of a run folder from ``config.json`` and load its weights safely."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(message("run folder", "an existing folder", f"nothing at {run_dir}",
                                      "pass the --out folder of a `pyro-vae train` run"))
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(message(f"run folder {run_dir}", f"a {CONFIG} written by `pyro-vae train`",
                                      "no config.json", "pass the --out folder of a training run"))
    config = read_json(run_dir / CONFIG)
    if not isinstance(config, dict) or "vae" not in config:
        raise CheckpointError(message(f"{run_dir / CONFIG}", 'a "vae" section', "none",
                                      "pass the folder of a pyro-vae run"))
    vae = VAE.from_config(config["vae"])
    state = load_tensors(run_dir / weights, map_location=map_location)
    if isinstance(state, dict) and "vae" in state and isinstance(state["vae"], dict):
        state = state["vae"]
    try:
        vae.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)[:200]]
        raise CheckpointError(message(f"weights {run_dir / weights}", "tensors matching config.json",
                                      f"a mismatch ({first[0].strip()})",
                                      "the weights come from another configuration: retrain or restore the "
                                      "matching config.json")) from None
    return vae


def check_writable(folder: PathLike, need_bytes: int = 0, what: str = "checkpoint_dir") -> Path:
    """Create ``folder`` and prove it takes a file (written, fsynced, removed) and has ``need_bytes`` free,
    so a read-only or full disk fails before training rather than at the first checkpoint.

    Raises:
        ConfigError: the folder cannot be created or written, or has too little free space.
    """
    import shutil

    from .errors import ConfigError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise ConfigError(message(what, "a writable folder (one this process can create and write)", f"{folder} "
                                  f"({e.strerror or type(e).__name__})",
                                  "pick another folder, fix its permissions or free some space")) from None
    if free < need_bytes:
        raise ConfigError(message(what, f"at least {need_bytes / 2**20:.1f} MiB free for checkpoints",
                                  f"{free / 2**20:.1f} MiB free in {folder}",
                                  "free some space or pick a folder on another disk"))
    return folder


def rng_state() -> dict[str, Any]:
    """Every random number generator training touches, as tensors and plain numbers (loadable with
    ``weights_only=True``): torch CPU, CUDA (current device, when present), Python ``random`` and numpy."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "random": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _same_release(a: str, b: str) -> bool:
    return a.split(".")[:2] == b.split(".")[:2]


def load_training_state(path: PathLike, *, vae_config: Any = None, signature: Optional[dict[str, Any]] = None
                        ) -> dict[str, Any]:
    """Load a training checkpoint (``fit(checkpoint_dir=...)`` writes them) safely and check that it belongs
    to this configuration: the format, the package release, the VAE's config and the training ``signature``
    (batch size, learning rate, data size, ELBO, ...) must match.

    Raises:
        CheckpointError: naming the first mismatch and how to proceed.
    """
    from . import __version__

    path = Path(path)
    if path.is_dir():
        if not (path / CHECKPOINT).is_file():
            raise CheckpointError(message(f"resume_from {path}", f"a run folder holding {CHECKPOINT}",
                                          f"a folder without {CHECKPOINT} (no checkpoint was written yet)",
                                          "train from scratch without --resume / resume_from"))
        path = path / CHECKPOINT
    payload = load_tensors(path)
    if not isinstance(payload, dict) or "optimizer" not in payload or "vae" not in payload:
        raise CheckpointError(message(f"checkpoint {path}", "a training checkpoint written by fit()",
                                      "a file without optimizer state (only weights?)",
                                      f"resume from the {CHECKPOINT} in the run folder"))
    if payload.get("format") != FORMAT or not _same_release(str(payload.get("version")), __version__):
        raise CheckpointError(message(
            f"checkpoint {path}", f"format {FORMAT} from pyro-vae {'.'.join(__version__.split('.')[:2])}.x",
            f"format {payload.get('format')} from pyro-vae {payload.get('version')}",
            "resume with the pyro-vae release that wrote it, or load only its weights (pyro_vae.load) and "
            "train anew"))
    stored_cfg = payload.get("vae_config")
    if vae_config is not None:
        vae_config = json.loads(json.dumps(vae_config))  # tuples become lists, as in the stored copy
    if vae_config is not None and stored_cfg is not None and json.loads(stored_cfg) != vae_config:
        old, new = json.loads(stored_cfg), vae_config
        key = next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), "?")
        raise CheckpointError(message(f"checkpoint {path}", f"{key} = {new.get(key)!r} (this VAE)",
                                      f"{key} = {old.get(key)!r} in the checkpoint",
                                      "build the VAE with the options of the run being resumed, or train into a "
                                      "new folder"))
    stored_sig = payload.get("signature") or {}
    for key, value in (signature or {}).items():
        if key in stored_sig and stored_sig[key] != value:
            raise CheckpointError(message(f"checkpoint {path}", f"{key} = {value!r} (this call)",
                                          f"{key} = {stored_sig[key]!r} in the checkpoint",
                                          f"resume with the same {key} as the original run, or train into a new "
                                          "folder"))
    return payload
