"""The registry: entry points scanned once per group (dropped on register), names checked against
the objects at load, ``registered()`` for tests, and the plugin API version in one place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ncen_cli.registry as registry_module
from helpers import install_plugins
from ncen_cli.attacks.pgd import PGD
from ncen_cli.cli import app
from ncen_cli.defenses import base as defenses_base
from ncen_cli.errors import UsageError
from ncen_cli.registry import API_VERSION, ATTACKS, Registry, registered

DIST = "ncen-registry-test-plugin"


def test_entry_points_are_scanned_once_per_group_and_again_after_register(monkeypatch):
    calls: list[str] = []
    real = registry_module.entry_points

    def counting(group: str):
        calls.append(group)
        return real(group=group)

    monkeypatch.setattr(registry_module, "entry_points", counting)
    attacks = Registry("attacks")
    first = attacks.get("pgd")
    assert attacks.get("pgd") is first and attacks.names() == attacks.names()
    assert attacks.registrations()["pgd"] is attacks.registrations()["pgd"]  # loads are kept
    assert calls == ["ncen.attacks"]
    with pytest.raises(UsageError, match="named 'pgd' but registered as 'pgd-copy'"):
        attacks.register("pgd-copy", PGD)
    attacks.register(PGD.name, PGD)
    attacks.get("bim")
    assert calls == ["ncen.attacks", "ncen.attacks"]  # register dropped the cache
    monkeypatch.setenv("NCEN_PLUGINS", "")
    attacks.names()
    assert len(calls) == 3  # so did a new NCEN_PLUGINS


def test_registered_restores_what_was_there() -> None:
    custom = PGD.__class__("test-registered", "tests", PGD.run, PGD.defaults)
    with registered("attacks", custom) as obj:
        assert obj is custom and ATTACKS.get("test-registered") is custom
        other = PGD.__class__("test-registered", "tests 2", PGD.run, PGD.defaults)
        with registered("attacks", other):
            assert ATTACKS.get("test-registered") is other
        assert ATTACKS.get("test-registered") is custom
    assert "test-registered" not in ATTACKS.names()


def test_api_version_lives_in_the_registry_and_stays_importable_where_plugins_read_it():
    assert API_VERSION == 3
    assert defenses_base.API_VERSION is API_VERSION


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake-installed distribution: an attack whose object name differs from its entry-point
    name, and an attack written for plugin API 2."""
    entry_points = (
        "[ncen.attacks]\nalias-attack = ncen_registry_test_mod:MISNAMED\n"
        "old-attack = ncen_registry_test_old:ATTACK\n"
    )
    modules = {
        "ncen_registry_test_mod": "from ncen_cli.attacks.pgd import PGD\n"
        "MISNAMED = PGD.__class__('other-name', 'misnamed', PGD.run, PGD.defaults)\n",
        "ncen_registry_test_old": "from ncen_cli.attacks.base import Attack\n"
        "ATTACK = Attack(name='old-attack', summary='API 2', perturb=lambda *a: a[1],\n"
        "                defaults=lambda eps: {})\n",
    }
    return install_plugins(tmp_path / "site", monkeypatch, {DIST: entry_points}, modules)


def test_name_mismatch_and_old_api_are_load_failures_shown_by_ncen_plugins(plugin_site) -> None:
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["plugins"] if r["distribution"] == DIST}
    assert set(rows) == {"alias-attack", "old-attack"}
    assert all(r["loaded"] is False for r in rows.values())
    assert rows["alias-attack"]["error"] == (
        "ncen_registry_test_mod:MISNAMED is named 'other-name' but registered as 'alias-attack'; "
        "the entry-point name and the object's name must agree"
    )
    assert rows["old-attack"]["error"].startswith(
        "TypeError: attack 'old-attack' is written for ncen plugin API 2 (Attack(perturb=...))"
    )
    with pytest.raises(
        UsageError, match="attack 'alias-attack' from '.*' failed to load: .* is named 'other-name'"
    ):
        ATTACKS.get("alias-attack")
