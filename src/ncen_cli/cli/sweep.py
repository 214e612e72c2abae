"""``ncen sweep``: the lambda_cos x lambda_norm grid (paper Fig. 4), resumable, with a heat map."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ncen_cli.cli.common import (
    app,
    check_eps,
    claim_output,
    handle_errors,
    heat_colour,
    out_console,
    parse_float_list,
    parse_name_list,
    print_json,
)
from ncen_cli.cli.config import ConfigFile, PrintConfig, command_settings, format_settings
from ncen_cli.cli.options import (
    DataDir,
    Dataset,
    Device,
    Download,
    Dpi,
    Figure,
    Json,
    NoProgress,
    Overwrite,
    Quiet,
    TestLimit,
    Threads,
    Verbose,
)
from ncen_cli.cli.reporting import Reporter
from ncen_cli.cli.train import (
    DEFAULT_DOUBLE_BACKPROP,
    DEFAULT_FD_SCALE,
    Activation,
    Augment,
    Combine,
    Deterministic,
    DoubleBackprop,
    Epochs,
    FdScale,
    Members,
    MemberThreads,
    NcenForm,
    Noise,
    NoiseEps,
    Param,
    Precision,
    TrainLimit,
    build_config,
)
from ncen_cli.paths import runs_dir
from ncen_cli.registry import DATASETS

if TYPE_CHECKING:  # torch-backed: imported when the sweep runs (a usage error stays instant)
    from ncen_cli.sweep import Cell, CellResult, SweepResult
    from ncen_cli.training import EpochRecord


@app.command("sweep")
@handle_errors
def sweep_command(
    ctx: typer.Context,
    lambda_cos: Annotated[
        str, typer.Option(help="Comma list of lambda_cos values (grid rows).")
    ] = "0,0.02,0.04,0.06",
    lambda_norm: Annotated[
        str, typer.Option(help="Comma list of lambda_norm values (grid columns).")
    ] = "0,0.02,0.04",
    members: Members = "ensemble1",
    dataset: Dataset = "fashionmnist",
    data_dir: DataDir = None,
    ncen_form: NcenForm = "paper",
    param: Param = None,
    activation: Activation = "relu",
    combine: Combine = "mean-prob",
    epochs: Epochs = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    augment: Augment = True,
    noise: Noise = True,
    noise_eps: NoiseEps = None,
    train_limit: TrainLimit = None,
    test_limit: TestLimit = None,
    seed: int = 0,
    device: Device = "auto",
    precision: Precision = "fp32",
    threads: Threads = None,
    member_threads: MemberThreads = None,
    deterministic: Deterministic = False,
    double_backprop: DoubleBackprop = DEFAULT_DOUBLE_BACKPROP,
    fd_scale: FdScale = DEFAULT_FD_SCALE,
    download: Download = True,
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
    figure: Figure = None,
    dpi: Dpi = 110,
    overwrite: Overwrite = False,
    json_output: Json = False,
    config_file: ConfigFile = None,
    print_config: PrintConfig = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    no_progress: NoProgress = False,
) -> None:
    """Train and score one NCEn ensemble per (lambda_cos, lambda_norm) cell; resumable."""
    if print_config:
        typer.echo(format_settings(command_settings(ctx)), nl=False)  # never wrapped
        return
    if figure is not None:
        from ncen_cli.plots import check_figure

        check_figure(figure, dpi)  # fail before hours of training, not after
    from ncen_cli import distributed
    from ncen_cli.evaluation import runs_for
    from ncen_cli.sweep import run_sweep

    config = build_config(
        members=members,
        dataset=dataset,
        data_dir=data_dir,
        defense="ncen",
        ncen_form=ncen_form,
        param=param,
        activation=activation,
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
    cos_values = parse_float_list(lambda_cos, "--lambda-cos")
    norm_values = parse_float_list(lambda_norm, "--lambda-norm")
    attack_names = parse_name_list(attacks, "--attacks") if attacks is not None else None
    eps_values = parse_float_list(eps, "--eps") if eps is not None else None
    if eps_values is not None:
        check_eps(eps_values)
    runs = None
    if attack_names is not None or eps_values is not None:
        runs = runs_for(
            DATASETS.get(config.dataset).family,
            "score",
            attacks=attack_names,
            eps=eps_values,
            combine=config.combine,
        )
    claim_output(figure, overwrite, "--figure")
    main = distributed.is_main_process()
    with Reporter(quiet=quiet, no_progress=no_progress, verbose=verbose, main=main) as reporter:
        if out is None:
            out = _new_sweep_dir(config.dataset)
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
        if not quiet:
            sys.stderr.write(f"wrote {figure}\n")
    if json_output:
        print_json(result.to_json())
    else:
        out_console().print(render_grid(result))


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


def _new_sweep_dir(dataset: str) -> Path:
    """A fresh ``<runs>/<timestamp>-sweep-<dataset>`` folder name."""
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = runs_dir() / f"{stamp}-sweep-{dataset}"
    n = 1
    while folder.exists():
        n += 1
        folder = runs_dir() / f"{stamp}-sweep-{dataset}-{n}"
    return folder


def _colour(score: float, low: float, high: float) -> str:
    """The score's place between the grid's ``low`` and ``high`` as a viridis colour (violet ->
    teal -> yellow: readable with red-green colour blindness); lifted off the darkest end so the
    text stays readable on a dark terminal."""
    t = 0.5 if high <= low else (score - low) / (high - low)
    return heat_colour(0.2 + 0.8 * t)


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
