"""The ``ncen`` command line: a thin Typer layer over the Python API.

Each subcommand lives in its own module and registers itself on :data:`app`. A module is imported
only when its command runs (or its own ``--help`` is asked for): ``ncen --help``, ``ncen
--version`` and a mistyped command name never import torch, so they answer at once.
"""

from __future__ import annotations

import importlib
import re
import sys
from typing import Annotated, Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

try:  # typer >= 0.2x vendors Click as typer._click; older ones use Click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    click_errors = importlib.import_module("click.exceptions")

from ncen_cli.cli.common import app
from ncen_cli.cli.options import rewrite_deprecated

# name: (module that registers it, one-line help shown by `ncen --help`), in listing order;
# test_startup checks each line against the command's own docstring
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ncen_cli.cli.train", "Train an ensemble and write it to a safetensors checkpoint."),
    "attack": (
        "ncen_cli.cli.attack",
        "Attack an ensemble checkpoint and report accuracy under each attack, with self-checks.",
    ),
    "transfer": (
        "ncen_cli.cli.transfer",
        "Craft adversarial examples on each member; evaluate "
        "them on every member and the ensemble.",
    ),
    "sweep": (
        "ncen_cli.cli.sweep",
        "Train and score one NCEn ensemble per (lambda_cos, lambda_norm) cell; resumable.",
    ),
    "inspect": (
        "ncen_cli.cli.inspect",
        "Measure input-gradient diversity and member agreement of a checkpoint on test data.",
    ),
    "config": (
        "ncen_cli.cli.config",
        "Print the training settings recorded in a checkpoint as a --config TOML file.",
    ),
    "plugins": (
        "ncen_cli.cli.info",
        "List registered architectures, defenses, attacks and datasets, and whether each loaded.",
    ),
    "env": ("ncen_cli.cli.info", "Versions, devices, resolved data/run folders and plugins."),
}


class NcenCommand(TyperCommand):
    """A command whose flags (``--json``, ``--help``) show no ``<bool>`` type in the help."""

    def get_params(self, ctx: Any) -> list[Any]:
        return flags_without_metavar(super().get_params(ctx))


class LazyGroup(TyperGroup):
    """The ``ncen`` group: lists every command from :data:`COMMANDS` and imports a command's
    module only when that command is resolved to run."""

    def get_params(self, ctx: Any) -> list[Any]:
        return flags_without_metavar(super().get_params(ctx))

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return self.commands.get(cmd_name)
        # for the listing of `ncen --help`: a stand-in that carries the one-line help
        return TyperCommand(cmd_name, help=COMMANDS[cmd_name][1])

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] in COMMANDS and args[0] not in self.commands:
            self.commands[args[0]] = load_command(args[0])
        name, command, rest = super().resolve_command(ctx, args)
        if name is not None and not ctx.resilient_parsing:  # not while completing a word
            rest = rewrite_deprecated(name, rest)
        return name, command, rest

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's main, with usage errors as one ``error:`` line and exit code 2 (as ncen's own
        errors: src/ncen_cli/errors.py), instead of Click's boxed message."""
        kwargs["standalone_mode"] = False
        if not standalone_mode:
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **kwargs)
        except click_errors.ClickException as exc:
            sys.stderr.write(f"error: {usage_error_line(exc)}\n")
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.stderr.write("error: interrupted\n")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)  # an Exit's code, else success


def usage_error_line(exc: click_errors.ClickException) -> str:
    """One line for a Click error: the message (lower-case start), the command and its help."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = re.sub(r"\.\s+([A-Z])", lambda m: "; " + m[1].lower(), message)  # one sentence
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    if ctx is None or not isinstance(exc, click_errors.UsageError):
        return message
    return f"{ctx.command_path}: {message} (see {ctx.command_path} --help)"


def load_command(name: str) -> Any:
    """Import the module of command ``name`` and build its Click command."""
    importlib.import_module(COMMANDS[name][0])
    for info in app.registered_commands:
        if info.name == name:
            if info.cls in (None, TyperCommand):
                info.cls = NcenCommand
            return typer.main.get_command_from_info(
                info,
                pretty_exceptions_short=app.pretty_exceptions_short,
                rich_markup_mode=app.rich_markup_mode,
            )
    raise RuntimeError(f"{COMMANDS[name][0]} registers no command '{name}'")


def flags_without_metavar(params: list[Any]) -> list[Any]:
    """A flag takes no value: show no ``<bool>`` type for it in the help."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _print_version(value: bool) -> None:
    if value:
        from ncen_cli import __version__

        typer.echo(f"ncen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_print_version,
            help="Print ncen's version and exit.",
        ),
    ] = False,
) -> None:
    """Train and honestly evaluate Negative Correlation Ensembles (NCEn) and other ensemble
    defenses."""


app.info.cls = LazyGroup


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["COMMANDS", "app", "main"]
