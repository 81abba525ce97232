"""Gradient variance of the ELBO estimators: pathwise vs score-function and the rest, at fixed parameters.

For every cell of the grid estimator x num_particles (1, 10, 100) x model x checkpoint (untrained, and after a
short training run inside this script) it draws independent gradient estimates of the loss ``-ELBO`` of one
fixed batch with :func:`pyro_vae.gradient_statistics` (``torch.func.vmap``, the guide's noise passed in) and
records, per parameter group (encoder, decoder, prior, and all together):

- ``mean_variance``: mean over coordinates of the per-coordinate variance, ``(1/D) tr Cov``;
- ``total_variance``: ``tr Cov``;
- ``snr``: ``|mean| / std`` per coordinate, averaged (Rainforth et al. 2018);
- ``bias``, ``relative_bias``, ``max_bias_z``: against the exact gradient where one exists (the
  linear-Gaussian VAE, whose ELBO has a closed form; :func:`pyro_vae.exact_gradient`);
- ``seconds_per_1000_samples``: wall time of the vectorized sampler; for one particle also the time of
  the plain loop over Pyro's ``loss_and_grads`` (``loop_seconds_per_1000``) and the speed-up.

Models: ``linear-gaussian`` (20-dim data, 5 latents, exact gradients), ``digits-mlp`` (8x8 digits, 8 Gaussian
latents), ``mnist-mlp`` (784-400-20, statically binarized MNIST; when the data is found), ``categorical``
(digits, 8 relaxed one-hot variables of 10 classes; estimators relaxed, straight-through and score function on
the exact one-hot categorical). Gaussian estimators: pathwise (Monte Carlo KL and analytic KL), score function,
score function with the decaying-average baseline of ``TraceGraph_ELBO``; and the per-site estimators of
:mod:`pyro_vae.infer.site_gradients`: score function with the mean of independent draws as baseline, with the
optimal constant coefficient per parameter, with the delta-method control variate; leave-one-out (``rloo``, run with
at least 2 particles: a cell of 1 particle is run with 2); the coupled measure-valued derivative (with Monte Carlo and
analytic KL).

Sigmoid belief nets (RELAX Table 1's linear model: 200 exact Bernoulli latents, learned Bernoulli prior, linear
encoder and decoder, trained with DisARM on dynamically binarized data): ``mnist-sbn`` (784-200, when MNIST is found)
and ``digits-sbn`` (64-200 on scikit-learn's 8x8 digits, always available). Their estimators are those of
:data:`pyro_vae.infer.estimators.ESTIMATORS` that apply to an exact Bernoulli latent: score function (plain, with
the decaying-average baseline, with the neural baseline, with the mean of 8 independent draws), NVIL, ARM, DisARM,
MuProp, REBAR, RELAX, ``rloo`` (K >= 2: a cell of 1 particle is run with 2) and VIMCO under ``elbo="iwae"`` (K >= 2,
likewise). Left out: ``pathwise`` (refused: the exact Bernoulli latent has no ``rsample``), ``enumerate`` (2^200
configurations), the Normal-only control variates and measure-valued derivative, and the relaxed estimators (they
need the relaxed Bernoulli latent). The learned modules of NVIL, MuProp, REBAR and RELAX
are the fresh ones :func:`pyro_vae.gradient_samples` builds (held fixed while sampling), not trained ones.

Cost, so that variance x cost ranks the estimators fairly: ``model_evaluations`` per estimate (all particles; the
draw's own, plus the control variate's independent draws, the delta method's forward and backward passes, or the
measure-valued derivative's 4 per latent coordinate), ``variance_x_evaluations`` (``mean_variance`` times it: the
variance at equal model evaluations, up to a constant) and ``variance_x_seconds`` (``mean_variance`` times the
vectorized seconds per estimate: the variance at equal wall time).

    python benchmarks/gradient_variance.py --device auto                       # full run
    python benchmarks/gradient_variance.py --quick --out /tmp/gv               # CPU smoke run, a few minutes
    python benchmarks/gradient_variance.py --device cuda --models mnist-sbn digits-sbn --particles 1 \
        --name gradient_variance_sbn_cuda                                      # the SBN on the GPU

Writes ``<name>.json`` (``--name``, default ``gradient_variance``; one record per cell and group, with device,
versions and date), ``<name>.png`` (variance by estimator, log scale, per group) and prints a table;
``--replot FILE --markdown`` prints the docs' table of a JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch

import pyro_vae
from pyro_vae.infer.estimators import get_estimator
from pyro_vae.infer.site_gradients import evaluations
from pyro_vae.infer.variance import exact_gradient, gradient_statistics
from pyro_vae.models.linear_gaussian import linear_gaussian_vae
from pyro_vae.validation import resolve_device

# (label, estimator name, elbo)
GAUSSIAN = [("pathwise", "pathwise", "trace"), ("pathwise-analytic-kl", "pathwise", "meanfield"),
            ("score-function", "score-function", "trace"),
            ("score-function-baseline", "score-function-baseline", "trace"),
            ("score-function-mean-baseline", "score-function-mean-baseline", "trace"),
            ("score-function-optimal-cv", "score-function-optimal-cv", "trace"),
            ("score-function-delta-cv", "score-function-delta-cv", "trace"),
            ("rloo", "rloo", "trace"),
            ("measure-valued", "measure-valued", "trace"),
            ("measure-valued-analytic-kl", "measure-valued", "meanfield")]
CATEGORICAL = [("relaxed", "relaxed", "trace"), ("straight-through", "straight-through", "trace"),
               ("score-function", "score-function", "trace"),
               ("score-function-baseline", "score-function-baseline", "trace")]
# The exact Bernoulli latent (sigmoid belief net); rloo and vimco run with K >= 2 (min_particles)
SBN = [("score-function", "score-function", "trace"),
       ("score-function-baseline", "score-function-baseline", "trace"),
       ("score-function-neural-baseline", "score-function-neural-baseline", "trace"),
       ("score-function-mean-baseline", "score-function-mean-baseline", "trace"),
       ("nvil", "nvil", "trace"), ("arm", "arm", "trace"), ("disarm", "disarm", "trace"),
       ("muprop", "muprop", "trace"), ("rebar", "rebar", "trace"), ("relax", "relax", "trace"),
       ("rloo", "rloo", "trace"), ("vimco", "vimco", "iwae")]
MODELS = ("linear-gaussian", "digits-mlp", "mnist-mlp", "categorical", "digits-sbn", "mnist-sbn")
MNIST_MODELS = ("mnist-mlp", "mnist-sbn")
MNIST_DIRS = ("/work/shared/data/mnist", "shared/data/mnist", "../shared/data/mnist")


def find_mnist(data_dir: str | None) -> str | None:
    for d in ([data_dir] if data_dir else list(MNIST_DIRS)):
        if d and Path(d).is_dir() and any(Path(d).rglob("train-images-idx3-ubyte*")):
            return d
    return None


def build(model: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """The VAE, its training data, the fixed batch whose gradient is estimated, and the estimators."""
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    if model == "linear-gaussian":
        truth = linear_gaussian_vae(data_dim=20, z_dim=5, noise_scale=0.5, seed=args.seed + 1)
        with torch.no_grad():
            data = truth.sample(2000, mean=False)
        vae = linear_gaussian_vae(data_dim=20, z_dim=5, noise_scale=0.5, seed=args.seed)
        train, val, estimators, epochs = data[:1800], data[1800:], GAUSSIAN, 2 if args.quick else 30
    elif model in ("digits-mlp", "categorical"):
        splits = pyro_vae.data.load("digits", seed=args.seed)
        train, val = splits.train.x.flatten(1), splits.val.x.flatten(1)
        if model == "digits-mlp":
            vae = pyro_vae.VAE((64,), 8, likelihood="continuous-bernoulli", hidden=(200,))
            estimators = GAUSSIAN
        else:
            vae = pyro_vae.VAE((64,), 8, latent="categorical", categories=10, likelihood="continuous-bernoulli",
                               hidden=(200,), temperature=0.5)
            estimators = CATEGORICAL
        epochs = 2 if args.quick else 40
    elif model == "mnist-mlp":
        splits = pyro_vae.data.load("mnist", args.mnist_dir, binarize_mode="static", seed=args.seed)
        train, val = splits.train.x.flatten(1), splits.val.x.flatten(1)
        vae = pyro_vae.VAE((784,), 20, likelihood="bernoulli", hidden=(400,))
        estimators, epochs = GAUSSIAN, 1 if (args.quick or device.type == "cpu") else 3
    elif model in ("digits-sbn", "mnist-sbn"):
        if model == "digits-sbn":
            splits = pyro_vae.data.load("digits", binarize_mode="dynamic", seed=args.seed)
            epochs = 2 if args.quick else 100
        else:
            splits = pyro_vae.data.load("mnist", args.mnist_dir, binarize_mode="dynamic", seed=args.seed)
            epochs = 1 if (args.quick or device.type == "cpu") else 5
        train, val = splits.train.x.flatten(1), splits.val.x.flatten(1)
        vae = pyro_vae.VAE((train.shape[1],), 200, latent="bernoulli", prior="bernoulli-learned", encoder="linear",
                           decoder="linear")
        estimators = SBN
    else:
        raise ValueError(model)
    vae.to(device)
    x = val[: args.batch_size].to(device)
    return {"vae": vae, "train": train, "x": x, "estimators": estimators,
            "epochs": args.train_epochs or epochs, "exact": model == "linear-gaussian"}


def train_briefly(spec: dict[str, Any], device: torch.device, seed: int) -> float:
    start = time.perf_counter()
    sbn = spec["estimators"] is SBN
    estimator = "relaxed" if spec["estimators"] is CATEGORICAL else "disarm" if sbn else "pathwise"
    pyro_vae.fit(spec["vae"], spec["train"], estimator=estimator, epochs=spec["epochs"], batch_size=128,
                 lr=1e-3, device=device, progress=False, seed=seed, dynamic_binarize=sbn)
    return time.perf_counter() - start


def samples_for(num_particles: int, args: argparse.Namespace, model: str, cuda: bool) -> int:
    top = args.num_samples if (cuda or model not in MNIST_MODELS) else min(args.num_samples, args.mnist_cpu_samples)
    return int(min(top, max(args.min_samples, args.particle_budget // num_particles)))


def run_cell(spec: dict[str, Any], name: str, elbo: str, num_particles: int, n: int,
             exact: torch.Tensor | None, seed: int, warmup: int) -> dict[str, dict[str, Any]]:
    return gradient_statistics(spec["vae"], spec["x"], name, n, num_particles=num_particles, elbo=elbo,
                               exact=exact, seed=seed, baseline_warmup=warmup)


def min_particles(name: str, num_particles: int) -> int:
    """Leave-one-out and VIMCO need 2 draws: their cells of 1 particle run with 2."""
    return max(num_particles, 2) if name in ("rloo", "vimco") else num_particles


def model_evaluations(spec: dict[str, Any], name: str, num_particles: int) -> int:
    """Model evaluations per estimate of ``num_particles`` particles (see the module's docstring)."""
    est = get_estimator(name)
    vae = spec["vae"]
    per = evaluations(est, int(vae.z_dim), int(getattr(vae, "categories", None) or 2)) \
        if est.site_gradient is not None else 1
    return per * num_particles


def time_loop(spec: dict[str, Any], name: str, elbo: str, n: int, seed: int) -> float:
    """Seconds per 1000 estimates of one particle (K = 2 for rloo and vimco) with the loop, timed on ``n``."""
    stats = gradient_statistics(spec["vae"], spec["x"], name, n, num_particles=min_particles(name, 1), method="loop",
                                elbo=elbo, seed=seed, baseline_warmup=5)
    return stats["all"]["seconds"] / n * 1000


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def table(records: list[dict[str, Any]]) -> str:
    rows = [r for r in records if r["group"] in ("encoder", "decoder")]
    head = (f"{'model':16} {'ckpt':9} {'estimator':24} {'P':>4} {'group':8} {'mean var':>10} {'SNR':>7} "
            f"{'rel bias':>8} {'evals':>5} {'var x evals':>11} {'s/1000':>8} {'loop s/1000':>11} {'speed-up':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        rb = "" if r["relative_bias"] is None else f"{r['relative_bias']:.3f}"
        loop = "" if r["loop_seconds_per_1000"] is None else f"{r['loop_seconds_per_1000']:.2f}"
        sp = "" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        lines.append(f"{r['model']:16} {r['checkpoint']:9} {r['estimator']:24} {r['num_particles']:>4} "
                     f"{r['group']:8} {r['mean_variance']:>10.3g} {r['snr']:>7.3f} {rb:>8} "
                     f"{r.get('model_evaluations', 1):>5} {r.get('variance_x_evaluations', r['mean_variance']):>11.3g} "
                     f"{r['seconds_per_1000_samples']:>8.2f} {loop:>11} {sp:>8}")
    return "\n".join(lines)


def markdown(records: list[dict[str, Any]]) -> str:
    """The docs' summary: trained checkpoint, one particle (two for rloo and vimco), per model and estimator, with
    the device, versions and date of the run."""
    lines = ["| model | estimator | K | encoder variance | encoder SNR | decoder variance | decoder SNR | "
             "max bias / s.e. | model evaluations | vectorized s / 1000 | loop s / 1000 (timed on) | speed-up |",
             "|" + " --- |" * 12]
    # the cell of one requested particle is the one with a loop timing
    by = {(r["model"], r["estimator"], r["group"]): r for r in records
          if r["checkpoint"] == "trained" and r["loop_seconds_per_1000"] is not None}
    for (model, est, group), r in by.items():
        if group != "encoder":
            continue
        dec = by.get((model, est, "decoder"), {})
        allg = by.get((model, est, "all"), {})
        rb = "" if allg.get("max_bias_z") is None else f"{allg['max_bias_z']:.1f}"
        timed = r.get("loop_samples_timed")
        lines.append(f"| {model} | {est} | {r['num_particles']} | {r['mean_variance']:.3g} | {r['snr']:.3f} | "
                     f"{dec.get('mean_variance', float('nan')):.3g} | {dec.get('snr', float('nan')):.3f} | {rb} | "
                     f"{r.get('model_evaluations', r['num_particles'])} | {r['seconds_per_1000_samples']:.3g} | "
                     f"{r['loop_seconds_per_1000']:.1f}{f' ({timed})' if timed else ''} | {r['speedup']:.1f}x |")
    if records:
        r0 = records[0]
        n = sorted({r["num_samples"] for r in by.values() if r["group"] == "encoder"})
        lines.append("")
        lines.append(f"Device {r0['device']}, torch {r0['torch']}, pyro {r0['pyro']}, python {r0.get('python', '?')}, "
                     f"{r0['date'][:10]}; batch {r0['batch_size']}; {'/'.join(map(str, n))} estimates per cell.")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    groups = [g for g in ("encoder", "decoder", "prior") if any(r["group"] == g for r in records)]
    fig, axes = plt.subplots(len(models), len(groups), figsize=(4.8 * len(groups), 2.9 * len(models)),
                             squeeze=False)
    particles = sorted({r["num_particles"] for r in records})
    colors = dict(zip(particles, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for i, model in enumerate(models):
        for j, group in enumerate(groups):
            ax = axes[i][j]
            cell = [r for r in records if r["model"] == model and r["group"] == group]
            ests = list(dict.fromkeys(r["estimator"] for r in cell))
            for r in cell:
                k = ests.index(r["estimator"])
                shift = 0.12 * (particles.index(r["num_particles"]) - (len(particles) - 1) / 2)
                trained = r["checkpoint"] == "trained"
                ax.scatter(k + shift, max(r["mean_variance"], 1e-30), marker="o" if trained else "^",
                           facecolors=colors.get(r["num_particles"]) if trained else "none",
                           edgecolors=colors.get(r["num_particles"]), s=28)
            ax.set_yscale("log")
            ax.set_xticks(range(len(ests)))
            ax.set_xticklabels([e.replace("score-function", "SF").replace("-analytic-kl", "+KL") for e in ests],
                               rotation=20, fontsize=7)
            ax.set_title(f"{model}: {group}", fontsize=9)
            if j == 0:
                ax.set_ylabel("mean per-coordinate variance")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f"{p} particle{'s' if p > 1 else ''}")
               for p, c in colors.items() if p in particles]
    handles += [plt.Line2D([], [], marker="o", ls="", color="grey", label="trained"),
                plt.Line2D([], [], marker="^", ls="", mfc="none", color="grey", label="untrained")]
    fig.suptitle(title, fontsize=9, y=0.995)
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, 0.975))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, meta: dict[str, Any], args: argparse.Namespace, started: float,
          records: list[dict[str, Any]]) -> dict[str, Any]:
    report = {**meta, "args": {k: v for k, v in vars(args).items()}, "seconds": time.perf_counter() - started,
              "records": records}
    tmp = out / f".{args.name}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out / f"{args.name}.json")
    return report


def title_of(report: dict[str, Any]) -> str:
    return (f"ELBO gradient variance at fixed parameters, batch {report['args']['batch_size']}, {report['device']}, "
            f"torch {report['torch']}, pyro {report['pyro']}, {report['date'][:10]}")


def main(argv: Any = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: few samples, particles 1 and 10, no MNIST")
    p.add_argument("--name", default="gradient_variance", help="stem of the JSON and PNG written to --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: /work/shared/data/mnist when present)")
    p.add_argument("--models", nargs="+", default=None, choices=MODELS, help="models to run (default: all found)")
    p.add_argument("--particles", type=int, nargs="+", default=None, help="particle counts (default 1 10 100)")
    p.add_argument("--num-samples", type=int, default=None, help="gradient samples per cell (default 1000)")
    p.add_argument("--min-samples", type=int, default=None,
                   help="fewest samples per cell at many particles (default 100 on CUDA, 50 on CPU)")
    p.add_argument("--mnist-cpu-samples", type=int, default=200, help="samples per MNIST cell on the CPU (both models)")
    p.add_argument("--baseline-warmup", type=int, default=None,
                   help="TraceGraph_ELBO calls warming up the decaying-average baseline (default 50, 3 quick)")
    p.add_argument("--particle-budget", type=int, default=None,
                   help="cap on samples x particles per cell (default 100000 on CUDA, 2000 on CPU)")
    p.add_argument("--loop-samples", type=int, default=None,
                   help="samples timed with the plain loop (default 100, 3 quick)")
    p.add_argument("--mnist-loop-samples", type=int, default=1000,
                   help="samples timed with the loop for the trained MNIST VAE and SBN, pathwise and score function")
    p.add_argument("--batch-size", type=int, default=32, help="data points in the fixed batch")
    p.add_argument("--train-epochs", type=int, default=None, help="epochs of the 'trained' checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", default=None, help="redraw the PNG and table of an existing JSON, then stop")
    p.add_argument("--markdown", action="store_true", help="with --replot: print the README's summary table")
    args = p.parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        plot(report["records"], Path(args.replot).with_suffix(".png"), title_of(report))
        print(markdown(report["records"]) if args.markdown else table(report["records"]))
        return report

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.particles = args.particles or ([1, 10] if args.quick else [1, 10, 100])
    args.num_samples = args.num_samples or (50 if args.quick else 1000)
    args.min_samples = args.min_samples or (20 if args.quick else 100 if cuda else 50)
    args.particle_budget = args.particle_budget or (500 if args.quick else 100000 if cuda else 2000)
    args.loop_samples = args.loop_samples or (3 if args.quick else 100)
    args.baseline_warmup = args.baseline_warmup or (3 if args.quick else 50)
    args.mnist_dir = find_mnist(args.data_dir)
    models = args.models or [m for m in MODELS if not (m in MNIST_MODELS and (args.mnist_dir is None or args.quick))]
    if any(m in MNIST_MODELS for m in models) and args.mnist_dir is None:
        sys.exit("gradient_variance: MNIST not found; pass --data-dir or leave mnist-mlp and mnist-sbn out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "pyro": pyro.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for model in models:
        spec = build(model, device, args)
        for checkpoint in ("untrained", "trained"):
            train_seconds = train_briefly(spec, device, args.seed) if checkpoint == "trained" else 0.0
            spec["vae"].eval()
            exact = exact_gradient(spec["vae"], spec["x"]).detach() if spec["exact"] else None
            for label, name, elbo in spec["estimators"]:
                if not args.quick:
                    run_cell(spec, name, elbo, min_particles(name, 1), 8, None, args.seed, 1)  # warm-up, untimed
                loop_ms = None
                for requested in args.particles:
                    num_particles = min_particles(name, requested)
                    n = samples_for(num_particles, args, model, cuda)
                    stats = run_cell(spec, name, elbo, num_particles, n, exact, args.seed + num_particles,
                                     args.baseline_warmup)
                    vec = stats["all"]["seconds"] / n * 1000
                    if requested == 1:
                        long = (model in MNIST_MODELS and checkpoint == "trained" and elbo == "trace"
                                and name in ("pathwise", "score-function"))
                        loop_n = args.mnist_loop_samples if long else args.loop_samples
                        loop_ms = time_loop(spec, name, elbo, loop_n, args.seed)
                    evals = model_evaluations(spec, name, num_particles)
                    for group, st in stats.items():
                        records.append({
                            "model": model, "checkpoint": checkpoint, "estimator": label, "estimator_name": name,
                            "elbo": elbo, "group": group, "num_particles": num_particles, "num_samples": n,
                            "batch_size": int(spec["x"].shape[0]), "dim": st["dim"],
                            "mean_variance": st["mean_variance"], "total_variance": st["total_variance"],
                            "snr": st["snr"], "mean_norm": st["mean_norm"], "bias": st["bias"],
                            "relative_bias": st["relative_bias"], "max_bias_z": st["max_bias_z"],
                            "seconds_per_1000_samples": vec, "model_evaluations": evals,
                            "variance_x_evaluations": st["mean_variance"] * evals,
                            "variance_x_seconds": st["mean_variance"] * vec / 1000,
                            "vectorized_seconds_per_1000": vec if requested == 1 else None,
                            "loop_seconds_per_1000": loop_ms if requested == 1 else None,
                            "loop_samples_timed": loop_n if requested == 1 else None,
                            "speedup": loop_ms / vec if requested == 1 and vec > 0 else None,
                            "train_epochs": spec["epochs"] if checkpoint == "trained" else 0,
                            "train_seconds": train_seconds, **meta})
            print(f"[{time.perf_counter() - started:6.1f} s] {model} {checkpoint} done", flush=True)
            write(out, meta, args, started, records)  # after every cell group: a long run keeps what it did
    report = write(out, meta, args, started, records)
    plot(records, out / f"{args.name}.png", title_of(report))
    print(table(records))
    print(f"device: {meta['device']}; total {report['seconds']:.1f} s")
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')}")
    return report


if __name__ == "__main__":
    main()
