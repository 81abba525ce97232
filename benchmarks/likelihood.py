"""Test log-likelihood on dynamically binarized MNIST, beside the published numbers.

Trains one VAE with :func:`pyro_vae.fit` (Adam, the training images re-binarized every batch, Burda et al.
2016), then estimates the test log-likelihood ``log p(x)`` with ``K`` importance samples
(:func:`pyro_vae.log_likelihood`, the IWAE bound at ``K``) and its standard error over test points, and the
test ELBO. Published numbers, same protocol (one stochastic layer, K = 5000):

- VAE -86.76, IWAE (k=50) -84.78 nats (Burda et al. 2016, Table 1; 784-200-200-50, tanh, 3280 epochs);
- Pythae's VAE reproduction (784-400-40): -89.78;
- categorical VAE (20 x 10, Gumbel-softmax): negative ELBO 101.5 (Jang et al. 2017, Table 1).

    # reduced-budget CPU run (about 25 minutes on one core; likelihood_cpu.json: 611 s training, 919 s evaluation)
    python benchmarks/likelihood.py --device cpu --threads 1 --time-budget 600 --eval-points 1000 --tag cpu
    # GPU: all 60,000 training images, Burda et al.'s schedule scaled to 2000 epochs, fit(cuda_graph=True)
    python benchmarks/likelihood.py --device cuda --data-dir .mnist --full-train --lr-schedule burda \
        --epochs 2000 --time-budget 525 --tag gpu
    # the same networks with a VampPrior of 500 pseudo-inputs
    python benchmarks/likelihood.py --device cuda --data-dir .mnist --full-train --lr-schedule burda \
        --prior vamp --components 500 --epochs 1400 --time-budget 525 --tag gpu-vamp
    # smoke run (tiny IDX files work too)
    python benchmarks/likelihood.py --quick --out /tmp/ll
    # trained on the IWAE bound (Burda et al.'s k = 50), optionally with the DReG encoder gradient
    python benchmarks/likelihood.py --objective iwae --k 50 --estimator dreg --device cuda --tag gpu-iwae
    # the same on scikit-learn's 8x8 digits (embedded, no download), a reduced CPU budget
    python benchmarks/likelihood.py --data digits --objective iwae --k 50 --device cpu --threads 4 \
        --arch burda --time-budget 300 --eval-k 1000 --tag digits-iwae
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import pyro
import torch

import pyro_vae

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {
    "gaussian": [
        {"name": "VAE (Burda et al. 2016)", "log_likelihood": -86.76, "architecture": "784-200-200-50"},
        {"name": "IWAE k=50 (Burda et al. 2016)", "log_likelihood": -84.78, "architecture": "784-200-200-50"},
        {"name": "Pythae VAE", "log_likelihood": -89.78, "architecture": "784-400-40"},
    ],
    "categorical": [
        {"name": "Gumbel-softmax (Jang et al. 2017)", "neg_elbo": 101.5, "architecture": "784-512-256-(20x10)"},
    ],
}
ARCHS = {  # name: (hidden, z_dim)
    "burda": ((200, 200), 50),
    "pythae": ((400,), 40),
    "jang": ((512, 256), 20),
}


def default_data_dir() -> str:
    for cand in (ROOT / ".mnist", Path("/work/shared/data/mnist"), ROOT.parent / "shared" / "data" / "mnist"):
        if cand.exists():
            return str(cand)
    return str(ROOT / ".mnist")


class TimeBudget:
    """Stops training at the end of the first epoch that ends after ``seconds`` of training."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.start = seconds, None

    def on_fit_start(self, state: Any) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, state: Any) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        if self.seconds is not None and time.perf_counter() - self.start >= self.seconds:
            state.stop = True


class BurdaSchedule:
    """Burda et al.'s (2016) learning-rate schedule, its 3280 epochs scaled to ``epochs``: stage ``i = 0..7``
    lasts ``3^i / 3280`` of the run at ``lr * 10^(-i/7)``. Sets the rate at fit start and at every epoch end."""

    def __init__(self, lr: float, epochs: int) -> None:
        self.lr, self.epochs = lr, epochs
        ends, total = [], 0
        for i in range(8):
            total += 3 ** i
            ends.append(total / 3280 * epochs)
        self.ends = ends

    def value(self, epoch: int) -> float:
        """The rate of (1-based) ``epoch``."""
        stage = next((i for i, end in enumerate(self.ends) if epoch <= end), 7)
        return self.lr * 10 ** (-stage / 7)

    def _set(self, state: Any, epoch: int) -> None:
        for g in state.optimizer.param_groups:
            g["lr"] = self.value(epoch)

    def on_fit_start(self, state: Any) -> None:
        self._set(state, state.epoch + 1)

    def on_epoch_end(self, state: Any) -> None:
        self._set(state, state.epoch + 1)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    hist = report["history"]
    a.plot([h["epoch"] for h in hist], [h["train_elbo"] for h in hist], label="train ELBO (dynamic binarization)")
    if report["test"].get("log_likelihood") is not None:
        a.axhline(report["test"]["log_likelihood"], color="C1", ls="--", label=f"test log p(x), K={report['k']}")
    a.set_xlabel("epoch")
    a.set_ylabel("nats per image")
    a.legend()
    prior = report.get("prior", "normal")
    prior_text = f", {prior} prior" if report["latent"] == "gaussian" and prior != "normal" else ""
    a.set_title(f"{report['latent']} VAE {report['architecture']}{prior_text} on {report['device']}", fontsize=10)
    names, vals, errs = [], [], []
    key = "log_likelihood" if report["latent"] == "gaussian" else "neg_elbo"
    for p in report["published"]:
        names.append(p["name"])
        vals.append(p[key])
        errs.append(0.0)
    trained = f", IWAE k={report['train_k']}, {report['estimator']}" if report.get("objective") == "iwae" else ""
    names.append(f"pyro-vae{prior_text}{trained} ({report['epochs_run']} epochs)")
    vals.append(report["test"][key])
    errs.append(report["test"].get(key + "_se", 0.0) or 0.0)
    y = list(range(len(names)))[::-1]
    b.errorbar(vals, y, xerr=errs, fmt="o")
    b.set_yticks(y, names, fontsize=8)
    b.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    b.set_xlabel("test log p(x) (nats)" if key == "log_likelihood" else "test negative ELBO (nats)")
    b.set_title(report["data"].split(",")[0] + ", dynamically binarized")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Any = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("mnist", "digits"), default="mnist",
                        help="mnist (from --data-dir), or scikit-learn's 8x8 digits (embedded; no published numbers)")
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="folder with the four MNIST IDX files or a torchvision root")
    parser.add_argument("--latent", choices=("gaussian", "categorical"), default="gaussian")
    parser.add_argument("--arch", choices=list(ARCHS), default=None,
                        help="burda (default for gaussian), pythae, jang (default for categorical)")
    parser.add_argument("--objective", choices=("elbo", "iwae"), default="elbo",
                        help="elbo: the ELBO (--elbo, --particles); iwae: the importance-weighted bound with --k "
                             "importance samples per image (Burda et al. 2016)")
    parser.add_argument("--elbo", choices=("trace", "meanfield"), default="meanfield", help="--objective elbo")
    parser.add_argument("--particles", type=int, default=1, help="--objective elbo: particles per step")
    parser.add_argument("--k", type=int, default=None, help="--objective iwae: importance samples (default 50)")
    parser.add_argument("--estimator", default="pathwise",
                        help="gradient estimator (pyro_vae.infer.estimators.ESTIMATORS): pathwise, dreg (with "
                             "--objective iwae), stl (with --objective elbo), ...")
    parser.add_argument("--epochs", type=int, default=3280, help="upper bound; --time-budget usually ends it")
    parser.add_argument("--time-budget", type=float, default=None, help="training seconds (checked per epoch)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-k", type=int, default=5000, help="importance samples per test point")
    parser.add_argument("--eval-points", type=int, default=None, help="first N test points (default: all)")
    parser.add_argument("--eval-batch", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="fit(cuda_graph=True); default: on CUDA for a Gaussian latent")
    parser.add_argument("--full-train", action="store_true",
                        help="train on all 60,000 training images (train + validation split), as Burda et al.")
    parser.add_argument("--lr-schedule", choices=("constant", "burda"), default="constant",
                        help="burda: Burda et al.'s 8 stages scaled to --epochs")
    parser.add_argument("--prior", default="normal", help='"normal", or e.g. "vamp" (see --components)')
    parser.add_argument("--components", type=int, default=None, help="mixture / VampPrior components")
    parser.add_argument("--checkpoint-dir", default=None, help="checkpoint here (and resume from it if present)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch on 2000 images, K=50, 200 points")
    parser.add_argument("--tag", default=None, help="results file suffix (likelihood_TAG.json)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.objective == "elbo" and args.k is not None:
        parser.error("--k is the IWAE bound's importance samples: pass --objective iwae (test K: --eval-k)")
    if args.objective == "iwae":
        args.k = 50 if args.k is None else args.k
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = args.arch or ("burda" if args.latent == "gaussian" else "jang")
    hidden, z_dim = ARCHS[arch]
    device = pyro_vae.validation.resolve_device(args.device)

    splits = pyro_vae.data.load(args.data, args.data_dir if args.data == "mnist" else None, binarize_mode="dynamic",
                                seed=args.seed)
    train, test = splits.train.x.flatten(1), splits.test.x.flatten(1)
    if args.full_train:
        train = torch.cat([train, splits.val.x.flatten(1)])
    if args.quick:
        train, args.epochs, args.eval_k, args.eval_points = train[:2000], 1, 50, 200
    if args.eval_points:
        test = test[: args.eval_points]

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    kwargs: dict[str, Any] = {"hidden": hidden}
    callbacks: list[Any] = [TimeBudget(args.time_budget)]
    if args.latent == "categorical":
        kwargs.update(latent="categorical", categories=10)
        from pyro_vae.schedules import ExponentialTemperature

        callbacks.append(ExponentialTemperature(initial=1.0, rate=3e-5, minimum=0.5, every=1000))
    if args.latent == "gaussian":
        kwargs["prior"] = {"name": args.prior, **({"components": args.components} if args.components else {})}
    if args.lr_schedule == "burda":
        callbacks.append(BurdaSchedule(args.lr, args.epochs))
    if args.cuda_graph is None:
        args.cuda_graph = device.type == "cuda" and args.latent == "gaussian" and args.objective == "elbo"
    vae = pyro_vae.VAE((train.shape[1],), z_dim, likelihood="bernoulli", **kwargs)
    resume = None
    if args.checkpoint_dir and (Path(args.checkpoint_dir) / "checkpoint.pt").exists():
        resume = args.checkpoint_dir
    t0 = time.perf_counter()
    iwae = args.objective == "iwae"
    epochs = pyro_vae.fit(vae, train, elbo="iwae" if iwae else args.elbo,
                          num_particles=args.k if iwae else args.particles, estimator=args.estimator,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=device, seed=args.seed,
                          callbacks=callbacks, dynamic_binarize=True, progress=False,
                          checkpoint_dir=args.checkpoint_dir, resume_from=resume, cuda_graph=args.cuda_graph).epochs
    call_seconds = time.perf_counter() - t0
    # every epoch's training time, those of earlier calls of a resumed run included (the history is checkpointed)
    train_seconds = float(sum(e["seconds"] for e in epochs)) if resume else call_seconds
    epochs_run = epochs[-1]["epoch"] if epochs else 0
    print(f"trained {epochs_run} epochs in {train_seconds:.0f} s; train ELBO {epochs[-1]['train_elbo']:.2f}",
          flush=True)

    t0 = time.perf_counter()
    vae.eval()
    test_dev = test.to(device)
    ll = pyro_vae.log_likelihood(vae, test_dev, num_samples=args.eval_k,
                                 batch_size=args.eval_batch or (1000 if device.type == "cuda" else 100))
    result: dict[str, Any] = ll.to_dict()
    elbo_pp = ll.elbo_per_point  # each point's ELBO averaged over the same K samples
    test_elbo = float(elbo_pp.mean())
    result["neg_elbo"] = -test_elbo
    result["neg_elbo_se"] = float(elbo_pp.std() / math.sqrt(len(elbo_pp))) if len(elbo_pp) > 1 else math.nan
    eval_seconds = time.perf_counter() - t0
    print(f"test log p(x) = {result['log_likelihood']:.2f} +- {result['log_likelihood_se']:.2f} (K={args.eval_k}, "
          f"{len(test)} points, {eval_seconds:.0f} s); test ELBO {test_elbo:.2f}", flush=True)

    report = {
        "benchmark": "likelihood",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
                     "pyro_vae": pyro_vae.__version__},
        "data": f"{'MNIST' if args.data == 'mnist' else 'scikit-learn 8x8 digits'}, training images dynamically "
                "binarized every batch, test images binarized once (seeded)",
        "num_train": len(train), "latent": args.latent,
        "architecture": f"{train.shape[1]}-{'-'.join(map(str, hidden))}-"
        + (f"{z_dim}" if args.latent == "gaussian" else f"({z_dim}x10)"),
        "activation": "softplus", "objective": args.objective,
        "elbo": None if iwae else args.elbo, "particles": None if iwae else args.particles,
        "train_k": args.k, "estimator": args.estimator, "batch_size": args.batch_size,
        "lr": args.lr, "optimizer": "Adam", "seed": args.seed, "epochs_run": epochs_run,
        "time_budget_s": args.time_budget, "train_seconds": train_seconds, "train_seconds_this_call": call_seconds,
        "resumed": resume is not None, "eval_seconds": eval_seconds,
        "k": args.eval_k, "quick": args.quick,
        "reduced_budget": bool(args.quick or args.time_budget or args.eval_points),
        "cuda_graph": args.cuda_graph, "prior": args.prior if args.latent == "gaussian" else "relaxed categorical",
        "components": args.components, "lr_schedule": args.lr_schedule, "epochs_planned": args.epochs,
        "test": result, "published": PUBLISHED[args.latent] if args.data == "mnist" else [], "history": epochs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "likelihood" + (f"_{args.latent}" if args.latent != "gaussian" else "")
    name += f"_{args.tag}" if args.tag else ""
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=float))
    plot(report, out / f"{name}.png")
    print(f"wrote {out / name}.json and .png")
    return report


if __name__ == "__main__":
    main()
