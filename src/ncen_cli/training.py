"""The training loop: config in, checkpoint out, resumable after any interruption.

After every epoch a *resume state* (weights, optimizer, epoch, RNG state) is written atomically to
``<out>.resume.safetensors``, then the ensemble checkpoint to ``<out>``. A run killed at any moment
resumes (``resume=True``) from the last completed epoch and, on the CPU with the same seed, ends
with weights identical to an uninterrupted run: data order and augmentation are drawn from
generators seeded by (seed, epoch), and the learning rate is a pure function of the epoch.
The resume state (:mod:`ncen_cli.resume_state`) records the run's config, so a run resumes from
its path alone; it is deleted once the run finishes.

:func:`train` is :func:`plan_run` (resolve the config, data, defense, schedule and resume; trains
nothing) followed by :func:`fit` (build or restore the ensemble, run the epochs, write the files).
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

from ncen_cli import distributed
from ncen_cli.checkpoint import first_non_finite, save_ensemble
from ncen_cli.crafting import craft_batch, crafting_generator, get_defense
from ncen_cli.data import AugmentConfig, ImageArrays, iterate_batches, load_dataset
from ncen_cli.data.pipeline import iterate_eval_batches
from ncen_cli.defenses.base import CraftContext, Defense
from ncen_cli.device import Runtime, check_seed
from ncen_cli.ensemble import Ensemble, build_ensemble, check_member_count, parse_members
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
from ncen_cli.resume_state import (
    RUNTIME_ONLY_FIELDS,
    EpochRecord,
    load_resume_state,
    resume_path,
    save_resume_state,
)
from ncen_cli.train_step import (
    DEFAULT_DOUBLE_BACKPROP,
    DEFAULT_FD_SCALE,
    StepOutput,
    resolve_double_backprop,
    training_step,
)

log = logging.getLogger("ncen.train")
LR_FLOOR_RATIO = 1e-2  # the paper: 1e-3 decays x0.1 every 15 epochs down to 1e-5


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

    def load_data(self) -> ImageArrays:
        """The dataset it names, with its seeded subsets (:func:`ncen_cli.data.load_dataset`)."""
        return load_dataset(
            self.dataset,
            self.data_dir,
            self.download,
            self.train_limit,
            self.test_limit,
            self.seed,
        )

    def validate(self) -> None:
        check_member_count(len(self.members))
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
        for name, count in (
            ("--batch-size", self.batch_size),
            ("--epochs", self.epochs),
            ("--eval-batch-size", self.eval_batch_size),
            ("--train-limit", self.train_limit),
            ("--test-limit", self.test_limit),
        ):
            check_int_range(name, count, 1, MAX_COUNT)
        if self.noise_eps is not None and not 0 <= self.noise_eps <= 1:
            raise UsageError(f"--noise-eps must be in [0, 1], got {self.noise_eps}")
        resolve_double_backprop(self.double_backprop)  # UsageError for an unknown mode
        if not (self.fd_scale > 0 and math.isfinite(self.fd_scale)):
            raise UsageError(f"--fd-scale must be a finite number > 0, got {self.fd_scale}")
        for key, weight in self.hyperparameters.items():
            if not (weight >= 0 and math.isfinite(weight)):
                raise UsageError(
                    f"--{key.replace('_', '-')} must be a finite number >= 0, got {weight}"
                )
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
    *,
    dist: distributed.DistContext = distributed.SINGLE,
) -> float:
    """Accuracy of the combined prediction on uint8 images, in eval mode (mode restored after).

    With a ``dist`` of several processes each rank scores its contiguous share and the counts
    are summed over ranks (sum of correct / sum of n: exactly the single-process accuracy).
    """
    was_training = ensemble.training
    ensemble.eval()
    share = dist.shard(len(arrays_x))
    arrays_x, arrays_y = arrays_x[share], arrays_y[share]
    correct = 0
    for xb, yb in iterate_eval_batches(arrays_x, arrays_y, batch_size, device):
        correct += int((ensemble(xb).argmax(1) == yb).sum())
    ensemble.train(was_training)
    total = dist.all_reduce_sum(torch.tensor([correct, len(arrays_x)], dtype=torch.float64))
    return float(total[0]) / max(float(total[1]), 1.0)


def resolve_defense(config: TrainConfig, family: str) -> tuple[Defense, dict[str, float]]:
    defense: Defense = get_defense(config.defense)  # a name or REGULARIZER+CRAFTER
    return defense, defense.resolve(family, config.hyperparameters)


def config_from_record(saved: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` holding a recorded config's settings (runtime fields at their
    defaults); keys that are not TrainConfig fields (``world_size``) are left out."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in saved.items() if k in names})
    except TypeError as exc:
        raise CheckpointError(f"the recorded config is invalid ({exc})") from None


@dataclass
class Callbacks:
    """What :func:`train` reports as it runs (rank 0 only; each may be None).

    Attributes:
        on_start: (epochs already done, epochs in all) before the first epoch trains.
        on_epoch: each finished :class:`EpochRecord`.
        on_batch: (batches done, batches per epoch), for progress display.
    """

    on_start: Callable[[int, int], None] | None = None
    on_epoch: Callable[[EpochRecord], None] | None = None
    on_batch: Callable[[int, int], None] | None = None


@dataclass(frozen=True)
class TrainPlan:
    """A run resolved from its config before anything trains (see :func:`plan_run`).

    Attributes:
        out: the checkpoint path; ``state_file`` its resume state.
        epochs: the epochs in all (the config's or the family's default).
        augment: crop, flip and noise of the training batches.
        recorded: the config as the checkpoint and the resume state record it (defaults
            resolved; runtime-only fields left out); ``config_json`` its canonical JSON.
        metadata: the checkpoint metadata that does not change during the run.
        resume: whether the run continues from ``state_file``.
    """

    config: TrainConfig
    out: Path
    runtime: Runtime
    arrays: ImageArrays
    epochs: int
    augment: AugmentConfig
    defense: Defense
    hyperparameters: dict[str, float]
    recorded: dict[str, Any]
    config_json: str
    metadata: dict[str, Any]
    resume: bool

    @property
    def state_file(self) -> Path:
        return resume_path(self.out)

    @property
    def batches_per_epoch(self) -> int:
        copies = 2 if self.augment.noise_sigma > 0 else 1
        return math.ceil(len(self.arrays.train_x) * copies / self.config.batch_size)


def train(
    config: TrainConfig,
    out: str | Path,
    resume: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    arrays: ImageArrays | None = None,
    overwrite: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    *,
    dist: distributed.DistContext = distributed.SINGLE,
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
        dist: the processes that train together (default: this one alone); with several (from
            :func:`ncen_cli.distributed.initialize`), each rank trains on its share of every
            batch, gradients are averaged, and rank 0 writes the files.
    """
    config.validate()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {out}")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name ending in .safetensors")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    # every rank writes (rank 0) and resumes from rank 0's path
    out = Path(str(dist.broadcast_object(str(out))))
    callbacks = Callbacks(on_start, on_epoch, on_batch)
    if not dist.is_main:
        return fit(plan_run(config, out, resume, arrays, dist), callbacks, dist)
    _check_out(out, resume, overwrite)
    with output_lock(out):
        if overwrite:
            resume_path(out).unlink(missing_ok=True)
        return fit(plan_run(config, out, resume, arrays, dist), callbacks, dist)


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


def plan_run(
    config: TrainConfig,
    out: Path,
    resume: bool = False,
    arrays: ImageArrays | None = None,
    dist: distributed.DistContext = distributed.SINGLE,
) -> TrainPlan:
    """Resolve a run: the runtime, the data (``arrays``, else ``config.dataset`` loaded), the
    family's defaults (epochs, noise, crop), the defense and its hyperparameters, the recorded
    config and metadata, and whether it resumes (``resume`` and a resume state visible to every
    rank of ``dist``). Trains nothing and changes no torch setting."""
    runtime = Runtime.create(
        config.device, config.precision, config.threads, config.deterministic, config.seed
    )
    if arrays is None:
        arrays = config.load_data()
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
    has_state = resume and resume_path(out).exists()
    if not dist.all_true(has_state) and not dist.all_true(not has_state):
        raise UsageError(
            f"{resume_path(out)} is visible to some ranks only; under torchrun on several "
            "nodes put --out on a filesystem that every node shares"
        )
    return TrainPlan(
        config,
        out,
        runtime,
        arrays,
        epochs,
        augment,
        defense,
        hyperparameters,
        recorded,
        json.dumps(recorded, sort_keys=True),
        metadata,
        has_state,
    )


def fit(
    plan: TrainPlan,
    callbacks: Callbacks | None = None,
    dist: distributed.DistContext = distributed.SINGLE,
) -> TrainResult:
    """Run a planned run: build the ensemble (or restore it from the resume state), train the
    remaining epochs writing the resume state and the checkpoint after each (rank 0), and delete
    the resume state at the end. Torch's settings are :meth:`Runtime.applied` for the run only."""
    callbacks = callbacks or Callbacks()
    config = plan.config
    with plan.runtime.applied():
        torch.manual_seed(config.seed)
        ensemble = build_ensemble(
            list(config.members),
            plan.arrays.input_shape,
            plan.arrays.num_classes,
            config.activation,
            config.combine,
        ).to(plan.runtime.device)
        optimizer = torch.optim.Adam(ensemble.parameters(), lr=learning_rate(config, 0))
        start_epoch = 0
        history: list[EpochRecord] = []
        if plan.resume:
            start_epoch, history = load_resume_state(
                plan.state_file, ensemble, optimizer, plan.config_json
            )
            log.info("resuming %s from epoch %d", plan.out, start_epoch)
        if callbacks.on_start is not None and dist.is_main:
            callbacks.on_start(start_epoch, plan.epochs)
        dist.broadcast_parameters(ensemble)
        threads = plan_threads(
            plan.runtime.device, len(config.members), config.threads, config.member_threads
        )
        run = _EpochContext(
            ensemble=ensemble,
            optimizer=optimizer,
            defense=plan.defense,
            hyperparameters=plan.hyperparameters,
            arrays=plan.arrays,
            config=config,
            augment=plan.augment,
            runtime=plan.runtime,
            dist=dist,
            executor=MemberExecutor(threads.member_threads, threads.intra_op_threads),
            batches_per_epoch=plan.batches_per_epoch,
            on_batch=callbacks.on_batch,
        )
        _fit_epochs(plan, run, start_epoch, history, callbacks.on_epoch)
    if not history:
        raise UsageError("nothing to train: --epochs is 0")
    metadata = {**plan.metadata, **_progress_metadata(history, plan.epochs)}
    if dist.is_main and not (plan.out.exists() and start_epoch >= plan.epochs):
        save_ensemble(ensemble, plan.out, metadata)
    if dist.is_main:  # the run is finished: its resume state (3x the checkpoint) has served
        plan.state_file.unlink(missing_ok=True)
    dist.barrier()  # the checkpoint exists for every rank once train() returns
    ensemble.metadata = {**ensemble.metadata, **metadata}
    return TrainResult(ensemble.eval(), plan.out, metadata, history, start_epoch)


def _fit_epochs(
    plan: TrainPlan,
    run: _EpochContext,
    start_epoch: int,
    history: list[EpochRecord],
    on_epoch: Callable[[EpochRecord], None] | None,
) -> None:
    """Train epochs ``start_epoch`` .. ``plan.epochs - 1``, appending to ``history``; after each,
    rank 0 writes the resume state, then the checkpoint. Ctrl-C is an InterruptedRun naming the
    command that resumes."""
    try:
        for epoch in range(start_epoch, plan.epochs):
            record = _train_one_epoch(run, epoch)
            history.append(record)
            if run.dist.is_main:
                save_resume_state(
                    plan.state_file,
                    run.ensemble,
                    run.optimizer,
                    epoch + 1,
                    plan.config_json,
                    history,
                )
                save_ensemble(
                    run.ensemble,
                    plan.out,
                    {**plan.metadata, **_progress_metadata(history, plan.epochs)},
                )
                if on_epoch is not None:
                    on_epoch(record)
            run.dist.barrier()
    except KeyboardInterrupt:
        done = history[-1].epoch if history else 0
        raise InterruptedRun(
            f"interrupted during epoch {done + 1}; epochs 1-{done} are saved: continue with "
            f"`ncen train --resume {shlex.quote(str(plan.out))}`"
            if done
            else "interrupted before the first epoch finished"
        ) from None
    finally:
        run.executor.close()


def _reduce_epoch_sums(
    dist: distributed.DistContext, seen: int, sums: dict[str, float], term_sums: dict[str, float]
) -> tuple[int, dict[str, float], dict[str, float]]:
    """Sum one epoch's sample count and loss sums over ranks (a rank may have seen no term)."""
    total_seen, total = 0, {k: 0.0 for k in sums}
    terms: dict[str, float] = {}
    for rank_seen, rank_sums, rank_terms in dist.gather_objects((seen, sums, term_sums)):
        total_seen += rank_seen
        for k, v in rank_sums.items():
            total[k] += v
        for k, v in rank_terms.items():
            terms[k] = terms.get(k, 0.0) + v
    return total_seen, total, terms


@dataclass(kw_only=True)
class _EpochContext:
    """What every epoch of one run needs (built once by :func:`fit`)."""

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
    """One pass over this rank's share of the training data, then the clean test accuracy."""
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
        rank=dist.rank,
        world_size=dist.world_size,
    )
    for step, (xb, yb) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)
        n = len(yb)  # this rank's share of the global batch (may be 0 under torchrun)
        if n:
            result = _step(run, epoch, step, xb, yb)
        else:  # take part in the step's collectives with weight 0
            dist.all_true(True)
            result = None
        # weighted by share size: the result is the gradient of the global-batch mean loss
        dist.average_gradients(ensemble, weight=n)
        optimizer.step()
        _check_model(dist, ensemble, step, epoch)
        if result is None:
            continue
        seen += n
        sums["ce"] += float(result.ce) * n
        sums["loss"] += float(result.loss) * n
        for name, value in result.terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + float(value) * n
        if run.on_batch is not None and dist.is_main:
            run.on_batch(step + 1, run.batches_per_epoch)
    seconds = time.perf_counter() - started
    if dist.enabled:  # epoch figures over all ranks; one model (BN statistics) on every rank
        seen, sums, term_sums = _reduce_epoch_sums(dist, seen, sums, term_sums)
        dist.sync_buffers(ensemble)
    accuracy = clean_accuracy(
        ensemble,
        run.arrays.test_x,
        run.arrays.test_y,
        config.eval_batch_size,
        run.runtime.device,
        dist=dist,
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


def _step(
    run: _EpochContext, epoch: int, step: int, xb: torch.Tensor, yb: torch.Tensor
) -> StepOutput:
    """The training step on this rank's (B, C, H, W) share ``xb`` / (B,) ``yb`` (B >= 1): crafted
    inputs if the defense asks for them, the loss and its gradients. Every rank stops together
    on a non-finite loss."""
    config, dist = run.config, run.dist
    with run.runtime.autocast():
        if run.defense.member_inputs is not None:  # members train on crafted inputs
            gen = crafting_generator(config.seed, epoch, step, dist.rank)
            context = CraftContext(gen, config.seed, epoch, step)
            xb, yb = craft_batch(run.defense, run.ensemble, xb, yb, run.hyperparameters, context)
        result = training_step(
            run.ensemble,
            run.defense,
            run.hyperparameters,
            xb,
            yb,
            config.double_backprop,
            executor=run.executor,
        )
    if not dist.all_true(bool(torch.isfinite(result.loss))):  # all ranks stop together
        _check_finite(result, epoch)  # raises on the ranks whose loss is non-finite
        raise NonFiniteLossError(
            f"non-finite loss in epoch {epoch + 1} on another rank; "
            "the checkpoint of the last completed epoch is kept"
        )
    return result


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


def _check_model(dist: distributed.DistContext, ensemble: Ensemble, step: int, epoch: int) -> None:
    """After an optimizer step: every parameter and BatchNorm buffer finite on every rank (all
    ranks stop together), else NonFiniteModelError (the last completed epoch's files are kept)."""
    if not dist.all_true(first_non_finite(ensemble) is None):
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
