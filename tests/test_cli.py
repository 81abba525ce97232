"""The command line and the example scripts, each run in a subprocess with tiny settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    run("-m", "pyro_vae", "train", "--data", "digits", "--z-dim", "2", "--epochs", "2", "--batch-size", "128",
        "--hidden", "32", "--likelihood", "continuous-bernoulli", "--elbo", "meanfield", "--device", "cpu",
        "--no-progress", "--out", str(out))
    return out


def test_train_writes_the_run_folder(run_dir):
    for name in ("config.json", "model.pt", "metrics.json", "history.json", "samples.png", "reconstructions.png",
                 "elbo.png", "latent.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"train_elbo", "val_elbo", "test_elbo"} <= set(metrics)
    assert len(json.loads((run_dir / "history.json").read_text())["epochs"]) == 2


def test_sample_and_evaluate(run_dir, tmp_path):
    out = tmp_path / "s.png"
    run("-m", "pyro_vae", "sample", str(run_dir), "--n", "16", "--out", str(out), "--device", "cpu")
    assert out.stat().st_size > 0
    proc = run("-m", "pyro_vae", "evaluate", str(run_dir), "--device", "cpu")
    assert "test ELBO" in proc.stdout
    assert "test_elbo" in json.loads((run_dir / "metrics.json").read_text())


def test_load_rebuilds_the_vae(run_dir):
    import torch

    import pyro_vae

    vae = pyro_vae.load(run_dir)
    assert vae.z_dim == 2 and vae.sample(3).shape == (3, 1, 8, 8)
    assert torch.isfinite(vae.reconstruct(torch.rand(2, 1, 8, 8))).all()


def test_help_explains_every_flag():
    proc = run("-m", "pyro_vae", "train", "--help")
    for flag in ("--data", "--data-dir", "--net", "--hidden", "--particles", "--binarize", "--z-dim",
                 "--likelihood", "--elbo", "--epochs", "--batch-size", "--lr", "--seed", "--device", "--out"):
        assert flag in proc.stdout


def test_help_names_the_defaults_that_differ_from_the_library(capsys):
    """The command line trains with the mean-field ELBO and the continuous Bernoulli likelihood; pyro_vae.fit and
    pyro_vae.VAE default to Trace_ELBO and the Bernoulli likelihood. --help says both, and both statements hold."""
    import inspect

    import pyro_vae
    from pyro_vae import cli

    assert cli.main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: continuous-bernoulli (pyro_vae.VAE's default is bernoulli)" in text
    assert "default: meanfield, trace for the score-function estimators (pyro_vae.fit's default is trace)" in text
    args = cli.build_parser().parse_args(["train"])
    assert args.likelihood == "continuous-bernoulli" and args.elbo is None  # None: meanfield, set in cmd_train
    assert inspect.signature(pyro_vae.VAE).parameters["likelihood"].default == "bernoulli"
    assert inspect.signature(pyro_vae.fit).parameters["elbo"].default == "trace"


def test_errors_are_one_line_and_non_zero(tmp_path):
    proc = run("-m", "pyro_vae", "train", "--z-dim", "0", "--epochs", "1", "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--z-dim: expected an integer >= 1" in proc.stderr
    proc = run("-m", "pyro_vae", "sample", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and "run folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("-m", "pyro_vae", "train", "--likelihood", "poisson", check=False)
    assert proc.returncode == 2 and "continuous-bernoulli" in proc.stderr  # argparse lists the choices


def test_quickstart_example_runs():
    proc = run("examples/quickstart.py", "--steps", "20", "--batch-size", "32")
    assert "validation ELBO" in proc.stdout


def test_cuda_graph_is_refused_on_the_cpu_before_the_run_folder_is_written(tmp_path):
    out = tmp_path / "r"
    proc = run("-m", "pyro_vae", "train", "--epochs", "1", "--device", "cpu", "--cuda-graph", "--out", str(out),
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cuda_graph=True" in proc.stderr and "device cpu" in proc.stderr
    assert not (out / "model.pt").exists()


@pytest.mark.parametrize("command", ["evaluate", "impute", "interpolate"])
def test_commands_that_reload_the_data_refuse_a_folder_saved_without_it(tmp_path, capsys, command):
    """A folder written by pyro_vae.save has no data section: one line naming config.json and the fix."""
    import pyro_vae
    from pyro_vae.cli import main

    pyro_vae.save(pyro_vae.VAE((64,), 2, hidden=(8,)), tmp_path / "saved")
    assert main([command, str(tmp_path / "saved"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'RUN/config.json: expected a "data" section' in err[0] and "pyro_vae.save" in err[0]


@pytest.mark.parametrize("extra, expected", [
    (["--lr", "1e300"], "lr: expected a learning rate float32 can hold"),
    (["--particles", "100000000"], "num_particles: expected a size that fits"),
])
def test_train_refuses_values_beyond_what_the_step_can_hold_in_one_line(tmp_path, capsys, extra, expected):
    from pyro_vae.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--z-dim", "2", "--hidden", "8", "--epochs", "1", "--no-progress",
                 "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert not out.exists()


def test_a_random_mask_that_hides_nothing_is_refused():
    import pyro_vae
    from pyro_vae.imputation import make_mask

    with pytest.raises(pyro_vae.ConfigError, match="0 < P <= 1"):
        make_mask((64,), "random:0")
    assert (~make_mask((64,), "random:1")).all()
