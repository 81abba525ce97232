"""The TensorBoard callback: the event files hold each epoch's record of the history, read back with
TensorBoard's own ``EventAccumulator``; a resumed run shows one unbroken curve; a missing ``tensorboard`` package
is a ConfigError naming the extra."""

import sys

import numpy as np
import pyro
import pytest
import torch

import pyro_vae
from pyro_vae import ConfigError
from pyro_vae.cli import main
from pyro_vae.schedules import KLWarmup
from pyro_vae.train import TensorBoard
from pyro_vae.train.tensorboard import TAGS


def _scalars(log_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(history, key):
    return [(e["epoch"], float(np.float32(e[key]))) for e in history.epochs if e[key] is not None]


def _data(n=200):
    torch.manual_seed(0)
    return torch.rand(n, 6)


def _vae():
    return pyro_vae.VAE((6,), 2, hidden=(8,), likelihood="continuous-bernoulli")


def test_each_epoch_record_is_written_at_its_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    x = _data()
    with TensorBoard(tmp_path / "tb") as tb:
        history = pyro_vae.fit(_vae(), x[:150], epochs=3, batch_size=50, val_data=x[150:], progress=False,
                               callbacks=[tb, KLWarmup(6)], seed=0)
    scalars = _scalars(tmp_path / "tb")
    assert set(scalars) == set(TAGS.values())
    for key, tag in TAGS.items():
        assert scalars[tag] == _expected(history, key), tag
    assert [v for _, v in scalars["beta"]] != [1.0] * 3  # the warm-up's KL weights, not a constant


def test_without_validation_data_no_validation_scalar_is_written(tmp_path):
    pytest.importorskip("tensorboard")
    tb = TensorBoard(tmp_path / "tb")
    history = pyro_vae.fit(_vae(), _data(), epochs=2, batch_size=100, progress=False, callbacks=[tb], seed=0)
    tb.close()
    scalars = _scalars(tmp_path / "tb")
    assert "elbo/val" not in scalars
    assert scalars["elbo/train"] == _expected(history, "train_elbo")


def test_nothing_is_written_before_the_first_epoch_ends(tmp_path):
    pytest.importorskip("tensorboard")
    tb = TensorBoard(tmp_path / "tb")
    with pytest.raises(RuntimeError, match="stop"):
        pyro_vae.fit(_vae(), _data(), epochs=1, batch_size=100, progress=False, callbacks=[tb, _Raise()], seed=0)
    tb.close()
    assert not (tmp_path / "tb").exists()


class _Raise:
    def on_step(self, state):
        raise RuntimeError("stop")


def test_a_resumed_run_shows_one_unbroken_curve(tmp_path):
    pytest.importorskip("tensorboard")
    x, run, log_dir = _data(), tmp_path / "run", tmp_path / "tb"
    with TensorBoard(log_dir) as tb:
        pyro_vae.fit(_vae(), x, epochs=2, batch_size=100, progress=False, callbacks=[tb], seed=0, checkpoint_dir=run)
    pyro.clear_param_store()  # a new process would start from an empty store
    with TensorBoard(log_dir) as tb:
        history = pyro_vae.fit(_vae(), x, epochs=4, batch_size=100, progress=False, callbacks=[tb], seed=0,
                               checkpoint_dir=run, resume_from=run)
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3, 4]
    assert _scalars(log_dir)["elbo/train"] == _expected(history, "train_elbo")


def test_a_later_fit_into_the_same_folder_replaces_what_an_earlier_one_showed(tmp_path):
    pytest.importorskip("tensorboard")
    tb = TensorBoard(tmp_path / "tb")
    pyro_vae.fit(_vae(), _data(), epochs=3, batch_size=100, progress=False, callbacks=[tb], seed=0)
    pyro.clear_param_store()
    history = pyro_vae.fit(_vae(), _data(), epochs=2, batch_size=50, progress=False, callbacks=[tb], seed=1)
    tb.close()
    assert _scalars(tmp_path / "tb")["elbo/train"] == _expected(history, "train_elbo")


def test_the_command_line_writes_into_the_run_folder_or_the_given_folder(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    base = ["train", "--data", "digits", "--z-dim", "2", "--hidden", "8", "--epochs", "2", "--no-progress",
            "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), "--tensorboard"]) == 0
    assert [s for s, _ in _scalars(tmp_path / "a" / "tensorboard")["elbo/val"]] == [1, 2]
    assert main([*base, "--out", str(tmp_path / "b"), "--tensorboard", str(tmp_path / "logs")]) == 0
    assert set(_scalars(tmp_path / "logs")) == set(TAGS.values())
    assert not (tmp_path / "b" / "tensorboard").exists()


def test_without_tensorboard_installed_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(ConfigError, match=r"pip install 'pyro-vae\[tensorboard\]'"):
        TensorBoard(tmp_path)


@pytest.mark.parametrize("log_dir", [3, "", None])
def test_a_log_dir_that_is_not_a_path_is_refused(log_dir):
    with pytest.raises(ConfigError, match="log_dir: expected a folder path"):
        TensorBoard(log_dir)


def test_a_log_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="log_dir: expected a folder"):
        TensorBoard(tmp_path / "f")
