"""Ctrl-C: exit 130 with one line at any moment, and tell a real SIGINT from a plugin's raise.

Start-up (importing the command line and torch) and the moments around a command have nothing to
save, so SIGINT ends the process at once (:func:`install_startup_handler`). While a command runs,
:func:`ncen_cli.cli.common.handle_errors` lets SIGINT raise KeyboardInterrupt, so training can save
its last completed epoch, and turns it into exit 130. :func:`noticing_sigint` lets code that must
survive anything a plugin raises (KeyboardInterrupt included) still give way to the user's Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

INTERRUPTED_EXIT = 130


def exit_interrupted(_signum: int = signal.SIGINT, _frame: FrameType | None = None) -> None:
    """SIGINT handler for moments with nothing to save: one line on stderr, exit 130 now."""
    try:
        sys.stderr.write("error: interrupted\n")
    finally:
        exit_now(INTERRUPTED_EXIT)


def exit_now(code: int) -> None:
    """Flush stdout and stderr and leave with ``code`` at once, skipping interpreter shutdown.

    Used once a command has released what it held. CPython remembers a KeyboardInterrupt that
    passed through any ``exec`` of source text (dataclasses, torch's lazy imports), even one ncen
    caught, and would end an ordinary exit by killing itself with SIGINT (status -2, not 130).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def install_startup_handler() -> None:
    """Make SIGINT exit 130 at once (main thread only; a no-op elsewhere)."""
    with contextlib.suppress(ValueError):  # not the main thread (embedded use)
        signal.signal(signal.SIGINT, exit_interrupted)


@contextlib.contextmanager
def noticing_sigint() -> Iterator[list[int]]:
    """Within the block, record each SIGINT the process receives, then act on it as the handler in
    force would. Yields the record (a list, empty while none came). Off the main thread nothing can
    be recorded and the list stays empty."""
    received: list[int] = []
    try:
        previous: Any = signal.getsignal(signal.SIGINT)

        def record(signum: int, frame: FrameType | None) -> None:
            received.append(signum)
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:  # SIG_DFL or a handler installed from C
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, record)
    except ValueError:  # not the main thread
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
