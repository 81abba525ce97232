"""Data-parallel training across processes with ``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPU).

:func:`pyro_vae.fit` runs unchanged under an initialized process group. Every rank starts from rank 0's
parameters (:func:`broadcast_module`, :func:`broadcast_tensor`), takes its interleaved share of each global
minibatch (the rule of ``torch.utils.data.DistributedSampler``: rank ``r`` of ``W`` gets positions
``r, r + W, ...``) and runs the step of one process, :func:`pyro_vae.train.svi_step`, on it with ``num_data``
the full data-set size. No module is wrapped in ``DistributedDataParallel``: the optimizer's step pre-hook
(:class:`pyro_vae.train.guards.StepGuard`) calls :func:`reduce_gradients`, which replaces every gradient by
the sum over ranks of ``b_r / b`` times that rank's gradient (``b_r / b``: its share of the global batch) in
one ``all_reduce``, and then, with ``clip_norm``, clips the sum. The result is the gradient a single process
would compute on the whole global batch, so ``N`` processes with ``batch_size=B`` follow the same optimization
path as one process with ``batch_size=B``, up to floating-point summation order and each rank drawing its own
Monte Carlo noise. A rank whose share of a short last batch is empty steps with zero gradients, so that it
still joins the reduction. Rank 0 alone writes checkpoints, pictures and metrics (:func:`rank0_call` hands
its result, or its error, to every rank).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pyro_vae.errors import ConfigError, PyroVAEError, message
from pyro_vae.validation import resolve_device

__all__ = ["Context", "context", "init_from_env", "shutdown", "comm_device", "broadcast_module", "broadcast_tensor",
           "broadcast_object", "all_gather_object", "all_reduce_sum", "reduce_gradients", "rank0_call",
           "env_world_size"]

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("PYRO_VAE_DIST_TIMEOUT_MIN", "30")))


@dataclass(frozen=True)
class Context:
    """Where this process sits: ``rank`` of ``world_size`` (``1`` without a process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes files."""
        return self.rank == 0


def context() -> Context:
    """The current process group's rank and size, or a single-process context when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Context()


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (``1`` outside it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str = "auto") -> tuple[Context, torch.device]:
    """Join the process group that ``torchrun`` describes in ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
    ``MASTER_PORT`` (a no-op outside ``torchrun``). The backend is NCCL when the device is CUDA, gloo
    otherwise (``PYRO_VAE_DIST_BACKEND`` overrides it, e.g. ``gloo`` to run two ranks on one GPU for a
    test); ``device="auto"`` or ``"cuda"`` become ``cuda:LOCAL_RANK``.

    Returns:
        The :class:`Context` and this rank's device.
    """
    dev = resolve_device(device)
    if env_world_size() <= 1 or not dist.is_available():
        return context(), dev
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(message("LOCAL_RANK", f"< the {torch.cuda.device_count()} visible GPUs",
                                          str(local_rank), "start at most one process per GPU "
                                          "(--nproc_per_node <= number of GPUs)"))
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = os.environ.get("PYRO_VAE_DIST_BACKEND") or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": backend, "timeout": TIMEOUT}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return context(), dev


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank exits while another still needs it)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where the process group's collectives take their tensors: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``module`` (same initialization)."""
    if not context().enabled:
        return
    dev = comm_device()
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.detach().to(dev)
        dist.broadcast(buf, src)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf.to(t.device))


@torch.no_grad()
def broadcast_tensor(t: torch.Tensor, src: int = 0) -> None:
    """Copy rank ``src``'s values of ``t`` into every rank's ``t``, in place (no-op in one process)."""
    if not context().enabled:
        return
    buf = t.detach().to(comm_device())
    dist.broadcast(buf, src)
    if buf.data_ptr() != t.data_ptr():
        t.copy_(buf.to(t.device))


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s Python object on every rank (pickled over the process group, which is trusted)."""
    if not context().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's object, in rank order."""
    ctx = context()
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum a few floats across ranks (one collective)."""
    if not context().enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def reduce_gradients(params: Sequence[torch.Tensor], weight: float, flags: Sequence[float]) -> list[float]:
    """Replace each ``p.grad`` by ``sum over ranks of weight_r * p.grad_r`` and sum ``flags``, in one
    ``all_reduce`` over a flat buffer. A missing gradient counts as zeros (and stays ``None`` here)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dev = comm_device()
    flat = torch.cat([g.reshape(-1).to(dev, torch.float32) for g in grads] +
                     [torch.tensor([float(f) for f in flags], dtype=torch.float32, device=dev)])
    flat[: flat.numel() - len(flags)].mul_(weight)
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        k = g.numel()
        if p.grad is not None:
            p.grad.copy_(flat[offset: offset + k].view_as(g).to(g.device, g.dtype))
        offset += k
    return flat[offset:].tolist()


class _RemoteError(PyroVAEError):
    pass


def rank0_call(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its :class:`PyroVAEError`, re-raised with the same
    type and message) to every rank, so a bad path or checkpoint stops all ranks instead of hanging them."""
    ctx = context()
    if not ctx.enabled:
        return fn()
    result: Any = None
    error: tuple[type, str] | None = None
    original: BaseException | None = None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - handed to the other ranks, then re-raised here
            original = e
            error = (type(e) if isinstance(e, PyroVAEError) else _RemoteError, f"on rank 0: {e}")
    result, error = broadcast_object((result, error))
    if original is not None:
        raise original
    if error is not None:
        cls, text = error
        raise cls(text)
    return result
