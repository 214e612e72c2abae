"""Hostile plugins: whatever a plugin's import raises (SystemExit, KeyboardInterrupt included), an
object of the wrong type, and name clashes are reported by ``ncen plugins`` and never fatal.

Each plugin is a real (fake-installed) distribution: a ``.dist-info`` folder with an
``entry_points.txt`` on ``sys.path``, found by ``importlib.metadata`` as a pip-installed one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import install_plugins
from ncen_cli.cli import app
from ncen_cli.registry import DEFENSES

MODULES = {
    "ncen_hostile_exit": "import sys\nsys.exit(3)\n",
    "ncen_hostile_interrupt": "raise KeyboardInterrupt\n",
    "ncen_hostile_wrongtype": "DEFENSE = 'not a Defense'\nATTACK = 42\n",
    "ncen_hostile_twin_a": "from ncen_cli.defenses.baseline import DEFENSE\n",
    "ncen_hostile_twin_b": "from ncen_cli.defenses.baseline import DEFENSE\n",
}
DISTS = {
    "ncen-hostile-exit": "[ncen.defenses]\nexits = ncen_hostile_exit:DEFENSE\n",
    "ncen-hostile-interrupt": "[ncen.attacks]\ninterrupts = ncen_hostile_interrupt:ATTACK\n",
    "ncen-hostile-wrongtype": "[ncen.defenses]\nwrongtype = ncen_hostile_wrongtype:DEFENSE\n"
    "[ncen.attacks]\nwrongattack = ncen_hostile_wrongtype:ATTACK\n",
    # two plugins claim one new name; one plugin claims a built-in's name
    "ncen-hostile-twin-a": "[ncen.defenses]\ntwin = ncen_hostile_twin_a:DEFENSE\n"
    "gal = ncen_hostile_twin_a:DEFENSE\n",
    "ncen-hostile-twin-b": "[ncen.defenses]\ntwin = ncen_hostile_twin_b:DEFENSE\n",
}
# the user presses Ctrl-C while this (slow) plugin imports: a real SIGINT, not the plugin's raise
SLOW_MODULES = {
    "ncen_slow_import": "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
    "time.sleep(30)\nDEFENSE = None\n"
}
SLOW_DISTS = {"ncen-slow-import": "[ncen.defenses]\nslow = ncen_slow_import:DEFENSE\n"}


def _installed(site: Path, monkeypatch: pytest.MonkeyPatch, dists: dict, modules: dict):
    """:func:`install_plugins`, then forget the imported modules."""
    yield install_plugins(site, monkeypatch, dists, modules)
    for module in modules:
        sys.modules.pop(module, None)


@pytest.fixture
def hostile_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yield from _installed(tmp_path / "site", monkeypatch, DISTS, MODULES)


@pytest.fixture
def slow_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yield from _installed(tmp_path / "site", monkeypatch, SLOW_DISTS, SLOW_MODULES)


def _rows(result) -> dict[tuple[str, str, str], dict]:
    assert result.exit_code == 0, result.output
    return {
        (r["group"], r["name"], r["distribution"]): r for r in json.loads(result.stdout)["plugins"]
    }


def test_plugins_lists_everything_whatever_a_plugin_raises(hostile_plugins):
    rows = _rows(CliRunner().invoke(app, ["plugins", "--json"]))
    exits = rows[("ncen.defenses", "exits", "ncen-hostile-exit")]
    assert not exits["loaded"] and "SystemExit" in exits["error"]
    interrupts = rows[("ncen.attacks", "interrupts", "ncen-hostile-interrupt")]
    assert not interrupts["loaded"] and "KeyboardInterrupt" in interrupts["error"]
    assert rows[("ncen.defenses", "ncen", "ncen")]["loaded"]  # the rest is listed and loads
    assert rows[("ncen.attacks", "pgd", "ncen")]["loaded"]


def test_a_real_ctrl_c_during_a_plugin_import_is_not_taken_for_the_plugin_failing(slow_plugin):
    with pytest.raises(KeyboardInterrupt):  # in-process: the registry lets it through
        DEFENSES.get("slow")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(slow_plugin), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "ncen_cli", "plugins"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "error: interrupted", proc.stderr


def test_objects_are_type_checked_against_the_group_contract(hostile_plugins):
    rows = _rows(CliRunner().invoke(app, ["plugins", "--json"]))
    wrong = rows[("ncen.defenses", "wrongtype", "ncen-hostile-wrongtype")]
    assert not wrong["loaded"] and "not a Defense" in wrong["error"]
    attack = rows[("ncen.attacks", "wrongattack", "ncen-hostile-wrongtype")]
    assert not attack["loaded"] and "not a Attack" in attack["error"]
    with pytest.raises(Exception, match="not a Defense"):
        DEFENSES.get("wrongtype")


def test_name_clashes_are_reported_and_named_when_used(hostile_plugins):
    rows = _rows(CliRunner().invoke(app, ["plugins", "--json"]))
    a = rows[("ncen.defenses", "twin", "ncen-hostile-twin-a")]
    b = rows[("ncen.defenses", "twin", "ncen-hostile-twin-b")]
    assert a["clashes"] and b["clashes"]
    shadowed = rows[("ncen.defenses", "gal", "ncen-hostile-twin-a")]
    assert shadowed["shadowed"] and not shadowed["loaded"]
    assert rows[("ncen.defenses", "gal", "ncen")]["loaded"]  # the built-in wins
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--defense",
            "twin",
            "--dataset",
            "synthetic",
            "--device",
            "cpu",
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "ncen-hostile-twin-a" in line and "ncen-hostile-twin-b" in line
    assert "NCEN_PLUGINS" in line
    text = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "300"})
    assert text.exit_code == 0 and "name clash" in text.stdout and "shadowed" in text.stdout
