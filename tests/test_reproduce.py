"""The pure parts of benchmarks/reproduce.py: masks, paired intervals, the report from a folder of
stage files (no training, no models)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reproduce  # noqa: E402
import reproduction_report as rr  # noqa: E402


def test_mask_round_trip_any_length():
    for n in (0, 1, 7, 8, 9, 500, 1001):
        mask = [(i * 7919) % 3 == 0 for i in range(n)]
        packed = rr.pack_mask(mask)
        assert rr.unpack_mask(packed) == mask
        assert len(packed["bits"]) <= 4 * ((n + 7) // 8 + 2) // 3 + 4  # compact: ~n/6 chars


def test_mask_too_short_is_refused():
    with pytest.raises(ValueError):
        rr.unpack_mask({"n": 20, "bits": rr.pack_mask([True] * 8)["bits"]})


def test_paired_counts():
    a = [True, True, False, False, True]
    b = [True, False, True, False, False]
    assert rr.paired_counts(a, b) == (1, 2, 1, 1)
    with pytest.raises(ValueError):
        rr.paired_counts(a, b[:-1])


def test_newcombe_close_to_wald_on_a_large_sample():
    # Agresti's presidential-approval table (794, 150, 86, 570): difference -0.04, Wald SE 0.0095
    d, low, high = rr.paired_difference(794, 86, 150, 570)
    assert d == pytest.approx(-0.04)
    se = math.sqrt((150 + 86) - (150 - 86) ** 2 / 1600) / 1600
    assert low == pytest.approx(d - 1.96 * se, abs=0.002)
    assert high == pytest.approx(d + 1.96 * se, abs=0.002)


def test_newcombe_properties():
    d, low, high = rr.paired_difference(40, 0, 0, 60)  # no discordant pair
    assert d == 0 and low < 0 < high and high - low < 0.1
    d, low, high = rr.paired_difference(0, 30, 0, 70)  # a wins every discordant pair
    assert low > 0 and d == pytest.approx(0.3) and low < d < high
    # swapping the two methods negates the interval
    d1, l1, h1 = rr.paired_difference(20, 12, 5, 63)
    d2, l2, h2 = rr.paired_difference(20, 5, 12, 63)
    assert (d2, l2, h2) == pytest.approx((-d1, -h1, -l1))
    assert l1 < d1 < h1
    # more images, narrower interval at the same proportions
    _, l3, h3 = rr.paired_difference(200, 120, 50, 630)
    assert h3 - l3 < h1 - l1
    assert rr.paired_difference(0, 0, 0, 0) == (0.0, -1.0, 1.0)
    lo, hi = rr.wilson(0, 10)
    assert lo == 0 and 0 < hi < 0.35


def row(attack, eps, mask, objective="mean-ce"):
    n, correct = len(mask), sum(mask)
    low, high = rr.wilson(correct, n)
    return {
        "attack": attack,
        "eps": eps,
        "accuracy": correct / n,
        "correct": correct,
        "n": n,
        "ci_low": low,
        "ci_high": high,
        "params": {"objective": objective},
        "mask": rr.pack_mask(mask),
    }


def diagnostics(n: int, cos: float) -> dict:
    """An inspect stage's payload: one member pair of gradient cosine ``cos``, on ``n`` images."""
    pairs = [{"grad_cosine_mean": cos, "disagreement": 0.1}]
    return {
        "diagnostics": {
            "n": n,
            "pairs": pairs,
            "norm_dispersion": 0.2,
            "ensemble_accuracy": 0.9,
            "terms": {},
        }
    }


def write_stage(folder: Path, method: str, stage: str, payload: dict, budget: dict) -> None:
    path = folder / method / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({**payload, "stage": stage, "method": method, "budget": budget, "seconds": 1.0})
    )


def fake_results(folder: Path, budget: dict) -> None:
    n = 200
    strong_ncen = [True] * 150 + [False] * 50
    strong_base = [True] * 100 + [False] * 100
    for method, paper_mask, cos in (("baseline", strong_base, 0.4), ("ncen", strong_ncen, 0.1)):
        write_stage(folder, method, "train", {"clean_accuracy": 0.9}, budget)
        write_stage(
            folder,
            method,
            "paper",
            {"results": [row("pgd", 0.1, paper_mask), row("fgsm", 0.1, [True] * n)]},
            budget,
        )
        write_stage(
            folder,
            method,
            "strong",
            {"results": [row("worst-case", 0.1, paper_mask, "worst"), row("pgd", 0.1, [True] * n)]},
            budget,
        )
        write_stage(folder, method, "inspect", diagnostics(n, cos), budget)
    for lam, cos in ((0.02, 0.3), (0.5, 0.05)):
        write_stage(folder, f"ncen@{lam}", "inspect", diagnostics(n, cos), budget)


def test_summary_from_a_folder_of_stage_files(tmp_path):
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)
    methods = ["baseline", "ncen", "ncen@0.02", "ncen@0.5"]
    results = rr.read_results(tmp_path, budget)
    summary = rr.build_summary(results, methods, budget)
    paired = {
        (r["protocol"], r["attack"]): r
        for r in summary["paired"]
        if r["method"] == "ncen" and r["baseline"] == "baseline"
    }
    pgd = paired[("paper", "pgd")]
    assert pgd["difference"] == pytest.approx(0.25) and pgd["ci"][0] > 0
    assert pgd["n"] == 200 and pgd["discordant"] == [50, 0]
    assert rr.call(paired[("paper", "fgsm")]) == "inconclusive"  # both perfect: difference 0
    assert ("strong", "pgd") not in paired  # strong is judged on its worst-case rows only
    assert rr.call(paired[("strong", "worst-case")]) == "better"
    assert summary["methods"]["ncen"]["clean_accuracy"] == 0.9
    assert summary["methods"]["ncen"]["protocols"]["strong"][0]["attack"] == "worst-case"
    assert "ncen authors" in summary["missing"] and "ncen@0.02 train" in summary["missing"]
    assert "ncen paper" not in summary["missing"]
    text = summary["verdict"]
    assert text.startswith("The comparison is incomplete")
    assert "strong protocol (per-example worst case) an NCEn gain survives" in text
    worst = paired[("strong", "worst-case")]
    acc_ncen, acc_base = worst["accuracies"]
    assert acc_ncen - acc_base == pytest.approx(worst["difference"])
    assert f"({worst['difference']:+.3f}: {acc_ncen:.3f} against {acc_base:.3f})" in text
    assert "mean pairwise gradient cosine (lower is more diverse) λ=0.02:" in text
    assert "change from λ=0.02:" in text and "rises" not in text and "falls" not in text
    md = rr.render_markdown(summary, ["## Budget"])
    assert "## Missing stages" in md and "| better |" in md
    assert "| ncen | authors, transfer |" in md
    json.dumps(summary)  # serialisable as written to docs/reproduction.json


def test_paper_gains_without_a_strong_stage_are_not_called_robustness(tmp_path):
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)
    for method in ("baseline", "ncen"):
        (tmp_path / method / "strong.json").unlink()
    summary = rr.build_summary(rr.read_results(tmp_path, budget), ["baseline", "ncen"], budget)
    text = summary["verdict"]
    assert "ncen − baseline, settings better / worse / inconclusive" in text
    assert "paper 1 / 0 / 1 of 2" in text
    assert "Not yet tested by the strong protocol: ncen vs baseline." in text
    assert "no robustness claim follows" in text
    fake_results(tmp_path, budget)  # with the strong stage the caveat is gone
    summary = rr.build_summary(rr.read_results(tmp_path, budget), ["baseline", "ncen"], budget)
    assert "Not yet tested by the strong protocol" not in summary["verdict"]


def test_a_stage_whose_checkpoint_is_gone_trains_it_again(tmp_path, capsys, monkeypatch):
    """On another machine the committed train result exists but --work-dir is empty: the next
    stage retrains the checkpoint instead of being skipped, and the train result is kept."""
    monkeypatch.setattr(reproduce, "checkpoint_record", lambda path: {"sha256": "ab12"})
    runner = object.__new__(reproduce.Runner)
    runner.method, runner.ckpt = "ncen", tmp_path / "work" / "ncen.safetensors"
    runner.args = argparse.Namespace(results=tmp_path / "results")
    runner.budget = {"epochs": 8}
    write_stage(tmp_path / "results", "ncen", "train", {"clean_accuracy": 0.91}, runner.budget)
    done: list[str] = []
    runner.trained = lambda: "train" in done
    runner.train = lambda: done.append("train") or {"clean_accuracy": 0.90}
    runner.paper = lambda: done.append("paper") or {"results": []}
    runner.run(["paper"])
    assert done == ["train", "paper"]
    assert json.loads((tmp_path / "results/ncen/train.json").read_text())["clean_accuracy"] == 0.91
    paper = json.loads((tmp_path / "results/ncen/paper.json").read_text())
    assert paper["stage"] == "paper" and paper["checkpoint"] == {"sha256": "ab12"}
    assert "differs from the committed 0.9100" in capsys.readouterr().err


def test_checkpoint_record_names_the_file_and_its_precision(tmp_path):
    from helpers import save_tiny_checkpoint, tiny_ensemble

    first = save_tiny_checkpoint(tmp_path / "a.safetensors")
    record = reproduce.checkpoint_record(first)
    assert len(record["sha256"]) == 16 and set(record) == {"sha256", "precision", "history"}
    assert record["history"] == rr.history_digest([])  # a tiny checkpoint has no history
    again = save_tiny_checkpoint(tmp_path / "b.safetensors")
    assert reproduce.checkpoint_record(again) == record  # same bytes, same record
    ensemble = tiny_ensemble()
    with torch.no_grad():
        next(ensemble.parameters()).add_(1e-3)  # one weight moved: another training's file
    changed = save_tiny_checkpoint(tmp_path / "c.safetensors", ensemble)
    assert reproduce.checkpoint_record(changed)["sha256"] != record["sha256"]


def test_stages_on_a_checkpoint_trained_again_are_named(tmp_path):
    """Stages recorded without a checkpoint ran on the train stage's; a strong stage run on a
    retrained checkpoint (another machine, fp32) is reported as a separate training, and the
    verdict says so, while paired rows within that stage are still computed."""
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)
    methods = ["baseline", "ncen"]
    summary = rr.build_summary(rr.read_results(tmp_path, budget), methods, budget)
    assert summary["checkpoint_notes"] == []
    assert summary["checkpoints"]["ncen"] == {"train": ["train", "paper", "strong", "inspect"]}
    for method, sha in (("baseline", "1111"), ("ncen", "2222")):
        payload = json.loads((tmp_path / method / "strong.json").read_text())
        payload.update(checkpoint={"sha256": sha, "precision": "fp32"}, machine="box B")
        payload["clean_accuracy"], payload["n"] = 0.905, 200
        (tmp_path / method / "strong.json").write_text(json.dumps(payload))
    summary = rr.build_summary(rr.read_results(tmp_path, budget), methods, budget)
    assert summary["checkpoints"]["ncen"] == {
        "train": ["train", "paper", "inspect"],
        "2222": ["strong"],
    }
    note = summary["checkpoint_notes"][1]
    assert note.startswith("- ncen: train, paper, inspect on the train stage's checkpoint")
    assert "strong on checkpoint 2222 (fp32, box B, clean 0.905 on 200 images)" in note
    assert "trained again on another machine" in summary["verdict"]
    assert any(r["protocol"] == "strong" for r in summary["paired"])
    assert "different precisions" not in summary["verdict"]  # both strong stages: fp32
    assert "Each method is one training (seed 0)" in summary["verdict"]
    md = rr.render_markdown(summary, [])
    assert "## Checkpoints trained more than once" in md and note in md
    payload = json.loads((tmp_path / "ncen" / "strong.json").read_text())
    payload["checkpoint"]["precision"] = "bf16"
    (tmp_path / "ncen" / "strong.json").write_text(json.dumps(payload))
    summary = rr.build_summary(rr.read_results(tmp_path, budget), methods, budget)
    assert (
        "strong protocol, ncen − baseline: the two checkpoints were trained in different "
        "precisions (ncen bf16, baseline fp32)" in summary["verdict"]
    )
    assert "paper protocol, ncen − baseline: the two checkpoints" not in summary["verdict"]


def test_stage_files_of_another_budget_are_not_used(tmp_path):
    fake_results(tmp_path, {"epochs": 1, "train_limit": 200})
    assert rr.read_results(tmp_path, {"epochs": 8, "train_limit": 20000}) == {}
    assert set(rr.read_results(tmp_path)) == {"baseline", "ncen", "ncen@0.02", "ncen@0.5"}


def test_no_results_lists_every_stage_and_concludes_nothing(tmp_path):
    summary = rr.build_summary({}, ["baseline", "ncen"], {})
    assert len(summary["missing"]) == 2 * len(rr.STAGES)
    assert "nothing is concluded" in summary["verdict"]
    assert summary["paired"] == []


def test_report_only_writes_both_files(tmp_path):
    doc, js = tmp_path / "r.md", tmp_path / "r.json"
    reproduce.main(
        [
            "--report-only",
            "--results",
            str(tmp_path / "none"),
            "--doc",
            str(doc),
            "--json",
            str(js),
            "--methods",
            "baseline,ncen@0.1",
        ]
    )
    summary = json.loads(js.read_text())
    assert summary["missing"][0] == "baseline train"
    assert summary["budget"]["lr_step_epochs"] == 3 and summary["budget"]["epochs"] == 8
    assert "| ncen@0.1 | train, paper, authors, strong, transfer, inspect |" in doc.read_text()


def test_method_names_and_schedule():
    assert reproduce.method_defense("ncen@0.1") == ("ncen", {"lambda_cos": 0.1, "lambda_norm": 0.1})
    assert reproduce.method_defense("ncen-official") == ("ncen-official", {})
    assert [reproduce.lr_step(e) for e in (40, 8, 3, 1)] == [15, 3, 1, 1]
    args = reproduce.parse_args(["--data-dir", "x", "--full"])
    assert args.train_limit is None and args.epochs == 40 and args.strong_limit == 10000
    assert args.results.as_posix().endswith("results/full")


def test_authors_masks_are_placed_on_all_images():
    """The authors' protocol attacks only the clean-correct images: their masks go back to
    their positions, a clean-wrong image counting as not robust."""
    robust = torch.tensor([True, False, True])
    result = SimpleNamespace(
        to_json=lambda: {"results": [{"attack": "pgd"}]}, results=[SimpleNamespace(robust=robust)]
    )
    clean = torch.tensor([True, False, True, True, False])
    payload = reproduce.with_masks(result, clean)
    assert rr.unpack_mask(payload["results"][0]["mask"]) == [True, False, False, True, False]


def test_unknown_method_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(
            [
                "--report-only",
                "--methods",
                "baseline,ncen@abc",
                "--results",
                str(tmp_path),
                "--doc",
                str(tmp_path / "r.md"),
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
    assert exit_info.value.code == 2
    assert "ncen@abc" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_a_checkpoint_of_another_budget_is_refused(tmp_path):
    from ncen_cli.errors import UsageError
    from ncen_cli.training import TrainConfig

    config = TrainConfig(
        defense="ncen",
        epochs=8,
        train_limit=20000,
        lr_step_epochs=3,
        hyperparameters={"lambda_cos": 0.1, "lambda_norm": 0.1},
    )
    recorded = {
        "defense": "ncen",
        "epochs": 8,
        "train_limit": 20000,
        "lr_step_epochs": 3,
        "seed": 0,
        "members": config.members,
        "hyperparameters": {"lambda_cos": 0.1, "lambda_norm": 0.1, "other": 1.0},
    }
    reproduce.check_checkpoint_config(tmp_path / "c.safetensors", recorded, config)  # same run
    with pytest.raises(UsageError, match="epochs"):
        reproduce.check_checkpoint_config(
            tmp_path / "c.safetensors", {**recorded, "epochs": 2}, config
        )
    with pytest.raises(UsageError, match="hyperparameters"):
        reproduce.check_checkpoint_config(
            tmp_path / "c.safetensors",
            {**recorded, "hyperparameters": {"lambda_cos": 0.5, "lambda_norm": 0.5}},
            config,
        )


def test_authors_minus_paper_and_settling_budget(tmp_path):
    budget = {"epochs": 8}
    n = 100
    for method in ("baseline", "ncen"):
        write_stage(
            tmp_path,
            method,
            "paper",
            {"results": [row("pgd", 0.1, [True] * 50 + [False] * 50)]},
            budget,
        )
        write_stage(
            tmp_path,
            method,
            "authors",
            {"results": [row("pgd", 0.1, [True] * 90 + [False] * 10, "logits")]},
            budget,
        )
    summary = rr.build_summary(rr.read_results(tmp_path, budget), ["baseline", "ncen"], budget)
    gap = summary["authors_minus_paper"]
    assert [r["method"] for r in gap] == ["baseline", "ncen"]
    assert gap[0]["difference"] == pytest.approx(0.4) and gap[0]["ci"][0] > 0
    assert gap[0]["n"] == n
    assert "higher in 1, lower in 0" in summary["verdict"]
    # identical masks for ncen and baseline: inconclusive, and no test set settles a zero
    assert "no difference" in summary["verdict"]
    md = rr.render_markdown(summary, [])
    assert "| baseline | PGD | 0.1 | +0.400 |" in md


def test_settling_budget_counts_images_needed():
    rows = [{"difference": 0.02, "ci": [-0.01, 0.05], "n": 1000}]
    text = rr.settling_budget(rows)[0]
    assert "settled by at most 10,000" in text and "2,250 images" in text


def test_the_paper_objective_is_held_against_the_others_on_the_same_images(tmp_path):
    """objective_gap_rows pairs the strong stage's mean-CE run with each other objective of the
    same attack and eps; the verdict names the settings where mean CE leaves significantly more."""
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)
    n = 200
    rows = [
        row("worst-case", 0.1, [True] * 20 + [False] * 180, "worst"),
        row("pgd", 0.1, [True] * 120 + [False] * 80),  # mean-ce: 0.6
        row("pgd", 0.1, [True] * 20 + [False] * 180, "prob"),  # prob: 0.1, a subset
        row("fgsm", 0.1, [True] * 150 + [False] * 50),
        row("fgsm", 0.1, [True] * 148 + [False] * 52, "prob"),  # 2 images apart: no call
        row("apgd-dlr", 0.1, [True] * n, "dlr"),  # no mean-ce run of its attack: no pair
        row("pgd", 0.15, [True] * 10 + [False] * 190, "prob"),  # no mean-ce run at this eps
    ]
    write_stage(tmp_path, "ncen", "strong", {"results": rows}, budget)
    results = rr.read_results(tmp_path, budget)
    gaps = rr.objective_gap_rows(results, "ncen")
    assert [(r["attack"], r["eps"], r["objectives"]) for r in gaps] == [
        ("pgd", 0.1, ["mean-ce", "prob"]),
        ("fgsm", 0.1, ["mean-ce", "prob"]),
    ]
    pgd, fgsm = gaps
    assert pgd["difference"] == pytest.approx(0.5) and pgd["accuracies"] == [0.6, 0.1]
    assert pgd["discordant"] == [100, 0] and rr.call(pgd) == "better"
    assert rr.call(fgsm) == "inconclusive"
    summary = rr.build_summary(results, ["baseline", "ncen"], budget)
    assert summary["objective_gaps"] == gaps  # the baseline's strong stage has no prob run
    assert [e["attack"] for e in summary["methods"]["ncen"]["strong_attacks"]] == [
        r["attack"] for r in rows[1:]
    ]
    assert (
        "ncen: attacking the paper's objective (mean-ce) overstates the accuracy left in "
        "PGD ε=0.1 by +0.500 (0.600 against 0.100 under prob)."
    ) in summary["verdict"]
    md = rr.render_markdown(summary, [])
    assert "| ncen | PGD | 0.1 | mean-ce − prob | +0.500 |" in md
    assert "| APGD-DLR (dlr) | 0.1 | – | 1.000 ±" in md  # every strong run, a column per method


def test_a_retraining_that_reproduced_the_run_counts_as_the_same_training(tmp_path):
    """A stage on another file whose history digest equals the train stage's recorded history
    joins the train stage's group: no 'trained again' caveat, one line saying it reproduced."""
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)
    history = [
        {"epoch": 1, "lr": 1e-3, "ce": 0.65, "terms": {"cos": 0.01}, "test_accuracy": 0.858},
        {"epoch": 2, "lr": 1e-3, "ce": 0.42, "terms": {"cos": 0.02}, "test_accuracy": 0.874},
    ]
    write_stage(tmp_path, "ncen", "train", {"clean_accuracy": 0.9, "history": history}, budget)
    # a checkpoint's own history has no lr: the digest covers what both records hold
    from_checkpoint = [{k: v for k, v in r.items() if k != "lr"} for r in history]
    assert rr.history_digest(from_checkpoint) == rr.history_digest(history)
    strong = json.loads((tmp_path / "ncen" / "strong.json").read_text())
    record = {"sha256": "7777", "precision": "bf16"}
    strong["checkpoint"] = {**record, "history": rr.history_digest(from_checkpoint)}
    (tmp_path / "ncen" / "strong.json").write_text(json.dumps(strong))
    summary = rr.build_summary(rr.read_results(tmp_path, budget), ["baseline", "ncen"], budget)
    assert summary["checkpoints"]["ncen"] == {"train": ["train", "paper", "strong", "inspect"]}
    assert summary["checkpoint_notes"] == []
    assert "trained again" not in summary["verdict"]
    (note,) = summary["reproduced_notes"]
    assert note.startswith("- ncen: strong ran on a retraining (checkpoint 7777, bf16,")
    assert "## Checkpoints trained more than once" in rr.render_markdown(summary, [])
    # one epoch's loss differs in its last bit: another training
    changed = [dict(history[0]), history[1]]
    changed[0]["ce"] = 0.6500000000000001
    strong["checkpoint"]["history"] = rr.history_digest(changed)
    (tmp_path / "ncen" / "strong.json").write_text(json.dumps(strong))
    summary = rr.build_summary(rr.read_results(tmp_path, budget), ["baseline", "ncen"], budget)
    assert summary["checkpoints"]["ncen"]["7777"] == ["strong"]
    assert summary["reproduced_notes"] == [] and "trained again" in summary["verdict"]


def test_a_name_of_another_methods_training_is_counted_once(tmp_path, monkeypatch):
    """ncen@0.02 is ncen on FashionMNIST (0.02 is its default λ): it is not trained or evaluated
    again; the report gives it ncen's figures, once, and places it in the dose-response."""
    assert reproduce.same_trainings(list(reproduce.CORE_METHODS)) == {"ncen@0.02": "ncen"}
    assert reproduce.same_trainings(["ncen@0.02"]) == {"ncen@0.02": "ncen"}
    assert reproduce.same_trainings(["ncen@0.1", "ncen-official@0.02", "gal"]) == {
        "ncen-official@0.02": "ncen-official"
    }
    assert reproduce.same_trainings(["ncen@0.02"], dataset="cifar10") == {}  # its λ differ there

    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)  # also an ncen@0.02 inspect file, which must not be used
    methods = ["baseline", "ncen@0.02", "ncen@0.5"]
    same = {"ncen@0.02": "ncen"}
    summary = rr.build_summary(rr.read_results(tmp_path, budget), methods, budget, same)
    assert list(summary["methods"]) == ["baseline", "ncen", "ncen@0.02", "ncen@0.5"]
    alias, ncen = summary["methods"]["ncen@0.02"], summary["methods"]["ncen"]
    assert alias["same_training_as"] == "ncen" and "same_training_as" not in ncen
    assert alias["inspect"] == ncen["inspect"] and alias["protocols"] == ncen["protocols"]
    assert {r["method"] for r in summary["paired"]} == {"ncen"}
    assert not [m for m in summary["missing"] if m.startswith("ncen@0.02")]
    assert "ncen train" not in summary["missing"] and "ncen authors" in summary["missing"]
    assert "λ=0.02: +0.100, λ=0.5: +0.050" in summary["verdict"]  # ncen's cosine, not 0.3
    assert summary["verdict_points"][-1].startswith("ncen@0.02 is the same training as ncen")
    md = rr.render_markdown(summary, [])
    assert "| ncen@0.02 (= ncen) | 0.900 |" in md
    assert "| attack | ε | baseline | ncen |" in md  # no column of its own
    assert f"- {summary['verdict_points'][0]}" in md

    ran: list[str] = []
    monkeypatch.setattr(
        reproduce, "Runner", lambda args, method: SimpleNamespace(run=lambda s: ran.append(method))
    )
    args = reproduce.parse_args(["--data-dir", "x", "--methods", "ncen@0.02,ncen,ncen@0.1"])
    reproduce.run_methods(args, [])
    assert ran == ["ncen", "ncen@0.1"]


def test_the_dose_response_pairs_each_lambda_with_the_smallest(tmp_path):
    """Strong worst case of ncen@0.5 against ncen@0.02 (whose results are ncen's), paired on
    the same images; a strong-protocol loss against a baseline is named."""
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)  # ncen's strong worst case: 150 of 200 correct
    strong_high = [True] * 100 + [False] * 100  # ncen@0.5 keeps 100 of 200 on those images
    write_stage(
        tmp_path,
        "ncen@0.5",
        "strong",
        {"results": [row("worst-case", 0.1, strong_high, "worst")]},
        budget,
    )
    methods = ["baseline", "ncen", "ncen@0.02", "ncen@0.5"]
    summary = rr.build_summary(
        rr.read_results(tmp_path, budget), methods, budget, {"ncen@0.02": "ncen"}
    )
    (dose,) = summary["dose_response"]
    assert (dose["method"], dose["baseline"], dose["eps"]) == ("ncen@0.5", "ncen@0.02", 0.1)
    assert dose["difference"] == pytest.approx(-0.25) and rr.call(dose) == "worse"
    assert dose["accuracies"] == [0.5, 0.75]
    text = summary["verdict"]
    assert "λ=0.5 − λ=0.02 at ε=0.1: -0.250" in text and "(0.500 against 0.750), worse" in text
    # ncen@0.5 equals the baseline (same mask): inconclusive, neither a gain nor a loss
    assert "ncen@0.5 vs baseline" not in text
    md = rr.render_markdown(summary, [])
    assert "| 0.02 | ncen@0.02 (= ncen) | 0.900 | +0.100 | 0.200 | 0.750 |" in md
    assert "| 0.5 | ncen@0.02 |" not in md and "| 0.5 | 0.02 | 0.1 | -0.250 |" in md

    worse = [False] * 200  # an NCEn form that loses everything the baseline keeps
    write_stage(
        tmp_path,
        "ncen@0.5",
        "strong",
        {"results": [row("worst-case", 0.1, worse, "worst")]},
        budget,
    )
    summary = rr.build_summary(
        rr.read_results(tmp_path, budget), methods, budget, {"ncen@0.02": "ncen"}
    )
    assert (
        "an NCEn form is worse than a baseline in: ncen@0.5 vs baseline ε=0.1 (-0.500"
        in (summary["verdict"])
    )


def test_the_report_says_which_optional_methods_ran(tmp_path):
    args = reproduce.parse_args(["--report-only"])
    text = "\n".join(reproduce.preamble(args, ["adp"]))
    assert "ran: adp; not run: trs, adv-train" in text and "`--methods trs,adv-train`" in text
    assert "all ran." in "\n".join(reproduce.preamble(args, list(reproduce.OPTIONAL_METHODS)))


def square_row(eps, mask, steps=1000):
    out = row("square", eps, mask, "margin")
    out["params"]["steps"] = steps
    return out


def test_the_blackbox_check_is_held_against_the_strong_worst_case_image_by_image(tmp_path):
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)  # baseline and ncen: strong worst case at eps 0.1
    # ncen: 150 of 200 survive every white-box attack; Square fools images 0-2 of those and
    # leaves images 150-159 (fooled by the white-box attacks) standing
    black = [False] * 3 + [True] * 147 + [True] * 10 + [False] * 40
    write_stage(tmp_path, "ncen", "blackbox", {"results": [square_row(0.1, black)]}, budget)
    results = rr.read_results(tmp_path, budget)
    summary = rr.build_summary(results, ["baseline", "ncen"], budget)
    (check,) = summary["methods"]["ncen"]["blackbox"]
    assert check["square_accuracy"] == pytest.approx(157 / 200)
    assert check["white_box_worst_case"] == pytest.approx(150 / 200)
    assert check["fooled_only_by_square"] == 3
    assert check["worst_case_over_both"] == pytest.approx(147 / 200)
    assert check["ci"][0] < 147 / 200 < check["ci"][1]
    assert summary["methods"]["baseline"]["blackbox"] == []
    assert not any("blackbox" in m for m in summary["missing"])  # supplementary: never missing
    text = summary["verdict"]
    assert "Square fools 3 of the 150 images that survive every white-box attack" in text
    assert "overstate robustness there; the worst case over both: ncen ε=0.1 (0.735" in text
    assert "Not checked: baseline" in text
    md = rr.render_markdown(summary, ["## Budget"])
    assert "| ncen | Square | 1000 | 0.1 | 0.785 | 0.750 | 3 | 0.735 [" in md
    assert summary["checkpoints"]["ncen"] == {
        "train": ["train", "paper", "strong", "inspect", "blackbox"]
    }


def test_a_blackbox_check_that_fools_nothing_new_finds_no_masking(tmp_path):
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)
    white = [True] * 150 + [False] * 50  # ncen's strong worst case in fake_results
    black = [True] * 160 + [False] * 40  # weaker than the white-box attacks on every image
    write_stage(tmp_path, "ncen", "blackbox", {"results": [square_row(0.1, black)]}, budget)
    write_stage(tmp_path, "baseline", "blackbox", {"results": [square_row(0.1, white)]}, budget)
    summary = rr.build_summary(rr.read_results(tmp_path, budget), ["baseline", "ncen"], budget)
    text = summary["verdict"]
    assert "1000 queries" in text and "no sign of gradient masking" in text
    assert "Not checked" not in text and "overstate robustness" not in text
    assert summary["methods"]["ncen"]["blackbox"][0]["worst_case_over_both"] == 0.75


def test_without_any_blackbox_check_the_verdict_says_the_strong_protocol_is_white_box(tmp_path):
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)
    summary = rr.build_summary(rr.read_results(tmp_path, budget), ["baseline", "ncen"], budget)
    assert "white-box only" in summary["verdict"] and "not run for any method" in summary["verdict"]
    md = rr.render_markdown(summary, ["## Budget"])
    assert "(no blackbox check yet: `--stages blackbox` runs it)" in md


def test_blackbox_is_a_stage_on_request_only():
    assert reproduce.parse_args(["--report-only"]).stage_list == list(rr.STAGES)
    args = reproduce.parse_args(["--report-only", "--stages", "blackbox"])
    assert args.stage_list == ["blackbox"] and args.blackbox_queries == 1000
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--report-only", "--stages", "squares"])


def test_the_blackbox_stage_runs_square_on_the_strong_stages_images(
    tmp_path, tiny_checkpoint, synthetic_arrays
):
    """The stage itself, on a real (tiny) checkpoint: Square at each BLACKBOX_EPS on the first
    --strong-limit test images, with the query budget asked for and a mask per row that counts
    only images the ensemble classifies correctly."""
    from ncen_cli import load_ensemble
    from ncen_cli.attacks.base import as_float

    runner = object.__new__(reproduce.Runner)
    runner.args = argparse.Namespace(strong_limit=12, blackbox_queries=15, seed=0)
    runner.ckpt, runner.device, runner.arrays = (
        tiny_checkpoint,
        torch.device("cpu"),
        synthetic_arrays,
    )
    payload = runner.blackbox()
    assert [r["eps"] for r in payload["results"]] == list(reproduce.BLACKBOX_EPS)
    x, y = synthetic_arrays.test_x[:12], synthetic_arrays.test_y[:12]
    with torch.no_grad():
        clean = load_ensemble(tiny_checkpoint).eval()(as_float(x)).argmax(-1) == y
    assert clean.any()
    for r in payload["results"]:
        assert r["attack"] == "square" and r["params"]["steps"] == 15 and r["n"] == 12
        mask = rr.unpack_mask(r["mask"])
        assert sum(mask) == r["correct"] and all(
            c for m, c in zip(mask, clean.tolist(), strict=True) if m
        )


def test_the_dose_response_pairs_each_lambda_with_each_smaller_one(tmp_path):
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)  # ncen (= ncen@0.02): 150 of 200 at eps 0.1
    for lam, kept in ((0.1, 170), (0.5, 190)):
        mask = [True] * kept + [False] * (200 - kept)
        write_stage(
            tmp_path,
            f"ncen@{lam}",
            "strong",
            {"results": [row("worst-case", 0.1, mask, "worst")]},
            budget,
        )
    methods = ["baseline", "ncen", "ncen@0.02", "ncen@0.1", "ncen@0.5"]
    summary = rr.build_summary(
        rr.read_results(tmp_path, budget), methods, budget, {"ncen@0.02": "ncen"}
    )
    pairs = [(r["method"], r["baseline"], r["difference"]) for r in summary["dose_response"]]
    assert pairs == [
        ("ncen@0.1", "ncen@0.02", pytest.approx(0.1)),
        ("ncen@0.5", "ncen@0.02", pytest.approx(0.2)),
        ("ncen@0.5", "ncen@0.1", pytest.approx(0.1)),
    ]
    assert "λ=0.5 − λ=0.1 at ε=0.1: +0.100" in summary["verdict"]
    assert "| 0.5 | 0.1 | 0.1 | +0.100 |" in rr.render_markdown(summary, [])


def test_the_verdict_prices_each_ncen_form_in_clean_accuracy(tmp_path):
    budget = {"epochs": 8, "train_limit": 20000}
    fake_results(tmp_path, budget)
    for method, accuracy in (("baseline", 0.915), ("ncen", 0.79)):
        write_stage(
            tmp_path,
            method,
            "train",
            {"clean_accuracy": accuracy, "test_images": 10000},
            budget,
        )
    summary = rr.build_summary(rr.read_results(tmp_path, budget), ["baseline", "ncen"], budget)
    (point,) = [p for p in summary["verdict_points"] if p.startswith("The price in clean")]
    d, lo, hi = rr.unpaired_difference(7900, 10000, 9150, 10000)
    assert d == pytest.approx(-0.125) and lo < d < hi < 0
    assert f"ncen 0.790: -0.125 [{lo:+.3f}, {hi:+.3f}] against baseline (lower)" in point
    assert "on 10,000 test images; the baselines: baseline 0.915" in point
    # equal proportions: an interval around 0; it is wider than the Wilson half-widths alone
    d, lo, hi = rr.unpaired_difference(50, 100, 50, 100)
    low, high = rr.wilson(50, 100)
    assert d == 0 and lo < 0 < hi and hi - lo > high - low
    # without the number of test images (older train files) there is no such point
    fake_results(tmp_path, budget)
    summary = rr.build_summary(rr.read_results(tmp_path, budget), ["baseline", "ncen"], budget)
    assert not any(p.startswith("The price in clean") for p in summary["verdict_points"])
