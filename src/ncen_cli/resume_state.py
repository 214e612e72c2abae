"""The resume state: the file beside a checkpoint that lets an interrupted run continue.

``<out>.resume.safetensors`` holds the members' weights, Adam's state and torch's RNG state as
tensors, and as metadata the epochs done, Adam's parameter groups, the epoch history and the run's
recorded config (:func:`recorded_run_config`). :func:`save_resume_state` writes it atomically
after every epoch; :func:`load_resume_state` validates all of it before restoring anything. The
ensemble checkpoint itself is :mod:`ncen_cli.checkpoint`'s format.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ncen_cli.atomic import atomic_write
from ncen_cli.checkpoint import first_non_finite, parse_json, read_metadata, require_regular_file
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import CheckpointError, UsageError

RESUME_SUFFIX = ".resume.safetensors"
# TrainConfig fields that say where and how a run computes (and whether it may download), not what
# it trains: left out of the recorded config (so a run resumes on another device or thread count)
# and of sweep manifests
RUNTIME_ONLY_FIELDS = ("device", "threads", "member_threads", "download")
# Recorded (for reference) but free to change when a run resumes: where the data is read from and
# how large the evaluation batches are change nothing that is trained
RESUME_RUNTIME_FIELDS = (*RUNTIME_ONLY_FIELDS, "data_dir", "eval_batch_size")


@dataclass
class EpochRecord:
    """What one epoch produced (logged, and kept in the checkpoint's metrics history)."""

    epoch: int
    lr: float
    ce: float
    terms: dict[str, float]
    loss: float
    test_accuracy: float
    images_per_s: float
    seconds: float


def resume_path(out: Path) -> Path:
    """Where the resume state of the run writing ``out`` lives."""
    return out.with_name(out.name + RESUME_SUFFIX)


def save_resume_state(
    path: Path,
    ensemble: Ensemble,
    optimizer: torch.optim.Optimizer,
    epochs_done: int,
    config_json: str,
    history: list[EpochRecord],
) -> None:
    tensors = {
        f"members.{k}": v.detach().cpu().contiguous()
        for k, v in ensemble.members.state_dict().items()
    }
    state = optimizer.state_dict()
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "epochs_done": str(epochs_done),
        "config": config_json,
        "param_groups": json.dumps(state["param_groups"]),
        "history": json.dumps([dataclasses.asdict(r) for r in history]),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_resume_state(
    path: Path, ensemble: Ensemble, optimizer: torch.optim.Optimizer, config_json: str
) -> tuple[int, list[EpochRecord]]:
    """Restore weights, Adam state and RNG from the resume state at ``path``; returns (epochs
    done, history). Everything is validated before anything is restored: a state of the wrong
    shape is one CheckpointError that says which file to delete; other settings a UsageError."""
    require_regular_file(path, "resume state")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            _check_resume_config(path, meta, json.loads(config_json))
            names = set(f.keys())
            _check_resume_names(path, names, ensemble, optimizer)
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"resume state {path} is unreadable ({exc}); delete it to restart"
        ) from None
    wanted = json.loads(config_json)
    epochs_done, groups, history = _resume_fields(path, meta, int(wanted.get("epochs") or 0))
    members = {
        k.removeprefix("members."): v for k, v in tensors.items() if k.startswith("members.")
    }
    for name, ref in ensemble.members.state_dict().items():
        if members[name].shape != ref.shape or members[name].dtype != ref.dtype:
            raise _bad_resume(
                path,
                f"tensor members.{name} is {members[name].dtype} "
                f"{tuple(members[name].shape)}, expected {tuple(ref.shape)}",
            )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            ref = params[int(index)]
            expected = ((), torch.float32) if name == "step" else (ref.shape, ref.dtype)
            if (value.shape, value.dtype) != expected:
                raise _bad_resume(
                    path,
                    f"tensor {key} is {value.dtype} {tuple(value.shape)}, "
                    f"expected {expected[1]} {tuple(expected[0])}",
                )
            opt_state.setdefault(int(index), {})[name] = value
    rng = tensors["rng.torch"]
    if rng.dtype != torch.uint8 or rng.ndim != 1:
        raise _bad_resume(path, "rng.torch is not a torch RNG state")
    try:
        ensemble.members.load_state_dict(members)
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        torch.set_rng_state(rng)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise _bad_resume(path, str(exc).splitlines()[0] if str(exc) else "state") from None
    bad = first_non_finite(ensemble)
    if bad is not None:
        raise _bad_resume(path, f"tensor members.{bad} holds NaN or infinite values")
    return epochs_done, history


def _bad_resume(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"resume state {path} is invalid ({why}); delete it to restart the run from epoch 0"
    )


def _check_resume_config(path: Path, meta: dict[str, str], wanted: dict[str, Any]) -> None:
    """The resume state's recorded config must be this run's (UsageError naming the cause)."""
    saved = _resume_json(path, meta, "config", "null")
    if not isinstance(saved, dict):
        raise _bad_resume(path, "its config is not a JSON object")
    if saved.get("world_size", 1) != wanted.get("world_size", 1):
        raise UsageError(
            f"{path} was trained by {saved.get('world_size', 1)} process(es), this run has "
            f"{wanted.get('world_size', 1)}; resume with the same torchrun world size"
        )
    changes = config_changes(saved, wanted)
    if changes:
        raise UsageError(
            f"{path} belongs to a run with other settings ({'; '.join(changes)}); resume with "
            "the recorded settings (`ncen train --resume RUN` alone uses them) or choose another "
            "--out"
        )


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The recorded settings that differ between two recorded configs, as ``field: old -> new``
    (hyperparameters key by key); fields in :data:`RESUME_RUNTIME_FIELDS` are ignored."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_RUNTIME_FIELDS:
            continue
        before, after = old.get(key), new.get(key)
        if key == "hyperparameters" and isinstance(before, dict) and isinstance(after, dict):
            changes += [
                f"hyperparameters.{name}: {before.get(name)} -> {after.get(name)}"
                for name in sorted(set(before) | set(after))
                if before.get(name) != after.get(name)
            ]
        elif before != after:
            changes.append(f"{key}: {_short(before)} -> {_short(after)}")
    return changes


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def recorded_run_config(out: Path) -> dict[str, Any]:
    """The recorded config of the run at ``out``: its resume state's if there is one, else its
    checkpoint's. UsageError when ``out`` holds no run; CheckpointError when it is unreadable."""
    state = resume_path(out)
    if state.exists():
        require_regular_file(state, "resume state")
        try:
            with safe_open(str(state), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else "unreadable"
            raise _bad_resume(state, why) from None
        saved = _resume_json(state, meta, "config", "null")
        if not isinstance(saved, dict):
            raise _bad_resume(state, "its config is not a JSON object")
        return saved
    if out.exists():
        saved = read_metadata(out).get("config")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{out} records no training config")
        return saved
    raise UsageError(f"--resume: there is no run at {out} (no checkpoint, no resume state)")


def _check_resume_names(
    path: Path, names: set[str], ensemble: Ensemble, optimizer: torch.optim.Optimizer
) -> None:
    """Tensor names: exactly the members' state, ``optim.<i>.<field>`` for existing parameters,
    and ``rng.torch``."""
    members = {f"members.{k}" for k in ensemble.members.state_dict()}
    if not members <= names:
        raise _bad_resume(path, f"{len(members - names)} member tensors are missing")
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    fields: dict[int, set[str]] = {}
    for name in names - members - {"rng.torch"}:
        parts = name.split(".", 2)
        if (
            len(parts) != 3
            or parts[0] != "optim"
            or not parts[1].isdigit()
            or int(parts[1]) >= n_params
        ):
            raise _bad_resume(path, f"unexpected tensor {name[:60]!r}")
        fields.setdefault(int(parts[1]), set()).add(parts[2])
    if fields and (len(fields) != n_params or len({frozenset(f) for f in fields.values()}) != 1):
        raise _bad_resume(path, "the optimizer state does not cover every parameter alike")
    if "rng.torch" not in names:
        raise _bad_resume(path, "rng.torch is missing")


def _resume_json(path: Path, meta: dict[str, str], key: str, default: str) -> Any:
    try:
        return parse_json(meta.get(key, default), key)
    except CheckpointError as exc:
        raise _bad_resume(path, str(exc)) from None


def _is_record(raw: Any) -> bool:
    """Whether ``raw`` is an :class:`EpochRecord` as JSON: its fields, numbers, terms a dict."""
    fields = {f.name for f in dataclasses.fields(EpochRecord)}
    if not isinstance(raw, dict) or set(raw) != fields or not isinstance(raw["terms"], dict):
        return False
    numbers = [v for k, v in raw.items() if k != "terms"] + list(raw["terms"].values())
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers)


def _resume_fields(
    path: Path, meta: dict[str, str], epochs: int
) -> tuple[int, list[dict[str, Any]], list[EpochRecord]]:
    """``epochs_done`` (in [0, epochs]), Adam's ``param_groups`` and the epoch ``history``."""
    text = meta.get("epochs_done", "")
    if not text.isdigit() or not 0 <= int(text) <= epochs:
        raise _bad_resume(path, f"epochs_done {text[:20]!r} is not in [0, {epochs}]")
    groups = _resume_json(path, meta, "param_groups", "null")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise _bad_resume(path, "param_groups is not a list of Adam parameter groups")
    raw = _resume_json(path, meta, "history", "[]")
    if not isinstance(raw, list) or len(raw) != int(text) or not all(map(_is_record, raw)):
        raise _bad_resume(path, f"history does not hold {text} epoch records")
    try:
        history = [EpochRecord(**r) for r in raw]
    except TypeError as exc:
        raise _bad_resume(path, str(exc)) from None
    return int(text), groups, history
