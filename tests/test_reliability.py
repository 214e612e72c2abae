"""Reliability: kill-and-resume equivalence, Ctrl-C, safe checkpoint loading, non-finite losses."""

from __future__ import annotations

import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import member_weights, start_ncen, tiny_config, train_flags, wait_for_epoch
from ncen_cli.checkpoint import load_ensemble, save_ensemble
from ncen_cli.cli import app
from ncen_cli.defenses.base import Defense
from ncen_cli.ensemble import build_ensemble
from ncen_cli.errors import CheckpointError, InterruptedRun, NonFiniteLossError, UsageError
from ncen_cli.registry import registered
from ncen_cli.training import resume_path, train

runner = CliRunner()
TRAIN_ARGS = [
    "train",
    *train_flags(epochs=3, batch_size=32, train_limit=96, test_limit=32, threads=True),
    "--seed",
    "5",
]


def _epochs_in_state(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["epochs_done"])
    except Exception:
        return 0


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight.safetensors"
    proc = start_ncen([*TRAIN_ARGS, "--out", str(straight)])
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr

    killed = tmp_path / "killed.safetensors"
    proc = start_ncen([*TRAIN_ARGS, "--out", str(killed)])
    wait_for_epoch(proc, killed, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _epochs_in_state(resume_path(killed)) in (1, 2)
    load_ensemble(killed)  # whatever moment the kill hit, the checkpoint is complete

    resumed = start_ncen([*TRAIN_ARGS, "--out", str(killed), "--resume", "--json"])
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["resumed_from_epoch"] >= 1
    a, b = member_weights(straight), member_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    out = tmp_path / "int.safetensors"
    long_run = [*TRAIN_ARGS, "--epochs", "40"]  # the last --epochs wins: far from done at epoch 1
    proc = start_ncen([*long_run, "--out", str(out)])
    wait_for_epoch(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert load_ensemble(out).metadata["epochs_done"] >= 1


def test_resume_refuses_other_settings(tmp_path):
    config = tiny_config(epochs=1, batch_size=32, train_limit=64, test_limit=32)
    config.epochs = 2
    out = tmp_path / "r.safetensors"

    def stop(_record) -> None:  # a finished run deletes its resume state: interrupt this one
        raise KeyboardInterrupt

    with pytest.raises(InterruptedRun):
        train(config, out, on_epoch=stop)
    config.lr = 0.5
    with pytest.raises(UsageError, match=r"other settings \(lr: 0.001 -> 0.5;"):
        train(config, out, resume=True)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def saved(tmp_path) -> Path:
    ens = build_ensemble(["resnet20", "resnet20"], (1, 12, 12), 4)
    return save_ensemble(
        ens,
        tmp_path / "ok.safetensors",
        {"dataset": "synthetic", "input_shape": [1, 12, 12], "num_classes": 4},
    )


class _Trap:
    """Unpickling this creates a file: proof that a loader ran code from the checkpoint."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_renamed_to_safetensors_is_rejected_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_ensemble(evil)
    assert not marker.exists()
    result = runner.invoke(app, ["attack", str(evil)])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert not marker.exists()


def test_truncated_checkpoint(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_ensemble(saved)


def test_newer_schema_is_named(saved, tmp_path):
    with safe_open(str(saved), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["ncen"])
    meta["schema_version"] = 99
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={"ncen": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="newer ncen"):
        load_ensemble(newer)


def test_member_mismatch_is_named(saved, tmp_path):
    with safe_open(str(saved), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["ncen"])
    meta["members"] = ["resnet20", "resnet26"]
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong), metadata={"ncen": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="do not match its members"):
        load_ensemble(wrong)


def test_foreign_safetensors_and_missing_file(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not an ncen ensemble"):
        load_ensemble(other)
    with pytest.raises(UsageError, match="does not exist"):
        load_ensemble(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------- numerics


def test_non_finite_loss_stops_with_term_and_epoch_and_keeps_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def exploding(inputs, **_):
        calls["n"] += 1
        value = inputs.input_grads.sum() * 0
        return {"boom": value + (float("nan") if calls["n"] > 1 else 0.0)}  # 1 batch per epoch

    with registered("defenses", Defense("exploding", "test", {}, exploding)):
        config = tiny_config(
            defense="exploding", epochs=3, batch_size=32, train_limit=32, test_limit=16, noise=False
        )
        out = tmp_path / "nan.safetensors"
        with pytest.raises(NonFiniteLossError, match=r"epoch 2 \(term: boom\)"):
            train(config, out)
        assert load_ensemble(out).metadata["epochs_done"] == 1
        assert all(torch.isfinite(t).all() for t in load_ensemble(out).state_dict().values())


def test_unwritable_out_is_a_clean_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions are not enforced
            target = Path("/proc/ncen-cannot-write/x.safetensors")
        else:
            target = locked / "x.safetensors"
        result = runner.invoke(app, TRAIN_ARGS[:-2] + ["--epochs", "1", "--out", str(target)])
        assert result.exit_code == 1, result.output
        assert result.stderr.strip().startswith("error:") and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1
    finally:
        locked.chmod(0o700)
