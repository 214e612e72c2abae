"""Settings files for ``ncen train`` and ``ncen sweep``: ``--config FILE.toml``, ``--print-config``
and ``ncen config CKPT`` (the config recorded in a checkpoint, as such a file).

A settings file is one flat TOML table whose keys are the commands' long option names, spelled
with ``-`` or ``_`` (``batch-size = 32``, ``param = ["lambda_cos=0.02"]``). Options given on the
command line override the file. No torch import here: reading and checking a file is instant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from ncen_cli.cli.common import command, fail
from ncen_cli.cli.options import (
    DEPRECATED_SPELLINGS,
    Checkpoint,
    OptionGroup,
    deprecation_warning,
)

# Parameters that are not settings of the run: never read from or written to a settings file
NOT_SETTINGS = frozenset(
    {
        "config_file",
        "print_config",
        "json_output",
        "out",
        "resume",
        "run",
        "overwrite",
        "figure",
        "dpi",
        "help",
        "quiet",
        "verbose",
        "no_progress",
    }
)
# Recorded TrainConfig fields that `ncen train` takes as options of the same name
_RECORDED_OPTIONS = (
    "dataset",
    "data_dir",
    "defense",
    "activation",
    "combine",
    "epochs",
    "batch_size",
    "lr",
    "augment",
    "noise",
    "noise_eps",
    "train_limit",
    "test_limit",
    "seed",
    "precision",
    "deterministic",
    "double_backprop",
    "fd_scale",
)


def setting_keys(command: Any) -> dict[str, str]:
    """Map every accepted settings-file key (long option name, ``-`` or ``_``) to its parameter."""
    keys: dict[str, str] = {}
    for param in command.params:
        if param.name is None or param.name in NOT_SETTINGS:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                keys[opt[2:]] = param.name
                keys[opt[2:].replace("-", "_")] = param.name
    return keys


def read_settings(path: Path, command: Any) -> dict[str, Any]:
    """The settings in ``path`` as Click default values keyed by parameter name.

    Raises typer.Exit(2) after one error line for an unreadable file, bad TOML, a nested table,
    or a key that is not an option of ``command`` (the key is named)."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise fail(f"--config {path}: {exc.strerror or exc}", 2) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise fail(f"--config {path} is not valid TOML ({exc})", 2) from None
    keys = setting_keys(command)
    multiple = {p.name for p in command.params if getattr(p, "multiple", False)}
    settings: dict[str, Any] = {}
    renamed = {old[2:]: new[2:] for old, new in DEPRECATED_SPELLINGS.get(command.name, {}).items()}
    renamed.update({old.replace("-", "_"): new for old, new in renamed.items()})
    for key, value in table.items():
        if key in renamed and renamed[key] in keys:  # a spelling of the previous release
            sys.stderr.write(deprecation_warning(key, renamed[key], command.name) + "\n")
            key = renamed[key]
        if key not in keys:
            raise fail(
                f"--config {path}: unknown key '{key}' (not an option of `ncen {command.name}`)", 2
            )
        name = keys[key]
        if isinstance(value, dict):
            raise fail(f"--config {path}: '{key}' must be a single value, not a table", 2)
        if name in multiple:
            value = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        elif isinstance(value, list):  # a comma list option written as a TOML array
            value = ",".join(str(v) for v in value)
        settings[name] = value
    return settings


def load_config_callback(ctx: typer.Context, _param: Any, value: Path | None) -> Any:
    """Eager ``--config`` callback: the file's settings become the command's defaults, so every
    option given on the command line overrides them."""
    if value is not None:
        ctx.default_map = {**(ctx.default_map or {}), **read_settings(value, ctx.command)}
    return value


ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        is_eager=True,
        callback=load_config_callback,
        help="Read settings from a TOML file (keys: long option names); flags override it.",
    ),
]
PrintConfig = Annotated[
    bool,
    typer.Option("--print-config", help="Print the resolved settings as a TOML file and exit."),
]


@dataclasses.dataclass(frozen=True)
class SettingsFile(OptionGroup):
    """--config FILE and --print-config (train, sweep)."""

    config_file: ConfigFile = None
    print_config: PrintConfig = False


def command_settings(ctx: typer.Context) -> dict[str, Any]:
    """The command's resolved settings (every parameter except outputs and switches)."""
    return {k: v for k, v in ctx.params.items() if k not in NOT_SETTINGS}


def format_settings(settings: dict[str, Any], comments: list[str] | None = None) -> str:
    """Settings as a flat TOML table (long option names with ``-``); unset (None) options become
    comment lines, since TOML has no null. ``--config`` reads the text back to the same values."""
    lines = [f"# {c}" for c in comments or []]
    for name, value in settings.items():
        key = name.replace("_", "-")
        if value is None:
            lines.append(f"# {key} = (not set: the default)")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def options_from_record(saved: dict[str, Any]) -> dict[str, Any]:
    """The ``ncen train`` options that reproduce a recorded run config (the ``config`` entry of a
    checkpoint's metadata or resume state): members as a comma list, hyperparameters as
    ``--param NAME=VALUE`` (``repr`` keeps every float bit), everything else by name."""
    options: dict[str, Any] = {"members": ",".join(str(m) for m in saved.get("members", []))}
    for name in _RECORDED_OPTIONS:
        if name in saved:
            options[name] = saved[name]
    hyper = saved.get("hyperparameters") or {}
    options["param"] = [f"{k}={float(v)!r}" for k, v in sorted(hyper.items())]
    return options


@command("config")
def config_command(
    checkpoint: Checkpoint,
) -> None:
    """Print the training settings recorded in a checkpoint as a --config TOML file."""
    from ncen_cli.checkpoint import read_metadata
    from ncen_cli.errors import UsageError

    if not checkpoint.exists():
        raise UsageError(f"{checkpoint} does not exist")
    saved = read_metadata(checkpoint).get("config")
    if not isinstance(saved, dict):
        raise UsageError(f"{checkpoint} records no training config (not made by `ncen train`)")
    options = options_from_record(saved)
    extra = [
        f"recorded, not an option of ncen train: {k} = {_toml_value(v)}"
        for k, v in sorted(saved.items())
        if k not in options and k not in ("members", "hyperparameters") and v is not None
    ]
    comments = [
        f"settings recorded in {checkpoint.name}: `ncen train --config FILE` reruns them",
        *extra,
    ]
    typer.echo(format_settings(options, comments), nl=False)
