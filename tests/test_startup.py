"""Fast start-up (issue 17): `ncen --help`, `ncen --version` and a mistyped command import no
torch; every command is still listed and runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from helpers import LAUNCH_PROBE
from ncen_cli import __version__
from ncen_cli.cli import COMMANDS, app, load_command

# Run the console script's code path, then report which heavy modules were imported
PROBE = (
    LAUNCH_PROBE
    + """
heavy = sorted(m for m in ("torch", "numpy", "ncen_cli.training") if m in sys.modules)
commands = sorted(m for m in sys.modules if m.startswith("ncen_cli.cli."))
sys.stderr.write("PROBE " + json.dumps({"code": code, "heavy": heavy, "commands": commands})
                 + "\\n")
"""
)


def _probe(args: list[str]) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NCEN_OFFLINE": "1"},
    )
    line = [x for x in done.stderr.splitlines() if x.startswith("PROBE ")][-1]
    return json.loads(line.removeprefix("PROBE ")), done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["-h"],
        ["--version"],
        ["trian"],
        [],
        ["train", "--bogus"],
        ["train", "--epochs", "many"],
        ["train", "--help"],
        ["sweep", "--seed", "x"],
    ],
)
def test_help_version_and_typos_import_no_torch(args):
    result, _ = _probe(args)
    assert result["heavy"] == [], result
    assert result["code"] in (0, 2, None)
    if not args or args[0] not in COMMANDS:  # no command module is imported for the listing
        assert result["commands"] == ["ncen_cli.cli.common", "ncen_cli.cli.options"], result


def test_version_prints_the_installed_version():
    result, stdout = _probe(["--version"])
    assert result["code"] in (0, None) and stdout == f"ncen {__version__}\n"


def test_help_lists_every_command_with_its_own_first_help_line():
    stdout = CliRunner().invoke(app, ["--help"]).stdout
    for name, (_module, line) in COMMANDS.items():
        command = load_command(name)
        assert (command.help or "").split("\n\n")[0].replace("\n", " ").strip() == line, name
        assert name in stdout


def test_every_listed_command_runs_its_own_help():
    group = typer.main.get_command(app)
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert f"ncen {name}" in result.stdout
    assert list(group.list_commands(None)) == list(COMMANDS)


def test_the_cli_defaults_are_those_of_the_training_step():
    from ncen_cli.cli import options as cli_train
    from ncen_cli.train_step import DEFAULT_DOUBLE_BACKPROP, DEFAULT_FD_SCALE

    assert cli_train.DEFAULT_DOUBLE_BACKPROP == DEFAULT_DOUBLE_BACKPROP
    assert cli_train.DEFAULT_FD_SCALE == DEFAULT_FD_SCALE
