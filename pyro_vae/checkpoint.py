"""Run folders and checkpoints.

A run folder's state files (``config.json``, ``model.pt``, ``checkpoint.pt``, ``best.pt``, ``best.json``)
change together, one *commit* at a time: the new files are written under temporary names and fsynced, then
``manifest.json`` (each file's size and SHA-256, and the temporary names) is written atomically, which is the
commit point, then the files are renamed into place. A kill at any moment leaves the previous commit or the
new one: a reader takes a file the manifest records from its final or its temporary name, whichever matches
the checksum, and the next run in the folder finishes the renames. A file whose checksum does not match is
refused with :class:`CheckpointError`, never loaded. Tensors load with ``torch.load(weights_only=True)``.

While a run writes its folder it holds an exclusive lock (``fcntl.flock`` on ``RUN/.lock``, released when
the run ends however it ends, by the operating system at the latest); a second run into the same folder
stops with one line naming the holder. A folder is a run only once training committed into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from pyro_vae.errors import CheckpointError, ConfigError, message
from pyro_vae.models.vae import VAE
from pyro_vae.validation import describe_path
from pyro_vae.version import __version__

__all__ = ["atomic_write_bytes", "write_json", "read_json", "save_tensors", "load_tensors", "json_bytes",
           "tensor_bytes", "save", "load", "config_json", "check_writable", "rng_state", "set_rng_state",
           "load_training_state", "RunFolder", "RunLock", "open_run", "check_new_run", "started_without_checkpoint",
           "has_checkpoint", "describe", "CONFIG", "WEIGHTS", "METRICS", "HISTORY", "CHECKPOINT", "BEST",
           "BEST_JSON", "MANIFEST", "LOCK", "STATE_FILES", "REPORTS", "PICTURES", "FORMAT"]

CONFIG, WEIGHTS, METRICS, HISTORY = "config.json", "model.pt", "metrics.json", "history.json"
CHECKPOINT, BEST, BEST_JSON = "checkpoint.pt", "best.pt", "best.json"
MANIFEST, LOCK = "manifest.json", ".lock"
STATE_FILES = (CONFIG, WEIGHTS, CHECKPOINT, BEST, BEST_JSON)
"""The files a run folder's manifest records: written only by a commit, verified on every read."""
PICTURES = ("samples.png", "reconstructions.png", "elbo.png", "latent.png", "samples-aggregate.png",
            "samples-mixture.png", "pareto_k.png", "interpolations.png", "traversals.png", "imputations.png")
"""The pictures the commands draw from a run's weights into its folder (under their default names)."""
REPORTS = (METRICS, HISTORY, "imputation.json", *PICTURES)
"""Reports the commands write beside the state files, computed from the run's weights: an overwritten run's
reports go with it, and a commit of new weights can remove the old ones' (:meth:`RunFolder.commit`)."""
TRAINED = (WEIGHTS, CHECKPOINT, BEST)
"""A folder holding one of these is a run that training wrote (never replaced without ``overwrite``)."""
FORMAT = 1
MANIFEST_FORMAT = 1
PathLike = str | os.PathLike

_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$|^\.write-test-[a-z0-9_]{8}$")
"""The names of this module's temporary files (``tempfile`` adds 8 characters of ``[a-z0-9_]``)."""


# ------------------------------------------------------------------------------------------ file writing
def _fsync_dir(folder: Path) -> None:
    try:  # make renames and creations in ``folder`` durable
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_new(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to a new temporary file ``.NAME.XXXXXXXX.tmp`` in ``folder`` and fsync it; an
    ``OSError`` (a full disk) names the file it was writing, and leaves nothing behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:
            e.filename = str(folder / name)
        raise
    return Path(tmp)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then rename: ``path``
    holds the old bytes or the new ones, never a mix. Creates the folder when missing.

    Raises:
        OSError: with ``filename`` set to ``path`` (e.g. a full disk); the old file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_new(path.parent, path.name, data)
    try:
        _rename(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:
            e.filename = str(path)
        raise
    _fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the indented, key-sorted JSON of the run folder's files."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n").encode()


def tensor_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write(path: PathLike, data: bytes) -> None:
    """A state file of a run folder is replaced by a commit (under the folder's lock); any other file by an
    atomic write."""
    path = Path(path)
    if path.name in STATE_FILES and RunFolder(path.parent).started():
        run = RunFolder(path.parent)
        with run.lock():
            run.commit({path.name: data})
    else:
        atomic_write_bytes(path, data)


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path``: atomically, or by a commit under the folder's lock for a run folder's
    state file."""
    _write(path, json_bytes(obj))


def save_tensors(path: PathLike, obj: Any) -> None:
    """``torch.save`` into memory, then an atomic write (a commit for a run folder's state file)."""
    _write(path, tensor_bytes(obj))


def _decode_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(message(f"file {where}", "valid JSON in UTF-8", f"a file that does not parse "
                                      f"({type(e).__name__}: {str(e)[:120]})",
                                      "restore the file from a copy of the run, or retrain")) from None


def read_json(path: PathLike) -> Any:
    """The JSON in ``path``; a run folder's state file is verified against the manifest first."""
    path = Path(path)
    return _decode_json(_read_file(path, "JSON file"), str(path))


def _load_bytes(data: bytes, where: str, map_location: Any = "cpu") -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for such files
        raise CheckpointError(message(f"checkpoint {where}", "a tensors-only file (torch.load weights_only=True)",
                                      f"a file that cannot be loaded safely ({type(e).__name__})",
                                      "load only checkpoints written by pyro-vae; never unpickle untrusted files"
                                      )) from None


def load_tensors(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(..., weights_only=True)``: a file that needs arbitrary unpickling is refused. A run
    folder's state file is verified against the manifest's checksum first."""
    path = Path(path)
    return _load_bytes(_read_file(path, "checkpoint"), str(path), map_location)


def _read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``; a state file in a run folder is verified with the whole folder (a file on its
    own, or in a folder of an older release, is read as it is)."""
    if path.name in STATE_FILES and RunFolder(path.parent).started():  # a run folder of this release
        return RunFolder(path.parent).read(path.name)
    if not path.is_file():
        raise CheckpointError(message(what, "an existing file", f"{describe(path)} at {path}",
                                      "check the path (a run folder holds config.json and model.pt)"))
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(message(what, "a readable file", f"{path} ({e.strerror or type(e).__name__})",
                                      "check the path and its permissions")) from None


def describe(path: PathLike, limit: int = 6) -> str:
    """What is at ``path``, in words: nothing, a file of N bytes, an empty folder, a folder holding a, b, ...
    (this module's lock and temporary files left out); :func:`pyro_vae.validation.describe_path`."""
    return describe_path(path, limit, hide=lambda name: name == LOCK or _TEMP.match(name) is not None)


# ------------------------------------------------------------------------------------------ the manifest
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _manifest_checksum(body: dict[str, Any]) -> str:
    return _sha256(json.dumps(body, sort_keys=True).encode())


def _valid_manifest(m: Any) -> bool:
    if not isinstance(m, dict) or set(m) != {"format", "run", "generation", "files", "staged", "remove",
                                             "checksum"}:
        return False
    files, staged, remove = m["files"], m["staged"], m["remove"]
    return (m["format"] == MANIFEST_FORMAT and isinstance(m["run"], str) and type(m["generation"]) is int
            and isinstance(files, dict) and isinstance(staged, dict) and isinstance(remove, list)
            and all(name in STATE_FILES and isinstance(e, dict) and set(e) == {"sha256", "size"}
                    and isinstance(e["sha256"], str) and type(e["size"]) is int for name, e in files.items())
            and all(name in files and isinstance(t, str) and _TEMP.match(t) and not set(t) & set("/\\")
                    for name, t in staged.items())
            and all(name in STATE_FILES + REPORTS for name in remove)
            and m["checksum"] == _manifest_checksum({k: v for k, v in m.items() if k != "checksum"}))


class RunFolder:
    """A run folder: its manifest, verified reads, commits (under :meth:`lock`) and what it holds.

    Reading needs no lock; a commit needs the lock, which :meth:`lock` takes (again, by the same thread, at
    no cost: the command line and :func:`pyro_vae.fit` share one run's lock)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # reading
    def manifest(self) -> dict[str, Any] | None:
        """The parsed manifest, ``None`` when the folder has none.

        Raises:
            CheckpointError: the manifest is damaged (it carries its own checksum)."""
        p = self.path / MANIFEST
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CheckpointError(message(f"run folder {self.path}", f"a readable {MANIFEST}",
                                          f"{describe(p)} ({e.strerror or type(e).__name__})",
                                          "check the folder and its permissions")) from None
        try:
            m = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            m = None
        if not _valid_manifest(m):
            raise CheckpointError(message(
                f"{p}", "the manifest pyro-vae wrote (file names, sizes and SHA-256 checksums, with a checksum of "
                "its own)", f"a damaged or edited manifest ({len(raw)} bytes)",
                "restore the run folder from a copy, or retrain; the run's files are not used unverified"))
        return m

    def recorded(self) -> dict[str, dict[str, Any]]:
        """The state files the manifest records (name: ``{"sha256", "size"}``); empty without a manifest."""
        m = self.manifest()
        return dict(m["files"]) if m is not None else {}

    def read(self, name: str) -> bytes:
        """The bytes of ``name``, after checking every file the manifest records (:meth:`verify`): a folder
        is read as one unit, so a file that another run's files would make look consistent is found too.

        Raises:
            CheckpointError: no manifest, ``name`` not recorded, or a recorded file without its checksum."""
        return self.verify(keep=(name,))[name]

    def verify(self, keep: Sequence[str] = ()) -> dict[str, bytes]:
        """Check every file the manifest records against its size and SHA-256 (from its final name or, after
        a commit a kill interrupted, its temporary one) and return the bytes of the files in ``keep``.

        Raises:
            CheckpointError: no manifest, a name of ``keep`` not recorded, or a file without its checksum (the
                message names it and the fix)."""
        for _ in range(3):  # a commit by another process between reading the manifest and a file: again
            m = self.manifest()
            if m is None:
                raise CheckpointError(message(
                    f"run folder {self.path}", f"a {MANIFEST} recording {', '.join(keep) or 'its files'}",
                    f"{describe(self.path)}, without {MANIFEST}",
                    "restore the folder from a copy, or copy a file out of it to load that file unverified"
                    if (self.path / LOCK).is_file() else
                    "pass the folder of a run that pyro-vae train, pyro_vae.fit or pyro_vae.save wrote"))
            for name in keep:
                if name not in m["files"]:
                    there = f" (the {name} there is not the run's)" if (self.path / name).exists() else ""
                    raise CheckpointError(message(
                        f"run folder {self.path}", f"{name} among its files", "a run whose manifest records only "
                        f"{', '.join(sorted(m['files'])) or 'no file'}{there}",
                        "pass the folder of a run that wrote it, or copy the file out of the folder to load it "
                        "unverified"))
            out: dict[str, bytes] = {}
            failure: tuple[str, str] | None = None
            for name in sorted(m["files"], key=lambda n: (n not in keep, n)):
                data, problem = self._match(m, name, name in keep)
                if data is None:
                    failure = (name, problem)
                    break
                if name in keep:
                    out[name] = data
            if failure is None:
                return out
            if self.manifest() == m:
                break
        assert failure is not None and m is not None  # the loop returned unless a file failed to match
        name, problem = failure
        entry = m["files"][name]
        raise CheckpointError(message(
            f"{self.path / name}", f"the file the run's {MANIFEST} records ({entry['size']} bytes, SHA-256 "
            f"{entry['sha256'][:12]}...)", f"{problem}: the file is damaged, or comes from another run",
            _repair_hint(name)))

    def _match(self, m: dict[str, Any], name: str, keep: bool) -> tuple[bytes | None, str]:
        """``(bytes or b"", "")`` for the recorded file ``name`` (final or staged), else ``(None, what is
        there)``."""
        entry, problem = m["files"][name], "no such file"
        for candidate in (name, m["staged"].get(name)):
            if candidate is None:
                continue
            try:
                if keep:
                    data = (self.path / candidate).read_bytes()
                    size, digest = len(data), _sha256(data)
                else:
                    data, (size, digest) = b"", _file_digest(self.path / candidate)
            except OSError as e:
                if candidate == name and not isinstance(e, FileNotFoundError):
                    problem = f"a file that cannot be read ({e.strerror or type(e).__name__})"
                continue
            if size == entry["size"] and digest == entry["sha256"]:
                return data, ""
            if candidate == name:
                problem = f"{size} bytes with SHA-256 {digest[:12]}..."
        return None, problem

    def read_json(self, name: str) -> Any:
        """The JSON of the folder's file ``name``, verified against the manifest."""
        return _decode_json(self.read(name), str(self.path / name))

    def read_tensors(self, name: str, map_location: Any = "cpu") -> Any:
        """The tensors of the folder's file ``name`` (``torch.load``, weights only), verified against the
        manifest."""
        return _load_bytes(self.read(name), str(self.path / name), map_location)

    def holds_run(self) -> bool:
        """Whether training wrote this folder (weights or a checkpoint), by this release or an older one."""
        m = self.manifest()
        if m is not None:
            return any(name in m["files"] for name in TRAINED)
        return any((self.path / name).is_file() for name in TRAINED)

    def started(self) -> bool:
        """Whether a run started in this folder (its lock file or manifest exists)."""
        return (self.path / LOCK).is_file() or (self.path / MANIFEST).is_file()

    def holder(self) -> str | None:
        """Who holds the run's lock now ("pid 123 on host h since ..."), or ``None``."""
        return _probe_lock(self.path)

    # writing
    def lock(self) -> RunLock:
        """The run's exclusive lock (a context manager): see :class:`RunLock`."""
        return RunLock(self.path)

    def commit(self, files: dict[str, bytes], *, fresh: bool = False, remove: Sequence[str] = ()) -> None:
        """Replace the state files ``files`` (name: bytes) as one unit; the others stay as recorded. With
        ``fresh``, start a new run: every state file and report not in ``files`` goes. ``remove``: names of
        :data:`REPORTS` (those computed from the weights being replaced) removed by the same commit, so that a
        kill leaves the old files with their reports or the new ones without them, never the new weights
        beside the old weights' reports. A commit's removals are applied once: when they are done the manifest
        is written again without them, so a report written after the commit is never removed by a later run's
        recovery.

        Raises:
            CheckpointError: the lock is not held by this thread, or the manifest is damaged (not ``fresh``).
            ValueError: a name in ``files`` that is not a state file, or in ``remove`` that is not a report.
            OSError: naming the file (a full disk); the previous commit is untouched.
        """
        _require_lock(self.path)
        bad = [n for n in remove if n not in REPORTS]
        if bad:
            raise ValueError(f"{', '.join(bad)}: not a run folder report {REPORTS}")
        old = None if fresh else self.manifest()
        entries = dict(old["files"]) if old else {}
        gen = old["generation"] + 1 if old else 1
        staged: dict[str, str] = {}
        try:
            for name, data in files.items():
                if name not in STATE_FILES:
                    raise ValueError(f"{name} is not a run folder state file {STATE_FILES}")
                staged[name] = _write_new(self.path, name, data).name
                entries[name] = {"sha256": _sha256(data), "size": len(data)}
            _fsync_dir(self.path)
            removed = [n for n in STATE_FILES + REPORTS if n not in files] if fresh else list(dict.fromkeys(remove))
            body = {"format": MANIFEST_FORMAT, "run": old["run"] if old else uuid.uuid4().hex,
                    "generation": gen, "files": entries, "staged": staged, "remove": removed}
            atomic_write_bytes(self.path / MANIFEST, json_bytes({**body, "checksum": _manifest_checksum(body)}))
        except BaseException:
            for tmp in staged.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / tmp)
            raise
        _finish(self.path, body, verify=False)
        if removed:  # done: a later recovery must not remove the reports written from now on
            _settle(self.path, body)


def _repair_hint(name: str) -> str:
    fix = "restore the run folder from a copy, or retrain"
    if name in (WEIGHTS, CHECKPOINT, BEST):
        fix += ("; a file copied out of the folder loads unverified (pyro_vae.checkpoint.load_tensors, or "
                "resume_from=FILE with overwrite=True / --overwrite to replace the run)")
    return fix


def _finish(folder: Path, m: dict[str, Any], verify: bool = True) -> None:
    """Complete a committed manifest: rename its staged files into place (those that match their checksum,
    with ``verify``), remove what a fresh run drops."""
    for name, tmp in m["staged"].items():
        src = folder / tmp
        if not src.is_file():
            continue
        if verify:
            entry, data = m["files"][name], src.read_bytes()
            if len(data) != entry["size"] or _sha256(data) != entry["sha256"]:
                continue
        _rename(src, folder / name)
    for name in m["remove"]:
        if name not in m["files"]:
            _remove(folder / name)
    _fsync_dir(folder)


def _settle(folder: Path, m: dict[str, Any]) -> None:
    """Write the manifest ``m`` again without its removals, once they are done."""
    settled = {k: v for k, v in m.items() if k != "checksum"}
    settled["remove"] = []
    atomic_write_bytes(folder / MANIFEST, json_bytes({**settled, "checksum": _manifest_checksum(settled)}))


def _recover(folder: Path) -> None:
    """At the start of a run (lock held): finish an interrupted commit (its renames and removals, then the
    manifest is settled), then remove this module's stale temporary files (a kill during a write leaves them).
    A damaged manifest leaves everything as it is."""
    try:
        m = RunFolder(folder).manifest()
    except CheckpointError:
        return
    if m is not None:
        _finish(folder, m)
        if m["remove"]:
            _settle(folder, m)
    for entry in os.listdir(folder):
        if _TEMP.match(entry) and (folder / entry).is_file():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / entry)


# ----------------------------------------------------------------------------------------------- locking
_held: dict[tuple[str, int], _Held] = {}
_held_guard = threading.Lock()


class _Held:
    def __init__(self, fd: int, created: list[Path], started_empty: bool) -> None:
        self.fd, self.created, self.started_empty, self.count = fd, created, started_empty, 0


def _key(folder: Path) -> tuple[str, int]:
    return os.path.realpath(folder), threading.get_ident()


def _require_lock(folder: Path) -> None:
    if _key(folder) not in _held:
        raise CheckpointError(message(f"run folder {folder}", "its lock held while committing",
                                      "a commit without the lock", "commit inside `with RunFolder(...).lock():`"))


def _flock(fd: int) -> bool:
    """Try to take an exclusive lock on ``fd`` without waiting."""
    try:
        import fcntl
    except ImportError:  # Windows: lock one byte far past the holder's text
        import msvcrt

        os.lseek(fd, 1 << 20, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _holder_text(folder: Path) -> str:
    try:
        info = json.loads((folder / LOCK).read_text())
        return f"pid {int(info['pid'])} on host {info['host']} since {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


def _probe_lock(folder: Path) -> str | None:
    if _key(folder) in _held:
        return _holder_text(folder)
    try:
        fd = os.open(folder / LOCK, os.O_RDWR)
    except OSError:
        return None
    try:
        return None if _flock(fd) else _holder_text(folder)
    finally:
        os.close(fd)  # closing releases a lock the probe took


class RunLock:
    """The exclusive lock of a run folder, held from ``__enter__`` to ``__exit__`` (the operating system
    releases it if the process dies). Entering creates the folder when missing, finishes a commit a kill
    interrupted and removes stale temporary files. The same thread may enter again (nested) at no cost.

    If the run fails (an exception, not Ctrl-C) before anything it trained was committed, leaving the lock
    removes what it wrote: the folder is as before the run (gone if the run created it).

    Raises:
        CheckpointError: another process (or thread) holds the lock; the message names it.
    """

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        self._entered = False

    def __enter__(self) -> RunLock:
        key = _key(self.folder)
        with _held_guard:
            held = _held.get(key)
            if held is None:
                held = _acquire(self.folder)
                _held[key] = held
            held.count += 1
        self._entered = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.release(failed=exc_type is not None and issubclass(exc_type, Exception))

    def release(self, failed: bool = False) -> None:
        """Let go of the lock (the last holder in this process unlocks the folder). With ``failed``, in a folder
        that was empty when it was locked, what the run wrote before committing anything trained is removed
        (and the folders the lock created). Does nothing when not held."""
        if not self._entered:
            return
        self._entered = False
        key = _key(self.folder)
        with _held_guard:
            held = _held[key]
            held.count -= 1
            if held.count:
                return
            del _held[key]
            try:
                if failed and held.started_empty:
                    _discard_untrained(self.folder, held.created)
            finally:
                os.close(held.fd)


def _acquire(folder: Path) -> _Held:
    created: list[Path] = []
    p = folder
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CheckpointError(message(f"run folder {folder}", "a folder this process can create and write",
                                      f"{describe(folder)} ({e.strerror or type(e).__name__})",
                                      "pick another folder or fix its permissions")) from None
    if not _flock(fd):
        os.close(fd)
        raise CheckpointError(message(
            f"run folder {folder}", "a folder no other training is writing", f"a run in progress: "
            f"{_holder_text(folder)}", "wait for it to end or stop it, or pass another --out / checkpoint_dir"))
    try:
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, text.encode())
        started_empty = not (folder / MANIFEST).is_file() and not any((folder / n).is_file() for n in TRAINED)
        _recover(folder)
    except BaseException:
        os.close(fd)
        raise
    return _Held(fd, created, started_empty)


def _discard_untrained(folder: Path, created: list[Path]) -> None:
    """Remove what a run that failed before committing anything trained wrote into ``folder``."""
    try:
        m = RunFolder(folder).manifest()
    except CheckpointError:
        return
    if m is not None and any(name in m["files"] for name in TRAINED):
        return
    for name in [*(m["files"] if m else ()), MANIFEST]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
    if created:
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK)
        for p in created:  # the folder first, then the parents this run created, while empty
            try:
                p.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def open_run(folder: PathLike, *, resume: bool = False, overwrite: bool = False,
             what: str = "checkpoint_dir") -> Iterator[RunFolder]:
    """Lock ``folder`` for a run (see :class:`RunLock`) and check that it may be written: a new run refuses a
    folder that training already wrote unless ``overwrite`` (then the old run's files go); ``resume``
    continues the run in it.

    Raises:
        CheckpointError: the folder holds a run, or files but no run (see :func:`check_new_run`), and neither
            ``resume`` nor ``overwrite`` was given; ``resume`` into a folder of files that is no run; another
            process holds its lock. Nothing is written into the folder then.
    """
    run = RunFolder(folder)
    if resume:
        _refuse_foreign(Path(folder), what, "the folder of the run to continue (resume_from)",
                        "pass the run's folder (or its checkpoint.pt), or start a new run in a new folder")
    else:  # before the lock, which writes its file into the folder
        check_new_run(folder, overwrite=overwrite, what=what)
    with run.lock():
        if not resume:
            check_new_run(folder, overwrite=overwrite, what=what)  # again: a run may have committed meanwhile
            if overwrite and any((run.path / n).is_file() for n in (MANIFEST, *STATE_FILES, *REPORTS)):
                run.commit({}, fresh=True)
        yield run


def check_new_run(folder: PathLike, *, overwrite: bool = False, what: str = "checkpoint_dir") -> None:
    """Refuse a new run into a folder training already wrote, or into an existing folder that holds files but is
    not a run folder (no manifest, lock or trained files: a user's own files), unless ``overwrite``; reads only.
    A missing or empty folder, and that of a run that trained nothing, are accepted.

    Raises:
        CheckpointError: naming what the folder holds and the ways forward.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(message(what, "a folder for the run", f"{describe(folder)} at {folder}",
                                      "pass a folder path"))
    if overwrite or not folder.is_dir():
        return
    run = RunFolder(folder)
    try:
        holds = run.holds_run()
    except CheckpointError:  # a damaged manifest: still a run
        holds = True
    if holds:
        ways = (("--resume", "--overwrite") if what == "--out" else
                (f"resume_from={str(folder)!r} (--resume on the command line)", "overwrite=True (--overwrite)"))
        raise CheckpointError(message(
            f"{what} {folder}", "a new or empty folder", f"a trained run ({describe(folder)})",
            f"continue it with {ways[0]}, replace it with {ways[1]}, or pass another folder"))
    over = "--overwrite" if what == "--out" else "overwrite=True"
    _refuse_foreign(folder, what, "a new or empty folder, or a pyro-vae run folder",
                    f"pass a new folder, or {over} to write the run into this one (its files of the names a run "
                    f"writes, such as {METRICS} and samples.png, are then replaced)")


def _refuse_foreign(folder: Path, what: str, expected: str, fix: str) -> None:
    """Raise :class:`CheckpointError` when ``folder`` exists and holds files (this module's lock and temporary
    files left out) but is not a run folder: no manifest, no lock, no file that training writes."""
    if not folder.is_dir() or RunFolder(folder).started() or any((folder / n).is_file() for n in TRAINED):
        return
    try:
        names = [n for n in os.listdir(folder) if n != LOCK and not _TEMP.match(n)]
    except OSError:
        return  # an unreadable folder: the lock or the first write names the problem
    if names:
        raise CheckpointError(message(f"{what} {folder}", expected,
                                      f"{describe(folder, limit=4)}, which is not a pyro-vae run", fix))


def started_without_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is the folder of a run that stopped before its first checkpoint (resuming it starts
    from step 0).

    Raises:
        CheckpointError: nothing exists at ``path``, or its manifest is damaged."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(message("resume_from", "the folder of the run to continue (or a checkpoint file)",
                                      f"nothing at {path} (it does not exist)",
                                      "pass the run's folder, or train without --resume / resume_from"))
    run = RunFolder(path)
    if not path.is_dir() or not run.started():
        return False
    m = run.manifest()
    if m is None:
        return not any((path / name).is_file() for name in TRAINED)
    return not any(name in m["files"] for name in TRAINED)


def has_checkpoint(folder: PathLike) -> bool:
    """Whether ``folder``'s manifest records a ``checkpoint.pt`` (``False`` for anything else)."""
    try:
        return CHECKPOINT in RunFolder(folder).recorded()
    except (CheckpointError, OSError):
        return False


# --------------------------------------------------------------------------------------- save and load
def config_json(vae: VAE, **extra: Any) -> bytes:
    """The bytes of a run's ``config.json``: the package version, the VAE's config and ``extra`` sections."""
    if vae.config is None:
        raise CheckpointError(message("vae", "a VAE built from named parts (so its config is JSON)",
                                      "a VAE with a user-supplied module or callable",
                                      "save vae.state_dict() yourself and rebuild the VAE in code"))
    return json_bytes({"version": __version__, "vae": vae.config, **extra})


def save(vae: VAE, run_dir: PathLike, **extra: Any) -> Path:
    """Write ``config.json`` (the VAE's config plus ``extra`` sections) and ``model.pt`` into ``run_dir``, as
    one commit under the folder's lock.

    Raises:
        CheckpointError: the VAE has no JSON config, another process holds the folder's lock, or ``run_dir`` is an
            existing folder of other files that is not a run folder (its files are never replaced).
    """
    _refuse_foreign(Path(run_dir), "run_dir", "a new or empty folder, or a pyro-vae run folder",
                    "pass a new folder (or an empty one) for the saved VAE")
    run = RunFolder(run_dir)
    files = {CONFIG: config_json(vae, **extra),
             WEIGHTS: tensor_bytes({k: v.detach().cpu() for k, v in vae.state_dict().items()})}
    with run.lock():
        run.commit(files)
    return run.path


def load(run_dir: PathLike, map_location: Any = "cpu", weights: str = WEIGHTS) -> VAE:
    """Rebuild the VAE of a run folder from ``config.json`` and load its ``weights`` (``model.pt``, or
    ``checkpoint.pt`` / ``best.pt`` of a training run), each verified against the folder's manifest.

    Raises:
        CheckpointError: the folder does not exist or is not a finished run (the message says what it holds),
            a file is damaged or from another run, or the weights do not fit the config.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise CheckpointError(message("run folder", "an existing folder", f"{describe(run_dir)} at {run_dir}",
                                          f"pass the folder of the run ({run_dir.parent}); weights= names a file "
                                          "in it"))
        raise CheckpointError(message("run folder", "an existing folder", f"nothing at {run_dir} (it does not "
                                      "exist)", "pass the --out folder of a `pyro-vae train` run"))
    run = RunFolder(run_dir)
    m = run.manifest()
    if m is None:
        if not (run_dir / CONFIG).is_file():
            raise CheckpointError(message(f"run folder {run_dir}", f"a {CONFIG} written by `pyro-vae train`",
                                          f"no {CONFIG} ({describe(run_dir)})",
                                          "pass the --out folder of a training run"))
        why = ("its manifest was deleted or lost" if (run_dir / LOCK).is_file() else
               "a folder of an older pyro-vae, or files copied by hand")
        raise CheckpointError(message(
            f"run folder {run_dir}", f"a {MANIFEST} recording its files' checksums (pyro-vae train, fit and "
            f"save write one)", f"{describe(run_dir)}, without {MANIFEST} ({why})", "restore the folder from a "
            "copy or retrain; or rebuild the VAE in code and load weights copied out of the folder with "
            "pyro_vae.checkpoint.load_tensors (unverified)"))
    if CONFIG not in m["files"]:
        raise CheckpointError(message(
            f"run folder {run_dir}", f"a {CONFIG} (pyro-vae train and pyro_vae.save write it)",
            f"a run of fit(checkpoint_dir=...) without one ({', '.join(sorted(m['files'])) or 'no files yet'})",
            "build the VAE in code and load_state_dict(pyro_vae.checkpoint.load_training_state(folder)['vae'])"))
    if weights not in m["files"]:
        running = run.holder()
        state = (f"training is running ({running})" if running else
                 f"training stopped before writing it (last checkpoint kept in {CHECKPOINT})"
                 if CHECKPOINT in m["files"] else "training stopped before its first checkpoint")
        fix = ("resume the run (pyro-vae train ... --resume) to finish it" +
               (f", or load its last state with pyro_vae.load(folder, weights={CHECKPOINT!r})"
                if CHECKPOINT in m["files"] else ""))
        raise CheckpointError(message(f"run folder {run_dir}", f"the weights {weights}", f"none: {state}", fix))
    files = run.verify(keep=(CONFIG, weights))
    config = _decode_json(files[CONFIG], str(run_dir / CONFIG))
    if not isinstance(config, dict) or not isinstance(config.get("vae"), dict):
        raise CheckpointError(message(f"{run_dir / CONFIG}", 'a "vae" section (an object)',
                                      f"{type(config.get('vae') if isinstance(config, dict) else config).__name__}",
                                      "pass the folder of a pyro-vae run"))
    try:
        vae = VAE.from_config(config["vae"])
    except Exception as e:  # noqa: BLE001 - any malformed entry: the config, not the caller, is at fault
        raise CheckpointError(message(f"{run_dir / CONFIG}", "a VAE configuration pyro-vae wrote",
                                      f"one that does not build ({type(e).__name__}: {str(e)[:160]})",
                                      "restore config.json from a copy of the run, or retrain")) from None
    state = _load_bytes(files[weights], str(run_dir / weights), map_location)
    if isinstance(state, dict) and isinstance(state.get("vae"), dict):
        state = state["vae"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(message(f"weights {run_dir / weights}", "a state dict (names to tensors)",
                                      f"a {type(state).__name__}", "pass a run folder written by pyro-vae"))
    try:
        vae.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)[:200]]
        raise CheckpointError(message(f"weights {run_dir / weights}", "tensors matching config.json",
                                      f"a mismatch ({first[0].strip()})",
                                      "the weights come from another configuration: retrain or restore the "
                                      "matching config.json")) from None
    return vae


def check_writable(folder: PathLike, need_bytes: int = 0, what: str = "checkpoint_dir") -> Path:
    """Prove that ``folder`` can be created (its nearest existing ancestor is a writable folder) or, when it
    exists, takes a file (written, fsynced, removed), and that ``need_bytes`` are free there: a read-only
    or full disk fails before training rather than at the first checkpoint. Creates nothing.

    Raises:
        ConfigError: the folder cannot be created or written, or has too little free space.
    """
    import shutil

    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe))
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-test-") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(probe).free
    except OSError as e:
        raise ConfigError(message(what, "a writable folder (one this process can create and write)", f"{folder} "
                                  f"({e.strerror or type(e).__name__}{f' at {probe}' if probe != folder else ''})",
                                  "pick another folder, fix its permissions or free some space")) from None
    if free < need_bytes:
        raise ConfigError(message(what, f"at least {need_bytes / 2**20:.1f} MiB free for checkpoints",
                                  f"{free / 2**20:.1f} MiB free in {probe}",
                                  "free some space or pick a folder on another disk"))
    return folder


def rng_state() -> dict[str, Any]:
    """Every random number generator training touches, as tensors and plain numbers (loadable with
    ``weights_only=True``): torch CPU, CUDA (current device, when present), Python ``random`` and numpy."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    # the global RandomState's generator is MT19937: its state is the legacy tuple
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
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


_PAYLOAD_TYPES: dict[str, tuple[type, ...]] = {
    "format": (int,), "version": (str,), "signature": (dict,), "vae_config": (str, type(None)), "vae": (dict,),
    "extra_modules": (list,), "optimizer": (dict,), "epoch": (int,), "batch": (int,), "epoch_complete": (bool,),
    "step": (int,), "epoch_total": (int, float, list), "history": (list,), "best": (int, float),
    "shuffle_seed": (int,), "world_size": (int,), "rng": (list,), "pyro_params": (list,),
}


def _check_payload(payload: dict[str, Any], path: Path) -> None:
    for key, types in _PAYLOAD_TYPES.items():
        if key not in payload or not isinstance(payload[key], types) or (
                bool not in types and isinstance(payload[key], bool)):
            found = f"{type(payload[key]).__name__}" if key in payload else "no such entry"
            raise CheckpointError(message(f"checkpoint {path}", f"a training checkpoint written by fit() (entry "
                                          f"{key!r}: {' or '.join(t.__name__ for t in types)})", found,
                                          f"resume from the {CHECKPOINT} of a run folder written by pyro-vae"))
    if not math.isfinite(payload["best"]) and payload["best"] != -math.inf:
        raise CheckpointError(message(f"checkpoint {path}", "a finite best score (or -inf before the first)",
                                      repr(payload["best"]), f"resume from the {CHECKPOINT} of a run folder"))


def load_training_state(path: PathLike, *, vae_config: Any = None, signature: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """Load a training checkpoint (``fit(checkpoint_dir=...)`` writes them) safely and check that it belongs
    to this configuration: the checksum, the format, the package release, the VAE's config and the training
    ``signature`` (batch size, learning rate, data size, ELBO, ...) must match.

    Args:
        path: a run folder (its ``checkpoint.pt``) or a checkpoint file (verified when its folder's manifest
            records it).

    Raises:
        CheckpointError: naming the first mismatch and how to proceed.
    """
    path = Path(path)
    if path.is_dir():
        run = RunFolder(path)
        if run.manifest() is None and (path / CHECKPOINT).is_file():
            raise CheckpointError(message(
                f"resume_from {path}", f"a run folder with a {MANIFEST} (its files' checksums)",
                f"{describe(path)}, without {MANIFEST} (written by an older pyro-vae or copied by hand)",
                f"pass the file itself, resume_from={str(path / CHECKPOINT)!r}, to resume from it unverified"))
        if CHECKPOINT not in run.recorded():
            if (path / CHECKPOINT).exists():
                raise CheckpointError(message(
                    f"resume_from {path}", f"a {CHECKPOINT} its {MANIFEST} records", f"a {CHECKPOINT} the "
                    "manifest does not record (copied in from elsewhere?)", "pass the file itself, resume_from="
                    f"{str(path / CHECKPOINT)!r}, to resume from it unverified"))
            raise CheckpointError(message(f"resume_from {path}", f"a run folder holding {CHECKPOINT}",
                                          f"{describe(path)}, without {CHECKPOINT}: not a run",
                                          "train from scratch without --resume / resume_from"))
        path = path / CHECKPOINT
    payload = load_tensors(path)
    if not isinstance(payload, dict) or "optimizer" not in payload or "vae" not in payload:
        raise CheckpointError(message(f"checkpoint {path}", "a training checkpoint written by fit()",
                                      "a file without optimizer state (only weights?)",
                                      f"resume from the {CHECKPOINT} in the run folder"))
    fmt, version = payload.get("format"), payload.get("version")
    if type(fmt) is not int or not isinstance(version, str) or fmt != FORMAT or not _same_release(version,
                                                                                                 __version__):
        raise CheckpointError(message(
            f"checkpoint {path}", f"format {FORMAT} from pyro-vae {'.'.join(__version__.split('.')[:2])}.x",
            f"format {fmt if type(fmt) is int else type(fmt).__name__} from pyro-vae "
            f"{version if isinstance(version, str) else type(version).__name__}",
            "resume with the pyro-vae release that wrote it, or load only its weights (pyro_vae.load) and "
            "train anew"))
    _check_payload(payload, path)
    stored_cfg = payload.get("vae_config")
    if vae_config is not None:
        vae_config = json.loads(json.dumps(vae_config))  # tuples become lists, as in the stored copy
    try:
        old = json.loads(stored_cfg) if stored_cfg is not None else None
    except json.JSONDecodeError:
        old = None
    if stored_cfg is not None and not isinstance(old, dict):
        raise CheckpointError(message(f"checkpoint {path}", "the VAE's config as a JSON object",
                                      f"{stored_cfg[:60]!r}", f"resume from the {CHECKPOINT} of a pyro-vae run"))
    if vae_config is not None and old is not None and old != vae_config:
        new = vae_config
        key = next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), "?")
        raise CheckpointError(message(f"checkpoint {path}", f"{key} = {new.get(key)!r} (this VAE)",
                                      f"{key} = {old.get(key)!r} in the checkpoint",
                                      "build the VAE with the options of the run being resumed, or train into a "
                                      "new folder"))
    stored_sig = payload["signature"]
    for key, value in (signature or {}).items():
        if key in stored_sig and (type(stored_sig[key]) is not type(value) or stored_sig[key] != value):
            raise CheckpointError(message(f"checkpoint {path}", f"{key} = {value!r} (this call)",
                                          f"{key} = {stored_sig[key]!r} in the checkpoint",
                                          f"resume with the same {key} as the original run, or train into a new "
                                          "folder"))
    return payload
