"""Gradient estimators side by side with the published tables: RELAX's sigmoid belief nets, the variance of every
estimator along one training trajectory, Jang et al.'s categorical VAE, and pathwise / STL / DReG at K samples.

Four parts (``--part``), each trained by :func:`pyro_vae.train.step.svi_step` (Adam, the estimator's learned
modules trained with the VAE, as :func:`pyro_vae.fit` does) for the same number of steps per estimator
(``--steps``; ``--time-budget`` caps the training seconds of each run in one call, and a later call with the same
``--checkpoint-dir`` continues the runs that stopped short), from the same initialization and seed:

1. ``relax-table``: RELAX Table 1, MNIST rows (Grathwohl et al. 2018): one-layer sigmoid belief nets with 200
   Bernoulli latents and a learned prior, linear (784-200) and nonlinear (2 x 200 tanh in the encoder and the
   decoder), trained with Concrete (the binary relaxation, ``relaxed``), NVIL, MuProp, REBAR and RELAX (the
   paper's columns) and RLOO, ARM, DisARM and VIMCO (K = 2 and 8 for the multi-sample ones). The training ELBO
   of the exact Bernoulli model (also for the Concrete run) on a fixed set of training points is recorded against
   steps, training seconds and model evaluations (an estimator's evaluations per step: REBAR and RELAX 3, MuProp 3,
   ARM and DisARM 2, RLOO and VIMCO K, the others 1).
2. ``variance``: while one reference estimator (``--reference``, REBAR by default) trains the linear belief net,
   every ``--variance-every`` steps each estimator's gradient on one fixed batch of 24 training points is sampled
   at the same parameters (:func:`pyro_vae.infer.variance.gradient_statistics`, ``--variance-samples`` estimates):
   the mean per-coordinate variance and SNR of the encoder's gradient, and variance x model evaluations per
   estimate (equal-work comparison). The learned modules of NVIL, MuProp, REBAR and RELAX are trained along the
   trajectory on their own variance objectives (the VAE's parameters are moved by the reference only).
3. ``categorical``: Jang et al. 2017's categorical VAE, 20 variables of 10 classes, 784-512-256 softplus networks,
   temperature 1: score function, RLOO (K = 2), straight-through, Gumbel-softmax (``relaxed``) and Gumbel-Rao; the
   negative ELBO of the exact one-hot model on test points. REBAR and RELAX are not run: the library applies them to
   Bernoulli sites only (their control variate would be biased on a one-hot categorical).
4. ``continuous``: the Gaussian VAE of Tucker et al. 2019 (50 latents, 2 x 200 tanh): the IWAE bound's own
   gradient (``pathwise``), DReG (both on the K-sample bound) and STL (on the K-particle ELBO, the objective the
   library applies it to) at K in {1, 8, 64}: test ELBO, test bound at ``--eval-k`` samples, and the encoder
   gradient's SNR on a fixed batch along training.

    # smoke run (CPU, digits, well under two minutes)
    python benchmarks/estimators.py --quick --out /tmp/est
    # reduced CPU run on MNIST, one thread (the committed estimators_cpu.*, about half an hour)
    python benchmarks/estimators.py --data mnist --device cpu --threads 1 --steps 800 --eval-k 500 --tag cpu \\
        --checkpoint-dir /tmp/est_cpu
    # GPU: one part per call, repeated to continue (a run of --steps steps is read back, a shorter one resumed)
    python benchmarks/estimators.py --data mnist --device auto --steps 100000 --eval-every 1000 --tag gpu \\
        --checkpoint-dir /tmp/est_gpu --part relax-table --time-budget 20

Writes ``estimators[_TAG].json`` (every curve and record, the device, versions, date, budget and seeds; a run with
``--part`` other than ``all`` replaces only its parts in an existing file), ``estimators[_TAG]_*.png`` and
``estimators[_TAG].md`` (the tables of the docs page, generated from the JSON by :func:`tables`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import textwrap
import time
from pathlib import Path
from typing import Any

import pyro
import torch

import pyro_vae
from pyro_vae.infer.elbo import evaluate_elbo, make_elbo, make_estimator_elbo
from pyro_vae.infer.estimators import ESTIMATORS
from pyro_vae.infer.site_gradients import evaluations
from pyro_vae.infer.variance import gradient_statistics
from pyro_vae.train.step import svi_step
from pyro_vae.validation import resolve_device

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("relax-table", "variance", "categorical", "continuous")
#: RELAX Table 1 (Grathwohl et al. 2018), highest training ELBO, binarized MNIST, 2,000,000 iterations, batch 24.
PAPER_RELAX = {
    "linear": {"concrete": -111.3, "nvil": -112.5, "muprop": -111.7, "rebar": -111.6, "relax": -111.20},
    "nonlinear": {"concrete": -102.2, "nvil": -101.5, "muprop": -101.1, "rebar": -81.01, "relax": -78.13},
}
PAPER_ITERATIONS = 2_000_000
#: Jang et al. 2017, Table 1: negative ELBO of the 20 x 10 categorical VAE on binarized MNIST.
PAPER_JANG = {"score-function": 110.6, "straight-through": 110.9, "gumbel-softmax": 101.5}
# label: (estimator, elbo, K, relaxed Bernoulli latent)
SBN_RUNS: dict[str, tuple[str, str, int, bool]] = {
    "concrete": ("relaxed", "trace", 1, True), "nvil": ("nvil", "trace", 1, False),
    "muprop": ("muprop", "trace", 1, False), "rebar": ("rebar", "trace", 1, False),
    "relax": ("relax", "trace", 1, False), "rloo-K2": ("rloo", "trace", 2, False),
    "rloo-K8": ("rloo", "trace", 8, False), "arm": ("arm", "trace", 1, False),
    "disarm": ("disarm", "trace", 1, False), "vimco-K2": ("vimco", "iwae", 2, False),
    "vimco-K8": ("vimco", "iwae", 8, False),
}
VARIANCE_RUNS = {"score-function": ("score-function", "trace", 1, False), **SBN_RUNS}
CATEGORICAL_RUNS: dict[str, tuple[str, str, int]] = {
    "score-function": ("score-function", "trace", 1), "rloo-K2": ("rloo", "trace", 2),
    "straight-through": ("straight-through", "trace", 1), "gumbel-softmax": ("relaxed", "trace", 1),
    "gumbel-rao": ("gumbel-rao", "trace", 1),
}
CONTINUOUS_ESTIMATORS = {"iwae-pathwise": ("pathwise", "iwae"), "stl": ("stl", "trace"), "dreg": ("dreg", "iwae")}
BATCH = 24


def cost(estimator: str, k: int, event_size: int) -> int:
    """Model evaluations per gradient estimate: the per-site estimators' own count
    (:func:`pyro_vae.infer.site_gradients.evaluations`) per particle, one per particle for the others."""
    est = ESTIMATORS[estimator]
    return (evaluations(est, event_size) if est.site_gradient is not None else 1) * k


# ------------------------------------------------------------------------------------------------- models
def sbn(net: str, data_dim: int, relaxed: bool, seed: int, name: str = "") -> pyro_vae.VAE:
    """A sigmoid belief net of RELAX Table 1: 200 Bernoulli latents, learned prior, ``net`` networks."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return pyro_vae.VAE((data_dim,), 200, latent="bernoulli", prior="bernoulli-learned", encoder=net, decoder=net,
                        relaxed=relaxed, name=name)


def categorical_vae(data_dim: int, seed: int) -> pyro_vae.VAE:
    """Jang et al. 2017's categorical VAE: 20 variables of 10 classes, 512-256 networks, temperature 1."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return pyro_vae.VAE((data_dim,), 20, latent="categorical", categories=10, hidden=(512, 256), temperature=1.0)


def gaussian_vae(data_dim: int, seed: int) -> pyro_vae.VAE:
    """Tucker et al. 2019's VAE: 50 Gaussian latents, 2 x 200 tanh networks."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    return pyro_vae.VAE((data_dim,), 50, encoder="nonlinear", decoder="nonlinear")


def exact_elbo(vae: pyro_vae.VAE, x: torch.Tensor, particles: int) -> float:
    """ELBO (nats per data point) of the exact discrete model (a relaxed VAE is scored as its exact Bernoulli or
    one-hot categorical, as the score-function estimators see it)."""
    vae.eval()
    with torch.no_grad():
        out = evaluate_elbo(vae, x, elbo=make_estimator_elbo("score-function", "trace", particles),
                            num_particles=particles)
    vae.train()
    return out


# ------------------------------------------------------------------------------------------------ training
class Run:
    """One training run, checkpointed to ``ckpt_dir/KEY.pt`` and, at the end of each call, ``KEY.json``: a
    later call reads a run of ``--steps`` steps back from its JSON and resumes a shorter one from its ``.pt``."""

    def __init__(self, key: str, vae: pyro_vae.VAE, estimator: str, elbo: str, k: int, x: torch.Tensor,
                 args: argparse.Namespace, device: torch.device) -> None:
        self.key, self.vae, self.estimator, self.elbo, self.k = key, vae.to(device), estimator, elbo, k
        self.x, self.args, self.device = x, args, device
        self.loss_fn = make_elbo(elbo, k, estimator, vae.data_shape)
        self.extra = [m.to(device) for m in getattr(self.loss_fn, "extra_modules", list)()]
        self.params = [*vae.parameters(), *(p for m in self.extra for p in m.parameters())]
        self.optimizer = torch.optim.Adam(self.params, lr=args.lr)
        self.step, self.seconds, self.curve = 0, 0.0, []
        self.state: dict[str, Any] = {}
        self.ckpt = Path(args.checkpoint_dir) / f"{key}.pt" if args.checkpoint_dir else None

    def save(self) -> None:
        if self.ckpt is None:
            return
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"vae": self.vae.state_dict(), "extra": [m.state_dict() for m in self.extra],
                    "optimizer": self.optimizer.state_dict(), "step": self.step, "seconds": self.seconds,
                    "curve": self.curve, "state": self.state, "rng": torch.get_rng_state()}, self.ckpt)

    def resume(self) -> bool:
        if self.ckpt is None or not self.ckpt.exists():
            return False
        payload = torch.load(self.ckpt, map_location=self.device, weights_only=False)
        self.vae.load_state_dict(payload["vae"])
        for m, sd in zip(self.extra, payload["extra"], strict=True):
            m.load_state_dict(sd)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step, self.seconds, self.curve = payload["step"], payload["seconds"], payload["curve"]
        self.state = payload["state"]
        torch.set_rng_state(payload["rng"].cpu())
        print(f"  resumed {self.key} at step {self.step}", flush=True)
        return True

    def batch(self) -> torch.Tensor:
        n = self.x.shape[0]
        per_epoch = max(n // BATCH, 1)
        epoch, i = divmod(self.step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + epoch))
        return self.x[perm[i * BATCH:(i + 1) * BATCH].to(self.x.device)]

    def train(self, evaluate, every: int, hook=None) -> None:
        """Train to ``--steps``, or for ``--time-budget`` seconds in this call; ``evaluate(vae) -> dict``
        (untimed) every ``every`` steps and at the end; ``hook(run)`` (untimed) before each step."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        n = self.x.shape[0]
        if not self.curve:
            self.curve.append({"step": 0, "seconds": 0.0, **evaluate(self.vae)})
        last_save = time.perf_counter()
        budget = math.inf if self.args.time_budget is None else self.args.time_budget
        first, session = True, 0.0
        while self.step < self.args.steps and session < budget:
            if hook is not None:
                hook(self)
            xb = self.batch()
            sync()
            start = time.perf_counter()
            svi_step(self.loss_fn, self.vae, xb, n, self.optimizer, self.params, validate=first)
            first = False
            sync()
            session += time.perf_counter() - start
            self.seconds += time.perf_counter() - start
            self.step += 1
            if self.step % every == 0:
                self.curve.append({"step": self.step, "seconds": self.seconds, **evaluate(self.vae)})
            if time.perf_counter() - last_save > 60:
                self.save()
                last_save = time.perf_counter()
        if self.curve[-1]["step"] != self.step:
            self.curve.append({"step": self.step, "seconds": self.seconds, **evaluate(self.vae)})
        self.save()


def finished(args: argparse.Namespace, key: str) -> dict[str, Any] | None:
    path = Path(args.checkpoint_dir) / f"{key}.json" if args.checkpoint_dir else None
    if path is not None and path.exists():
        result = json.loads(path.read_text())
        if result["steps"] >= args.steps:
            print(f"  {key}: read back from {path}", flush=True)
            return result
    return None


def record(args: argparse.Namespace, key: str, result: dict[str, Any]) -> dict[str, Any]:
    if args.checkpoint_dir:
        (Path(args.checkpoint_dir) / f"{key}.json").write_text(json.dumps(result, default=str))
    return result


# ------------------------------------------------------------------------------------------------- parts
def relax_table(data: dict[str, torch.Tensor], args, device) -> dict[str, Any]:
    x, x_eval, x_test = data["train"], data["train_eval"], data["test"]
    results = []
    for net in args.nets:
        for label, (est, elbo, k, relaxed) in SBN_RUNS.items():
            key = f"relax-table_{net}_{label}"
            r = finished(args, key)
            if r is None:
                run = Run(key, sbn(net, x.shape[1], relaxed, args.seed), est, elbo, k, x, args, device)
                run.resume()
                run.train(lambda v: {"train_elbo": exact_elbo(v, x_eval, args.eval_particles)}, args.eval_every)
                evals = cost(est, k, 200)
                r = record(args, key, {
                    "model": net, "estimator": label, "estimator_name": est, "elbo": elbo, "K": k,
                    "evaluations_per_step": evals, "steps": run.step, "train_seconds": run.seconds,
                    "curve": [{**c, "evaluations": c["step"] * evals} for c in run.curve],
                    "best_train_elbo": max(c["train_elbo"] for c in run.curve),
                    "final_train_elbo": run.curve[-1]["train_elbo"],
                    "test_elbo": exact_elbo(run.vae, x_test, args.eval_particles),
                    "paper_train_elbo": PAPER_RELAX[net].get(label)})
            results.append(r)
            print(f"  {r['model']:9} {r['estimator']:10} steps {r['steps']:6d} ({r['train_seconds']:6.1f} s, "
                  f"{r['evaluations_per_step']} evals/step)  best train ELBO {r['best_train_elbo']:9.2f}  "
                  f"paper {r['paper_train_elbo']}", flush=True)
    return {"results": results, "train_eval_points": x_eval.shape[0], "test_points": x_test.shape[0]}


def variance(data: dict[str, torch.Tensor], args, device) -> dict[str, Any]:
    x, x_eval = data["train"], data["train_eval"]
    xfix = x[:BATCH]
    key = f"variance_{args.reference}"
    r = finished(args, key)
    if r is not None:
        return r
    est, elbo, k, relaxed = VARIANCE_RUNS[args.reference]
    run = Run(key, sbn("linear", x.shape[1], relaxed, args.seed), est, elbo, k, x, args, device)
    # the learned modules of the other estimators, trained along the trajectory on their own objectives
    shadows: dict[str, tuple[Any, list[torch.nn.Module], torch.optim.Optimizer]] = {}
    for label, (e, el, kk, rel) in VARIANCE_RUNS.items():
        if label == args.reference or rel or e not in ("nvil", "muprop", "rebar", "relax"):
            continue
        fn = make_elbo(el, kk, e, run.vae.data_shape)
        mods = [m.to(device) for m in fn.extra_modules()]
        shadows[label] = (fn, mods, torch.optim.Adam([p for m in mods for p in m.parameters()], lr=args.lr))
    # the relaxed Bernoulli model, given the reference's values before each measurement
    twin = sbn("linear", x.shape[1], True, args.seed, name="relaxed").to(device)
    run.state.setdefault("records", [])
    if run.resume():
        for label, sd in run.state.get("shadows", {}).items():
            for m, s in zip(shadows[label][1], sd, strict=True):
                m.load_state_dict(s)

    scale = x.shape[0] / BATCH

    def hook(r: Run, final: bool = False) -> None:
        xb = r.batch()
        for fn, _, opt in shadows.values():
            opt.zero_grad(set_to_none=True)
            fn.loss_and_grads(r.vae.model, r.vae.guide, xb, num_data=x.shape[0])
            opt.step()
        r.optimizer.zero_grad(set_to_none=True)
        if (final or r.step % args.variance_every == 0) and not any(c["step"] == r.step for c in r.state["records"]):
            twin.load_state_dict(r.vae.state_dict())
            for label, (e, el, kk, rel) in VARIANCE_RUNS.items():
                module = (r.extra[0] if label == args.reference and r.extra else
                          shadows[label][1][0] if label in shadows else None)
                # the training step's loss (num_data = N): the learned parts of NVIL, MuProp, REBAR and RELAX are
                # trained on the cost at that scale; the variance is reported divided by (N / B)^2, in the units
                # of the gradient of the batch's own ELBO
                st = gradient_statistics(twin if rel else r.vae, xfix, e, args.variance_samples, num_particles=kk,
                                         elbo=el, nn_baseline=module, seed=args.seed + r.step,
                                         method="loop" if rel else "vectorized", num_data=x.shape[0])["encoder"]
                c = cost(e, kk, 200)
                v = st["mean_variance"] / scale ** 2
                r.state["records"].append({"step": r.step, "estimator": label, "estimator_name": e, "K": kk,
                                           "elbo": el, "num_data": x.shape[0], "encoder_variance": v,
                                           "encoder_snr": st["snr"], "evaluations": c,
                                           "variance_x_evaluations": v * c, "seconds": st["seconds"]})
            print(f"  variance at step {r.step}: " + ", ".join(
                f"{c['estimator']} {c['encoder_variance']:.3g}" for c in r.state["records"] if c["step"] == r.step),
                flush=True)
            r.state["shadows"] = {lab: [m.state_dict() for m in s[1]] for lab, s in shadows.items()}

    every = args.variance_every
    run.train(lambda v: {"train_elbo": exact_elbo(v, x_eval, args.eval_particles)}, every, hook)
    if not any(c["step"] == run.step for c in run.state["records"]):
        hook(run, final=True)  # the variances at the final parameters
    return record(args, key, {"model": "linear", "reference": args.reference, "batch_points": BATCH,
                              "samples_per_estimate": args.variance_samples, "every": every, "steps": run.step,
                              "train_seconds": run.seconds, "curve": run.curve, "records": run.state["records"]})


def categorical(data: dict[str, torch.Tensor], args, device) -> dict[str, Any]:
    x, x_test = data["train"], data["test"]
    results = []
    for label, (est, elbo, k) in CATEGORICAL_RUNS.items():
        key = f"categorical_{label}"
        r = finished(args, key)
        if r is None:
            run = Run(key, categorical_vae(x.shape[1], args.seed), est, elbo, k, x, args, device)
            run.resume()
            run.train(lambda v: {"test_neg_elbo": -exact_elbo(v, x_test, args.eval_particles)}, args.eval_every)
            evals = cost(est, k, 10)
            r = record(args, key, {
                "estimator": label, "estimator_name": est, "K": k, "evaluations_per_step": evals,
                "steps": run.step, "train_seconds": run.seconds,
                "curve": [{**c, "evaluations": c["step"] * evals} for c in run.curve],
                "final_test_neg_elbo": run.curve[-1]["test_neg_elbo"],
                "best_test_neg_elbo": min(c["test_neg_elbo"] for c in run.curve),
                "paper_neg_elbo": PAPER_JANG.get(label)})
        results.append(r)
        print(f"  categorical {r['estimator']:16} steps {r['steps']:6d} ({r['train_seconds']:6.1f} s)  "
              f"test -ELBO {r['final_test_neg_elbo']:8.2f}  paper {r['paper_neg_elbo']}", flush=True)
    return {"results": results, "test_points": x_test.shape[0], "temperature": 1.0,
            "not_run": {"rebar": "Bernoulli sites only in this library", "relax": "Bernoulli sites only"}}


def continuous(data: dict[str, torch.Tensor], args, device) -> dict[str, Any]:
    x, x_test = data["train"], data["test"]
    xfix = x[:BATCH]
    results = []
    for k in args.ks:
        for label, (est, elbo) in CONTINUOUS_ESTIMATORS.items():
            key = f"continuous_{label}_K{k}"
            r = finished(args, key)
            if r is None:
                run = Run(key, gaussian_vae(x.shape[1], args.seed), est, elbo, k, x, args, device)
                run.resume()

                def evaluate(v, est=est, elbo=elbo, k=k) -> dict[str, float]:
                    st = gradient_statistics(v, xfix, est, args.snr_samples, num_particles=k, elbo=elbo,
                                             seed=args.seed)["encoder"]
                    return {"encoder_snr": st["snr"], "encoder_variance": st["mean_variance"]}

                run.train(evaluate, args.snr_every)
                v = run.vae.eval()
                with torch.no_grad():
                    ll = pyro_vae.log_likelihood(v, x_test, num_samples=args.eval_k)
                r = record(args, key, {
                    "estimator": label, "estimator_name": est, "elbo": elbo, "K": k, "steps": run.step,
                    "train_seconds": run.seconds, "curve": run.curve, "test_elbo": float(ll.elbo),
                    "test_bound": float(ll.mean), "test_bound_se": float(ll.se), "eval_k": args.eval_k,
                    "final_encoder_snr": run.curve[-1]["encoder_snr"]})
            results.append(r)
            print(f"  continuous {r['estimator']:14} K={k:3d} steps {r['steps']:6d}  test ELBO {r['test_elbo']:8.2f}"
                  f"  bound(K={r['eval_k']}) {r['test_bound']:8.2f}  encoder SNR {r['final_encoder_snr']:.3f}",
                  flush=True)
    return {"results": results, "test_points": x_test.shape[0], "snr_batch_points": BATCH}


# ---------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LABELS = list(dict.fromkeys([*VARIANCE_RUNS, *CATEGORICAL_RUNS, *CONTINUOUS_ESTIMATORS]))


def style(label: str) -> dict[str, Any]:
    """One colour per estimator across the figures (matplotlib's tab20), dashed for the multi-sample runs."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](LABELS.index(label) % 20 if label in LABELS else 19),
            "linestyle": "--" if label.endswith("K8") else "-"}


def plot_relax_table(part: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    nets = list(dict.fromkeys(r["model"] for r in part["results"]))
    fig, axes = plt.subplots(len(nets), 3, figsize=(16, 4.2 * len(nets)), squeeze=False)
    for row, net in zip(axes, nets):
        for r in (r for r in part["results"] if r["model"] == net):
            for ax, xk in zip(row, ("step", "seconds", "evaluations")):
                ax.plot([c[xk] for c in r["curve"]], [c["train_elbo"] for c in r["curve"]], label=r["estimator"],
                        **style(r["estimator"]))
        for ax, xl in zip(row, ("training steps", "training seconds (wall clock)",
                                "model evaluations per data point (steps x evaluations per step)")):
            ax.set_xlabel(xl)
            ax.set_ylabel("training ELBO (nats per data point)")
            ax.set_title(f"{net} sigmoid belief net, 200 Bernoulli latents", fontsize=9)
            lo = min(c["train_elbo"] for r in part["results"] if r["model"] == net for c in r["curve"][1:]
                     ) if len(part["results"][0]["curve"]) > 1 else None
            if lo is not None:
                ax.set_ylim(bottom=lo - 5)
        row[0].legend(fontsize=7, ncol=2)
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_variance(part: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = list(dict.fromkeys(c["estimator"] for c in part["records"]))
    for label in labels:
        rs = [c for c in part["records"] if c["estimator"] == label]
        steps = [c["step"] for c in rs]
        axes[0].plot(steps, [math.log10(max(c["encoder_variance"], 1e-300)) for c in rs], marker=".", label=label,
                     **style(label))
        axes[1].plot(steps, [math.log10(max(c["variance_x_evaluations"], 1e-300)) for c in rs], marker=".",
                     label=label, **style(label))
    axes[0].set_ylabel("log10 encoder gradient variance (mean per coordinate)")
    axes[1].set_ylabel("log10 variance x model evaluations per estimate")
    for ax in axes:
        ax.set_xlabel(f"training steps of {part['reference']}")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_categorical(part: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in part["results"]:
        for ax, xk in zip(axes, ("step", "seconds")):
            ax.plot([c[xk] for c in r["curve"]], [c["test_neg_elbo"] for c in r["curve"]], label=r["estimator"],
                    **style(r["estimator"]))
    for ax, xl in zip(axes, ("training steps", "training seconds (wall clock)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("test negative ELBO (nats per data point)")
        ax.set_title("categorical VAE, 20 x 10", fontsize=9)
        top = max(c["test_neg_elbo"] for r in part["results"] for c in r["curve"][1:]) if len(
            part["results"][0]["curve"]) > 1 else None
        if top is not None:
            ax.set_ylim(top=top + 5)
    axes[0].legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_continuous(part: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    labels = list(dict.fromkeys(r["estimator"] for r in part["results"]))
    for label in labels:
        rs = sorted((r for r in part["results"] if r["estimator"] == label), key=lambda r: r["K"])
        ks = [r["K"] for r in rs]
        axes[0].plot(ks, [r["test_bound"] for r in rs], marker="o", label=label)
        axes[1].plot(ks, [r["final_encoder_snr"] for r in rs], marker="o", label=label)
        for r in rs:
            axes[2].plot([c["step"] for c in r["curve"]], [c["encoder_snr"] for c in r["curve"]],
                         label=f"{label} K={r['K']}")
    axes[0].set_ylabel(f"test bound at K = {part['results'][0]['eval_k']} (nats)")
    axes[1].set_ylabel("encoder SNR at the end of training")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (training samples)")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("training steps")
    axes[2].set_ylabel("encoder SNR")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=6, ncol=3)
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PLOTS = {"relax-table": plot_relax_table, "variance": plot_variance, "categorical": plot_categorical,
         "continuous": plot_continuous}


# ---------------------------------------------------------------------------------------------------- tables
def _f(v: Any, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _budget(meta: dict[str, Any]) -> str:
    a = meta["args"]
    limit = "no limit on the" if a["time_budget"] is None else f"{a['time_budget']:g} s of"
    return (f"{meta['data']}, {meta['device']}, torch {meta['torch']}, pyro {meta['pyro']}, pyro_vae "
            f"{meta['pyro_vae']}, {meta['date'][:10]}; at most {a['steps']} steps of batch {BATCH} and "
            f"{limit} training time per run, Adam {a['lr']:g}, seed {a['seed']}")


def tables(report: dict[str, Any]) -> str:
    """The docs page's tables, in Markdown, from a report (the JSON this script writes)."""
    out: list[str] = []
    parts = report["parts"]
    if "relax-table" in parts:
        p = parts["relax-table"]
        out += [f"**RELAX Table 1, MNIST rows** ({_budget(p)}; the paper: {PAPER_ITERATIONS:,} iterations). "
                f"Highest training ELBO of the exact model on {p['train_eval_points']} training points "
                "(nats per data point), beside the paper's:", "",
                "| model | estimator | K | evaluations / step | steps | seconds | best training ELBO | paper "
                "| test ELBO |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in p["results"]:
            out.append(f"| {r['model']} | {r['estimator']} | {r['K']} | {r['evaluations_per_step']} | {r['steps']} "
                       f"| {r['train_seconds']:.0f} | {_f(r['best_train_elbo'])} | {_f(r['paper_train_elbo'])} "
                       f"| {_f(r['test_elbo'])} |")
        out.append("")
    if "variance" in parts:
        p = parts["variance"]
        r = p["results"]
        last = max(c["step"] for c in r["records"])
        out += [f"**Same-trajectory variance** ({_budget(p)}): the linear belief net trained with `{r['reference']}` "
                f"for {r['steps']} steps; each estimator's encoder gradient of the training step's loss on one fixed "
                f"batch of {r['batch_points']} training points, {r['samples_per_estimate']} estimates at the "
                f"parameters of step {last}, the learned parts as trained"
                + ("" if "num_data" not in r["records"][-1] else
                   f" (num_data = {r['records'][-1]['num_data']}; the variance divided by "
                   f"(num_data / {r['batch_points']})^2, in the units of the gradient of the batch's own ELBO)")
                + ":", "",
                "| estimator | K | evaluations per estimate | encoder variance | encoder SNR "
                "| variance x evaluations |",
                "| --- | --- | --- | --- | --- | --- |"]
        for c in (c for c in r["records"] if c["step"] == last):
            out.append(f"| {c['estimator']} | {c['K']} | {c['evaluations']} | {c['encoder_variance']:.3g} "
                       f"| {c['encoder_snr']:.3f} | {c['variance_x_evaluations']:.3g} |")
        out.append("")
    if "categorical" in parts:
        p = parts["categorical"]
        out += [f"**Categorical VAE, 20 x 10** ({_budget(p)}): negative ELBO of the exact one-hot model on "
                f"{p['test_points']} test points (nats per data point), beside Jang et al. 2017's Table 1:", "",
                "| estimator | K | evaluations / step | steps | seconds | final test -ELBO | best test -ELBO | paper |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in p["results"]:
            out.append(f"| {r['estimator']} | {r['K']} | {r['evaluations_per_step']} | {r['steps']} "
                       f"| {r['train_seconds']:.0f} | {_f(r['final_test_neg_elbo'])} | {_f(r['best_test_neg_elbo'])} "
                       f"| {_f(r['paper_neg_elbo'], 1)} |")
        out.append("")
    if "continuous" in parts:
        p = parts["continuous"]
        k = p["results"][0]["eval_k"]
        out += [f"**Pathwise, STL and DReG** ({_budget(p)}): on {p['test_points']} test points, the ELBO and the "
                f"bound at K = {k} (nats per data point, standard error over points); the encoder gradient's SNR on "
                f"a fixed batch of {p['snr_batch_points']} training points at the end of training:", "",
                f"| estimator | objective | K | steps | seconds | test ELBO | test bound (K = {k}) | encoder SNR |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in p["results"]:
            obj = "IWAE bound" if r["elbo"] == "iwae" else "ELBO"
            out.append(f"| {r['estimator']} | {obj} | {r['K']} | {r['steps']} | {r['train_seconds']:.0f} "
                       f"| {_f(r['test_elbo'])} | {_f(r['test_bound'])} +- {_f(r['test_bound_se'])} "
                       f"| {r['final_encoder_snr']:.3f} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ main
def load_data(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    if args.data == "digits":
        splits = pyro_vae.data.load("digits", binarize_mode="static", seed=args.seed)
    else:
        splits = pyro_vae.data.load("mnist", args.data_dir, binarize_mode="static", seed=args.seed)
    train = splits.train.x.flatten(1)
    if args.train_points:
        train = train[:args.train_points]
    test = splits.test.x.flatten(1)[:args.eval_points]
    return {"train": train.to(device), "train_eval": train[:args.eval_points].to(device), "test": test.to(device)}


def main(argv: Any = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", nargs="+", default=["all"], choices=[*PARTS, "all"])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--data", default="mnist", choices=("mnist", "digits"))
    p.add_argument("--data-dir", default=None, help="folder of MNIST's IDX files (default: .mnist or "
                                                    "/work/shared/data/mnist)")
    p.add_argument("--quick", action="store_true", help="smoke run: digits, CPU-sized, well under two minutes")
    p.add_argument("--steps", type=int, default=2000, help="training steps per run (batch 24)")
    p.add_argument("--time-budget", type=float, default=None, help="training seconds per run in this call "
                                                                    "(evaluation not counted; default: no limit)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nets", nargs="+", default=["linear", "nonlinear"], choices=("linear", "nonlinear"))
    p.add_argument("--reference", default="rebar", choices=list(VARIANCE_RUNS), help="estimator that trains in "
                                                                                      "the variance part")
    p.add_argument("--variance-every", type=int, default=None, help="steps between variance measurements")
    p.add_argument("--variance-samples", type=int, default=200, help="gradient estimates per measurement")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 8, 64], help="K of the continuous part")
    p.add_argument("--snr-samples", type=int, default=100)
    p.add_argument("--snr-every", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="steps between ELBO evaluations")
    p.add_argument("--eval-points", type=int, default=1000, help="training points for the training ELBO and "
                                                                 "test points for the test numbers")
    p.add_argument("--eval-particles", type=int, default=10)
    p.add_argument("--eval-k", type=int, default=1000, help="importance samples of the continuous test bound")
    p.add_argument("--train-points", type=int, default=None, help="use the first N training points only")
    p.add_argument("--checkpoint-dir", default=None, help="save each run here; a rerun reads finished runs back "
                                                          "and resumes the unfinished one")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tag", default="", help="suffix of the output files")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    p.add_argument("--redraw", default=None, metavar="JSON", help="only redraw the figures and tables of a report "
                                                                  "this script wrote (next to it), no training")
    args = p.parse_args(argv)
    if args.redraw:
        return redraw(Path(args.redraw))
    if args.quick:
        args.device, args.data, args.threads = "cpu", "digits", args.threads or 1
        args.steps = min(args.steps, 30)
        args.eval_points, args.eval_particles, args.eval_k = 100, 2, 20
        args.variance_samples, args.snr_samples, args.ks = 8, 8, [1, 4]
        args.variance_every = args.variance_every or args.steps
        args.nets = ["linear"] if args.nets == ["linear", "nonlinear"] else args.nets
    args.eval_every = args.eval_every or max(args.steps // 10, 1)
    args.variance_every = args.variance_every or max(args.steps // 5, 1)
    args.snr_every = args.snr_every or max(args.steps // 4, 1)
    args.data_dir = args.data_dir or default_data_dir()
    parts = list(PARTS) if "all" in args.part else list(dict.fromkeys(args.part))
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(args, device)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "pyro": pyro.__version__, "pyro_vae": pyro_vae.__version__,
            "python": platform.python_version(),
            "data": (f"digits 8x8 ({data['train'].shape[0]} training points)" if args.data == "digits" else
                     f"MNIST ({data['train'].shape[0]} training points)") + ", statically binarized",
            "seeds": {"init_and_sampling": args.seed, "binarization": args.seed, "shuffle": f"{args.seed} + epoch"}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "estimators" + (f"_{args.tag}" if args.tag else "")
    path = out / f"{stem}.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() and "all" not in args.part else {}
    report.setdefault("parts", {})
    funcs = {"relax-table": relax_table, "variance": variance, "categorical": categorical, "continuous": continuous}
    for part in parts:
        print(f"{part}:", flush=True)
        started = time.perf_counter()
        result = funcs[part](data, args, device)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        entry = {**meta, "date": date, "args": vars(args),
                 "wall_seconds": time.perf_counter() - started,
                 **({"results": result} if part == "variance" else result)}
        report["parts"][part] = entry
        path.write_text(json.dumps(report, indent=1, default=str))
        title = f"{part}: {_budget(entry)}"
        PLOTS[part](entry if part != "variance" else entry["results"], out / f"{stem}_{part}.png", title)
    (out / f"{stem}.md").write_text(tables(report))
    print(f"device: {meta['device']}")
    print(f"wrote {path}, {out / (stem + '.md')} and the figures {stem}_*.png")
    return report


def redraw(path: Path) -> dict[str, Any]:
    """Draw the figures ``STEM_PART.png`` and write the tables ``STEM.md`` of the report ``path`` (``STEM.json``)
    beside it."""
    report = json.loads(path.read_text())
    for part, entry in report["parts"].items():
        PLOTS[part](entry if part != "variance" else entry["results"], path.parent / f"{path.stem}_{part}.png",
                    f"{part}: {_budget(entry)}")
    path.with_suffix(".md").write_text(tables(report))
    print(f"wrote {path.with_suffix('.md')} and the figures {path.stem}_*.png")
    return report


def default_data_dir() -> str:
    for cand in (ROOT / ".mnist", Path("/work/shared/data/mnist"), ROOT.parent / "shared" / "data" / "mnist"):
        if cand.exists():
            return str(cand)
    return str(ROOT / ".mnist")


if __name__ == "__main__":
    main()
