"""``ncen train``, ``ncen plugins`` and ``ncen env`` through the command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import train_flags
from ncen_cli.checkpoint import load_ensemble
from ncen_cli.cli import app

runner = CliRunner()
TINY = train_flags(epochs=1, batch_size=32, train_limit=64, test_limit=32)


def test_train_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run.safetensors"
    result = runner.invoke(app, ["train", *TINY, "--defense", "gal", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["checkpoint"] == str(out) and summary["defense"] == "gal"
    assert load_ensemble(out).metadata["defense"] == "gal"


def test_train_default_out_goes_to_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("NCEN_RUNS_DIR", str(tmp_path / "runs"))
    result = runner.invoke(app, ["train", *TINY, "--json"])
    assert result.exit_code == 0, result.output
    path = json.loads(result.stdout)["checkpoint"]
    assert path.startswith(str(tmp_path / "runs")) and path.endswith(".safetensors")


def test_ncen_form_official_and_lambda_flags(tmp_path):
    out = tmp_path / "o.safetensors"
    result = runner.invoke(
        app,
        [
            "train",
            *TINY,
            "--ncen-form",
            "official",
            "--lambda-cos",
            "0.1",
            "--lambda-norm",
            "0",
            "--out",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = load_ensemble(out).metadata
    assert meta["defense"] == "ncen-official"
    assert meta["hyperparameters"] == {"lambda_cos": 0.1, "lambda_norm": 0.0}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--members", "resnet20,resnet99"], "unknown arch 'resnet99'"),
        (["--members", "resnet20"], "at least 2 members"),
        (["--defense", "nope"], "unknown defense 'nope'"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--lambda-cos", "-0.1"], "--lambda-cos must be a finite number >= 0"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--param", "lambda_zzz=1"], "no hyperparameter 'lambda_zzz'"),
        (["--double-backprop", "magic"], "--double-backprop"),
        (["--out", "/tmp/x.pt"], "--out must end in .safetensors"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    base = [a for a in TINY]
    result = runner.invoke(app, ["train", *base, *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_bf16_on_a_cpu_without_native_bfloat16_is_one_line(monkeypatch):
    from ncen_cli import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    result = runner.invoke(app, ["train", *TINY, "--precision", "bf16"])
    assert result.exit_code == 2, result.output
    assert "--precision bf16 on the CPU needs native bfloat16" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_offline_data_fails_at_once(tmp_path):
    result = runner.invoke(app, ["train", "--dataset", "fashionmnist", "--epochs", "1"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("error: fashionmnist is not in") and "--data-dir" in line
    assert len(line.splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["train", "--dataset", "cifar10", "--data-dir", str(empty)])
    assert result.exit_code == 1 and "cifar10 is not in" in result.stderr


def test_plugins_lists_builtins_with_their_distribution():
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0
    rows = {(r["group"], r["name"]): r for r in json.loads(result.stdout)["plugins"]}
    for name in ("resnet20", "resnet26", "resnet32"):
        assert rows[("ncen.archs", name)]["distribution"] == "ncen"
        assert rows[("ncen.archs", name)]["loaded"]
    for name in ("ncen", "gal", "gpmr", "baseline"):
        assert rows[("ncen.defenses", name)]["loaded"]
    assert ("ncen.datasets", "digits") in rows


def test_env_json():
    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["devices"][0]["device"] == "cpu"
    assert isinstance(info["devices"][0]["native_bf16"], bool)  # is --precision bf16 worth it
    assert info["runs_dir"] and info["cache_dir"] and info["torch"]
