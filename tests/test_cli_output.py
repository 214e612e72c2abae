"""What the commands show (issue 17): figures whose format follows the suffix, their titles and
labels, colour-blind-safe heat colours, logging and progress on stderr, `ncen env`."""

from __future__ import annotations

import json
import logging
import time
from importlib.metadata import version
from io import StringIO

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from helpers import fgsm_attack_args, save_tiny_checkpoint, scored_cells
from ncen_cli.checkpoint import save_ensemble
from ncen_cli.cli import app, reporting
from ncen_cli.cli.common import heat_rgb
from ncen_cli.cli.reporting import Reporter
from ncen_cli.ensemble import build_ensemble
from ncen_cli.errors import UsageError

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "syn.safetensors")


# --- figures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")]
)
def test_transfer_figure_format_follows_the_suffix_and_names_the_model(
    ckpt, tmp_path, suffix, magic
):
    pytest.importorskip("matplotlib")
    figure = tmp_path / f"t{suffix}"
    res = runner.invoke(
        app,
        [
            "transfer",
            str(ckpt),
            "--attacks",
            "fgsm",
            "--eps",
            "0.1,0.2",
            "--test-limit",
            "8",
            "--device",
            "cpu",
            "--data-dir",
            str(tmp_path),
            "--figure",
            str(figure),
            "--dpi",
            "40",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.stderr
    assert figure.read_bytes().startswith(magic)
    payload = json.loads(res.stdout)  # --eps is a list in transfer too: one matrix per radius
    assert [(p["attack"], p["params"]["eps"]) for p in payload] == [("fgsm", 0.1), ("fgsm", 0.2)]
    if suffix == ".svg":  # matplotlib keeps each text as a comment beside its glyphs
        assert "resnet20, resnet20 | baseline | synthetic" in figure.read_text()


def test_figure_suffix_and_dpi_are_checked_first(tmp_path):
    from ncen_cli.plots import check_figure, figure_format

    assert [figure_format(f"a.{s}") for s in ("png", "PDF", "svg")] == ["png", "pdf", "svg"]
    for bad in ("a.jpg", "a", "a.png.bak"):
        with pytest.raises(UsageError, match="must end in .png, .pdf or .svg"):
            figure_format(bad)
    with pytest.raises(UsageError, match="--dpi"):
        check_figure(tmp_path / "a.png", dpi=0)
    res = runner.invoke(app, ["transfer", "x.safetensors", "--figure", "t.jpg"])
    assert res.exit_code == 2
    assert res.stderr == ("error: --figure t.jpg: the file name must end in .png, .pdf or .svg\n")


def test_sweep_contour_levels_do_not_cover_the_cell_values(tmp_path):
    pytest.importorskip("matplotlib")
    from ncen_cli.plots import sweep_figure
    from ncen_cli.sweep import SweepResult

    cells = scored_cells(tmp_path, [0.0, 0.02, 0.06], [0.0, 0.04])
    result = SweepResult(
        tmp_path, [0.0, 0.02, 0.06], [0.0, 0.04], cells, [{"attack": "fgsm", "eps": 0.1}]
    )
    fig = sweep_figure(result)
    ax, bar = fig.axes
    assert ax.collections, "the contour lines are drawn"
    texts = sorted(t.get_text() for t in ax.texts)  # only the cells' values are written on it
    assert texts == sorted(f"{c.score:.3f}" + (" *" if c is result.best else "") for c in cells)
    assert len(bar.collections) >= 1  # the contour levels are marked on the colour bar


# --- heat colours ----------------------------------------------------------------------------


def _luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = (c / 255 for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_heat_colours_rise_in_lightness_so_order_survives_colour_blindness():
    values = [i / 20 for i in range(21)]
    lightness = [_luminance(heat_rgb(v)) for v in values]
    assert all(a < b for a, b in zip(lightness, lightness[1:], strict=False))
    low, high = heat_rgb(0.0), heat_rgb(1.0)
    assert low[2] > low[1] and high[2] < high[1]  # blue-violet to yellow, not red to green


# --- logging and progress --------------------------------------------------------------------


def _console() -> tuple[Console, StringIO]:
    buffer = StringIO()
    return Console(file=buffer, width=200, force_terminal=False), buffer


def test_plain_progress_lines_off_a_terminal(monkeypatch):
    monkeypatch.setattr(reporting, "PLAIN_INTERVAL_S", 0.2)
    console, buffer = _console()
    with Reporter(console=console) as reporter:
        task = reporter.start("pgd eps=0.05", total=10)
        for done in range(1, 11):
            reporter.update(task, done)
            time.sleep(0.06)
        reporter.stop(task)
        quick = reporter.start("quick", total=2)
        reporter.update(quick, 2)
        reporter.stop(quick)
    lines = [line for line in buffer.getvalue().splitlines() if "pgd" in line]
    assert len(lines) >= 2, buffer.getvalue()
    assert "ETA" in lines[0] and "elapsed" in lines[0] and "/10 (" in lines[0]
    assert "10/10 (100 %)" in lines[-1]  # the end of a task that wrote lines
    assert "quick" not in buffer.getvalue()  # a task shorter than the interval stays silent


def test_a_restarted_task_counts_its_elapsed_time_afresh():
    console = Console(file=StringIO(), force_terminal=True, width=120)
    with Reporter(console=console) as reporter:
        task = reporter.start("epoch 1/2", total=2)
        reporter.update(task, 2)
        time.sleep(0.3)
        bars = reporter._bars
        finished = bars.tasks[0]
        assert finished.finished_time is not None
        reporter.restart(task, "epoch 2/2", total=2)
        reporter.update(task, 1)
        current = bars.tasks[0]
        assert current.description == "epoch 2/2" and current.finished_time is None
        assert current.elapsed is not None and current.elapsed < 0.3


def test_quiet_and_verbose_logging():
    console, buffer = _console()
    with Reporter(console=console):
        logging.getLogger("ncen.test").info("an info line")
        logging.getLogger("ncen.test").debug("a debug line")
    text = buffer.getvalue()
    assert "an info line" in text and "a debug line" not in text
    assert "test_cli_output.py:" not in text  # no file:line unless verbose
    console, buffer = _console()
    with Reporter(console=console, verbose=True):
        logging.getLogger("ncen.test").debug("a debug line")
    assert "a debug line" in buffer.getvalue() and "test_cli_output.py:" in buffer.getvalue()
    console, buffer = _console()
    with Reporter(console=console, quiet=True) as reporter:
        logging.getLogger("ncen.test").info("an info line")
        logging.getLogger("ncen.test").warning("a warning")
        assert not reporter.show_progress
    assert "an info line" not in buffer.getvalue() and "a warning" in buffer.getvalue()
    assert not logging.getLogger("ncen").handlers  # removed when the command ends


def test_attack_quiet_prints_results_only(ckpt, tmp_path):
    args = fgsm_attack_args(ckpt, "--data-dir", str(tmp_path), "--json", test_limit=8)
    res = runner.invoke(app, [*args, "-q"])
    assert res.exit_code == 0 and res.stderr == ""
    assert json.loads(res.stdout)["n"] == 8


# --- ncen env --------------------------------------------------------------------------------


def test_env_prints_devices_readably_and_package_versions():
    res = runner.invoke(app, ["env"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "{'device'" not in res.stdout and "cpu: " in res.stdout and "threads" in res.stdout
    info = json.loads(runner.invoke(app, ["env", "--json"]).stdout)
    for name in ("torchvision", "typer", "rich", "safetensors", "torchattacks"):
        assert info[name] == version(name), name
        assert f"{name}" in res.stdout


def test_device_line_for_a_gpu():
    from ncen_cli.cli.info import device_line

    assert device_line({"device": "cuda:0", "name": "NVIDIA H200", "memory_gib": 139.8}) == (
        "cuda:0: NVIDIA H200, 139.8 GiB"
    )
    assert device_line({"device": "cpu", "threads": 2, "native_bf16": False}) == (
        "cpu: 2 threads, no native bf16"
    )


# --- the checkpoint's dataset and data folder, one check for attack, transfer and inspect ----

EVALUATING = ("attack", "transfer", "inspect")


@pytest.mark.parametrize("command", EVALUATING)
def test_a_dataset_that_does_not_fit_the_checkpoint_is_refused_alike(tmp_path, command):
    torch.manual_seed(0)
    ens = build_ensemble(["resnet20", "resnet20"], (1, 12, 12), 10)  # synthetic has 4 classes
    path = save_ensemble(
        ens,
        tmp_path / "ten.safetensors",
        {"dataset": "synthetic", "input_shape": [1, 12, 12], "num_classes": 10},
    )
    res = runner.invoke(
        app,
        [command, str(path), "--test-limit", "8", "--device", "cpu", "--data-dir", str(tmp_path)],
    )
    assert res.exit_code == 2, res.output
    assert res.stderr == (
        "error: dataset 'synthetic' has 4 classes of shape (1, 12, 12), the checkpoint expects 10 "
        f"of (1, 12, 12) ({path}); pass the --dataset it was trained on\n"
    )


@pytest.mark.parametrize("command", EVALUATING)
def test_the_recorded_dataset_and_data_folder_are_the_defaults(tmp_path, command):
    torch.manual_seed(0)
    ens = build_ensemble(["resnet20", "resnet20"], (1, 12, 12), 4)
    gone = tmp_path / "moved-away"
    path = save_ensemble(
        ens,
        tmp_path / "rec.safetensors",
        {
            "dataset": "synthetic",
            "input_shape": [1, 12, 12],
            "num_classes": 4,
            "config": {"data_dir": str(gone)},
        },
    )
    res = runner.invoke(app, [command, str(path), "--test-limit", "8", "--device", "cpu"])
    assert res.exit_code == 2 and res.stderr == (
        f"error: the data folder recorded in {path} ({gone}) is not a folder here; pass "
        "--data-dir\n"
    )
    gone.mkdir()
    res = runner.invoke(
        app,
        [
            command,
            str(path),
            "--test-limit",
            "8",
            "--device",
            "cpu",
            "--json",
            "--attacks",
            "fgsm",
            "--eps",
            "0.1",
        ][: None if command != "inspect" else -4],
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)  # read synthetic (the recorded dataset) from the recorded folder
