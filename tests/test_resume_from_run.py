"""`ncen train --resume RUN` continues a run from its path alone (issue 17).

The settings come from the run's resume state; only runtime options may be added; a conflicting
option is refused naming each field; the hint printed after Ctrl-C works verbatim; a finished run
deletes its resume state.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import member_weights, one_error_line, start_ncen, wait_for_epoch
from ncen_cli.checkpoint import load_ensemble
from ncen_cli.cli import app
from ncen_cli.training import resume_path

runner = CliRunner()
# every recorded setting differs from the command's default, so a resume that ignored the
# record would train something else (and fail the bit-identity check)
RUN_ARGS = [
    "train",
    "--dataset",
    "synthetic",
    "--members",
    "2xresnet20",
    "--epochs",
    "3",
    "--batch-size",
    "16",
    "--train-limit",
    "48",
    "--test-limit",
    "16",
    "--seed",
    "7",
    "--lr",
    "0.002",
    "--lambda-cos",
    "0.05",
    "--no-augment",
    "--noise-eps",
    "0.2",
]
RUNTIME = ["--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("straight") / "straight.safetensors"
    proc = start_ncen([*RUN_ARGS, *RUNTIME, "--out", str(out)])
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert not resume_path(out).exists()  # a finished run deletes its resume state
    return out


def test_sigkill_then_resume_from_the_path_alone_is_bit_identical(straight, tmp_path):
    killed = tmp_path / "killed.safetensors"
    proc = start_ncen([*RUN_ARGS, *RUNTIME, "--out", str(killed)])
    wait_for_epoch(proc, killed, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert resume_path(killed).exists()

    resumed = start_ncen(["train", "--resume", str(killed), *RUNTIME, "--json"])
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["resumed_from_epoch"] in (1, 2)
    a, b = member_weights(straight), member_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not resume_path(killed).exists()


def test_the_ctrl_c_hint_works_verbatim(straight, tmp_path):
    out = tmp_path / "a run with spaces.safetensors"  # the hint must quote the path
    proc = start_ncen([*RUN_ARGS, *RUNTIME, "--out", str(out)])
    wait_for_epoch(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    hint = re.search(r"`(ncen [^`]+)`", stderr)
    assert hint, stderr
    words = shlex.split(hint.group(1))
    assert words[:3] == ["ncen", "train", "--resume"] and Path(words[3]) == out

    ncen = shutil.which("ncen", path=str(Path(sys.executable).parent)) or shutil.which("ncen")
    assert ncen, "the ncen console script is not installed"
    env = {**os.environ, "NCEN_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the hint as a user pastes it (split as a shell would), nothing added: the run completes
    # with the recorded settings (weights are compared in the SIGKILL test, whose resume names
    # the same runtime options as the uninterrupted run)
    done = subprocess.run([ncen, *words[1:]], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote ")
    assert load_ensemble(out).metadata["epochs_done"] == 3
    assert load_ensemble(out).metadata["config"] == load_ensemble(straight).metadata["config"]
    assert not resume_path(out).exists()


@pytest.fixture
def interrupted(tmp_path) -> Path:
    """A copy-able interrupted run: 2 epochs asked, stopped after epoch 1 (in-process)."""
    from ncen_cli.cli.train import build_config
    from ncen_cli.errors import InterruptedRun
    from ncen_cli.training import train

    out = tmp_path / "int.safetensors"
    config = build_config(
        members="2xresnet20",
        dataset="synthetic",
        data_dir=None,
        lambda_cos=0.05,
        activation="relu",
        combine="mean-prob",
        epochs=2,
        batch_size=16,
        lr=0.002,
        augment=False,
        noise=False,
        noise_eps=None,
        train_limit=16,
        test_limit=16,
        seed=3,
        device="cpu",
        precision="fp32",
        threads=1,
        member_threads=None,
        deterministic=False,
        double_backprop="exact",
        fd_scale=0.03,
        download=False,
    )

    def stop(_record) -> None:
        raise KeyboardInterrupt

    with pytest.raises(InterruptedRun):
        train(config, out, on_epoch=stop)
    return out


def _error(args: list[str]) -> str:
    return one_error_line(runner.invoke(app, args), 2)


def test_a_conflicting_option_is_refused_naming_each_field(interrupted):
    before = resume_path(interrupted).read_bytes()
    line = _error(
        [
            "train",
            "--resume",
            str(interrupted),
            "--lr",
            "0.5",
            "--epochs",
            "9",
            "--lambda-cos",
            "0.1",
            "--no-noise",
        ]
    )  # --no-noise: the recorded value
    assert "lr: 0.002 -> 0.5" in line and "epochs: 2 -> 9" in line
    assert "hyperparameters.lambda_cos: 0.05 -> 0.1" in line and "noise:" not in line
    assert resume_path(interrupted).read_bytes() == before


def test_the_older_spelling_and_runtime_options_are_accepted(interrupted):
    result = runner.invoke(
        app,
        [
            "train",
            "--out",
            str(interrupted),
            "--resume",
            "--epochs",
            "2",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--download",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from_epoch"] == 1
    assert not resume_path(interrupted).exists()


def test_resume_print_config_shows_the_recorded_settings(interrupted):
    result = runner.invoke(app, ["train", "--resume", str(interrupted), "--print-config"])
    assert result.exit_code == 0, result.output
    assert 'members = "resnet20,resnet20"' in result.stdout and "lr = 0.002" in result.stdout
    assert "epochs = 2" in result.stdout and "lambda_cos=0.05" in result.stdout


def test_resume_of_no_run_and_of_two_runs_is_an_error(interrupted, tmp_path):
    assert "no run" in _error(["train", "--resume", str(tmp_path / "typo.safetensors")])
    assert "two runs" in _error(
        ["train", "--resume", str(interrupted), "--out", str(tmp_path / "other.safetensors")]
    )
    assert "only taken with --resume" in _error(["train", str(interrupted)])


def test_epoch_lines_show_m_of_n_and_quiet_drops_them(interrupted, tmp_path):
    copy = tmp_path / "copy" / interrupted.name
    shutil.copytree(interrupted.parent, copy.parent)
    loud = runner.invoke(app, ["train", "--resume", str(interrupted), "--no-progress"])
    assert loud.exit_code == 0, loud.output
    assert "epoch 2/2:" in loud.stderr and "epoch 1/" not in loud.stderr  # resumed at epoch 2
    quiet = runner.invoke(app, ["train", "--resume", str(copy), "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert "epoch" not in quiet.stderr and quiet.stdout.startswith("wrote ")
