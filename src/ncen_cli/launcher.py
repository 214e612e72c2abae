"""The ``ncen`` console script: Ctrl-C at any moment exits 130 with one line, no traceback.

While the command line starts (importing torch takes seconds) and while Click parses options,
SIGINT ends the process at once (nothing has been written yet). Commands run under
:func:`ncen_cli.cli.common.handle_errors`, which restores Python's KeyboardInterrupt so training
can save its last completed epoch, and turns it into exit 130.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

INTERRUPTED_EXIT = 130


def exit_interrupted(_signum: int = signal.SIGINT, _frame: FrameType | None = None) -> None:
    """SIGINT handler for moments with nothing to save: one line on stderr, exit 130 now."""
    try:
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(INTERRUPTED_EXIT)


def install_startup_handler() -> None:
    """Make SIGINT exit 130 at once (main thread only; a no-op elsewhere)."""
    try:
        signal.signal(signal.SIGINT, exit_interrupted)
    except ValueError:  # not the main thread (embedded use)
        pass


def main() -> None:
    """Console-script entry point: import the command line, then run it."""
    install_startup_handler()
    try:
        from ncen_cli.cli import app
    except KeyboardInterrupt:  # a SIGINT that arrived before the handler was installed
        exit_interrupted()
    try:
        app()
    except KeyboardInterrupt:
        exit_interrupted()


if __name__ == "__main__":
    main()
