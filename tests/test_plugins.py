"""Plugins: a broken third-party plugin is reported, never fatal; NCEN_PLUGINS restricts loading.

The broken plugin is a real (fake-installed) distribution: a ``.dist-info`` folder with an
``entry_points.txt`` in a temporary directory put on ``sys.path``, whose target module raises at
import. ``importlib.metadata`` finds it exactly as it would find a pip-installed package.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import install_plugins
from ncen_cli.cli import app
from ncen_cli.registry import DEFENSES

BROKEN_DIST = "ncen-broken-plugin"
SRC = Path(__file__).resolve().parents[1] / "src"
TINY_TRAIN = [
    "train",
    "--members",
    "2xresnet20",
    "--dataset",
    "synthetic",
    "--epochs",
    "1",
    "--device",
    "cpu",
    "--train-limit",
    "32",
    "--test-limit",
    "16",
    "--batch-size",
    "16",
    "--no-noise",
    "--threads",
    "1",
    "--json",
]


@pytest.fixture
def broken_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install (on sys.path) a distribution whose defense and attack modules raise at import."""
    entry_points = (
        "[ncen.defenses]\nbroken-defense = ncen_broken_plugin_mod:DEFENSE\n\n"
        "[ncen.attacks]\nbroken-attack = ncen_broken_plugin_mod:ATTACK\n"
    )
    module = {"ncen_broken_plugin_mod": 'raise RuntimeError("this plugin is broken on purpose")\n'}
    monkeypatch.delenv("NCEN_DATA_DIR", raising=False)  # synthetic data needs no folder
    return install_plugins(tmp_path / "site", monkeypatch, {BROKEN_DIST: entry_points}, module)


def _plugins(runner: CliRunner) -> list[dict]:
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["plugins"]


def test_broken_plugin_is_listed_as_failed_with_its_error(broken_plugin: Path) -> None:
    rows = [r for r in _plugins(CliRunner()) if r["distribution"] == BROKEN_DIST]
    assert {(r["group"], r["name"]) for r in rows} == {
        ("ncen.defenses", "broken-defense"),
        ("ncen.attacks", "broken-attack"),
    }
    for row in rows:
        assert row["loaded"] is False and row["builtin"] is False
        assert row["error"] == "RuntimeError: this plugin is broken on purpose"


def test_plugins_table_shows_the_failure_too(broken_plugin: Path) -> None:
    result = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "broken-defense" in result.stdout and "failed" in result.stdout
    # built-ins are still listed as loaded next to it
    assert "gal" in result.stdout and "loaded" in result.stdout


def test_train_still_works_with_a_broken_plugin_installed(
    broken_plugin: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ok.safetensors"
    result = CliRunner().invoke(app, [*TINY_TRAIN, "--defense", "gal", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["defense"] == "gal"
    assert out.is_file()


def test_asking_for_the_broken_defense_is_one_clean_error(
    broken_plugin: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bad.safetensors"
    result = CliRunner().invoke(
        app, [*TINY_TRAIN, "--defense", "broken-defense", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "failed to load" in result.output and "broken on purpose" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_ncen_plugins_env_restricts_third_party_loading(
    broken_plugin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    monkeypatch.setenv("NCEN_PLUGINS", "")  # built-ins only
    rows = _plugins(runner)
    assert all(r["builtin"] for r in rows)
    assert {"ncen", "gal", "gpmr", "baseline"} <= {r["name"] for r in rows}
    assert "broken-defense" not in DEFENSES.names()

    monkeypatch.setenv("NCEN_PLUGINS", f"some-other-plugin, {BROKEN_DIST}")
    dists = {r["distribution"] for r in _plugins(runner)}
    assert BROKEN_DIST in dists
    assert dists <= {"ncen", BROKEN_DIST}  # any other installed plugin is filtered out

    monkeypatch.setenv("NCEN_PLUGINS", "some-other-plugin")
    assert BROKEN_DIST not in {r["distribution"] for r in _plugins(runner)}


def test_core_does_not_import_any_plugin_package() -> None:
    """ncen core knows plugins only through entry points: no plugin is named in src/."""
    plugin_packages = {
        p.name
        for p in (SRC.parents[0] / "plugins").glob("*/src/*")
        if p.is_dir() and not p.name.endswith(".egg-info")
    }
    assert "ncen_extra" in plugin_packages or not (SRC.parents[0] / "plugins").is_dir()
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for package in plugin_packages:
            assert not re.search(rf"\b{package}\b", text), f"{path} mentions {package}"
