"""Fill in the hidden half of handwritten digits with a VAE.

Trains a small VAE on scikit-learn's 8x8 digits (or loads a run folder written by `pyro-vae train`), hides
half of each test digit, and completes it two ways:

- importance sampling: E[x_missing | x_observed] = E_{p(z | x_observed)} E[x_missing | z], estimated with
  the encoder as the proposal and weights p(z) p(x_observed | z) / q(z | x) that score only the observed
  pixels;
- Metropolis-within-Gibbs (Mattei & Frellsen 2018): propose z ~ q(z | x), accept or reject it with the
  ratio of importance weights, draw x_missing ~ p(x_missing | z); a chain targeting p(x_missing | x_observed);
- pseudo-Gibbs (Rezende et al. 2014): alternate z ~ q(z | x) and x_missing <- E[x_missing | z].

Both are compared with the simplest baseline, filling each hidden pixel with its mean over the training set.

    python examples/impute_digits.py --epochs 60 --mask bottom --out runs/impute-digits
    python examples/impute_digits.py --run runs/demo --mask random:0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyro
import torch

import pyro_vae
from pyro_vae import imputation, plots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a run folder from `pyro-vae train` (skips training)")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs when no --run is given")
    parser.add_argument("--z-dim", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mask", default="bottom", help="top, bottom, left, right or random:P")
    parser.add_argument("--samples", type=int, default=500, help="importance samples per digit")
    parser.add_argument("--iters", type=int, default=60, help="chain length of the metropolis and gibbs methods")
    parser.add_argument("--n", type=int, default=None, help="number of test digits (default all)")
    parser.add_argument("--out", default="runs/impute-digits", help="folder for the picture and the JSON")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pyro.set_rng_seed(args.seed)
    splits = pyro_vae.data.load("digits", seed=args.seed)  # (N, 1, 8, 8) grey levels in [0, 1]
    if args.run:
        vae = pyro_vae.load(args.run).to(pyro_vae.validation.resolve_device(args.device))
    else:
        # Grey levels in [0, 1]: the continuous Bernoulli is the likelihood whose support fits them.
        vae = pyro_vae.VAE(splits.data_shape, args.z_dim, hidden=(args.hidden,), likelihood="continuous-bernoulli")
        pyro_vae.fit(vae, splits.train, elbo="meanfield", epochs=args.epochs, batch_size=64, lr=3e-3,
                     val_data=splits.val, device=args.device, seed=args.seed, progress=False)
    vae.eval()

    x = splits.test.x if args.n is None else splits.test.x[: args.n]
    # mask: True where a pixel is observed (Pyro's obs_mask convention); here half of each digit is hidden.
    mask = imputation.make_mask(vae.data_shape, args.mask, len(x), seed=args.seed)

    results = {}
    completions = {}
    for method in imputation.METHODS:
        filled = imputation.impute(vae, x, mask, method=method, num_samples=args.samples, num_iters=args.iters,
                                   seed=args.seed).cpu()
        err = imputation.masked_error(x, filled, mask)
        completions[method] = filled
        results[method] = {"mse": float(err.mean()), "se": float(err.std() / len(err) ** 0.5)}
    # The baseline: every hidden pixel gets its mean over the training digits.
    mean_fill = torch.where(mask, x, splits.train.x.mean(0))
    err = imputation.masked_error(x, mean_fill, mask)
    results["per-pixel mean"] = {"mse": float(err.mean()), "se": float(err.std() / len(err) ** 0.5)}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    picture = plots.save_imputations(x[:16], mask[:16], completions["importance"][:16], out / "imputations.png")
    (out / "imputation.json").write_text(json.dumps({"mask": args.mask, "num_points": len(x), **results},
                                                    indent=2) + "\n")
    print(f"mean squared error on the hidden pixels ({args.mask} hidden, {len(x)} test digits):")
    for name, r in results.items():
        print(f"  {name:>15}: {r['mse']:.4f} +- {r['se']:.4f}")
    print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
