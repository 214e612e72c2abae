"""The lambda_cos x lambda_norm parameter sweep (paper Fig. 4), resumable cell by cell.

Every grid cell trains one NCEn ensemble with the cell's (lambda_cos, lambda_norm) and otherwise
identical settings (same seed, same data), then scores it with an attack battery:
ACE (clean accuracy), mean AAE (mean adversarial accuracy over the attacks) and the paper's
score ACE x mean AAE.

Output folder layout (``out_dir``)::

    sweep.json                          manifest: the shared settings every cell was run with
    cells/<cell id>/ensemble.safetensors             the cell's checkpoint
    cells/<cell id>/ensemble.safetensors.resume.safetensors   resume state (until finished)
    cells/<cell id>/result.json         the cell's scores (written last, atomically)

A cell is finished when its ``result.json`` exists and records the same settings; running the
sweep again skips finished cells and resumes unfinished ones from their last completed epoch.
Under ``torchrun`` cell ``i`` runs on rank ``i % world_size``, each rank training whole cells on
its own device (no gradient averaging); every rank then waits for all result files and assembles
the same :class:`SweepResult`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ncen_cli.atomic import atomic_write_json
from ncen_cli.checkpoint import parse_json
from ncen_cli.crafting import get_defense
from ncen_cli.data import ImageArrays
from ncen_cli.device import Runtime
from ncen_cli.distributed import SINGLE, DistContext
from ncen_cli.errors import CheckpointError, InterruptedRun, NonFiniteLossError, UsageError
from ncen_cli.evaluation import (
    AttackRun,
    Progress,
    evaluate,
    runs_for,
    validate_runs,
    worst_over_objectives,
)
from ncen_cli.output_safety import check_writable_folder, output_lock
from ncen_cli.training import RUNTIME_ONLY_FIELDS, EpochRecord, TrainConfig, resume_path, train

log = logging.getLogger("ncen.sweep")

MANIFEST = "sweep.json"
FORMAT = "ncen-sweep"
SCHEMA_VERSION = 1
SWEPT = ("lambda_cos", "lambda_norm")

Evaluator = Callable[..., Any]


@dataclass(frozen=True)
class Cell:
    """One grid point; ``index`` is its row-major position (rows lambda_cos, cols lambda_norm)."""

    index: int
    lambda_cos: float
    lambda_norm: float

    @property
    def id(self) -> str:
        """Stable, filesystem-safe name, e.g. ``cos0.06_norm0.04`` (also the cell's folder)."""
        return f"cos{format_value(self.lambda_cos)}_norm{format_value(self.lambda_norm)}"


@dataclass
class CellResult:
    """A finished cell.

    Attributes:
        attacks: ``"<attack>@<eps>"`` -> adversarial accuracy.
        score: clean_accuracy x mean_adversarial_accuracy; None when training failed (``error``).
        seconds: train_seconds + eval_seconds (the cell's cost when it ran).
        skipped: True when this run found the cell already finished.
    """

    cell: Cell
    clean_accuracy: float | None
    mean_adversarial_accuracy: float | None
    score: float | None
    attacks: dict[str, float]
    seconds: float
    train_seconds: float
    eval_seconds: float
    checkpoint: Path
    epochs: int
    skipped: bool = False
    error: str | None = None
    attack_results: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed_checks(self) -> list[str]:
        """Names of the evaluation self-checks that failed (see :mod:`ncen_cli.evaluation`)."""
        return [c["name"] for c in self.checks if c.get("passed") is False]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.cell.id,
            "lambda_cos": self.cell.lambda_cos,
            "lambda_norm": self.cell.lambda_norm,
            "clean_accuracy": self.clean_accuracy,
            "mean_adversarial_accuracy": self.mean_adversarial_accuracy,
            "score": self.score,
            "attacks": self.attacks,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
            "epochs": self.epochs,
            "checkpoint": str(self.checkpoint),
            "skipped": self.skipped,
            "error": self.error,
            "failed_checks": self.failed_checks,
        }


@dataclass
class SweepResult:
    """All cells in grid order, the best one (highest score) and how they were scored."""

    out_dir: Path
    lambda_cos: list[float]
    lambda_norm: list[float]
    cells: list[CellResult]
    attack_settings: list[dict[str, Any]]
    wall_seconds: float = 0.0

    @property
    def best(self) -> CellResult | None:
        scored = [(c, c.score) for c in self.cells if c.score is not None]
        return max(scored, key=lambda pair: pair[1])[0] if scored else None  # first of ties

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "out": str(self.out_dir),
            "lambda_cos": self.lambda_cos,
            "lambda_norm": self.lambda_norm,
            "cells": [c.to_json() for c in self.cells],
            "best": best.to_json() if best else None,
            "attack_settings": self.attack_settings,
            "wall_seconds": self.wall_seconds,
        }


def format_value(value: float) -> str:
    """Shortest exact text for a lambda: 0 -> ``0``, 0.06 -> ``0.06``, 1e-05 -> ``1e-05``."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def expand_grid(lambda_cos: Sequence[float], lambda_norm: Sequence[float]) -> list[Cell]:
    """The grid's cells, row-major: lambda_cos (rows) x lambda_norm (columns).

    Each list is de-duplicated and sorted ascending; values must be finite and >= 0.
    """
    rows, cols = _axis(lambda_cos, "--lambda-cos"), _axis(lambda_norm, "--lambda-norm")
    return [Cell(i * len(cols) + j, c, n) for i, c in enumerate(rows) for j, n in enumerate(cols)]


def _axis(values: Sequence[float], option: str) -> list[float]:
    out = sorted({float(v) for v in values})
    if not out:
        raise UsageError(f"{option} needs at least one value")
    for v in out:
        if not (math.isfinite(v) and v >= 0):
            raise UsageError(f"{option} values must be finite and >= 0, got {v}")
    return out


def attack_key(attack: str, eps: float) -> str:
    return f"{attack}@{eps:g}"


def run_settings(run: AttackRun) -> dict[str, Any]:
    return {"attack": run.attack, **dataclasses.asdict(run.settings)}


def shared_settings(
    base_config: TrainConfig, score_runs: Sequence[AttackRun], eval_limit: int | None
) -> dict[str, Any]:
    """What every cell shares (the manifest's ``shared``): training minus the swept lambdas, and
    the scoring battery (its attacks' seed is the training seed). JSON-normalised so it compares
    equal to what a manifest file holds."""
    training = dataclasses.asdict(base_config)
    for key in RUNTIME_ONLY_FIELDS:
        training.pop(key)
    training["hyperparameters"] = {
        k: v for k, v in sorted(training["hyperparameters"].items()) if k not in SWEPT
    }
    scoring = {"runs": [run_settings(r) for r in score_runs], "eval_limit": eval_limit}
    return json.loads(json.dumps({"training": training, "scoring": scoring}, sort_keys=True))


def cell_config(base_config: TrainConfig, cell: Cell) -> TrainConfig:
    """The base config with the cell's lambdas."""
    hyper = {
        **base_config.hyperparameters,
        "lambda_cos": cell.lambda_cos,
        "lambda_norm": cell.lambda_norm,
    }
    return dataclasses.replace(base_config, hyperparameters=hyper)


def cell_dir(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / cell.id


def run_sweep(
    base_config: TrainConfig,
    lambda_cos: Sequence[float],
    lambda_norm: Sequence[float],
    out_dir: str | Path,
    **kwargs: Any,
) -> SweepResult:
    """Hold the sweep folder's lock (:mod:`ncen_cli.output_safety`; rank 0 of ``dist``) and
    run :func:`_run_sweep`, whose arguments it takes. A second sweep into the same folder fails at
    once naming the holder; temporary files of a killed sweep are removed."""
    out_dir = Path(out_dir)
    if not kwargs.get("dist", SINGLE).is_main:
        return _run_sweep(base_config, lambda_cos, lambda_norm, out_dir, **kwargs)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a folder for the sweep")
    check_writable_folder(out_dir / MANIFEST)
    with output_lock(out_dir):
        return _run_sweep(base_config, lambda_cos, lambda_norm, out_dir, **kwargs)


@dataclass
class _CellJob:
    """What every cell of one sweep shares (built by :func:`_run_sweep`)."""

    base_config: TrainConfig
    out_dir: Path
    shared: dict[str, Any]
    arrays: ImageArrays
    x: torch.Tensor  # (N, C, H, W) uint8 scoring images
    y: torch.Tensor  # (N,) labels
    runs: list[AttackRun]
    on_epoch: Callable[[EpochRecord], None] | None
    on_batch: Callable[[int, int], None] | None
    on_eval: Progress | None
    evaluator: Evaluator


def _open_folder(
    out_dir: str | Path,
    shared: dict[str, Any],
    grid: dict[str, list[float]],
    cells: list[Cell],
    dist: DistContext,
) -> tuple[Path, set[str]]:
    """Check (or start) the sweep folder's manifest; returns the folder, which every rank takes
    from rank 0 (a default name holds a timestamp), and the ids of the cells already finished."""
    out_dir = Path(str(dist.broadcast_object(str(out_dir))))
    _check_manifest(out_dir, shared)
    finished_before = {c.id for c in cells if _finished(out_dir, c, shared) is not None}
    if dist.is_main:
        atomic_write_json(out_dir / MANIFEST, _manifest(out_dir, shared, grid))
    dist.barrier()
    return out_dir, finished_before


def _checked_inputs(
    base_config: TrainConfig,
    score_runs: Sequence[AttackRun] | None,
    eval_limit: int | None,
    arrays: ImageArrays | None,
) -> tuple[ImageArrays, list[AttackRun]]:
    """Validate the sweep's settings and return its data and attack runs, before any training.
    UsageError for a defense without both lambdas or an --attack-limit below 1."""
    base_config.validate()
    defense = get_defense(base_config.defense)  # a name or REGULARIZER+CRAFTER
    missing = [k for k in SWEPT if k not in defense.hyperparameters]
    if missing:
        raise UsageError(
            f"defense '{defense.name}' has no {', '.join(missing)}; sweep ncen or ncen-official"
        )
    if eval_limit is not None and eval_limit < 1:
        raise UsageError(f"--attack-limit must be >= 1, got {eval_limit}")
    if arrays is None:
        arrays = base_config.load_data()
    runs = list(score_runs) if score_runs is not None else runs_for(arrays.family, "score")
    validate_runs(runs)
    return arrays, runs


def _run_sweep(
    base_config: TrainConfig,
    lambda_cos: Sequence[float],
    lambda_norm: Sequence[float],
    out_dir: str | Path,
    *,
    score_runs: Sequence[AttackRun] | None = None,
    eval_limit: int | None = None,
    arrays: ImageArrays | None = None,
    on_cell_start: Callable[[Cell, int, int], None] | None = None,
    on_cell_done: Callable[[CellResult], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_eval: Progress | None = None,
    evaluator: Evaluator = evaluate,
    poll_seconds: float = 2.0,
    dist: DistContext = SINGLE,
) -> SweepResult:
    """Train and score every cell of the lambda_cos x lambda_norm grid into ``out_dir``.

    Args:
        base_config: shared training settings; its defense must have ``lambda_cos`` and
            ``lambda_norm`` (ncen or ncen-official). Every cell uses its seed and data.
        score_runs: the attack battery (default ``runs_for(family, "score")``: the paper's four
            attacks at the dataset's smaller eps).
        eval_limit: score on the first N examples of the test split (default: all of it; the test
            split itself is ``base_config.test_limit`` seeded examples).
        arrays: use these images instead of loading ``base_config.dataset`` (tests).
        on_cell_start: called with (cell, position, cells to run) before a cell trains.
        on_cell_done: called with each cell's result, skipped ones included.
        on_epoch, on_batch: passed to :func:`ncen_cli.training.train` for every cell.
        on_eval: ``progress(label, done, total)`` passed to the evaluator.
        evaluator: :func:`ncen_cli.evaluation.evaluate` or a stand-in with its signature.
        dist: the processes that share the grid (default: this one alone): cell ``i`` runs on
            rank ``i % world_size``, which trains and scores it on its own.
    Returns:
        The assembled :class:`SweepResult` (the same on every rank of ``dist``).
    Raises:
        UsageError: bad grid, a defense without both lambdas, or an ``out_dir`` that holds a sweep
            with other shared settings.
    """
    started = time.perf_counter()
    cells = expand_grid(lambda_cos, lambda_norm)
    arrays, runs = _checked_inputs(base_config, score_runs, eval_limit, arrays)
    shared = shared_settings(base_config, runs, eval_limit)
    grid = {
        "lambda_cos": sorted({float(v) for v in lambda_cos}),
        "lambda_norm": sorted({float(v) for v in lambda_norm}),
    }

    out_dir, finished_before = _open_folder(out_dir, shared, grid, cells, dist)

    job = _CellJob(
        base_config,
        out_dir,
        shared,
        arrays,
        arrays.test_x[:eval_limit],
        arrays.test_y[:eval_limit],
        runs,
        on_epoch,
        on_batch,
        on_eval,
        evaluator,
    )
    mine = [c for c in cells if c.index % dist.world_size == dist.rank]
    _run_cells(job, mine, finished_before, on_cell_start, on_cell_done)
    results = _collect(out_dir, cells, shared, dist.enabled, poll_seconds)
    for result in results:
        result.skipped = result.cell.id in finished_before
    return SweepResult(
        out_dir,
        grid["lambda_cos"],
        grid["lambda_norm"],
        results,
        shared["scoring"]["runs"],
        time.perf_counter() - started,
    )


def _run_cells(
    job: _CellJob,
    mine: list[Cell],
    finished_before: set[str],
    on_cell_start: Callable[[Cell, int, int], None] | None,
    on_cell_done: Callable[[CellResult], None] | None,
) -> None:
    """Train and score this rank's cells in this process alone (cells finished before are
    skipped)."""
    todo = [c for c in mine if c.id not in finished_before]
    position = 0
    for cell in mine:
        done = _finished(job.out_dir, cell, job.shared) if cell.id in finished_before else None
        if done is not None:
            done.skipped = True
            log.info("cell %s finished earlier; skipped", cell.id)
        else:
            position += 1
            if on_cell_start is not None:
                on_cell_start(cell, position, len(todo))
            try:
                done = _run_cell(job, cell)
            except (KeyboardInterrupt, InterruptedRun):
                raise InterruptedRun(
                    f"sweep interrupted in cell {cell.id}; finished cells and epochs are "
                    f"saved: run the same command again (--out {job.out_dir}) to resume"
                ) from None
        if on_cell_done is not None:
            on_cell_done(done)


def _manifest(
    out_dir: Path, shared: dict[str, Any], grid: dict[str, list[float]]
) -> dict[str, Any]:
    """The manifest to write: ``grid`` lists every value any run of this sweep asked for."""
    from ncen_cli import __version__

    old = read_manifest(out_dir).get("grid", {}) if (out_dir / MANIFEST).exists() else {}
    grid = {axis: sorted(set(values) | set(old.get(axis, []))) for axis, values in grid.items()}
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "shared": shared,
        "grid": grid,
        "ncen_version": __version__,
    }


def _check_manifest(out_dir: Path, shared: dict[str, Any]) -> None:
    """Refuse an ``out_dir`` that is a file, a non-sweep folder, or a sweep with other settings."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a folder for the sweep")
    manifest = out_dir / MANIFEST
    if not manifest.exists():
        if out_dir.exists() and any(out_dir.iterdir()):
            raise UsageError(
                f"--out {out_dir} is not empty and holds no {MANIFEST}; "
                "choose a new or empty folder"
            )
        return
    recorded = read_manifest(out_dir)
    old = recorded.get("shared", {})
    if old != shared:
        diffs = _differences(old, shared)
        raise UsageError(
            f"--out {out_dir} holds a sweep with other shared settings "
            f"({'; '.join(diffs[:4])}); rerun with the same options or choose "
            "another --out"
        )


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The sweep folder's manifest, validated: a regular file holding a JSON object of this
    format, a schema this ncen reads, ``shared`` an object and ``grid`` two lists of finite
    numbers. Raises UsageError naming the file and what to do."""
    manifest = out_dir / MANIFEST
    damaged = f"; choose another --out, or delete {out_dir} to start this sweep over"
    if not manifest.is_file():
        raise UsageError(f"{manifest} is not a regular file{damaged}")
    try:
        recorded = parse_json(manifest.read_text(encoding="utf-8"), str(manifest))
    except (OSError, UnicodeDecodeError, CheckpointError) as exc:
        raise UsageError(f"{manifest} is unreadable ({exc}){damaged}") from None
    if not isinstance(recorded, dict) or recorded.get("format") != FORMAT:
        raise UsageError(f"{manifest} is not an ncen sweep manifest; choose another --out")
    version, grid = recorded.get("schema_version"), recorded.get("grid", {})
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UsageError(f"{manifest}: schema_version must be an integer >= 1{damaged}")
    if version > SCHEMA_VERSION:
        raise UsageError(f"{manifest} was written by a newer ncen (schema {version}); upgrade ncen")
    if (
        not isinstance(recorded.get("shared"), dict)
        or not isinstance(grid, dict)
        or not all(
            isinstance(grid.get(axis, []), list) and all(_is_finite_number(v) for v in grid[axis])
            for axis in SWEPT
            if axis in grid
        )
    ):
        raise UsageError(f"{manifest}: 'shared' or 'grid' has the wrong shape{damaged}")
    return recorded


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# result.json key -> test of its value
_RESULT_FIELDS: dict[str, Callable[[Any], bool]] = {
    "id": lambda v: isinstance(v, str),
    "shared": lambda v: isinstance(v, dict),
    "clean_accuracy": lambda v: v is None or _is_finite_number(v),
    "mean_adversarial_accuracy": lambda v: v is None or _is_finite_number(v),
    "score": lambda v: v is None or _is_finite_number(v),
    "attacks": lambda v: isinstance(v, dict) and all(map(_is_finite_number, v.values())),
    "seconds": _is_finite_number,
    "train_seconds": _is_finite_number,
    "eval_seconds": _is_finite_number,
    "checkpoint": lambda v: isinstance(v, str) and v == Path(v).name and v not in ("", ".", ".."),
    "epochs": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "error": lambda v: v is None or isinstance(v, str),
    "attack_results": lambda v: v is None or isinstance(v, list),
    "checks": lambda v: v is None or isinstance(v, list),
}


def _check_result(data: Any, path: Path) -> None:
    """UsageError saying what to delete unless ``data`` is a well-formed cell result."""
    rerun = f"delete the cell's folder {path.parent} to rerun the cell"
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a readable cell result; {rerun}")
    optional = ("attack_results", "checks", "error")
    for key, test in _RESULT_FIELDS.items():
        if (key in data and not test(data[key])) or (key not in data and key not in optional):
            raise UsageError(f"{path}: '{key}' is missing or of the wrong type; {rerun}")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}")
    return out or ["format"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _result_path(out_dir: Path, cell: Cell) -> Path:
    return cell_dir(out_dir, cell) / "result.json"


def _finished(out_dir: Path, cell: Cell, shared: dict[str, Any]) -> CellResult | None:
    """The cell's recorded result if it exists and was made with these settings."""
    path = _result_path(out_dir, cell)
    try:
        data = parse_json(path.read_text(encoding="utf-8"), str(path))
    except OSError:
        return None
    except (CheckpointError, UnicodeDecodeError):
        data = None
    _check_result(data, path)
    if (
        data.get("shared") != shared
        or data.get("lambda_cos") != cell.lambda_cos
        or data.get("lambda_norm") != cell.lambda_norm
    ):
        return None
    return CellResult(
        cell=cell,
        clean_accuracy=data["clean_accuracy"],
        mean_adversarial_accuracy=data["mean_adversarial_accuracy"],
        score=data["score"],
        attacks=data["attacks"],
        seconds=data["seconds"],
        train_seconds=data["train_seconds"],
        eval_seconds=data["eval_seconds"],
        checkpoint=cell_dir(out_dir, cell) / data["checkpoint"],
        epochs=data["epochs"],
        error=data.get("error"),
        attack_results=data.get("attack_results", []),
        checks=data.get("checks") or [],
    )


def _run_cell(job: _CellJob, cell: Cell) -> CellResult:
    """Train (resuming from the last completed epoch) and score one cell; write its result."""
    out_dir, shared = job.out_dir, job.shared
    config = cell_config(job.base_config, cell)
    checkpoint = cell_dir(out_dir, cell) / "ensemble.safetensors"
    payload: dict[str, Any] = {
        "id": cell.id,
        "lambda_cos": cell.lambda_cos,
        "lambda_norm": cell.lambda_norm,
        "shared": shared,
        "checkpoint": checkpoint.name,
    }
    try:
        trained = train(
            config,
            checkpoint,
            resume=True,
            on_epoch=job.on_epoch,
            on_batch=job.on_batch,
            arrays=job.arrays,
        )
    except NonFiniteLossError as exc:  # a property of the cell (same seed: same failure)
        log.warning("cell %s: %s", cell.id, exc)
        payload.update(_failed_cell_fields(str(exc)))
        atomic_write_json(_result_path(out_dir, cell), payload)
        return _written(out_dir, cell, shared)
    train_seconds = sum(r.seconds for r in trained.history)
    started = time.perf_counter()
    runtime = Runtime.create(
        config.device, config.precision, config.threads, config.deterministic, config.seed
    )
    with runtime.applied():  # score with the cell's threads, as it trained
        report = job.evaluator(
            trained.ensemble,
            job.x,
            job.y,
            job.runs,
            batch_size=config.eval_batch_size,
            device=next(trained.ensemble.parameters()).device,
            seed=config.seed,
            progress=job.on_eval,
        )
    eval_seconds = time.perf_counter() - started
    for check in getattr(report, "checks", []):
        if check.passed is False:
            log.warning(
                "cell %s: evaluation check %s failed: %s", cell.id, check.name, check.detail
            )
    scored = worst_over_objectives(list(report.results))  # strong attacks: worst objective
    attacks = {attack_key(r.attack, r.eps): float(r.accuracy) for r in scored}
    mean_aae = sum(attacks.values()) / len(attacks)
    payload.update(
        clean_accuracy=float(report.clean_accuracy),
        mean_adversarial_accuracy=mean_aae,
        score=float(report.clean_accuracy) * mean_aae,
        attacks=attacks,
        seconds=train_seconds + eval_seconds,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        epochs=int(trained.metadata["epochs_done"]),
        error=None,
        attack_results=[
            _plain(r.to_json() if hasattr(r, "to_json") else r) for r in report.results
        ],
        checks=[_plain(c) for c in getattr(report, "checks", [])],
    )
    atomic_write_json(_result_path(out_dir, cell), payload)
    resume_path(checkpoint).unlink(missing_ok=True)  # the cell is finished; keep the checkpoint
    return _written(out_dir, cell, shared)


def _written(out_dir: Path, cell: Cell, shared: dict[str, Any]) -> CellResult:
    """The result :func:`_run_cell` has just written, read back as a resumed sweep reads it."""
    result = _finished(out_dir, cell, shared)
    assert result is not None  # written with these very settings
    return result


def _failed_cell_fields(error: str) -> dict[str, Any]:
    """The result fields of a cell whose training failed (no scores, the error)."""
    return {
        "clean_accuracy": None,
        "mean_adversarial_accuracy": None,
        "score": None,
        "attacks": {},
        "seconds": 0.0,
        "train_seconds": 0.0,
        "eval_seconds": 0.0,
        "epochs": 0,
        "error": error,
        "attack_results": [],
        "checks": [],
    }


def _plain(value: Any) -> Any:
    """JSON-safe copy (dataclasses, tuples, paths and tensors become plain values)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(
        json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def _collect(
    out_dir: Path, cells: list[Cell], shared: dict[str, Any], wait: bool, poll_seconds: float
) -> list[CellResult]:
    """Every cell's result in grid order; under torchrun, wait for the other ranks' cells."""
    while True:
        found = [_finished(out_dir, c, shared) for c in cells]
        missing = [c.id for c, r in zip(cells, found, strict=True) if r is None]
        if not missing:
            return [r for r in found if r is not None]  # all of them
        if not wait:
            raise UsageError(f"cells {', '.join(missing)} have no result; rerun the sweep")
        time.sleep(poll_seconds)
