"""The validation layer shared by the library and the command line (``pyro_vae.validation``): data of any
dtype is cast exactly or refused with a ``DataError``; binarization refuses values outside [0, 1] instead of
clamping them; KL weights, counts and picture paths are checked where they are given; a user part that
returns NaN or no distribution is named; and every bad numeric value on the command line ends in one line
on stderr and exit status 2 (hypothesis over every subcommand's numeric options)."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import pyro_vae
from pyro_vae import cli, data, validation
from pyro_vae.errors import ConfigError, DataError, ModelError, PyroVAEError

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

D = 6


# ---------------------------------------------------------------------------------------- the checks
def test_integer_and_number_accept_numpy_and_0_dim_tensors_and_refuse_bools_strings_and_non_finite():
    assert validation.integer("n", np.int64(3)) == 3 and validation.integer("n", torch.tensor(4)) == 4
    assert validation.number("lr", np.float32(0.5)) == 0.5 and validation.positive("lr", torch.tensor(2.0)) == 2.0
    for bad in (True, 1.0, "3", 0, None, torch.tensor([1, 2])):
        with pytest.raises(ConfigError, match=r"n: expected an integer >= 1, found"):
            validation.integer("n", bad)
    for bad in (math.nan, math.inf, -math.inf, 0.0, -1, "1", False, 1j):
        with pytest.raises(ConfigError, match=r"lr: expected a finite number > 0, found"):
            validation.positive("lr", bad)
    with pytest.raises(ConfigError, match=r"seed: expected an integer in \[0, 4294967295\], found 4294967296"):
        validation.integer("seed", 2 ** 32, 0, 2 ** 32 - 1)


def test_boolean_takes_python_and_numpy_bools_only():
    assert validation.boolean("progress", np.bool_(True)) is True and validation.boolean("progress", False) is False
    for bad in (1, 0, "yes", None, torch.tensor(True)):
        with pytest.raises(ConfigError, match=r"progress: expected True or False, found .*\. Fix: pass progress=True"):
            validation.boolean("progress", bad)


def test_the_likelihoods_scales_go_through_the_same_checks():
    from pyro_vae.likelihoods import Normal, NormalLearnedScale

    assert Normal(np.float32(0.5)).scale == 0.5
    for bad in (0, -1.0, math.nan, math.inf, True, "0.1"):
        with pytest.raises(ConfigError, match=r"^likelihood scale: expected a finite number > 0, found .*scale=0\.1"):
            Normal(bad)
    with pytest.raises(ConfigError, match=r"^min_scale: expected a finite number >= 0, found -1"):
        NormalLearnedScale((3,), min_scale=-1)
    for bad in (1e-3, 1e-4, math.nan, math.inf, None):
        with pytest.raises(ConfigError, match=r"^init_scale: expected a finite number > 0.001, found"):
            NormalLearnedScale((3,), init_scale=bad)


def test_the_command_line_parses_with_the_same_checks():
    to_int = validation.arg_type("--n", validation.integer)
    assert to_int("1e3") == 1000 and to_int("7") == 7
    for text, found in (("1.5", "'1.5'"), ("ten", "'ten'"), ("0", "0"), ("nan", "'nan'"), ("1e400", "'1e400'")):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"expected an integer.*, found {found}"):
            to_int(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^expected a finite number > 0, found nan\. Fix: pass"):
        validation.arg_type("--span", validation.number, minimum=0.0)("nan")


def test_beta_is_validated_wherever_it_is_given():
    vae = pyro_vae.VAE((D,), 2, hidden=(8,), beta=0.5)
    for bad in (0.0, -1.0, math.nan, math.inf, "1", None):
        with pytest.raises(ConfigError, match=r"beta: expected a finite number > 0"):
            pyro_vae.VAE((D,), 2, hidden=(8,), beta=bad)
        with pytest.raises(ConfigError, match=r"beta: expected a finite number > 0"):
            vae.beta = bad
        with pytest.raises(ConfigError, match=r"beta: expected a finite number > 0"):
            pyro_vae.ConstantBeta(bad)
        with pytest.raises(ConfigError, match=r"(end|start) beta: expected a finite number > 0"):
            pyro_vae.KLWarmup(10, start=bad if bad is not None else -1.0)
    assert vae.beta == 0.5  # a refused value leaves the last good one
    vae.beta = np.float32(0.25)
    assert vae.beta == 0.25 and isinstance(vae.beta, float)
    with pytest.raises(ConfigError, match=r"warm-up steps: expected an integer >= 1, found 0"):
        pyro_vae.KLWarmup(0)


# ------------------------------------------------------------------------------------------- dtypes
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
           if hasattr(torch, n)]
QUANTIZED = [torch.quint8, torch.qint8]
ENTRIES = ("fit", "svi", "log_likelihood", "evaluate_elbo", "encode", "check_data")


def _binary(n: int = 8, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, D, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype in QUANTIZED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated: still refused while they exist
            return torch.quantize_per_tensor(x, 1.0, 0, dtype)
    return x.to(dtype)


def _entry(entry: str, x: torch.Tensor) -> object:
    """Run one entry point on ``x`` from the same seed and VAE; return what it computed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = pyro_vae.VAE((D,), 2, hidden=(8,), likelihood="bernoulli")
    if entry == "fit":
        return pyro_vae.fit(vae, x, epochs=1, batch_size=4, progress=False, device="cpu")["train_elbo"][0]
    if entry == "svi":
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        return [svi.step(x) for _ in range(2)]
    if entry == "log_likelihood":
        return pyro_vae.log_likelihood(vae, x, 8).mean
    if entry == "evaluate_elbo":
        return pyro_vae.evaluate_elbo(vae, x)
    if entry == "encode":
        return vae.encode(x).tolist()
    vae.check_data(x)
    return None


@FAST
@given(st.sampled_from(DTYPES + QUANTIZED), st.sampled_from(ENTRIES))
def test_every_data_dtype_gives_the_float32_result_or_the_documented_error(dtype, entry):
    # Binary values are exact in every real dtype, so a cast that keeps values must give, from the same seed,
    # exactly what float32 data give; a dtype that cannot be cast is refused with a DataError naming it.
    x32 = _binary()
    try:
        x = _as(x32, dtype)
    except (RuntimeError, TypeError):  # this torch build cannot hold binary data in that dtype
        return
    try:
        got = _entry(entry, x)
    except DataError as e:
        assert dtype.is_complex or dtype in QUANTIZED, e
        assert f"dtype {dtype}" in str(e) and "Fix: " in str(e)
        return
    assert not dtype.is_complex and dtype not in QUANTIZED
    assert got == _entry(entry, x32)


def test_float64_data_train_a_float64_vae_without_a_cast():
    pyro.set_rng_seed(0)
    vae = pyro_vae.VAE((D,), 2, hidden=(8,), likelihood="bernoulli").double()
    x = _binary().double()
    hist = pyro_vae.fit(vae, x, epochs=1, batch_size=4, progress=False, device="cpu")
    assert math.isfinite(hist["train_elbo"][0]) and next(vae.parameters()).dtype == torch.float64
    assert vae.as_data(x) is x and vae.as_data(x.float()).dtype == torch.float64


# ------------------------------------------------------------------------------------- binarization
def test_binarize_refuses_values_outside_the_unit_interval_instead_of_clamping():
    with pytest.raises(DataError, match=r"grey: expected grey levels in \[0, 1\] .*found values in \[-0.5, 2\]"):
        data.binarize(torch.tensor([[-0.5, 2.0]]), what="grey")
    with pytest.raises(DataError, match=r"expected finite grey levels .*found 1 NaN or infinite values"):
        data.binarize(torch.tensor([[0.5, math.nan]]))
    assert set(data.binarize(torch.tensor([[0.0, 1.0, 0.3]])).tolist()[0]) <= {0.0, 1.0}


def test_scale_divides_before_binarizing_and_the_fraction_of_ones_is_the_mean_grey_level(tmp_path):
    grey = np.random.default_rng(0).random((600, 16)).astype(np.float32) * 255
    np.save(tmp_path / "img255.npy", grey)
    with pytest.raises(DataError, match=r"train split of img255.npy: expected grey levels in \[0, 1\]"):
        data.load(str(tmp_path / "img255.npy"), binarize_mode="static")
    s = data.load(str(tmp_path / "img255.npy"), binarize_mode="static", scale=255)
    p = data.load(str(tmp_path / "img255.npy"), scale=255).train.x  # the same split, not binarized
    assert set(s.train.x.unique().tolist()) <= {0.0, 1.0} and float(p.max()) <= 1
    # Each entry is a one with probability its grey level: the mean of the ones has expectation mean(p) and
    # standard error sqrt(sum p (1 - p)) / n. Seeded; 4 standard errors: false-failure rate 6e-5 over seeds.
    se = float((p * (1 - p)).sum().sqrt() / p.numel())
    assert abs(float(s.train.x.mean()) - float(p.mean())) < 4 * se  # clamping gave 0.997 here, not 0.5
    with pytest.raises(ConfigError, match=r"scale: expected a finite number > 0, found 0"):
        data.load(str(tmp_path / "img255.npy"), scale=0)


# ------------------------------------------------------------------------------------- user parts
class _Prior(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(2))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, 1.0).to_event(1)


@pytest.mark.parametrize("part", ["prior", "encoder", "decoder"])
def test_a_part_that_turns_nan_during_inference_is_named_by_the_model_and_guide(part):
    prior = _Prior()
    vae = pyro_vae.VAE((D,), 2, hidden=(8,), prior=prior)
    module = {"prior": prior, "encoder": vae.encoder, "decoder": vae.decoder}[part]
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(math.nan)
    site = {"prior": r'prior at site "z"', "encoder": r'encoder at site "z"',
            "decoder": r'decoder \(input of the likelihood at site "x"\)'}[part]
    with pytest.raises(ModelError, match=site):
        Trace_ELBO().loss(vae.model, vae.guide, _binary())


def test_a_prior_that_returns_a_sample_is_named():
    prior = _Prior()
    vae = pyro_vae.VAE((D,), 2, hidden=(8,), prior=prior)
    prior.forward = lambda: torch.zeros(2)  # e.g. a prior that returns .sample() of its distribution
    with pytest.raises(ModelError, match=r'prior at site "z": expected a distribution .*found Tensor'):
        vae.model(_binary())


# ------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run") / "r"
    pyro_vae.save(pyro_vae.VAE((1, 8, 8), 2, hidden=(8,), likelihood="continuous-bernoulli"), folder,
                  data={"data": "digits", "data_dir": None, "binarize": "none", "seed": 0})
    return folder


def _status(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # main returns the status; this would be a regression, reported by the assert
        return -1000 - int(e.code or 0)


def _numeric_options() -> list[tuple[str, str, dict]]:
    """``(subcommand, flag, domain)`` for every option of every subcommand that takes a number."""
    out = []
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.type is None or not action.option_strings:
                continue
            check = getattr(action.type, "check", None)
            assert check is not None, f"{name} {action.option_strings[0]} is parsed without the validation layer"
            if check is not validation.image_path:
                out.append((name, action.option_strings[0], {"check": check, **action.type.kwargs}))
    return out


NUMERIC = _numeric_options()


def test_every_numeric_option_goes_through_the_validation_layer():
    flags = {(c, f) for c, f, _ in NUMERIC}
    assert {("train", "--z-dim"), ("train", "--beta"), ("sample", "--n"), ("evaluate", "--batch-size"),
            ("evaluate", "--iw-samples"), ("interpolate", "--span"), ("impute", "--n")} <= flags


@st.composite
def bad_values(draw):
    command, flag, domain = draw(st.sampled_from(NUMERIC))
    check = domain["check"]
    minimum = domain.get("minimum", 0)
    texts = ["nan", "inf", "-inf", "ten", "", "1,5", "0x10"]
    if check is validation.integer or check is cli._iw_samples:
        lowest = 0 if check is cli._iw_samples else minimum
        texts += [str(lowest - draw(st.integers(1, 10 ** 20))), "1.5", f"{lowest}.25", "1e400"]
        if check is cli._iw_samples:
            texts.append(str(draw(st.integers(1, 29))))
        if domain.get("maximum") is not None:
            texts.append(str(domain["maximum"] + draw(st.integers(1, 10 ** 20))))
    else:
        below = draw(st.floats(min_value=1e-300, max_value=1e300))
        texts += [repr(minimum - below), "1e999"]
        if domain.get("strict", True):
            texts.append(repr(float(minimum)))
    return command, flag, draw(st.sampled_from(texts))


@FAST
@given(bad_values())
def test_bad_command_line_values_end_in_one_line_and_status_2(run, capsys, case):
    command, flag, text = case
    argv = [command] + ([str(run)] if command != "train" else []) + [f"{flag}={text}"]
    status = _status(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, (argv, err)
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"pyro-vae {command}: error: argument {flag}: expected "), err
    assert ". Fix: " in err


def test_an_early_refusal_writes_nothing(run, tmp_path, capsys):
    metrics = run / "metrics.json"
    before = metrics.read_bytes() if metrics.exists() else None
    assert _status(["evaluate", str(run), "--iw-samples", "1"]) == 2
    assert (metrics.read_bytes() if metrics.exists() else None) == before
    x = np.random.default_rng(0).random((60, 16)).astype(np.float32)
    x[int(torch.randperm(60, generator=torch.Generator().manual_seed(0))[6]), 3] = np.nan  # a test point
    np.save(tmp_path / "nan_in_test.npy", x)
    out = tmp_path / "r"
    assert _status(["train", "--data", str(tmp_path / "nan_in_test.npy"), "--epochs", "3", "--hidden", "8",
                    "--no-progress", "--device", "cpu", "--out", str(out)]) == 2
    assert "test split of" in capsys.readouterr().err
    assert not (out / "config.json").exists() and not (out / "model.pt").exists()  # refused before training


def test_impute_of_one_point_writes_no_nan_standard_error(run, tmp_path):
    assert _status(["impute", str(run), "--n", "1", "--samples", "4", "--out", str(tmp_path), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "imputation.json").read_text())
    assert result["num_points"] == 1 and result["mse_missing_se"] is None and math.isfinite(result["mse_missing"])


def test_the_library_and_the_command_line_refuse_in_the_same_words():
    with pytest.raises(ConfigError) as lib:
        pyro_vae.evaluate_elbo(pyro_vae.VAE((D,), 2, hidden=(8,)), _binary(), batch_size=0)
    with pytest.raises(argparse.ArgumentTypeError) as arg:
        validation.arg_type("batch_size", validation.integer)("0")
    assert str(lib.value) == f"batch_size: {arg.value}"
    assert isinstance(lib.value, PyroVAEError)
