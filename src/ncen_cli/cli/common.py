"""Shared pieces of the command line: the app, consoles, error handling, option parsing."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from safetensors import SafetensorError

from ncen_cli.cli.options import AttackChoice, SettingOverrides, grouped
from ncen_cli.errors import NcenError, UsageError
from ncen_cli.interrupts import interrupt_command, set_sigint

if TYPE_CHECKING:
    from ncen_cli.cli.options import CheckpointData

app = typer.Typer(
    name="ncen",
    help="Train and honestly evaluate Negative Correlation Ensembles (NCEn) and other "
    "ensemble defenses.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

P = ParamSpec("P")
R = TypeVar("R")
MAX_COUNT = 2**31 - 1  # steps, restarts, limits, batch sizes
# what the running command holds until it ends (output locks): see claim_output
_COMMAND_RESOURCES: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar(
    "ncen_command_resources", default=None
)


def err_console() -> Console:
    """Console for progress, logs and errors (stderr)."""
    return Console(stderr=True)


def out_console() -> Console:
    """Console for results (stdout)."""
    return Console()


def fail(message: str, code: int) -> typer.Exit:
    """Print one error line to stderr and return the Exit to raise."""
    first_line = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    sys.stderr.write(f"error: {first_line}\n")
    return typer.Exit(code)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn NcenError into one line on stderr and its exit code; Ctrl-C into exit 130.

    While the command runs, Ctrl-C raises KeyboardInterrupt (so training can save its last
    epoch), except in the middle of an import (:func:`ncen_cli.interrupts.interrupt_command`);
    before and after it, :mod:`ncen_cli.launcher`'s handler exits 130 at once.
    """

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        previous = set_sigint(interrupt_command)
        resources = contextlib.ExitStack()
        token = _COMMAND_RESOURCES.set(resources)
        try:
            with resources:  # output locks taken by claim_output, released when the command ends
                return func(*args, **kwargs)
        except NcenError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except OSError as exc:  # unwritable paths, full disks: a runtime failure, not a bug
            raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".strip(": "), 1) from None
        except SafetensorError as exc:  # e.g. a full disk while safetensors writes
            raise fail(f"safetensors: {exc}", 1) from None
        except OverflowError as exc:  # an option too large for a C integer or a float32
            raise fail(f"a value is out of range ({exc})", 2) from None
        finally:
            _COMMAND_RESOURCES.reset(token)
            if previous is not None:
                set_sigint(previous)

    return wrapper


def command(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Register the decorated function as ``ncen NAME``, wrapped by :func:`handle_errors` and
    with its option groups shown to Typer field by field (:func:`~ncen_cli.cli.options.grouped`).
    """

    def register(func: Callable[P, R]) -> Callable[P, R]:
        return app.command(name)(handle_errors(grouped(func)))

    return register


def claim_output(path: Path | None, overwrite: bool, option: str = "--out") -> None:
    """The output rules of :mod:`ncen_cli.output_safety` for a command's result file: refuse an
    existing ``path`` unless ``overwrite``, check its folder is writable, and hold its lock (rank 0
    only under torchrun) until the command ends. Call first, before any data is loaded."""
    if path is None:
        return
    from ncen_cli import distributed
    from ncen_cli.output_safety import check_output, output_lock

    check_output(path, overwrite, option)
    if not distributed.is_main_process():
        return
    stack = _COMMAND_RESOURCES.get()
    if stack is None:
        raise RuntimeError("claim_output is for commands wrapped in handle_errors")
    stack.enter_context(output_lock(path, option))


def print_json(payload: Any) -> None:
    """Write a JSON document to stdout (results only; logs go to stderr)."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def parse_float_list(text: str, option: str) -> list[float]:
    """Parse ``"0.1,0.3"``; UsageError naming the option when malformed."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, got '{text}'") from None
    if not values or any(not math.isfinite(v) for v in values):
        raise UsageError(f"{option} takes comma-separated finite numbers, got '{text}'")
    return values


def parse_name_list(text: str, option: str) -> list[str]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not values:
        raise UsageError(f"{option} needs at least one name")
    return values


def parse_key_values(items: list[str] | None, option: str) -> dict[str, float]:
    """Parse repeated ``key=value`` options into floats (keys use underscores)."""
    out: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"{option} takes NAME=VALUE, got '{item}'")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"{option} {key}: '{value}' is not a number") from None
        if not math.isfinite(number):
            raise UsageError(f"{option} {key}: '{value}' is not a finite number")
        out[key.strip().replace("-", "_")] = number
    return out


def require_positive(value: float | int | None, option: str, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not (value > 0 or (allow_zero and value == 0)) or not math.isfinite(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise UsageError(f"{option} must be a finite number {bound}, got {value}")
    if isinstance(value, int) and value > MAX_COUNT:  # a count no run could finish
        raise UsageError(f"{option} must be <= {MAX_COUNT}, got {value}")


def check_eps(values: list[float], option: str = "--eps") -> None:
    for eps in values:
        if not 0 < eps <= 1:
            raise UsageError(f"{option} values must be in (0, 1] for images in [0, 1], got {eps}")


def parse_eps(text: str | None) -> list[float] | None:
    """``--eps`` parsed and every radius checked in (0, 1]; None when the option is not given."""
    if text is None:
        return None
    values = parse_float_list(text, "--eps")
    check_eps(values)
    return values


@dataclasses.dataclass(frozen=True)
class AttackSelection:
    """The ``AttackChoice`` options parsed and checked once, before torch is imported (attack,
    transfer). None keeps the protocol's or the attack's own."""

    names: list[str] | None
    eps: list[float] | None
    overrides: SettingOverrides  # --steps, --step-size, --restarts
    attack_options: list[str] | None  # -o NAME=VALUE, checked per attack when the runs are built


def select_attacks(choice: AttackChoice) -> AttackSelection:
    """UsageError for an empty --attacks, a radius outside (0, 1] or a count or step size that is
    not positive; otherwise the parsed selection."""
    for value, option in (
        (choice.steps, "--steps"),
        (choice.step_size, "--step-size"),
        (choice.restarts, "--restarts"),
    ):
        require_positive(value, option)
    return AttackSelection(
        names=parse_name_list(choice.attacks, "--attacks") if choice.attacks is not None else None,
        eps=parse_eps(choice.eps),
        overrides={
            "steps": choice.steps,
            "step_size": choice.step_size,
            "restarts": choice.restarts,
        },
        attack_options=choice.attack_option,
    )


def check_suffix(out: Path | None, *suffixes: str) -> None:
    """UsageError unless ``--out`` (when given) ends in one of ``suffixes`` (any case)."""
    if out is not None and out.suffix.lower() not in suffixes:
        raise UsageError(f"--out {out}: the file name must end in {' or '.join(suffixes)}")


def checkpoint_test_data(
    checkpoint: Path, data: CheckpointData, limit: int | None, seed: int
) -> tuple[dict[str, Any], Any]:
    """The checkpoint's validated metadata and the test data to evaluate it on.

    ``data`` gives --dataset, --data-dir and --download. The dataset defaults to the one
    recorded in the checkpoint and the data folder to the recorded one (when given neither by
    option nor by NCEN_DATA_DIR); ``limit`` takes a seeded subset of the test images. The errors
    are those of ``ncen attack``: UsageError for a missing file, no recorded dataset or a
    dataset whose images or classes do not fit the checkpoint; CheckpointError for a damaged or
    foreign file. Returns (metadata, ImageArrays).
    """
    from ncen_cli.checkpoint import read_metadata
    from ncen_cli.data import load_dataset

    require_positive(limit, "--test-limit")
    meta = read_metadata(checkpoint)
    dataset, data_dir = data.dataset, data.data_dir
    name = (dataset or meta.get("dataset") or "").lower()
    if not name:
        raise UsageError(f"{checkpoint} records no dataset; pass --dataset")
    config = meta.get("config")
    recorded = config.get("data_dir") if isinstance(config, dict) else None
    if data_dir is None and dataset is None and recorded:
        data_dir = Path(recorded)
        if not data_dir.is_dir():
            raise UsageError(
                f"the data folder recorded in {checkpoint} ({recorded}) is not a folder here; "
                "pass --data-dir"
            )
    arrays = load_dataset(name, data_dir, download=data.download, test_limit=limit, seed=seed)
    check_dataset_fits(arrays, meta, checkpoint)
    return meta, arrays


def check_dataset_fits(arrays: Any, meta: dict[str, Any], checkpoint: Path) -> None:
    """The one dataset-vs-checkpoint check of attack, transfer and inspect: the images' shape
    (C, H, W) and the number of classes must be those the checkpoint records; else a UsageError
    naming both."""
    if tuple(arrays.input_shape) != tuple(meta["input_shape"]) or arrays.num_classes != int(
        meta["num_classes"]
    ):
        raise UsageError(
            f"dataset '{arrays.name}' has {arrays.num_classes} classes of shape "
            f"{tuple(arrays.input_shape)}, the checkpoint expects {meta['num_classes']} of "
            f"{tuple(meta['input_shape'])} ({checkpoint}); pass the --dataset it was trained on"
        )


# viridis at 0, 0.25, 0.5, 0.75, 1: dark violet -> blue -> teal -> green -> yellow. Lightness rises
# monotonically, so the order reads the same with red-green colour blindness (unlike red->green).
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def heat_rgb(value: float) -> tuple[int, int, int]:
    """``value`` in [0, 1] (clipped) -> an (r, g, b) of the viridis colour map."""
    v = min(max(value, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(v), len(_VIRIDIS) - 2)
    t = v - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def heat_colour(value: float) -> str:
    """``value`` in [0, 1] -> a Rich colour (``rgb(r,g,b)``) of the viridis map."""
    r, g, b = heat_rgb(value)
    return f"rgb({r},{g},{b})"
