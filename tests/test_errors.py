"""The bad-input table of the README, one test per row: the library raises the documented type with a message
naming the argument or site, what was expected, what was found and the fix; the command line prints that one
line and exits with status 2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_vae
from pyro_vae import checkpoint, cli
from pyro_vae.errors import CheckpointError, ConfigError, DataError, ModelError, PyroVAEError, ShapeError

D = 10


def _fit(x: torch.Tensor, **kw) -> None:
    vae = kw.pop("vae", None) or pyro_vae.VAE((D,), 2, hidden=(8,), likelihood=kw.pop("likelihood", "bernoulli"))
    pyro_vae.fit(vae, x, epochs=1, progress=False, device="cpu", **kw)


def _binary(n: int = 8) -> torch.Tensor:
    return (torch.rand(n, D) > 0.5).float()


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    pyro_vae.save(pyro_vae.VAE((D,), 2, hidden=(8,)), run)
    return run


def _object_npy(tmp_path: Path) -> Path:
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return path


def _dict_pt(tmp_path: Path) -> Path:
    path = tmp_path / "dict.pt"
    torch.save({"x": torch.zeros(4, 3)}, path)
    return path


def _write_other_config_weights(tmp_path: Path) -> Path:
    run = _run(tmp_path)
    checkpoint.save_tensors(run / "model.pt", pyro_vae.VAE((D,), 3, hidden=(8,)).state_dict())
    return run


def _other_config_weights(tmp_path: Path) -> None:
    pyro_vae.load(_write_other_config_weights(tmp_path))


def _other_release(tmp_path: Path) -> None:
    x = _binary(32)
    pyro.set_rng_seed(0)
    _fit(x, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["version"] = "0.0.1"
    checkpoint.save_tensors(tmp_path / "checkpoint.pt", state)
    pyro.clear_param_store()
    _fit(x, resume_from=tmp_path)


class _WrongEncoder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*x.shape[:-1], 3)


class _NaNNet(nn.Module):
    """A network whose every output is NaN: ``features`` per input row (``z_dim`` inputs for a decoder)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((*x.shape[:-1], self.features), float("nan"))


def _grey255_npy(tmp_path: Path) -> Path:
    """60 points of 16 grey levels in 0..255 stored as floats (not scaled to [0, 1])."""
    path = tmp_path / "img255.npy"
    np.save(path, (np.random.default_rng(0).random((60, 16)) * 255).astype(np.float32))
    return path


def _nan_in_test_npy(tmp_path: Path) -> Path:
    """60 grey points whose single NaN lands in the test split (seed 0: 6 validation, then 6 test points)."""
    x = np.random.default_rng(0).random((60, 16)).astype(np.float32)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    x[int(perm[6]), 3] = np.nan
    path = tmp_path / "nan_in_test.npy"
    np.save(path, x)
    return path


# (row of the README table, library call, error type, message pattern)
ROWS: list[tuple[str, Callable[[Path], object], type, str]] = [
    ("grey values under bernoulli", lambda t: _fit(torch.full((4, D), 0.5)), DataError,
     r'train_data under the "bernoulli" likelihood: expected binary values in \{0, 1\}, found 40 non-binary '
     r"values .*Fix: binarize the data"),
    ("negative values under continuous-bernoulli",
     lambda t: _fit(torch.full((4, D), -0.5), likelihood="continuous-bernoulli"), DataError,
     r'"continuous-bernoulli" likelihood: expected values in \[0, 1\], found values in \[-0.5, -0.5\]'),
    ("wrong data shape", lambda t: _fit(torch.zeros(4, D + 1)), DataError,
     r"train_data: expected shape \(batch, \*data_shape\) = \(batch, 10\), found shape \(4, 11\)"),
    ("non-finite data", lambda t: _fit(torch.tensor([[float("nan")] * D])), DataError,
     r"expected finite values, found 10 NaN or infinite values"),
    ("empty data", lambda t: _fit(torch.zeros(0, D)), DataError, r"expected at least one data point"),
    ("z_dim < 1", lambda t: pyro_vae.VAE((D,), 0), ConfigError, r"z_dim: expected an integer >= 1, found 0"),
    ("categories < 2", lambda t: pyro_vae.VAE((D,), 2, latent="categorical", categories=1), ConfigError,
     r"categories: expected an integer >= 2, found 1"),
    ("temperature <= 0", lambda t: pyro_vae.VAE((D,), 2, latent="categorical", categories=3, temperature=0.0),
     ConfigError, r"temperature: expected a finite number > 0, found 0.0"),
    ("batch size < 1", lambda t: _fit(_binary(), batch_size=0), ConfigError,
     r"batch_size: expected an integer >= 1, found 0"),
    ("learning rate <= 0", lambda t: _fit(_binary(), lr=-1e-3), ConfigError,
     r"lr: expected a finite number > 0, found -0.001"),
    ("prior of the wrong event shape",
     lambda t: pyro_vae.VAE((D,), 2, prior=lambda: dist.Normal(torch.zeros(3), 1.0).to_event(1)), ShapeError,
     r'prior at site "z": expected event shape \(2,\) \(the guide\'s\), found event shape \(3,\)'),
    ("likelihood of the wrong event shape",
     lambda t: pyro_vae.VAE((D,), 2, likelihood=lambda out: dist.Bernoulli(logits=out[..., :3]).to_event(1)),
     ShapeError, r'likelihood at site "x": expected event shape data_shape = \(10,\)'),
    ("user encoder of the wrong output shape", lambda t: pyro_vae.VAE((D,), 2, encoder=_WrongEncoder()),
     ShapeError, r"encoder network output: expected last dimension 2 \* z_dim = 4"),
    ("unknown data name", lambda t: pyro_vae.data.load("mnits"), ConfigError,
     r"data: expected one of digits, mnist, fashion-mnist, kmnist or a .npy/.pt file path, found 'mnits'"),
    ("run folder that does not exist", lambda t: pyro_vae.load(t / "nope"), CheckpointError,
     r"run folder: expected an existing folder, found nothing at"),
    ("folder that is not a run", lambda t: pyro_vae.load(t), CheckpointError,
     r"expected a config.json written by `pyro-vae train`, found no config.json"),
    ("checkpoint from another configuration", _other_config_weights, CheckpointError,
     r"expected tensors matching config.json, found a mismatch .*Fix: the weights come from another"),
    ("checkpoint from another package release", _other_release, CheckpointError,
     r"expected format 1 from pyro-vae 0.1.x, found format 1 from pyro-vae 0.0.1"),
    ("data file that is not an array (object .npy)", lambda t: pyro_vae.data.load(str(_object_npy(t))),
     DataError, r"expected a numeric array .*object arrays and pickles are refused"),
    ("data file that is not an array (.pt of a dict)", lambda t: pyro_vae.data.load(str(_dict_pt(t))),
     DataError, r"expected a numeric array of shape \(N, \*data_shape\) with N >= 1, found dict"),
    ("complex data", lambda t: _fit(torch.zeros(4, D, dtype=torch.complex64)), DataError,
     r"train_data: expected real numbers \(a floating-point, integer or bool tensor\), found dtype torch.complex64"
     r"\. Fix: pass the real part or the magnitude"),
    ("float64 data beyond float32's range", lambda t: _fit(torch.full((4, D), 1e300, dtype=torch.float64),
                                                             likelihood="normal"), DataError,
     r"train_data: expected values within the range of torch.float32 .*found 40 values beyond it"),
    ("data with an extra leading dimension", lambda t: _fit(torch.zeros(2, 4, D)), DataError,
     r"train_data: expected a data set of shape \(N, \*data_shape\) = \(N, 10\), one data point per row, found "
     r"shape \(2, 4, 10\) .*Fix: reshape it to \(N, 10\)"),
    ("the same in evaluation", lambda t: pyro_vae.log_likelihood(pyro_vae.VAE((D,), 2, hidden=(8,)),
                                                                 torch.zeros(2, 4, D), 10), DataError,
     r"data: expected a data set of shape \(N, \*data_shape\)"),
    ("grey levels outside [0, 1] with dynamic binarization",
     lambda t: _fit(torch.full((4, D), 2.0), dynamic_binarize=True), DataError,
     r"train_data \(dynamic_binarize=True\): expected grey levels in \[0, 1\] to binarize .*found values in "
     r"\[2, 2\]\. Fix: scale the data to \[0, 1\] first: divide 8-bit grey levels by 255"),
    ("static binarization of data outside [0, 1]",
     lambda t: pyro_vae.data.load(str(_grey255_npy(t)), binarize_mode="static"), DataError,
     r"train split of img255.npy: expected grey levels in \[0, 1\] to binarize .*found values in \[.*, 254.*\]"),
    ("beta <= 0", lambda t: pyro_vae.VAE((D,), 2, beta=0.0), ConfigError,
     r"beta: expected a finite number > 0, found 0.0\. Fix: pass beta > 0"),
    ("beta not a number", lambda t: pyro_vae.VAE((D,), 2, beta="1"), ConfigError,
     r"beta: expected a finite number > 0, found '1'"),
    ("a KL schedule ending at beta <= 0", lambda t: pyro_vae.KLWarmup(100, end=0.0), ConfigError,
     r"end beta: expected a finite number > 0, found 0.0"),
    ("evaluation batch size < 1", lambda t: pyro_vae.evaluate_elbo(pyro_vae.VAE((D,), 2), _binary(), batch_size=0),
     ConfigError, r"batch_size: expected an integer >= 1, found 0"),
    ("a user encoder returning NaN", lambda t: pyro_vae.VAE((D,), 2, encoder=_NaNNet(4)), ModelError,
     r'encoder at site "z": expected a distribution with valid parameters, found invalid parameters \(ValueError: '
     r"Expected parameter loc"),
    ("a user decoder returning NaN", lambda t: pyro_vae.VAE((D,), 2, decoder=_NaNNet(D)), ModelError,
     r'decoder \(input of the likelihood at site "x"\): expected finite outputs, found 20 NaN or infinite values'),
    ("a prior returning a tensor", lambda t: pyro_vae.VAE((D,), 2, prior=lambda: torch.zeros(2)), ModelError,
     r'prior at site "z": expected a distribution \(e.g. dist.Normal\(loc, scale\).to_event\(1\)\), found Tensor'),
    ("a likelihood returning a tensor", lambda t: pyro_vae.VAE((D,), 2, likelihood=lambda out: out), ModelError,
     r'likelihood at site "x": expected a distribution .*found Tensor'),
    ("a z_dim too large for memory", lambda t: pyro_vae.VAE((D,), 10 ** 10), ConfigError,
     r"VAE networks: expected a size that fits in the .* of memory of cpu, found .* needed \(.* weights for "
     r"data_shape=\(10,\), z_dim=10000000000, hidden=\(400,\)\)\. Fix: lower z_dim or hidden"),
    ("too many samples for memory", lambda t: pyro_vae.VAE((D,), 2, hidden=(8,)).sample(10 ** 13), ConfigError,
     r"n: expected a size that fits in the .* of memory of cpu, found .* needed \(10000000000000 samples"),
]


@pytest.mark.parametrize("row,call,kind,pattern", ROWS, ids=[r[0] for r in ROWS])
def test_library_raises_the_documented_error(tmp_path, row, call, kind, pattern):
    with pytest.raises(kind, match=pattern) as e:
        call(tmp_path)
    assert isinstance(e.value, PyroVAEError) and "Fix: " in str(e.value)


TRAIN = ["train", "--epochs", "1", "--hidden", "8", "--z-dim", "2", "--device", "cpu", "--no-progress"]

# (row, command line given tmp_path, one-line message pattern)
CLI_ROWS: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("grey values under bernoulli", lambda t: TRAIN + ["--likelihood", "bernoulli", "--out", str(t / "r")],
     r'train split of digits under the "bernoulli" likelihood: expected binary values'),
    ("z_dim < 1", lambda t: TRAIN + ["--z-dim", "0", "--out", str(t / "r")],
     r"argument --z-dim: expected an integer >= 1, found 0"),
    ("categories < 2", lambda t: TRAIN + ["--latent", "categorical", "--categories", "1", "--out", str(t / "r")],
     r"argument --categories: expected an integer >= 2"),
    ("temperature <= 0", lambda t: TRAIN + ["--latent", "categorical", "--temperature", "-1", "--out",
                                            str(t / "r")], r"argument --temperature: expected a finite number > 0"),
    ("batch size < 1", lambda t: TRAIN + ["--batch-size", "0", "--out", str(t / "r")],
     r"argument --batch-size: expected an integer >= 1"),
    ("learning rate <= 0", lambda t: TRAIN + ["--lr", "0", "--out", str(t / "r")],
     r"argument --lr: expected a finite number > 0"),
    ("unknown data name", lambda t: TRAIN + ["--data", "mnits", "--out", str(t / "r")],
     r"data: expected one of digits, mnist, fashion-mnist, kmnist"),
    ("data file that is not an array", lambda t: TRAIN + ["--data", str(_object_npy(t)), "--out", str(t / "r")],
     r"expected a numeric array"),
    ("run folder that does not exist", lambda t: ["sample", str(t / "nope")], r"expected an existing folder"),
    ("folder that is not a run", lambda t: ["evaluate", str(t)], r"found no config.json"),
    ("resume of a folder that is not a run", lambda t: TRAIN + ["--out", str(t), "--resume"],
     r"--out .*: expected the folder of a run to resume, found an empty folder, not a pyro-vae run"),
    ("checkpoint from another configuration", lambda t: ["sample", str(_write_other_config_weights(t))],
     r"found a mismatch"),
    ("output folder that cannot be written", lambda t: (t.joinpath("f").write_text(""), TRAIN + [
        "--out", str(t / "f" / "r")])[1], r"--out: expected a writable folder"),
    ("a value that is not a number", lambda t: TRAIN + ["--epochs", "ten"],
     r"argument --epochs: expected an integer, found 'ten'"),
    ("beta <= 0", lambda t: TRAIN + ["--beta", "0", "--out", str(t / "r")],
     r"argument --beta: expected a finite number > 0, found 0.0"),
    ("a z_dim too large for memory", lambda t: TRAIN + ["--z-dim", "10000000000", "--out", str(t / "r")],
     r"VAE networks: expected a size that fits in the .* of memory of cpu"),
    ("static binarization of data outside [0, 1]",
     lambda t: TRAIN + ["--data", str(_grey255_npy(t)), "--binarize", "static", "--out", str(t / "r")],
     r"train split of img255.npy: expected grey levels in \[0, 1\] to binarize .*Fix: scale the data to \[0, 1\] "
     r"first: divide 8-bit grey levels by 255 \(.*--scale 255 on the command line\)"),
    ("dynamic binarization of data outside [0, 1]",
     lambda t: TRAIN + ["--data", str(_grey255_npy(t)), "--binarize", "dynamic", "--out", str(t / "r")],
     r"train split of img255.npy: expected grey levels in \[0, 1\] to binarize"),
    ("NaN in the test split", lambda t: TRAIN + ["--data", str(_nan_in_test_npy(t)), "--out", str(t / "r")],
     r"test split of .*nan_in_test.npy: expected finite values, found 1 NaN or infinite values"),
    ("too many samples for memory", lambda t: ["sample", str(_run(t)), "--n", "10000000000000"],
     r"--n: expected a size that fits in the .* of memory of cpu"),
    ("a picture file of an unknown type", lambda t: ["sample", str(_run(t)), "--out", str(t / "s.txt")],
     r"argument --out: expected a picture file ending in .png, .pdf, .svg, .jpg, .jpeg, found '.*s.txt' "
     r"\(suffix '.txt'\)"),
    ("a traversal span that is not finite", lambda t: ["interpolate", str(_run(t)), "--span", "nan"],
     r"argument --span: expected a finite number > 0, found nan"),
    ("evaluation batch size < 1", lambda t: ["evaluate", str(_run(t)), "--batch-size", "0"],
     r"argument --batch-size: expected an integer >= 1, found 0"),
    ("too few importance samples", lambda t: ["evaluate", str(_run(t)), "--iw-samples", "1"],
     r"argument --iw-samples: expected 0 \(skip log p\(x\)\) or an integer >= 30"),
    ("imputation of fewer than one point", lambda t: ["impute", str(_run(t)), "--n", "-5"],
     r"argument --n: expected an integer >= 1, found -5"),
]


@pytest.mark.parametrize("row,argv,pattern", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_command_line_prints_one_line_and_exits_2(tmp_path, capsys, row, argv, pattern):
    code = cli.main(argv(tmp_path))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("pyro-vae ") and ": error: " in err
    import re

    assert re.search(pattern, err), err


@pytest.mark.parametrize("flag,value", [("--likelihood", "gaussian"), ("--prior", "cauchy"), ("--elbo", "iwae"),
                                        ("--net", "resnet")])
def test_command_line_unknown_name_lists_the_known_ones(capsys, flag, value):
    assert cli.main(["train", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: invalid choice: '{value}' (choose from" in err
