"""The distributed context: where a process stands in a ``torchrun`` job, and its collectives.

Nothing in ncen shards or all-reduces unless it is handed a :class:`DistContext` of more than one
process: :func:`~ncen_cli.evaluation.evaluate`, :func:`~ncen_cli.transfer.transfer_matrix`,
:func:`~ncen_cli.training.clean_accuracy` and the training loop take ``dist`` (default
:data:`SINGLE`, one process), so a library user's own DDP script keeps full control of its data.
The CLI entry points start the process group explicitly with :func:`initialize` and pass its
context on; :func:`context` only reads the current state.

Data parallelism in ncen is hand-rolled instead of wrapping the ensemble in
``DistributedDataParallel``. The training step takes the members' input gradients with
``autograd.grad(create_graph=True)`` and back-propagates a loss on them (double backprop); DDP's
documentation states that it does not work with ``torch.autograd.grad()`` (its reducer only
handles gradients accumulated into ``.grad`` by one backward pass), and DDP averages the ranks'
gradients with equal weights even when their shares differ in size. So every rank runs the
ordinary step on its share, then :meth:`DistContext.average_gradients` all-reduces all ``.grad``
tensors in ONE flat buffer, weighted by each rank's number of samples, so the result equals the
gradient of the global-batch mean loss whatever the share sizes are.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ncen_cli.errors import UsageError

T = TypeVar("T")

BACKEND_ENV = "NCEN_DIST_BACKEND"  # force "gloo" or "nccl"
TIMEOUT_ENV = "NCEN_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks


@dataclass(frozen=True)
class DistContext:
    """This process's place in a job, and the collectives over the job's processes.

    With ``world_size == 1`` (:data:`SINGLE`) every method acts as in one process and touches no
    process group; with more, the default process group must be initialised
    (:func:`initialize`) and every rank must call the same methods in the same order.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` evaluation examples (everything in one process).

        Shares are balanced (sizes differ by at most one; a share may be empty when n < world
        size) and together cover ``range(n)`` once, in rank order.
        """
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (a copy; returns it unchanged in a single process).

        The result is on the input's device whatever the backend needs for the transfer.
        """
        if not self.enabled:
            return tensor
        out = tensor.to(_comm_device(), copy=True)
        dist.all_reduce(out)
        return out.to(tensor.device)

    def sum_counts(self, *counts: int) -> tuple[int, ...]:
        """Integer counts summed over ranks (exact: carried as float64)."""
        total = self.all_reduce_sum(torch.tensor(counts, dtype=torch.float64))
        return tuple(int(v) for v in total.tolist())

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (so all ranks can raise the same error)."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([0.0 if flag else 1.0]))[0] == 0)

    def average_gradients(self, module: nn.Module, weight: float | None = None) -> None:
        """Replace every ``.grad`` of ``module`` by its weighted mean over ranks, in place.

        Args:
            weight: this rank's weight, normally its number of samples in the global batch. If
                each rank's ``.grad`` is the gradient of the MEAN loss over its own share,
                weighting by the share size makes the result the gradient of the mean loss over
                the global batch (a rank with a smaller or empty share is not over-weighted).
                None: equal weights.

        A rank with an empty share passes ``weight=0`` and may have ``.grad`` None. A parameter
        whose gradient is None on every rank keeps None (the optimizer then skips it, as in one
        process). All gradients travel in one flat buffer: one all-reduce per step.
        """
        if not self.enabled:
            return
        params = [p for p in module.parameters() if p.requires_grad]
        if params:
            _average_flat(self, params, 1.0 if weight is None else float(weight))

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Make every rank start from rank 0's parameters and buffers."""
        if not self.enabled:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)

    def sync_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks; others from
        rank 0.

        Each rank updates its BatchNorm running statistics from its own share during an epoch;
        after this call every rank holds the same model, so sharded evaluation and rank 0's
        checkpoint describe one and the same network.
        """
        if not self.enabled:
            return
        for buf in module.buffers():
            if buf.dtype.is_floating_point:
                buf.data.copy_(self.all_reduce_sum(buf.data) / self.world_size)
            else:
                dist.broadcast(buf.data, src=0)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


SINGLE = DistContext()
"""One process: no sharding, no collectives (the default everywhere)."""


MAX_WORLD_SIZE = 1 << 20


def env_int(name: str, default: int, low: int, high: int) -> int:
    """The integer environment variable ``name`` (``default`` when unset or empty), in
    ``[low, high]``; UsageError naming the variable otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}={text[:40]!r} is not an integer") from None
    if not low <= value <= high:
        raise UsageError(f"environment variable {name}={value} is outside [{low}, {high}]")
    return value


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun); needs no process group."""
    return env_int("WORLD_SIZE", 1, 1, MAX_WORLD_SIZE)


def launched_rank() -> int:
    """This process's RANK under torchrun (0 without it), checked against WORLD_SIZE."""
    return env_int("RANK", 0, 0, launched_world_size() - 1)


def is_main_process() -> bool:
    """True on global rank 0 (and outside torchrun). Usable before the process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return launched_rank() == 0


def backend_for(device: str | None = None) -> str:
    """``nccl`` when the run computes on CUDA, else ``gloo`` (override: NCEN_DIST_BACKEND)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        return forced
    spec = (device or "auto").strip().lower()
    if spec in ("cpu", "mps") or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def context() -> DistContext:
    """The current process group as a :class:`DistContext` (:data:`SINGLE` when none is
    initialised or it has one process). A pure query: it starts nothing."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return SINGLE
    world = dist.get_world_size()
    return DistContext(dist.get_rank(), world, env_int("LOCAL_RANK", 0, 0, world - 1))


def initialize(device: str | None = None) -> DistContext:
    """Start the process group under ``torchrun`` (no-op without it, or when already started)
    and return :func:`context`. The CLI's entry points call it; a library user who wants
    ncen's collectives calls it (or builds their own group) and passes the context on.

    Args:
        device: the run's ``--device`` (picks the backend: gloo for cpu, nccl for CUDA).

    On first initialisation the process group is registered for destruction at exit, and the
    ``ncen`` loggers of ranks other than 0 are limited to errors (logs come from rank 0 only).
    """
    world = launched_world_size()
    if world <= 1:
        return context()
    launched_rank()  # a bad RANK is one line, not a failure inside torch
    local_rank = env_int("LOCAL_RANK", 0, 0, world - 1)
    if not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        timeout = _timeout_seconds()
        if timeout:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        else:
            dist.init_process_group(backend)
        atexit.register(shutdown)
        if dist.get_rank() != 0:
            logging.getLogger("ncen").setLevel(logging.ERROR)
    return context()


def _timeout_seconds() -> float | None:
    """NCEN_DIST_TIMEOUT in seconds (None when unset); UsageError unless in (0, 1e7]."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    seconds = _float_or_nan(text) if text else None
    if seconds is not None and not (math.isfinite(seconds) and 0 < seconds <= 10**7):
        raise UsageError(f"environment variable {TIMEOUT_ENV}={text[:40]!r} must be seconds > 0")
    return seconds


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def shutdown() -> None:
    """Destroy the process group (registered with atexit by :func:`initialize`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors must live for collectives: the current GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _average_flat(ctx: DistContext, params: list[nn.Parameter], w: float) -> None:
    """:meth:`DistContext.average_gradients` on ``params`` (one flat buffer, weight ``w``)."""
    ref = next((p.grad for p in params if p.grad is not None), params[0])
    dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
    pieces = [
        (
            p.grad.detach().to(dtype) * w
            if p.grad is not None
            else torch.zeros(p.numel(), dtype=dtype, device=p.device)
        ).reshape(-1)
        for p in params
    ]
    present = torch.tensor(
        [float(p.grad is not None) for p in params] + [w], dtype=dtype, device=ref.device
    )
    flat = ctx.all_reduce_sum(torch.cat([*pieces, present]))
    total_weight = float(flat[-1])
    counts = flat[len(flat) - len(params) - 1 : -1]
    offset = 0
    for p, count in zip(params, counts.tolist(), strict=True):
        n = p.numel()
        if count > 0 and total_weight > 0:
            p.grad = flat[offset : offset + n].view_as(p).div(total_weight).to(p.dtype)
        else:
            p.grad = None
        offset += n
