"""Ctrl-C: exit 130 with one line at any moment, and tell a real SIGINT from a plugin's raise.

Start-up (importing the command line and torch) and the moments around a command have nothing to
save, so SIGINT ends the process at once (:func:`install_startup_handler`). While a command runs,
:func:`ncen_cli.cli.common.handle_errors` installs :func:`interrupt_command`: SIGINT raises
KeyboardInterrupt, so training can save its last completed epoch, and handle_errors turns it into
exit 130; but in the middle of an import (torch's own lazy imports included) it exits at once,
releasing what :func:`released_on_exit` registered (output locks), since a KeyboardInterrupt raised
inside an import can be swallowed by the imported code or surface as a C++ abort.
:func:`noticing_sigint` lets code that must survive anything a plugin raises (KeyboardInterrupt
included) still give way to the user's Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

INTERRUPTED_EXIT = 130


# callbacks that release what the process holds (output locks), run by exit_interrupted
_RELEASE_ON_EXIT: list[Callable[[], None]] = []


def exit_interrupted(_signum: int = signal.SIGINT, _frame: FrameType | None = None) -> None:
    """SIGINT handler for moments with nothing to save: release what :func:`released_on_exit`
    holds, one line on stderr, exit 130 now."""
    try:
        for release in reversed(_RELEASE_ON_EXIT):
            with contextlib.suppress(Exception):
                release()
        sys.stderr.write("error: interrupted\n")
    finally:
        exit_now(INTERRUPTED_EXIT)


@contextlib.contextmanager
def released_on_exit(release: Callable[[], None]) -> Iterator[None]:
    """Within the block, an immediate exit on Ctrl-C calls ``release`` first (e.g. to remove a
    lock file); ``release`` must be quick and safe to call at any moment."""
    _RELEASE_ON_EXIT.append(release)
    try:
        yield
    finally:
        _RELEASE_ON_EXIT.remove(release)


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


def interrupt_command(signum: int, frame: FrameType | None) -> None:
    """SIGINT handler while a command runs: KeyboardInterrupt, or exit 130 at once mid-import."""
    if importing():
        exit_interrupted(signum, frame)
    raise KeyboardInterrupt


def importing() -> bool:
    """Whether a module is being imported right now (importlib marks its spec while it runs)."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False) is True
        for module in list(sys.modules.values())
    )


def install_startup_handler() -> None:
    """Make SIGINT exit 130 at once (main thread only; a no-op elsewhere)."""
    set_sigint(exit_interrupted)


def set_sigint(handler: Any) -> Any:
    """Install a SIGINT handler; returns the previous one (None off the main thread, where
    nothing is installed: embedded use)."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None


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
