"""``ncen transfer``: the member-to-member transferability matrix of an ensemble checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.color import Color
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.style import Style
from rich.table import Table
from rich.text import Text

from ncen_cli.authors_protocol import ADVERTORCH_L1_FLOOR
from ncen_cli.checkpoint import load_ensemble, read_metadata
from ncen_cli.cli.common import (
    app,
    check_eps,
    claim_output,
    err_console,
    handle_errors,
    out_console,
    parse_name_list,
    print_json,
    require_positive,
)
from ncen_cli.data import load_dataset
from ncen_cli.device import resolve_device, seed_everything
from ncen_cli.distributed import context
from ncen_cli.errors import UsageError
from ncen_cli.registry import ATTACKS
from ncen_cli.transfer import DEFAULT_EPS, TransferResult, resolve_settings, transfer_matrix


def heat_color(value: float) -> Color:
    """Accuracy in [0, 1] -> a red (0) - amber (0.5) - green (1) background colour."""
    v = min(max(value, 0.0), 1.0)
    low, mid, high = (178, 34, 34), (218, 165, 32), (34, 139, 34)
    a, b, t = (low, mid, v * 2) if v < 0.5 else (mid, high, (v - 0.5) * 2)
    r, g, bl = (round(a[c] + (b[c] - a[c]) * t) for c in range(3))
    return Color.from_rgb(r, g, bl)


def heat_table(result: TransferResult) -> Table:
    """A Rich table of the matrix, each cell's background coloured by its accuracy."""
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
            style = Style(bgcolor=heat_color(value), color="white", bold=i == j, underline=i == j)
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


@app.command("transfer")
@handle_errors
def transfer_command(
    checkpoint: Annotated[Path, typer.Argument(help="Ensemble checkpoint (.safetensors).")],
    attack: Annotated[str, typer.Option(help="Attack, or a comma list for one matrix each "
                                        "(paper: pgd,mifgsm).")] = "pgd",
    eps: Annotated[float, typer.Option(help="L-inf radius in (0, 1] (paper: 0.05).")] = DEFAULT_EPS,
    steps: Annotated[int | None, typer.Option(help="Iterations (default: the attack's).")] = None,
    step_size: Annotated[float | None, typer.Option(help="Step size (default: the attack's "
                                                   "for --eps).")] = None,
    restarts: Annotated[int | None, typer.Option(help="Random restarts (worst case).")] = None,
    limit: Annotated[int | None, typer.Option(help="Seeded subset of N test images.")] = None,
    only_correct: Annotated[bool, typer.Option(help="Only test images every member classifies "
                                               "correctly (as DVERGE).")] = False,
    batch_size: Annotated[int, typer.Option(help="Images crafted at once.")] = 500,
    data_dir: Annotated[Path | None, typer.Option(envvar="NCEN_DATA_DIR", help="Read the dataset "
                                                  "from this folder.")] = None,
    download: Annotated[bool, typer.Option(help="Download a missing dataset.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seeds the --limit subset and random starts.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON (a list "
                                              "when several attacks are given).")] = False,
    png: Annotated[Path | None, typer.Option(help="Also save a heat map PNG (needs matplotlib).")]
    = None,
    protocol: Annotated[str | None, typer.Option(
        help="authors: craft as the authors' code does (CE on each member's softmax output, "
             "only examples every member classifies correctly, advertorch's MI-FGSM "
             "normalisation); not an honest evaluation.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --png.")] = False,
    attack_option: Annotated[list[str] | None, typer.Option(
        "--attack-option", "-o", metavar="NAME=VALUE",
        help="An attack's own option (repeatable), e.g. "
        "-o select=margin (mc-pgd).")] = None,
) -> None:
    """Craft adversarial examples on each member; evaluate them on every member and the ensemble."""
    check_eps([eps])
    require_positive(steps, "--steps")
    require_positive(step_size, "--step-size")
    require_positive(restarts, "--restarts")
    require_positive(limit, "--limit")
    require_positive(batch_size, "--batch-size")
    if png is not None:
        from ncen_cli.plots import require_matplotlib

        require_matplotlib()  # fail before the slow part
        if png.is_dir():
            raise UsageError(f"--png {png} is a folder; give a file name")
        claim_output(png, overwrite, "--png")
    if protocol not in (None, "authors"):
        raise UsageError(f"--protocol must be authors (or omitted), got '{protocol}'")
    authors = protocol == "authors"
    only_correct = only_correct or authors
    names = parse_name_list(attack, "--attack")
    attacks = {name: ATTACKS.get(name) for name in names}
    settings = {name: resolve_settings(obj, eps, steps, step_size, restarts)
                for name, obj in attacks.items()}
    from ncen_cli.attacks.base import with_attack_options

    settings = dict(zip(settings, with_attack_options(list(settings.items()), attack_option),
                        strict=True))
    if authors and "mifgsm" in settings:
        settings["mifgsm"] = replace(settings["mifgsm"], extra={
            **settings["mifgsm"].extra, "momentum_l1_floor": ADVERTORCH_L1_FLOOR})

    meta = read_metadata(checkpoint)
    dist = context(device)
    torch_device = resolve_device(device)
    seed_everything(seed)
    ensemble = load_ensemble(checkpoint, device=torch_device)
    arrays = load_dataset(meta.get("dataset", ""), data_dir, download=download,
                          test_limit=limit, seed=seed)
    if tuple(arrays.input_shape) != tuple(meta["input_shape"]):
        raise UsageError(f"dataset '{arrays.name}' has images {tuple(arrays.input_shape)}, the "
                         f"checkpoint expects {tuple(meta['input_shape'])}")

    console = err_console()
    results: list[TransferResult] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console, transient=True,
                  disable=not (dist.is_main and console.is_terminal)) as bars:
        for name in names:
            task = bars.add_task(f"{name} on each member", total=None)

            def on_step(done: int, total: int, task: int = task) -> None:
                bars.update(task, completed=done, total=total)

            results.append(transfer_matrix(
                ensemble, arrays.test_x, arrays.test_y, attack=name, settings=settings[name],
                batch_size=batch_size, device=torch_device, seed=seed, only_correct=only_correct,
                progress=on_step, member_softmax=authors,
            ))
    if not dist.is_main:
        return
    if png is not None:
        from ncen_cli.plots import transfer_heatmap

        transfer_heatmap(results, png)
        console.print(f"wrote {png}")
    if json_output:
        payloads = [r.to_json() for r in results]
        print_json(payloads[0] if len(payloads) == 1 else payloads)
        return
    out = out_console()
    for result in results:
        out.print(heat_table(result))
        out.print(summary_line(result))
