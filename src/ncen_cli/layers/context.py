"""The "input gradients only" switch and the dual-tensor test shared by ncen's layers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.autograd import forward_ad

_local = threading.local()


@contextmanager
def input_gradients_only() -> Iterator[None]:
    """Mark the forward passes run inside this block, on this thread: every backward of their
    graph taken with ``create_graph=True`` is promised to ask for gradients with respect to the
    inputs only (``torch.autograd.grad(loss, inputs, create_graph=True)``), so the layers skip
    the parameter-gradient graphs. Backwards without ``create_graph`` (the final
    ``loss.backward()``) are unaffected and give every gradient.

    The switch is captured per layer call when the forward runs (saved on its autograd context),
    so it holds for that member whichever thread later runs the backward (on CUDA the autograd
    engine runs backward functions on its own device threads), and a member run concurrently
    outside the block, e.g. one that needs parameter gradients with ``create_graph=True``, is
    not affected. Nests.
    """
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


def parameter_gradients_wanted() -> bool:
    """False inside :func:`input_gradients_only` on this thread. Read by the layers when their
    forward runs, never during a backward."""
    return getattr(_local, "depth", 0) == 0


def split_dual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(primal, tangent) of a forward-mode dual tensor; (x, None) for an ordinary tensor or
    outside a ``forward_ad.dual_level``."""
    primal, tangent = forward_ad.unpack_dual(x)
    return (x, None) if tangent is None else (primal, tangent)
