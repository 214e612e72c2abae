"""Where ncen keeps things: platformdirs folders, overridable by environment variables.

NCEN_CACHE_DIR  where datasets are downloaded (default: the user cache dir / datasets)
NCEN_RUNS_DIR   training runs (default: the user data dir / runs)
NCEN_DATA_DIR   is different: it is the default of ``--data-dir``, a folder the user fills and
                ncen only reads.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from platformdirs import PlatformDirs

_DIRS = PlatformDirs("ncen", appauthor=False)


def cache_dir() -> Path:
    """Where torchvision datasets are downloaded when no --data-dir is given."""
    return Path(os.environ.get("NCEN_CACHE_DIR") or Path(_DIRS.user_cache_dir) / "datasets")


def runs_dir() -> Path:
    return Path(os.environ.get("NCEN_RUNS_DIR") or Path(_DIRS.user_data_dir) / "runs")


def new_run_folder(label: str) -> Path:
    """A fresh (not yet existing) folder name ``<runs>/<timestamp>-<label>``, with ``-2``,
    ``-3``... appended when that one exists."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = runs_dir() / f"{stamp}-{label}"
    n = 1
    while folder.exists():
        n += 1
        folder = runs_dir() / f"{stamp}-{label}-{n}"
    return folder


def new_run_path(label: str) -> Path:
    """A fresh checkpoint path ``<runs>/<timestamp>-<label>/ensemble.safetensors``."""
    return new_run_folder(label) / "ensemble.safetensors"
