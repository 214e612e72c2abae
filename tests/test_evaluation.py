"""The evaluation API: protocols, counts, intervals, the JSON schema and the self-checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ncen_cli.attacks.base import AttackSettings
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import UsageError
from ncen_cli.evaluation import (
    AttackResult,
    AttackRun,
    custom_runs,
    evaluate,
    override_runs,
    paper_protocol,
    result_checks,
    strong_protocol,
    wilson_interval,
)

D = 16


class Linear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


class Softmaxed(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), -1)


class Saturated(nn.Module):
    """Ignores its input: every input gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class StuckInTraining(Linear):
    """A member whose train(False) is ignored (what a plain-list ensemble does)."""

    def train(self, mode: bool = True):
        self.training = True
        return self


def ensemble(member=Linear, seed: int = 0) -> Ensemble:
    gen = torch.Generator().manual_seed(seed)
    return Ensemble([member(torch.randn(3, D, generator=gen)) for _ in range(2)])


def data(n: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(40, 216, (n, 1, 4, 4), generator=gen, dtype=torch.uint8)
    return x, torch.randint(0, 3, (n,), generator=gen)


def test_paper_protocol_is_table_two():
    runs = paper_protocol("fashionmnist")
    got = {(r.attack, r.settings.eps) for r in runs}
    assert got == {
        ("fgsm", 0.1),
        ("fgsm", 0.3),
        ("mifgsm", 0.1),
        ("mifgsm", 0.3),
        ("pgd", 0.1),
        ("pgd", 0.15),
        ("bim", 0.1),
        ("bim", 0.15),
    }
    for r in runs:
        s = r.settings
        assert s.objective == "mean-ce"
        if r.attack == "pgd":
            assert (s.steps, s.step_size, s.random_start) == (40, s.eps, True)
        if r.attack == "bim":
            assert (s.steps, s.step_size, s.random_start) == (10, s.eps, False)
        if r.attack == "mifgsm":
            assert (s.steps, s.step_size, s.decay) == (40, 0.01, 1.0)
        if r.attack == "fgsm":
            assert (s.steps, s.step_size) == (1, s.eps)
    cifar = {(r.attack, r.settings.eps) for r in paper_protocol("cifar10", objective="prob")}
    assert ("fgsm", 0.09) in cifar and ("pgd", 0.02) in cifar and ("bim", 0.01) in cifar
    assert all(r.settings.objective == "prob" for r in paper_protocol("cifar10", "prob"))
    with pytest.raises(UsageError):
        paper_protocol("mnist")
    with pytest.raises(UsageError):
        paper_protocol("cifar10", objective="hinge")


def test_strong_protocol():
    runs = strong_protocol("fashionmnist", restarts=3)
    assert {r.settings.eps for r in runs} == {0.1, 0.15, 0.3}
    pgd = [r.settings for r in runs if r.attack == "pgd"]
    assert pgd and all(
        s.steps >= 50 and s.step_size <= s.eps / 4 and s.restarts == 3 and s.random_start
        for s in pgd
    )
    for name in ("apgd-ce", "apgd-dlr"):
        assert all(r.settings.steps == 100 for r in runs if r.attack == name)
    # every gradient attack on every objective that can be stronger; APGD-DLR once per eps
    for name in ("fgsm", "pgd", "apgd-ce"):
        got = {(r.settings.eps, r.settings.objective) for r in runs if r.attack == name}
        assert got == {(e, o) for e in (0.1, 0.15, 0.3) for o in ("mean-ce", "logits")}
    assert [r.settings.objective for r in runs if r.attack == "apgd-dlr"] == ["dlr"] * 3
    prob = strong_protocol("fashionmnist", combine="mean-prob", eps=[0.1])
    assert {r.settings.objective for r in prob if r.attack == "pgd"} == {"mean-ce", "prob"}
    one = strong_protocol("fashionmnist", objective="logits", eps=[0.1])
    assert [(r.attack, r.settings.objective) for r in one] == [
        ("fgsm", "logits"),
        ("pgd", "logits"),
        ("apgd-ce", "logits"),
        ("apgd-dlr", "dlr"),
    ]
    assert {r.settings.eps for r in strong_protocol("cifar10")} == {0.01, 0.02, 0.03, 0.09}


def test_custom_and_override_runs():
    runs = custom_runs(["fgsm", "apgd-dlr"], [0.05, 0.3], "fashionmnist", objective="logits")
    assert [(r.attack, r.settings.eps) for r in runs] == [
        ("fgsm", 0.05),
        ("fgsm", 0.3),
        ("apgd-dlr", 0.05),
        ("apgd-dlr", 0.3),
    ]
    assert runs[0].settings.objective == "logits"
    assert runs[2].settings.objective == "dlr"  # its own loss, --objective does not apply
    out = override_runs(runs, steps=7, step_size=0.01, restarts=2)
    assert out[0].settings.steps == 1 and out[2].settings.steps == 7
    assert [r.settings.step_size for r in out] == [0.05, 0.3, 0.01, 0.01]  # FGSM: a step of eps
    assert all(r.settings.restarts == 2 for r in out)
    with pytest.raises(UsageError):
        custom_runs(["nope"], [0.1], "fashionmnist")


def test_wilson_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0 and math.isclose(high, 1.959964**2 / (10 + 1.959964**2), rel_tol=1e-6)
    low, high = wilson_interval(50, 100)
    assert math.isclose(low + high, 1.0, abs_tol=1e-9) and 0.40 < low < 0.41


def test_evaluate_counts_match_a_hand_computation():
    ens = ensemble()
    x, y = data(20)
    runs = [AttackRun("fgsm", AttackSettings(eps=0.1, step_size=0.1))]
    report = evaluate(ens, x, y, runs, batch_size=7, seed=0)
    xf = x.float() / 255
    with torch.no_grad():
        clean = int((ens(xf).argmax(-1) == y).sum())
    xr = xf.clone().requires_grad_(True)
    logits = torch.stack([m(xr) for m in ens.members])
    loss = (
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(2), reduction="none")
        .view(2, -1)
        .mean(0)
        .sum()
    )
    (grad,) = torch.autograd.grad(loss, xr)
    with torch.no_grad():
        adv_correct = int((ens((xf + 0.1 * grad.sign()).clamp(0, 1)).argmax(-1) == y).sum())
    assert report.n == 20 and report.clean_correct == clean
    assert report.clean_accuracy == clean / 20
    (res,) = report.results
    assert (res.correct, res.n, res.accuracy) == (adv_correct, 20, adv_correct / 20)
    assert res.ci_low <= res.accuracy <= res.ci_high
    assert res.params == {
        "objective": "mean-ce",
        "steps": 1,
        "step_size": 0.1,
        "restarts": 1,
        "random_start": False,
        "decay": 1.0,
        "seed": 0,
    }
    payload = report.to_json()
    assert {"clean_accuracy", "n", "results", "checks"} <= payload.keys()
    assert {"attack", "eps", "accuracy", "params"} <= payload["results"][0].keys()
    assert all({"name", "passed", "detail"} <= c.keys() for c in payload["checks"])
    names = [c["name"] for c in payload["checks"]]
    assert {
        "eval-mode",
        "logits",
        "zero-gradients",
        "iterative-vs-fgsm",
        "monotone-in-eps",
        "black-box-weaker",
    } <= set(names)


def test_evaluate_is_seeded_and_batch_independent_for_deterministic_attacks():
    ens = ensemble()
    x, y = data(24)
    runs = [AttackRun("pgd", AttackSettings(eps=0.05, steps=3, step_size=0.02, random_start=True))]
    a = evaluate(ens, x, y, runs, batch_size=8, seed=4, checks=False)
    b = evaluate(ens, x, y, runs, batch_size=8, seed=4, checks=False)
    assert a.results[0].correct == b.results[0].correct
    assert a.checks == []


def test_checks_pass_on_a_sound_model_and_large_eps():
    ens = ensemble()
    x, y = data(20)
    runs = [AttackRun("fgsm", AttackSettings(eps=e, step_size=e)) for e in (0.05, 0.2)]
    runs += [
        AttackRun("pgd", AttackSettings(eps=e, steps=10, step_size=e / 4, random_start=True))
        for e in (0.05, 0.2)
    ]
    report = evaluate(ens, x, y, runs, batch_size=10, check_large_eps=True)
    checks = {c.name: c for c in report.checks}
    for name in ("eval-mode", "logits", "zero-gradients", "iterative-vs-fgsm", "large-eps"):
        assert checks[name].passed is True, checks[name]
    assert checks["black-box-weaker"].passed is None


def test_checks_catch_probabilities_zero_gradients_and_train_mode():
    x, y = data(12)
    runs = [AttackRun("fgsm", AttackSettings(eps=0.1))]
    checks = {c.name: c for c in evaluate(ensemble(Softmaxed), x, y, runs).checks}
    assert checks["logits"].passed is False and "probabilities" in checks["logits"].detail
    zero = Ensemble([Saturated(), Saturated()])
    checks = {c.name: c for c in evaluate(zero, x, y, runs).checks}
    assert checks["zero-gradients"].passed is False and "100.0%" in checks["zero-gradients"].detail
    checks = {c.name: c for c in evaluate(ensemble(StuckInTraining), x, y, runs).checks}
    assert checks["eval-mode"].passed is False
    report = evaluate(ensemble(StuckInTraining), x, y, runs)
    assert "eval-mode" in [c.name for c in report.failed_checks]


def result(attack: str, eps: float, accuracy: float, n: int = 1000) -> AttackResult:
    return AttackResult(attack, eps, accuracy, round(accuracy * n), n, 0.0, 1.0, {}, 0.0)


def test_result_checks_flag_masking_signs():
    runs = [
        AttackRun("fgsm", AttackSettings(eps=0.1)),
        AttackRun("pgd", AttackSettings(eps=0.1, steps=10, step_size=0.025)),
        AttackRun("pgd", AttackSettings(eps=0.3, steps=10, step_size=0.03)),
        AttackRun("square", AttackSettings(eps=0.1, steps=10)),
    ]
    good = [
        result("fgsm", 0.1, 0.5),
        result("pgd", 0.1, 0.3),
        result("pgd", 0.3, 0.0),
        result("square", 0.1, 0.4),
    ]
    assert all(c.passed for c in result_checks(good, runs))
    bad = [
        result("fgsm", 0.1, 0.2),
        result("pgd", 0.1, 0.3),
        result("pgd", 0.3, 0.5),
        result("square", 0.1, 0.1),
    ]
    checks = {c.name: c for c in result_checks(bad, runs)}
    assert checks["iterative-vs-fgsm"].passed is False
    assert checks["monotone-in-eps"].passed is False and "pgd" in checks["monotone-in-eps"].detail
    assert checks["black-box-weaker"].passed is False


def test_step_budget_check_flags_attacks_that_cannot_reach_eps():
    reach = [
        AttackRun("pgd", AttackSettings(eps=0.05, steps=10, step_size=0.0125)),
        AttackRun("bim", AttackSettings(eps=0.1, steps=10, step_size=0.01)),
    ]  # exactly eps
    short = reach + [AttackRun("pgd", AttackSettings(eps=0.3, steps=10, step_size=0.0125))]
    results = [result(r.attack, r.settings.eps, 0.1) for r in short]
    ok = {c.name: c for c in result_checks(results[:2], reach)}["step-budget"]
    assert ok.passed is True
    check = {c.name: c for c in result_checks(results, short)}["step-budget"]
    assert check.passed is False
    assert "pgd@0.3: 10 x 0.0125 = 0.125 < eps" in check.detail
    apgd = [AttackRun("apgd-ce", AttackSettings(eps=0.3, steps=100))]  # adaptive step: n/a
    assert {c.name: c for c in result_checks([result("apgd-ce", 0.3, 0.0)], apgd)}[
        "step-budget"
    ].passed is None


def test_evaluate_rejects_bad_runs():
    ens = ensemble()
    x, y = data(4)
    for settings in (AttackSettings(eps=0.0), AttackSettings(eps=0.1, steps=0)):
        with pytest.raises(UsageError):
            evaluate(ens, x, y, [AttackRun("pgd", settings)])
    with pytest.raises(UsageError):
        evaluate(ens, x, y, [AttackRun("nope", AttackSettings(eps=0.1))])
    with pytest.raises(UsageError):
        evaluate(ens, x, y, [], batch_size=4)
