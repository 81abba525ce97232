"""The README's quickstart: a VAE on the 8x8 digits trained with plain Pyro SVI.

    python examples/quickstart.py --steps 2000
"""

import argparse

import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

import pyro_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--z-dim", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pyro.set_rng_seed(args.seed)
    splits = pyro_vae.data.load("digits")              # (N, 1, 8, 8) grey levels in [0, 1], no download
    x = splits.train.x.flatten(1)                       # (N, 64): the MLP VAE works on flat vectors too
    vae = pyro_vae.VAE(data_shape=(64,), z_dim=args.z_dim, likelihood="continuous-bernoulli")
    # vae.model and vae.guide are plain Pyro callables: any SVI objective and optimizer works with them.
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    for step in range(1, args.steps + 1):
        batch = x[torch.randint(len(x), (args.batch_size,))]
        loss = svi.step(batch, num_data=len(x))         # the minibatch ELBO is scaled to the full data set
        if step % max(1, args.steps // 10) == 0:
            print(f"step {step:5d}  ELBO per data point {-loss / len(x):8.2f} nats")
    val = pyro_vae.evaluate_elbo(vae, splits.val.x.flatten(1))
    print(f"validation ELBO {val:.2f} nats per data point")


if __name__ == "__main__":
    main()
