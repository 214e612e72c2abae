"""``ncen inspect``: what the defenses act on (input-gradient diversity, member agreement)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ncen_cli.cli.common import (
    app,
    checkpoint_test_data,
    err_console,
    handle_errors,
    out_console,
    print_json,
    require_positive,
)
from ncen_cli.diagnostics import Diagnostics


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def pairs_table(result: Diagnostics, title: str) -> Table:
    table = Table(title=title)
    for column in ("pair", "grad cosine mean", "quartiles (25/50/75 %)", "disagreement",
                   "error correlation"):
        table.add_column(column, justify="left" if column == "pair" else "right")
    for p in result.pairs:
        table.add_row(f"{p.i}–{p.j}", f"{p.grad_cosine_mean:.4f}",
                      " / ".join(f"{q:.3f}" for q in p.grad_cosine_quartiles),
                      f"{p.disagreement:.4f}", _number(p.error_correlation))
    return table


def summary_table(result: Diagnostics) -> Table:
    table = Table(title="members and regularizer terms (unweighted, mean over "
                        f"{result.batches} batches of {result.batch_size})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for i, (name, acc) in enumerate(zip(result.members, result.member_accuracy, strict=True)):
        table.add_row(f"member {i} ({name}) accuracy", f"{acc:.4f}")
    table.add_row("ensemble accuracy", f"{result.ensemble_accuracy:.4f}")
    table.add_row("gradient-norm dispersion (std/mean)", f"{result.norm_dispersion:.4f}",
                  end_section=True)
    for key, value in result.terms.items():
        table.add_row(key, f"{value:.6g}")
    return table


@app.command("inspect")
@handle_errors
def inspect_command(
    checkpoint: Annotated[Path, typer.Argument(help="An ensemble checkpoint (.safetensors).")],
    limit: Annotated[int | None, typer.Option(help="Seeded subset of N test images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch; the regularizer terms are "
                                            "computed per batch, as in training.")] = 64,
    dataset: Annotated[str | None, typer.Option(help="Default: the checkpoint's dataset.")] = None,
    data_dir: Annotated[Path | None, typer.Option(envvar="NCEN_DATA_DIR", help="Read the dataset "
                                                  "from this folder (default: the checkpoint's "
                                                  "recorded one).")] = None,
    download: Annotated[bool, typer.Option(help="Download a missing dataset into the "
                                           "cache.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seeds the subset of test images.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Measure input-gradient diversity and member agreement of a checkpoint on test data."""
    from ncen_cli.checkpoint import load_ensemble
    from ncen_cli.device import Runtime
    from ncen_cli.diagnostics import gradient_diversity

    require_positive(batch_size, "--batch-size")
    _, arrays = checkpoint_test_data(checkpoint, dataset, data_dir, download, limit, seed)
    runtime = Runtime.create(device=device, seed=seed)
    ensemble = load_ensemble(checkpoint, device=runtime.device)
    started = time.perf_counter()
    console = err_console()
    with runtime.applied(), Progress(TextColumn("inspect"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"),
                                     TimeElapsedColumn(), console=console, transient=True,
                                     disable=not console.is_terminal) as bars:
        task = bars.add_task("inspect", total=len(arrays.test_x))
        result = gradient_diversity(
            ensemble, arrays.test_x, arrays.test_y, batch_size=batch_size, device=runtime.device,
            progress=lambda done, total: bars.update(task, completed=done),
        )
    seconds = time.perf_counter() - started
    payload = {**result.to_json(), "checkpoint": str(checkpoint), "dataset": arrays.name,
               "combine": ensemble.combine, "device": str(runtime.device), "seed": seed,
               "seconds": seconds}
    if json_output:
        print_json(payload)
        return
    console = out_console()
    console.print(pairs_table(result, f"{checkpoint.name}: {arrays.name}, n={result.n}, eval "
                                      f"mode, {seconds:.0f} s on {runtime.device}"))
    console.print(summary_table(result))
