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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "error: --steps must be a finite number > 0, got 0"),
        (["--step-size", "-0.5"], "error: --step-size must be a finite number > 0, got -0.5"),
        (["--restarts", "0"], "error: --restarts must be a finite number > 0, got 0"),
        (["--eps", "1.5"], "error: --eps values must be in (0, 1] for images in [0, 1], got 1.5"),
        (["--attacks", ","], "error: --attacks needs at least one name"),
    ],
)
def test_attack_and_transfer_check_the_attack_choice_alike(tmp_path, args, message):
    """One check of the AttackChoice group (common.select_attacks) for both commands: the same
    one-line error, before the checkpoint is read (the file here is not a checkpoint at all)."""
    from ncen_cli.cli import app

    not_a_checkpoint = tmp_path / "m.safetensors"
    not_a_checkpoint.write_bytes(b"not a checkpoint")
    for command in ("attack", "transfer"):
        result = runner.invoke(app, [command, str(not_a_checkpoint), *args])
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.strip() == message, command
