"""One option vocabulary (issue 17): every command's options against docs/usage.md's table, the
deprecated spellings, one-line usage errors without torch, flags shown as flags, completion."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from helpers import LAUNCH_PROBE
from ncen_cli.cli import COMMANDS, app, load_command
from ncen_cli.cli.options import DEPRECATED_SPELLINGS, rewrite_deprecated

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
runner = CliRunner()


def _table(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``heading`` in docs/usage.md."""
    text = USAGE.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and separator


def _vocabulary() -> dict[str, tuple[str, set[str]]]:
    """option spelling (``-q/--quiet``) -> (concept, commands)."""
    table: dict[str, tuple[str, set[str]]] = {}
    for concept, option, commands, _meaning in _table("## Option vocabulary"):
        spelling = re.fullmatch(r"`([^`]+)`", option)
        assert spelling, f"option cell {option!r} is not one `--name`"
        names = {c.strip() for c in commands.split(",")}
        if names == {"every command"}:
            names = {"ncen", *COMMANDS}
        assert spelling[1] not in table, f"{spelling[1]} has two rows"
        table[spelling[1]] = (concept, names)
    return table


def _options() -> dict[str, dict[str, object]]:
    """command -> {option spelling: Click parameter} for every visible option."""
    group = typer.main.get_command(app)
    root = group.context_class(group, info_name="ncen", **group.context_settings)
    commands = {"ncen": group, **{n: load_command(n) for n in COMMANDS}}
    found: dict[str, dict[str, object]] = {}
    for name, command in commands.items():
        ctx = (
            root if name == "ncen" else command.context_class(command, info_name=name, parent=root)
        )
        found[name] = {}
        for param in command.get_params(ctx):  # with -h/--help
            if getattr(param, "param_type_name", "") == "argument" or param.hidden:
                continue
            found[name][_spelling(param)] = param
    return found


def _spelling(param: object) -> str:
    """``--quiet`` and ``-q`` -> the table's ``-q/--quiet`` (short names first)."""
    names = [*param.opts, *param.secondary_opts]  # type: ignore[attr-defined]
    short = [n for n in names if not n.startswith("--")]
    long = [n for n in names if n.startswith("--")]
    return "/".join(short + long)


def test_every_visible_option_is_in_the_vocabulary_table_for_its_command():
    table = _vocabulary()
    for command, options in _options().items():
        for spelling in options:
            assert spelling in table, f"ncen {command} {spelling} is not in docs/usage.md's table"
            assert command in table[spelling][1], (
                f"ncen {command} {spelling}: the table does not list {command} for it"
            )


def test_every_table_row_exists_in_each_command_it_names():
    options = _options()
    for spelling, (_concept, commands) in _vocabulary().items():
        for command in commands:
            assert spelling in options[command], f"table: ncen {command} has no {spelling}"


def test_no_concept_is_spelled_two_ways():
    table = _vocabulary()
    concepts = [concept for concept, _ in table.values()]
    assert len(concepts) == len(set(concepts)), "a concept has two rows (two spellings)"
    # the same parameter (Python name) is spelled the same in every command
    by_dest: dict[str, set[str]] = {}
    for options in _options().values():
        for spelling, param in options.items():
            by_dest.setdefault(param.name, set()).add(spelling)  # type: ignore[attr-defined]
    assert {d: s for d, s in by_dest.items() if len(s) > 1} == {}
    # the old spellings are never visible options
    visible = {s for options in _options().values() for s in options}
    old = {o for spellings in DEPRECATED_SPELLINGS.values() for o in spellings}
    assert not {s for s in visible for o in old if o in s.split("/")}


def test_deprecated_spellings_table_matches_the_code():
    documented = {
        (old.strip("`"), command.strip(), new.strip("`"))
        for old, commands, new in _table("Spellings of 0.1")
        for command in commands.split(",")
    }
    in_code = {
        (old, command, new)
        for command, spellings in DEPRECATED_SPELLINGS.items()
        for old, new in spellings.items()
    }
    assert documented == in_code


def test_rewrite_deprecated_maps_each_old_spelling_once_with_a_warning(capsys):
    for command, spellings in DEPRECATED_SPELLINGS.items():
        for old, new in spellings.items():
            args = ["ckpt", old, "3", f"{old}=4", "--", old]
            assert rewrite_deprecated(command, args) == ["ckpt", new, "3", f"{new}=4", "--", old]
            lines = capsys.readouterr().err.splitlines()
            assert lines == [
                f"warning: ncen {command} {old} is deprecated and will be removed in "
                f"the next release; use {new}"
            ]
    assert rewrite_deprecated("train", ["--limit", "3"]) == ["--limit", "3"]  # not train's


@pytest.mark.parametrize(
    "command,args,new",
    [
        ("attack", ["--limit", "0"], "--test-limit"),
        ("inspect", ["--limit", "0"], "--test-limit"),
        ("transfer", ["--limit", "0"], "--test-limit"),
        ("transfer", ["--png", "fig.bmp"], "--figure"),
        ("transfer", ["--attack", "pgd", "--eps", "2"], "--attacks"),
        ("sweep", ["--png", "fig.bmp"], "--figure"),
    ],
)
def test_old_spellings_still_work_end_to_end(tmp_path, command, args, new):
    argv = [command, *(["ckpt.safetensors"] if command != "sweep" else []), *args]
    result = runner.invoke(app, argv)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines[0].startswith("warning:") and lines[0].endswith(f"use {new}")
    assert len(lines) == 2 and lines[1].startswith("error:")
    if new != "--attacks":  # the error names the option by its current name
        assert new in lines[1]


def test_flags_show_no_type_in_help():
    for name in COMMANDS:
        text = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).stdout
        assert "<bool>" not in text, name
    assert "<bool>" not in runner.invoke(app, ["--help"]).stdout


def test_the_cli_copies_of_library_constants_agree():
    from ncen_cli import evaluation, transfer
    from ncen_cli.cli import attack as attack_cli
    from ncen_cli.cli import transfer as transfer_cli

    assert attack_cli.WORST_CASE == evaluation.WORST_CASE
    assert transfer_cli.DEFAULT_EPS == transfer.DEFAULT_EPS


# --- usage errors: one line, exit 2, no torch ------------------------------------------------

PROBE = (
    LAUNCH_PROBE
    + """
sys.stderr.write("PROBE " + json.dumps({"code": code, "torch": "torch" in sys.modules}) + "\\n")
"""
)


def _probe(args: list[str], env: dict[str, str] | None = None) -> tuple[dict, list[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NCEN_OFFLINE": "1", **(env or {})},
    )
    lines = done.stderr.splitlines()
    probe = json.loads(lines[-1].removeprefix("PROBE "))
    return probe, lines[:-1], done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["attack", "x.safetensors", "--bogus"],
        ["attack", "x.safetensors", "--steps", "many"],
        ["attack", "x.safetensors", "--test-limit", "0"],
        ["attack", "x.safetensors", "--eps", "1.5"],
        ["attack", "x.safetensors", "--out", "r.txt"],
        ["attack"],
        ["transfer", "x.safetensors", "--bogus"],
        ["transfer", "x.safetensors", "--eps", "0"],
        ["transfer", "x.safetensors", "--test-limit", "-1"],
        ["transfer", "x.safetensors", "--figure", "fig.bmp"],
        ["transfer", "x.safetensors", "--protocol", "weird"],
        ["inspect", "x.safetensors", "--batch-size", "0"],
        ["inspect", "x.safetensors", "--seed", "x"],
        ["inspect", "x.safetensors", "--out", "r.csv"],
        ["sweep", "--figure", "fig.jpeg"],
        ["train", "--epochs", "many"],
    ],
)
def test_usage_errors_are_one_line_exit_2_without_torch(args):
    probe, lines, stdout = _probe(args)
    assert probe == {"code": 2, "torch": False}, (probe, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in stdout and "╭" not in lines[0]


def test_a_click_usage_error_names_the_command_and_its_help():
    result = runner.invoke(app, ["attack", "x.safetensors", "--bogus"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ncen attack: no such option: --bogus")
    assert result.stderr.rstrip().endswith("(see ncen attack --help)")
    result = runner.invoke(app, ["trian"])
    assert result.exit_code == 2 and result.stderr == (
        "error: ncen: no such command 'trian'; did you mean 'train', 'transfer'? "
        "(see ncen --help)\n"
    )


# --- shell completion ------------------------------------------------------------------------
# Typer detects the user's shell from the process tree (shellingham), so "bash" after the flag is
# not read as its value; a test run whose ancestors include no shell (a detached job, some CI
# runners) would see "Shell  not supported". Typer's own switch makes the shell an explicit value.
EXPLICIT_SHELL = {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}


def test_show_completion_prints_a_script_for_the_shell():
    probe, lines, stdout = _probe(["--show-completion", "bash"], EXPLICIT_SHELL)
    assert probe["code"] in (0, None) and not probe["torch"], (probe, lines, stdout)
    assert "_NCEN_COMPLETE=complete_bash" in stdout and "complete " in stdout


def test_install_completion_writes_the_script_under_home(tmp_path):
    probe, lines, stdout = _probe(
        ["--install-completion", "bash"], {"HOME": str(tmp_path), **EXPLICIT_SHELL}
    )
    assert probe["code"] in (0, None), (probe, lines, stdout)
    script = tmp_path / ".bash_completions" / "ncen.sh"
    assert "_NCEN_COMPLETE" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


@pytest.mark.parametrize(
    "words,cword,expected",
    [
        ("ncen tr", 1, {"train", "transfer"}),
        ("ncen attack x --test", 3, {"--test-limit"}),
        ("ncen sweep --fig", 2, {"--figure"}),
        ("ncen inspect x --thr", 3, {"--threads"}),
    ],
)
def test_completion_through_the_lazy_command_group(words, cword, expected):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "[]"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
            "_NCEN_COMPLETE": "complete_bash",
        },
    )
    assert set(done.stdout.split()) == expected, done.stderr
    assert json.loads(done.stderr.splitlines()[-1].removeprefix("PROBE "))["torch"] is False
