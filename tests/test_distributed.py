"""Data-parallel fit: two CPU processes with gloo on loopback against one process over the same global batches,
and resume inside a distributed run. Rank 0 runs in the test process and rank 1 in a spawned one; the
collectives and the join have timeouts, so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyro_vae
from pyro_vae.encoders import Encoder

TIMEOUT_S = 120
N, D, Z, BATCH, EPOCHS = 67, 12, 3, 16, 2  # 67 = 4 * 16 + 3: the last global batch splits 2 / 1


class DeltaEncoder(Encoder):
    """A point-mass guide: no Monte Carlo noise, so one process and two give the same gradients up to
    floating-point summation order."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(D, Z)

    def distribution(self, x: torch.Tensor) -> dist.Distribution:
        return dist.Delta(self.net(x), event_dim=1)


def _data() -> torch.Tensor:
    return torch.rand(N, D, generator=torch.Generator().manual_seed(1))


def _delta_vae() -> pyro_vae.VAE:
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    return pyro_vae.VAE((D,), Z, encoder=DeltaEncoder(), likelihood="continuous-bernoulli", hidden=(8,))


def _gauss_vae() -> pyro_vae.VAE:
    pyro.clear_param_store()
    pyro.set_rng_seed(4)
    return pyro_vae.VAE((D,), Z, likelihood="continuous-bernoulli", hidden=(8,))


def _params(vae: pyro_vae.VAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


class _At:
    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step(self, state):
        if state.step == self.step:
            self.action(state)


def _poison(state) -> None:
    with torch.no_grad():
        next(state.vae.decoder.parameters()).fill_(float("nan"))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as tdist

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=TIMEOUT_S))
        pyro.enable_validation(True)
        x = _data()
        kw = dict(epochs=EPOCHS, batch_size=BATCH, lr=1e-2, progress=False, device="cpu", seed=0, elbo="trace")
        result = {}
        # 1. same global batches as one process (point-mass guide: deterministic gradients)
        vae = _delta_vae()
        if rank == 1:  # a different local initialization: fit must start every rank from rank 0's
            with torch.no_grad():
                for p in vae.parameters():
                    p.add_(1.0)
        pyro_vae.fit(vae, x, val_data=x[:5], **kw)
        result["delta"] = _params(vae)
        # 2. resume inside a distributed run, bit for bit (Gaussian guide: each rank's RNG stream matters)
        full = _gauss_vae()
        pyro_vae.fit(full, x, checkpoint_dir=os.path.join(out, "full"), **kw)
        part = _gauss_vae()
        pyro_vae.fit(part, x, checkpoint_dir=os.path.join(out, "part"), **{**kw, "epochs": 1},
                     checkpoint_every=2)
        resumed = _gauss_vae()
        pyro_vae.fit(resumed, x, checkpoint_dir=os.path.join(out, "part"), resume_from=os.path.join(out, "part"),
                     **kw)
        result["full"], result["resumed"] = _params(full), _params(resumed)
        # 3. a NaN on rank 1 alone, and 4. Ctrl-C on rank 1 alone: both ranks stop at the same step, no hang
        poison = [_At(3, _poison)] if rank == 1 else []
        try:
            pyro_vae.fit(_gauss_vae(), x, callbacks=poison, **kw)
        except pyro_vae.NonFiniteLossError as e:
            result["nan"] = str(e)
        ctrl_c = [_At(2, lambda s: signal.raise_signal(signal.SIGINT))] if rank == 1 else []
        try:
            pyro_vae.fit(_gauss_vae(), x, callbacks=ctrl_c, checkpoint_dir=os.path.join(out, "stop"), **kw)
        except pyro_vae.TrainingInterrupted as e:
            result["stop"] = e.step
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        tdist.barrier()
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        torch.set_num_threads(threads)
        if tdist.is_initialized():
            tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp_path: Path) -> list[dict]:
    """Rank 1 in a spawned process, rank 0 in this one (one interpreter start instead of two)."""
    port = _free_port()
    child = mp.get_context("spawn").Process(target=_worker, args=(1, 2, port, str(tmp_path)))
    child.start()
    try:
        _worker(0, 2, port, str(tmp_path))
    finally:
        child.join(TIMEOUT_S)
        if child.is_alive():
            child.kill()
            child.join()
    errors = [f.read_text() for f in tmp_path.glob("rank*.err")]
    assert not errors, "\n".join(errors)
    assert child.exitcode == 0, child.exitcode
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_gloo_processes_match_one_process_and_resume_bit_for_bit(tmp_path):
    ranks = _run_two(tmp_path)
    vae = _delta_vae()
    pyro_vae.fit(vae, _data(), epochs=EPOCHS, batch_size=BATCH, lr=1e-2, progress=False, device="cpu", seed=0,
                 elbo="trace")
    single = _params(vae)
    for key, value in single.items():
        # both ranks hold identical parameters, equal to one process's up to summation order
        assert torch.equal(ranks[0]["delta"][key], ranks[1]["delta"][key]), key
        torch.testing.assert_close(ranks[0]["delta"][key], value, rtol=1e-4, atol=1e-5)
    moved = max(float((single[k] - _params(_delta_vae())[k]).abs().max()) for k in single)
    assert moved > 1e-3  # training did move the parameters, so the comparison means something
    for key in ranks[0]["full"]:
        assert torch.equal(ranks[0]["full"][key], ranks[0]["resumed"][key]), key
        assert torch.equal(ranks[0]["full"][key], ranks[1]["full"][key]), key
    # a NaN on one rank and Ctrl-C on one rank stop both at the same step (the first sync after it)
    for r in ranks:
        assert r["nan"].startswith("loss and gradient at epoch 1, step 4:"), r["nan"]
        assert r["stop"] == 5
    assert pyro_vae.checkpoint.load_training_state(tmp_path / "stop")["step"] == 5
    # rank 0 alone wrote the checkpoints, in the single-process format
    payload = pyro_vae.checkpoint.load_training_state(tmp_path / "full")
    assert payload["world_size"] == 2 and len(payload["rng"]) == 2
    assert payload["step"] == EPOCHS * ((N + BATCH - 1) // BATCH)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_two_processes_cli(tmp_path):
    """``torchrun --nproc_per_node=2 -m pyro_vae train`` writes one run folder (rank 0) and resumes."""
    port = _free_port()
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "-m", "pyro_vae", "train", "--epochs", "1", "--hidden", "16", "--z-dim", "2", "--batch-size", "64",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "metrics.json").is_file()
    base[base.index("--epochs") + 1] = "2"
    done = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert pyro_vae.checkpoint.load_training_state(tmp_path / "run")["epoch"] == 2


@pytest.mark.slow
def test_scaling_benchmark_quick(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    result = json.loads((tmp_path / "scaling_cpu_quick.json").read_text())
    assert [r["processes"] for r in result["results"]] == [1, 2]
    assert all(r["points_per_s"] > 0 for r in result["results"]) and result["torch"] == torch.__version__
    assert (tmp_path / "scaling_cpu_quick.png").is_file()
