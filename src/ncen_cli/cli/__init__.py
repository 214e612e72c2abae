"""The ``ncen`` command line: a thin Typer layer over the Python API.

Each subcommand lives in its own module and registers itself on :data:`app`.
"""

from __future__ import annotations

from ncen_cli.cli.common import app

# Importing a module registers its commands; `ncen --help` lists them in this order.
# isort: off
from ncen_cli.cli import train  # noqa: F401, E402
from ncen_cli.cli import attack  # noqa: F401, E402
from ncen_cli.cli import transfer  # noqa: F401, E402
from ncen_cli.cli import sweep  # noqa: F401, E402
from ncen_cli.cli import inspect  # noqa: F401, E402
from ncen_cli.cli import info  # noqa: F401, E402
from ncen_cli.cli import config  # noqa: F401, E402
# isort: on


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
