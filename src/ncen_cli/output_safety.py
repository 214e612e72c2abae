"""Output safety: never lose a result, never let two runs write the same output.

One set of rules for every output ncen writes (a training checkpoint, a sweep folder, the
``--out`` of attack and transfer):

* :func:`check_output` refuses an output that already exists (a file of any kind, a link, a
  folder) unless the caller resumes it or the user passed ``--overwrite``, and checks that the
  folder it goes into can be written, before any data is loaded or any epoch trained.
* :func:`output_lock` holds an exclusive lock per output while it is written: a lock file
  ``<output>.lock`` beside it, holding the owner's pid and host, locked with ``flock``. A second
  writer fails at once with one line naming the holder. A lock whose owner died (``kill -9``,
  power loss) is stale: the kernel released its ``flock``, so the next writer takes it over and
  says so in the log.
* While the lock is held, temporary files that a dead writer's atomic writes left behind
  (``.<name>.*.tmp``, see :mod:`ncen_cli.atomic`) are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ncen_cli.atomic import TEMP_SUFFIX, current_umask, temp_prefix
from ncen_cli.errors import NcenError, UsageError
from ncen_cli.interrupts import released_on_exit

try:
    import fcntl

    HAVE_FLOCK = True
except ImportError:  # pragma: no cover - Windows: no advisory locks, O_EXCL only
    HAVE_FLOCK = False

log = logging.getLogger("ncen.outputs")
LOCK_SUFFIX = ".lock"


def lock_path(output: Path) -> Path:
    """The lock file of ``output`` (file or folder): ``<output>.lock`` beside it."""
    return output.with_name(output.name + LOCK_SUFFIX)


def check_writable_folder(output: Path, option: str = "--out") -> None:
    """Raise NcenError unless ``output``'s folder exists and is writable or can be created
    (its nearest existing ancestor is a writable folder)."""
    folder = output.parent if output.parent != Path("") else Path(".")
    probe = folder
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{option} {output}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise NcenError(f"{option} {output}: folder {probe} is not writable")


def check_output(
    output: Path, overwrite: bool, option: str = "--out", resumable: bool = False
) -> None:
    """Refuse an existing ``output`` unless ``overwrite`` (or ``resumable``: the caller resumes
    it and has checked that it may); then check its folder is writable."""
    exists = output.exists() or output.is_symlink()
    if exists and not (overwrite or resumable):
        kind = "a folder" if output.is_dir() else "a file" if output.is_file() else "something"
        raise UsageError(
            f"{option} {output} exists ({kind}); pass --overwrite to replace it, or choose "
            f"another {option}"
        )
    check_writable_folder(output, option)


def _read_owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8", "replace") or "{}")
        return f"pid {int(info['pid'])} on {str(info.get('host', '?'))[:64]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def _acquire(lock: Path, option: str, output: Path) -> int:
    """Open and ``flock`` the lock file; NcenError naming the holder if another process has it."""
    for _attempt in range(20):  # a holder that unlinks its lock as we open it: try again
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            if HAVE_FLOCK:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise NcenError(
                f"{option} {output} is being written by {owner} (lock {lock}); wait for it to "
                "finish or stop it"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise NcenError(f"cannot lock {lock}: it keeps changing; is another ncen starting?")


def remove_stale_temps(output: Path) -> list[Path]:
    """Remove the temporary files a dead writer's atomic writes of ``output`` (and, for a folder,
    of anything inside it) left behind. Call only while holding ``output``'s lock."""
    found = list(output.parent.glob(f"{temp_prefix(output)}*{TEMP_SUFFIX}"))
    if output.is_dir():
        found += [p for p in output.rglob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    if found:
        log.info("removed %d temporary file(s) of an interrupted writer of %s", len(found), output)
    return found


@contextlib.contextmanager
def output_lock(output: str | Path, option: str = "--out") -> Iterator[Path]:
    """Hold the exclusive lock of ``output`` for the ``with`` block; yields the lock file.

    Raises NcenError at once when another live process holds it. A stale lock (its owner died) is
    taken over; stale temporary files of ``output`` are removed once the lock is held.
    """
    output = Path(output)
    created = [p for p in (output.parent, *output.parent.parents) if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(output)
    try:
        fd = _acquire(lock, option, output)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        previous = _read_owner(fd)
        if previous != "an unknown process":
            log.info("took over the stale lock of %s (%s)", output, previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        remove_stale_temps(output)
        with released_on_exit(lambda: lock.unlink(missing_ok=True)):
            yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created for its output, deepest first, if still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
