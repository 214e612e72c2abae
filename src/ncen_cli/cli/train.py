"""``ncen train``: train an ensemble with a defense and write a safetensors checkpoint."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ncen_cli.cli import common
from ncen_cli.cli import options as opt
from ncen_cli.cli.config import SettingsFile, format_settings, options_from_record
from ncen_cli.cli.reporting import Reporter
from ncen_cli.errors import CheckpointError, NcenError, UsageError
from ncen_cli.paths import new_run_path

if TYPE_CHECKING:
    from ncen_cli.training import EpochRecord, TrainConfig

# Torch-backed modules (distributed, ensemble, training) are imported inside the functions, so
# that a usage error of `ncen train` or `ncen sweep` answers without loading torch.


def build_config(
    *,
    members: str,
    dataset: str,
    data_dir: Path | str | None,
    defense: str = "ncen",
    ncen_form: str = "paper",
    lambda_cos: float | None = None,
    lambda_norm: float | None = None,
    lambda_gal: float | None = None,
    lambda_div: float | None = None,
    lambda_eq: float | None = None,
    param: list[str] | None = None,
    activation: str,
    combine: str,
    epochs: int | None,
    batch_size: int,
    lr: float,
    augment: bool,
    noise: bool,
    noise_eps: float | None,
    train_limit: int | None,
    test_limit: int | None,
    seed: int,
    device: str,
    precision: str,
    threads: int | None,
    member_threads: int | None,
    deterministic: bool,
    double_backprop: str,
    fd_scale: float,
    download: bool,
) -> TrainConfig:
    """Turn command-line options into a validated :class:`TrainConfig`."""
    from ncen_cli.ensemble import parse_members
    from ncen_cli.training import TrainConfig

    if ncen_form not in ("paper", "official"):
        raise UsageError(f"--ncen-form must be paper or official, got '{ncen_form}'")
    if defense == "ncen" and ncen_form == "official":
        defense = "ncen-official"
    hyper = common.parse_key_values(param, "--param")
    for name, value in (
        ("lambda_cos", lambda_cos),
        ("lambda_norm", lambda_norm),
        ("lambda_gal", lambda_gal),
        ("lambda_div", lambda_div),
        ("lambda_eq", lambda_eq),
    ):
        if value is not None:
            hyper[name] = value
    config = TrainConfig(
        members=parse_members(members),
        dataset=dataset.lower(),
        data_dir=str(data_dir) if data_dir else None,
        defense=defense.lower(),
        hyperparameters=hyper,
        activation=activation.lower(),
        combine=combine,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        augment=augment,
        noise=noise,
        noise_eps=noise_eps,
        train_limit=train_limit,
        test_limit=test_limit,
        seed=seed,
        device=device,
        precision=precision,
        threads=threads,
        member_threads=member_threads,
        deterministic=deterministic,
        double_backprop=double_backprop,
        fd_scale=fd_scale,
        download=download,
    )
    config.validate()
    return config


# build_config's parameters: the options of `ncen train` that make its TrainConfig
CONFIG_OPTIONS = tuple(inspect.signature(build_config).parameters)
# the options among them that say where and how a run computes: free to add on --resume
RUNTIME_OPTIONS = ("data_dir", "device", "threads", "member_threads", "download")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given (command line, environment or --config file)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _resume_target(run: Path | None, out: Path | None) -> Path:
    """The run that ``--resume [RUN]`` continues: RUN, else ``--out`` (the older spelling)."""
    if run is not None and out is not None and run != out:
        raise UsageError(f"--resume {run} and --out {out} name two runs; give one")
    if run is not None:
        return run
    if out is None:
        raise UsageError("--resume needs the interrupted run's checkpoint: ncen train --resume RUN")
    return out


def resumed_config(
    out: Path, options: dict[str, Any], given: set[str]
) -> tuple[dict[str, Any], TrainConfig]:
    """The settings recorded by the run at ``out`` with the ``given`` options on top.

    Runtime options (:data:`RUNTIME_OPTIONS`) are free; a recorded setting that a given option
    changes is a UsageError naming every such field (``field: old -> new``). Returns the options
    (as ``--print-config`` shows them) and the TrainConfig that continues the run."""
    from ncen_cli.resume_state import config_changes, recorded_run_config, resume_path

    saved = recorded_run_config(out)
    source = resume_path(out) if resume_path(out).exists() else out
    try:  # the record alone must make a valid config: if not, the file is at fault, not the user
        recorded = options_from_record(saved)
        build_config(**{**options, **recorded})
    except (NcenError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"the settings recorded in {source} are invalid ({why}); delete it to restart"
        ) from None
    merged = {**options, **recorded}
    for name in given:
        merged[name] = options[name]
    if "param" in given:  # --param adds to the recorded hyperparameters (later ones win)
        merged["param"] = [*recorded["param"], *(options["param"] or [])]
    if "data_dir" not in given and saved.get("data_dir"):
        merged["data_dir"] = Path(saved["data_dir"])
    config = build_config(**merged)
    fixed = ("lr_step_epochs", "lr_gamma", "lr_min", "eval_batch_size")  # not options: recorded
    config = dataclasses.replace(config, **{k: saved[k] for k in fixed if k in saved})
    config.validate()
    new = {**dataclasses.asdict(config), "world_size": saved.get("world_size", 1)}
    changes = config_changes(saved, new)
    if changes:
        raise UsageError(
            f"--resume {out}: the options change settings recorded in {source} "
            f"({'; '.join(changes)}); only "
            f"runtime options ({', '.join('--' + o.replace('_', '-') for o in RUNTIME_OPTIONS)}) "
            "may be added"
        )
    return merged, config


@common.command("train")
def train_command(
    ctx: typer.Context,
    members: opt.Members = "resnet20,resnet26,resnet32",
    defense: Annotated[
        str, typer.Option(help="baseline, ncen, gal, gpmr, or a plugin's.")
    ] = "ncen",
    lambda_cos: Annotated[
        float | None,
        typer.Option(help="NCEn direction weight (paper: 0.02 FashionMNIST, 0.06 CIFAR-10)."),
    ] = None,
    lambda_norm: Annotated[
        float | None, typer.Option(help="NCEn magnitude weight (paper: 0.02 / 0.04).")
    ] = None,
    lambda_gal: Annotated[float | None, typer.Option(help="GAL weight (paper: 0.5).")] = None,
    lambda_div: Annotated[
        float | None, typer.Option(help="GPMR phase weight (0.1 / 0.04).")
    ] = None,
    lambda_eq: Annotated[float | None, typer.Option(help="GPMR magnitude weight (10).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoint path (.safetensors); default a new run folder (see `ncen env`)."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the interrupted run RUN (or --out) with its recorded settings; only "
            "runtime options (device, threads, data folder, download) may be added.",
        ),
    ] = False,
    run: Annotated[
        Path | None,
        typer.Argument(
            metavar="[RUN]",
            help="With --resume: the interrupted run's checkpoint.",
            show_default=False,
        ),
    ] = None,
    *,
    training: opt.Training,
    settings_file: SettingsFile,
    output: opt.Output,
) -> None:
    """Train an ensemble and write it to a safetensors checkpoint."""
    # by name, as --resume and --print-config need them: members, defense, the lambdas and
    # the training group's fields
    options = {name: ctx.params[name] for name in CONFIG_OPTIONS}
    if run is not None and not resume:
        raise UsageError(f"a run path ({run}) is only taken with --resume: ncen train --resume RUN")
    if resume:
        out = _resume_target(run, out)
        given = {name for name in CONFIG_OPTIONS if _given(ctx, name)}
        options, config = resumed_config(out, options, given)
    else:
        config = build_config(**options)
    if settings_file.print_config:
        typer.echo(format_settings(options), nl=False)  # never wrapped, unlike a Rich console
        return
    out = out or new_run_path(f"{config.defense}-{config.dataset}")
    from ncen_cli import distributed
    from ncen_cli.training import train

    with Reporter.for_output(output, main=distributed.is_main_process()) as reporter:
        task = reporter.start("epoch 1 (batches)")
        planned = [0]  # epochs in all, known once train() has resolved the dataset's default

        def on_start(done: int, epochs: int) -> None:
            planned[0] = epochs
            reporter.restart(task, f"epoch {done + 1}/{epochs} (batches)")

        def on_batch(done: int, total: int) -> None:
            reporter.update(task, done, total)

        def on_epoch(record: EpochRecord) -> None:
            terms = " ".join(f"{k}={v:.4f}" for k, v in record.terms.items())
            reporter.info(
                f"epoch {record.epoch}/{planned[0]}: lr={record.lr:.0e} ce={record.ce:.4f} "
                f"{terms} test_acc={record.test_accuracy:.4f} {record.images_per_s:.0f} img/s"
            )
            if record.epoch < planned[0]:
                reporter.restart(task, f"epoch {record.epoch + 1}/{planned[0]} (batches)")

        result = train(
            config,
            out,
            resume=resume,
            on_epoch=on_epoch,
            on_batch=on_batch,
            overwrite=output.overwrite,
            on_start=on_start,
            dist=distributed.initialize(config.device),
        )
        reporter.stop(task)
    if not distributed.is_main_process():  # under torchrun, rank 0 alone reports
        return

    summary = {
        "checkpoint": str(result.path),
        "members": config.members,
        "dataset": result.metadata["dataset"],
        "defense": result.metadata["defense"],
        "hyperparameters": result.metadata["hyperparameters"],
        "epochs": result.metadata["epochs_done"],
        "test_accuracy": result.metadata["metrics"]["test_accuracy"],
        "resumed_from_epoch": result.resumed_from_epoch,
        "seconds": sum(r.seconds for r in result.history),
    }
    if output.json_output:
        common.print_json(summary)
    else:
        common.out_console().print(
            f"wrote {summary['checkpoint']}\n{summary['defense']} on {summary['dataset']}, "
            f"members {','.join(config.members)}: {summary['epochs']} epochs, "
            f"clean test accuracy {summary['test_accuracy']:.4f}"
        )
