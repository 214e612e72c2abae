"""``ncen inspect``: what the defenses act on (input-gradient diversity, member agreement)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ncen_cli.atomic import atomic_write_json
from ncen_cli.cli import common
from ncen_cli.cli import options as opt
from ncen_cli.cli.reporting import Reporter

if TYPE_CHECKING:  # torch-backed: imported when the command runs (usage errors stay instant)
    from ncen_cli.diagnostics import Diagnostics


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def pairs_table(result: Diagnostics, title: str) -> Table:
    table = Table(title=title)
    for column in (
        "pair",
        "grad cosine mean",
        "quartiles (25/50/75 %)",
        "disagreement",
        "error correlation",
    ):
        table.add_column(column, justify="left" if column == "pair" else "right")
    for p in result.pairs:
        table.add_row(
            f"{p.i}–{p.j}",
            f"{p.grad_cosine_mean:.4f}",
            " / ".join(f"{q:.3f}" for q in p.grad_cosine_quartiles),
            f"{p.disagreement:.4f}",
            _number(p.error_correlation),
        )
    return table


def summary_table(result: Diagnostics) -> Table:
    table = Table(
        title="members and regularizer terms (unweighted, mean over "
        f"{result.batches} batches of {result.batch_size})"
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for i, (name, acc) in enumerate(zip(result.members, result.member_accuracy, strict=True)):
        table.add_row(f"member {i} ({name}) accuracy", f"{acc:.4f}")
    table.add_row("ensemble accuracy", f"{result.ensemble_accuracy:.4f}")
    table.add_row(
        "gradient-norm dispersion (std/mean)", f"{result.norm_dispersion:.4f}", end_section=True
    )
    for key, value in result.terms.items():
        table.add_row(key, f"{value:.6g}")
    return table


@common.command("inspect")
def inspect_command(
    checkpoint: opt.Checkpoint,
    test_limit: opt.TestLimit = None,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Images per batch; the regularizer terms are computed per batch, as in training."
        ),
    ] = 64,
    seed: Annotated[int, typer.Option(help="Seeds the subset of test images.")] = 0,
    out: opt.ResultsFile = None,
    *,
    data: opt.CheckpointData,
    output: opt.Output,
) -> None:
    """Measure input-gradient diversity and member agreement of a checkpoint on test data."""
    common.require_positive(batch_size, "--batch-size")
    common.require_positive(test_limit, "--test-limit")
    common.check_suffix(out, ".json")
    from ncen_cli.checkpoint import load_ensemble
    from ncen_cli.device import Runtime
    from ncen_cli.diagnostics import gradient_diversity

    common.claim_output(out, output.overwrite)
    _, arrays = common.checkpoint_test_data(checkpoint, data, test_limit, seed)
    runtime = Runtime.create(device=data.device, seed=seed, threads=data.threads)
    ensemble = load_ensemble(checkpoint, device=runtime.device)
    started = time.perf_counter()
    with (
        runtime.applied(),
        Reporter.for_output(output) as reporter,
    ):
        task = reporter.start("inspect (images)", total=len(arrays.test_x))
        result = gradient_diversity(
            ensemble,
            arrays.test_x,
            arrays.test_y,
            batch_size=batch_size,
            device=runtime.device,
            progress=lambda done, total: reporter.update(task, done, total),
        )
        reporter.stop(task)
    seconds = time.perf_counter() - started
    payload = {
        **result.to_json(),
        "checkpoint": str(checkpoint),
        "dataset": arrays.name,
        "combine": ensemble.combine,
        "device": str(runtime.device),
        "seed": seed,
        "seconds": seconds,
    }
    if out is not None:
        atomic_write_json(out, payload)
    if output.json_output:
        common.print_json(payload)
        return
    console = common.out_console()
    console.print(
        pairs_table(
            result,
            f"{checkpoint.name}: {arrays.name}, n={result.n}, eval "
            f"mode, {seconds:.0f} s on {runtime.device}",
        )
    )
    console.print(summary_table(result))
