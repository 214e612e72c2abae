"""The training loop: config in, checkpoint out, resumable after any interruption.

After every epoch a *resume state* (weights, optimizer, epoch, RNG state) is written atomically to
``<out>.resume.safetensors``, then the ensemble checkpoint to ``<out>``. A run killed at any moment
resumes (``resume=True``) from the last completed epoch and, on the CPU with the same seed, ends
with weights identical to an uninterrupted run: data order and augmentation are drawn from
generators seeded by (seed, epoch), and the learning rate is a pure function of the epoch.
The resume state records the run's config (:func:`recorded_run_config`), so a run resumes from
its path alone; it is deleted once the run finishes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ncen_cli import distributed
from ncen_cli.atomic import atomic_write
from ncen_cli.checkpoint import (
    first_non_finite,
    parse_json,
    read_metadata,
    require_regular_file,
    save_ensemble,
)
from ncen_cli.crafting import craft_batch, crafting_generator, get_defense
from ncen_cli.data import AugmentConfig, ImageArrays, iterate_batches, load_dataset
from ncen_cli.data.pipeline import iterate_eval_batches
from ncen_cli.defenses.base import CraftContext, Defense
from ncen_cli.device import Runtime, check_seed
from ncen_cli.ensemble import Ensemble, build_ensemble, parse_members
from ncen_cli.errors import (
    CheckpointError,
    InterruptedRun,
    NonFiniteLossError,
    NonFiniteModelError,
    UsageError,
)
from ncen_cli.member_parallel import MemberExecutor, plan_threads
from ncen_cli.output_safety import check_output, output_lock
from ncen_cli.presets import training_preset
from ncen_cli.train_step import (
    DEFAULT_DOUBLE_BACKPROP,
    DEFAULT_FD_SCALE,
    DOUBLE_BACKPROP_MODES,
    training_step,
)

log = logging.getLogger("ncen.train")
RESUME_SUFFIX = ".resume.safetensors"
LR_FLOOR_RATIO = 1e-2  # the paper: 1e-3 decays x0.1 every 15 epochs down to 1e-5
# TrainConfig fields that say where and how a run computes (and whether it may download), not what
# it trains: left out of the recorded config (so a run resumes on another device or thread count)
# and of sweep manifests
RUNTIME_ONLY_FIELDS = ("device", "threads", "member_threads", "download")
# Recorded (for reference) but free to change when a run resumes: where the data is read from and
# how large the evaluation batches are change nothing that is trained
RESUME_RUNTIME_FIELDS = (*RUNTIME_ONLY_FIELDS, "data_dir", "eval_batch_size")


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the checkpoint's metadata).

    ``None`` means "the paper's default for this dataset" (epochs, noise epsilon, hyperparameters).
    """

    members: list[str] = field(default_factory=lambda: ["resnet20"] * 3)
    dataset: str = "fashionmnist"
    data_dir: str | None = None
    defense: str = "ncen"
    hyperparameters: dict[str, float] = field(default_factory=dict)
    activation: str = "relu"
    combine: str = "mean-prob"
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    lr_step_epochs: int = 15
    lr_gamma: float = 0.1
    lr_min: float | None = None
    augment: bool = True
    noise: bool = True
    noise_eps: float | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    member_threads: int | None = None
    deterministic: bool = False
    double_backprop: str = DEFAULT_DOUBLE_BACKPROP
    fd_scale: float = DEFAULT_FD_SCALE  # deprecated with finite-diff: accepted, ignored
    eval_batch_size: int = 500
    download: bool = True

    def validate(self) -> None:
        if len(self.members) < 2:
            raise UsageError(f"an ensemble needs at least 2 members, got {len(self.members)}")
        for name, value in (
            ("--batch-size", self.batch_size),
            ("--eval-batch-size", self.eval_batch_size),
        ):
            if value < 1:
                raise UsageError(f"{name} must be >= 1, got {value}")
        if self.epochs is not None and self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if self.lr_min is not None and not 0 < self.lr_min <= self.lr:
            raise UsageError(
                f"the learning-rate floor must be in (0, --lr = {self.lr}], got {self.lr_min}"
            )
        check_seed(self.seed)
        if self.lr > MAX_LR:  # Adam's first step is 10 x lr: 3.4e37 already overflows float32
            raise UsageError(f"--lr must be <= {MAX_LR:g}, got {self.lr:g}")
        for name, count in (("--batch-size", self.batch_size), ("--epochs", self.epochs),
                            ("--eval-batch-size", self.eval_batch_size),
                            ("--train-limit", self.train_limit), ("--test-limit", self.test_limit)):
            check_int_range(name, count, 1, MAX_COUNT)
        if self.noise_eps is not None and not 0 <= self.noise_eps <= 1:
            raise UsageError(f"--noise-eps must be in [0, 1], got {self.noise_eps}")
        if self.double_backprop not in DOUBLE_BACKPROP_MODES:
            raise UsageError(
                f"unknown --double-backprop '{self.double_backprop}'; "
                f"choose {', '.join(DOUBLE_BACKPROP_MODES)}"
            )
        if not (self.fd_scale > 0 and math.isfinite(self.fd_scale)):
            raise UsageError(f"--fd-scale must be a finite number > 0, got {self.fd_scale}")
        for key, value in self.hyperparameters.items():
            if not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"--{key.replace('_', '-')} must be a finite number >= 0, "
                                 f"got {value}")
        for name, limit in (("--train-limit", self.train_limit), ("--test-limit", self.test_limit)):
            if limit is not None and limit < 1:
                raise UsageError(f"{name} must be >= 1, got {limit}")


MAX_COUNT = 2**31 - 1
MAX_LR = 1e3


def check_int_range(option: str, value: int | None, low: int, high: int) -> None:
    """UsageError unless ``value`` (None: not given) is an integer in ``[low, high]``."""
    if value is not None and not low <= value <= high:
        raise UsageError(f"{option} must be in [{low}, {high}], got {value}")


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


@dataclass
class TrainResult:
    ensemble: Ensemble
    path: Path
    metadata: dict[str, Any]
    history: list[EpochRecord]
    resumed_from_epoch: int = 0


def lr_floor(config: TrainConfig) -> float:
    """The schedule's floor: ``lr_min`` if given, else lr * LR_FLOOR_RATIO (the paper's 1e-3 ->
    1e-5), so that a small ``--lr`` is never raised by the floor."""
    return config.lr_min if config.lr_min is not None else config.lr * LR_FLOOR_RATIO


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """lr * gamma^(epoch // step), floored at :func:`lr_floor` (epoch counts from 0)."""
    return max(config.lr * config.lr_gamma ** (epoch // config.lr_step_epochs), lr_floor(config))


@torch.no_grad()
def clean_accuracy(
    ensemble: Ensemble,
    arrays_x: torch.Tensor,
    arrays_y: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> float:
    """Accuracy of the combined prediction on uint8 images, in eval mode (mode restored after).

    Under torchrun each rank scores its contiguous share and the counts are summed over ranks
    (sum of correct / sum of n: exactly the single-process accuracy).
    """
    was_training = ensemble.training
    ensemble.eval()
    share = distributed.shard_slice(len(arrays_x))
    arrays_x, arrays_y = arrays_x[share], arrays_y[share]
    correct = 0
    for xb, yb in iterate_eval_batches(arrays_x, arrays_y, batch_size, device):
        correct += int((ensemble(xb).argmax(1) == yb).sum())
    ensemble.train(was_training)
    total = distributed.all_reduce_sum(torch.tensor([correct, len(arrays_x)], dtype=torch.float64))
    return float(total[0] / max(total[1], 1))


def resolve_defense(config: TrainConfig, family: str) -> tuple[Defense, dict[str, float]]:
    defense: Defense = get_defense(config.defense)  # a name or REGULARIZER+CRAFTER
    return defense, defense.resolve(family, config.hyperparameters)


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + RESUME_SUFFIX)


def _save_resume_state(
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


def _load_resume_state(
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
    members = {k.removeprefix("members."): v for k, v in tensors.items()
               if k.startswith("members.")}
    for name, ref in ensemble.members.state_dict().items():
        if members[name].shape != ref.shape or members[name].dtype != ref.dtype:
            raise _bad_resume(path, f"tensor members.{name} is {members[name].dtype} "
                              f"{tuple(members[name].shape)}, expected {tuple(ref.shape)}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            ref = params[int(index)]
            expected = ((), torch.float32) if name == "step" else (ref.shape, ref.dtype)
            if (value.shape, value.dtype) != expected:
                raise _bad_resume(path, f"tensor {key} is {value.dtype} {tuple(value.shape)}, "
                                  f"expected {expected[1]} {tuple(expected[0])}")
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
            changes += [f"hyperparameters.{name}: {before.get(name)} -> {after.get(name)}"
                        for name in sorted(set(before) | set(after))
                        if before.get(name) != after.get(name)]
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


def config_from_record(saved: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` holding a recorded config's settings (runtime fields at their
    defaults); keys that are not TrainConfig fields (``world_size``) are left out."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in saved.items() if k in names})
    except TypeError as exc:
        raise CheckpointError(f"the recorded config is invalid ({exc})") from None


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
        if len(parts) != 3 or parts[0] != "optim" or not parts[1].isdigit() \
                or int(parts[1]) >= n_params:
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


def train(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    arrays: ImageArrays | None = None,
    overwrite: bool = False,
    on_start: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train an ensemble as ``config`` says and write it to ``out`` (.safetensors).

    ``out`` is locked while the run writes it (:mod:`ncen_cli.output_safety`): a second run on the
    same ``out`` fails at once. An existing ``out`` (or resume state) is refused unless ``resume``
    continues it or ``overwrite`` replaces it.

    Args:
        out: checkpoint path; the resume state lives beside it (``<out>.resume.safetensors``).
        resume: continue from the resume state if there is one (else start fresh); an ``out``
            without a resume state (a finished run) is an error.
        overwrite: replace an existing ``out`` (and drop its resume state) instead of refusing.
        on_epoch: called with each finished :class:`EpochRecord` (rank 0 only).
        on_batch: called with (batches done, batches per epoch) for progress display (rank 0 only).
        arrays: use these images instead of loading ``config.dataset`` (tests, benchmarks).
        on_start: called with (epochs already done, epochs in all) before the first epoch trains
            (rank 0 only), e.g. to show ``epoch m/N``.
    """
    config.validate()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {out}")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name ending in .safetensors")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    dist = distributed.context(config.device)
    if dist.enabled:  # every rank writes (rank 0) and resumes from rank 0's path
        out = Path(str(distributed.broadcast_object(str(out))))
    if not dist.is_main:
        return _train(config, out, resume, (on_start, on_epoch, on_batch), arrays, dist)
    _check_out(out, resume, overwrite)
    with output_lock(out):
        if overwrite:
            resume_path(out).unlink(missing_ok=True)
        return _train(config, out, resume, (on_start, on_epoch, on_batch), arrays, dist)


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to lose a result: an existing checkpoint or resume state at ``out`` needs
    ``resume`` (with a resume state) or ``overwrite``; ``out``'s folder must be writable."""
    state = resume_path(out)
    if resume and not state.exists() and (out.exists() or out.is_symlink()):
        raise UsageError(
            f"--resume: {out} has no resume state ({state.name}): it is a finished run or its "
            "state was deleted; nothing to resume (choose another --out, or --overwrite to train "
            "it again)"
        )
    if not resume and state.exists() and not overwrite:
        raise UsageError(
            f"--out {out} has the resume state of an unfinished run ({state.name}); continue it "
            "with --resume, or pass --overwrite to start over"
        )
    check_output(out, overwrite, "--out", resumable=resume)


def _train(
    config: TrainConfig,
    out: Path,
    resume: bool,
    callbacks: tuple[
        Callable[[int, int], None] | None,
        Callable[[EpochRecord], None] | None,
        Callable[[int, int], None] | None,
    ],
    arrays: ImageArrays | None,
    dist: distributed.DistContext,
) -> TrainResult:
    """The body of :func:`train` once ``out`` is checked and locked; ``callbacks`` are train()'s
    (on_start, on_epoch, on_batch)."""
    on_start, on_epoch, on_batch = callbacks
    runtime = Runtime.create(
        config.device, config.precision, config.threads, config.deterministic, config.seed
    )
    plan = plan_threads(runtime.device, len(config.members), config.threads, config.member_threads)
    if arrays is None:
        arrays = load_dataset(
            config.dataset,
            config.data_dir,
            config.download,
            config.train_limit,
            config.test_limit,
            config.seed,
        )
    family = arrays.family
    preset = training_preset(family)
    epochs = config.epochs or preset.epochs
    noise_eps = config.noise_eps if config.noise_eps is not None else preset.noise_eps
    augment = AugmentConfig(
        crop_padding=preset.crop_padding if config.augment else 0,
        flip=preset.flip and config.augment,
        noise_sigma=noise_eps / 2 if config.noise else 0.0,
    )
    defense, hyperparameters = resolve_defense(config, family)

    recorded = {
        **dataclasses.asdict(config),
        "epochs": epochs,
        "noise_eps": noise_eps,
        "lr_min": lr_floor(config),
        "hyperparameters": hyperparameters,
        "world_size": dist.world_size,
    }
    for key in RUNTIME_ONLY_FIELDS:  # where and how fast it ran does not change what was trained
        recorded.pop(key)
    config_json = json.dumps(recorded, sort_keys=True)

    torch.manual_seed(config.seed)
    ensemble = build_ensemble(
        list(config.members),
        arrays.input_shape,
        arrays.num_classes,
        config.activation,
        config.combine,
    ).to(runtime.device)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=learning_rate(config, 0))

    state_file = resume_path(out)
    start_epoch, history = 0, []
    has_state = resume and state_file.exists()
    if not distributed.all_true(has_state) and not distributed.all_true(not has_state):
        raise UsageError(
            f"{state_file} is visible to some ranks only; under torchrun on several "
            "nodes put --out on a filesystem that every node shares"
        )
    if has_state:
        start_epoch, history = _load_resume_state(state_file, ensemble, optimizer, config_json)
        log.info("resuming %s from epoch %d", out, start_epoch)
    if on_start is not None and dist.is_main:
        on_start(start_epoch, epochs)

    metadata = {
        "members": list(config.members),
        "activation": config.activation,
        "dataset": arrays.name,
        "family": family,
        "input_shape": list(arrays.input_shape),
        "num_classes": arrays.num_classes,
        "classes": list(arrays.classes),
        "defense": defense.name,
        "hyperparameters": hyperparameters,
        "config": recorded,
        "world_size": dist.world_size,
    }
    distributed.broadcast_parameters(ensemble)
    batches_per_epoch = math.ceil(
        len(arrays.train_x) * (2 if augment.noise_sigma > 0 else 1) / config.batch_size
    )
    run = _EpochContext(
        ensemble,
        optimizer,
        defense,
        hyperparameters,
        arrays,
        config,
        augment,
        runtime,
        dist,
        MemberExecutor(plan.member_threads, plan.intra_op_threads),
        batches_per_epoch,
        on_batch,
    )
    try:
        for epoch in range(start_epoch, epochs):
            record = _train_one_epoch(run, epoch)
            history.append(record)
            if dist.is_main:
                _save_resume_state(state_file, ensemble, optimizer, epoch + 1, config_json, history)
                save_ensemble(ensemble, out, {**metadata, **_progress_metadata(history, epochs)})
                if on_epoch is not None:
                    on_epoch(record)
            distributed.barrier()
    except KeyboardInterrupt:
        done = history[-1].epoch if history else 0
        raise InterruptedRun(
            f"interrupted during epoch {done + 1}; epochs 1-{done} are saved: continue with "
            f"`ncen train --resume {shlex.quote(str(out))}`"
            if done
            else "interrupted before the first epoch finished"
        ) from None
    finally:
        run.executor.close()

    if not history:
        raise UsageError("nothing to train: --epochs is 0")
    metadata.update(_progress_metadata(history, epochs))
    if dist.is_main and not (out.exists() and start_epoch >= epochs):
        save_ensemble(ensemble, out, metadata)
    if dist.is_main:  # the run is finished: its resume state (3x the checkpoint) has served
        state_file.unlink(missing_ok=True)
    distributed.barrier()  # the checkpoint exists for every rank once train() returns
    ensemble.metadata = {**ensemble.metadata, **metadata}
    return TrainResult(ensemble.eval(), out, metadata, history, start_epoch)


def _reduce_epoch_sums(
    seen: int, sums: dict[str, float], term_sums: dict[str, float]
) -> tuple[int, dict[str, float], dict[str, float]]:
    """Sum one epoch's sample count and loss sums over ranks (a rank may have seen no term)."""
    total_seen, total, terms = 0, {k: 0.0 for k in sums}, {}
    for rank_seen, rank_sums, rank_terms in distributed.gather_objects((seen, sums, term_sums)):
        total_seen += rank_seen
        for k, v in rank_sums.items():
            total[k] += v
        for k, v in rank_terms.items():
            terms[k] = terms.get(k, 0.0) + v
    return total_seen, total, terms


@dataclass
class _EpochContext:
    """What every epoch of one run needs (built once by :func:`train`)."""

    ensemble: Ensemble
    optimizer: torch.optim.Optimizer
    defense: Defense
    hyperparameters: dict[str, float]
    arrays: ImageArrays
    config: TrainConfig
    augment: AugmentConfig
    runtime: Runtime
    dist: distributed.DistContext
    executor: MemberExecutor
    batches_per_epoch: int
    on_batch: Callable[[int, int], None] | None


def _train_one_epoch(run: _EpochContext, epoch: int) -> EpochRecord:
    """One pass over the (sharded) training data, then the clean test accuracy."""
    ensemble, optimizer, config, dist = run.ensemble, run.optimizer, run.config, run.dist
    lr = learning_rate(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    ensemble.train()
    started = time.perf_counter()
    sums = {"ce": 0.0, "loss": 0.0}
    term_sums: dict[str, float] = {}
    seen = 0
    batches = iterate_batches(
        run.arrays.train_x,
        run.arrays.train_y,
        config.batch_size,
        config.seed,
        epoch,
        run.augment,
        run.runtime.device,
        dist.rank,
        dist.world_size,
    )
    for step, (xb, yb) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        n = len(yb)  # this rank's share of the global batch (may be 0 under torchrun)
        if n == 0:  # take part in the step's collectives with weight 0
            distributed.all_true(True)
            distributed.average_gradients(ensemble, weight=0)
            optimizer.step()
            _check_model(ensemble, step, epoch)
            continue
        with run.runtime.autocast():
            if run.defense.member_inputs is not None:  # members train on crafted inputs
                gen = crafting_generator(config.seed, epoch, step, dist.rank)
                context = CraftContext(gen, config.seed, epoch, step)
                xb, yb = craft_batch(run.defense, ensemble, xb, yb, run.hyperparameters, context)
            result = training_step(
                ensemble,
                run.defense,
                run.hyperparameters,
                xb,
                yb,
                config.double_backprop,
                executor=run.executor,
            )
        if not distributed.all_true(bool(torch.isfinite(result.loss))):  # all ranks stop together
            _check_finite(result, epoch)  # raises on the ranks whose loss is non-finite
            raise NonFiniteLossError(
                f"non-finite loss in epoch {epoch + 1} on another rank; "
                "the checkpoint of the last completed epoch is kept"
            )
        # weighted by share size: the result is the gradient of the global-batch mean loss
        distributed.average_gradients(ensemble, weight=n)
        optimizer.step()
        _check_model(ensemble, step, epoch)
        seen += n
        sums["ce"] += float(result.ce) * n
        sums["loss"] += float(result.loss) * n
        for name, value in result.terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + float(value) * n
        if run.on_batch is not None and dist.is_main:
            run.on_batch(step + 1, run.batches_per_epoch)
    seconds = time.perf_counter() - started
    if dist.enabled:  # epoch figures over all ranks; one model (BN statistics) on every rank
        seen, sums, term_sums = _reduce_epoch_sums(seen, sums, term_sums)
        distributed.sync_buffers(ensemble)
    accuracy = clean_accuracy(
        ensemble, run.arrays.test_x, run.arrays.test_y, config.eval_batch_size, run.runtime.device
    )
    return EpochRecord(
        epoch=epoch + 1,
        lr=lr,
        ce=sums["ce"] / max(seen, 1),
        terms={k: v / max(seen, 1) for k, v in term_sums.items()},
        loss=sums["loss"] / max(seen, 1),
        test_accuracy=accuracy,
        images_per_s=seen / max(seconds, 1e-9),
        seconds=seconds,
    )


def _progress_metadata(history: list[EpochRecord], epochs: int) -> dict[str, Any]:
    last = history[-1]
    return {
        "epochs_done": last.epoch,
        "epochs_planned": epochs,
        "complete": last.epoch >= epochs,
        "metrics": {
            "test_accuracy": last.test_accuracy,
            "ce": last.ce,
            "loss": last.loss,
            "terms": last.terms,
        },
        "history": [
            {"epoch": r.epoch, "ce": r.ce, "terms": r.terms, "test_accuracy": r.test_accuracy}
            for r in history
        ],
    }


def _check_model(ensemble: Ensemble, step: int, epoch: int) -> None:
    """After an optimizer step: every parameter and BatchNorm buffer finite on every rank (all
    ranks stop together), else NonFiniteModelError (the last completed epoch's files are kept)."""
    if not distributed.all_true(first_non_finite(ensemble) is None):
        bad = first_non_finite(ensemble) or "on another rank"
        raise NonFiniteModelError(
            f"non-finite weights after step {step + 1} of epoch {epoch + 1} ({bad}); the "
            "checkpoint of the last completed epoch is kept; lower --lr or the lambdas"
        )


def _check_finite(result, epoch: int) -> None:
    if bool(torch.isfinite(result.loss)):
        return
    bad = [
        name
        for name, value in {"ce": result.ce, **result.terms}.items()
        if not bool(torch.isfinite(value))
    ]
    raise NonFiniteLossError(
        f"non-finite loss in epoch {epoch + 1} (term: {', '.join(bad) or 'total'}); the checkpoint "
        "of the last completed epoch is kept; lower --lr or the lambdas"
    )


def train_from_names(members: str, **kwargs: Any) -> TrainConfig:
    """Build a TrainConfig from a ``--members`` string and keyword options."""
    return TrainConfig(members=parse_members(members), **kwargs)
