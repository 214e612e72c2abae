"""The ``ncen`` console script: Ctrl-C at any moment exits 130 with one line, no traceback.

While the command line starts (importing torch takes seconds) and while Click parses options,
SIGINT ends the process at once (nothing has been written yet). Commands run under
:func:`ncen_cli.cli.common.handle_errors`, which lets SIGINT raise KeyboardInterrupt so training can
save its last completed epoch, and turns it into exit 130. The rules: :mod:`ncen_cli.interrupts`.
"""

from __future__ import annotations

from ncen_cli.interrupts import (
    INTERRUPTED_EXIT,
    exit_interrupted,
    exit_now,
    install_startup_handler,
)


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
    except SystemExit as exc:
        if exc.code == INTERRUPTED_EXIT:  # interrupted: the command has released what it held
            exit_now(INTERRUPTED_EXIT)
        raise


if __name__ == "__main__":
    main()
