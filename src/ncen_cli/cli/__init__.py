"""The ``ncen`` command line: a thin Typer layer over the Python API.

Each subcommand lives in its own module and registers itself on :data:`app`.
"""

from __future__ import annotations

from ncen_cli.cli import attack, info, sweep, train, transfer  # noqa: F401  (registers commands)
from ncen_cli.cli.common import app


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
