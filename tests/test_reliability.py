"""Faults during training: Ctrl-C and SIGTERM stop with a checkpoint and say how to resume; a non-finite loss,
gradient or epoch ELBO stops with its epoch and step and leaves the last good checkpoint untouched; a huge but
finite gradient is neither reported as infinite nor zeroed by clipping; an unwritable or full output folder
fails before training; same seed, same results."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_vae
from pyro_vae import checkpoint, cli
from pyro_vae.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from pyro_vae.train import clip_grad_norm_

N, D = 96, 10  # 6 steps per epoch at batch size 16


def _data() -> torch.Tensor:
    return (torch.rand(N, D, generator=torch.Generator().manual_seed(5)) > 0.5).float()


def _vae(**kw) -> pyro_vae.VAE:
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    return pyro_vae.VAE((D,), 2, hidden=(16,), **kw)


def _fit(vae: pyro_vae.VAE, **kw) -> pyro_vae.History:
    base = dict(epochs=3, batch_size=16, lr=1e-2, device="cpu", progress=False, seed=0, val_data=_data()[:20])
    return pyro_vae.fit(vae, _data(), **{**base, **kw})


class At:
    """Calls ``action(state)`` after optimizer step ``step``."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action, self.steps = step, action, 0

    def on_step(self, state) -> None:
        self.steps += 1
        if state.step == self.step:
            self.action(state)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_with_a_checkpoint_that_resumes_bit_for_bit(tmp_path, sig):
    with pytest.raises(TrainingInterrupted, match=r"at epoch 2, step 8; checkpoint written to .*resume_from") as e:
        _fit(_vae(), checkpoint_dir=tmp_path, callbacks=[At(8, lambda s: signal.raise_signal(sig))])
    assert isinstance(e.value, KeyboardInterrupt) and e.value.step == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    state = checkpoint.load_training_state(tmp_path)
    assert (state["step"], state["epoch"], state["batch"]) == (8, 2, 2)
    resumed = _vae()
    _fit(resumed, checkpoint_dir=tmp_path, resume_from=tmp_path)
    reference = _vae()
    _fit(reference)
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_signal_without_checkpoint_dir_says_nothing_was_saved():
    with pytest.raises(TrainingInterrupted, match="nothing was saved"):
        _fit(_vae(), callbacks=[At(3, lambda s: signal.raise_signal(signal.SIGINT))])


def test_cli_ctrl_c_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, capsys):
    run = tmp_path / "run"

    def interrupt() -> None:
        deadline = time.time() + 60
        while not (run / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt, daemon=True)
    watcher.start()
    code = cli.main(["train", "--epochs", "200", "--hidden", "8", "--z-dim", "2", "--checkpoint-every", "3",
                     "--device", "cpu", "--no-progress", "--out", str(run)])
    watcher.join(5)
    err = capsys.readouterr().err
    assert code == 130
    assert f"checkpoint written to {run / 'checkpoint.pt'}" in err
    assert "resume with: pyro-vae train --epochs 200" in err and err.rstrip().endswith("--resume")
    assert checkpoint.load_training_state(run)["step"] >= 3


def _poison(state) -> None:
    with torch.no_grad():
        next(state.vae.decoder.parameters()).fill_(float("nan"))


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss and gradient at epoch 2, step 8: .*Fix: lower the "
                                                 r"learning rate.*last good checkpoint"):
        _fit(_vae(), checkpoint_dir=tmp_path, checkpoint_every=4, callbacks=[At(7, _poison)])
    state = checkpoint.load_training_state(tmp_path)
    assert (state["step"], state["epoch_complete"]) == (6, True)  # the epoch-1 checkpoint, not step 8's
    assert all(torch.isfinite(v).all() for v in state["vae"].values())


class _SqrtAtZero:
    """Normal likelihood whose value is unchanged but whose gradient is NaN once ``on`` (d sqrt(u)/du at 0)."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self, out: torch.Tensor) -> dist.Distribution:
        if self.on:
            out = out + torch.sqrt(out * 0.0)
        return dist.Normal(out, 1.0)


def test_non_finite_gradient_alone_is_caught():
    lik = _SqrtAtZero()
    with pytest.raises(NonFiniteLossError, match=r"^gradient at epoch 1, step 5:"):
        _fit(_vae(likelihood=lik), callbacks=[At(4, lambda s: setattr(lik, "on", True))])


def _grad_norm(vae) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in vae.parameters() if p.grad is not None]))


@pytest.mark.parametrize("clip", [None, 0.05])
def test_gradient_clipping_bounds_the_global_norm(clip):
    norms: list[float] = []
    _fit(_vae(), epochs=1, clip_norm=clip, callbacks=[At(0, None), type("C", (), {
        "on_step": lambda self, s: norms.append(_grad_norm(s.vae))})()])
    if clip is None:
        assert max(norms) > 1.0  # unclipped gradients are large here, so the bound below is a real test
    else:
        assert max(norms) <= clip * (1 + 1e-5)


class _Scale:
    """A Normal likelihood of a given scale: a tiny one makes log-densities and gradients huge while every
    parameter stays finite."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, out: torch.Tensor) -> dist.Distribution:
        return dist.Normal(out, self.scale)


def _huge_gradients() -> _Scale:
    return _Scale(1e-12)  # gradients of order 1e24-1e26: every entry finite, their squares overflow float32


class _Gradients:
    def __init__(self) -> None:
        self.largest, self.norms, self.finite = [], [], []

    def on_step(self, state) -> None:
        grads = [p.grad for p in state.vae.parameters() if p.grad is not None]
        self.finite.append(all(bool(torch.isfinite(g).all()) for g in grads))
        self.largest.append(max(float(g.abs().max()) for g in grads))
        self.norms.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)))


def test_huge_but_finite_gradients_are_not_reported_as_non_finite():
    seen = _Gradients()
    _fit(_vae(likelihood=_huge_gradients()), epochs=1, callbacks=[seen])
    assert all(seen.finite) and max(seen.largest) > 1.9e19  # past the float32 overflow of the 2-norm


def test_clipping_huge_but_finite_gradients_scales_them_to_the_bound():
    seen = _Gradients()
    _fit(_vae(likelihood=_huge_gradients()), epochs=1, clip_norm=1.0, callbacks=[seen])
    assert all(1.0 - 1e-4 < n <= 1.0 + 1e-5 for n in seen.norms), seen.norms  # clipped, not zeroed


def test_clip_grad_norm_without_overflow():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3e25, 4e25, 0.0])
    assert float(clip_grad_norm_([p], 2.0)) == pytest.approx(5e25, rel=1e-6)
    torch.testing.assert_close(p.grad, torch.tensor([1.2, 1.6, 0.0]))
    p.grad = torch.tensor([0.3, 0.4, 0.0])
    clip_grad_norm_([p], 2.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.3, 0.4, 0.0]))  # within the bound: untouched


def test_non_finite_validation_elbo_stops_with_its_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    lik = _Scale()  # shrunk to 1e-30 at the last step of epoch 2, before its validation: -inf log-densities
    shrink = At(12, lambda s: setattr(lik, "scale", 1e-30))
    with pytest.raises(NonFiniteLossError, match=r"^validation ELBO at epoch 2: expected a finite value, found "
                                                 r"-inf\. Fix: check val_data.*last good checkpoint in .* is "
                                                 r"untouched"):
        _fit(_vae(likelihood=lik), checkpoint_dir=tmp_path, callbacks=[shrink])
    state = checkpoint.load_training_state(tmp_path)
    assert (state["epoch"], state["epoch_complete"]) == (1, True)
    assert checkpoint.RunFolder(tmp_path).read_json("best.json")["epoch"] == 1


def test_a_huge_validation_value_is_an_error_not_a_silent_nan():
    xv = _data()[:20].clone()
    xv[3, 2] = 1e30  # finite, so the data check passes; the learned-variance Normal cannot score it
    with pytest.raises(NonFiniteLossError, match=r"^validation ELBO at epoch 1: expected a finite value"):
        _fit(_vae(likelihood="normal-learned"), val_data=xv)


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    counter = At(-1, None)
    with pytest.raises(ConfigError,
                       match=r"checkpoint_dir: expected a writable folder \(one this process can create and write\)"):
        _fit(_vae(), checkpoint_dir=blocker / "run", callbacks=[counter])
    assert counter.steps == 0


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoint_folder_fails_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="can create and write"):
            _fit(_vae(), checkpoint_dir=ro)
    finally:
        ro.chmod(0o700)


def test_full_disk_fails_before_training(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    counter = At(-1, None)
    with pytest.raises(ConfigError, match=r"MiB free for checkpoints, found 0.0 MiB free"):
        _fit(_vae(), checkpoint_dir=tmp_path, callbacks=[counter])
    assert counter.steps == 0


def test_cli_unwritable_out_is_one_line_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = cli.main(["train", "--epochs", "1", "--out", str(blocker / "run"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("pyro-vae train: error: --out: expected a writable")


def test_same_seed_same_results_other_seed_other_results(tmp_path):
    runs = []
    for seed, folder in ((3, "a"), (3, "b"), (4, "c")):
        vae = _vae()
        hist = _fit(vae, seed=seed, checkpoint_dir=tmp_path / folder, dynamic_binarize=True)
        runs.append(([{k: v for k, v in e.items() if k != "seconds"} for e in hist.epochs],
                     {k: v.clone() for k, v in vae.state_dict().items()}))
    (ha, pa), (hb, pb), (hc, pc) = runs
    assert ha == hb and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert ha != hc and any(not torch.equal(pa[k], pc[k]) for k in pa)
    best = [json.loads((tmp_path / run / "best.json").read_text()) for run in ("a", "b")]
    assert best[0] == best[1]


@pytest.mark.slow
def test_cli_runs_with_the_same_seed_write_identical_metrics(tmp_path):
    args = [sys.executable, "-m", "pyro_vae", "train", "--epochs", "2", "--hidden", "16", "--z-dim", "2",
            "--device", "cpu", "--no-progress", "--binarize", "dynamic", "--likelihood", "bernoulli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = []
    for name in ("a", "b"):
        done = subprocess.run(args + ["--out", str(tmp_path / name)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        metrics.append({k: v for k, v in m.items() if k != "seconds"})
    assert metrics[0] == metrics[1]
