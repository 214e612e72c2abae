"""Plotting helpers. matplotlib is an optional extra (``pip install 'ncen[plot]'``)."""

from __future__ import annotations

from types import ModuleType

from ncen_cli.errors import UsageError


def require_matplotlib() -> ModuleType:
    """Import matplotlib.pyplot with a headless backend, or raise a one-line install hint."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--png needs matplotlib: pip install 'ncen[plot]' (or pipx inject ncen matplotlib)"
        ) from None
    return plt
