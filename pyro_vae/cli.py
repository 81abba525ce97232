"""The ``pyro-vae`` command line: ``train``, ``sample``, ``evaluate``.

Every run writes its folder: ``config.json``, ``model.pt``, ``metrics.json``, ``history.json`` and the
pictures. Errors print one line and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import ConfigError, PyroVAEError, message

__all__ = ["main", "build_parser"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed for Pyro, torch, numpy and the data splits")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .data import BINARIZE
    from .likelihoods import LIKELIHOODS
    from .priors import PRIORS
    from .train import ELBOS

    p = sub.add_parser("train", help="train a VAE and write its run folder",
                       description="Train a VAE by stochastic variational inference and write a run folder "
                                   "(config, weights, metrics, history, pictures).")
    p.add_argument("--data", default="digits",
                   help="digits (embedded, no download), mnist, fashion-mnist, kmnist, or a .npy/.pt file")
    p.add_argument("--data-dir", default=None,
                   help="torchvision root, or a folder holding the raw IDX files (e.g. ../shared/data/mnist)")
    p.add_argument("--binarize", default="none", choices=BINARIZE,
                   help="none: grey levels; static: one seeded draw; dynamic: a fresh draw every batch")
    p.add_argument("--z-dim", type=int, default=8, help="number of latent dimensions")
    p.add_argument("--net", default="mlp", choices=("mlp", "conv"), help="encoder and decoder networks")
    p.add_argument("--hidden", type=int, nargs="+", default=[400], help="hidden layer sizes of the MLPs")
    p.add_argument("--likelihood", default="continuous-bernoulli", choices=sorted(LIKELIHOODS),
                   help="p(x|z): bernoulli (binary data), continuous-bernoulli (grey levels), normal, "
                        "normal-learned")
    p.add_argument("--likelihood-scale", type=float, default=None,
                   help="standard deviation of the 'normal' likelihood (default 0.1)")
    p.add_argument("--prior", default="normal", choices=sorted(PRIORS), help="p(z)")
    p.add_argument("--elbo", default="meanfield", choices=sorted(ELBOS),
                   help="trace: Trace_ELBO (Monte Carlo KL); meanfield: TraceMeanField_ELBO (analytic KL)")
    p.add_argument("--particles", type=int, default=1, help="Monte Carlo particles per step (vectorized)")
    p.add_argument("--epochs", type=int, default=50, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=128, help="minibatch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--out", default=None, help="run folder (default runs/<data>-<time>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_train)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw samples from a trained VAE into a PNG",
                       description="Ancestral samples z ~ p(z), x = E[x | z], drawn as an image grid.")
    p.add_argument("run", help="run folder written by `pyro-vae train`")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", default=None, help="PNG file (default RUN/samples.png)")
    p.add_argument("--draw", action="store_true", help="draw x from the likelihood instead of its mean")
    _add_common(p)
    p.set_defaults(func=cmd_sample)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a trained VAE on its test split",
                       description="Test ELBO per data point (nats), written into RUN/metrics.json.")
    p.add_argument("run", help="run folder written by `pyro-vae train`")
    p.add_argument("--particles", type=int, default=10, help="Monte Carlo particles for the ELBO")
    p.add_argument("--batch-size", type=int, default=512, help="evaluation batch size")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders in Pyro.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_train, _add_sample, _add_evaluate):
        add(sub)
    return parser


# ----------------------------------------------------------------------------------------------- commands
def _load_data(cfg: dict[str, Any]):
    from . import data

    return data.load(cfg["data"], cfg.get("data_dir"), binarize_mode=cfg.get("binarize", "none"),
                     seed=cfg.get("seed", 0))


def _check_out(path: Path) -> None:
    """Fail before training when the run folder cannot be written."""
    import os
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(message("--out", "a writable folder", f"{path} ({e.strerror})",
                                  "pick another folder or free some space")) from None


def write_pictures(vae, splits, run: Path, history: Optional[list] = None, n: int = 64) -> list[Path]:
    import torch

    from . import plots

    vae.eval()
    device = vae._device()
    paths = [plots.save_image_grid(vae.sample(n).cpu(), run / "samples.png", "samples from the prior")]
    test = splits.test
    xt = test.x[:16].to(device)
    paths.append(plots.save_reconstructions(xt.cpu(), vae.reconstruct(xt).cpu(), run / "reconstructions.png"))
    if history:
        paths.append(plots.save_elbo_curve(history, run / "elbo.png"))
    with torch.no_grad():
        z = torch.cat([vae.encode(test.x[i: i + 1024].to(device)).cpu() for i in range(0, len(test), 1024)])
    paths.append(plots.save_latent_map(z.reshape(z.shape[0], -1), test.y, run / "latent.png"))
    return paths


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from . import checkpoint
    from .train import evaluate_elbo, fit, resolve_device
    from .vae import VAE

    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.data).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out(out)
    device = resolve_device(args.device)
    data_cfg = {"data": args.data, "data_dir": args.data_dir, "binarize": args.binarize, "seed": args.seed}
    splits = _load_data(data_cfg)
    likelihood: Any = args.likelihood
    if args.likelihood_scale is not None:
        if args.likelihood != "normal":
            raise ConfigError(message("--likelihood-scale", "--likelihood normal", args.likelihood,
                                      "drop --likelihood-scale or use --likelihood normal"))
        likelihood = {"name": "normal", "scale": args.likelihood_scale}
    vae = VAE(splits.data_shape, args.z_dim, encoder=args.net, decoder=args.net, prior=args.prior,
              likelihood=likelihood, hidden=args.hidden)
    train_cfg = {"elbo": args.elbo, "particles": args.particles, "epochs": args.epochs,
                 "batch_size": args.batch_size, "lr": args.lr, "device": str(device)}
    checkpoint.save(vae, out, data=data_cfg, train=train_cfg)
    start = time.perf_counter()
    history = fit(vae, splits.train, elbo=args.elbo, num_particles=args.particles, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, val_data=splits.val, device=device, seed=args.seed,
                  dynamic_binarize=splits.dynamic_binarize, progress=not args.no_progress, checkpoint_dir=out)
    seconds = time.perf_counter() - start
    checkpoint.save(vae, out, data=data_cfg, train=train_cfg)
    train_x = splits.train.x
    if splits.dynamic_binarize:
        from .data import binarize

        train_x = binarize(train_x, args.seed)
    metrics = {
        "train_elbo": evaluate_elbo(vae, train_x, elbo=args.elbo),
        "val_elbo": evaluate_elbo(vae, splits.val, elbo=args.elbo),
        "test_elbo": evaluate_elbo(vae, splits.test, elbo=args.elbo),
        "epochs": len(history), "seconds": seconds, "device": str(device), "units": "nats per data point",
        "torch": torch.__version__,
    }
    checkpoint.write_json(out / checkpoint.METRICS, metrics)
    checkpoint.write_json(out / checkpoint.HISTORY, history.to_dict())
    pictures = write_pictures(vae, splits, out, history.epochs)
    print(f"trained {len(history)} epochs in {seconds:.1f} s on {device}: test ELBO {metrics['test_elbo']:.2f} "
          f"nats per data point")
    print(f"run folder: {out}")
    print("pictures: " + ", ".join(str(p) for p in pictures))
    return 0


def _load_run(run: str, device: str):
    from . import checkpoint
    from .train import resolve_device

    vae = checkpoint.load(run, map_location="cpu")
    return vae.to(resolve_device(device)), checkpoint.read_json(Path(run) / checkpoint.CONFIG)


def cmd_sample(args: argparse.Namespace) -> int:
    import pyro

    from . import plots

    if args.n < 1:
        raise ConfigError(message("--n", "an integer >= 1", str(args.n), "pass --n 64"))
    pyro.set_rng_seed(args.seed)
    vae, _ = _load_run(args.run, args.device)
    out = Path(args.out) if args.out else Path(args.run) / "samples.png"
    plots.save_image_grid(vae.sample(args.n, mean=not args.draw).cpu(), out, "samples from the prior")
    print(f"samples: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import pyro

    from . import checkpoint
    from .train import evaluate_elbo

    pyro.set_rng_seed(args.seed)
    vae, cfg = _load_run(args.run, args.device)
    splits = _load_data(cfg["data"])
    elbo = evaluate_elbo(vae, splits.test, elbo=cfg.get("train", {}).get("elbo", "trace"),
                         num_particles=args.particles, batch_size=args.batch_size)
    path = Path(args.run) / checkpoint.METRICS
    metrics = checkpoint.read_json(path) if path.is_file() else {}
    metrics.update({"elbo": elbo, "elbo_particles": args.particles, "units": "nats per data point"})
    checkpoint.write_json(path, metrics)
    print(f"test ELBO {elbo:.3f} nats per data point ({len(splits.test)} points, {args.particles} particles)")
    print(f"metrics: {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except PyroVAEError as e:
        if args.debug:
            raise
        print(f"pyro-vae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyro-vae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
