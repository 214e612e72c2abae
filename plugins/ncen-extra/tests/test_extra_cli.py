"""ncen-extra through ncen's entry points: listed by `ncen plugins`, trained by `ncen train`.

These tests need the distribution installed (``pip install -e plugins/ncen-extra``) so that its
entry points exist; they are skipped, with that hint, when it is not.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from ncen_cli.checkpoint import read_metadata
from ncen_cli.cli import app
from typer.testing import CliRunner


def _installed() -> bool:
    try:
        distribution("ncen-extra")
    except PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _installed(), reason="ncen-extra not installed: pip install -e plugins/ncen-extra"
)
TINY = [
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


@pytest.fixture(autouse=True)
def _all_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NCEN_PLUGINS", raising=False)


def test_plugins_lists_the_defenses_and_the_attack() -> None:
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["group"], r["name"]): r for r in json.loads(result.stdout)["plugins"]}
    for key in (("ncen.defenses", "trs"), ("ncen.defenses", "adp"), ("ncen.attacks", "mc-pgd")):
        row = rows[key]
        assert row["distribution"] == "ncen-extra"
        assert row["loaded"] and row["error"] is None and not row["builtin"]
        assert row["summary"]


def test_plugins_can_be_switched_off_with_ncen_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCEN_PLUGINS", "")
    rows = json.loads(CliRunner().invoke(app, ["plugins", "--json"]).stdout)["plugins"]
    assert not any(r["distribution"] == "ncen-extra" for r in rows)
    assert any(r["name"] == "ncen" for r in rows)  # built-ins always load


@pytest.mark.parametrize(
    ("defense", "params", "terms"),
    [
        ("trs", ["-p", "lambda_sim=0.7"], {"lambda_sim": 0.7, "lambda_smooth": 0.1}),
        ("adp", ["--param", "beta=0.25"], {"alpha": 2.0, "beta": 0.25, "log_det_eps": 1e-6}),
    ],
)
def test_train_end_to_end(tmp_path: Path, defense: str, params: list[str], terms: dict) -> None:
    out = tmp_path / f"{defense}.safetensors"
    result = CliRunner().invoke(
        app, ["train", "--defense", defense, *params, *TINY, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["defense"] == defense and summary["epochs"] == 1
    assert summary["hyperparameters"] == pytest.approx(terms)
    meta = read_metadata(out)
    assert meta["defense"] == defense


def test_unknown_hyperparameter_is_one_clean_line(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(
        app, ["train", "--defense", "adp", "-p", "gamma=1", *TINY, "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "no hyperparameter 'gamma'" in result.output
    assert "Traceback" not in result.output
