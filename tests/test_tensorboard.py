"""The TensorBoard callback: the event files hold each epoch's record of the history, the learning rate, the
temperature, the KL per latent site and a grid of prior samples, and every N steps the gradient norm, loss and
learning rate; read back with TensorBoard's own ``EventAccumulator``, each value is compared with one computed
here independently. The callback leaves the training's random numbers alone; a resumed run shows one unbroken
curve; a missing ``tensorboard`` package is a ConfigError naming the extra."""

import io
import sys

import numpy as np
import pyro
import pytest
import torch

import pyro_vae
from pyro_vae import ConfigError, DataError
from pyro_vae.cli import main
from pyro_vae.infer import kl_report
from pyro_vae.schedules import ExponentialTemperature, KLWarmup
from pyro_vae.train import TensorBoard
from pyro_vae.train.tensorboard import TAGS


def _accumulator(log_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={IMAGES: 0})
    acc.Reload()
    return acc


def _scalars(log_dir):
    acc = _accumulator(log_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _images(log_dir, tag="samples"):
    """``[(step, (height, width, channels) uint8 array)]`` of the image ``tag``."""
    from PIL import Image

    acc = _accumulator(log_dir)
    if tag not in acc.Tags()["images"]:
        return []
    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in acc.Images(tag)]


def _expected(history, key):
    return [(e["epoch"], float(np.float32(e[key]))) for e in history.epochs if e[key] is not None]


def _f32(value):
    return float(np.float32(value))


def _data(n=200, d=6):
    torch.manual_seed(0)
    return torch.rand(n, d)


def _vae(d=6, **kwargs):
    return pyro_vae.VAE((d,), 2, hidden=(8,), likelihood="continuous-bernoulli", **kwargs)


def test_each_epoch_record_is_written_at_its_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    x = _data()
    with TensorBoard(tmp_path / "tb") as tb:
        history = pyro_vae.fit(_vae(), x[:150], epochs=3, batch_size=50, val_data=x[150:], progress=False,
                               callbacks=[tb, KLWarmup(6)], seed=0)
    scalars = _scalars(tmp_path / "tb")
    assert set(scalars) == {*TAGS.values(), "lr"}  # no data: no KL; (6,) is no image; 9 steps < every_n_steps
    assert _images(tmp_path / "tb") == []
    for key, tag in TAGS.items():
        assert scalars[tag] == _expected(history, key), tag
    assert [v for _, v in scalars["beta"]] != [1.0] * 3  # the warm-up's KL weights, not a constant


class _Record:
    """After every step (and before the callbacks after it): the global gradient norm as torch computes it,
    the loss and the learning rate; at every epoch's end, the learning rate."""

    def __init__(self):
        self.steps, self.epochs = {}, {}

    def on_step(self, state):
        grads = [p.grad for g in state.optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.steps[state.step] = (float(torch.nn.utils.get_total_norm(grads)), float(state.loss),
                                  state.optimizer.param_groups[0]["lr"])

    def on_epoch_end(self, state):
        self.epochs[state.epoch] = state.optimizer.param_groups[0]["lr"]


class _DecayLR:
    """Sets the learning rate for step ``s + 1`` to ``1e-2 * 0.9 ** s`` after step ``s``."""

    def on_step(self, state):
        for g in state.optimizer.param_groups:
            g["lr"] = 1e-2 * 0.9 ** state.step


def test_gradient_norm_loss_and_learning_rate_every_n_steps(tmp_path):
    pytest.importorskip("tensorboard")
    record = _Record()
    with TensorBoard(tmp_path / "tb", every_n_steps=2) as tb:  # 3 epochs of 3 steps: steps 2, 4, 6, 8
        pyro_vae.fit(_vae(), _data(150), epochs=3, batch_size=50, lr=1e-2, progress=False, seed=0,
                     callbacks=[record, tb, _DecayLR()])
    scalars = _scalars(tmp_path / "tb")
    logged = [2, 4, 6, 8]
    for i, tag in enumerate(["step/grad_norm", "step/loss", "step/lr"]):
        assert [s for s, _ in scalars[tag]] == logged, tag
        assert [v for _, v in scalars[tag]] == pytest.approx([_f32(record.steps[s][i]) for s in logged],
                                                             rel=1e-6), tag
    assert [v for _, v in scalars["step/lr"]] == pytest.approx([1e-2 * 0.9 ** (s - 1) for s in logged], rel=1e-6)
    assert all(v > 0 for _, v in scalars["step/grad_norm"])
    # at an epoch's end: the rate the decay set after the epoch's last step, 3 * epoch
    assert scalars["lr"] == [(e, _f32(record.epochs[e])) for e in (1, 2, 3)]
    assert [v for _, v in scalars["lr"]] == pytest.approx([1e-2 * 0.9 ** (3 * e) for e in (1, 2, 3)], rel=1e-6)


def test_the_gradient_norm_is_the_one_after_clipping(tmp_path):
    pytest.importorskip("tensorboard")
    record = _Record()
    with TensorBoard(tmp_path / "tb", every_n_steps=1) as tb:
        pyro_vae.fit(_vae(), _data(150), epochs=1, batch_size=50, progress=False, seed=0, clip_norm=1e-3,
                     callbacks=[tb, record])
    norms = _scalars(tmp_path / "tb")["step/grad_norm"]
    assert [v for _, v in norms] == pytest.approx([_f32(record.steps[s][0]) for s, _ in norms], rel=1e-6)
    assert all(v <= 1e-3 * (1 + 1e-5) for _, v in norms)


def test_kl_per_site_is_kl_report_on_the_first_points(tmp_path):
    pytest.importorskip("tensorboard")
    x, vae = _data(150), _vae()
    with TensorBoard(tmp_path / "tb", data=x, num_kl_points=100) as tb:
        history = pyro_vae.fit(vae, x, epochs=3, batch_size=50, progress=False, seed=0,
                               callbacks=[tb, KLWarmup(6)])
    kl = _scalars(tmp_path / "tb")["kl/z"]
    assert [s for s, _ in kl] == [1, 2, 3] and len({v for _, v in kl}) == 3
    vae.eval()
    report = kl_report(vae, x[:100])  # at the final parameters: those of the last epoch's end
    assert report.analytic == ["z"]
    assert kl[-1][1] == pytest.approx(_f32(report["z"].kl), rel=1e-6)
    assert kl[-1][1] != pytest.approx(_f32(kl_report(vae, x)["z"].kl), rel=1e-6)  # not all 150 points
    assert history["beta"][-1] == 1.0  # the KL has weight 1 whatever beta is; beta rose over the run
    assert history["beta"][0] < 1.0


def test_temperature_and_monte_carlo_kl_of_a_categorical_latent(tmp_path):
    pytest.importorskip("tensorboard")
    x = _data(150, 16)
    vae = pyro_vae.VAE((16,), 2, hidden=(8,), likelihood="continuous-bernoulli", latent="categorical",
                       categories=3)
    schedule = ExponentialTemperature(1.0, rate=0.1, minimum=0.2)
    with TensorBoard(tmp_path / "tb", data=x, seed=7) as tb:
        history = pyro_vae.fit(vae, x, epochs=3, batch_size=50, progress=False, seed=0, callbacks=[schedule, tb])
    scalars = _scalars(tmp_path / "tb")
    # the temperature the schedule set after each epoch's last step
    assert scalars["temperature"] == [(e["epoch"], _f32(schedule.value(e["step"]))) for e in history.epochs]
    assert scalars["temperature"][0][1] < 1.0
    vae.eval()
    with torch.random.fork_rng():
        torch.manual_seed(7)
        report = kl_report(vae, x)
    assert report.monte_carlo == ["z"]
    assert scalars["kl/z"][-1] == (3, pytest.approx(_f32(report["z"].kl), rel=1e-6))


@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
def test_a_seeded_fit_gives_the_same_parameters_with_and_without_the_callback(tmp_path, latent):
    pytest.importorskip("tensorboard")
    x = _data(150, 16)
    kwargs = {"latent": latent, "categories": 3} if latent == "categorical" else {}
    results = []
    for callbacks in ([], [TensorBoard(tmp_path / "tb", data=x, every_n_steps=1, seed=5)]):
        pyro.clear_param_store()
        torch.manual_seed(1)
        vae = _vae(16, **kwargs)
        schedule = [ExponentialTemperature(1.0, rate=0.1, minimum=0.2)] if latent == "categorical" else []
        history = pyro_vae.fit(vae, x, epochs=2, batch_size=50, progress=False, seed=0,
                               callbacks=[*schedule, *callbacks], val_data=x[:20])
        for cb in callbacks:
            cb.close()
        results.append((history.epochs, vae.state_dict(), torch.rand(3)))
    assert len(_images(tmp_path / "tb")) == 2  # the callback did draw its samples and KL
    (h0, p0, r0), (h1, p1, r1) = results
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in h0] == \
        [{k: v for k, v in e.items() if k != "seconds"} for e in h1]
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    assert torch.equal(r0, r1)  # the random stream after fit, too


def test_a_grid_of_prior_samples_per_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from torchvision.utils import make_grid

    x, vae = _data(150, 16), _vae(16)  # (16,): a flat 4x4 image
    with TensorBoard(tmp_path / "tb", n_images=10, seed=3) as tb:
        pyro_vae.fit(vae, x, epochs=3, batch_size=50, progress=False, seed=0, callbacks=[tb])
    images = _images(tmp_path / "tb")
    assert [s for s, _ in images] == [1, 2, 3]
    vae.eval()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        z = vae.prior().sample((10,))  # the draws of the last epoch's grid, decoded by the final parameters
    means = vae.decode(z).reshape(10, 1, 4, 4)
    grid = make_grid(means.clamp(0, 1), nrow=4, padding=1, pad_value=1.0)  # 4 to a row: 3 rows of 4x4
    assert grid.shape == (3, 3 * 5 + 1, 4 * 5 + 1)
    for _, image in images:
        assert image.shape[:2] == grid.shape[1:]
    expected = (grid.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.abs(images[-1][1][..., :3].astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(images[0][1], images[-1][1])  # the decoder changed


@pytest.mark.parametrize(("shape", "expected"), [((6,), False), ((16,), True), ((8, 8), True), ((1, 5, 7), True),
                                                  ((3, 4, 4), True), ((2, 4, 4), False), ((1,), False)])
def test_images_by_default_only_for_image_shaped_data(tmp_path, shape, expected):
    pytest.importorskip("tensorboard")
    vae = pyro_vae.VAE(shape, 2, hidden=(8,), likelihood="continuous-bernoulli")
    with TensorBoard(tmp_path / "tb", n_images=4) as tb:
        pyro_vae.fit(vae, torch.rand(20, *shape), epochs=1, batch_size=20, progress=False, callbacks=[tb])
    assert len(_images(tmp_path / "tb")) == int(expected)


def test_images_can_be_turned_off_and_are_refused_for_data_that_are_no_images(tmp_path):
    pytest.importorskip("tensorboard")
    with TensorBoard(tmp_path / "a", images=False) as tb:
        pyro_vae.fit(_vae(16), _data(20, 16), epochs=1, batch_size=20, progress=False, callbacks=[tb])
    assert _images(tmp_path / "a") == []
    pyro.clear_param_store()
    with pytest.raises(ConfigError, match=r"images: expected a VAE whose data are images.*data_shape \(6,\)"):
        pyro_vae.fit(_vae(), _data(20), epochs=1, batch_size=20, progress=False,
                     callbacks=[TensorBoard(tmp_path / "b", images=True)])


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
    tb = TensorBoard(tmp_path / "tb", data=_data(), every_n_steps=1)
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
    scalars = _scalars(log_dir)
    assert scalars["elbo/train"] == _expected(history, "train_elbo")
    assert [s for s, _ in scalars["lr"]] == [3, 4]  # not part of the checkpoint: from the resume point on


def test_a_later_fit_into_the_same_folder_replaces_what_an_earlier_one_showed(tmp_path):
    pytest.importorskip("tensorboard")
    tb = TensorBoard(tmp_path / "tb")
    pyro_vae.fit(_vae(), _data(), epochs=3, batch_size=100, progress=False, callbacks=[tb], seed=0)
    pyro.clear_param_store()
    history = pyro_vae.fit(_vae(), _data(), epochs=2, batch_size=50, progress=False, callbacks=[tb], seed=1)
    tb.close()
    assert _scalars(tmp_path / "tb")["elbo/train"] == _expected(history, "train_elbo")


@pytest.mark.gpu
def test_with_a_cuda_graph_the_step_scalars_are_those_of_the_replayed_steps(tmp_path):
    pytest.importorskip("tensorboard")
    x, record = _data(200, 16), _Record()
    with TensorBoard(tmp_path / "tb", data=x, every_n_steps=1) as tb:
        pyro_vae.fit(_vae(16), x, epochs=3, batch_size=50, device="cuda", cuda_graph=True, progress=False, seed=0,
                     callbacks=[tb, record])
    scalars = _scalars(tmp_path / "tb")
    norms = scalars["step/grad_norm"]
    assert [s for s, _ in norms] == list(range(1, 13))
    assert [v for _, v in norms] == pytest.approx([_f32(record.steps[s][0]) for s in range(1, 13)], rel=1e-5)
    assert [v for _, v in scalars["step/loss"]] == [_f32(record.steps[s][1]) for s in range(1, 13)]
    assert len(scalars["kl/z"]) == 3 and len(_images(tmp_path / "tb")) == 3


def test_the_command_line_writes_into_the_run_folder_or_the_given_folder(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    base = ["train", "--data", "digits", "--z-dim", "2", "--hidden", "8", "--epochs", "2", "--no-progress",
            "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), "--tensorboard"]) == 0
    assert [s for s, _ in _scalars(tmp_path / "a" / "tensorboard")["elbo/val"]] == [1, 2]
    assert main([*base, "--out", str(tmp_path / "b"), "--tensorboard", str(tmp_path / "logs")]) == 0
    scalars = _scalars(tmp_path / "logs")
    assert set(scalars) == {*TAGS.values(), "lr", "kl/z"}  # digits: 12 steps per epoch, fewer than every_n_steps
    assert [s for s, _ in scalars["kl/z"]] == [1, 2] and all(v > 0 for _, v in scalars["kl/z"])
    images = _images(tmp_path / "logs")
    assert [s for s, _ in images] == [1, 2]
    assert images[0][1].shape[:2] == (8 * (8 + 1) + 1,) * 2  # 64 samples of 8x8, 8 to a row, 1-pixel frames
    assert not (tmp_path / "b" / "tensorboard").exists()


def test_the_command_line_kl_of_dynamically_binarized_data_and_a_categorical_latent(tmp_path):
    pytest.importorskip("tensorboard")
    assert main(["train", "--data", "digits", "--z-dim", "2", "--hidden", "8", "--epochs", "1", "--no-progress",
                 "--device", "cpu", "--binarize", "dynamic", "--likelihood", "bernoulli", "--latent", "categorical",
                 "--categories", "3", "--out", str(tmp_path / "run"), "--tensorboard"]) == 0
    scalars = _scalars(tmp_path / "run" / "tensorboard")
    assert {"kl/z", "temperature", "lr"} <= set(scalars)  # binary draws of the grey levels: in the support
    assert len(_images(tmp_path / "run" / "tensorboard")) == 1


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


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_kl_points": 0}, "num_kl_points: expected an integer >= 1"),
    ({"n_images": 0}, "n_images: expected an integer >= 1"),
    ({"every_n_steps": 1.5}, "every_n_steps: expected an integer >= 1"),
    ({"images": "yes"}, "images: expected True or False"),
    ({"seed": -1}, "seed: expected an integer"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TensorBoard(tmp_path, **kwargs)


def test_data_that_do_not_fit_the_vae_are_refused_when_fit_starts(tmp_path):
    with pytest.raises(DataError, match="TensorBoard data"):
        TensorBoard(tmp_path, data=[[0.5] * 6])
    pytest.importorskip("tensorboard")
    with pytest.raises(DataError, match="TensorBoard data"):
        pyro_vae.fit(_vae(), _data(20), epochs=1, batch_size=20, progress=False,
                     callbacks=[TensorBoard(tmp_path / "tb", data=_data(20, 5))])
    pyro.clear_param_store()
    with pytest.raises(DataError, match=r"TensorBoard data .*expected values in \[0, 1\]"):
        pyro_vae.fit(_vae(), _data(20), epochs=1, batch_size=20, progress=False,
                     callbacks=[TensorBoard(tmp_path / "tb", data=_data(20) + 1)])
