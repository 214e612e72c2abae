"""The "input gradients only" marker and the dual-tensor test shared by ncen's layers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.autograd import forward_ad

_lock = threading.Lock()
_depth = 0


@contextmanager
def input_gradient_pass() -> Iterator[None]:
    """Within this block, backward passes taken with ``create_graph=True`` are promised to ask
    for gradients with respect to inputs only
    (``torch.autograd.grad(loss, inputs, create_graph=True)``), so the layers skip the
    parameter-gradient graphs.

    The marker is process-wide, not thread-local, because on CUDA the autograd engine runs
    backward functions on its own device threads; it nests and may be entered from several
    threads at once (``ncen_cli.train_step`` does so from its member threads). Do not run a
    backward that needs parameter gradients with ``create_graph=True`` concurrently with it.
    """
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1


def parameter_gradients_wanted() -> bool:
    """False inside :func:`input_gradient_pass`."""
    return _depth == 0


def split_dual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(primal, tangent) of a forward-mode dual tensor; (x, None) for an ordinary tensor or
    outside a ``forward_ad.dual_level``."""
    primal, tangent = forward_ad.unpack_dual(x)
    return (x, None) if tangent is None else (primal, tangent)
