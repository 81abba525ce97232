"""A global latent variable around a VAE, learned together with the amortized local latents under one SVI.

The likelihood's noise scale sigma is not a constant but a random variable with its own prior,
sigma ~ LogNormal(log 0.1, 1), shared by every data point; each data point keeps its own z. The model is the
user's: it samples sigma, then calls vae.model with sigma as context, which the VAE passes on to its likelihood
(likelihood(decoder_output, sigma=sigma)). The guide is AutoNormal for sigma (an autoguide on the
global site only, through poutine.block) followed by the VAE's amortized encoder for z.
Then the usual Pyro tools work on the sites: Predictive for posterior predictive draws, poutine.condition
to fix sigma as data, poutine.do to intervene on it.

    python examples/global_latent.py            # digits, under a minute on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

import pyro_vae
from pyro_vae.validation import resolve_device


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--z-dim", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-samples", type=int, default=200, help="posterior draws for Predictive")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="global_latent.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    pyro.set_rng_seed(args.seed)

    splits = pyro_vae.data.load("digits", seed=args.seed)
    x_train, x_test = splits.train.x.flatten(1).to(device), splits.test.x.flatten(1).to(device)
    n = len(x_train)

    # The VAE's likelihood takes the noise scale as context: vae.model(..., sigma=sigma) calls
    # likelihood(decoder_output, sigma=sigma) inside its data plate (**context takes and ignores any other
    # context). name="vae" prefixes its sites ("vae/z", "vae/x") and plate ("vae/data"), so they cannot clash
    # with the user's.
    def likelihood(out, sigma, **context):
        return dist.Normal(out, sigma)

    vae = pyro_vae.VAE((64,), args.z_dim, hidden=(args.hidden,), name="vae", likelihood=likelihood).to(device)

    def model(x=None, num_data=None, batch_size=None):
        # Global: outside every plate, so it is neither repeated per point nor scaled by num_data / batch.
        sigma = pyro.sample("sigma", dist.LogNormal(torch.tensor(math.log(0.1), device=device),
                                                    torch.tensor(1.0, device=device)))
        # Local: the VAE's own plate, minibatch scaling and latent site; sigma goes in as context, with one
        # trailing size-1 dimension for the data dimension, so that it broadcasts against the decoder's output
        # also under vectorized particles (sigma of shape (P, 1) there).
        return vae.model(x, num_data=num_data, batch_size=batch_size, sigma=sigma[..., None])

    # The guide: AutoNormal learns q(sigma); the VAE's encoder gives q(z | x) per data point.
    # (A plain function joins them: AutoGuideList would open the "vae/data" plate a second time.)
    global_guide = AutoNormal(poutine.block(model, expose=["sigma"]))

    def guide(x=None, num_data=None, batch_size=None):
        global_guide(x, num_data, batch_size)
        return vae.guide(x, num_data=num_data)

    svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for idx in torch.randperm(n, device=device).split(args.batch_size):
            total += svi.step(x_train[idx], num_data=n)
        if epoch == 1 or epoch % 10 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}  -ELBO per point {total / math.ceil(n / args.batch_size) / n:9.3f}")

    with torch.no_grad():
        # Posterior draws of the global and the local latents for the test images, from the guide ...
        post = Predictive(model, guide=guide, num_samples=args.num_samples,
                          return_sites=["sigma", "vae/z"])(x_test)
        sigma = post["sigma"].flatten()
        # ... and replicated data from the model given those draws: the posterior predictive.
        rep = Predictive(model, posterior_samples=post, return_sites=["vae/x", "_RETURN"])(
            None, batch_size=len(x_test))
        residual = (rep["vae/x"] - rep["_RETURN"]).std()  # spread of x_rep around the decoder's mean
        # For reference: the reconstruction error of the test images under the posterior mean of z (the
        # likelihood's mean does not depend on sigma, but the likelihood takes it: pass the posterior mean).
        rmse = float((vae.reconstruct(x_test, sigma=sigma.mean()) - x_test).pow(2).mean().sqrt())

        # poutine.condition: sigma given as data; the trace holds it as an observed site.
        fixed = poutine.trace(poutine.condition(model, data={"sigma": torch.tensor(0.05, device=device)})
                              ).get_trace(x_test[:4])
        # poutine.do: an intervention; sigma is set and no longer a random variable of the model.
        loud = Predictive(poutine.do(model, data={"sigma": torch.tensor(0.3, device=device)}), num_samples=1,
                          return_sites=["vae/x", "_RETURN"])(None, batch_size=len(x_test))
        loud_spread = float((loud["vae/x"] - loud["_RETURN"]).std())

    print(f"q(sigma): mean {float(sigma.mean()):.4f}, sd {float(sigma.std()):.4f} "
          f"(test reconstruction RMSE {rmse:.4f})")
    print(f"posterior predictive: {tuple(rep['vae/x'].shape)} draws of x_rep, spread around the mean "
          f"{float(residual):.4f}")
    print(f"condition(sigma=0.05): site observed = {fixed.nodes['sigma']['is_observed']}; "
          f"do(sigma=0.3): spread of x {loud_spread:.4f}")
    result = {"sigma_posterior_mean": float(sigma.mean()), "sigma_posterior_sd": float(sigma.std()),
              "test_reconstruction_rmse": rmse, "posterior_predictive_spread": float(residual),
              "do_sigma_0.3_spread": loud_spread, "config": vars(args), "device": str(device),
              "torch": torch.__version__, "pyro": pyro.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
