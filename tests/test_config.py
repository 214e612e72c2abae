"""Settings files (issue 17): `--config FILE.toml` and `--print-config` for train and sweep, and
`ncen config CKPT` (the settings recorded in a checkpoint, as such a file)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import one_error_line, train_flags
from ncen_cli.cli import app

runner = CliRunner()
FLAGS = [
    *train_flags(epochs=1, batch_size=16, train_limit=16, test_limit=16, threads=True),
    "--no-noise",
    *["--seed", "5", "--lambda-cos", "0.03", "-p", "lambda_norm=0.01"],
]
# the same settings as a file: keys with '-' or '_', a boolean, a list for the repeatable --param
FILE = """members = "2xresnet20"
dataset = "synthetic"
epochs = 1
batch_size = 16
train-limit = 16
test_limit = 16
noise = false
seed = 5
lambda-cos = 0.03
param = ["lambda_norm=0.01"]
device = "cpu"
threads = 1
"""


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def _error(args: list[str]) -> str:
    return one_error_line(runner.invoke(app, args), 2)


@pytest.fixture(scope="module")
def flags_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flags") / "run.safetensors"
    _ok(["train", *FLAGS, "--out", str(out)])
    return out


def test_config_file_gives_the_same_checkpoint_bytes_as_the_flags(flags_run, tmp_path):
    settings = tmp_path / "run.toml"
    settings.write_text(FILE)
    out = tmp_path / "run.safetensors"
    _ok(["train", "--config", str(settings), "--out", str(out)])
    assert out.read_bytes() == flags_run.read_bytes()


def test_checkpoint_config_reruns_to_the_same_bytes(flags_run, tmp_path):
    text = _ok(["config", str(flags_run)])
    settings = tmp_path / "recorded.toml"
    settings.write_text(text)
    table = tomllib.loads(text)
    assert table["seed"] == 5 and table["members"] == "resnet20,resnet20"
    assert "device" not in table  # runtime options are not recorded
    out = tmp_path / "again.safetensors"
    _ok(
        ["train", "--config", str(settings), "--device", "cpu", "--threads", "1", "--out", str(out)]
    )
    assert out.read_bytes() == flags_run.read_bytes()


def test_flags_override_the_file_and_print_config_round_trips(tmp_path):
    settings = tmp_path / "run.toml"
    long_dir = str(tmp_path / ("a-folder-name-longer-than-any-terminal-line-" * 3))
    settings.write_text(FILE + f'data-dir = "{long_dir}"\n')
    printed = _ok(["train", "--config", str(settings), "--seed", "9", "--print-config"])
    table = tomllib.loads(printed)  # long values are not wrapped
    assert table["seed"] == 9 and table["lambda-cos"] == 0.03 and table["noise"] is False
    assert table["data-dir"] == long_dir and "config" not in printed.replace("--config", "")
    assert table["param"] == ["lambda_norm=0.01"] and "epochs" in table
    again = tmp_path / "printed.toml"
    again.write_text(printed)
    assert _ok(["train", "--config", str(again), "--print-config"]) == printed


def test_sweep_reads_and_prints_config_files(tmp_path):
    settings = tmp_path / "sweep.toml"
    settings.write_text(
        'lambda-cos = [0, 0.02]\nlambda_norm = "0.04"\ndataset = "synthetic"\neval-limit = 8\n'
    )
    printed = tomllib.loads(_ok(["sweep", "--config", str(settings), "--print-config"]))
    assert printed["lambda-cos"] == "0,0.02" and printed["lambda-norm"] == "0.04"
    assert (
        printed["attack-limit"] == 8 and printed["dataset"] == "synthetic"
    )  # eval-limit: old name


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_unknown_keys_and_bad_files_are_one_line_errors(command, tmp_path):
    settings = tmp_path / "bad.toml"
    settings.write_text("seed = 1\nlearning_rate = 0.1\n")
    assert "unknown key 'learning_rate'" in _error([command, "--config", str(settings)])
    settings.write_text("seed = \n")
    assert "not valid TOML" in _error([command, "--config", str(settings)])
    settings.write_text('out = "x.safetensors"\n')  # where results go is not a setting
    assert "unknown key 'out'" in _error([command, "--config", str(settings)])


def test_a_missing_config_file_is_named(tmp_path):
    line = _error(["train", "--config", str(tmp_path / "missing.toml")])
    assert "missing.toml" in line


def test_config_of_a_file_that_is_not_a_checkpoint_is_an_error(tmp_path):
    line = _error(["config", str(tmp_path / "none.safetensors")])
    assert "does not exist" in line
