"""`ncen attack` end to end on a tiny synthetic checkpoint."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from helpers import save_tiny_checkpoint
from ncen_cli.cli import app
from ncen_cli.evaluation import Check, EvaluationReport

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "syn.safetensors")


def run(*args: str):
    return runner.invoke(app, ["attack", *map(str, args)])


def base(ckpt, tmp_path):
    return [
        ckpt,
        "--data-dir",
        tmp_path,
        "--device",
        "cpu",
        "--test-limit",
        "12",
        "--batch-size",
        "6",
    ]


def test_json_schema_and_overrides(ckpt, tmp_path):
    res = run(
        *base(ckpt, tmp_path),
        "--attacks",
        "fgsm,pgd",
        "--eps",
        "0.05,0.3",
        "--steps",
        "3",
        "--step-size",
        "0.0125",
        "--json",
    )
    assert res.exit_code == 0, res.stderr
    payload = json.loads(res.stdout)
    assert isinstance(payload["clean_accuracy"], float) and payload["n"] == 12
    pairs = [(r["attack"], r["eps"]) for r in payload["results"]]
    assert pairs == [("fgsm", 0.05), ("fgsm", 0.3), ("pgd", 0.05), ("pgd", 0.3)]
    for r in payload["results"]:
        assert 0 <= r["accuracy"] <= 1
        assert {
            "objective",
            "steps",
            "step_size",
            "restarts",
            "random_start",
            "decay",
            "seed",
        } <= r["params"].keys()
    pgd = payload["results"][2]["params"]
    assert pgd["steps"] == 3 and pgd["step_size"] == 0.0125 and pgd["objective"] == "mean-ce"
    fgsm = [r["params"] for r in payload["results"][:2]]
    assert [(p["steps"], p["step_size"]) for p in fgsm] == [(1, 0.05), (1, 0.3)]
    assert all({"name", "passed", "detail"} <= c.keys() for c in payload["checks"])


def test_default_is_paper_protocol_table(ckpt, tmp_path):
    res = run(*base(ckpt, tmp_path), "--steps", "2")  # no attack settings: the paper's table
    assert res.exit_code == 0, res.stderr
    for text in ("protocol paper", "clean (ACE)", "mifgsm", "bim", "0.15", "self-checks"):
        assert text in res.stdout


def test_protocol_filter_and_out_files(ckpt, tmp_path):
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    res = run(
        *base(ckpt, tmp_path),
        "--protocol",
        "strong",
        "--attacks",
        "pgd",
        "--steps",
        "2",
        "--restarts",
        "2",
        "--eps",
        "0.1",
        "--objective",
        "logits",
        "--out",
        out_json,
        "--json",
    )
    assert res.exit_code == 0, res.stderr
    written = json.loads(out_json.read_text())
    assert written["results"] == json.loads(res.stdout)["results"]
    (r,) = written["results"]
    assert (r["attack"], r["params"]["restarts"], r["params"]["objective"]) == ("pgd", 2, "logits")
    res = run(*base(ckpt, tmp_path), "--attacks", "fgsm", "--eps", "0.1", "--out", out_csv)
    assert res.exit_code == 0, res.stderr
    rows = list(csv.DictReader(out_csv.open()))
    assert [row["attack"] for row in rows] == ["clean", "fgsm"]
    assert float(rows[1]["eps"]) == 0.1 and rows[1]["objective"] == "mean-ce"


@pytest.mark.parametrize(
    "args",
    [
        ["--eps", "0"],
        ["--eps", "1.5"],
        ["--eps", "abc"],
        ["--steps", "0"],
        ["--restarts", "0"],
        ["--attacks", "nope"],
        ["--protocol", "weird"],
        ["--objective", "hinge"],
        ["--test-limit", "0"],
        ["--out", "results.txt"],
        ["--protocol", "paper", "--attacks", "square"],
    ],
)
def test_bad_input_is_one_line_exit_2(ckpt, tmp_path, args):
    res = run(*base(ckpt, tmp_path), *args)
    assert res.exit_code == 2, (args, res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error:")
    assert "Traceback" not in res.stderr + res.stdout


def test_missing_checkpoint_and_dataset_mismatch(tmp_path):
    res = run(tmp_path / "none.safetensors", "--data-dir", tmp_path)
    assert res.exit_code == 2 and "does not exist" in res.stderr
    other = save_tiny_checkpoint(tmp_path / "other.safetensors", shape=(1, 8, 8), classes=10)
    res = run(other, "--data-dir", tmp_path, "--device", "cpu")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "checkpoint expects" in res.stderr and "Traceback" not in res.stderr


def test_strict_exits_1_on_a_failed_check(ckpt, tmp_path, monkeypatch):
    import ncen_cli.evaluation

    def fake_evaluate(*args, **kwargs):
        return EvaluationReport(0.5, 6, 12, [], [Check("logits", False, "probabilities")])

    # `ncen attack` imports evaluate when it runs (usage errors must not import torch)
    monkeypatch.setattr(ncen_cli.evaluation, "evaluate", fake_evaluate)
    res = run(*base(ckpt, tmp_path), "--attacks", "fgsm", "--eps", "0.1", "--json")
    assert res.exit_code == 0 and "warning" in res.stderr
    res = run(*base(ckpt, tmp_path), "--attacks", "fgsm", "--eps", "0.1", "--json", "--strict")
    assert res.exit_code == 1 and "self-check(s) failed: logits" in res.stderr
    assert json.loads(res.stdout)["checks"][0]["passed"] is False
