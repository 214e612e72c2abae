"""Atomic file writes: a crash at any moment leaves either the old file or the new one.

Every file ncen writes goes through :func:`atomic_write`, so every file honours the umask
(``0o666 & ~umask``: 0644 under umask 022), like a file opened with ``open()``, and a write that
fails for want of space is one :class:`~ncen_cli.errors.NcenError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from ncen_cli.errors import NcenError

TEMP_SUFFIX = ".tmp"
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def temp_prefix(path: Path) -> str:
    """Name prefix of :func:`atomic_write`'s temporary files for ``path`` (``.NAME.``)."""
    return f".{path.name}."


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``. The folder is created if needed; the file gets mode ``0o666 & ~umask``.
    Returns ``path``. Raises NcenError when the file cannot be written (disk full, I/O error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 whatever the umask
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except SafetensorError as exc:  # safetensors reports a full disk as its own error
        tmp.unlink(missing_ok=True)
        raise NcenError(f"cannot write {path}: {str(exc).strip() or 'write failed'}") from None
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise NcenError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
