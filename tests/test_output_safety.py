"""Never lose a result: --out refused unless --resume/--overwrite, one writer per output (lock),
stale locks and temp files of dead writers, umask-respecting files, writability checked before
any data is loaded, non-finite models never saved, a full disk and Ctrl-C at start-up as one line.

Subprocess tests run ``python -m ncen_cli`` exactly as a user's shell would.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import (
    default_sigint,
    fgsm_attack_args,
    ncen_env,
    one_error_line,
    start_ncen,
    tiny_config,
    train_flags,
)
from ncen_cli.atomic import atomic_write_json
from ncen_cli.checkpoint import load_ensemble, save_ensemble
from ncen_cli.cli import app
from ncen_cli.ensemble import build_ensemble
from ncen_cli.errors import CheckpointError, InterruptedRun, NcenError, NonFiniteModelError
from ncen_cli.output_safety import lock_path, output_lock
from ncen_cli.training import resume_path, train

runner = CliRunner()
TINY = [
    "train",
    *train_flags(epochs=1, batch_size=16, train_limit=16, test_limit=16, threads=True),
    "--no-noise",
]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _model(path: Path) -> Path:
    """An untrained 2 x resnet20 checkpoint for the synthetic dataset (12x12 grey, 4 classes)."""
    return save_ensemble(
        build_ensemble(["resnet20"] * 2, (1, 12, 12), 4),
        path,
        {
            "dataset": "synthetic",
            "family": "fashionmnist",
            "input_shape": [1, 12, 12],
            "num_classes": 4,
        },
    )


# --- existing --out -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["checkpoint", "text", "folder", "symlink", "fifo"])
def test_existing_out_of_any_kind_is_refused_and_left_alone(tmp_path, kind):
    out = tmp_path / "run.safetensors"
    if kind == "checkpoint":
        save_ensemble(build_ensemble(["resnet20"] * 2, (1, 12, 12), 4), out)
    elif kind == "text":
        out.write_text("my notes")
    elif kind == "folder":
        out.mkdir()
    elif kind == "symlink":
        (tmp_path / "elsewhere.txt").write_text("x")
        out.symlink_to(tmp_path / "elsewhere.txt")
    else:
        os.mkfifo(out)
    before = _digest(tmp_path)
    line = one_error_line(runner.invoke(app, [*TINY, "--out", str(out)]), 2)
    assert str(out) in line and ("--overwrite" in line or "folder" in line)
    assert _digest(tmp_path) == before and not lock_path(out).exists()


def test_overwrite_replaces_and_drops_the_old_resume_state(tmp_path):
    out = tmp_path / "run.safetensors"
    out.write_text("old")
    resume_path(out).write_text("old state")
    result = runner.invoke(app, [*TINY, "--out", str(out), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert load_ensemble(out).metadata["epochs_done"] == 1
    assert not lock_path(out).exists()


def test_resume_and_overwrite_together_is_refused(tmp_path):
    out = tmp_path / "run.safetensors"
    one_error_line(runner.invoke(app, [*TINY, "--out", str(out), "--resume", "--overwrite"]), 2)


def test_resume_of_a_finished_run_without_resume_state_says_so(tmp_path):
    out = tmp_path / "run.safetensors"
    assert runner.invoke(app, [*TINY, "--out", str(out)]).exit_code == 0
    assert not resume_path(out).exists()  # a finished run deletes its resume state
    before = _digest(tmp_path)
    line = one_error_line(runner.invoke(app, [*TINY, "--out", str(out), "--resume"]), 2)
    assert "no resume state" in line and "--overwrite" in line
    assert _digest(tmp_path) == before


def test_resume_of_a_path_that_holds_no_run_is_an_error(tmp_path):
    line = one_error_line(
        runner.invoke(app, [*TINY, "--out", str(tmp_path / "typo.safetensors"), "--resume"]), 2
    )
    assert "no run" in line


def test_an_unfinished_run_is_not_restarted_without_resume(tmp_path):
    out = tmp_path / "run.safetensors"
    resume_path(out).write_text("state of an interrupted run")
    line = one_error_line(runner.invoke(app, [*TINY, "--out", str(out)]), 2)
    assert "--resume" in line and resume_path(out).read_text() == "state of an interrupted run"


def test_unwritable_out_folder_is_reported_before_any_data_is_loaded(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # fashionmnist is not there (offline): had data been loaded first, that would be the error
    result = runner.invoke(
        app,
        [*TINY[:2], "fashionmnist", *TINY[3:], "--out", str(blocker / "sub" / "run.safetensors")],
    )
    line = one_error_line(result, (1, 2))
    assert "is not a folder" in line and "fashionmnist" not in line


def test_attack_out_and_transfer_png_follow_the_same_rules(tmp_path):
    ckpt = _model(tmp_path / "m.safetensors")
    results = tmp_path / "results.json"
    results.write_text("{}")
    line = one_error_line(
        runner.invoke(
            app,
            fgsm_attack_args(ckpt, "--out", str(results)),
        ),
        2,
    )
    assert "--overwrite" in line and results.read_text() == "{}"
    ok = runner.invoke(
        app,
        fgsm_attack_args(ckpt, "--out", str(results), "--overwrite"),
    )
    assert ok.exit_code == 0, ok.output
    assert "results" in json.loads(results.read_text()) and not lock_path(results).exists()
    png = tmp_path / "t.png"
    png.write_bytes(b"mine")
    line = one_error_line(
        runner.invoke(
            app,
            ["transfer", str(ckpt), "--test-limit", "4", "--device", "cpu", "--figure", str(png)],
        ),
        2,
    )
    assert "--figure" in line and png.read_bytes() == b"mine"


# --- locks and stale files ------------------------------------------------------------------

HOLDER = """
import sys, time
from ncen_cli.output_safety import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run.safetensors"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=ncen_env()
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.perf_counter()
        result = runner.invoke(app, [*TINY, "--out", str(out)])
        line = one_error_line(result, 1)
        assert f"pid {holder.pid}" in line and "being written" in line
        assert time.perf_counter() - started < 30  # at once: no training happened
        assert not out.exists()
        sweep = runner.invoke(
            app, ["sweep", *TINY[1:], "--lambda-cos", "0", "--lambda-norm", "0", "--out", str(out)]
        )
        assert f"pid {holder.pid}" in one_error_line(sweep, 1)
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_and_temp_files_of_a_killed_writer_are_cleaned(tmp_path):
    out = tmp_path / "run.safetensors"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=ncen_env()
    )
    assert holder.stdout.readline().strip() == "locked"
    temp = tmp_path / ".run.safetensors.k3j2l1.tmp"  # what atomic_write leaves on SIGKILL
    temp.write_bytes(b"half a checkpoint")
    state_temp = tmp_path / ".run.safetensors.resume.safetensors.a8b7.tmp"
    state_temp.write_bytes(b"half a state")
    other = tmp_path / ".other.safetensors.zz.tmp"  # another output's: not ours to remove
    other.write_bytes(b"x")
    holder.kill()
    holder.wait()
    assert lock_path(out).exists()  # the dead writer's lock file is left behind
    result = runner.invoke(app, [*TINY, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert not temp.exists() and not state_temp.exists() and other.exists()
    assert not lock_path(out).exists()


def test_lock_is_reentrant_across_sequential_runs_and_names_a_live_holder(tmp_path):
    out = tmp_path / "x.json"
    with output_lock(out):
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == os.getpid()
    with output_lock(out):
        pass
    assert not lock_path(out).exists()


def test_concurrent_train_on_one_out_one_wins_the_other_fails(tmp_path):
    out = tmp_path / "run.safetensors"
    args = [*TINY, "--out", str(out)]
    procs = [start_ncen(args) for _ in range(2)]
    outcomes = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    codes = [c for c, _ in outcomes]
    # never two "wrote": the loser either finds the lock or, if the winner already finished,
    # an existing --out
    assert codes in ([0, 1], [0, 2]), outcomes
    loser = outcomes[1][1].strip().splitlines()
    assert len(loser) == 1 and ("being written" in loser[0] or "exists" in loser[0]), loser
    assert load_ensemble(out).metadata["epochs_done"] == 1


# --- file modes -----------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_every_written_file_honours_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "run.safetensors"
        assert runner.invoke(app, [*TINY, "--out", str(out)]).exit_code == 0
        atomic_write_json(tmp_path / "r.json", {"a": 1})
        # a finished run deletes its resume state: an interrupted one keeps it
        stopped = tmp_path / "stopped.safetensors"
        config = tiny_config(
            epochs=2, batch_size=16, train_limit=16, test_limit=16, noise=False, threads=1
        )
        with pytest.raises(InterruptedRun):
            train(config, stopped, on_epoch=_stop)
    finally:
        os.umask(old)
    for path in (out, resume_path(stopped), tmp_path / "r.json"):
        assert path.stat().st_mode & 0o777 == mode, (path, oct(path.stat().st_mode))


def _stop(_record) -> None:
    raise KeyboardInterrupt


# --- broken models --------------------------------------------------------------------------


def test_a_step_that_breaks_the_weights_stops_and_keeps_the_last_finite_epoch(tmp_path):
    from ncen_cli.defenses.base import Defense
    from ncen_cli.registry import registered

    calls = {"n": 0}

    def poisoned(inputs, **_):
        calls["n"] += 1  # one batch per epoch; epoch 2's term is 0 with a NaN gradient
        zero = inputs.logits.sum() * 0
        return {"poison": torch.sqrt(zero) if calls["n"] > 1 else zero}

    out = tmp_path / "run.safetensors"
    config = tiny_config(
        defense="poisoned",
        epochs=3,
        batch_size=16,
        train_limit=16,
        test_limit=16,
        noise=False,
        threads=1,
    )
    with (
        registered(
            "defenses",
            Defense(
                "poisoned", "test", {}, poisoned, needs_input_gradients=False, needs_logits=True
            ),
        ),
        pytest.raises(NonFiniteModelError, match=r"non-finite weights after step 1 of epoch 2"),
    ):
        train(config, out)
    kept = load_ensemble(out)
    assert kept.metadata["epochs_done"] == 1
    assert all(torch.isfinite(t).all() for t in kept.state_dict().values())


@pytest.mark.parametrize("where", ["weight", "bn_buffer"])
def test_non_finite_checkpoint_is_refused_at_load(tmp_path, where):
    ens = build_ensemble(["resnet20"] * 2, (1, 12, 12), 4)
    state = ens.members.state_dict()
    name = next(n for n in state if n.endswith("running_var" if where == "bn_buffer" else "weight"))
    state[name].view(-1)[0] = float("nan")
    path = save_ensemble(
        ens,
        tmp_path / "nan.safetensors",
        {"dataset": "synthetic", "input_shape": [1, 12, 12], "num_classes": 4},
    )
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_ensemble(path)
    result = runner.invoke(
        app,
        fgsm_attack_args(path, "--strict"),
    )
    assert "NaN or infinite" in one_error_line(result, 1)


# --- disk full, overflowing options, environment, Ctrl-C ------------------------------------


def _small_file_limit() -> None:
    default_sigint()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_full_disk_while_saving_is_one_line_and_leaves_no_temp_file(tmp_path):
    out = tmp_path / "run.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "ncen_cli", *TINY, "--out", str(out)],
        env=ncen_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_small_file_limit,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == []


def test_atomic_write_turns_a_safetensors_write_failure_into_one_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from ncen_cli import checkpoint

    def full_disk(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(NcenError, match="cannot write .*No space left"):
        save_ensemble(build_ensemble(["resnet20"] * 2, (1, 12, 12), 4), tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--lr", "3.4e37"], "--lr"),
        (["--lr", "1e39"], "--lr"),
        (["--seed", str(2**63)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--members", "99999999999xresnet20"], "at most"),
        (["--members", "ensemble1-k99999999999"], "at most"),
        (["--batch-size", str(2**70)], "--batch-size"),
        (["--lambda-cos", "inf"], "--lambda-cos"),
        (["--param", "lambda_norm=nan"], "--param"),
        (["--fd-scale", "inf"], "--fd-scale"),
    ],
)
def test_numeric_extremes_in_train_options_are_one_line(tmp_path, args, needle):
    result = runner.invoke(app, [*TINY, "--out", str(tmp_path / "r.safetensors"), *args])
    line = one_error_line(result, (1, 2))
    assert needle is None or needle in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--seed", str(2**63)], "--seed"),
        (["--step-size", "inf"], "--step-size"),
        (["--steps", str(2**70)], "--steps"),
        (["--restarts", str(2**40)], "--restarts"),
    ],
)
def test_numeric_extremes_in_attack_options_are_one_line(tmp_path, args, needle):
    ckpt = _model(tmp_path / "m.safetensors")
    result = runner.invoke(
        app, ["attack", str(ckpt), "--attacks", "pgd", "--eps", "0.1", "--device", "cpu", *args]
    )
    line = one_error_line(result, (1, 2))
    assert needle is None or needle in line


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "-3"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "9"}, "LOCAL_RANK"),
    ],
)
def test_bad_torchrun_environment_is_one_line(tmp_path, monkeypatch, env, needle):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = runner.invoke(app, [*TINY, "--out", str(tmp_path / "r.safetensors")])
    assert needle in one_error_line(result, 2)


# From the first instant through torch's import, plugin loading, torch's lazy imports at the first
# optimizer step and into training: each moment has its own way to go wrong (a traceback, a signal
# swallowed by an import, exit status -2). The run is long enough to still be training at 4 s.
# The delays count from the moment ncen's first code (its launcher) can run: a SIGINT earlier, in
# CPython's own start-up or runpy's search for the package, ends the interpreter before any ncen
# code exists, and on a loaded machine a fixed 0.15 s can land there. That moment is measured
# under the same load as the time a fresh interpreter takes to import the launcher.
@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8, 1.5, 2.5, 4.0])
def test_ctrl_c_at_any_moment_of_start_up_exits_130_with_one_line(tmp_path, delay):
    long_run = [*TINY, "--epochs", "400", "--train-limit", "64", "--quiet"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import ncen_cli.launcher"], check=True, env=ncen_env())
    launcher_ready = time.perf_counter() - started
    proc = start_ncen([*long_run, "--out", str(tmp_path / "r.safetensors")])
    time.sleep(launcher_ready + delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    assert "Traceback" not in err and "terminate called" not in err
    assert not lock_path(tmp_path / "r.safetensors").exists()  # released, even mid-import
