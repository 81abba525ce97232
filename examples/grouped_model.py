"""A grouped Bayesian model with the VAE as its local part, trained by pyro_vae.fit and used with Pyro's tools.

Each of N items is observed once in each of G groups, so the data have shape (N, G, D). Group g shifts every
observation in it by an offset o_g ~ Normal(0, I) (one per group, in a "groups" plate that encloses the VAE),
every observation shares one noise scale s ~ LogNormal(log 0.3, 0.5), and each observation has its own latent
z from the VAE:

    o_g ~ Normal(0, I)        s ~ LogNormal(log 0.3, 0.5)        z[n, g] ~ Normal(0, I)
    x[n, g] ~ Normal(decoder(z[n, g]) + o_g, s)

The offset and the scale reach the VAE's likelihood as named context: vae.model(x, offset=o, scale=s[..., None])
calls likelihood(decoder_output, offset=o, scale=s[..., None]) inside the VAE's data plate; the trailing dimension
aligns the global scale with the data dimension, so that the model also trains with vectorized particles
(--particles 2). The model/guide pair goes to pyro_vae.fit as a ModelGuidePair: the items are the data points
(minibatched, their sites scaled by N / batch), the offsets and the scale are global latents (not scaled), as
under pyro.infer.SVI.

Part 1: a hand-written guide; Predictive posterior predictive draws, poutine.condition / poutine.do
interventions on the offsets, log_likelihood given the global latents. Part 2: an AutoNormal guide for the
global latents inside the outer plate: the recipe that works (create_plates) and the error that names it when
the clashing one (the autoguide called inside the guide's own "groups" plate) is tried.

    python examples/grouped_model.py            # synthetic data, about a minute on a CPU
    python examples/grouped_model.py --quick    # a few seconds (what the tests run)
    python examples/grouped_model.py --quick --particles 2    # vectorized particles
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
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal

import pyro_vae
from pyro_vae.validation import resolve_device


def make_data(num_items: int, offsets: torch.Tensor, scale: float, z_dim: int, seed: int) -> torch.Tensor:
    """Synthetic data ``(num_items, G, D)`` from the model: a fixed random nonlinear decoder of ``z``, plus the
    group's offset (``offsets``: ``(G, D)``), plus Normal noise of sd ``scale``."""
    g = torch.Generator().manual_seed(seed)
    groups, dim = offsets.shape
    w1, w2 = torch.randn(z_dim, 16, generator=g), torch.randn(16, dim, generator=g) / 4
    z = torch.randn(num_items, groups, z_dim, generator=g)
    return torch.tanh(z @ w1) @ w2 + offsets + scale * torch.randn(num_items, groups, dim, generator=g)


def grouped_model(num_groups: int, dim: int, z_dim: int = 2, hidden: int = 32, device: str | torch.device = "cpu"):
    """The VAE and the grouped model around it: ``(vae, model)``, ``model(x, num_data=None, batch_size=None)``
    with ``x`` ``(batch, G, D)`` (or ``None`` and ``batch_size`` to generate)."""
    # The likelihood takes the context the model passes: the group's offset (G, 1, D) and the scale with one
    # trailing dimension per data dimension, (1,). Both broadcast against the decoder's output (G, batch, D), and
    # under P vectorized particles, (P, G, 1, D) and (P, 1, 1, 1) against (P, G, batch, D): a global draw is
    # (P, 1, 1) there, so without that trailing dimension its plate dimensions would meet (batch, D).
    # name="vae" keeps the VAE's sites apart from ours.
    vae = pyro_vae.VAE((dim,), z_dim, hidden=(hidden,), name="vae",
                       likelihood=lambda out, offset=0.0, scale=1.0: dist.Normal(out + offset, scale)).to(device)
    zero, one = torch.zeros((), device=device), torch.ones((), device=device)

    def model(x=None, num_data=None, batch_size=None):
        # Global: one scale for every observation, outside every plate (neither repeated nor scaled).
        s = pyro.sample("scale", dist.LogNormal(zero + math.log(0.3), one * 0.5))
        # One offset per group, in the "groups" plate at dim -2; the VAE's data plate over the items is dim -1.
        with pyro.plate("groups", num_groups, dim=-2):
            o = pyro.sample("offset", dist.Normal(zero, one).expand([1, dim]).to_event(1))  # (G, 1, D)
            # The VAE sees the groups as a leading batch dimension: x (G, batch, D).
            return vae.model(None if x is None else x.transpose(0, 1), num_data=num_data, batch_size=batch_size,
                             offset=o, scale=s[..., None])

    return vae, model


def hand_guide(vae, num_groups: int, dim: int):
    """q(s) q(o) q(z | x, o): LogNormal and Normal factors for the globals, the VAE's encoder for the locals
    (given the data with the group's offset removed)."""
    def guide(x=None, num_data=None, batch_size=None):
        dev = x.device
        s_loc = pyro.param("scale_loc", torch.tensor(math.log(0.3), device=dev))
        s_sd = pyro.param("scale_sd", torch.tensor(0.1, device=dev), constraint=dist.constraints.positive)
        pyro.sample("scale", dist.LogNormal(s_loc, s_sd))
        o_loc = pyro.param("offset_loc", torch.zeros(num_groups, 1, dim, device=dev))
        o_sd = pyro.param("offset_sd", torch.full((num_groups, 1, dim), 0.1, device=dev),
                          constraint=dist.constraints.positive)
        with pyro.plate("groups", num_groups, dim=-2):
            o = pyro.sample("offset", dist.Normal(o_loc, o_sd).to_event(1))
            vae.guide(x.transpose(0, 1) - o, num_data=num_data)

    return guide


def auto_guide(vae, model, num_groups: int, clash: bool = False):
    """AutoNormal for the global latents, the VAE's encoder for the locals. The working recipe: the guide opens
    its "groups" plate once and hands that plate object to the autoguide through ``create_plates``, so the
    autoguide does not build a second plate of the same name. ``clash=True`` is the recipe that does not work:
    the autoguide called inside the guide's own plate re-creates it."""
    if clash:
        auto = AutoNormal(poutine.block(model, expose=["scale", "offset"]))

        def guide(x=None, num_data=None, batch_size=None):
            with pyro.plate("groups", num_groups, dim=-2):
                o = auto(x, num_data)["offset"]
                vae.guide(x.transpose(0, 1) - o, num_data=num_data)

        return guide, auto
    plates = {}
    auto = AutoNormal(poutine.block(model, expose=["scale", "offset"]),
                      create_plates=lambda *args, **kwargs: plates["groups"])

    def guide(x=None, num_data=None, batch_size=None):
        plates["groups"] = groups = pyro.plate("groups", num_groups, dim=-2)
        o = auto(x, num_data)["offset"]  # enters our plate object for the offsets
        with groups:
            vae.guide(x.transpose(0, 1) - o, num_data=num_data)

    return guide, auto


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=400, help="data points N, each observed in every group")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--particles", type=int, default=1, help="ELBO particles per step (vectorized when >= 2)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=100, help="posterior draws for Predictive")
    p.add_argument("--quick", action="store_true", help="a few epochs on few items (seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="grouped_model.json")
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.epochs, args.num_samples = 60, 3, 8
    device = resolve_device(args.device)
    pyro.set_rng_seed(args.seed)

    true_offsets = torch.tensor([[-1.0, 0.5, 0.0, 1.0], [0.0, -0.5, 1.0, 0.0], [1.0, 0.0, -1.0, -1.0]])
    G, D = true_offsets.shape
    x = make_data(args.items, true_offsets, 0.3, 2, args.seed).to(device)

    # ---- Part 1: a hand-written guide, trained by fit ----
    pyro.clear_param_store()
    vae, model = grouped_model(G, D, hidden=args.hidden, device=device)
    guide = hand_guide(vae, G, D)
    pair = pyro_vae.ModelGuidePair(model, guide, modules=vae)  # data plate found: "vae/data"
    history = pyro_vae.fit(pair, x, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           device=device, progress=False, num_particles=args.particles)
    store = pyro.get_param_store()
    offset_mean, offset_sd = store["offset_loc"].detach().squeeze(1), store["offset_sd"].detach().squeeze(1)
    scale_median = float(store["scale_loc"].detach().exp())
    print(f"trained {len(history.epochs)} epochs, ELBO per item {history.epochs[-1]['train_elbo']:.3f}")
    print("posterior mean of the offsets (rows: groups):\n", offset_mean.cpu().numpy().round(2))
    print("true offsets:\n", true_offsets.numpy())

    with torch.no_grad():
        # Posterior draws of the globals and the locals, then replicated data given them: the posterior predictive.
        post = Predictive(model, guide=guide, num_samples=args.num_samples,
                          return_sites=["scale", "offset", "vae/z"])(x)
        rep = Predictive(model, posterior_samples=post, return_sites=["vae/x"])(None, batch_size=len(x))
        rep_group_means = rep["vae/x"].mean(dim=(0, 2))  # (G, D): per group, over draws and items
        # poutine.condition: the offsets given as data (observed sites of the model's trace).
        fixed = poutine.trace(poutine.condition(model, data={"offset": torch.zeros(G, 1, D, device=device)})
                              ).get_trace(x[:4])
        # poutine.do: an intervention moving group 0 by +3 in every entry; its generated data follow.
        moved = offset_mean.clone().unsqueeze(1)
        moved[0] += 3.0
        do = Predictive(poutine.do(model, data={"offset": moved}), num_samples=1, return_sites=["vae/x"])(
            None, batch_size=len(x))
        shift = float((do["vae/x"][0, 0] - rep["vae/x"][:, 0].mean(0)).mean())

    # log p(x | globals) of the items: at the globals' posterior means, and at one draw from the guide.
    at_means = pyro_vae.log_likelihood(pair, x, 50 if not args.quick else 8, global_values={
        "offset": offset_mean.unsqueeze(1), "scale": scale_median})
    at_draw = pyro_vae.log_likelihood(pair, x, 50 if not args.quick else 8)
    print(f"scale: posterior median {scale_median:.3f} (true 0.3)")
    print(f"posterior predictive group means {tuple(rep_group_means.shape)}, max distance from the data's "
          f"{float((rep_group_means - x.mean(0)).abs().max()):.3f}")
    print(f"condition(offset=0): observed = {fixed.nodes['offset']['is_observed']}; do(offset[0] += 3): group 0 "
          f"moves by {shift:.2f}")
    print(f"log p(x | globals) per item: {at_means.mean:.3f} +- {at_means.se:.3f} ({at_means.global_source}), "
          f"{at_draw.mean:.3f} +- {at_draw.se:.3f} ({at_draw.global_source})")

    # ---- Part 2: AutoNormal for the globals inside the outer plate ----
    try:
        pyro.clear_param_store()
        vae2, model2 = grouped_model(G, D, hidden=args.hidden, device=device)
        clashing, _ = auto_guide(vae2, model2, G, clash=True)
        pyro_vae.fit(pyro_vae.ModelGuidePair(model2, clashing, modules=vae2), x, epochs=1, progress=False,
                     device=device)
        clash_message = ""
    except pyro_vae.ModelError as e:  # names the recipe below
        clash_message = str(e)
    print("the clashing recipe:", clash_message.split(". Fix:")[0])
    pyro.clear_param_store()
    vae2, model2 = grouped_model(G, D, hidden=args.hidden, device=device)
    guide2, auto = auto_guide(vae2, model2, G)
    history2 = pyro_vae.fit(pyro_vae.ModelGuidePair(model2, guide2, modules=vae2), x, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device, progress=False,
                            num_particles=args.particles)
    auto_offsets = auto.median()["offset"].detach().squeeze(1)
    print(f"AutoNormal guide: ELBO per item {history2.epochs[-1]['train_elbo']:.3f}, offsets\n",
          auto_offsets.cpu().numpy().round(2))

    result = {"train_elbo": history.epochs[-1]["train_elbo"], "offset_mean": offset_mean.cpu().tolist(),
              "offset_sd": offset_sd.cpu().tolist(), "true_offsets": true_offsets.tolist(),
              "scale_median": scale_median, "do_shift": shift,
              "log_likelihood_at_means": at_means.to_dict(), "log_likelihood_at_draw": at_draw.to_dict(),
              "clash_error": clash_message, "auto_train_elbo": history2.epochs[-1]["train_elbo"],
              "auto_offsets": auto_offsets.cpu().tolist(), "config": vars(args), "device": str(device),
              "torch": torch.__version__, "pyro": pyro.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
