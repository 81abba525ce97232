"""Training with each gradient estimator for the same wall-clock time: validation ELBO against seconds.

The digits VAE (8x8 digits, grey levels, continuous Bernoulli likelihood, MLP with 200 hidden units) is
trained from the same initialization and seed with each estimator by :func:`pyro_vae.fit` for ``--seconds``
of training time (validation is timed apart and not counted): wall-clock time on CUDA, the process's CPU time
on the CPU (``--clock``), so other jobs on a shared machine do not skew the comparison. After every epoch the
validation ELBO is measured with the same yardstick for all estimators: ``Trace_ELBO`` with 10 particles for the
Gaussian latents (8 dimensions), and the ELBO of the exact one-hot categorical for the categorical latents
(8 variables of 10 classes, temperature 0.5), so relaxed and straight-through runs are scored on the discrete
model they stand in for.

    python benchmarks/estimator_training.py --device auto                 # full run (60 s per estimator)
    python benchmarks/estimator_training.py --quick --out /tmp/et          # smoke run, under a minute

Writes ``estimator_training.json`` (curves, device, versions, date) and ``estimator_training.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

import pyro
import torch

import pyro_vae
from pyro_vae.infer import evaluate_elbo
from pyro_vae.infer.elbo import make_estimator_elbo
from pyro_vae.validation import resolve_device

RUNS = {
    "gaussian": [("pathwise", "pathwise", "trace"), ("pathwise-analytic-kl", "pathwise", "meanfield"),
                 ("score-function", "score-function", "trace"),
                 ("score-function-baseline", "score-function-baseline", "trace"),
                 ("score-function-neural-baseline", "score-function-neural-baseline", "trace")],
    "categorical": [("relaxed", "relaxed", "trace"), ("straight-through", "straight-through", "trace"),
                    ("score-function", "score-function", "trace"),
                    ("score-function-baseline", "score-function-baseline", "trace")],
}


class Clock:
    """Stops training after ``budget`` seconds of training time; evaluates after every epoch, untimed.
    ``clock="process"`` counts this process's CPU time (robust to other jobs on a shared CPU)."""

    def __init__(self, budget: float, evaluate, clock: str = "wall") -> None:
        self.budget, self.evaluate = budget, evaluate
        self.now = time.perf_counter if clock == "wall" else time.process_time
        self.train_seconds, self.curve = 0.0, []
        self.start = self.now()

    def on_epoch_end(self, state) -> None:
        if state.vae.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_seconds += self.now() - self.start
        self.curve.append({"seconds": self.train_seconds, "step": state.step, "epoch": state.epoch,
                           "val_elbo": self.evaluate(state.vae)})
        state.stop = self.train_seconds >= self.budget
        self.start = self.now()


def build(latent: str, seed: int) -> pyro_vae.VAE:
    pyro.clear_param_store()
    torch.manual_seed(seed)
    if latent == "gaussian":
        return pyro_vae.VAE((64,), 8, likelihood="continuous-bernoulli", hidden=(200,))
    return pyro_vae.VAE((64,), 8, latent="categorical", categories=10, likelihood="continuous-bernoulli",
                        hidden=(200,), temperature=0.5)


def run(latent: str, label: str, estimator: str, elbo: str, splits, device: torch.device,
        args: argparse.Namespace) -> dict[str, Any]:
    vae = build(latent, args.seed)
    val = splits.val.x.flatten(1).to(device)
    yardstick = make_estimator_elbo("score-function", "trace", 10) if latent == "categorical" else "trace"

    def evaluate(v) -> float:
        v.eval()
        with torch.no_grad():
            out = evaluate_elbo(v, val, elbo=yardstick, num_particles=10)
        v.train()
        return out

    clock = Clock(args.seconds, evaluate, args.clock)
    pyro_vae.fit(vae, splits.train.x.flatten(1), estimator=estimator, elbo=elbo, epochs=10**6,
                 batch_size=args.batch_size, lr=args.lr, device=device, progress=False, seed=args.seed,
                 callbacks=[clock])
    best = max(c["val_elbo"] for c in clock.curve)
    return {"latent": latent, "estimator": label, "estimator_name": estimator, "elbo": elbo, "curve": clock.curve,
            "final_val_elbo": clock.curve[-1]["val_elbo"], "best_val_elbo": best,
            "steps": clock.curve[-1]["step"], "train_seconds": clock.train_seconds}


def plot(results: list[dict[str, Any]], path: Path, title: str, clock: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latents = list(dict.fromkeys(r["latent"] for r in results))
    fig, axes = plt.subplots(1, len(latents), figsize=(6 * len(latents), 4), squeeze=False)
    for ax, latent in zip(axes[0], latents):
        for r in (r for r in results if r["latent"] == latent):
            ax.plot([c["seconds"] for c in r["curve"]], [c["val_elbo"] for c in r["curve"]], label=r["estimator"])
        ax.set_xlabel(f"training seconds ({clock} clock)")
        ax.set_ylabel("validation ELBO (nats per data point)")
        ax.set_title(f"digits, {latent} latents", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Any = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 seconds per estimator")
    p.add_argument("--seconds", type=float, default=None, help="training seconds per estimator (default 60)")
    p.add_argument("--latents", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", default=None, choices=("wall", "process"),
                   help="wall-clock time, or this process's CPU time (default: wall on CUDA, process on CPU, "
                        "where other jobs share the cores)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (3.0 if args.quick else 60.0)
    device = resolve_device(args.device)
    args.clock = args.clock or ("wall" if device.type == "cuda" else "process")
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = pyro_vae.data.load("digits", seed=args.seed)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "pyro": pyro.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    # One untimed epoch first, so the first estimator does not pay the process's one-off start-up costs.
    pyro_vae.fit(build("gaussian", args.seed), splits.train.x.flatten(1), epochs=1, device=device, progress=False)
    results = []
    for latent in args.latents:
        for label, estimator, elbo in RUNS[latent]:
            r = run(latent, label, estimator, elbo, splits, device, args)
            results.append(r)
            print(f"{latent:12} {label:32} steps {r['steps']:6d}  final val ELBO {r['final_val_elbo']:9.3f}  "
                  f"best {r['best_val_elbo']:9.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**meta, "args": vars(args), "results": results}
    (out / "estimator_training.json").write_text(json.dumps(report, indent=1, default=str))
    plot(results, out / "estimator_training.png",
         f"{args.seconds:g} s ({args.clock} clock) of training per estimator, {meta['device']}, torch {meta['torch']}, "
         f"pyro {meta['pyro']}, {meta['date'][:10]}", args.clock)
    print(f"device: {meta['device']}")
    print(f"wrote {out / 'estimator_training.json'} and {out / 'estimator_training.png'}")
    return report


if __name__ == "__main__":
    main()
