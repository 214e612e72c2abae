"""Helpers shared by several test modules: tiny checkpoints, `ncen train` flags, the environment
and start of an `ncen` subprocess, and the "one error line" check of a refused command.

Imported as ``from helpers import ...`` (pytest puts this folder on ``sys.path``: the tests are
not a package); the plugin's tests put this folder on ``sys.path`` themselves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from ncen_cli.checkpoint import load_ensemble, save_ensemble
from ncen_cli.ensemble import build_ensemble
from ncen_cli.training import TrainConfig, resume_path


def train_flags(
    *,
    epochs: int,
    batch_size: int,
    train_limit: int,
    test_limit: int,
    threads: bool = False,
    dataset: str | None = "synthetic",
) -> list[str]:
    """The flags of a tiny ``ncen train`` run: two resnet20 members on ``dataset`` (no
    ``--dataset`` flag when None), on the CPU (``--threads 1`` too when ``threads``)."""
    flags = ["--dataset", dataset] if dataset is not None else []
    flags += ["--members", "2xresnet20", "--epochs", str(epochs)]
    flags += ["--batch-size", str(batch_size), "--train-limit", str(train_limit)]
    flags += ["--test-limit", str(test_limit), "--device", "cpu"]
    return [*flags, "--threads", "1"] if threads else flags


def fgsm_attack_args(checkpoint: Path, *extra: str, test_limit: int = 4) -> list[str]:
    """``ncen attack CHECKPOINT`` with FGSM at eps 0.1 on ``test_limit`` test images, on the CPU,
    then ``extra``."""
    attack = ["--attacks", "fgsm", "--eps", "0.1", "--test-limit", str(test_limit)]
    return ["attack", str(checkpoint), *attack, "--device", "cpu", *extra]


def tiny_config(**settings: Any) -> TrainConfig:
    """A :class:`TrainConfig` of two resnet20 members on the synthetic dataset, on the CPU, with
    ``settings`` (epochs, batch size, limits, ...)."""
    return TrainConfig(
        members=["resnet20", "resnet20"], dataset="synthetic", device="cpu", **settings
    )


def tiny_ensemble(k: int = 2, shape: tuple[int, int, int] = (1, 12, 12), classes: int = 4):
    """``k`` resnet20 members for ``shape`` images and ``classes`` classes, seeded (seed 0)."""
    torch.manual_seed(0)
    return build_ensemble(["resnet20"] * k, shape, classes)


def save_tiny_checkpoint(
    path: Path,
    ensemble: nn.Module | None = None,
    *,
    members: int = 2,
    shape: tuple[int, int, int] = (1, 12, 12),
    classes: int = 4,
) -> Path:
    """Save ``ensemble`` (default: a new :func:`tiny_ensemble` of ``members`` members) at ``path``
    as an untrained baseline on the synthetic dataset, for ``shape`` images and ``classes``
    classes; returns the path."""
    meta = {
        "dataset": "synthetic",
        "family": "fashionmnist",
        "input_shape": list(shape),
        "num_classes": classes,
        "defense": "baseline",
    }
    if ensemble is None:
        ensemble = tiny_ensemble(members, shape, classes)
    return save_ensemble(ensemble, path, meta)


def scored_cells(folder: Path, lambda_cos: list[float], lambda_norm: list[float]) -> list:
    """A finished sweep's cells over the grid ``lambda_cos`` x ``lambda_norm`` without training:
    cell ``i`` (in grid order) scores ``0.1 * (i + 1)``; checkpoints named in ``folder``."""
    from ncen_cli.sweep import CellResult, expand_grid

    return [
        CellResult(
            cell,
            0.9,
            0.1 * (i + 1),
            0.09 * (i + 1),
            {"fgsm@0.1": 0.1 * (i + 1)},
            1.0,
            1.0,
            0.0,
            folder / f"{cell.id}.safetensors",
            1,
        )
        for i, cell in enumerate(expand_grid(lambda_cos, lambda_norm))
    ]


# The start of a ``python -c`` script that runs the console script's code path with the
# arguments in ``sys.argv[1]`` (a JSON list) and leaves its exit status in ``code``; a test
# appends what to report (the imported modules) on stderr.
LAUNCH_PROBE = """
import json, sys
sys.argv = ["ncen", *json.loads(sys.argv[1])]
from ncen_cli.launcher import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
"""


def ncen_env(**extra: str) -> dict[str, str]:
    """The environment of an ``ncen`` subprocess: offline, one OpenMP thread, plus ``extra``."""
    return {**os.environ, "NCEN_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def default_sigint() -> None:
    """Runs in the child before exec: a test runner started in the background (no job control,
    nohup, some CI launchers) passes SIGINT on as *ignored*, and Python then never raises
    KeyboardInterrupt. Ctrl-C in a terminal always delivers it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_ncen(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
    """Start ``python -m ncen_cli ARGS`` with text pipes, SIGINT at its default (see
    :func:`default_sigint`) and ``env`` (default :func:`ncen_env`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "ncen_cli", *args],
        env=ncen_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
        **kw,
    )


def one_error_line(result, code: int | tuple[int, ...]) -> str:
    """Assert that a CliRunner ``result`` exited with ``code`` (or one of them), without a
    traceback, with exactly one ``error: `` line on stderr; returns that line."""
    codes = (code,) if isinstance(code, int) else code
    assert result.exit_code in codes, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def epochs_saved(out: Path) -> int:
    """Finished epochs recorded by both the resume state and the checkpoint ``out`` (0 while
    either is missing or unreadable)."""
    try:
        with safe_open(str(resume_path(out)), framework="pt") as f:
            state = int(f.metadata()["epochs_done"])
        return min(state, int(load_ensemble(out).metadata["epochs_done"]))
    except Exception:
        return 0


def wait_for_epoch(proc: subprocess.Popen, out: Path, epoch: int, timeout: float = 300) -> None:
    """Wait until the training run ``proc`` writing ``out`` has saved ``epoch`` finished epochs
    (:func:`epochs_saved`); fails if it exits or ``timeout`` seconds pass first."""
    deadline = time.time() + timeout
    while epochs_saved(out) < epoch:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training did not reach the epoch in time"
        time.sleep(0.05)


def member_weights(path: Path) -> dict[str, torch.Tensor]:
    """The members' state dict of the checkpoint at ``path``."""
    return load_ensemble(path).members.state_dict()


def install_plugins(
    site: Path, monkeypatch: pytest.MonkeyPatch, dists: dict[str, str], modules: dict[str, str]
) -> Path:
    """Fake-install distributions (``dists``: name -> entry_points.txt) and their modules
    (``modules``: name -> source) into ``site``, put it first on ``sys.path`` and clear
    ``NCEN_PLUGINS``; returns ``site``."""
    site.mkdir(exist_ok=True)
    for dist, entry_points in dists.items():
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(entry_points)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("NCEN_PLUGINS", raising=False)
    return site
