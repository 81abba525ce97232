"""The linear-Gaussian VAE: the one VAE whose ELBO, ELBO gradient and log-likelihood are known exactly.

Model ``z ~ N(0, I_d)``, ``x | z ~ N(W z + b, s^2 I_D)``, so ``x ~ N(b, W W^T + s^2 I)`` and the posterior
is ``N(S W^T (x - b) / s^2, S)`` with ``S = (I + W^T W / s^2)^{-1}``. The guide is a diagonal Gaussian whose
mean and pre-softplus scale are linear in ``x`` (an ``nn.Linear`` encoder), so for any guide parameters

    ELBO(x) = -D/2 log(2 pi s^2) - (|x - W m - b|^2 + sum_j v_j |W_j|^2) / (2 s^2)
              - 1/2 sum_j (v_j + m_j^2 - 1 - log v_j)

with ``m``, ``v`` the guide's mean and variance. Used by the tests and benchmarks as ground truth.

The functions take the VAE :func:`linear_gaussian_vae` builds, or the same model built as
``VAE((D,), d, encoder="linear", decoder="linear", likelihood={"name": "normal", "scale": s})`` (the command
line's ``--net linear --likelihood normal``). Any other VAE (another latent, prior or likelihood, data of more
than one dimension, a decoder that is not affine) raises a ``ConfigError`` naming the part that differs.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from pyro_vae.encoders import GaussianEncoder
from pyro_vae.errors import ConfigError, message
from pyro_vae.likelihoods import Normal
from pyro_vae.models.vae import VAE

__all__ = ["linear_gaussian_vae", "exact_elbo", "exact_log_likelihood", "exact_posterior", "set_exact_guide"]


def linear_gaussian_vae(data_dim: int = 5, z_dim: int = 2, noise_scale: float = 0.5, seed: int = 0,
                        orthogonal: bool = True) -> VAE:
    """A linear-Gaussian VAE with random weights. With ``orthogonal=True`` the decoder's columns are
    orthogonal, so the exact posterior is diagonal and the guide family contains it."""
    g = torch.Generator().manual_seed(seed)
    vae = VAE((data_dim,), z_dim, encoder=nn.Linear(data_dim, 2 * z_dim), decoder=nn.Linear(z_dim, data_dim),
              likelihood=Normal(scale=noise_scale))
    with torch.no_grad():
        w = torch.randn(data_dim, z_dim, generator=g)
        if orthogonal:
            q, _ = torch.linalg.qr(w)
            w = q * torch.linspace(1.0, 2.0, z_dim)
        decoder, encoder_net = _linear(vae)
        decoder.weight.copy_(w)
        decoder.bias.copy_(0.5 * torch.randn(data_dim, generator=g))
        encoder_net.weight.copy_(0.3 * torch.randn(2 * z_dim, data_dim, generator=g))
        encoder_net.bias.copy_(0.3 * torch.randn(2 * z_dim, generator=g))
    return vae


_FIX = ('build the VAE with linear_gaussian_vae(), or with encoder="linear", decoder="linear", likelihood="normal" '
        "and 1-D data")


def _affine(module: nn.Module, what: str) -> nn.Linear:
    """The one ``nn.Linear`` of an affine network: the module itself, or an MLP without hidden layers (the
    ``"linear"`` network of :class:`pyro_vae.VAE`, the command line's ``--net linear``).

    Raises:
        ConfigError: ``module`` is not affine."""
    layers = list(getattr(getattr(module, "mlp", None), "net", ()))
    if isinstance(module, nn.Linear) or (len(layers) == 1 and isinstance(layers[0], nn.Linear)):
        return module if isinstance(module, nn.Linear) else layers[0]
    raise ConfigError(message(what, 'an affine map (an nn.Linear, or the "linear" network)',
                              type(module).__name__, _FIX))


def _linear(vae: VAE) -> tuple[nn.Linear, nn.Linear]:
    """The decoder and the encoder's network of a linear-Gaussian VAE (both affine)."""
    _parts(vae)
    return _affine(vae.decoder, "decoder"), _affine(cast(GaussianEncoder, vae.encoder).net, "encoder network")


def _parts(vae: VAE) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``W``, ``b`` and ``s`` of a linear-Gaussian VAE: a standard normal prior, an affine decoder, 1-D data and
    the ``"normal"`` likelihood of fixed scale.

    Raises:
        ConfigError: a VAE of another model."""
    for what, part, expected in (("latent", vae.latent, "gaussian"), ("prior", type(vae.prior).__name__,
                                 "StandardNormal"), ("likelihood", type(vae.likelihood).__name__, "Normal")):
        if part != expected:
            raise ConfigError(message(f"vae {what}", f"{expected} (the linear-Gaussian VAE)", str(part), _FIX))
    if len(vae.data_shape) != 1:
        raise ConfigError(message("vae data_shape", "1-D data (the linear-Gaussian VAE)", str(vae.data_shape), _FIX))
    decoder = _affine(vae.decoder, "decoder")
    return decoder.weight, decoder.bias, float(cast(Normal, vae.likelihood).scale)


def exact_elbo(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """Closed-form ELBO of each data point, ``(batch,)`` nats; differentiable in the VAE's parameters.

    Raises:
        ConfigError: ``vae`` is not a linear-Gaussian VAE (see the module's docstring)."""
    w, b, s = _parts(vae)
    m, scale = vae.encoder(x)
    v = scale.pow(2)
    d = x.shape[-1]
    resid = (x - m @ w.T - b).pow(2).sum(-1) + (v * w.pow(2).sum(0)).sum(-1)
    expected_loglik = -0.5 * d * math.log(2 * math.pi * s**2) - resid / (2 * s**2)
    kl = 0.5 * (v + m.pow(2) - 1 - v.log()).sum(-1)
    return expected_loglik - kl


def exact_log_likelihood(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` of each data point, ``(batch,)`` nats: ``x ~ N(b, W W^T + s^2 I)``.

    Raises:
        ConfigError: ``vae`` is not a linear-Gaussian VAE (see the module's docstring)."""
    w, b, s = _parts(vae)
    cov = w @ w.T + s**2 * torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    return torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def exact_posterior(vae: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(batch, z_dim)`` and covariance ``(z_dim, z_dim)`` of ``p(z | x)``."""
    w, b, s = _parts(vae)
    cov = torch.linalg.inv(torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ w / s**2)
    return (x - b) @ w @ cov / s**2, cov


@torch.no_grad()
def set_exact_guide(vae: VAE, min_scale: float | None = None) -> None:
    """Set the linear encoder to the exact posterior (exact when the posterior covariance is diagonal)."""
    w, b, s = _parts(vae)
    cov = torch.linalg.inv(torch.eye(w.shape[1]) + w.T @ w / s**2)
    a = cov @ w.T / s**2  # mean = a (x - b)
    z = w.shape[1]
    sd = cov.diagonal().sqrt() - (cast(GaussianEncoder, vae.encoder).min_scale if min_scale is None else min_scale)
    _, net = _linear(vae)
    net.weight[:z].copy_(a)
    net.bias[:z].copy_(-a @ b)
    net.weight[z:].zero_()
    net.bias[z:].copy_(sd + torch.log(-torch.expm1(-sd)))  # softplus^{-1}(sd)
