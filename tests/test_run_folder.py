"""Run folders that survive anything: never replaced without being asked, one run at a time, one consistent
unit under a kill at any write, damage always found, nothing written for a refused run, and resume from any
state a kill leaves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_vae
from pyro_vae import checkpoint, cli
from pyro_vae.errors import CheckpointError, NonFiniteLossError

N, D = 32, 6  # 2 steps per epoch at batch size 16


def _data() -> torch.Tensor:
    return (torch.rand(N, D, generator=torch.Generator().manual_seed(5)) > 0.5).float()


def _vae(**kw) -> pyro_vae.VAE:
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    return pyro_vae.VAE((D,), 2, hidden=(8,), **kw)


def _fit(vae: pyro_vae.VAE, **kw) -> pyro_vae.History:
    base = dict(epochs=2, batch_size=16, lr=1e-2, device="cpu", progress=False, seed=0, val_data=_data()[:8],
                dynamic_binarize=True)
    return pyro_vae.fit(vae, _data(), **{**base, **kw})


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _temporaries(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if checkpoint._TEMP.match(n)]


class At:
    """Calls ``action(state)`` after optimizer step ``step``."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_step(self, state) -> None:
        if state.step == self.step:
            self.action(state)


def _poison(state) -> None:
    with torch.no_grad():
        next(state.vae.decoder.parameters()).fill_(float("nan"))


def _cli_data(tmp_path: Path) -> Path:
    """A small binary image data set as a .npy file: the command line trains on it in a second."""
    path = tmp_path / "x.npy"
    np.save(path, (np.random.default_rng(0).random((40, 4, 4)) > 0.5).astype(np.float32))
    return path


def _train_args(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(_cli_data(tmp_path)), "--epochs", "2", "--batch-size", "16", "--hidden", "8",
            "--z-dim", "2", "--likelihood", "bernoulli", "--device", "cpu", "--no-progress", "--out", str(out),
            *extra]


# ----------------------------------------------------------------------------- 1. never silently replaced
def test_a_trained_run_folder_is_never_replaced_without_overwrite(tmp_path):
    run = tmp_path / "run"
    _fit(_vae(), checkpoint_dir=run)
    before = {n: (run / n).read_bytes() for n in ("checkpoint.pt", "best.pt", "best.json", "manifest.json")}
    with pytest.raises(CheckpointError, match=r"expected a new or empty folder, found a trained run .*Fix: "
                                              r"continue it with resume_from=.*replace it with overwrite=True"):
        _fit(_vae(), epochs=1, checkpoint_dir=run)
    assert {n: (run / n).read_bytes() for n in before} == before
    hist = _fit(_vae(), epochs=1, checkpoint_dir=run, overwrite=True)
    state = checkpoint.load_training_state(run)
    assert len(hist) == 1 and (state["epoch"], len(state["history"])) == (1, 1)


def test_cli_train_into_a_trained_run_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_train_args(tmp_path, run)) == 0
    model = (run / "model.pt").read_bytes()
    capsys.readouterr()
    assert cli.main(_train_args(tmp_path, run, "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "found a trained run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "model.pt").read_bytes() == model and len(json.loads((run / "history.json").read_text())[
        "epochs"]) == 2
    assert cli.main(_train_args(tmp_path, run, "--epochs", "1", "--overwrite")) == 0
    assert len(json.loads((run / "history.json").read_text())["epochs"]) == 1
    assert checkpoint.load_training_state(run)["epoch"] == 1


def _users_folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder of a user's own files, two of them with names a run writes."""
    folder = tmp_path / "mine"
    folder.mkdir()
    files = {"samples.png": b"my picture", "metrics.json": b'{"mine": 1}\n', "notes.txt": b"notes"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder, files


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_fit_refuses_a_folder_of_files_that_is_not_a_run_and_writes_nothing_into_it(tmp_path):
    folder, files = _users_folder(tmp_path)
    pattern = (rf"checkpoint_dir {folder}: expected a new or empty folder, or a pyro-vae run folder, found a folder "
               r"holding metrics.json, notes.txt, samples.png, which is not a pyro-vae run\. Fix: pass a new "
               r"folder, or overwrite=True")
    with pytest.raises(CheckpointError, match=pattern):
        _fit(_vae(), epochs=1, checkpoint_dir=folder)
    with pytest.raises(CheckpointError, match=rf"checkpoint_dir {folder}: expected the folder of the run to "
                                              r"continue .*found a folder holding .*which is not a pyro-vae run"):
        _fit(_vae(), epochs=1, checkpoint_dir=folder, resume_from=folder)
    assert _contents(folder) == files  # no lock file, no manifest, nothing replaced
    hist = _fit(_vae(), epochs=1, checkpoint_dir=folder, overwrite=True)
    assert len(hist) == 1 and checkpoint.load_training_state(folder)["epoch"] == 1
    assert (folder / "notes.txt").read_bytes() == b"notes" and not (folder / "metrics.json").exists()


def test_save_refuses_a_folder_of_files_that_is_not_a_run_and_takes_a_saved_one(tmp_path):
    folder, files = _users_folder(tmp_path)
    (folder / "config.json").write_bytes(b'{"mine": 2}\n')  # a name save writes
    files["config.json"] = b'{"mine": 2}\n'
    with pytest.raises(CheckpointError, match=rf"run_dir {folder}: expected a new or empty folder, or a pyro-vae "
                                              r"run folder, found a folder holding .*which is not a pyro-vae run"):
        checkpoint.save(_vae(), folder)
    assert _contents(folder) == files
    saved = checkpoint.save(_vae(), tmp_path / "saved")
    checkpoint.save(_vae(), saved)  # a folder save wrote is a run folder: saved again in place
    assert checkpoint.load(saved).z_dim == _vae().z_dim


def test_an_empty_existing_folder_takes_a_new_run(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    _fit(_vae(), epochs=1, checkpoint_dir=folder)
    assert checkpoint.load_training_state(folder)["epoch"] == 1


def test_cli_refuses_out_holding_a_users_files_in_one_line_and_overwrite_writes_the_run(tmp_path, capsys):
    folder, files = _users_folder(tmp_path)
    assert cli.main(_train_args(tmp_path, folder)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--out {folder}" in err and "samples.png" in err and "metrics.json" in err
    assert "not a pyro-vae run" in err and "pass a new folder, or --overwrite" in err
    assert _contents(folder) == files
    assert cli.main(_train_args(tmp_path, folder, "--epochs", "1", "--overwrite")) == 0
    assert (folder / "notes.txt").read_bytes() == b"notes"
    assert json.loads((folder / "metrics.json").read_text())["epochs"] == 1
    assert (folder / "samples.png").read_bytes() != files["samples.png"]


# ----------------------------------------------------------------------------- 2. one run per folder
HOLD = ("import sys, time\nfrom pyro_vae import checkpoint\nlock = checkpoint.RunFolder(sys.argv[1]).lock()\n"
        "lock.__enter__()\nprint('locked', flush=True)\ntime.sleep(300)\n")


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"a run in progress: pid {holder.pid} on host .* since .*Fix: "
                                                  r"wait for it to end"):
            _fit(_vae(), checkpoint_dir=run)
        assert cli.main(_train_args(tmp_path, run)) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"pid {holder.pid}" in err
        assert not (run / "manifest.json").exists()
    finally:
        holder.kill()  # the operating system releases the lock of a killed process
        holder.wait(30)
    _fit(_vae(), checkpoint_dir=run)
    assert checkpoint.RunFolder(run).holder() is None


def test_the_lock_is_released_when_fit_raises(tmp_path):
    run = tmp_path / "run"

    def fail(state):
        raise RuntimeError("a failing callback")

    with pytest.raises(RuntimeError, match="failing callback"):
        _fit(_vae(), checkpoint_dir=run, checkpoint_every=1, callbacks=[At(2, fail)])
    assert checkpoint.RunFolder(run).holder() is None and checkpoint._held == {}
    _fit(_vae(), checkpoint_dir=run, resume_from=run)


# ----------------------------------------------------------------------------- 3. a kill at any write
class _Snapshots:
    """Wraps the run folder's three file operations (write a new file, rename, remove) and copies the folder
    before each one, and once more with a half-written temporary file before each write: each copy is the
    folder as a SIGKILL at that moment would leave it."""

    def __init__(self, folder: Path, root: Path, monkeypatch) -> None:
        self.folder, self.root, self.copies = folder, root, []
        for name in ("_write_new", "_rename", "_remove"):
            monkeypatch.setattr(checkpoint, name, self._wrap(name, getattr(checkpoint, name)))

    def _copy(self, label: str, torn: tuple[str, bytes] | None = None) -> None:
        if not self.folder.exists():
            return
        dst = self.root / f"{len(self.copies):03d}"
        shutil.copytree(self.folder, dst)
        if torn is not None:
            (dst / f".{torn[0]}.torn0000.tmp").write_bytes(torn[1][: len(torn[1]) // 2])
        self.copies.append((label, dst))

    def _wrap(self, name: str, real):
        def op(*args):
            label = f"before {name}{tuple(str(a)[-40:] for a in args if not isinstance(a, bytes))}"
            self._copy(label)
            if name == "_write_new":
                self._copy(label + " (torn)", (args[1], args[2]))
            return real(*args)

        return op


def test_a_kill_at_any_write_leaves_a_folder_that_loads_and_resumes_to_the_uninterrupted_run(tmp_path,
                                                                                           monkeypatch):
    """Every folder state a kill can leave during a run (before each file operation, and during each write)
    loads consistently (best.pt, best.json and checkpoint.pt's best score agree) and resumes to the parameters,
    checkpoint and best model of the uninterrupted run, bit for bit, with no temporary file left behind."""
    kw = dict(checkpoint_every=3)  # checkpoints at steps 2 (epoch end), 3 (mid-epoch) and 4 (end)
    reference, ref = _vae(), tmp_path / "reference"
    hist = _fit(reference, checkpoint_dir=ref, **kw)
    assert hist["val_elbo"][1] > hist["val_elbo"][0]  # best.pt is written twice: its lag could show
    ref_best = checkpoint.RunFolder(ref).read_json("best.json")
    ref_best_vae = checkpoint.load_training_state(ref / "best.pt")["vae"]

    run = tmp_path / "run"
    snaps = _Snapshots(run, tmp_path / "kills", monkeypatch)
    _fit(_vae(), checkpoint_dir=run, **kw)
    monkeypatch.undo()
    assert len(snaps.copies) >= 30
    for label, folder in snaps.copies:
        if checkpoint.has_checkpoint(folder):
            state = checkpoint.load_training_state(folder)
            if "best.pt" in checkpoint.RunFolder(folder).recorded():
                best = checkpoint.RunFolder(folder).read_json("best.json")
                assert state["best"] == best["elbo"], label
                assert checkpoint.load_training_state(folder / "best.pt")["step"] == best["step"], label
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "resume_from .* starts from step 0")
            resumed = _vae()
            _fit(resumed, checkpoint_dir=folder, resume_from=folder, **kw)
        assert _equal(resumed.state_dict(), reference.state_dict()), label
        assert checkpoint.RunFolder(folder).read_json("best.json") == ref_best, label
        assert _equal(checkpoint.load_training_state(folder / "best.pt")["vae"], ref_best_vae), label
        assert _temporaries(folder) == [], label


def test_a_kill_while_saving_leaves_the_old_or_the_new_model(tmp_path, monkeypatch):
    run = tmp_path / "run"
    old, new = pyro_vae.VAE((D,), 2, hidden=(8,)), pyro_vae.VAE((D,), 3, hidden=(5,))
    pyro_vae.save(old, run)
    snaps = _Snapshots(run, tmp_path / "kills", monkeypatch)
    pyro_vae.save(new, run)
    monkeypatch.undo()
    assert len(snaps.copies) >= 6
    for label, folder in snaps.copies:
        loaded = pyro_vae.load(folder).state_dict()
        assert _equal(loaded, old.state_dict()) or _equal(loaded, new.state_dict()), label


def test_a_kill_while_committing_new_weights_never_leaves_them_beside_the_old_weights_reports(tmp_path,
                                                                                              monkeypatch):
    """commit(files, remove=reports): a kill at any write leaves the old weights with their reports, or the new
    weights without them (once the next lock has finished the commit); the removal is applied once, so a report
    written after the commit survives later locks."""
    run = tmp_path / "run"
    old, new = pyro_vae.VAE((D,), 2, hidden=(8,)), pyro_vae.VAE((D,), 3, hidden=(5,))
    pyro_vae.save(old, run)
    reports = {"metrics.json": b'{"log_likelihood": -3.0}\n', "pareto_k.png": b"png", "imputation.json": b"{}"}
    for name, data in reports.items():
        (run / name).write_bytes(data)
    snaps = _Snapshots(run, tmp_path / "kills", monkeypatch)
    folder = checkpoint.RunFolder(run)
    with folder.lock():
        folder.commit({"model.pt": checkpoint.tensor_bytes(new.state_dict()),
                       "config.json": checkpoint.config_json(new)}, remove=sorted(reports))
    monkeypatch.undo()
    assert len(snaps.copies) >= 8
    for label, copy in [*snaps.copies, ("after", run)]:
        with checkpoint.RunFolder(copy).lock():  # finishes an interrupted commit
            pass
        loaded = pyro_vae.load(copy).state_dict()
        there = {name for name in reports if (copy / name).exists()}
        if _equal(loaded, old.state_dict()):
            assert there == set(reports), label
        else:
            assert _equal(loaded, new.state_dict()) and there == set(), label
        assert checkpoint.RunFolder(copy).manifest()["remove"] == [], label
        (copy / "metrics.json").write_text('{"test_elbo": -4.0}')
        with checkpoint.RunFolder(copy).lock():
            pass
        assert (copy / "metrics.json").read_text() == '{"test_elbo": -4.0}', label
    with pytest.raises(ValueError, match="model.pt: not a run folder report"), folder.lock():
        folder.commit({}, remove=["model.pt"])


def test_stale_temporaries_are_removed_when_a_run_starts_or_resumes(tmp_path):
    run = tmp_path / "run"
    _fit(_vae(), epochs=1, checkpoint_dir=run)
    ours = [".checkpoint.pt.k1ll3d_x.tmp", ".manifest.json.abcdefgh.tmp", ".write-test-q7w8e9r0"]
    for name in ours:
        (run / name).write_bytes(b"left by a killed run")
    (run / ".notes.tmp").write_text("the user's own file")
    _fit(_vae(), checkpoint_dir=run, resume_from=run)
    assert not any((run / name).exists() for name in ours)
    assert (run / ".notes.tmp").read_text() == "the user's own file"


# ----------------------------------------------------------------------------- 4. damage is always found
FILES = ("config.json", "model.pt", "checkpoint.pt", "best.pt", "best.json", "manifest.json")
WRONG = st.sampled_from([None, "x", 1.5, -1, True, [], {}, [1, 2]])


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Two finished runs (config.json, model.pt, checkpoint.pt, best.pt, best.json) and what each reader
    returns for the first."""
    root = tmp_path_factory.mktemp("golden")
    for name, seed in (("a", 0), ("b", 1)):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        vae = pyro_vae.VAE((D,), 2, hidden=(8,))
        _fit(vae, seed=seed, checkpoint_dir=root / name)
        pyro_vae.save(vae, root / name, data={"data": "x.npy"})
    expected = {op: read(root / "a") for op, read in READERS.items()}
    return _Golden(root, expected)


class _Golden(tuple):
    def __new__(cls, root: Path, expected: dict):
        return super().__new__(cls, (root, expected))

    def __repr__(self) -> str:
        return f"golden runs in {self[0]}"


def _resume(folder: Path) -> dict:
    vae = _vae()
    _fit(vae, checkpoint_dir=folder, resume_from=folder)  # a finished run: restored, nothing trained
    return vae.state_dict()


READERS = {
    "load": lambda d: pyro_vae.load(d).state_dict(),
    "load best.pt": lambda d: pyro_vae.load(d, weights="best.pt").state_dict(),
    "load checkpoint.pt": lambda d: pyro_vae.load(d, weights="checkpoint.pt").state_dict(),
    "training state": lambda d: checkpoint.load_training_state(d)["vae"],
    "best state": lambda d: checkpoint.load_training_state(d / "best.pt")["vae"],
    "best.json": lambda d: checkpoint.read_json(d / "best.json"),
    "config.json": lambda d: checkpoint.read_json(d / "config.json"),
    "resume": _resume,
}


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict) and a and torch.is_tensor(next(iter(a.values()))):
        return _equal(a, b)
    return a == b


@st.composite
def _damage(draw):
    kind = draw(st.sampled_from(["truncate", "zeros", "flip", "delete", "other run", "json", "payload"]))
    if kind == "json":  # edited and committed with a matching checksum: the readers' own checks must hold
        return kind, draw(st.sampled_from(["config.json", "best.json"])), draw(st.integers(0, 50)), draw(WRONG)
    if kind == "payload":
        return kind, draw(st.sampled_from(["model.pt", "checkpoint.pt", "best.pt"])), draw(st.integers(0, 50)), \
            draw(st.one_of(WRONG, st.just(torch.zeros(3)), st.just("drop")))
    return kind, draw(st.sampled_from(FILES)), draw(st.floats(0, 1)), draw(st.integers(1, 255))


def _apply(folder: Path, other: Path, damage) -> None:
    kind, name, a, b = damage
    path = folder / name
    if kind == "delete":
        path.unlink(missing_ok=True)
    elif kind == "other run":
        shutil.copy(other / name, path)
    elif kind in ("truncate", "zeros", "flip"):
        if not path.exists():
            return
        raw = bytearray(path.read_bytes())
        at = int(a * len(raw))
        if kind == "truncate":
            raw = raw[:at]
        elif kind == "zeros":
            raw[at: at + b] = bytes(len(raw[at: at + b]))
        elif raw:
            raw[min(at, len(raw) - 1)] ^= b
        path.write_bytes(bytes(raw))
    else:
        run = checkpoint.RunFolder(folder)
        try:
            obj = run.read_json(name) if kind == "json" else run.read_tensors(name)
        except CheckpointError:
            return
        target = obj.get("vae") if isinstance(obj, dict) and isinstance(obj.get("vae"), dict) and a % 2 else obj
        if isinstance(target, dict) and target:
            key = sorted(target)[a % len(target)]
            if isinstance(b, str) and b == "drop":
                del target[key]
            else:
                target[key] = b
        data = checkpoint.json_bytes(obj) if kind == "json" else checkpoint.tensor_bytes(obj)
        with run.lock():
            run.commit({name: data})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damages=st.lists(_damage(), min_size=1, max_size=3))
def test_any_damage_to_a_run_folder_gives_a_checkpoint_error_never_a_raw_one(golden, damages):
    """Truncation, zeroed or flipped bytes, a deleted file, a file of another run: every reader either returns
    exactly what it returns for the intact folder or raises CheckpointError. JSON or checkpoint entries of the
    wrong type or missing, committed with matching checksums: every reader returns or raises CheckpointError."""
    root, expected = golden
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        shutil.copytree(root / "a", folder)
        for damage in damages:
            _apply(folder, root / "b", damage)
        edited = any(kind in ("json", "payload") for kind, *_ in damages)  # checksums match: values may change
        raw = []
        for op, read in READERS.items():
            try:
                result = read(folder)
            except CheckpointError:
                continue
            except Exception as e:  # noqa: BLE001 - the point of the test
                raw.append(f"{op}: {type(e).__name__}: {e}")
                continue
            assert edited or _same(result, expected[op]), f"{op} read damaged data silently after {damages}"
        assert raw == [], damages


def test_flipped_bytes_inside_a_tensor_are_found(tmp_path):
    run = tmp_path / "run"
    pyro_vae.save(pyro_vae.VAE((D,), 2, hidden=(8,)), run)
    raw = bytearray((run / "model.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x40  # torch.load would not notice: it does not check the archive's CRC
    (run / "model.pt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model.pt: expected the file the run's manifest.json records "
                                              r"\(\d+ bytes, SHA-256 .*the file is damaged, or comes from another run"):
        pyro_vae.load(run)


# ----------------------------------------------------------------------------- 8. nothing for a refused run
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    out = tmp_path / "runs" / "run"
    with pytest.raises(NonFiniteLossError, match=r"no checkpoint was written to .*run before it"):
        _fit(_vae(), checkpoint_dir=out, callbacks=[At(1, _poison)])
    assert not (tmp_path / "runs").exists()


def test_cli_refused_for_disk_space_writes_nothing(tmp_path, capsys, monkeypatch):
    data = _cli_data(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    monkeypatch.chdir(tmp_path)
    for out in (["--out", str(tmp_path / "run")], []):
        args = ["train", "--data", str(data), "--epochs", "1", "--device", "cpu", "--no-progress", *out]
        assert cli.main(args) == 2
        assert "MiB free for checkpoints" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


def test_load_and_sample_refuse_a_folder_training_has_not_written(tmp_path, capsys, monkeypatch):
    run = _killed_before_first_checkpoint(tmp_path, monkeypatch)
    with pytest.raises(CheckpointError, match=r"expected the weights model.pt, found none: training stopped "
                                              r"before its first checkpoint"):
        pyro_vae.load(run)
    assert cli.main(["sample", str(run), "--n", "4", "--device", "cpu"]) == 2
    assert "training stopped before its first checkpoint" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to find a file descriptor's path")
def test_a_full_disk_during_training_names_the_file(tmp_path, capsys, monkeypatch):
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as e:
        _fit(_vae(), checkpoint_dir=tmp_path / "run")
    assert e.value.errno == 28 and e.value.filename == str(tmp_path / "run" / "checkpoint.pt")
    assert cli.main(_train_args(tmp_path, tmp_path / "cli")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'cli'}/config.json: No space left on device" in err


# ----------------------------------------------------------------------------- 9. resume from any state
class _Killed(BaseException):
    """A simulated SIGKILL (not an Exception: nothing cleans up after it)."""


def _killed_before_first_checkpoint(tmp_path: Path, monkeypatch) -> Path:
    """A `pyro-vae train` killed after it began but before its first checkpoint."""
    run = tmp_path / "killed"
    real = checkpoint.RunFolder.commit

    def commit(self, files, **kw):
        if "checkpoint.pt" in files:
            raise _Killed()
        return real(self, files, **kw)

    monkeypatch.setattr(checkpoint.RunFolder, "commit", commit)
    with pytest.raises(_Killed):
        cli.main(_train_args(tmp_path, run))
    monkeypatch.undo()
    assert checkpoint.RunFolder(run).recorded().keys() == {"config.json"}
    return run


def test_cli_resume_of_a_run_killed_before_its_first_checkpoint_starts_from_step_0(tmp_path, capsys,
                                                                                    monkeypatch):
    run = _killed_before_first_checkpoint(tmp_path, monkeypatch)
    capsys.readouterr()
    assert cli.main(_train_args(tmp_path, run, "--resume")) == 0
    assert "holds no checkpoint (the run stopped before its first one); training starts from step 0" in \
        capsys.readouterr().err
    assert cli.main(_train_args(tmp_path, tmp_path / "full")) == 0
    full = checkpoint.load_tensors(tmp_path / "full" / "model.pt")
    assert _equal(checkpoint.load_tensors(run / "model.pt"), full)


def test_fit_resume_of_a_run_stopped_before_its_first_checkpoint_starts_from_step_0(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        _fit(_vae(), checkpoint_dir=run, callbacks=[At(1, lambda s: (_ for _ in ()).throw(_Killed()))])
    assert not checkpoint.has_checkpoint(run)
    resumed = _vae()
    with pytest.warns(UserWarning, match="stopped before its first checkpoint.*training starts from step 0"):
        _fit(resumed, checkpoint_dir=run, resume_from=run)
    reference = _vae()
    _fit(reference)
    assert _equal(resumed.state_dict(), reference.state_dict())


def test_cli_resume_with_a_missing_out_creates_nothing_and_says_so(tmp_path, capsys):
    out = tmp_path / "never" / "run"
    assert cli.main(_train_args(tmp_path, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "expected the folder of a run to resume, found nothing (it does not exist)" in err
    assert not (tmp_path / "never").exists()


def test_messages_say_what_is_there(tmp_path, capsys):
    folder = tmp_path / "a_dir.npy"
    folder.mkdir()
    assert cli.main(["train", "--data", str(folder), "--epochs", "1", "--device", "cpu"]) == 2
    assert f"found an empty folder at {folder}" in capsys.readouterr().err
    (folder / "part1.npy").write_bytes(b"")
    assert cli.main(["train", "--data", str(folder), "--epochs", "1", "--device", "cpu"]) == 2
    assert f"found a folder holding part1.npy at {folder}" in capsys.readouterr().err
    run = tmp_path / "run"
    pyro_vae.save(pyro_vae.VAE((D,), 2, hidden=(8,)), run)
    size = (run / "model.pt").stat().st_size
    with pytest.raises(CheckpointError, match=rf"found a file of {size} bytes at .*model.pt\. Fix: pass the folder "
                                              rf"of the run \({run}\)"):
        pyro_vae.load(run / "model.pt")
    capsys.readouterr()
    assert cli.main(_train_args(tmp_path, run, "--resume", "--overwrite")) == 2
    assert "--resume / --overwrite: expected one of them, found both" in capsys.readouterr().err
