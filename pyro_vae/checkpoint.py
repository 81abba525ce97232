"""Run folders and checkpoints: JSON configuration, tensors loaded with ``weights_only=True``, every file
written atomically (temporary file, fsync, rename), so a crash never leaves a half-written checkpoint."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

from .errors import CheckpointError, message
from .vae import VAE

__all__ = ["atomic_write_bytes", "write_json", "read_json", "save_tensors", "load_tensors", "save", "load",
           "CONFIG", "WEIGHTS", "METRICS", "HISTORY"]

CONFIG, WEIGHTS, METRICS, HISTORY = "config.json", "model.pt", "metrics.json", "history.json"
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
