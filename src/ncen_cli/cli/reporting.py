"""Logs and progress of a long command, on stderr (results go to stdout).

:class:`Reporter` sets up Python ``logging`` for the ``ncen`` and ``ncen_cli`` loggers with Rich's
handler on a terminal (time and level; the source ``file:line`` only with ``--verbose``), the same
fields as plain unwrapped lines elsewhere, and shows progress:
a Rich bar with ``m/N``, elapsed time and ETA when stderr is a terminal; otherwise (nohup, batch
schedulers, pipes) a plain log line (``m/N``, percent, elapsed, ETA) every
:data:`PLAIN_INTERVAL_S` seconds while a task runs, and one when a task that wrote such lines
ends (tasks shorter than that stay silent). Library code reports through the callbacks the commands
pass to it; it never prints.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from ncen_cli.cli.options import Output

PLAIN_INTERVAL_S = 30.0  # at most this long between two progress lines when stderr is no terminal
LOGGERS = ("ncen", "ncen_cli")
log = logging.getLogger("ncen.progress")


def format_seconds(seconds: float) -> str:
    """``1:02:03`` / ``2:03``."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class _Plain:
    """A task's state for the plain (non-terminal) progress lines."""

    label: str
    total: int | None
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    done: int = 0
    lines: int = 0  # plain lines written for this task

    def line(self, now: float) -> str:
        elapsed = now - self.started
        if self.total:
            share = f"{self.done}/{self.total} ({100 * self.done / self.total:.0f} %)"
            eta = (
                f", ETA {format_seconds(elapsed * (self.total - self.done) / self.done)}"
                if 0 < self.done < self.total
                else ""
            )
        else:
            share, eta = f"{self.done}/?", ""
        return f"{self.label}: {share}, elapsed {format_seconds(elapsed)}{eta}"


class Reporter:
    """Logging and progress for one command; use as a context manager.

    Args:
        quiet: log warnings and errors only, no progress.
        no_progress: no progress (log lines stay).
        verbose: debug log lines, each with its source ``file:line``.
        main: False on the non-zero ranks of a torchrun job (they report nothing).
        console: the stderr console (default: a new one).
    """

    def __init__(
        self,
        *,
        quiet: bool = False,
        no_progress: bool = False,
        verbose: bool = False,
        main: bool = True,
        console: Console | None = None,
    ) -> None:
        self.console = console or Console(stderr=True)
        self.quiet, self.verbose, self.main = quiet, verbose, main
        self.show_progress = main and not quiet and not no_progress
        self.terminal = self.console.is_terminal
        self._bars: Progress | None = None
        self._plain: dict[TaskID, _Plain] = {}
        self._next_id = 0
        self._saved: list[tuple[logging.Logger, int, bool]] = []
        self._handler: logging.Handler | None = None
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._stopped = threading.Event()

    @classmethod
    def for_output(cls, output: Output, main: bool = True) -> Reporter:
        """The reporter that a command's --quiet, --verbose and --no-progress ask for."""
        return cls(
            quiet=output.quiet, no_progress=output.no_progress, verbose=output.verbose, main=main
        )

    def __enter__(self) -> Reporter:
        self._handler = self._make_handler()
        level = (
            logging.ERROR
            if not self.main
            else logging.WARNING
            if self.quiet
            else logging.DEBUG
            if self.verbose
            else logging.INFO
        )
        for name in LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level, logger.propagate))
            logger.setLevel(level)
            logger.addHandler(self._handler)
            logger.propagate = False
        if self.show_progress and self.terminal:
            self._bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("elapsed"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bars.__enter__()
        elif self.show_progress:  # plain lines: a ticker writes one per running task every 30 s
            self._ticker = threading.Thread(target=self._tick, name="ncen-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bars is not None:
            self._bars.__exit__(exc_type, exc, tb)
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.join()
        for logger, level, propagate in self._saved:
            if self._handler is not None:  # set by __enter__, which filled _saved
                logger.removeHandler(self._handler)
            logger.setLevel(level)
            logger.propagate = propagate

    def _make_handler(self) -> logging.Handler:
        """Rich's handler on a terminal; off a terminal (a log file) the same fields as plain
        lines, neither padded nor wrapped at 80 columns."""
        if self.terminal:
            return RichHandler(
                console=self.console,
                show_path=self.verbose,
                show_time=True,
                show_level=True,
                markup=False,
                rich_tracebacks=False,
                log_time_format="[%X]",
            )
        handler = logging.StreamHandler(self.console.file)
        where = " (%(filename)s:%(lineno)d)" if self.verbose else ""
        handler.setFormatter(
            logging.Formatter(f"[%(asctime)s] %(levelname)-7s %(message)s{where}", "%H:%M:%S")
        )
        return handler

    def info(self, message: str) -> None:
        """A log line (shown unless --quiet)."""
        logging.getLogger("ncen").info(message)

    def warning(self, message: str) -> None:
        logging.getLogger("ncen").warning(message)

    def start(self, label: str, total: int | None = None) -> TaskID:
        """Begin a task of ``total`` steps (None: not known yet); its elapsed time starts now."""
        if self._bars is not None:
            return self._bars.add_task(label, total=total)
        task = TaskID(self._next_id)
        self._next_id += 1
        if self.show_progress:
            self._plain[task] = _Plain(label, total)
        return task

    def update(
        self, task: TaskID, done: int, total: int | None = None, label: str | None = None
    ) -> None:
        """``done`` steps of ``total`` (None: unchanged) are finished."""
        if self._bars is not None:
            fields: dict = {"completed": done}
            if total is not None:
                fields["total"] = total
            if label is not None:
                fields["description"] = label
            self._bars.update(task, **fields)
            return
        with self._lock:
            state = self._plain.get(task)
            if state is None:
                return
            state.done = done
            state.total = total if total is not None else state.total
            state.label = label if label is not None else state.label

    def restart(self, task: TaskID, label: str, total: int | None = None) -> None:
        """Reuse ``task`` for a new phase (an epoch, a cell): count and elapsed time restart."""
        if self._bars is not None:
            self._bars.reset(task, total=total, description=label)
            return
        with self._lock:
            old = self._plain.get(task)
            if old is None:
                return
            self._plain[task] = _Plain(label, total)
        if old.lines:  # a long phase ended: say where it ended
            log.info(old.line(time.monotonic()))

    def stop(self, task: TaskID) -> None:
        """The task is over: its bar goes away (a plain line says where it ended)."""
        if self._bars is not None:
            self._bars.remove_task(task)
            return
        with self._lock:
            state = self._plain.pop(task, None)
        if state is not None and state.lines:  # a long task ended: say where it ended
            log.info(state.line(time.monotonic()))

    def _emit(self, task: TaskID) -> None:
        with self._lock:
            state = self._plain.get(task)
            now = time.monotonic()
            if state is None or now - state.last_line < PLAIN_INTERVAL_S:
                return
            state.last_line = now
            state.lines += 1
            line = state.line(now)
        log.info(line)

    def _tick(self) -> None:
        """Ticker thread: a line for every running task not reported for PLAIN_INTERVAL_S."""
        while not self._stopped.wait(min(1.0, PLAIN_INTERVAL_S / 4)):
            with self._lock:
                tasks = list(self._plain)
            for task in tasks:
                self._emit(task)
