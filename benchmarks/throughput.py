"""Training throughput: pyro-vae's training step against a hand-written PyTorch VAE step (and Pythae's VAE).

Every contender trains the same encoder and decoder networks (copies of one initialization) on the same
minibatches with the same optimizer (Adam, lr 1e-3). Contenders:

- ``torch``: the hand-written step: encoder, reparameterized Gaussian sample, decoder, Bernoulli
  log-likelihood by ``binary_cross_entropy_with_logits``, analytic KL, backward, Adam.
- ``pyro-before``: Pyro's ``Trace_ELBO.loss_and_grads`` with Pyro's validation on, as ``fit`` ran it before.
- ``fit-trace`` / ``fit-meanfield``: :func:`pyro_vae.train.svi_step` as :func:`pyro_vae.fit` calls it
  (``validate=False`` after the first step, ``check_finite=False``: the losses stay on the device and are
  checked every ``pyro_vae.train.SYNC_EVERY`` steps).
- ``fit()-trace``: :func:`pyro_vae.fit` itself in its steady state (:class:`FitLoop`: timed after its first 5
  steps, which hold the one-off whole-data check, the validated first step and the checked traced step; adds
  shuffling, batch gathering and the per-step non-finite bookkeeping to the step).
- CUDA only: ``torch-graph`` (the hand-written step as a CUDA graph), ``graph-trace`` /
  ``graph-meanfield`` (:class:`pyro_vae.train.CUDAGraphStep`, losses checked as for ``fit-trace``) and
  ``fit()-graph`` (``pyro_vae.fit(..., elbo="meanfield", cuda_graph=True)`` itself, timed after its first 20
  steps, which hold the eager warm-up and the capture).
- ``pythae``: Pythae's ``VAE`` (``reconstruction_loss="bce"``) around the same networks, when importable.
- ``torch-iwae``: the hand-written importance-weighted step (Burda et al. 2016), ``K = 50`` samples vectorized
  in a leading dimension: encoder, ``K`` reparameterized draws, decoder, ``log p(x|z) + log p(z) - log q(z|x)``,
  a log-mean-exp over ``K`` per image, backward, Adam.
- ``fit-iwae``: :func:`pyro_vae.train.svi_step` with ``make_elbo("iwae", 50)``
  (:class:`pyro_vae.infer.iwae.ImportanceWeightedELBO`), as :func:`pyro_vae.fit` calls it with
  ``elbo="iwae", num_particles=50`` (``fit`` adds a one-particle ``Trace_ELBO`` evaluation per step for the
  reported ELBO). Its ratio to ``torch-iwae`` is the table's ``x torch-iwae`` column.
- ``torch-again``: a second, identical copy of ``torch``, timed in its own slot of every round: its ratio to
  ``torch`` is the noise floor of the measurement (what a ratio of identical code looks like on this machine).

Repetitions are interleaved (every contender once per round, in one process, in an order shuffled every round), so
drifts in machine load hit all of them alike; the JSON keeps every repetition, the table shows the median images/s,
the spread (min-max over repetitions) and the ratio of median step times to ``torch``. On the CPU the table ranks by
the process's CPU time (``--clock process``, robust to other jobs on a shared machine; run with ``--threads 1``); on
CUDA by wall-clock time, with the device synchronized around every repetition. Both clocks are kept.

    python benchmarks/throughput.py --device auto            # full run, CPU and (when present) CUDA
    python benchmarks/throughput.py --quick --out /tmp/tp     # CPU smoke run, under a minute
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_vae
from pyro_vae.infer.elbo import make_elbo
from pyro_vae.train import SYNC_EVERY, CUDAGraphStep, svi_step

CONFIGS = {
    # name: (data_shape, z_dim, net, hidden, batch)
    "digits-mlp-b128": ((64,), 8, "mlp", (400,), 128),
    "mnist-mlp-b128": ((784,), 20, "mlp", (400,), 128),
    "mnist-mlp-b256": ((784,), 20, "mlp", (400,), 256),
    "mnist-mlp-b1024": ((784,), 20, "mlp", (400,), 1024),
    "mnist-conv-b128": ((1, 28, 28), 20, "conv", (400,), 128),
}
QUICK = ("digits-mlp-b128", "mnist-mlp-b128")
LR = 1e-3
NUM_DATA = 60000
IWAE_K = 50


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HandWritten:
    """The plain PyTorch VAE step (what a user writes without Pyro)."""

    def __init__(self, vae: pyro_vae.VAE, num_data: int, capturable: bool) -> None:
        self.enc = copy.deepcopy(vae.encoder.net)
        self.dec = copy.deepcopy(vae.decoder)
        self.z_dim, self.min_scale, self.num_data = vae.z_dim, vae.encoder.min_scale, num_data
        params = list(self.enc.parameters()) + list(self.dec.parameters())
        self.opt = torch.optim.Adam(params, lr=LR, capturable=capturable)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loc, raw = self.enc(x).split(self.z_dim, dim=-1)
        scale = F.softplus(raw) + self.min_scale
        z = loc + scale * torch.randn_like(loc)
        logits = self.dec(z)
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum() - scale.log().sum()
        loss = (rec + kl) * (self.num_data / x.shape[0])
        loss.backward()
        self.opt.step()
        return loss.detach()


class HandWrittenIWAE(HandWritten):
    """The plain PyTorch IWAE step: ``K`` draws per image in a leading dimension, one log-mean-exp per image."""

    def __init__(self, vae: pyro_vae.VAE, num_data: int, k: int = IWAE_K) -> None:
        super().__init__(vae, num_data, capturable=False)
        self.k = k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loc, raw = self.enc(x).split(self.z_dim, dim=-1)
        scale = F.softplus(raw) + self.min_scale
        eps = torch.randn((self.k, *loc.shape), device=x.device, dtype=loc.dtype)
        z = loc + scale * eps  # (K, batch, z_dim)
        logits = self.dec(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
        log_q = -0.5 * (eps.pow(2) + math.log(2 * math.pi)).sum(-1) - scale.log().sum(-1)
        log_w = log_px + log_pz - log_q
        bound = (torch.logsumexp(log_w, 0) - math.log(self.k)).sum()
        loss = -bound * (self.num_data / x.shape[0])
        loss.backward()
        self.opt.step()
        return loss.detach()


class GraphedTorch:
    """The hand-written step captured as a CUDA graph (``torch.cuda.graph``), the fastest plain-PyTorch loop."""

    def __init__(self, vae: pyro_vae.VAE, num_data: int, example: torch.Tensor) -> None:
        self.step = HandWritten(vae, num_data, capturable=True)
        self.static_x = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step(self.static_x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.step.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.static_loss = self.step(self.static_x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_loss


class PyroStep:
    """``svi_step`` as ``fit`` calls it, or Pyro's ``loss_and_grads`` as before (``before=True``)."""

    instances = 0

    def __init__(self, vae: pyro_vae.VAE, elbo: Callable[..., Any], num_data: int, before: bool = False,
                 check_every: int = 1, graph: bool = False, example: Any = None) -> None:
        self.vae = copy.deepcopy(vae)
        PyroStep.instances += 1
        self.vae.name = f"c{PyroStep.instances}"  # own Pyro param names: the copies must not share parameters
        self.loss_fn = elbo(max_plate_nesting=1)
        self.params = list(self.vae.parameters())
        self.opt = torch.optim.Adam(self.params, lr=LR, capturable=graph)
        self.num_data, self.before, self.check_every = num_data, before, check_every
        self.count, self.losses = 0, []
        self.graph = CUDAGraphStep(self.loss_fn, self.vae, example, num_data, self.opt, self.params) \
            if graph else None

    def __call__(self, x: torch.Tensor) -> Any:
        if self.graph is not None:
            self.losses.append(self.graph(x).clone())
        elif self.before:
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss_fn.loss_and_grads(self.vae.model, self.vae.guide, x, num_data=self.num_data)
            if math.isfinite(loss):
                self.opt.step()
            return loss
        elif self.check_every == 1:
            loss = float(svi_step(self.loss_fn, self.vae, x, self.num_data, self.opt, self.params,
                                  validate=False))
            if not math.isfinite(loss):
                raise FloatingPointError("non-finite loss")
            return loss
        else:
            self.losses.append(svi_step(self.loss_fn, self.vae, x, self.num_data, self.opt, self.params,
                                        validate=False, check_finite=False))
        self.count += 1
        if self.count % self.check_every == 0:
            if not bool(torch.isfinite(torch.stack(self.losses)).all()):
                raise FloatingPointError("non-finite loss")
            self.losses.clear()
        return None


class Pythae:
    """Pythae's VAE (bce reconstruction, analytic KL) around copies of the same networks."""

    def __init__(self, vae: pyro_vae.VAE) -> None:
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder

        z_dim = vae.z_dim

        class Enc(BaseEncoder):
            def __init__(self, net: torch.nn.Module) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> Any:
                loc, log_var = self.net(x).split(z_dim, dim=-1)
                return ModelOutput(embedding=loc, log_covariance=log_var)

        class Dec(BaseDecoder):
            def __init__(self, net: torch.nn.Module) -> None:
                super().__init__()
                self.net = net

            def forward(self, z: torch.Tensor) -> Any:
                return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

        config = VAEConfig(input_dim=tuple(vae.data_shape), latent_dim=z_dim, reconstruction_loss="bce")
        self.model = VAE(config, encoder=Enc(copy.deepcopy(vae.encoder.net)),
                         decoder=Dec(copy.deepcopy(vae.decoder))).to(next(vae.parameters()).device)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model({"data": x}).loss
        loss.backward()
        self.opt.step()
        return loss.detach()


class FitLoop:
    """``pyro_vae.fit`` itself, timed in its steady state: one epoch of ``warmup + steps`` batches per
    repetition, the clock started (device synchronized) after the first ``warmup`` steps and stopped when
    ``fit`` returns (its end-of-epoch host read included). The warm-up holds what ``fit`` does once: the
    whole-data check, the validated first step, the traced step whose structure the later steps reuse and,
    with ``cuda_graph=True``, the eager steps on a side stream and the capture. Timed: shuffling, gathering
    batches, the steps, the per-step non-finite flags and a host sync every ``SYNC_EVERY`` steps."""

    self_timed = True

    def __init__(self, vae: pyro_vae.VAE, elbo: str, cuda_graph: bool = False, warmup: int = 20) -> None:
        self.vae = copy.deepcopy(vae)
        PyroStep.instances += 1
        self.vae.name = f"c{PyroStep.instances}"
        self.elbo, self.cuda_graph, self.warmup = elbo, cuda_graph, warmup

    def __call__(self, data: torch.Tensor, batch: int) -> tuple[float, float]:
        clock: dict[str, float] = {}
        warmup = self.warmup

        class Start:
            def on_step(self, state: Any) -> None:
                if state.step == warmup:
                    sync(data.device)
                    clock["wall"], clock["cpu"] = time.perf_counter(), time.process_time()

        steps = data.shape[0] // batch
        data = torch.cat([data[: warmup * batch], data[: steps * batch]])
        pyro_vae.fit(self.vae, data, elbo=self.elbo, epochs=1, batch_size=batch, lr=LR, device=data.device,
                     seed=None, progress=False, cuda_graph=self.cuda_graph, callbacks=[Start()])
        sync(data.device)
        return (time.perf_counter() - clock["wall"]) / steps, (time.process_time() - clock["cpu"]) / steps


def contenders(vae: pyro_vae.VAE, device: torch.device, example: torch.Tensor, skip: Sequence[str] = (),
               failed: dict[str, str] | None = None) -> dict[str, Callable]:
    """The contenders by name (``skip`` leaves some out); a CUDA-graph capture that fails is reported in
    ``failed`` (and the JSON) instead of ending the run."""
    makers: dict[str, Callable[[], Callable]] = {
        "torch": lambda: HandWritten(vae, NUM_DATA, capturable=False),
        "torch-again": lambda: HandWritten(vae, NUM_DATA, capturable=False),
        "pyro-before": lambda: PyroStep(vae, Trace_ELBO, NUM_DATA, before=True),
        "fit-trace": lambda: PyroStep(vae, Trace_ELBO, NUM_DATA, check_every=SYNC_EVERY),
        "fit-meanfield": lambda: PyroStep(vae, TraceMeanField_ELBO, NUM_DATA, check_every=SYNC_EVERY),
        "fit()-trace": lambda: FitLoop(vae, "trace", warmup=5),
        "torch-iwae": lambda: HandWrittenIWAE(vae, NUM_DATA),
        "fit-iwae": lambda: PyroStep(vae, lambda max_plate_nesting: make_elbo("iwae", IWAE_K,
                                                                              max_plate_nesting=max_plate_nesting),
                                     NUM_DATA, check_every=SYNC_EVERY),
    }
    if device.type == "cuda":
        makers["torch-graph"] = lambda: GraphedTorch(vae, NUM_DATA, example)
        makers["fit()-graph"] = lambda: FitLoop(vae, "meanfield", cuda_graph=True)
        for name, elbo in (("graph-trace", Trace_ELBO), ("graph-meanfield", TraceMeanField_ELBO)):
            makers[name] = (lambda elbo=elbo: PyroStep(vae, elbo, NUM_DATA, check_every=SYNC_EVERY, graph=True,
                                                       example=example))
    makers["pythae"] = lambda: Pythae(vae)
    out: dict[str, Callable] = {}
    for name, make in makers.items():
        if name in skip and name != "torch":
            continue
        try:
            out[name] = make()
        except ImportError:  # Pythae not installed
            continue
        except Exception as exc:
            if "graph" not in name:
                raise
            msg = f"{type(exc).__name__}: {exc}"
            print(f"  {name}: CUDA graph capture failed: {msg}", file=sys.stderr)
            if failed is not None:
                failed[name] = msg
    return out


def run_config(name: str, device: torch.device, reps: int, steps: int, warmup: int, clock: str,
               skip: Sequence[str] = ()) -> dict[str, Any]:
    data_shape, z_dim, net, hidden, batch = CONFIGS[name]
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    vae = pyro_vae.VAE(data_shape, z_dim, encoder=net, decoder=net, hidden=hidden).to(device)
    pool = torch.bernoulli(torch.full((8 * batch, *data_shape), 0.3, device=device))
    batches = [pool[i * batch:(i + 1) * batch] for i in range(8)]
    vae.check_data(pool, "benchmark data")  # what fit does once before its loop
    failed: dict[str, str] = {}
    steps_fns = contenders(vae, device, batches[0], skip, failed)
    times: dict[str, list[float]] = {k: [] for k in steps_fns}
    epoch_data = torch.cat([batches[i % 8] for i in range(steps)])  # fit(): one epoch of `steps` batches
    for fn in steps_fns.values():
        if getattr(fn, "self_timed", False):
            continue  # warms up inside every call
        for i in range(warmup):
            fn(batches[i % 8])
    sync(device)
    wall: dict[str, list[float]] = {k: [] for k in steps_fns}
    for rep in range(reps):
        order = list(steps_fns.items())
        random.Random(rep).shuffle(order)  # no contender keeps the same slot of the round
        for k, fn in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            if getattr(fn, "self_timed", False):
                w, c = fn(epoch_data, batch)
                wall[k].append(w)
                times[k].append(c)
                continue
            for i in range(steps):
                fn(batches[i % 8])
            if isinstance(fn, PyroStep) and fn.losses:  # the deferred finiteness check ends the timing
                if not bool(torch.isfinite(torch.stack(fn.losses)).all()):
                    raise FloatingPointError(f"{k}: non-finite loss")
                fn.losses.clear()
            sync(device)
            wall[k].append((time.perf_counter() - t0) / steps)
            times[k].append((time.process_time() - c0) / steps)
    if clock == "wall":
        times, other = wall, times
    else:
        other = wall
    rows = {}
    base = statistics.median(times["torch"])
    for k, ts in times.items():
        med = statistics.median(ts)
        rows[k] = {"ms_per_step": [1e3 * t for t in ts], "median_ms": 1e3 * med,
                   "images_per_s": batch / med, "images_per_s_min": batch / max(ts),
                   "images_per_s_max": batch / min(ts), "ratio_to_torch": med / base,
                   "ratio_to_torch_paired": statistics.median(a / b for a, b in zip(ts, times["torch"])),
                   ("wall" if clock == "process" else "process") + "_ms_per_step": [1e3 * t for t in other[k]]}
        if "torch-iwae" in times and k.endswith("iwae"):
            rows[k]["ratio_to_torch_iwae"] = med / statistics.median(times["torch-iwae"])
            rows[k]["ratio_to_torch_iwae_paired"] = statistics.median(
                a / b for a, b in zip(ts, times["torch-iwae"]))
    return {"config": name, "data_shape": list(data_shape), "z_dim": z_dim, "net": net, "hidden": list(hidden),
            "batch": batch, "device": str(device), "clock": clock, "steps_per_rep": steps, "reps": reps,
            "results": rows, "failed": failed}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| device (clock) | config | contender | images/s (median) | min-max | x torch |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in results:
        for k, row in r["results"].items():
            lines.append(f"| {r['device']} ({r['clock']}) | {r['config']} | {k} | {row['images_per_s']:,.0f} | "
                         f"{row['images_per_s_min']:,.0f}-{row['images_per_s_max']:,.0f} | "
                         f"{row['ratio_to_torch']:.2f} |")
    return "\n".join(lines)


def summary(results: list[dict[str, Any]]) -> str:
    """One row per device and config: the hand-written step's images/s, then each contender's ratio to it."""
    names = [k for k in ("torch-again", "torch-graph", "fit-trace", "fit-meanfield", "graph-trace", "graph-meanfield",
                         "fit()-trace", "fit()-graph", "pyro-before", "pythae")
             if any(k in r["results"] for r in results)]
    iwae = any("fit-iwae" in r["results"] and "torch-iwae" in r["results"] for r in results)
    extra = ["torch-iwae images/s", "fit-iwae x torch-iwae"] if iwae else []
    header = ["device", "config", "torch images/s", *(f"{k} x" for k in names), *extra]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---", "---"] + ["---:"] * (len(header) - 2)) + " |"]
    for r in results:
        rows = r["results"]
        cells = [f"{rows[k]['ratio_to_torch']:.2f}" if k in rows else "-" for k in names]
        if iwae:
            have = "fit-iwae" in rows and "torch-iwae" in rows
            cells += [f"{rows['torch-iwae']['images_per_s']:,.0f}" if have else "-",
                      f"{rows['fit-iwae']['ratio_to_torch_iwae']:.2f}" if have else "-"]
        lines.append("| " + " | ".join([r["device"], r["config"], f"{rows['torch']['images_per_s']:,.0f}", *cells])
                     + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.45 * sum(len(r["results"]) for r in results) + 1))
    labels, vals, lo, hi = [], [], [], []
    for r in results:
        for k, row in r["results"].items():
            labels.append(f"{r['device']} {r['config']} {k}")
            vals.append(row["images_per_s"])
            lo.append(row["images_per_s"] - row["images_per_s_min"])
            hi.append(row["images_per_s_max"] - row["images_per_s"])
    y = list(range(len(labels)))[::-1]
    ax.barh(y, vals, xerr=[lo, hi], color=["C0" if "torch" in s else "C1" for s in labels])
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("training images / second (median, min-max over repetitions)")
    ax.set_title("VAE training throughput: hand-written PyTorch (blue) vs pyro-vae and others")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Any = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CPU, then CUDA when present), cpu or cuda")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "process"), default=None,
                        help="what the table ranks: wall-clock time, or the process's CPU time (the default on "
                             "CPU: robust to other jobs sharing the machine; use with --threads 1); both are kept")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: two configs, 3 reps of 5 steps")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--skip", nargs="*", default=[], help="contenders to leave out (e.g. pythae fit()-trace)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these contenders (and torch, the reference), e.g. torch-iwae fit-iwae")
    parser.add_argument("--tag", default=None, help="results file suffix (throughput_TAG.json)")
    parser.add_argument("--summary", metavar="JSON", default=None,
                        help="print the README summary table of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    if args.summary:
        report = json.loads(Path(args.summary).read_text())
        print(summary(report["results"]))
        return report
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only is not None:
        known = ["torch", "torch-again", "pyro-before", "fit-trace", "fit-meanfield", "fit()-trace", "torch-iwae",
                 "fit-iwae", "torch-graph", "fit()-graph", "graph-trace", "graph-meanfield", "pythae"]
        args.skip = [*args.skip, *(c for c in known if c not in args.only)]
    pyro.enable_validation(True)  # Pyro's default (__debug__); pyro-before pays for it on every step
    if args.quick:
        args.configs, args.reps, args.steps, args.warmup = [c for c in args.configs if c in QUICK], 3, 5, 2
    devices = [torch.device("cpu")]
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available() and not args.quick):
        devices = [torch.device("cuda")] if args.device == "cuda" else devices + [torch.device("cuda")]
    results = []
    for device in devices:
        for name in args.configs:
            print(f"{device} {name} ...", flush=True)
            clock = args.clock or ("process" if device.type == "cpu" else "wall")
            results.append(run_config(name, device, args.reps, args.steps, args.warmup, clock, args.skip))
    try:
        import importlib.metadata

        pythae_version: Any = importlib.metadata.version("pythae")
    except importlib.metadata.PackageNotFoundError:
        pythae_version = None
    report = {
        "benchmark": "throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": {str(d): device_name(d) for d in devices},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
                     "pyro_vae": pyro_vae.__version__, "pythae": pythae_version,
                     "cuda": torch.version.cuda if torch.cuda.is_available() else None},
        "lr": LR, "num_data": NUM_DATA, "quick": args.quick, "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if devices == [torch.device("cpu")] else "_" + "_".join(d.type for d in devices)
    suffix += f"_{args.tag}" if args.tag else ""
    (out / f"throughput{suffix}.json").write_text(json.dumps(report, indent=1))
    plot(results, out / f"throughput{suffix}.png")
    print(table(results))
    print(summary(results))
    print(f"wrote {out / f'throughput{suffix}.json'} and .png")
    return report


if __name__ == "__main__":
    main()
