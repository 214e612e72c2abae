"""torch.distributed helpers. Without ``torchrun`` (no WORLD_SIZE) every helper is a no-op."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_local_only = False


@contextmanager
def local_only() -> Iterator[None]:
    """Within this block every helper acts as in a single process, even under torchrun.

    ``ncen sweep`` uses it so that each rank trains and evaluates whole grid cells on its own
    (no gradient averaging, no sharded evaluation, no barriers inside a cell).
    """
    global _local_only
    previous, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = previous


def _active() -> bool:
    return (not _local_only and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def context() -> DistContext:
    """The current process group's rank and size (initialising it under torchrun if needed).

    Inside :func:`local_only` this is a single-process context (rank 0 of 1).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _local_only:
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns it unchanged in a single process)."""
    if _active():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def average_gradients(module: nn.Module) -> None:
    """Average ``.grad`` over ranks (data parallelism with double backprop)."""
    if not _active():
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def broadcast_parameters(module: nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not _active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def barrier() -> None:
    if _active():
        dist.barrier()


def shard_slice(n: int) -> slice:
    """This rank's contiguous share of ``n`` evaluation examples (everything in one process)."""
    if not _active():
        return slice(0, n)
    rank, world = dist.get_rank(), dist.get_world_size()
    per = -(-n // world)
    return slice(min(rank * per, n), min((rank + 1) * per, n))


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if not _active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
