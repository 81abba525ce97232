"""Checkpoints: atomic writes, what a training checkpoint carries, last and best, bit-identical resume after
SIGKILL, configuration and version checks, and safe loading (a crafted pickle is refused unexecuted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

import pyro_vae
from pyro_vae import checkpoint
from pyro_vae.errors import CheckpointError

N, D = 96, 10

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import pyro, torch
    import pyro_vae

    torch.set_num_threads(1)
    out, kill_at = sys.argv[1], int(sys.argv[2])
    x = (torch.rand(96, 10, generator=torch.Generator().manual_seed(5)) > 0.5).float()

    class Kill:
        def on_step(self, state):
            if state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    pyro.set_rng_seed(1)
    vae = pyro_vae.VAE((10,), 2, hidden=(16,))
    pyro_vae.fit(vae, x, epochs=3, batch_size=16, lr=1e-2, device="cpu", progress=False, seed=0,
                 val_data=x[:20], dynamic_binarize=True, checkpoint_dir=out, checkpoint_every=4,
                 callbacks=[Kill()])
""")


def _data() -> torch.Tensor:
    return (torch.rand(N, D, generator=torch.Generator().manual_seed(5)) > 0.5).float()


def _vae() -> pyro_vae.VAE:
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    return pyro_vae.VAE((D,), 2, hidden=(16,))


def _fit(vae: pyro_vae.VAE, **kw) -> pyro_vae.History:
    base = dict(epochs=3, batch_size=16, lr=1e-2, device="cpu", progress=False, seed=0, val_data=_data()[:20],
                dynamic_binarize=True)
    return pyro_vae.fit(vae, _data(), **{**base, **kw})


def test_resume_after_sigkill_mid_epoch_is_bit_identical(tmp_path):
    """A run killed with SIGKILL at step 10 of 18 (epoch 2 of 3, after the step-8 checkpoint) in a subprocess
    and resumed here ends with exactly the parameters of an uninterrupted run: dynamic binarization, the
    guide's noise, the shuffles and Adam's state all continue where they were."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), str(run), "10"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    state = checkpoint.load_training_state(run)
    assert (state["step"], state["epoch"], state["batch"], state["epoch_complete"]) == (8, 2, 2, False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = _vae()
        _fit(resumed, checkpoint_dir=run, checkpoint_every=4, resume_from=run)
        vae = _vae()
        _fit(vae, checkpoint_every=4)
    finally:
        torch.set_num_threads(threads)
    for key, value in vae.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert any(not torch.equal(value, _vae().state_dict()[key]) for key, value in vae.state_dict().items())


def test_checkpoint_carries_optimizer_rng_epoch_step_and_best(tmp_path):
    vae = _vae()
    hist = _fit(vae, checkpoint_dir=tmp_path, val_data=_data()[:20])
    state = checkpoint.load_training_state(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["epoch_complete"]) == (3, 18, True)
    assert len(state["optimizer"]["state"]) == len(list(vae.parameters()))
    assert int(state["optimizer"]["state"][0]["step"]) == 18
    assert set(state["rng"][0]) >= {"torch", "random", "numpy"}
    assert [e["val_elbo"] for e in state["history"]] == hist["val_elbo"]
    for key, value in vae.state_dict().items():
        assert torch.equal(state["vae"][key], value)
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["elbo"] == max(hist["val_elbo"])
    assert checkpoint.load_training_state(tmp_path / "best.pt")["epoch"] == best["epoch"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_write_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_tensors(path, {"a": torch.ones(3)})
    before = path.read_bytes()

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        checkpoint.save_tensors(path, {"a": torch.zeros(1000)})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["model.pt", "checkpoint.pt"])
def test_crafted_pickle_is_refused_without_running_it(tmp_path, name):
    marker = tmp_path / "pwned"
    vae = pyro_vae.VAE((D,), 2, hidden=(8,))
    run = tmp_path / "run"
    pyro_vae.save(vae, run)
    torch.save({"vae": _Evil(marker)}, run / name)  # a zip checkpoint whose pickle calls os.system
    with pytest.raises(CheckpointError, match="manifest"):  # in a run folder: not the file its manifest records
        if name == "model.pt":
            pyro_vae.load(run)
        else:
            pyro_vae.fit(_vae(), _data(), epochs=1, progress=False, device="cpu", resume_from=run)
    loose = tmp_path / name  # on its own, with no manifest to check it against
    loose.write_bytes((run / name).read_bytes())
    with pytest.raises(CheckpointError, match="weights_only=True"):
        if name == "model.pt":
            checkpoint.load_tensors(loose)
        else:
            pyro_vae.fit(_vae(), _data(), epochs=1, progress=False, device="cpu", resume_from=loose)
    assert not marker.exists()
    # torch.load without the safety would have run it: the file really is malicious
    torch.load(loose, weights_only=False)
    assert marker.exists()


def test_resume_refuses_another_configuration(tmp_path):
    _fit(_vae(), epochs=1, checkpoint_dir=tmp_path)
    pyro.clear_param_store()
    other = pyro_vae.VAE((D,), 3, hidden=(16,))
    with pytest.raises(CheckpointError, match="z_dim = 3 .*z_dim = 2 in the checkpoint"):
        _fit(other, resume_from=tmp_path)
    with pytest.raises(CheckpointError, match="batch_size = 32 .*batch_size = 16 in the checkpoint"):
        _fit(_vae(), batch_size=32, resume_from=tmp_path)


def test_resume_refuses_another_package_release_and_plain_weights(tmp_path):
    _fit(_vae(), epochs=1, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["version"] = "9.0.0"
    checkpoint.save_tensors(tmp_path / "old.pt", state)
    with pytest.raises(CheckpointError, match="from pyro-vae 9.0.0"):
        _fit(_vae(), resume_from=tmp_path / "old.pt")
    checkpoint.save_tensors(tmp_path / "weights.pt", _vae().state_dict())
    with pytest.raises(CheckpointError, match="without optimizer state"):
        _fit(_vae(), resume_from=tmp_path / "weights.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="found an empty folder, without checkpoint.pt: not a run"):
        _fit(_vae(), resume_from=tmp_path / "empty")


def test_numpy_hyperparameters_train_save_and_resume_as_plain_values(tmp_path):
    """As a grid search passes them: numpy scalars train, go into the checkpoint as plain Python values (the
    safe loader refuses numpy objects), and resume to an uninterrupted run with plain values, bit for bit."""
    as_numpy = dict(epochs=np.int64(2), batch_size=np.int32(16), lr=np.float64(1e-2), seed=np.int64(0),
                    num_particles=np.int64(1), checkpoint_every=np.int64(4), clip_norm=np.float64(5.0),
                    dynamic_binarize=np.bool_(True), elbo=np.str_("trace"), estimator=np.str_("pathwise"))
    _fit(_vae(), checkpoint_dir=tmp_path, **as_numpy)
    signature = checkpoint.load_training_state(tmp_path)["signature"]
    assert all(type(v) in (int, float, str, bool) for v in signature.values()), signature
    resumed = _vae()
    _fit(resumed, checkpoint_dir=tmp_path, resume_from=tmp_path, **{**as_numpy, "epochs": np.int64(3)})
    plain = _vae()
    _fit(plain, epochs=3, checkpoint_every=4, clip_norm=5.0, elbo="trace")
    for key, value in plain.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_resume_extends_a_finished_run(tmp_path):
    """Resuming a finished 2-epoch run with epochs=3 equals a 3-epoch run."""
    a = _vae()
    _fit(a)
    b = _vae()
    _fit(b, epochs=2, checkpoint_dir=tmp_path)
    c = _vae()
    hist = _fit(c, checkpoint_dir=tmp_path, resume_from=tmp_path)
    assert len(hist) == 3
    for key, value in a.state_dict().items():
        assert torch.equal(c.state_dict()[key], value), key


@pytest.mark.slow
def test_cli_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    """The command line: SIGKILL a `pyro-vae train` once its first step checkpoint exists (mid-epoch 1),
    `--resume`, and compare model.pt with an uninterrupted run bit for bit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "pyro_vae", "train", "--epochs", "2", "--hidden", "16", "--z-dim", "2", "--batch-size", "16",
            "--checkpoint-every", "5", "--device", "cpu", "--no-progress", "--binarize", "dynamic",
            "--likelihood", "bernoulli"]
    full = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "full")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *args, "--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    state = checkpoint.load_training_state(run)
    assert state["epoch"] == 1 and not state["epoch_complete"]
    resumed = subprocess.run([sys.executable, *args, "--out", str(run), "--resume"], capture_output=True,
                             text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_resume_on_cuda_matches_an_uninterrupted_run(tmp_path):
    """On a GPU the resumed run restores the CUDA generator too; kernels may differ in the last bits, so the
    comparison has a tolerance."""

    class Stop:
        def on_step(self, state):
            if state.step == 10:
                raise RuntimeError("stop")

    vae = _vae()
    with pytest.raises(RuntimeError, match="stop"):
        _fit(vae, device="cuda", checkpoint_dir=tmp_path, checkpoint_every=4, callbacks=[Stop()])
    resumed = _vae()
    _fit(resumed, device="cuda", checkpoint_dir=tmp_path, resume_from=tmp_path)
    reference = _vae()
    _fit(reference, device="cuda")
    assert checkpoint.load_training_state(tmp_path)["rng"][0]["cuda"] is not None
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_cli_resume_continues_and_refuses_other_options(tmp_path, capsys):
    from pyro_vae import cli

    run = tmp_path / "run"
    args = ["train", "--hidden", "8", "--z-dim", "2", "--device", "cpu", "--no-progress", "--out", str(run)]
    assert cli.main(args + ["--epochs", "1"]) == 0
    assert cli.main(args + ["--epochs", "2", "--resume"]) == 0
    state = checkpoint.load_training_state(run)
    assert (state["epoch"], state["epoch_complete"], len(state["history"])) == (2, True, 2)
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2
    capsys.readouterr()
    assert cli.main(args + ["--epochs", "3", "--resume", "--seed", "1"]) == 2
    assert "--seed 0 (as in the run's config.json)" in capsys.readouterr().err
