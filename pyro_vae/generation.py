"""Generation from a trained VAE: ancestral samples from the prior, from the aggregate posterior and from a
Gaussian mixture fitted to the posterior means; reconstructions; linear and spherical interpolation;
latent traversals.

Latents from the data go through a Pyro trace of ``vae.guide``, so any guide (Gaussian or categorical)
works; decoding goes through the VAE's likelihood (its mean, or a draw). Latents are in the latent site's
representation throughout, the one :meth:`pyro_vae.VAE.decode` takes: ``(..., z_dim)``, or for a categorical
latent ``(..., z_dim, categories)`` in log space (the log of a relaxed one-hot point; hard classes are log
one-hots, 0 at the class and ``-inf`` elsewhere).

Every function takes the model's named context as keyword arguments (see :meth:`pyro_vae.VAE.model`), passed to
the parts as the model passes it. A context value is per data point when it is a tensor whose first dimension
runs over the function's data points (``N`` rows for data ``x`` of ``N`` points, ``n`` rows for ``n`` samples
from the prior), and is then split and indexed with them; every other value is global and passed whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from pyro import poutine

from pyro_vae.distributions.relaxed import log_class_probs, log_one_hot
from pyro_vae.errors import ConfigError, DataError, ShapeError, message
from pyro_vae.evaluation import as_data_set, posterior_means
from pyro_vae.models.context import call_with_context, context_rows, is_per_point
from pyro_vae.models.vae import VAE
from pyro_vae.validation import integer

__all__ = ["SOURCES", "sample", "sample_latents", "posterior_samples", "posterior_locations", "fit_mixture",
           "reconstruct", "lerp", "slerp", "interpolate", "traverse"]

SOURCES = ("prior", "aggregate", "mixture")


def posterior_samples(vae: VAE, x: torch.Tensor, *, batch_size: int = 1024, **context: Any) -> torch.Tensor:
    """One draw ``z ~ q(z | x)`` per data point (the value of the latent site in a trace of
    ``vae.guide(x, **context)``), ``(N, *latent_event_shape)`` on the VAE's device; per-data-point context values
    are ``(N, ...)``."""
    vae.check_context_rows(x.shape[0], context)
    device = vae.device
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            rows = context_rows(context, x.shape[0], slice(i, i + batch_size))
            tr = poutine.trace(vae.guide).get_trace(x[i: i + batch_size].to(device), **rows)
            out.append(cast(torch.Tensor, tr.nodes[vae.site("z")]["value"]))
    return torch.cat(out)


def posterior_locations(vae: VAE, x: torch.Tensor, *, batch_size: int = 1024, **context: Any) -> torch.Tensor:
    """The posterior's location per data point, ``(N, *latent_event_shape)`` on the VAE's device:
    :func:`~pyro_vae.evaluation.posterior_means` without context, :meth:`pyro_vae.VAE.encode` batch by batch with
    it (per-data-point values ``(N, ...)``)."""
    if not context:
        return posterior_means(vae, x, batch_size=batch_size).to(vae.device)
    x = as_data_set(vae, x, "x")
    vae.check_context_rows(x.shape[0], context)
    return torch.cat([vae.encode(x[i: i + batch_size].to(vae.device),
                                 **context_rows(context, x.shape[0], slice(i, i + batch_size)))
                      for i in range(0, x.shape[0], batch_size)])


def fit_mixture(vae: VAE, data: Any, n_components: int = 10, *, covariance_type: str = "full",
                seed: int = 0, **context: Any):
    """A Gaussian mixture fitted to the posterior means ``E_q[z | x]`` of ``data`` (scikit-learn's
    ``GaussianMixture``), as Pythae's GMM sampler does (Ghosh et al. 2020, "From variational to deterministic
    autoencoders", ex-post density estimation). Returns the fitted ``sklearn.mixture.GaussianMixture``.
    ``context``: the encoder's, per data point ``(N, ...)`` or global."""
    from sklearn.mixture import GaussianMixture

    n_components = integer("n_components", n_components)
    m = posterior_locations(vae, data, **context).cpu()
    if m.dim() != 2:
        raise ConfigError(message("fit_mixture latents", "a vector latent (event shape (z_dim,))",
                                  f"event shape {tuple(m.shape[1:])}", "sample categorical latents from the prior"))
    if m.shape[0] < n_components:
        raise DataError(message("data", f"at least n_components = {n_components} points", f"{m.shape[0]}",
                                "pass more data or fewer components"))
    gmm = GaussianMixture(n_components=n_components, covariance_type=covariance_type, random_state=seed,
                          reg_covar=1e-5)
    return gmm.fit(m.double().numpy())


def sample_latents(vae: VAE, n: int, source: str = "prior", *, data: Any = None, mixture: Any = None,
                   n_components: int = 10, **context: Any) -> torch.Tensor:
    """``n`` latents ``(n, *latent_event_shape)`` on the VAE's device, in the latent site's representation.

    ``context``: for ``"prior"`` the prior's (:meth:`pyro_vae.VAE.sample_prior`: per-data-point values ``(n, ...)``,
    one row per latent); for ``"aggregate"`` and ``"mixture"`` the encoder's, per data point of ``data``
    (``(N, ...)``) or global.

    Args:
        source: ``"prior"`` (``z ~ p(z)``); ``"aggregate"`` (the aggregate posterior
            ``q(z) = mean_n q(z | x_n)``: pick a data point at random, then ``z ~ q(z | x)``; Makhzani et al.
            2016, Tomczak & Welling 2018); ``"mixture"`` (a Gaussian mixture fitted to the posterior means;
            Gaussian latents only). For a categorical latent, ``"prior"`` gives hard classes: the arg-max of a
            Concrete draw is an exact draw of the categorical it relaxes (Gumbel-max); for a relaxed Bernoulli
            latent, hard bits (``+-inf`` in its logit space: the sign of a binary Concrete draw is a Bernoulli draw).
        data: the data the aggregate posterior or the mixture is built from (``"aggregate"``, ``"mixture"``).
        mixture: a fitted mixture from :func:`fit_mixture` to reuse (``"mixture"``).
        n_components: mixture components when the mixture is fitted here.
    """
    n = vae.check_sample_size(n) if isinstance(vae, VAE) else integer("n", n)
    if source not in SOURCES:
        raise ConfigError(message("source", f"one of {SOURCES}", repr(source), 'pass source="prior"'))
    device = vae.device
    with torch.no_grad():
        categories = getattr(vae, "categories", None)
        if source == "prior":
            if isinstance(vae, VAE):
                z = vae.sample_prior(n, **context)
            else:
                z = call_with_context("prior", vae.prior, context=context).sample((n,))
            if categories is not None:  # as VAE.sample: the arg-max of a Concrete draw is a categorical draw
                z = log_one_hot(z.argmax(-1), categories, z.dtype)
            elif getattr(vae, "latent", None) == "bernoulli" and getattr(vae, "relaxed", False):
                z = torch.where(z > 0, math.inf, -math.inf).to(z.dtype)  # as VAE.sample: a hard Bernoulli draw
            return z
        if source == "mixture" and categories is not None:
            raise ConfigError(message('source="mixture"', "a Gaussian latent (a mixture of Gaussians over z)",
                                      f"a categorical latent of event shape ({vae.z_dim}, {categories})",
                                      'use source="prior" or "aggregate" for categorical latents'))
        if source == "mixture" and getattr(vae, "latent", None) == "bernoulli":
            raise ConfigError(message('source="mixture"', "a Gaussian latent (a mixture of Gaussians over z)",
                                      f"a Bernoulli latent of {vae.z_dim} binary variables",
                                      'use source="prior" or "aggregate" for Bernoulli latents'))
        if source == "mixture" and mixture is not None:
            z, _ = mixture.sample(n)
            return torch.as_tensor(z, dtype=torch.float32, device=device)[torch.randperm(n, device=device)]
        if data is None:
            raise ConfigError(message("data", f'the data set the {source} sampler is built from', "None",
                                      f'pass data=train_x with source="{source}"'))
        x = as_data_set(vae, data)
        if source == "aggregate":
            idx = torch.randint(x.shape[0], (n,))
            return posterior_samples(vae, x[idx], **context_rows(context, x.shape[0], idx))
        gmm = fit_mixture(vae, x, n_components, **context)
        z, _ = gmm.sample(n)
        return torch.as_tensor(z, dtype=torch.float32, device=device)[torch.randperm(n, device=device)]


def sample(vae: VAE, n: int, source: str = "prior", *, data: Any = None, mean: bool = True, mixture: Any = None,
           n_components: int = 10, **context: Any) -> torch.Tensor:
    """``n`` generated data points ``(n, *data_shape)``: latents from :func:`sample_latents` (any ``source``;
    :meth:`pyro_vae.VAE.sample` draws from the prior only), decoded to the likelihood's mean (``mean=True``) or a
    draw from it.

    ``context`` (see the module docstring): for ``"prior"`` per-data-point values are ``(n, ...)``, one row per
    sample, as :meth:`pyro_vae.VAE.sample` takes them; for ``"aggregate"`` they are ``(N, ...)``, one row per
    point of ``data``, and each sample is encoded and decoded under the row of the data point it was drawn from;
    for ``"mixture"`` only global values (the mixture's draws belong to no data point), used to encode ``data``
    and to decode.

    Raises:
        ConfigError: an unknown ``source``, ``n`` not an integer >= 1, or no ``data`` for ``"aggregate"`` /
            ``"mixture"`` (without a fitted ``mixture``).
        ShapeError: a context under which the prior or the likelihood is not one distribution per sample.
        DataError: per-data-point context with ``source="mixture"``, or a per-data-point value whose first
            dimension is not ``n`` (``"prior"``) or the number of points of ``data`` (``"aggregate"``).
    """
    if source == "aggregate" and context and data is not None:
        n = vae.check_sample_size(n)
        x = as_data_set(vae, data)
        vae.check_context_rows(x.shape[0], context)
        idx = torch.randint(x.shape[0], (n,))
        rows = context_rows(context, x.shape[0], idx)
        return vae.decode(posterior_samples(vae, x[idx], **rows), mean=mean, **rows)
    if source == "prior":
        vae.check_context_rows(vae.check_sample_size(n), context)
    if source == "mixture" and data is not None:
        size = as_data_set(vae, data).shape[0]
        local = [k for k, v in context.items() if is_per_point(v, size) or is_per_point(v, n)]
        if local:
            raise DataError(message(f"context {local}", 'global values with source="mixture" (its draws belong to '
                                    "no data point)", "per-data-point values",
                                    'use source="aggregate", whose draws keep their data point\'s context'))
    z = sample_latents(vae, n, source, data=data, mixture=mixture, n_components=n_components, **context)
    if not context:
        return vae.decode(z, mean=mean)
    px = vae.decode_dist(z, **context)
    if tuple(px.batch_shape) != (z.shape[0],):
        raise ShapeError(message("sample context", f"global values or per-sample values of {z.shape[0]} rows",
                                 f"a likelihood of batch shape {tuple(px.batch_shape)}",
                                 "pass global values without leading dimensions, or one row per sample"))
    with torch.no_grad():
        return px.mean if mean else px.sample()


def reconstruct(vae: VAE, x: torch.Tensor, *, mean: bool = True, draw_z: bool = False,
                **context: Any) -> torch.Tensor:
    """Reconstructions ``(batch, *data_shape)``: decode :func:`~pyro_vae.evaluation.posterior_means` (the
    posterior mean; for a categorical latent the class probabilities) or, with ``draw_z=True``, one draw
    ``z ~ q(z | x)``. ``context``: per data point ``(batch, ...)`` or global, for the encoder and the decoder."""
    x = as_data_set(vae, x, "x")
    z = posterior_samples(vae, x, **context) if draw_z else posterior_locations(vae, x, **context)
    return vae.decode(z, mean=mean, **context)


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation ``(1 - t) z0 + t z1``: ``z0``, ``z1`` ``(..., d)``, ``t`` ``(T,)`` gives
    ``(..., T, d)``."""
    t = t.to(z0).reshape(-1, 1)
    return (1 - t) * z0.unsqueeze(-2) + t * z1.unsqueeze(-2)


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985; White 2016, "Sampling Generative Networks"):
    ``sin((1 - t) w) / sin(w) z0 + sin(t w) / sin(w) z1`` with ``w`` the angle between ``z0`` and ``z1``;
    it keeps the path near the shell where a high-dimensional Gaussian prior puts its mass. Falls back to
    :func:`lerp` for (anti)parallel endpoints. Shapes as :func:`lerp`."""
    t = t.to(z0).reshape(-1, 1)
    a, b = z0.unsqueeze(-2), z1.unsqueeze(-2)
    cos = (_unit(a) * _unit(b)).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    small = so.abs() < eps
    safe = torch.where(small, torch.ones_like(so), so)
    out = torch.sin((1 - t) * omega) / safe * a + torch.sin(t * omega) / safe * b
    return torch.where(small, (1 - t) * a + t * b, out)


def _unit(z: torch.Tensor) -> torch.Tensor:
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def interpolate(vae: VAE, x0: torch.Tensor, x1: torch.Tensor, steps: int = 10, method: str = "slerp", *,
                mean: bool = True, **context: Any) -> torch.Tensor:
    """Decode a path between the posterior means of ``x0`` and ``x1``.

    For a categorical latent the path runs between the class probabilities ``p0``, ``p1`` of each variable
    and stays on the simplex: ``"lerp"`` mixes them, ``(1 - t) p0 + t p1``; ``"slerp"`` follows the
    great circle between ``sqrt(p0)`` and ``sqrt(p1)`` on the unit sphere and squares back (the Fisher-Rao
    geodesic of the simplex). The decoder sees these probabilities as it sees ``exp`` of a relaxed latent.

    Args:
        x0, x1: ``(batch, *data_shape)`` endpoints (or single points ``data_shape``).
        steps: points on each path, endpoints included.
        method: ``"lerp"`` or ``"slerp"``.
        context: for the encoder (both endpoints) and the decoder (the whole path): per pair ``(batch, ...)``,
            each path decoded under its pair's row, or global.

    Returns:
        ``(batch, steps, *data_shape)`` (``(steps, *data_shape)`` for single points).
    """
    steps = integer("steps", steps, 2)
    if method not in ("lerp", "slerp"):
        raise ConfigError(message("method", '"lerp" or "slerp"', repr(method), 'pass method="slerp"'))
    single = x0.dim() == len(vae.data_shape)
    if single:
        x0, x1 = x0.unsqueeze(0), x1.unsqueeze(0)
    device = vae.device
    z0, z1 = posterior_locations(vae, x0, **context), posterior_locations(vae, x1, **context)
    if z0.shape != z1.shape:
        raise DataError(message("x1", f"as many points as x0 ({z0.shape[0]})", f"{z1.shape[0]}",
                                "pass endpoints in pairs"))
    t = torch.linspace(0, 1, steps, device=device)
    if getattr(vae, "categories", None) is not None:
        path = _simplex_path(z0, z1, t, method)  # (batch, steps, n, k), log space
    else:
        flat0, flat1 = z0.reshape(z0.shape[0], -1), z1.reshape(z1.shape[0], -1)
        path = (slerp if method == "slerp" else lerp)(flat0, flat1, t)  # (batch, steps, d)
    along = {k: v.unsqueeze(1) if is_per_point(v, z0.shape[0]) else v for k, v in context.items()}  # over steps
    out = vae.decode(path.reshape(*path.shape[:2], *z0.shape[1:]), mean=mean, **along)
    return out[0] if single else out


def _simplex_path(log_p0: torch.Tensor, log_p1: torch.Tensor, t: torch.Tensor, method: str) -> torch.Tensor:
    """Paths between the simplex points ``exp(log_p0)``, ``exp(log_p1)`` ``(batch, n, k)``: linear, or the
    Fisher-Rao geodesic (slerp of the square roots); returned in log space, ``(batch, T, n, k)``."""
    if method == "lerp":
        p = lerp(log_p0.exp(), log_p1.exp(), t)  # (batch, n, T, k)
    else:
        p = slerp((0.5 * log_p0).exp(), (0.5 * log_p1).exp(), t).clamp_min(0).pow(2)
    p = p / p.sum(-1, keepdim=True)
    return p.log().movedim(-2, 1)


def traverse(vae: VAE, x: torch.Tensor | None = None, dims: Sequence[int] | None = None,
             values: Sequence[float] | torch.Tensor | None = None, *, mean: bool = True,
             **context: Any) -> torch.Tensor:
    """Latent traversals: vary one latent dimension at a time over ``values`` (default ``-3 .. 3`` in 9
    steps), the others held at the posterior mean of ``x`` (a single data point) or at the prior's mean.

    For a categorical latent, a row sets one categorical variable to each class in ``values`` (class indices,
    default all ``categories`` of them), the other variables held at the class probabilities of ``x``'s
    posterior (or of the prior).

    For a Bernoulli latent, a row sets one bit to each value in ``values`` (bits, default ``(0, 1)``), the other
    bits held at the probabilities of ``x``'s posterior (or of the prior). An exact latent gets the values ``0.`` and
    ``1.``; a relaxed one (``relaxed=True``, carried in logit space) gets the logit-space hard bits ``-inf`` and
    ``+inf`` (which the decoder sees as ``sigmoid(z)`` = 0 and 1), the other bits held at their logits.

    ``context``: global values (every decoded point shares them), given to the encoder, the prior and the decoder.

    Returns:
        ``(len(dims), len(values), *data_shape)`` decoded means (or draws with ``mean=False``).

    Raises:
        ConfigError: ``dims`` outside ``[0, z_dim)``; ``values`` that are not class indices (categorical latent)
            or bits in ``{0, 1}`` (Bernoulli latent); a latent that is not a vector.
    """
    device = vae.device
    categories = getattr(vae, "categories", None)
    bernoulli = getattr(vae, "latent", None) == "bernoulli"
    if x is not None:
        x = x.unsqueeze(0) if x.dim() == len(vae.data_shape) else x[:1]
        base = posterior_locations(vae, x, **context)[0].to(device)
    elif categories is not None:
        prior = call_with_context("prior", vae.prior, context=context)
        log_p = log_class_probs(prior)
        if log_p is None:
            raise ConfigError(message("traverse prior", "a log-space categorical prior (its class probabilities "
                                      "hold the other variables)", type(prior).__name__,
                                      "pass a data point x to hold them at its posterior"))
        base = log_p.reshape(vae.z_dim, categories).to(device)
    elif bernoulli and vae.relaxed:  # the prior's logits: sigmoid of them are its probabilities
        prior = call_with_context("prior", vae.prior, context=context)
        base = torch.as_tensor(_relaxed_logits(prior)).reshape(vae.z_dim).to(device)
    else:
        prior = call_with_context("prior", vae.prior, context=context)
        try:
            base = prior.mean
        except NotImplementedError:
            base = prior.sample((256,)).mean(0)
        base = base.reshape(prior.event_shape).to(device)
    if categories is None and base.dim() != 1:
        raise ConfigError(message("traverse latents", "a vector latent (event shape (z_dim,))",
                                  f"event shape {tuple(base.shape)}", "traverse Gaussian latents"))
    d = base.shape[0]
    dims = list(range(d)) if dims is None else [int(i) for i in dims]
    bad = [i for i in dims if not 0 <= i < d]
    if bad:
        raise ConfigError(message("dims", f"latent indices in [0, {d})", str(bad), f"pick dims below z_dim = {d}"))
    if categories is not None:
        classes = torch.arange(categories) if values is None else torch.as_tensor(values)
        if classes.is_floating_point() and bool((classes != classes.round()).any()) or \
                bool(((classes < 0) | (classes >= categories)).any()):
            raise ConfigError(message("values", f"class indices in [0, {categories}) for a categorical latent",
                                      str(classes.tolist()), f"pass e.g. values=range({categories}) (the default)"))
        hot = log_one_hot(classes.long().reshape(-1).to(device), categories, base.dtype)  # (V, k)
        z = base.expand(len(dims), len(hot), d, categories).clone()
        for row, j in enumerate(dims):
            z[row, :, j] = hot
        return vae.decode(z, mean=mean, **context)
    if bernoulli:
        vals = _bits(values, vae.relaxed, base.dtype).to(device)
    else:
        vals = torch.linspace(-3, 3, 9) if values is None else torch.as_tensor(values, dtype=torch.float32)
        vals = vals.to(device).reshape(-1)
    z = base.expand(len(dims), len(vals), d).clone()
    for row, j in enumerate(dims):
        z[row, :, j] = vals
    return vae.decode(z, mean=mean, **context)


def _relaxed_logits(prior: Any) -> torch.Tensor:
    """The logits of a relaxed Bernoulli prior (inside any ``Independent``); the logit of its mean draw in
    ``[0, 1]`` when it has none."""
    fn = prior
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    logits = getattr(fn, "logits", None)
    if torch.is_tensor(logits):
        return logits.detach()
    return torch.logit(torch.sigmoid(prior.sample((256,))).mean(0), eps=1e-6)


def _bits(values: Sequence[float] | torch.Tensor | None, relaxed: bool, dtype: torch.dtype) -> torch.Tensor:
    """The traversal values of a Bernoulli latent: bits ``(V,)`` in ``{0, 1}`` (default ``(0, 1)``), as the
    decoder takes them: ``0.`` / ``1.`` for an exact latent, ``-inf`` / ``+inf`` in logit space for a relaxed one.
    :class:`ConfigError` for values that are not bits."""
    bits = torch.tensor([0.0, 1.0]) if values is None else torch.as_tensor(values).reshape(-1).to(torch.float64)
    if bits.numel() == 0 or bool(((bits != 0) & (bits != 1)).any()):
        raise ConfigError(message("values", "bits in {0, 1} for a Bernoulli latent", str(bits.tolist()),
                                  "pass values=(0, 1) (the default)"))
    bits = bits.to(dtype)
    return torch.where(bits > 0, math.inf, -math.inf).to(dtype) if relaxed else bits
