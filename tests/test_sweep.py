"""``ncen sweep``: grid expansion, skip-finished, resume of an unfinished cell, JSON, manifest."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ncen_cli.sweep as sweep_mod
from helpers import scored_cells, tiny_config, train_flags
from ncen_cli.attacks.base import AttackSettings
from ncen_cli.cli import app
from ncen_cli.errors import InterruptedRun, UsageError
from ncen_cli.evaluation import AttackResult, AttackRun, EvaluationReport, runs_for
from ncen_cli.sweep import (
    SweepResult,
    expand_grid,
    format_value,
    run_settings,
    run_sweep,
)
from ncen_cli.training import TrainConfig

runner = CliRunner()
TINY = [*train_flags(epochs=1, batch_size=16, train_limit=32, test_limit=16), "--no-noise"]
FGSM = [AttackRun("fgsm", AttackSettings(eps=0.1, steps=1, step_size=0.1))]


def sweep_config(**changes) -> TrainConfig:
    """The sweeps' tiny training settings (one epoch, no noise), with ``changes``."""
    values = {"epochs": 1, "batch_size": 16, "train_limit": 32, "test_limit": 16, "noise": False}
    return tiny_config(**{**values, **changes})


def fake_evaluator(ensemble, x, y, runs, **kwargs):
    """Scores that depend on the trained weights (so identical results mean identical models)."""
    import torch

    with torch.no_grad():
        clean = float((ensemble(x.float() / 255).argmax(1) == y).float().mean())
        weight = float(next(ensemble.parameters()).abs().sum())
    results = [
        AttackResult(r.attack, r.settings.eps, weight % 1, 0, len(y), 0.0, 1.0, {}, 0.0)
        for r in runs
    ]
    return EvaluationReport(clean, round(clean * len(y)), len(y), results, [])


@pytest.fixture
def counted_train(monkeypatch):
    """Count train() calls and record where each resumed from."""
    calls: list[tuple[str, int]] = []
    real = sweep_mod.train

    def wrapper(config, out, **kwargs):
        result = real(config, out, **kwargs)
        calls.append((out.parent.name, result.resumed_from_epoch))
        return result

    monkeypatch.setattr(sweep_mod, "train", wrapper)
    return calls


def test_expand_grid_is_row_major_sorted_and_deduplicated():
    cells = expand_grid([0.06, 0, 0.06], [0.04, 0.0, 1e-5])
    assert [(c.lambda_cos, c.lambda_norm) for c in cells] == [
        (0.0, 0.0),
        (0.0, 1e-5),
        (0.0, 0.04),
        (0.06, 0.0),
        (0.06, 1e-5),
        (0.06, 0.04),
    ]
    assert [c.index for c in cells] == list(range(6))
    ids = [c.id for c in cells]
    assert ids[0] == "cos0_norm0" and ids[-1] == "cos0.06_norm0.04" and ids[1] == "cos0_norm1e-05"
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in ids)
    assert [c.id for c in expand_grid([0.06, 0], [0.04, 0, 1e-5])] == ids  # stable


@pytest.mark.parametrize(
    "cos,norm,message",
    [
        ([], [0.0], "--lambda-cos needs at least one value"),
        ([0.0], [-0.1], "--lambda-norm values must be finite and >= 0"),
        ([float("nan")], [0.0], "--lambda-cos values must be finite"),
    ],
)
def test_expand_grid_rejects_bad_values(cos, norm, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        expand_grid(cos, norm)


def test_format_value_is_exact():
    assert [format_value(v) for v in (0, 0.02, 1.0, 0.1 + 0.2)] == [
        "0",
        "0.02",
        "1",
        "0.30000000000000004",
    ]


def test_default_battery_is_the_paper_attacks_at_the_smaller_eps():
    runs = runs_for("cifar10", "score")
    assert {r.attack: r.settings.eps for r in runs} == {
        "fgsm": 0.03,
        "mifgsm": 0.03,
        "pgd": 0.01,
        "bim": 0.01,
    }
    pgd = next(r for r in runs if r.attack == "pgd")
    assert pgd.settings.steps == 40 and pgd.settings.random_start
    mixed = runs_for("fashionmnist", "score", attacks=["pgd", "apgd-ce"], eps=[0.05])
    assert [(r.attack, r.settings.eps, r.settings.objective) for r in mixed] == [
        ("pgd", 0.05, "mean-ce"),
        ("apgd-ce", 0.05, "mean-ce"),
        ("apgd-ce", 0.05, "logits"),
    ]
    assert mixed[0].settings.step_size == 0.05  # paper settings kept for a paper attack
    with pytest.raises(UsageError, match="unknown attack"):
        runs_for("fashionmnist", "score", attacks=["nope"])


def test_second_run_skips_finished_cells(tmp_path, counted_train):
    out = tmp_path / "sweep"
    first = run_sweep(
        sweep_config(), [0.0, 0.06], [0.04], out, score_runs=FGSM, evaluator=fake_evaluator
    )
    assert sorted(name for name, _ in counted_train) == ["cos0.06_norm0.04", "cos0_norm0.04"]
    assert not any(c.skipped for c in first.cells)
    for cell in first.cells:
        assert cell.checkpoint.exists() and cell.score == pytest.approx(
            cell.clean_accuracy * cell.mean_adversarial_accuracy
        )
        assert not (cell.checkpoint.parent / "ensemble.safetensors.resume.safetensors").exists()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

    counted_train.clear()
    second = run_sweep(
        sweep_config(), [0.06, 0.0], [0.04], out, score_runs=FGSM, evaluator=fake_evaluator
    )
    assert counted_train == []
    assert all(c.skipped for c in second.cells)
    assert [c.to_json() | {"skipped": False} for c in second.cells] == [
        c.to_json() for c in first.cells
    ]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamps

    # extending the grid runs only the new cells
    third = run_sweep(
        sweep_config(), [0.0, 0.06], [0.0, 0.04], out, score_runs=FGSM, evaluator=fake_evaluator
    )
    assert sorted(name for name, _ in counted_train) == ["cos0.06_norm0", "cos0_norm0"]
    assert [c.skipped for c in third.cells] == [False, True, False, True]


def test_interrupted_cell_resumes_from_its_last_epoch(tmp_path, counted_train):
    out = tmp_path / "sweep"
    config = sweep_config(epochs=2)
    epochs_seen = []

    def stop_in_second_cell(record):
        epochs_seen.append(record.epoch)
        if len(epochs_seen) == 3:  # cell 1 finished (2 epochs), cell 2 has 1 epoch done
            raise KeyboardInterrupt

    with pytest.raises(InterruptedRun, match="interrupted in cell cos0.06_norm0; .* run the same"):
        run_sweep(
            config,
            [0.0, 0.06],
            [0.0],
            out,
            score_runs=FGSM,
            evaluator=fake_evaluator,
            on_epoch=stop_in_second_cell,
        )
    assert (out / "cells" / "cos0_norm0" / "result.json").exists()
    assert not (out / "cells" / "cos0.06_norm0" / "result.json").exists()

    counted_train.clear()
    result = run_sweep(config, [0.0, 0.06], [0.0], out, score_runs=FGSM, evaluator=fake_evaluator)
    assert counted_train == [("cos0.06_norm0", 1)]  # only the unfinished cell, from epoch 1
    assert [c.skipped for c in result.cells] == [True, False]
    assert all(c.epochs == 2 for c in result.cells)

    # an uninterrupted run of that cell gives the same model (hence the same scores)
    fresh = run_sweep(
        config, [0.06], [0.0], tmp_path / "fresh", score_runs=FGSM, evaluator=fake_evaluator
    )
    assert fresh.cells[0].mean_adversarial_accuracy == result.cells[1].mean_adversarial_accuracy


def test_manifest_with_other_shared_settings_is_refused(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(sweep_config(), [0.0], [0.0], out, score_runs=FGSM, evaluator=fake_evaluator)
    with pytest.raises(UsageError, match=r"other shared settings \(seed: 0 -> 1\)"):
        run_sweep(
            sweep_config(seed=1), [0.0], [0.0], out, score_runs=FGSM, evaluator=fake_evaluator
        )
    other_battery = [AttackRun("fgsm", AttackSettings(eps=0.2, steps=1, step_size=0.2))]
    with pytest.raises(UsageError, match="other shared settings"):
        run_sweep(
            sweep_config(), [0.0], [0.0], out, score_runs=other_battery, evaluator=fake_evaluator
        )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="holds no sweep.json"):
        run_sweep(
            sweep_config(),
            [0.0],
            [0.0],
            tmp_path / "junk",
            score_runs=FGSM,
            evaluator=fake_evaluator,
        )
    # a composed defense is looked up like `ncen train` does (was: "unknown defense")
    for defense, folder in (("gal", "gal"), ("gal+adv-train", "gal-adv")):
        with pytest.raises(UsageError, match="has no lambda_cos"):
            config = sweep_config(defense=defense)
            run_sweep(
                config, [0.0], [0.0], tmp_path / folder, score_runs=FGSM, evaluator=fake_evaluator
            )


@pytest.fixture
def data_dir_exists():
    """`--data-dir` defaults to $NCEN_DATA_DIR, which must then be a folder."""
    if os.environ.get("NCEN_DATA_DIR"):
        Path(os.environ["NCEN_DATA_DIR"]).mkdir(parents=True, exist_ok=True)


def test_cli_json_schema_and_rerun(tmp_path, data_dir_exists):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        *TINY,
        "--lambda-cos",
        "0,0.06",
        "--lambda-norm",
        "0.02",
        "--attacks",
        "fgsm",
        "--eps",
        "0.1",
        "--out",
        str(out),
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) >= {"cells", "best", "attack_settings", "lambda_cos", "lambda_norm"}
    assert [(c["lambda_cos"], c["lambda_norm"]) for c in doc["cells"]] == [
        (0.0, 0.02),
        (0.06, 0.02),
    ]
    for cell in doc["cells"]:
        assert set(cell) >= {
            "lambda_cos",
            "lambda_norm",
            "clean_accuracy",
            "mean_adversarial_accuracy",
            "score",
            "attacks",
            "seconds",
            "checkpoint",
            "skipped",
        }
        assert list(cell["attacks"]) == ["fgsm@0.1"]
        assert cell["mean_adversarial_accuracy"] == cell["attacks"]["fgsm@0.1"]
        assert cell["score"] == pytest.approx(cell["clean_accuracy"] * cell["attacks"]["fgsm@0.1"])
        assert 0 <= cell["score"] <= 1 and cell["skipped"] is False
        assert cell["checkpoint"].endswith(".safetensors")
    assert doc["best"]["score"] == max(c["score"] for c in doc["cells"])
    assert doc["attack_settings"] == [
        {
            "attack": "fgsm",
            "eps": 0.1,
            "steps": 1,
            "step_size": 0.1,
            "restarts": 1,
            "random_start": False,
            "decay": 1.0,
            "objective": "mean-ce",
            "extra": {},
        }
    ]
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["format"] == "ncen-sweep" and manifest["shared"]["training"]["seed"] == 0

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    redo = json.loads(again.stdout)
    assert all(c["skipped"] for c in redo["cells"])
    assert [c["score"] for c in redo["cells"]] == [c["score"] for c in doc["cells"]]

    table = runner.invoke(app, args[:-1])
    assert table.exit_code == 0, table.output
    assert "*" in table.stdout and "best" in table.stdout

    clash = runner.invoke(app, [*args[:-1], "--seed", "3"])
    assert clash.exit_code == 2
    assert clash.stderr.strip().splitlines() == [
        f"error: --out {out} holds a sweep with other shared settings (seed: 0 -> 3); rerun "
        "with the same options or choose another --out"
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lambda-cos", "a,b"], "--lambda-cos takes comma-separated numbers"),
        (["--lambda-norm", "-1"], "--lambda-norm values must be finite and >= 0"),
        (["--eps", "2"], "--eps values must be in (0, 1]"),
        (["--attacks", "nope"], "unknown attack 'nope'"),
        (["--figure", "x.jpg"], "--figure x.jpg: the file name must end in .png, .pdf or .svg"),
    ],
)
def test_cli_bad_options_are_one_line(tmp_path, data_dir_exists, args, message):
    result = runner.invoke(app, ["sweep", *TINY, "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_png_heat_map(tmp_path):
    pytest.importorskip("matplotlib")
    from ncen_cli.plots import sweep_heatmap

    cells = scored_cells(tmp_path, [0.0, 0.06], [0.0, 0.04])
    cells[-1].score = None  # a failed cell stays blank
    result = SweepResult(tmp_path, [0.0, 0.06], [0.0, 0.04], cells, [run_settings(r) for r in FGSM])
    assert result.best is cells[2]
    png = sweep_heatmap(result, tmp_path / "grid.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
