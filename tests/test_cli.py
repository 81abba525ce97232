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


# ------------------------------------------------------------------------------ train --resume of a run folder
def _tiny_run_args(tmp_path, out, *extra):
    """A small binary image data set as a .npy file, and `pyro-vae train` arguments that train on it in a
    second."""
    import numpy as np

    data = tmp_path / "x.npy"
    if not data.exists():
        np.save(data, (np.random.default_rng(0).random((80, 4, 4)) > 0.5).astype(np.float32))
    return ["train", "--data", str(data), "--epochs", "2", "--batch-size", "16", "--hidden", "8", "--z-dim", "2",
            "--likelihood", "bernoulli", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def _snapshot(folder):
    """Every file's bytes and modification time: a command that leaves the folder alone changes neither."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_resume_of_a_run_that_trained_the_epochs_asked_for_leaves_every_file_as_it_was(tmp_path, capsys):
    from pyro_vae import cli

    out = tmp_path / "R"
    assert cli.main(_tiny_run_args(tmp_path, out)) == 0
    assert cli.main(["evaluate", str(out), "--iw-samples", "30", "--device", "cpu"]) == 0
    before = _snapshot(out)
    assert {"log_likelihood", "gap", "active_units", "num_samples"} <= set(json.loads(before["metrics.json"][0]))
    capsys.readouterr()
    assert cli.main(_tiny_run_args(tmp_path, out, "--resume")) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == f"{out} already trained 2 epochs; nothing to do (pass --epochs N > 2 to train more)"
    assert printed.err == "" and _snapshot(out) == before
    assert cli.main(_tiny_run_args(tmp_path, out, "--resume", "--epochs", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("pyro-vae train: error: --epochs: expected at least 2")
    assert f"{out} already trained 2 epochs" in err and "found --epochs 1" in err and "--epochs 2 or more" in err
    assert _snapshot(out) == before


def test_resume_that_trains_more_removes_the_old_weights_reports_and_times_only_its_own_epochs(tmp_path, capsys):
    import re

    from pyro_vae import checkpoint, cli

    out = tmp_path / "R"
    assert cli.main(_tiny_run_args(tmp_path, out)) == 0
    assert cli.main(["evaluate", str(out), "--iw-samples", "30", "--device", "cpu"]) == 0
    assert cli.main(["interpolate", str(out), "--pairs", "2", "--steps", "3", "--device", "cpu"]) == 0
    assert {"pareto_k.png", "interpolations.png", "traversals.png"} <= {p.name for p in out.iterdir()}
    capsys.readouterr()
    assert cli.main(_tiny_run_args(tmp_path, out, "--resume", "--epochs", "4")) == 0
    printed = capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())["epochs"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in history] == [1, 2, 3, 4]
    # the time printed is that of the epochs this command trained, named as such
    seconds = float(re.search(r"resumed after epoch 2 and trained epochs 3-4 in ([0-9.]+) s on cpu \(the run has "
                              r"4 epochs\): test ELBO", printed).group(1))
    assert seconds == round(history[2]["seconds"] + history[3]["seconds"], 1)
    assert metrics["epochs"] == 4 and metrics["seconds"] == pytest.approx(sum(e["seconds"] for e in history))
    # what evaluate and interpolate computed from the old weights is gone, and the output says so
    assert not {"log_likelihood", "gap", "active_units", "num_samples"} & set(metrics)
    assert not any(k.startswith("pareto_k") for k in metrics)
    assert not {"pareto_k.png", "interpolations.png", "traversals.png"} & {p.name for p in out.iterdir()}
    removed = re.search(r"removed what was computed from the previous weights: (.*) in metrics.json; (.*) \(run "
                        r"pyro-vae evaluate, sample, interpolate or impute again", printed)
    assert {"log_likelihood", "gap", "active_units", "num_samples", "pareto_k_*"} <= set(removed.group(1).split(", "))
    assert removed.group(2).split(", ") == ["pareto_k.png", "interpolations.png", "traversals.png"]
    assert checkpoint.RunFolder(out).manifest()["remove"] == []  # settled: later reports are never removed
    assert all((out / name).is_file() for name in ("samples.png", "reconstructions.png", "elbo.png", "latent.png"))


def test_resume_within_an_epoch_refuses_fewer_epochs_than_it_reached(tmp_path, capsys, monkeypatch):
    from pyro_vae import checkpoint, cli

    out = tmp_path / "R"

    class Stop:
        def on_step(self, state):
            if state.step == 7:  # mid-epoch 2 (4 steps per epoch), after the checkpoint of step 6
                raise KeyboardInterrupt

    schedules = cli._schedules
    monkeypatch.setattr(cli, "_schedules", lambda args: [*schedules(args), Stop()])
    assert cli.main(_tiny_run_args(tmp_path, out, "--checkpoint-every", "3")) == 130
    monkeypatch.setattr(cli, "_schedules", schedules)
    state = checkpoint.load_training_state(out)
    assert (state["epoch"], state["epoch_complete"]) == (2, False)
    capsys.readouterr()
    assert cli.main(_tiny_run_args(tmp_path, out, "--resume", "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "--epochs: expected at least 2" in err and "already trained 1 epochs and part of epoch 2" in err
    assert cli.main(_tiny_run_args(tmp_path, out, "--resume")) == 0
    assert "resumed within epoch 2 and trained epoch 2 in" in capsys.readouterr().out


def test_fit_refuses_to_resume_to_fewer_epochs_and_trains_nothing_at_as_many(tmp_path):
    import pyro
    import torch

    import pyro_vae
    from pyro_vae.errors import ConfigError

    x = (torch.rand(32, 6, generator=torch.Generator().manual_seed(0)) > 0.5).float()

    def fit(**kw):
        pyro.clear_param_store()
        return pyro_vae.fit(pyro_vae.VAE((6,), 2, hidden=(8,)), x, batch_size=16, device="cpu", progress=False,
                            checkpoint_dir=tmp_path, **kw)

    fit(epochs=3)
    manifest = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match=r"epochs: expected at least 3 \(the checkpoint .* already trained 3 "
                                          r"epochs; resuming cannot shorten a run\), found 1"):
        fit(epochs=1, resume_from=tmp_path)
    assert len(fit(epochs=3, resume_from=tmp_path)) == 3
    assert (tmp_path / "manifest.json").read_bytes() == manifest


def test_iwae_refusals_quote_the_flags_as_typed(tmp_path, capsys):
    """Under --objective iwae, --elbo X is quoted as typed (and dropping it is the fix), while pyro_vae.fit's
    elbo="trace" reads --objective elbo --elbo trace, the flags that choose the ELBO there."""
    from pyro_vae.cli import main

    base = ["train", "--data", "digits", "--z-dim", "2", "--hidden", "8", "--epochs", "1", "--no-progress",
            "--device", "cpu", "--objective", "iwae", "--k", "4", "--out", str(tmp_path / "r")]
    assert main([*base, "--elbo", "meanfield"]) == 2
    err = capsys.readouterr().err
    assert "expected no --elbo with --objective iwae" in err and "found --elbo meanfield. Fix: drop --elbo" in err
    assert "--objective elbo" not in err
    assert main([*base, "--estimator", "stl"]) == 2
    err = capsys.readouterr().err
    assert "or --objective elbo --elbo trace for this estimator" in err and 'elbo="trace"' not in err
    assert not (tmp_path / "r").exists()
