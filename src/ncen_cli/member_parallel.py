"""Run each ensemble member's share of a training step concurrently on CPU threads.

On a CPU, torch splits every operation over its intra-op threads; for small networks (ResNet-20,
batch 64) that parallelises each operation only moderately well. The members of an ensemble are
independent until the regularizer couples their input gradients, so ncen can instead give each
member its own thread (running single-threaded operations) and synchronise only around the
regularizer. On the 2-core dev box this made the exact NCEn step about 10 % faster than torch's
intra-op threading (docs/performance.md), with the same arithmetic.

Autograd is thread-safe for this use: each worker runs forward, ``autograd.grad`` and
``backward`` on its own member's graph, and every parameter belongs to exactly one member, so
gradient accumulation never races. The results are identical to a serial run with the same
number of intra-op threads per member (tested).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TypeVar

import torch

from ncen_cli.errors import UsageError

T = TypeVar("T")


class MemberExecutor:
    """Calls ``fn(i)`` for every member index ``i``: in the caller's thread (``workers == 1``) or
    on a pool of ``workers`` threads, each running torch operations on ``intra_op_threads``
    threads. Results come back in member order; a worker's exception is raised in the caller.

    torch's intra-op thread count is per thread (OpenMP), so the workers' setting leaves the
    caller's own (used by the regularizer stage and evaluation) as it was."""

    def __init__(self, workers: int = 1, intra_op_threads: int = 1) -> None:
        if workers < 1:
            raise UsageError(f"--member-threads must be >= 1, got {workers}")
        self.workers = workers
        self._pool = None
        if workers > 1:
            self._caller_threads = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(
                workers,
                "ncen-member",
                initializer=torch.set_num_threads,
                initargs=(max(1, intra_op_threads),),
            )

    def map(self, fn: Callable[[int], T], k: int) -> list[T]:
        if self._pool is None or k == 1:
            return [fn(i) for i in range(k)]
        return list(self._pool.map(_under_callers_autocast(fn), range(k)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
            # the workers' set_num_threads also changed the default that new threads start with
            torch.set_num_threads(self._caller_threads)

    def __enter__(self) -> MemberExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SERIAL = MemberExecutor(1)

_AUTOCAST_DEVICES = ("cpu", "cuda")


def _under_callers_autocast(fn: Callable[[int], T]) -> Callable[[int], T]:
    """``fn`` wrapped to run under the caller's autocast state: autocast is thread-local, so a
    worker thread would otherwise compute a bf16 run's forward passes in float32."""
    active = [
        (device, torch.get_autocast_dtype(device))
        for device in _AUTOCAST_DEVICES
        if torch.is_autocast_enabled(device)
    ]
    if not active:
        return fn

    def wrapped(i: int) -> T:
        with ExitStack() as stack:
            for device, dtype in active:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            return fn(i)

    return wrapped


@dataclass(frozen=True)
class ThreadPlan:
    """How a run uses the CPU: ``member_threads`` workers, each running torch operations on
    ``intra_op_threads`` threads."""

    member_threads: int
    intra_op_threads: int


def plan_threads(
    device: torch.device, k: int, threads: int | None, member_threads: int | None
) -> ThreadPlan:
    """Choose the member workers and intra-op threads for a run.

    ``member_threads`` None means automatic: on a CPU with at least 2 threads, one worker per
    member, even when there are more members than cores (3 workers on 2 cores measured faster
    than 2: the three members finish together instead of one trailing alone); elsewhere (CUDA,
    MPS, a single thread) 1, i.e. the members run one after another in the caller's thread.
    ``threads``: the total CPU threads (None: torch's current setting).
    """
    total = threads if threads is not None else torch.get_num_threads()
    if member_threads is not None:
        if member_threads < 1:
            raise UsageError(f"--member-threads must be >= 1, got {member_threads}")
        if member_threads > 1 and device.type != "cpu":
            raise UsageError(
                f"--member-threads {member_threads} runs members on CPU threads; "
                f"it does not apply to device {device} (use 1 or leave it out)"
            )
        workers = min(member_threads, k)
    elif device.type == "cpu" and total >= 2 and (os.cpu_count() or 1) >= 2:
        workers = k
    else:
        workers = 1
    intra = total if workers == 1 else max(1, total // workers)
    return ThreadPlan(workers, intra)
