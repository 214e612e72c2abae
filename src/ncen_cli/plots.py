"""Plotting helpers. matplotlib is an optional extra (``pip install 'ncen[plot]'``)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ncen_cli.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.figure import Figure

    from ncen_cli.sweep import SweepResult
    from ncen_cli.transfer import TransferResult


FIGURE_FORMATS = ("png", "pdf", "svg")  # the suffix of --figure picks one


def figure_format(path: str | Path, option: str = "--figure") -> str:
    """The format a figure file's suffix asks for (``png``, ``pdf`` or ``svg``); UsageError for
    any other suffix (matplotlib would otherwise write PNG bytes under that name)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FIGURE_FORMATS:
        raise UsageError(
            f"{option} {path}: the file name must end in "
            f"{', '.join('.' + f for f in FIGURE_FORMATS[:-1])} or "
            f".{FIGURE_FORMATS[-1]}"
        )
    return suffix


def check_figure(path: str | Path, dpi: int = 110, option: str = "--figure") -> None:
    """Fail before any slow work: the suffix is a known format, ``dpi`` is in [10, 2400] and
    matplotlib is installed."""
    figure_format(path, option)
    if not 10 <= dpi <= 2400:
        raise UsageError(f"--dpi must be in [10, 2400], got {dpi}")
    if Path(path).is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    require_matplotlib(option)


def require_matplotlib(option: str = "--figure") -> ModuleType:
    """Import matplotlib.pyplot with a headless backend, or raise a one-line install hint."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            f"{option} needs matplotlib: pip install 'ncen[plot]' (or pipx inject ncen matplotlib)"
        ) from None
    return plt


def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` atomically in the format of ``path``'s suffix; closes the figure."""
    from ncen_cli.atomic import atomic_write

    plt = require_matplotlib()
    fmt = figure_format(path)
    try:
        return atomic_write(
            path,
            lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi),
        )
    finally:
        plt.close(fig)


def transfer_heatmap(
    results: Sequence[TransferResult], path: str | Path, dpi: int = 110, title: str = ""
) -> Path:
    """Save :func:`transfer_figure` to ``path`` (format from the suffix), atomically."""
    return save_figure(transfer_figure(results, title), path, dpi)


def transfer_figure(results: Sequence[TransferResult], title: str = "") -> Any:
    """Transferability matrices as a heat map, one panel per (attack, eps).

    Args:
        results: :class:`ncen_cli.transfer.TransferResult` objects (each a k x (k + 1) matrix:
            rows = member the examples were crafted on, columns = member evaluated, then the
            ensemble).
        title: the figure's title (the CLI names the members, the defense and the dataset).
    Returns:
        the matplotlib figure. Raises UsageError when matplotlib is not installed.
    """
    plt = require_matplotlib()
    k = results[0].k
    width = 1.1 + 0.95 * (k + 1)
    fig, axes = plt.subplots(
        1,
        len(results),
        figsize=(width * len(results) + 1.0, 0.8 * k + 1.9),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for ax, result in zip(axes[0], results, strict=True):
        image = ax.imshow(result.matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        columns = [*result.members, "ensemble"]
        ax.set_xticks(range(k + 1), columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(k), result.members, fontsize=8)
        ax.set_xlabel("evaluated on", fontsize=9)
        ax.set_ylabel("crafted on", fontsize=9)
        ax.axvline(k - 0.5, color="white", linewidth=2.5)
        for i, row in enumerate(result.matrix):
            for j, value in enumerate(row):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    fontweight="bold" if i == j else "normal",
                    color="black" if value > 0.6 else "white",
                )
        eps = result.params.get("eps")
        summary = result.summary
        ax.set_title(
            f"{result.attack}, eps={eps:g}, n={result.n}\n"
            f"diag {summary['mean_diagonal']:.2f}, off-diag {summary['mean_off_diagonal']:.2f}",
            fontsize=9,
        )
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def sweep_heatmap(result: SweepResult, path: str | Path, dpi: int = 110) -> Path:
    """Save :func:`sweep_figure` to ``path`` (format from the suffix), atomically."""
    return save_figure(sweep_figure(result), path, dpi)


def sweep_figure(result: SweepResult) -> Any:
    """A lambda_cos x lambda_norm sweep as a heat map of ACE x mean AAE (paper Fig. 4).

    Rows are lambda_cos (bottom to top), columns lambda_norm; each cell shows its score, failed
    cells stay blank, the best cell is outlined and starred. When the grid is at least 2 x 2 and
    complete, contour lines are drawn and their levels are marked on the colour bar (not on the
    plot, where labels would cover the cells' values). Returns the matplotlib figure; raises
    UsageError without matplotlib.
    """
    import math

    plt = require_matplotlib()
    rows, cols = result.lambda_cos, result.lambda_norm
    by_pos = {(c.cell.lambda_cos, c.cell.lambda_norm): c.score for c in result.cells}
    grid = [[by_pos.get((r, c)) for c in cols] for r in rows]
    values = [[math.nan if v is None else v for v in row] for row in grid]
    fig, ax = plt.subplots(
        figsize=(max(4.8, 1.6 + 1.1 * len(cols)), 1.6 + 0.8 * len(rows)), constrained_layout=True
    )
    image = ax.imshow(values, origin="lower", cmap="viridis", aspect="auto")
    lines = None
    if len(rows) >= 2 and len(cols) >= 2 and all(v is not None for row in grid for v in row):
        lines = ax.contour(values, levels=6, colors="white", linewidths=0.7, alpha=0.6)
    best = result.best
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value is None:
                continue
            is_best = best is not None and (rows[i], cols[j]) == (
                best.cell.lambda_cos,
                best.cell.lambda_norm,
            )
            ax.text(
                j,
                i,
                f"{value:.3f}" + (" *" if is_best else ""),
                ha="center",
                va="center",
                fontsize=9,
                fontweight="bold" if is_best else "normal",
                color="black",
                bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0, "pad": 1},
            )
            if is_best:
                ax.add_patch(
                    plt.Rectangle(
                        (j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="red", linewidth=2.5
                    )
                )
    ax.set_xticks(range(len(cols)), [f"{v:g}" for v in cols])
    ax.set_yticks(range(len(rows)), [f"{v:g}" for v in rows])
    ax.set_xlabel("lambda_norm")
    ax.set_ylabel("lambda_cos")
    attacks = ", ".join(f"{s['attack']}@{s['eps']:g}" for s in result.attack_settings)
    ax.set_title(f"score = ACE x mean AAE\n{attacks}", fontsize=9)
    bar = fig.colorbar(image, ax=ax, label="score (white ticks: contour levels)")
    if lines is not None:
        bar.add_lines(lines)
    return fig
