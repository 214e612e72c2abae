"""``ncen sweep``: the lambda_cos x lambda_norm grid (paper Fig. 4), resumable, with a heat map."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ncen_cli.cli import common
from ncen_cli.cli import options as opt
from ncen_cli.cli.config import SettingsFile, command_settings, format_settings
from ncen_cli.cli.reporting import Reporter
from ncen_cli.cli.train import build_config
from ncen_cli.paths import new_run_folder
from ncen_cli.registry import DATASETS

if TYPE_CHECKING:  # torch-backed: imported when the sweep runs (a usage error stays instant)
    from ncen_cli.sweep import Cell, CellResult, SweepResult
    from ncen_cli.training import EpochRecord


@common.command("sweep")
def sweep_command(
    ctx: typer.Context,
    lambda_cos: Annotated[
        str, typer.Option(help="Comma list of lambda_cos values (grid rows).")
    ] = "0,0.02,0.04,0.06",
    lambda_norm: Annotated[
        str, typer.Option(help="Comma list of lambda_norm values (grid columns).")
    ] = "0,0.02,0.04",
    members: opt.Members = "ensemble1",
    attacks: Annotated[
        str | None,
        typer.Option(
            "--attacks",
            help="Scoring attacks, comma list (default: the paper's fgsm,mifgsm,pgd,bim).",
        ),
    ] = None,
    eps: Annotated[
        str | None,
        typer.Option(
            "--eps", help="Scoring radii, comma list (default: each attack's smaller paper radius)."
        ),
    ] = None,
    attack_limit: Annotated[
        int | None,
        typer.Option(help="Score each cell by attacking the first N test images (default: all)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Sweep folder (re-run with the same --out to resume); default a new run folder."
        ),
    ] = None,
    figure: opt.Figure = None,
    dpi: opt.Dpi = 110,
    *,
    training: opt.Training,
    settings_file: SettingsFile,
    output: opt.Output,
) -> None:
    """Train and score one NCEn ensemble per (lambda_cos, lambda_norm) cell; resumable."""
    if settings_file.print_config:
        typer.echo(format_settings(command_settings(ctx)), nl=False)  # never wrapped
        return
    if figure is not None:
        from ncen_cli.plots import check_figure

        check_figure(figure, dpi)  # fail before hours of training, not after
    from ncen_cli import distributed
    from ncen_cli.evaluation import runs_for
    from ncen_cli.sweep import run_sweep

    config = build_config(defense="ncen", members=members, **dataclasses.asdict(training))
    cos_values = common.parse_float_list(lambda_cos, "--lambda-cos")
    norm_values = common.parse_float_list(lambda_norm, "--lambda-norm")
    attack_names = common.parse_name_list(attacks, "--attacks") if attacks is not None else None
    eps_values = common.parse_eps(eps)
    runs = None
    if attack_names is not None or eps_values is not None:
        runs = runs_for(
            DATASETS.get(config.dataset).family,
            "score",
            attacks=attack_names,
            eps=eps_values,
            combine=config.combine,
        )
    common.claim_output(figure, output.overwrite, "--figure")
    main = distributed.is_main_process()
    with Reporter.for_output(output, main=main) as reporter:
        if out is None:
            out = new_run_folder(f"sweep-{config.dataset}")
            reporter.info(f"sweep folder {out} (to resume, re-run with --out {out})")
        result = run_sweep(
            config,
            cos_values,
            norm_values,
            out,
            score_runs=runs,
            eval_limit=attack_limit,
            dist=distributed.initialize(config.device),
            **_progress_callbacks(reporter),
        )
    if not main:
        return
    if figure is not None:
        from ncen_cli.plots import sweep_heatmap

        sweep_heatmap(result, figure, dpi=dpi)
        if not output.quiet:
            sys.stderr.write(f"wrote {figure}\n")
    if output.json_output:
        common.print_json(result.to_json())
    else:
        common.out_console().print(render_grid(result))


def _progress_callbacks(reporter: Reporter) -> dict[str, Any]:
    """run_sweep's callbacks: a task per cell (its epochs' batches, then its scoring attacks)
    and one log line per epoch and per finished cell."""
    task = reporter.start("sweep")
    current = ["sweep"]

    def on_cell_start(cell: Cell, position: int, total: int) -> None:
        current[0] = f"cell {position}/{total} {cell.id}"
        reporter.restart(task, current[0])

    def on_batch(done: int, total: int) -> None:
        reporter.update(task, done, total)

    def on_eval(label: str, done: int, total: int) -> None:
        reporter.update(task, done, total, label=f"{current[0]}: {label}")

    def on_epoch(record: EpochRecord) -> None:
        reporter.info(
            f"  {current[0]} epoch {record.epoch}: ce={record.ce:.4f} "
            f"test_acc={record.test_accuracy:.4f} {record.images_per_s:.0f} img/s"
        )

    def on_cell_done(result: CellResult) -> None:
        if result.skipped:
            reporter.info(f"cell {result.cell.id}: finished earlier, skipped")
        elif result.error:
            reporter.warning(f"cell {result.cell.id}: failed ({result.error})")
        else:
            reporter.info(
                f"cell {result.cell.id}: ACE {result.clean_accuracy:.4f} mean AAE "
                f"{result.mean_adversarial_accuracy:.4f} score {result.score:.4f} "
                f"({result.seconds:.1f} s)"
            )
        if result.failed_checks:
            reporter.warning(
                f"cell {result.cell.id}: evaluation checks failed: "
                f"{', '.join(result.failed_checks)}"
            )

    return {
        "on_cell_start": on_cell_start,
        "on_cell_done": on_cell_done,
        "on_epoch": on_epoch,
        "on_batch": on_batch,
        "on_eval": on_eval,
    }


def _colour(score: float, low: float, high: float) -> str:
    """The score's place between the grid's ``low`` and ``high`` as a viridis colour (violet ->
    teal -> yellow: readable with red-green colour blindness); lifted off the darkest end so the
    text stays readable on a dark terminal."""
    t = 0.5 if high <= low else (score - low) / (high - low)
    return common.heat_colour(0.2 + 0.8 * t)


def render_grid(result: SweepResult) -> Table:
    """Rows lambda_cos, columns lambda_norm; each cell ACE x mean AAE, coloured, best starred."""
    from ncen_cli.sweep import format_value

    by_pos = {(c.cell.lambda_cos, c.cell.lambda_norm): c for c in result.cells}
    scores = [c.score for c in result.cells if c.score is not None]
    low, high = (min(scores), max(scores)) if scores else (0.0, 0.0)
    best = result.best
    table = Table(
        title="score = ACE x mean AAE (rows lambda_cos, columns lambda_norm)",
        caption=_caption(result),
    )
    table.add_column("cos \\ norm", justify="right", style="bold")
    for norm in result.lambda_norm:
        table.add_column(format_value(norm), justify="center")
    for cos in result.lambda_cos:
        row: list[Text | str] = [format_value(cos)]
        for norm in result.lambda_norm:
            cell = by_pos.get((cos, norm))
            if cell is None:
                row.append("")
            elif cell.score is None:
                row.append(Text("failed", style="dim"))
            else:
                star = " *" if best is not None and cell is best else ""
                text = Text(
                    f"{cell.score:.4f}{star}\n",
                    style=_colour(cell.score, low, high) + (" bold reverse" if star else ""),
                )
                text.append(
                    f"{cell.clean_accuracy:.3f} x {cell.mean_adversarial_accuracy:.3f}", style="dim"
                )
                row.append(text)
        table.add_row(*row)
    return table


def _caption(result: SweepResult) -> str:
    from ncen_cli.sweep import format_value

    attacks = ", ".join(f"{s['attack']}@{s['eps']:g}" for s in result.attack_settings)
    best = result.best
    best_text = (
        f"best (*): lambda_cos {format_value(best.cell.lambda_cos)}, lambda_norm "
        f"{format_value(best.cell.lambda_norm)}, score {best.score:.4f}"
        if best
        else "no cell scored"
    )
    return f"{best_text}\ncell: ACE x mean AAE over {attacks}\nfolder: {result.out_dir}"
