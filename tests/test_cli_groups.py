"""Option groups (cli/options.py): options that several commands take together are declared once,
shown to Typer field by field, and handed to the command as one frozen object."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from ncen_cli.cli import load_command
from ncen_cli.cli import options as opt
from ncen_cli.cli.config import SettingsFile

runner = CliRunner()


@dataclasses.dataclass(frozen=True)
class Window(opt.OptionGroup):
    width: Annotated[int, typer.Option(help="Width in pixels.")] = 640
    title: Annotated[str | None, typer.Option(help="Window title.")] = None


def test_a_group_is_shown_field_by_field_and_arrives_as_one_object():
    received: list[object] = []
    app = typer.Typer()

    @app.command()
    @opt.grouped
    def show(name: str, *, window: Window, loud: bool = False) -> None:
        received.append((name, window, loud))

    result = runner.invoke(app, ["box", "--width", "800", "--loud"])
    assert result.exit_code == 0, result.output
    assert received == [("box", Window(width=800, title=None), True)]
    help_text = runner.invoke(app, ["--help"], env={"COLUMNS": "120"}).output
    assert (
        "--width" in help_text and "Width in pixels." in help_text and "--window" not in help_text
    )
    received.clear()
    assert runner.invoke(app, ["box"]).exit_code == 0
    assert received == [("box", Window(), False)]  # the group's defaults


def test_a_function_without_groups_keeps_its_parameters():
    def plain(a: int, b: str = "x") -> None: ...

    wrapped = opt.grouped(plain)
    assert list(inspect.signature(wrapped).parameters) == ["a", "b"]


# group -> the commands that take it
SHARED = {
    opt.Output: ("train", "attack", "transfer", "sweep", "inspect"),
    opt.CheckpointData: ("attack", "transfer", "inspect"),
    opt.AttackChoice: ("attack", "transfer"),
    opt.Training: ("train", "sweep"),
    SettingsFile: ("train", "sweep"),
}


@pytest.mark.parametrize("group", list(SHARED), ids=lambda g: g.__name__)
def test_every_command_of_a_group_takes_its_fields_with_one_default_and_help(group):
    """The fields stand in every command that takes the group, with the group's defaults and help
    text (one declaration: no command can drift from another)."""
    fields = {f.name: f.default for f in dataclasses.fields(group)}
    seen: dict[str, tuple[object, str | None]] = {}
    for name in SHARED[group]:
        params = {p.name: p for p in load_command(name).params}
        for field, default in fields.items():
            assert field in params, f"ncen {name} lacks {field} of {group.__name__}"
            param = params[field]
            assert param.default == default, (name, field)
            entry = (param.default, getattr(param, "help", None))
            assert seen.setdefault(field, entry) == entry, f"{field} differs in ncen {name}"
