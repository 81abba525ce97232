"""The ``pyro-vae`` command line: ``train``, ``sample``, ``evaluate``, ``interpolate``, ``impute``.

Every run writes its folder: ``config.json``, ``model.pt``, ``metrics.json``, ``history.json`` and the
pictures. Errors print one line and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as tdist

from pyro_vae import checkpoint, evaluation, generation, imputation
from pyro_vae.data import BINARIZE, binarize
from pyro_vae.data import load as load_splits
from pyro_vae.errors import ConfigError, PyroVAEError, TrainingInterrupted, message
from pyro_vae.infer.elbo import BOUNDS, ELBOS, check_elbo, evaluate_elbo
from pyro_vae.infer.estimators import (
    ESTIMATORS,
    check_discrete_objective,
    check_mean_field,
    default_estimator_name,
    get_estimator,
)
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.models.vae import NETS, VAE
from pyro_vae.priors import BERNOULLI_PRIORS, CATEGORICAL_PRIORS, PRIORS
from pyro_vae.schedules import ConstantTemperature, ExponentialTemperature, KLWarmup
from pyro_vae.train import distributed
from pyro_vae.train.callbacks import EarlyStopping
from pyro_vae.train.cuda_graph import check_cuda_graph
from pyro_vae.train.loop import fit
from pyro_vae.train.tensorboard import TensorBoard
from pyro_vae.validation import arg_type, beta, check_memory, image_path, integer, number, resolve_device

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error form: one line on stderr, exit status 2."""

    def error(self, text: str) -> Any:
        hint = "" if "Fix: " in text else f" (see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {' '.join(text.split())}{hint}\n")


def _int(flag: str, minimum: int = 1, maximum: int | None = None) -> Callable[[str], int]:
    return arg_type(flag, integer, minimum=minimum, maximum=maximum)


def _float(flag: str, minimum: float = 0.0, strict: bool = True) -> Callable[[str], float]:
    return arg_type(flag, number, minimum=minimum, strict=strict)


SEED_MAX = 2 ** 32 - 1  # numpy's seeds stop here


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=_int("--seed", 0, SEED_MAX), default=0,
                   help="seed for Pyro, torch, numpy and the data splits")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a VAE and write its run folder",
                       description="Train a VAE by stochastic variational inference and write a run folder "
                                   "(config, weights, metrics, history, pictures).")
    p.add_argument("--data", default="digits",
                   help="digits (embedded, no download), mnist, fashion-mnist, kmnist, or a .npy/.pt file")
    p.add_argument("--data-dir", default=None,
                   help="torchvision root, or a folder holding the raw IDX files (e.g. ../shared/data/mnist)")
    p.add_argument("--binarize", default="none", choices=BINARIZE,
                   help="none: grey levels; static: one seeded draw; dynamic: a fresh draw every batch")
    p.add_argument("--scale", type=_float("--scale"), default=None,
                   help="divide the data by this value first (e.g. 255 for 8-bit grey levels stored as floats)")
    p.add_argument("--z-dim", type=_int("--z-dim"), default=8, help="number of latent dimensions")
    p.add_argument("--net", default="mlp", choices=NETS,
                   help="encoder and decoder networks: mlp (--hidden, softplus), conv, or the fixed networks of the "
                        "discrete-estimator papers: linear (one affine map), nonlinear (two hidden layers of 200 "
                        "tanh units), nonlinear-leaky (two of 200 LeakyReLU(0.3) units)")
    p.add_argument("--hidden", type=_int("--hidden"), nargs="+", default=[400], help="hidden layer sizes of the MLPs")
    p.add_argument("--likelihood", default="continuous-bernoulli", choices=sorted(LIKELIHOODS),
                   help="p(x|z): bernoulli (binary data), continuous-bernoulli (grey levels), normal, "
                        "normal-learned; default: continuous-bernoulli (pyro_vae.VAE's default is bernoulli)")
    p.add_argument("--likelihood-scale", type=_float("--likelihood-scale"), default=None,
                   help="standard deviation of the 'normal' likelihood (default 0.1)")
    p.add_argument("--prior", default=None,
                   choices=sorted(PRIORS) + sorted(CATEGORICAL_PRIORS) + sorted(BERNOULLI_PRIORS),
                   help="p(z): normal (default), mixture, vamp, flow, laplace, student-t; with --latent "
                        "categorical: categorical (uniform, default) or categorical-learned; with --latent "
                        "bernoulli: bernoulli (p = 1/2, default) or bernoulli-learned (learned logits)")
    p.add_argument("--components", type=_int("--components"), default=None,
                   help="mixture / vamp: components (default 10 / 50)")
    p.add_argument("--flows", type=_int("--flows"), default=None, help="flow: autoregressive layers (default 2)")
    p.add_argument("--flow-kind", default=None, choices=("affine", "spline"), help="flow: layer type (affine)")
    p.add_argument("--prior-scale", type=_float("--prior-scale"), default=None,
                   help="laplace / student-t: scale (default 1)")
    p.add_argument("--df", type=_float("--df"), default=None, help="student-t: degrees of freedom (default 3)")
    p.add_argument("--latent", default="gaussian", choices=("gaussian", "categorical", "bernoulli"),
                   help="gaussian; categorical: --z-dim relaxed one-hot variables of --categories classes "
                        "(Gumbel-softmax); bernoulli: --z-dim binary variables, a sigmoid belief net layer "
                        "(values in {0, 1}; the score-function estimators, or --relaxed for the pathwise ones)")
    p.add_argument("--relaxed", action="store_true",
                   help="bernoulli: the binary Concrete (relaxed Bernoulli, logit space) at --temperature, for "
                        "--estimator pathwise, relaxed or straight-through")
    p.add_argument("--categories", type=_int("--categories", 2), default=10, help="classes per categorical variable")
    p.add_argument("--temperature", type=_float("--temperature"), default=1.0,
                   help="categorical, relaxed bernoulli: (initial) temperature")
    p.add_argument("--temperature-min", type=_float("--temperature-min"), default=0.5,
                   help="categorical, relaxed bernoulli: floor of the annealing")
    p.add_argument("--anneal-rate", type=_float("--anneal-rate", strict=False), default=0.0,
                   help="categorical, relaxed bernoulli: tau = max(temperature-min, temperature * exp(-rate * step)); "
                        "0 keeps it "
                        "constant (Jang et al. 2017 use 3e-5)")
    p.add_argument("--straight-through", action="store_true",
                   help="categorical: hard one-hot samples with relaxed gradients; bernoulli: hard bits with "
                        "relaxed gradients (implies --relaxed)")
    p.add_argument("--beta", type=arg_type("--beta", beta), default=1.0, help="KL weight (beta-VAE)")
    p.add_argument("--kl-warmup", type=_int("--kl-warmup", 0), default=0,
                   help="raise the KL weight linearly to --beta over this many steps (0: no warm-up)")
    p.add_argument("--early-stopping", type=_int("--early-stopping", 0), default=0, metavar="PATIENCE",
                   help="stop when the validation ELBO has not improved for this many epochs (0: never)")
    p.add_argument("--elbo", default=None, choices=sorted(ELBOS),
                   help="trace: Trace_ELBO (Monte Carlo KL); meanfield: TraceMeanField_ELBO (analytic KL); "
                        "default: meanfield, trace for the score-function estimators (pyro_vae.fit's default is "
                        "trace); trace also for an exact --latent bernoulli under an estimator that is not per site")
    p.add_argument("--estimator", default=None, choices=list(ESTIMATORS),
                   help="gradient estimator (default: pathwise, score-function for an exact --latent bernoulli "
                        "and vimco for one under --objective iwae, as pyro_vae.fit's estimator=None; config.json "
                        "records the name used): " + "; ".join(
                       f"{name}, {est.description}" for name, est in ESTIMATORS.items()))
    p.add_argument("--particles", type=_int("--particles"), default=1,
                   help="Monte Carlo particles per step (vectorized), --objective elbo")
    p.add_argument("--objective", default="elbo", choices=("elbo", "iwae"),
                   help="what the steps maximize: elbo, the ELBO (--elbo, --particles); iwae, the importance-"
                        "weighted bound of Burda et al. 2016 with --k importance samples per data point (--elbo and "
                        "--particles do not apply; the ELBOs the run reports stay Trace_ELBO's, the bound is "
                        "history's train_objective)")
    p.add_argument("--k", type=_int("--k"), default=None,
                   help="--objective iwae: importance samples per data point (default 50)")
    p.add_argument("--epochs", type=_int("--epochs"), default=50,
                   help="passes over the training set (default 50; pyro_vae.fit's default is 10)")
    p.add_argument("--batch-size", type=_int("--batch-size"), default=128, help="minibatch size")
    p.add_argument("--lr", type=_float("--lr"), default=1e-3, help="Adam learning rate")
    p.add_argument("--out", default=None, help="run folder: a new or empty folder, or a run with --resume or "
                   "--overwrite (default runs/<data>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt (same options as the original run; "
                        "--epochs may grow)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out, or write the run into a folder of other files "
                        "(without it, neither is ever overwritten)")
    p.add_argument("--clip-norm", type=_float("--clip-norm"), default=None,
                   help="clip the gradient's global norm to this value")
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a CUDA device, replay the training step as a CUDA graph (Gaussian latents, pathwise "
                        "estimator, one process; see pyro_vae.fit)")
    p.add_argument("--checkpoint-every", type=_int("--checkpoint-every", 0), default=500,
                   help="also checkpoint every this many steps (besides every epoch end and on Ctrl-C; default 500, "
                        "0: epoch ends only, as pyro_vae.fit's default checkpoint_every=None)")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="write TensorBoard events to DIR (RUN/tensorboard when DIR is left out): each epoch's "
                        "ELBOs, objective, beta, time, learning rate, temperature (categorical latent), KL on the "
                        "first 256 training points and a grid of prior samples (image data), and every 50 steps "
                        "the gradient norm, loss and learning rate; needs pip install 'pyro-vae[tensorboard]'")
    _add_common(p)
    p.set_defaults(func=cmd_train)


def _prior_spec(args: argparse.Namespace) -> Any:
    """``--prior`` and its options as the config dict :func:`pyro_vae.priors.build_prior` takes."""
    options = {"components": args.components, "flows": args.flows, "kind": args.flow_kind,
               "scale": args.prior_scale, "df": args.df}
    given = {k: v for k, v in options.items() if v is not None}
    if not given:
        return args.prior
    takes = {"mixture": {"components"}, "vamp": {"components"}, "flow": {"flows", "kind"},
             "laplace": {"scale"}, "student-t": {"scale", "df"}}.get(args.prior, set())
    wrong = sorted(set(given) - takes)
    if wrong:
        flags = {"components": "--components", "flows": "--flows", "kind": "--flow-kind", "scale": "--prior-scale",
                 "df": "--df"}
        raise ConfigError(message(", ".join(flags[k] for k in wrong), "options of the chosen --prior",
                                  f"--prior {args.prior or 'normal'}", "drop them or pick the prior they belong to"))
    return {"name": args.prior, **given}


def _latent_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.latent != "bernoulli" and args.relaxed:
        raise ConfigError(message("--relaxed", "--latent bernoulli (a categorical latent is always relaxed)",
                                  f"--latent {args.latent}", "add --latent bernoulli or drop --relaxed"))
    if args.latent == "bernoulli":
        relaxed = args.relaxed or args.straight_through
        if args.anneal_rate and not relaxed:
            raise ConfigError(message("--anneal-rate", "--relaxed (the temperature of a relaxed Bernoulli latent)",
                                      "--latent bernoulli without --relaxed", "add --relaxed or drop --anneal-rate"))
        return {"latent": "bernoulli", "relaxed": relaxed, "temperature": args.temperature,
                "straight_through": args.straight_through, "beta": args.beta}
    if args.latent != "categorical":
        if args.straight_through or args.anneal_rate:
            raise ConfigError(message("--straight-through / --anneal-rate", "--latent categorical",
                                      f"--latent {args.latent}", "add --latent categorical or drop them"))
        return {"beta": args.beta}
    return {"latent": "categorical", "categories": args.categories, "temperature": args.temperature,
            "straight_through": args.straight_through, "beta": args.beta}


def _schedules(args: argparse.Namespace) -> list:
    out: list = []
    if args.latent == "categorical" or args.latent == "bernoulli" and (args.relaxed or args.straight_through):
        out.append(ExponentialTemperature(args.temperature, args.anneal_rate, args.temperature_min)
                   if args.anneal_rate else ConstantTemperature(args.temperature))
    if args.kl_warmup:
        out.append(KLWarmup(args.kl_warmup, end=args.beta))
    if args.early_stopping:
        out.append(EarlyStopping(args.early_stopping))
    return out


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained VAE into a PNG",
                       description="Ancestral samples z ~ p(z), x = E[x | z], drawn as an image grid.")
    p.add_argument("run", help="run folder written by `pyro-vae train`")
    p.add_argument("--n", type=_int("--n"), default=64, help="number of samples")
    p.add_argument("--out", type=arg_type("--out", image_path), default=None,
                   help="picture file: .png, .pdf, .svg or .jpg (default RUN/samples.png)")
    p.add_argument("--draw", action="store_true", help="draw x from the likelihood instead of its mean")
    p.add_argument("--from", dest="source", default="prior", choices=("prior", "aggregate", "mixture"),
                   help="prior: z ~ p(z); aggregate: z ~ q(z|x) for random training points; mixture: a Gaussian "
                        "mixture fitted to the training posterior means")
    p.add_argument("--components", type=_int("--components"), default=10,
                   help="mixture components for --from mixture")
    _add_common(p)
    p.set_defaults(func=cmd_sample)


def _iw_samples(flag: str, value: Any) -> int:
    """0 (skip importance sampling) or enough samples per point for the Pareto-k fit."""
    value = integer(flag, value, 0)
    if 0 < value < evaluation.PARETO_K_MIN_SAMPLES:
        raise ConfigError(message(flag, f"0 (skip log p(x)) or an integer >= {evaluation.PARETO_K_MIN_SAMPLES} "
                                  "(the Pareto-k diagnostic of the importance weights needs that many per point)",
                                  repr(value), f"pass {flag} 1000, or {flag} 0 for the ELBO alone"))
    return value


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained VAE on its test split",
                       description="Test ELBO per data point (nats), written into RUN/metrics.json.")
    p.add_argument("run", help="run folder written by `pyro-vae train`")
    p.add_argument("--particles", type=_int("--particles"), default=10,
                   help="Monte Carlo particles per point for the test ELBO when --iw-samples is 0 (otherwise the "
                        "ELBO is the mean log-weight of the importance samples)")
    p.add_argument("--batch-size", type=_int("--batch-size"), default=512, help="evaluation batch size")
    p.add_argument("--iw-samples", type=arg_type("--iw-samples", _iw_samples, parse=int), default=1000,
                   help="importance samples K per test point for log p(x), its gap to the ELBO and Pareto-k "
                        "(0 skips them)")
    p.add_argument("--iw-batch-size", type=_int("--iw-batch-size"), default=100,
                   help="test points per importance-sampling batch")
    p.add_argument("--amortization-points", type=_int("--amortization-points", 0), default=0,
                   help="also measure the amortization gap (Cremer et al. 2018) on this many test points "
                        "(0 skips it)")
    p.add_argument("--amortization-steps", type=_int("--amortization-steps", 0), default=300,
                   help="Adam steps of each test point's own Gaussian guide")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)


def _add_interpolate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("interpolate", help="interpolation strips and latent traversals into PNGs",
                       description="Decode paths between the posterior means of pairs of test points "
                                   "(RUN/interpolations.png) and one-dimension latent traversals around a test "
                                   "point (RUN/traversals.png).")
    p.add_argument("run", help="run folder written by `pyro-vae train`")
    p.add_argument("--method", default="slerp", choices=("lerp", "slerp"), help="linear or spherical")
    p.add_argument("--pairs", type=_int("--pairs"), default=8, help="number of test-point pairs (one row each)")
    p.add_argument("--steps", type=_int("--steps", 2), default=10, help="points on each path, endpoints included")
    p.add_argument("--span", type=_float("--span"), default=3.0,
                   help="traversal values run from -SPAN to +SPAN (Gaussian latents; a Bernoulli latent is traversed "
                        "over the bits 0 and 1)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default RUN)")
    _add_common(p)
    p.set_defaults(func=cmd_interpolate)


def _add_impute(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("impute", help="fill in masked entries of test points and score the completions",
                       description="Hide part of each test point, impute it with the VAE, and report the mean "
                                   "squared error on the hidden entries against filling with the per-entry "
                                   "training mean (RUN/imputations.png, RUN/imputation.json).")
    p.add_argument("run", help="run folder written by `pyro-vae train`")
    p.add_argument("--mask", default="bottom",
                   help="hidden part: top, bottom, left, right (half of each image), random:P (each entry with "
                        "probability P), or a .npy/.pt boolean array (True = observed) of shape data_shape or "
                        "(N, *data_shape)")
    p.add_argument("--method", default="importance", choices=("importance", "metropolis", "gibbs"),
                   help="importance: self-normalized importance sampling; metropolis: Metropolis-within-Gibbs "
                        "chain; gibbs: pseudo-Gibbs iterations")
    p.add_argument("--samples", type=_int("--samples"), default=500, help="importance samples per point")
    p.add_argument("--iters", type=_int("--iters"), default=10, help="chain length of the metropolis and gibbs methods")
    p.add_argument("--n", type=_int("--n"), default=None, help="number of test points (default all)")
    p.add_argument("--out", default=None, help="folder for the PNG and JSON (default RUN)")
    _add_common(p)
    p.set_defaults(func=cmd_impute)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-vae`` parser with its subcommands (``train``, ``sample``, ``evaluate``, ``interpolate``,
    ``impute``); each sets ``func``, the command that :func:`main` runs."""
    parser = _Parser(prog="pyro-vae", description="Variational autoencoders in Pyro.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_train, _add_sample, _add_evaluate, _add_interpolate, _add_impute):
        add(sub)
    return parser


# ----------------------------------------------------------------------------------------------- commands
def _load_data(cfg: dict[str, Any]):
    return load_splits(cfg["data"], cfg.get("data_dir"), binarize_mode=cfg.get("binarize", "none"),
                     seed=cfg.get("seed", 0), scale=cfg.get("scale"))


def _check_splits(vae: Any, splits: Any, name: str) -> None:
    """Every split checked against the VAE before anything is trained or written, so a NaN or an
    out-of-support value in the test split is reported now, naming the split, not after training."""
    for split, d in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        x = d.x >= 0.5 if split == "train" and splits.dynamic_binarize else d.x  # its range is checked on load
        vae.check_data(x, f"{split} split of {name}", data_set=True)


def write_pictures(vae, splits, run: Path, history: list | None = None, n: int = 64) -> list[Path]:
    from pyro_vae import plots  # matplotlib: loaded only when pictures are drawn

    vae.eval()
    device = vae.device
    paths = [plots.save_image_grid(vae.sample(n).cpu(), run / "samples.png", "samples from the prior")]
    test = splits.test
    xt = test.x[:16].to(device)
    paths.append(plots.save_reconstructions(xt.cpu(), vae.reconstruct(xt).cpu(), run / "reconstructions.png"))
    if history:
        paths.append(plots.save_elbo_curve(history, run / "elbo.png"))
    with torch.no_grad():
        z = torch.cat([vae.encode(test.x[i: i + 1024].to(device)).cpu() for i in range(0, len(test), 1024)])
        if vae.categories is not None:
            z = z.exp()  # encode gives log class probabilities for a categorical latent: map the probabilities
        elif vae.latent == "bernoulli" and vae.relaxed:
            z = z.sigmoid()  # encode gives the logits of a relaxed Bernoulli latent: map the probabilities
    paths.append(plots.save_latent_map(z.reshape(z.shape[0], -1), test.y, run / "latent.png"))
    return paths


def cmd_train(args: argparse.Namespace) -> int:
    try:
        return _cmd_train(args)
    except ConfigError as e:  # a refusal of pyro_vae.fit's arguments, in the words of the command line
        raise ConfigError(_cli_words(str(e), args.objective == "iwae")) from e


def _cmd_train(args: argparse.Namespace) -> int:
    if args.resume and not args.out:
        raise ConfigError(message("--resume", "--out RUN naming the run folder to continue", "no --out",
                                  "pass --out RUN with the options of the original run"))
    if args.resume and args.overwrite:
        raise ConfigError(message("--resume / --overwrite", "one of them", "both",
                                  "pass --resume to continue the run in --out, --overwrite to replace it"))
    # an exact Bernoulli latent is not reparameterizable: its default estimator is the score function (vimco
    # under the IWAE bound), and TraceMeanField_ELBO takes it only through the per-site estimators (whose guide
    # wrapper has rsample)
    exact_bits = args.latent == "bernoulli" and not (args.relaxed or args.straight_through)
    if args.estimator is None:
        args.estimator = default_estimator_name(exact_bits, args.objective)
    if exact_bits and args.objective == "iwae":
        check_discrete_objective(args.estimator, "iwae")
    _check_objective(args, exact_bits)
    if args.elbo is None:
        est = get_estimator(args.estimator)
        args.elbo = "trace" if est.score_function or (exact_bits and est.site_gradient is None) else "meanfield"
    if exact_bits and args.objective not in BOUNDS:
        check_mean_field(args.estimator, args.elbo)
        check_discrete_objective(args.estimator, args.elbo)
    check_elbo(args.objective if args.objective in BOUNDS else args.elbo, args.estimator)
    ctx, device = distributed.init_from_env(args.device)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, released however the run ends
            code = _train(args, ctx, device, held)
    except BaseException:
        if ctx.enabled:
            tdist.destroy_process_group()
        raise
    distributed.shutdown()
    return code


#: pyro_vae.fit's argument names in its refusals, and the command line's flags for them (a longer phrase first).
_CLI_WORDS = (
    (r"build the VAE with relaxed=True", "pass --relaxed"),
    (r'elbo="iwae" with estimator="(\w[\w-]*)" and num_particles=K', r"--objective iwae --estimator \1 --k K"),
    (r'elbo="iwae" with num_particles=K importance samples', "--objective iwae --k K"),
    (r'elbo="iwae"', "--objective iwae"),
    (r'elbo="(\w+)"', r"--elbo \1"),
    (r'estimator="(\w[\w-]*)"', r"--estimator \1"),
    (r'latent="(\w+)"', r"--latent \1"),
    (r"relaxed=True", "--relaxed"),
)


def _cli_words(text: str, iwae: bool) -> str:
    """A refusal of :func:`pyro_vae.fit`'s arguments with the command line's flags for its argument names:
    ``num_particles=K`` (and ``num_particles with estimator``) is ``--k`` under ``--objective iwae``
    (``iwae``) and ``--particles`` otherwise,
    ``elbo="iwae"`` is ``--objective iwae``, ``elbo="trace"`` is ``--elbo trace`` (``--objective elbo --elbo
    trace`` under the bound), ``estimator="x"`` is ``--estimator x``, ``relaxed=True`` is ``--relaxed``; a flag
    the message already gave in parentheses is not repeated. Only ``pyro_vae.fit``'s words are rewritten: a flag
    the message quotes as the user typed it (``--elbo meanfield``) stays as it is."""
    if iwae:  # under the bound, fit's elbo="x" is chosen by --objective elbo (--elbo is refused with --objective iwae)
        text = re.sub(r'elbo="(?!iwae")(\w+)"(?: \(--elbo \1\))?', r"--objective elbo --elbo \1", text)
    for pattern, flag in _CLI_WORDS:
        text = re.sub(pattern, flag, text)
    particles = "--k" if iwae else "--particles"
    text = re.sub(r"\bnum_particles=K\b", f"{particles} K", text)
    text = re.sub(r"\bnum_particles with estimator\b", f"{particles} with estimator", text)
    return re.sub(r"(--[a-z-]+(?: [\w-]+)*) \(\1\)", r"\1", text)


def _check_objective(args: argparse.Namespace, exact_bits: bool = False) -> None:
    """``--objective iwae`` takes ``--k`` (default 50) and neither ``--elbo`` nor ``--particles``; the run's
    reported ELBOs are then ``Trace_ELBO``'s (``args.elbo = "trace"``). ``--k`` needs ``--objective iwae``."""
    if args.objective != "iwae":
        if "elbo" not in get_estimator(args.estimator).objectives:
            if exact_bits:  # an exact Bernoulli latent refuses "stl" too: its message names that latent's fixes
                check_discrete_objective(args.estimator, "trace")
            raise ConfigError(message(f"--estimator {args.estimator}", "--objective iwae (it estimates the gradient of "
                                      "the importance-weighted bound)", f"--objective {args.objective}",
                                      "pass --objective iwae --k K, or --estimator stl for the ELBO"))
        if args.k is not None:
            raise ConfigError(message("--k", "--objective iwae (importance samples of the bound)",
                                      f"--objective {args.objective}", "pass --objective iwae, or --particles N for "
                                      "the ELBO's particles"))
        return
    if args.elbo is not None:
        raise ConfigError(message("--elbo", "no --elbo with --objective iwae (the bound has no KL term to choose)",
                                  f"--elbo {args.elbo}", "drop --elbo (the run's ELBOs are reported by Trace_ELBO)"))
    if args.particles != 1:
        raise ConfigError(message("--particles", "1 with --objective iwae", f"--particles {args.particles}",
                                  "set the bound's importance samples with --k"))
    args.k = 50 if args.k is None else args.k
    args.elbo = "trace"


def _check_resume(out: Path, data_cfg: dict[str, Any]) -> bool:
    """Check, reading only, that ``out`` is a run to continue with these data options; return whether it has a
    checkpoint (``False``: it stopped before its first one, and training starts from step 0)."""
    run = checkpoint.RunFolder(out)
    if not out.is_dir() or not run.started():
        raise checkpoint.CheckpointError(message(
            f"--out {out}", "the folder of a run to resume", f"{checkpoint.describe(out)}"
            f"{', not a pyro-vae run' if out.is_dir() else ''}",
            "drop --resume to start a new run, or pass the run's folder"))
    recorded = run.recorded()
    if checkpoint.CONFIG in recorded:
        stored = run.read_json(checkpoint.CONFIG)
        stored = stored.get("data") if isinstance(stored, dict) else None
        for key, value in data_cfg.items():
            if isinstance(stored, dict) and key in stored and stored[key] != value:
                raise checkpoint.CheckpointError(message(
                    f"--resume {out}", f"--{key.replace('_', '-')} {stored[key]} (as in the run's config.json)",
                    repr(value), "pass the options of the original run"))
    return checkpoint.CHECKPOINT in recorded or (not recorded and (out / checkpoint.CHECKPOINT).is_file())


class _RunConfig:
    """A callback that, once :func:`pyro_vae.fit` has checked its arguments and locked the run folder, takes
    its own hold of the lock (kept until the command ends) and commits ``config.json``."""

    def __init__(self, out: Path, config: bytes, held: contextlib.ExitStack, is_main: bool) -> None:
        self.out, self.config, self.held, self.is_main = out, config, held, is_main

    def on_fit_start(self, state: Any) -> None:
        if self.is_main:
            run = checkpoint.RunFolder(self.out)
            self.held.enter_context(run.lock())
            run.commit({checkpoint.CONFIG: self.config})


class _NamePath:
    """Give a disk error without a file name (a full disk while writing pictures) the run folder's name."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> _NamePath:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        disk = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
        if isinstance(exc, OSError) and not exc.filename and exc.errno in disk:
            exc.filename = f"{self.out} (the run folder)"


def _train(args: argparse.Namespace, ctx: Any, device: Any, held: contextlib.ExitStack) -> int:
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.data).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.out is None:
        out = Path(distributed.broadcast_object(str(out)))
    held.enter_context(_NamePath(out))
    data_cfg = {"data": args.data, "data_dir": args.data_dir, "binarize": args.binarize, "seed": args.seed,
                "scale": args.scale}
    resume_from = None  # everything is checked, reading only, before the run folder is written
    done = _Done()
    if args.resume:
        if distributed.rank0_call(lambda: _check_resume(out, data_cfg)):
            resume_from = out
            done = distributed.rank0_call(lambda: _epochs_done(out))
            if not _epochs_to_train(out, done, args.epochs):
                if ctx.is_main:
                    print(f"{out} already trained {done.epochs} epochs; nothing to do (pass --epochs N > "
                          f"{done.epochs} to train more)")
                return 0
        elif ctx.is_main:
            print(f"pyro-vae train: --resume: {out} holds no checkpoint (the run stopped before its first one); "
                  "training starts from step 0", file=sys.stderr)
    else:
        distributed.rank0_call(lambda: checkpoint.check_new_run(out, overwrite=args.overwrite, what="--out"))
    distributed.rank0_call(lambda: checkpoint.check_writable(out, what="--out"))
    splits = _load_data(data_cfg)
    likelihood: Any = args.likelihood
    if args.likelihood_scale is not None:
        if args.likelihood != "normal":
            raise ConfigError(message("--likelihood-scale", "--likelihood normal", args.likelihood,
                                      "drop --likelihood-scale or use --likelihood normal"))
        likelihood = {"name": "normal", "scale": args.likelihood_scale}
    pyro.clear_param_store()  # a new run: main() may be called more than once in one process
    pyro.set_rng_seed(args.seed)
    vae = VAE(splits.data_shape, args.z_dim, encoder=args.net, decoder=args.net, prior=_prior_spec(args),
              likelihood=likelihood, hidden=args.hidden, **_latent_kwargs(args))
    _check_splits(vae, splits, args.data)
    iwae = args.objective == "iwae"
    train_cfg = {"elbo": args.elbo, "estimator": args.estimator, "particles": args.particles, "epochs": args.epochs,
                 "batch_size": args.batch_size, "lr": args.lr, "device": str(device), "clip_norm": args.clip_norm,
                 "cuda_graph": args.cuda_graph}
    if iwae:
        train_cfg.update(objective="iwae", k=args.k)
    if ctx.world_size > 1:
        train_cfg["processes"] = ctx.world_size
    callbacks = _schedules(args)
    if args.tensorboard is not None:  # closed when the command ends, however it ends
        kl_x = binarize(splits.train.x[:256], args.seed) if splits.dynamic_binarize else splits.train.x
        callbacks.append(held.enter_context(TensorBoard(args.tensorboard or out / "tensorboard", data=kl_x)))
    if args.cuda_graph:  # refused before the run folder is written
        check_cuda_graph(vae, device, ctx, args.estimator, BOUNDS["iwae"]() if iwae else args.elbo, callbacks)
    run_config = _RunConfig(out, checkpoint.config_json(vae, data=data_cfg, train=train_cfg), held, ctx.is_main)
    history = fit(vae, splits.train, elbo="iwae" if iwae else args.elbo,
                  num_particles=args.k if iwae else args.particles, estimator=args.estimator,
                  epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, val_data=splits.val, device=device, seed=args.seed,
                  dynamic_binarize=splits.dynamic_binarize, progress=not args.no_progress, checkpoint_dir=out,
                  clip_norm=args.clip_norm, checkpoint_every=args.checkpoint_every or None,
                  resume_from=resume_from, callbacks=[*callbacks, run_config], cuda_graph=args.cuda_graph,
                  overwrite=args.overwrite)
    if not ctx.is_main:
        return 0
    before = _previous_reports(out)
    run = checkpoint.RunFolder(out)
    with run.lock():  # the new weights, and the reports of the old ones removed, in one commit
        run.commit({checkpoint.CONFIG: checkpoint.config_json(vae, data=data_cfg, train=train_cfg),
                    checkpoint.WEIGHTS: checkpoint.tensor_bytes({k: v.detach().cpu()
                                                                 for k, v in vae.state_dict().items()})},
                   remove=[name for name in checkpoint.REPORTS if (out / name).is_file()])
    train_x = splits.train.x
    if splits.dynamic_binarize:
        train_x = binarize(train_x, args.seed)
    elbo_name = _elbo_class_name(args.elbo)
    metrics: dict[str, Any] = {"units": "nats per data point", "how": {}}
    for split, data in (("train", train_x), ("val", splits.val), ("test", splits.test)):
        metrics[f"{split}_elbo"] = evaluate_elbo(vae, data, elbo=args.elbo)
        metrics["how"][f"{split}_elbo"] = _how(f"{elbo_name}, 1 particle per point, KL weight 1", split, len(data),
                                              "train")
    if iwae or any(e.get("beta", 1.0) != 1.0 for e in history.epochs):
        last = history.epochs[-1]
        metrics["train_objective"] = last["train_objective"]
        what = (f"the IWAE bound with {args.k} importance samples per point" if iwae else
                f"the training objective E[log p(x|z)] - beta KL (beta = {last['beta']:g} at the end)")
        metrics["how"]["train_objective"] = _how(
            f"{what}, averaged over epoch {last['epoch']}'s minibatches as they were trained", "train", len(train_x),
            "train", weights="during the last epoch")
    # the run's epochs, and the sum of history's per-epoch seconds over them (whichever command trained them)
    metrics.update({"epochs": len(history), "seconds": sum(float(e["seconds"]) for e in history.epochs),
                    "device": str(device), "torch": torch.__version__})
    checkpoint.write_json(out / checkpoint.METRICS, metrics)
    checkpoint.write_json(out / checkpoint.HISTORY, history.to_dict())
    pictures = write_pictures(vae, splits, out, history.epochs)
    print(f"{_trained_now(history.epochs, done, device)}: test ELBO {metrics['test_elbo']:.2f} nats per data point")
    gone = _removed_reports(before, metrics, pictures)
    if gone:
        print(f"removed what was computed from the previous weights: {gone} (run pyro-vae evaluate, sample, "
              "interpolate or impute again for the new weights)")
    print(f"run folder: {out}")
    print("pictures: " + ", ".join(str(p) for p in pictures))
    return 0


@dataclass(frozen=True)
class _Done:
    """What a run's checkpoint has trained: ``epochs`` complete epochs, and part of the next one when
    ``partial`` (a checkpoint written within an epoch)."""

    epochs: int = 0
    partial: bool = False


def _epochs_done(out: Path) -> _Done:
    """The progress recorded in the run folder ``out``'s ``checkpoint.pt`` (verified, read only)."""
    state = checkpoint.load_training_state(out)
    epoch, complete = int(state["epoch"]), bool(state["epoch_complete"])
    return _Done(epoch, False) if complete else _Done(epoch - 1, True)


def _epochs_to_train(out: Path, done: _Done, epochs: int) -> bool:
    """Whether ``--resume --epochs epochs`` trains anything in the run ``out`` that has trained ``done``.

    Raises:
        ConfigError: ``epochs`` is below what the run has already trained (a resume cannot shorten a run).
    """
    least = done.epochs + 1 if done.partial else done.epochs
    if epochs < least:
        trained = f"{done.epochs} epochs" + (f" and part of epoch {least}" if done.partial else "")
        raise ConfigError(message("--epochs", f"at least {least} ({out} already trained {trained}; --resume "
                                  "continues a run, it cannot shorten it)", f"--epochs {epochs}",
                                  f"pass --epochs {least} or more, or start a new run in another --out"))
    return epochs > done.epochs


def _trained_now(records: list[dict[str, Any]], done: _Done, device: Any) -> str:
    """What this command trained and how long its epochs took (the history's per-epoch seconds of the epochs it
    ran; a resumed epoch counts the part this command ran)."""
    now = records[done.epochs:]
    seconds = sum(float(e["seconds"]) for e in now)
    if done.epochs == 0 and not done.partial:
        return f"trained {len(now)} epochs in {seconds:.1f} s on {device}"
    first, last = (now[0]["epoch"], now[-1]["epoch"]) if now else (done.epochs + 1, done.epochs)
    which = f"epoch {first}" if first == last else f"epochs {first}-{last}"
    where = f"within epoch {first}" if done.partial else f"after epoch {done.epochs}"
    return f"resumed {where} and trained {which} in {seconds:.1f} s on {device} (the run has {len(records)} epochs)"


def _previous_reports(out: Path) -> dict[str, Any]:
    """The reports in ``out`` before the new weights are committed: ``{"files": names, "metrics": keys}``."""
    keys: list[str] = []
    with contextlib.suppress(PyroVAEError, OSError):
        found = checkpoint.read_json(out / checkpoint.METRICS) if (out / checkpoint.METRICS).is_file() else {}
        keys = list(found) if isinstance(found, dict) else []
    return {"files": [n for n in checkpoint.REPORTS if (out / n).is_file()], "metrics": keys}


def _removed_reports(before: dict[str, Any], metrics: dict[str, Any], pictures: Sequence[Path]) -> str:
    """In words, what the commit of new weights removed for good: the values of ``metrics.json`` and the files
    that this command did not write again (those of ``evaluate``, ``sample``, ``interpolate``, ``impute``)."""
    keys = sorted({"pareto_k_*" if k.startswith("pareto_k") else k for k in before["metrics"] if k not in metrics})
    rewritten = {checkpoint.METRICS, checkpoint.HISTORY, *(Path(p).name for p in pictures)}
    files = [n for n in before["files"] if n not in rewritten]
    parts = ([f"{', '.join(keys)} in {checkpoint.METRICS}"] if keys else []) + ([", ".join(files)] if files else [])
    return "; ".join(parts)


def _run_data(cfg: Any) -> dict[str, Any]:
    """The data section of a run's ``config.json`` (what the command reloads the splits from)."""
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(data, dict) or "data" not in data:
        raise ConfigError(message(
            "RUN/config.json", 'a "data" section naming the data set the run was trained on (written by '
            "pyro-vae train)", "none" if data is None else repr(data)[:80],
            "use a run folder written by `pyro-vae train`; for a VAE saved with pyro_vae.save, evaluate it in "
            "Python (pyro_vae.evaluate_elbo, pyro_vae.log_likelihood) with your data"))
    return data


def _load_run(run: str, device: str):
    pyro.clear_param_store()  # each command works on one VAE; main() may be called again in one process
    vae = checkpoint.load(run, map_location="cpu")
    return vae.to(resolve_device(device)), checkpoint.read_json(Path(run) / checkpoint.CONFIG)


def cmd_sample(args: argparse.Namespace) -> int:
    from pyro_vae import plots  # matplotlib: loaded only when pictures are drawn

    pyro.set_rng_seed(args.seed)
    vae, cfg = _load_run(args.run, args.device)
    vae.check_sample_size(args.n, "--n")
    out = Path(args.out) if args.out else Path(args.run) / ("samples.png" if args.source == "prior"
                                                             else f"samples-{args.source}.png")
    if args.source == "prior":
        x = vae.sample(args.n, mean=not args.draw)
    else:
        x = generation.sample(vae, args.n, args.source, data=_train_x(cfg), mean=not args.draw,
                              n_components=args.components)
    title = {"prior": "samples from the prior", "aggregate": "samples from the aggregate posterior",
             "mixture": f"samples from a {args.components}-component mixture fitted to the posterior means"}
    plots.save_image_grid(x.cpu(), out, title[args.source])
    print(f"samples: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    pyro.set_rng_seed(args.seed)
    vae, cfg = _load_run(args.run, args.device)
    splits = _load_data(_run_data(cfg))
    path = Path(args.run) / checkpoint.METRICS
    found = checkpoint.read_json(path) if path.is_file() else {}
    metrics: dict[str, Any] = found if isinstance(found, dict) else {}
    for stale in ("elbo", "elbo_particles", "elbo_iw"):  # keys of earlier versions, one value per quantity now
        metrics.pop(stale, None)
    found_how = metrics.get("how")
    how: dict[str, Any] = found_how if isinstance(found_how, dict) else {}
    metrics["how"] = how
    for stale in [key for key in metrics if key.startswith("pareto_k")]:  # recomputed below where K allows
        metrics.pop(stale)
    metrics["units"] = "nats per data point"
    n_test = len(splits.test)
    if args.iw_samples:
        metrics.update(_importance_metrics(vae, splits.test, args))
        how["test_elbo"] = _how(f"mean log importance weight, the same {args.iw_samples} samples per point as "
                                "log_likelihood, KL weight 1", "test", n_test, "evaluate")
        how["log_likelihood"] = _how(f"importance-sampled (IWAE bound), {args.iw_samples} samples per point",
                                     "test", n_test, "evaluate")
        how["gap"] = _how("log_likelihood - test_elbo, per point, from the same importance samples", "test",
                          n_test, "evaluate")
    else:
        elbo_name = cfg.get("train", {}).get("elbo", "trace")
        metrics["test_elbo"] = evaluate_elbo(vae, splits.test, elbo=elbo_name, num_particles=args.particles,
                                             batch_size=args.batch_size)
        for stale in ("log_likelihood", "log_likelihood_se", "gap", "gap_se"):  # of other weights or settings
            metrics.pop(stale, None)
            how.pop(stale, None)
        name = _elbo_class_name(elbo_name)
        how["test_elbo"] = _how(f"{name}, {args.particles} particles per point, KL weight 1", "test", n_test,
                                "evaluate")
    elbo = metrics["test_elbo"]
    if args.amortization_points > 0:
        metrics.update(evaluation.amortization_gap(vae, splits.test.x[: args.amortization_points],
                                        num_steps=args.amortization_steps, seed=args.seed).to_dict())
        how["amortization_gap"] = _how(f"optimized per-point Gaussian guide ({args.amortization_steps} Adam steps) "
                                       "against the encoder, KL weight 1", "test", args.amortization_points,
                                       "evaluate")
        print(f"amortization gap {metrics['amortization_gap']:.3f} +- {metrics['amortization_gap_se']:.3f} "
              f"nats per data point ({metrics['amortization_points']} test points)")
    checkpoint.write_json(path, metrics)
    print(f"test ELBO {elbo:.3f} nats per data point ({n_test} points; {how['test_elbo']['estimate']})")
    if args.iw_samples:
        print(f"test log p(x) {metrics['log_likelihood']:.3f} +- {metrics['log_likelihood_se']:.3f} "
              f"(K = {args.iw_samples}), gap log p(x) - ELBO {metrics['gap']:.3f}, "
              f"{metrics['active_units']} active units, " + _pareto_summary(metrics))
    print(f"metrics: {path}")
    return 0


def _pareto_summary(metrics: dict[str, Any]) -> str:
    if "pareto_k_frac_above_0.7" not in metrics:
        return f"no Pareto k (it needs --iw-samples >= {evaluation.PARETO_K_MIN_SAMPLES})"
    return f"Pareto k > 0.7 for {metrics['pareto_k_frac_above_0.7']:.1%} of points"


def _elbo_class_name(name: str) -> str:
    """``Trace_ELBO`` for ``"trace"``, ``TraceMeanField_ELBO`` for ``"meanfield"`` (the names of train.ELBOS)."""
    return ELBOS[name].__name__ if name in ELBOS else str(name)


def _how(estimate: str, split: str, points: int, command: str, weights: str = "model.pt") -> dict[str, Any]:
    """How a number in ``metrics.json`` was computed: the estimator (samples, KL weight), the split and its
    size, the weights it used and the command that wrote it."""
    return {"estimate": estimate, "split": split, "points": int(points), "weights": weights, "command": command}


def _train_x(cfg: dict[str, Any]):
    """The run's training data as the model saw it (binarized once when it was binarized on the fly)."""
    splits = _load_data(_run_data(cfg))
    x = splits.train.x
    if splits.dynamic_binarize:
        x = binarize(x, _run_data(cfg).get("seed", 0))
    return x


def _importance_metrics(vae, test, args: argparse.Namespace) -> dict[str, Any]:
    from pyro_vae import plots  # matplotlib: loaded only when pictures are drawn

    ll = evaluation.log_likelihood(vae, test, args.iw_samples, batch_size=args.iw_batch_size,
                                   return_log_weights=args.iw_samples >= evaluation.PARETO_K_MIN_SAMPLES)
    out = ll.to_dict()
    out["test_elbo"] = out.pop("elbo")
    out["active_units"] = evaluation.active_units(vae, test)
    if ll.log_weights is not None:
        plots.save_pareto_k(ll.pareto_k(), Path(args.run) / "pareto_k.png")
    return out


def cmd_interpolate(args: argparse.Namespace) -> int:
    from pyro_vae import plots  # matplotlib: loaded only when pictures are drawn

    pyro.set_rng_seed(args.seed)
    vae, cfg = _load_run(args.run, args.device)
    decoded = (args.pairs * args.steps + 9 * vae.z_dim) * math.prod(vae.data_shape)  # both pictures' points
    check_memory("--pairs x --steps", 4 * 4 * decoded, vae.device, "pass fewer --pairs or --steps",
                 f"{args.pairs} x {args.steps} decoded points")
    test = _load_data(_run_data(cfg)).test.x
    if len(test) < 2 * args.pairs:
        raise ConfigError(message("--pairs", f"at most {len(test) // 2} (half the test points)", str(args.pairs),
                                  "pass fewer pairs"))
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(test), generator=g)[: 2 * args.pairs]
    x = test[idx].to(vae.device)
    out = Path(args.out) if args.out else Path(args.run)
    paths = generation.interpolate(vae, x[: args.pairs], x[args.pairs:], args.steps, args.method)
    p1 = plots.save_interpolations(paths.cpu(), out / "interpolations.png", args.method)
    # a categorical latent is traversed class by class (its rows: one variable set to each class), a Bernoulli
    # one bit by bit (0 and 1)
    bits = vae.latent == "bernoulli"
    values = torch.linspace(-args.span, args.span, 9) if vae.categories is None and not bits else None
    grid = generation.traverse(vae, x[0], values=values)
    labels = values.tolist() if values is not None else [0, 1] if bits else list(range(vae.categories))
    p2 = plots.save_traversals(grid.cpu(), out / "traversals.png", labels)
    print(f"interpolations: {p1}")
    print(f"traversals: {p2}")
    return 0


def _load_mask(spec: str, data_shape: tuple, n: int, seed: int):
    if spec.endswith((".npy", ".pt")):
        if spec.endswith(".npy"):
            try:
                arr = torch.as_tensor(np.load(spec, allow_pickle=False))
            except (OSError, ValueError) as e:
                raise ConfigError(message("--mask", "a readable .npy boolean array", f"{spec} ({e})",
                                          "save the mask with np.save")) from None
        else:
            arr = checkpoint.load_tensors(spec)
        if not torch.is_tensor(arr) or tuple(arr.shape[-len(data_shape):]) != tuple(data_shape):
            raise ConfigError(message("--mask", f"a boolean array of shape {tuple(data_shape)} or (N, ...)",
                                      f"shape {tuple(arr.shape) if torch.is_tensor(arr) else type(arr).__name__}",
                                      "save one mask per data point or one for all"))
        arr = arr.bool()
        return arr.expand(n, *data_shape) if arr.dim() == len(data_shape) else arr[:n]
    return imputation.make_mask(data_shape, spec, n, seed=seed)


def cmd_impute(args: argparse.Namespace) -> int:
    from pyro_vae import plots  # matplotlib: loaded only when pictures are drawn

    pyro.set_rng_seed(args.seed)
    vae, cfg = _load_run(args.run, args.device)
    splits = _load_data(_run_data(cfg))
    test = splits.test.x if args.n is None else splits.test.x[: args.n]
    mask = _load_mask(args.mask, vae.data_shape, len(test), args.seed)
    if mask.shape[0] != len(test):
        raise ConfigError(message("--mask", f"{len(test)} masks (one per test point)", f"{mask.shape[0]}",
                                  "pass one mask for all points or pass --n"))
    imputed = imputation.impute(vae, test, mask, method=args.method, num_samples=args.samples,
                                num_iters=args.iters, seed=args.seed).cpu()
    err = imputation.masked_error(test, imputed, mask)
    base = imputation.masked_error(test, torch.where(mask, test, _train_x(cfg).mean(0)), mask)
    out = Path(args.out) if args.out else Path(args.run)
    picture = plots.save_imputations(test[:16], mask[:16], imputed[:16], out / "imputations.png")
    result = {"mask": args.mask, "method": args.method, "num_points": len(test),
              "mse_missing": float(err.mean()),
              "mse_missing_se": float(err.std() / len(err) ** 0.5) if len(err) > 1 else None,  # None: one point
              "mse_missing_mean_fill": float(base.mean()), "missing_fraction": float((~mask).float().mean())}
    checkpoint.write_json(out / "imputation.json", result)
    se = result["mse_missing_se"]
    print(f"imputation ({args.method}, mask {args.mask}): mean squared error on the hidden entries "
          f"{result['mse_missing']:.4f}" + ("" if se is None else f" +- {se:.4f}") + ", per-entry training mean "
          f"{result['mse_missing_mean_fill']:.4f}")
    print(f"pictures: {picture}; results: {out / 'imputation.json'}")
    return 0


def _first_line(e: BaseException) -> str:
    """The error's own line: Pyro appends its trace's shape table to errors raised inside a model or guide."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status: 0, 2 for an error (one line on stderr; a value refused while
    parsing included), 130 when interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a refused value (2): argparse has printed its line
        return e.code if isinstance(e.code, int) else 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PyroVAEError as e:
        if args.debug:
            raise
        print(f"pyro-vae {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that fills up or a folder that disappears during the run
        if args.debug:
            raise
        print(f"pyro-vae {args.command}: error: {e.filename or 'file system'}: {e.strerror or e}. Fix: check "
              "the path, its permissions and the free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted) and e.checkpoint:
            words = list(sys.argv[1:] if argv is None else argv)
            resume = shlex.join(["pyro-vae", *words, *([] if "--resume" in words else ["--resume"])])
            print(f"pyro-vae {args.command}: {str(e).split('; checkpoint')[0]}; checkpoint written to "
                  f"{e.checkpoint}\nresume with: {resume}", file=sys.stderr)
        else:
            print(f"pyro-vae {args.command}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
