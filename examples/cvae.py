"""Image completion with a conditional VAE (Sohn et al. 2015), after Pyro's examples/cvae.

The context c is the observed top half of an image and x the unobserved bottom half:
p(z | c) is a learned prior network, p(x | z, c) the decoder and q(z | x, c) the encoder. Different z drawn
from p(z | c) give different plausible completions of the same top half, which a plain regression network
(one answer per input) cannot show.

    python examples/cvae.py                     # digits, about a minute on a CPU
    python examples/cvae.py --data mnist --data-dir /work/shared/data/mnist --epochs 20 --device auto
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

import pyro_vae
from pyro_vae.models.cvae import CVAE
from pyro_vae.validation import resolve_device


def halves(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 1, H, W)`` images to flat top halves (the context) and bottom halves (what to predict)."""
    h = images.shape[-2] // 2
    return images[..., :h, :].flatten(1), images[..., h:, :].flatten(1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits")
    p.add_argument("--data-dir", default="/work/shared/data/mnist")
    p.add_argument("--z-dim", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--completions", type=int, default=6, help="completions drawn per test image in the picture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="cvae.json")
    p.add_argument("--plot", default="cvae_completions.png")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    pyro.set_rng_seed(args.seed)

    splits = pyro_vae.data.load(args.data, args.data_dir if args.data != "digits" else None, seed=args.seed)
    c_train, x_train = (t.to(device) for t in halves(splits.train.x))
    c_test, x_test = (t.to(device) for t in halves(splits.test.x))
    n = len(x_train)

    # Grey levels in [0, 1]: the continuous Bernoulli is their normalized likelihood.
    cvae = CVAE(x_train.shape[1:], c_train.shape[1:], args.z_dim, hidden=(args.hidden,),
                likelihood="continuous-bernoulli").to(device)

    # Plain Pyro SVI over the model/guide pair; minibatches are scaled to the full training set by num_data.
    svi = SVI(cvae.model, cvae.guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for idx in torch.randperm(n, device=device).split(args.batch_size):
            total += svi.step(c_train[idx], x_train[idx], num_data=n)
        if epoch == 1 or epoch % 10 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}  -ELBO per point {total / len(range(0, n, args.batch_size)) / n:9.3f}")

    # Test: -ELBO per point of log p(x | c), and the error of the mean completion.
    with torch.no_grad():
        test_loss = Trace_ELBO(num_particles=10, vectorize_particles=True, max_plate_nesting=1).loss(
            cvae.model, cvae.guide, c_test, x_test) / len(x_test)
        # Predictive without a guide samples z ~ p(z | c) and then x: completions of each top half.
        draws = Predictive(cvae.model, num_samples=args.completions, return_sites=["x", "_RETURN"])(c_test)
        mean_completion = cvae.complete(c_test, num_samples=64).mean(0)
        rmse = float((mean_completion - x_test).pow(2).mean().sqrt())
    print(f"test -ELBO per point {test_loss:.3f}; RMSE of the mean completion {rmse:.4f}")

    # Picture: each row is one test image: the truth, the top half alone, then completions (likelihood means).
    k, shape = min(8, len(x_test)), splits.test.x.shape[1:]
    h = shape[-2] // 2
    blank = torch.full_like(x_test[:k], 0.5)
    means = cvae.likelihood_dist(draws["_RETURN"][:, :k]).mean  # (completions, k, D)
    rows = [torch.cat([c_test[:k], x_test[:k]], -1), torch.cat([c_test[:k], blank], -1)]
    rows += [torch.cat([c_test[:k], m], -1) for m in means]
    grid = torch.stack(rows, 1).reshape(-1, *shape).clamp(0, 1).cpu()
    pyro_vae.plots.save_image_grid(grid, args.plot, ncol=len(rows),
                                   title=f"truth | top half | {args.completions} completions from p(z|c)")
    result = {"data": args.data, "test_neg_elbo_per_point": test_loss, "rmse_mean_completion": rmse,
              "context_rows": h, "config": vars(args), "torch": torch.__version__, "pyro": pyro.__version__,
              "device": str(device)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} and {args.plot}")
    return result


if __name__ == "__main__":
    main()
