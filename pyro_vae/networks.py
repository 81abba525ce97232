"""Encoder and decoder networks: pure ``torch.nn`` modules with no probabilistic primitives.

Every network accepts any number of leading batch dimensions, so Pyro's vectorized particles
(``Trace_ELBO(num_particles=P, vectorize_particles=True)``) pass a ``(P, batch, z_dim)`` latent
straight through a decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from pyro_vae.errors import ConfigError, ShapeError, message
from pyro_vae.validation import integer

__all__ = ["MLP", "MLPEncoder", "MLPDecoder", "ConvEncoder", "ConvDecoder", "ConcatMLP", "ContextMLP", "image_shape",
           "Shape", "as_shape"]

Shape = int | Sequence[int]
"""An event shape: one integer ``n`` for ``(n,)``, or a sequence of them."""


def as_shape(s: Shape) -> tuple[int, ...]:
    """``s`` as a tuple of positive integers (``8`` gives ``(8,)``).

    Raises:
        ConfigError: ``s`` is empty or has an entry below 1.
    """
    shape = (int(s),) if isinstance(s, int) else tuple(int(v) for v in s)
    if not shape or any(v < 1 for v in shape):
        raise ConfigError(message("shape", "a non-empty tuple of positive integers", repr(s), "pass e.g. (64,)"))
    return shape


def _check_positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
    """``values`` as a tuple of ints >= 1, checked as :class:`pyro_vae.VAE` checks its own (a float such as
    ``2.5`` is refused, not truncated)."""
    return tuple(integer(f"{name} entries", v, 1) for v in values)


class MLP(nn.Module):
    """Linear layers with an activation between them, acting on the last dimension."""

    def __init__(self, sizes: Sequence[int], activation: Callable[[], nn.Module] = nn.Softplus) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPEncoder(nn.Module):
    """Flattens ``(..., *data_shape)`` and maps it to ``(..., out_features)`` (``activation()`` between the
    layers; no hidden layers: one affine map)."""

    def __init__(self, data_shape: Sequence[int], out_features: int, hidden: Sequence[int] = (400,),
                 activation: Callable[[], nn.Module] = nn.Softplus) -> None:
        super().__init__()
        self.data_shape = _check_positive_ints("data_shape", data_shape)
        hidden = _check_positive_ints("hidden", hidden)
        self.mlp = MLP((math.prod(self.data_shape), *hidden, int(out_features)), activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[: x.dim() - len(self.data_shape)]
        return self.mlp(x.reshape(*batch, -1))


class MLPDecoder(nn.Module):
    """Maps ``(..., z_dim)`` to ``(..., *data_shape)`` (logits or means, one per data entry; ``activation()``
    between the layers; no hidden layers: one affine map)."""

    def __init__(self, z_dim: int, data_shape: Sequence[int], hidden: Sequence[int] = (400,),
                 activation: Callable[[], nn.Module] = nn.Softplus) -> None:
        super().__init__()
        self.data_shape = _check_positive_ints("data_shape", data_shape)
        hidden = _check_positive_ints("hidden", hidden)
        self.mlp = MLP((int(z_dim), *hidden, math.prod(self.data_shape)), activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z).reshape(*z.shape[:-1], *self.data_shape)


class ConcatMLP(nn.Module):
    """An MLP over several inputs, flattened and concatenated along the features.

    Args:
        in_shapes: the event shape of each input, e.g. ``[(64,), (10,)]`` for an image and a one-hot label.
        out_shape: event shape of the output, e.g. ``(2 * z_dim,)`` or ``data_shape``.
        hidden: hidden layer sizes.

    ``forward(*inputs)`` takes tensors of shapes ``(*batch_i, *in_shapes[i])``; the ``batch_i`` broadcast
    against each other (an enumerated label of shape ``(K, 1, k)`` meets a batch ``(B, D)`` and gives
    ``(K, B, ...)``) and the output is ``(*broadcast_batch, *out_shape)``.

    Raises:
        ShapeError: (``forward``) not one input per entry of ``in_shapes``, or an input of another event shape.
    """

    def __init__(self, in_shapes: Sequence[Shape], out_shape: Shape, hidden: Sequence[int] = (400,),
                 activation: type[nn.Module] = nn.Softplus) -> None:
        super().__init__()
        self.in_shapes = [as_shape(s) for s in in_shapes]
        self.out_shape = as_shape(out_shape)
        hidden = tuple(integer("hidden entries", h, 1) for h in hidden)
        self.mlp = MLP((sum(math.prod(s) for s in self.in_shapes), *hidden, math.prod(self.out_shape)), activation)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.in_shapes):
            raise ShapeError(message("ConcatMLP inputs", f"{len(self.in_shapes)} tensors", f"{len(inputs)}",
                                     "pass one tensor per entry of in_shapes"))
        flat, batches = [], []
        for i, (t, shape) in enumerate(zip(inputs, self.in_shapes)):
            n = t.dim() - len(shape)
            if n < 0 or tuple(t.shape[n:]) != shape:
                raise ShapeError(message(f"ConcatMLP input {i}", f"shape (..., {', '.join(map(str, shape))})",
                                         f"shape {tuple(t.shape)}", "reshape the input or fix in_shapes"))
            batches.append(t.shape[:n])
            flat.append(t.reshape(*t.shape[:n], -1))
        batch = torch.broadcast_shapes(*batches)
        h = torch.cat([f.expand(*batch, f.shape[-1]) for f in flat], dim=-1)
        return self.mlp(h).reshape(*batch, *self.out_shape)


class ContextMLP(nn.Module):
    """An MLP of one input and named context values: ``forward(x, **context)`` concatenates ``x`` and the values
    of the names in ``context_shapes`` (in that order, each flattened) and maps them to ``out_shape``. The
    network :class:`pyro_vae.VAE` builds for ``encoder="mlp"`` / ``decoder="mlp"`` with ``encoder_context`` /
    ``decoder_context``; other context names are ignored.

    Args:
        in_shape: event shape of ``x`` (``data_shape`` for an encoder, ``(z_dim,)`` for a decoder).
        context_shapes: ``{name: event shape of one data point's value}``, e.g. ``{"y": (10,)}``.
        out_shape: event shape of the output.
        hidden: hidden layer sizes.

    ``x`` is ``(*batch, *in_shape)`` and each context value ``(*batch_i, *shape_i)``; the batch dimensions
    broadcast (a global value of shape ``shape_i`` meets every data point), and the output is
    ``(*broadcast_batch, *out_shape)``.

    Raises:
        ShapeError: (``forward``) a context value is missing or has another event shape.
    """

    def __init__(self, in_shape: Shape, context_shapes: Mapping[str, Shape], out_shape: Shape,
                 hidden: Sequence[int] = (400,)) -> None:
        super().__init__()
        self.names = tuple(context_shapes)
        self.net = ConcatMLP([in_shape, *context_shapes.values()], out_shape, hidden)

    def forward(self, x: torch.Tensor, **context: torch.Tensor) -> torch.Tensor:
        missing = [k for k in self.names if k not in context]
        if missing:
            raise ShapeError(message("ContextMLP context", f"values for {list(self.names)}",
                                     f"none for {missing}", "pass them as keyword arguments"))
        return self.net(x, *(context[k] for k in self.names))


def image_shape(data_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` for an image ``data_shape`` of ``(C, H, W)`` or ``(H, W)``."""
    shape = tuple(int(s) for s in data_shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return shape
    raise ConfigError(
        message(
            "data_shape",
            "an image shape (C, H, W) or (H, W) for a convolutional network",
            str(shape),
            "reshape the data to images (e.g. (1, 8, 8) for the digits) or use net='mlp'",
        )
    )


def _conv_sizes(h: int) -> tuple[int, int]:
    h1 = (h - 1) // 2 + 1  # 3x3, stride 2, padding 1
    return h1, (h1 - 1) // 2 + 1


class ConvEncoder(nn.Module):
    """Two stride-2 3x3 convolutions (16, 32 channels), then a convolution covering the remaining
    feature map (7x7 for 28x28 input) to ``out_features`` channels."""

    def __init__(self, data_shape: Sequence[int], out_features: int, channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        c, h, w = image_shape(data_shape)
        c1, c2 = _check_positive_ints("channels", channels)
        (_, h2), (_, w2) = _conv_sizes(h), _conv_sizes(w)
        self.net = nn.Sequential(
            nn.Conv2d(c, c1, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c2, int(out_features), (h2, w2)),
        )
        self._chw = (c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[: x.dim() - len(self.data_shape)]
        out = self.net(x.reshape(-1, *self._chw))
        return out.reshape(*batch, -1)


class ConvDecoder(nn.Module):
    """The mirror of :class:`ConvEncoder`: a transposed convolution from ``z`` to the small feature map,
    then two stride-2 transposed 3x3 convolutions (32 -> 16 -> C channels) back to ``data_shape``."""

    def __init__(self, z_dim: int, data_shape: Sequence[int], channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        c, h, w = image_shape(data_shape)
        c1, c2 = _check_positive_ints("channels", channels)
        (h1, h2), (w1, w2) = _conv_sizes(h), _conv_sizes(w)
        # output = (in - 1) * 2 - 2 + 3 + output_padding = 2 * in - 1 + output_padding
        op1 = (h1 - (2 * h2 - 1), w1 - (2 * w2 - 1))
        op2 = (h - (2 * h1 - 1), w - (2 * w1 - 1))
        self.net = nn.Sequential(
            nn.ConvTranspose2d(int(z_dim), c2, (h2, w2)),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=op1),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, c, 3, stride=2, padding=1, output_padding=op2),
        )
        self.z_dim = int(z_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        out = self.net(z.reshape(-1, self.z_dim, 1, 1))
        return out.reshape(*batch, *self.data_shape)
