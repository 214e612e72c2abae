"""The authors' protocol (quirks recorded, BatchNorm buffers untouched), the strong protocol's
per-example worst case, the objective-sensitivity check, and refusal of non-finite outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from helpers import fgsm_attack_args, save_tiny_checkpoint
from ncen_cli.attacks.base import AttackSettings
from ncen_cli.authors_protocol import AuthorsEnsemble, AuthorsQuirks, batch_statistics
from ncen_cli.cli import app
from ncen_cli.ensemble import Ensemble, build_ensemble
from ncen_cli.errors import NcenError, UsageError
from ncen_cli.evaluation import (
    AttackResult,
    AttackRun,
    authors_protocol,
    evaluate,
    objective_sensitivity_check,
    wilson_interval,
    worst_case_results,
)

runner = CliRunner()


class ConvBN(nn.Module):
    """A tiny member with BatchNorm (so train and eval mode differ)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 3)
        with torch.no_grad():  # non-trivial running statistics, as in a trained checkpoint
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.num_batches_tracked.fill_(1234)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def bn_ensemble() -> Ensemble:
    return Ensemble([ConvBN(0), ConvBN(1), ConvBN(2)])


def data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 4, 4), generator=gen, dtype=torch.uint8)
    return x, torch.randint(0, 3, (n,), generator=gen)


def buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers()}


class TranscribedEnsembleModel(nn.Module):
    """TRANSCRIPTION (test oracle), line by line, of the authors' EnsembleModel.forward with
    ensemble_type 'predict_mean' (MiLabHITSZ/2022ZhangNCEn, src/ensemble_model.py); their members
    end in ``torch.softmax(out, dim=-1)`` (src/model/fashionmnist_model.py)."""

    def __init__(self, model_list):
        super().__init__()
        self.model_list = model_list

    def forward(self, feature):
        output_list = []
        logits_list = []

        for model in self.model_list:
            output_list.append(torch.softmax(model(feature), dim=-1))
            logits_list.append(torch.softmax(model(feature), dim=-1))

        output_mean = torch.mean(torch.stack(output_list, dim=0), dim=0)
        return torch.softmax(output_mean, dim=-1)


def test_authors_wrapper_matches_a_transcription_in_train_mode_and_restores_buffers():
    ens = bn_ensemble().eval()
    before = buffers(ens)
    x = torch.rand(16, 1, 4, 4)
    with batch_statistics(ens):
        got = AuthorsEnsemble(ens, AuthorsQuirks())(x)
        assert all(m.training for m in ens.modules())
    oracle = bn_ensemble()  # fresh members are in train mode, as the authors' plain list leaves
    want = TranscribedEnsembleModel(list(oracle.members))(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    after = buffers(ens)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in ens.modules())
    # the oracle (their code) does move its running statistics: ours stay put
    assert not torch.equal(
        buffers(oracle)["members.0.bn.running_mean"], before["members.0.bn.running_mean"]
    )


def test_batch_statistics_restores_buffers_when_the_body_raises():
    ens = bn_ensemble().eval()
    before = buffers(ens)
    with pytest.raises(RuntimeError), batch_statistics(ens):
        ens(torch.rand(8, 1, 4, 4))
        raise RuntimeError("interrupted")
    assert all(torch.equal(before[k], v) for k, v in buffers(ens).items())
    assert not ens.training and not ens.members[0].bn.training


def test_authors_protocol_records_quirks_and_leaves_buffers_bit_identical():
    ens = bn_ensemble()
    before = buffers(ens)
    x, y = data()
    runs = authors_protocol("fashionmnist", eps=[0.1])
    assert [r.attack for r in runs] == ["fgsm", "mifgsm", "pgd", "bim"]
    assert all(
        r.settings.objective == "logits" and r.settings.extra["early_stop"] is False for r in runs
    )
    assert runs[1].settings.extra["momentum_l1_floor"] == 1e-6
    report = evaluate(ens, x, y, runs, batch_size=8, quirks=AuthorsQuirks())
    assert all(torch.equal(before[k], v) for k, v in buffers(ens).items())
    for r in report.results:
        assert r.params["authors.member_softmax"] is True
        assert r.params["authors.batchnorm_train"] is True
        assert r.params["authors.conditional"] is True and r.params["batch_size"] == 8
        assert r.n == report.clean_correct  # conditioned on the clean-correct examples
    checks = {c.name: c for c in report.checks}
    assert checks["honest-protocol"].passed is False
    assert checks["eval-mode"].passed is False and "by design" in checks["eval-mode"].detail
    assert checks["logits"].passed is False  # softmax members: probabilities


def test_authors_clean_pass_uses_batch_statistics_and_each_quirk_switches_off():
    ens = bn_ensemble()
    x, y = data()
    xf = x.float() / 255
    runs = authors_protocol("fashionmnist", eps=[0.1])[:1]
    full = evaluate(ens, x, y, runs, batch_size=24, quirks=AuthorsQuirks())
    with batch_statistics(ens):
        want = int((AuthorsEnsemble(ens, AuthorsQuirks())(xf).argmax(-1) == y).sum())
    assert full.clean_correct == want
    honest = AuthorsQuirks.parse("none")
    plain = evaluate(ens, x, y, runs, batch_size=24, quirks=honest)
    assert plain.clean_correct == int((ens.eval()(xf).argmax(-1) == y).sum())
    assert plain.results[0].n == len(x)  # not conditioned
    assert {c.name: c for c in plain.checks}["eval-mode"].passed is True
    assert AuthorsQuirks.parse("conditional,batchnorm-train") == AuthorsQuirks(
        member_softmax=False, output_softmax=False, advertorch_iterations=False
    )
    with pytest.raises(UsageError):
        AuthorsQuirks.parse("double-softmax")


def result(attack: str, eps: float, mask: list[int], objective: str = "mean-ce") -> AttackResult:
    robust = torch.tensor(mask, dtype=torch.bool)
    correct, n = int(robust.sum()), len(mask)
    low, high = wilson_interval(correct, n)
    return AttackResult(
        attack, eps, correct / n, correct, n, low, high, {"objective": objective}, 1.0, robust
    )


def test_worst_case_is_the_per_example_and_over_runs():
    rs = [
        result("fgsm", 0.1, [1, 1, 0, 1, 1]),
        result("pgd", 0.1, [1, 0, 1, 1, 1], "logits"),
        result("apgd-ce", 0.1, [1, 1, 1, 1, 0]),
        result("pgd", 0.3, [0, 0, 1, 0, 0]),
        result("fgsm", 0.3, [1, 0, 1, 0, 0]),
    ]
    worst = worst_case_results(rs)
    assert [(w.attack, w.eps, w.correct, w.n) for w in worst] == [
        ("worst-case", 0.1, 2, 5),
        ("worst-case", 0.3, 1, 5),
    ]
    assert worst[0].robust.tolist() == [True, False, False, True, False]
    assert worst[0].params["over"] == ["fgsm/mean-ce", "pgd/logits", "apgd-ce/mean-ce"]
    assert worst_case_results(rs[:1]) == []  # one run at an eps: nothing to combine


def test_evaluate_worst_case_row_is_below_every_component():
    gen = torch.Generator().manual_seed(3)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(2)]
    for m in members:
        with torch.no_grad():
            m[1].weight.copy_(torch.randn(3, 16, generator=gen))
    x, y = data(40)
    runs = [AttackRun("fgsm", AttackSettings(eps=0.05, objective=o)) for o in ("mean-ce", "logits")]
    runs += [
        AttackRun(
            "pgd", AttackSettings(eps=0.05, steps=3, step_size=0.02, random_start=True, objective=o)
        )
        for o in ("mean-ce", "logits")
    ]
    report = evaluate(Ensemble(members), x, y, runs, batch_size=16, worst_case=True)
    worst, *parts = report.results
    assert worst.attack == "worst-case" and len(parts) == 4
    assert all(worst.accuracy <= p.accuracy for p in parts)
    assert worst.correct == int(torch.stack([p.robust for p in parts]).all(0).sum())
    payload = report.to_json()
    assert "robust" not in payload["results"][0]
    assert [r["params"]["objective"] for r in payload["results"]] == [
        "worst-case",
        "mean-ce",
        "logits",
        "mean-ce",
        "logits",
    ]
    json.dumps(payload)


def test_objective_sensitivity_names_the_stronger_objective():
    weak = result("apgd-ce", 0.1, [1] * 70 + [0] * 30)
    strong = result("apgd-ce", 0.1, [1] * 40 + [0] * 60, "logits")
    check = objective_sensitivity_check([weak, strong], [])
    assert check.passed is False
    assert "logits 0.400 stronger than mean-ce 0.700" in check.detail
    covered = objective_sensitivity_check([weak, strong], worst_case_results([weak, strong]))
    assert covered.passed is True and "logits" in covered.detail
    close = result("apgd-ce", 0.1, [1] * 66 + [0] * 34, "logits")
    assert objective_sensitivity_check([weak, close], []).passed is True
    assert objective_sensitivity_check([weak], []).passed is None


def nan_ensemble() -> Ensemble:
    torch.manual_seed(0)
    ens = build_ensemble(["resnet20", "resnet20"], (1, 12, 12), 4)
    with torch.no_grad():
        next(ens.members[1].parameters()).fill_(float("nan"))
    return ens


def test_non_finite_outputs_are_refused():
    x = torch.randint(0, 256, (6, 1, 12, 12), dtype=torch.uint8)
    y = torch.randint(0, 4, (6,))
    with pytest.raises(NcenError, match="not finite"):
        evaluate(nan_ensemble(), x, y, [AttackRun("fgsm", AttackSettings(eps=0.1))])


def test_cli_refuses_a_checkpoint_with_nan_weights(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_tiny_checkpoint(path, nan_ensemble())
    res = runner.invoke(
        app,
        fgsm_attack_args(path, "--data-dir", str(tmp_path), "--json", test_limit=8),
    )
    assert res.exit_code == 1  # refused when the checkpoint is loaded, before any attack runs
    assert "NaN or infinite" in res.stderr and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1


def _local_run(checkpoint: Path, data_dir: Path, test_limit: int) -> list[str]:
    """A command's checkpoint argument, then ``--data-dir DATA_DIR``, the CPU and ``test_limit``
    test images."""
    options = ["--data-dir", str(data_dir), "--device", "cpu", "--test-limit", str(test_limit)]
    return [str(checkpoint), *options]


def test_cli_authors_and_strong_json(tmp_path):
    path = tmp_path / "bn.safetensors"
    save_tiny_checkpoint(path)
    before = path.read_bytes()
    base = [
        *_local_run(path, tmp_path, test_limit=12),
        "--eps",
        "0.1",
        "--steps",
        "2",
        "--json",
    ]
    res = runner.invoke(
        app,
        [
            "attack",
            *base,
            "--protocol",
            "authors",
            "--quirks",
            "output-softmax,batchnorm-train,conditional",
            "--strict",
        ],
    )
    assert res.exit_code == 1, res.stderr  # --strict: the honest-protocol check fails by design
    res = runner.invoke(app, ["attack", *base, "--protocol", "authors", "--attacks", "fgsm"])
    assert res.exit_code == 0, res.stderr
    payload = json.loads(res.stdout)
    assert payload["batch_size"] == 64 and payload["quirks"]["authors.conditional"] is True
    assert payload["results"][0]["params"]["authors.output_softmax"] is True
    assert path.read_bytes() == before
    res = runner.invoke(app, ["attack", *base, "--protocol", "strong", "--restarts", "1"])
    assert res.exit_code == 0, res.stderr
    rows = json.loads(res.stdout)["results"]
    assert rows[0]["attack"] == "worst-case"
    assert all("objective" in r["params"] for r in rows)
    assert rows[0]["accuracy"] <= min(r["accuracy"] for r in rows[1:])
    res = runner.invoke(app, ["attack", *base, "--protocol", "authors", "--objective", "prob"])
    assert res.exit_code == 2


def test_sweep_strong_scoring_runs_every_objective_and_scores_the_worst():
    from ncen_cli.evaluation import runs_for, worst_over_objectives

    runs = runs_for("fashionmnist", "score", attacks=["apgd-ce", "apgd-dlr", "pgd"], eps=[0.1])
    assert [(r.attack, r.settings.objective) for r in runs] == [
        ("apgd-ce", "mean-ce"),
        ("apgd-ce", "logits"),
        ("apgd-dlr", "dlr"),
        ("pgd", "mean-ce"),
    ]
    prob = runs_for("fashionmnist", "score", attacks=["apgd-ce"], eps=[0.1], combine="mean-prob")
    assert [r.settings.objective for r in prob] == ["mean-ce", "prob"]
    rs = [
        result("apgd-ce", 0.1, [1, 1, 0, 1]),
        result("apgd-ce", 0.1, [1, 0, 1, 1], "logits"),
        result("apgd-dlr", 0.1, [0, 1, 1, 1], "dlr"),
    ]
    scored = worst_over_objectives(rs)
    assert [(r.attack, r.correct, r.params["objective"]) for r in scored] == [
        ("apgd-ce", 2, "worst-of:mean-ce,logits"),
        ("apgd-dlr", 3, "dlr"),
    ]


def test_transfer_authors_crafts_on_softmax_members(tmp_path):
    from ncen_cli.transfer import transfer_matrix

    torch.manual_seed(0)
    ens = build_ensemble(["resnet20", "resnet20"], (1, 12, 12), 4)
    x = torch.randint(0, 256, (8, 1, 12, 12), dtype=torch.uint8)
    y = torch.randint(0, 4, (8,))
    settings = AttackSettings(eps=0.05, steps=2, step_size=0.02)
    plain = transfer_matrix(ens, x, y, "bim", settings)
    soft = transfer_matrix(ens, x, y, "bim", settings, member_softmax=True)
    assert soft.params["authors.member_softmax"] is True and "authors.member_softmax" not in (
        plain.params
    )
    assert soft.clean == plain.clean  # the softmax changes the crafting loss, not predictions
    ens.members[1].load_state_dict(ens.members[0].state_dict())  # agreeing members: some kept
    path = tmp_path / "t.safetensors"
    save_tiny_checkpoint(path, ens)
    res = runner.invoke(
        app,
        [
            "transfer",
            *_local_run(path, tmp_path, test_limit=100),
            "--attacks",
            "mifgsm",
            "--steps",
            "2",
            "--protocol",
            "authors",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.stderr
    params = json.loads(res.stdout)["params"]
    assert params["only_correct"] is True and params["authors.member_softmax"] is True
    assert params["extra"]["momentum_l1_floor"] == 1e-6
