"""``ncen transfer``: the member-to-member transferability matrix of an ensemble checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.style import Style
from rich.table import Table
from rich.text import Text

from ncen_cli.atomic import atomic_write_json
from ncen_cli.cli import common
from ncen_cli.cli import options as opt
from ncen_cli.cli.reporting import Reporter
from ncen_cli.errors import UsageError

if TYPE_CHECKING:  # torch-backed: imported when the command runs (usage errors stay instant)
    from ncen_cli.transfer import TransferResult

DEFAULT_ATTACK = "pgd"
DEFAULT_EPS = 0.05  # the paper's; = ncen_cli.transfer.DEFAULT_EPS (test_cli_vocabulary checks)


def heat_table(result: TransferResult) -> Table:
    """A Rich table of the matrix, each cell's background coloured by its accuracy (viridis:
    dark = low, yellow = high; readable with red-green colour blindness)."""
    eps = result.params.get("eps")
    table = Table(
        title=f"{result.attack} transfer, eps={eps:g}, n={result.n} (accuracy; row = crafted on)",
        title_justify="left",
    )
    table.add_column("crafted on \\ evaluated on", style="bold")
    for label in [*result.members, "ensemble"]:
        table.add_column(label, justify="center")
    for i, (label, row) in enumerate(zip(result.members, result.matrix, strict=True)):
        cells = []
        for j, value in enumerate(row):
            style = Style(
                bgcolor=common.heat_colour(value),
                color="black" if value > 0.55 else "white",
                bold=i == j,
                underline=i == j,
            )
            cells.append(Text(f" {value:.3f} ", style=style))
        table.add_row(label, *cells)
    table.add_section()
    clean = [Text(f"{v:.3f}", style="dim") for v in result.clean]
    table.add_row(Text("clean", style="dim"), *clean)
    return table


def summary_line(result: TransferResult) -> str:
    s = result.summary
    return (
        f"{result.attack}: mean diagonal (white-box) {s['mean_diagonal']:.3f}, mean off-diagonal "
        f"(transfer) {s['mean_off_diagonal']:.3f}, gap {s['gap']:+.3f}; "
        f"ensemble column mean {s['ensemble_mean']:.3f}"
    )


def figure_title(meta: dict[str, Any], dataset: str) -> str:
    """``resnet20, resnet26, resnet32 | ncen | fashionmnist`` for the heat map."""
    members = ", ".join(str(m) for m in meta.get("members", []))
    return f"{members} | {meta.get('defense', 'unknown defense')} | {dataset}"


@common.command("transfer")
def transfer_command(
    checkpoint: opt.Checkpoint,
    test_limit: opt.TestLimit = None,
    only_correct: Annotated[
        bool,
        typer.Option(
            "--only-correct", help="Only test images every member classifies correctly (as DVERGE)."
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images crafted at once.")] = 500,
    seed: Annotated[int, typer.Option(help="Seeds the --test-limit subset and random starts.")] = 0,
    protocol: Annotated[
        str | None,
        typer.Option(
            help="authors: craft as the authors' code does (CE on each member's softmax output, "
            "only examples every member classifies correctly, advertorch's MI-FGSM "
            "normalisation); not an honest evaluation."
        ),
    ] = None,
    out: opt.ResultsFile = None,
    figure: opt.Figure = None,
    dpi: opt.Dpi = 110,
    *,
    choice: opt.AttackChoice,
    data: opt.CheckpointData,
    output: opt.Output,
) -> None:
    """Craft adversarial examples on each member; evaluate them on every member and the ensemble.

    One matrix per attack in --attacks and radius in --eps (default pgd at the paper's 0.05).
    """
    selection = common.select_attacks(choice)
    names = selection.names or [DEFAULT_ATTACK]
    eps_values = selection.eps or [DEFAULT_EPS]
    common.require_positive(test_limit, "--test-limit")
    common.require_positive(batch_size, "--batch-size")
    _check_outputs(protocol, out, figure, dpi)
    common.claim_output(out, output.overwrite)
    common.claim_output(figure, output.overwrite, "--figure")
    results, meta, dataset_name, is_main = _run(
        checkpoint,
        names,
        eps_values,
        selection=selection,
        authors=protocol == "authors",
        images={
            "test_limit": test_limit,
            "only_correct": only_correct,
            "batch_size": batch_size,
            "seed": seed,
        },
        data=data,
        output=output,
    )
    if not is_main:
        return
    payloads = [r.to_json() for r in results]
    payload: Any = payloads[0] if len(payloads) == 1 else payloads
    if out is not None:
        atomic_write_json(out, payload)
    if figure is not None:
        from ncen_cli.plots import transfer_heatmap

        transfer_heatmap(results, figure, dpi=dpi, title=figure_title(meta, dataset_name))
        if not output.quiet:
            common.err_console().print(f"wrote {figure}")
    if output.json_output:
        common.print_json(payload)
        return
    console = common.out_console()
    for result in results:
        console.print(heat_table(result))
        console.print(summary_line(result))


def _check_outputs(protocol: str | None, out: Path | None, figure: Path | None, dpi: int) -> None:
    """``--protocol``, ``--out`` and ``--figure``/``--dpi``, before any slow work."""
    if protocol not in (None, "authors"):
        raise UsageError(f"--protocol must be authors (or omitted), got '{protocol}'")
    common.check_suffix(out, ".json")
    if figure is not None:
        from ncen_cli.plots import check_figure

        check_figure(figure, dpi)


def _run(
    checkpoint: Path,
    names: list[str],
    eps_values: list[float],
    *,
    selection: common.AttackSelection,
    authors: bool,
    images: dict[str, Any],
    data: opt.CheckpointData,
    output: opt.Output,
) -> tuple[list[TransferResult], dict[str, Any], str, bool]:
    """Load the checkpoint and its test data, then one matrix per (attack, eps) with ``selection``'s
    settings (``authors``: as the authors' code crafts); ``images`` holds the command's test-image
    options by name; ``output`` says how to report.
    Returns (results, checkpoint metadata, dataset name, whether this is rank 0)."""
    from ncen_cli.attacks.base import with_attack_options
    from ncen_cli.authors_protocol import ADVERTORCH_L1_FLOOR
    from ncen_cli.checkpoint import load_ensemble
    from ncen_cli.device import Runtime
    from ncen_cli.distributed import initialize
    from ncen_cli.transfer import run_settings, transfer_matrix

    runs = [(name, eps) for name in names for eps in eps_values]  # a repeated name: one each
    # every setting (unknown attacks, -o options) is checked before the data is loaded
    settings_list = with_attack_options(
        [
            (
                name,
                run_settings(name, eps, **selection.overrides),
            )
            for name, eps in runs
        ],
        selection.attack_options,
    )
    seed = images["seed"]
    meta, arrays = common.checkpoint_test_data(checkpoint, data, images["test_limit"], seed)
    dist = initialize(data.device)
    runtime = Runtime.create(device=data.device, seed=seed, threads=data.threads)
    ensemble = load_ensemble(checkpoint, device=runtime.device)
    results: list[TransferResult] = []
    with runtime.applied(), Reporter.for_output(output, main=dist.is_main) as reporter:
        for (name, eps), settings in zip(runs, settings_list, strict=True):
            if authors and name == "mifgsm":
                settings = replace(
                    settings, extra={**settings.extra, "momentum_l1_floor": ADVERTORCH_L1_FLOOR}
                )
            task = reporter.start(f"{name} eps={eps:g}: crafting on each member (batches)")

            def on_step(done: int, total: int, task: Any = task) -> None:
                reporter.update(task, done, total)

            results.append(
                transfer_matrix(
                    ensemble,
                    arrays.test_x,
                    arrays.test_y,
                    attack=name,
                    settings=settings,
                    batch_size=images["batch_size"],
                    device=runtime.device,
                    seed=seed,
                    only_correct=images["only_correct"] or authors,
                    progress=on_step,
                    member_softmax=authors,
                    dist=dist,
                )
            )
            reporter.stop(task)
    return results, meta, arrays.name, dist.is_main
