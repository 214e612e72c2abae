"""The framework-side attack runner (``Attack.perturb``) around an attack's single run: validation,
float conversion, frozen parameters with gradients enabled, worst-case restarts, the eps-ball
guard; typed options settable with ``-o``; single-step from ``steps == 1``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from helpers import save_tiny_checkpoint
from ncen_cli.attacks.base import (
    OBJECTIVES,
    Attack,
    AttackOption,
    AttackSettings,
    RunInput,
    run_options,
    with_attack_options,
)
from ncen_cli.attacks.fgsm import ATTACK as FGSM
from ncen_cli.attacks.pgd import BIM, PGD
from ncen_cli.attacks.square import ATTACK as SQUARE
from ncen_cli.cli import app
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import NcenError, UsageError
from ncen_cli.registry import registered


def _linear_ensemble(seed: int = 0) -> Ensemble:
    torch.manual_seed(seed)
    return Ensemble([nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(2)]).eval()


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _attack(run, **kw) -> Attack:
    return Attack("test-runner", "test", run, lambda eps: {}, **kw)


def test_runner_converts_uint8_freezes_parameters_and_enables_gradients() -> None:
    ens = _linear_ensemble()
    seen = {}

    def run(job: RunInput) -> torch.Tensor:
        seen["dtype"], seen["max"] = job.x.dtype, float(job.x.max())
        seen["grad_enabled"] = torch.is_grad_enabled()
        seen["frozen"] = not any(p.requires_grad for p in job.target.parameters())
        return job.x

    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    with torch.no_grad():
        out = _attack(run).perturb(ens, x, torch.zeros(2, dtype=torch.long), AttackSettings(0.1))
    assert seen == {"dtype": torch.float32, "max": 1.0, "grad_enabled": True, "frozen": True}
    assert out.dtype == torch.float32
    assert all(p.requires_grad for p in ens.parameters())  # restored


class PixelThreshold(nn.Module):
    """Class 1 when pixel (0, 0, 0) is above 0.5, else class 0; example i is marked by pixel
    (0, 1, 1) = i / 10."""

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        up = (x[:, 0, 0, 0] > 0.5).float()
        return torch.stack([1 - up, up], dim=1).unsqueeze(0)

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.mean(0)


def test_runner_counts_restarts_worst_case_and_reruns_only_the_robust() -> None:
    """Restart r fools example r only: after 3 restarts examples 0, 1 and 2 are fooled, and each
    restart after the first attacks only the examples that survived every earlier one."""
    x = torch.full((6, 1, 4, 4), 0.4)
    x[:, 0, 1, 1] = torch.arange(6) / 10
    y = torch.zeros(6, dtype=torch.long)
    sizes: list[int] = []

    def run(job: RunInput) -> torch.Tensor:
        restart = len(sizes)
        sizes.append(len(job.x))
        out = job.x.clone()
        out[(job.x[:, 0, 1, 1] * 10).round() == restart, 0, 0, 0] = 0.6
        return out

    out = _attack(run).perturb(PixelThreshold(), x, y, AttackSettings(0.3, restarts=3))
    assert (out[:, 0, 0, 0] > 0.5).tolist() == [True, True, True, False, False, False]
    assert sizes == [6, 5, 4]


@pytest.mark.parametrize("leave", ["ball", "range"])
def test_runner_refuses_an_image_outside_the_ball_or_the_unit_range(leave: str) -> None:
    x, y = _batch()

    def run(job: RunInput) -> torch.Tensor:
        return job.x + 0.2 if leave == "ball" else job.x * 0 - 0.01

    with pytest.raises(NcenError, match="attack test-runner left the eps ball or"):
        _attack(run).perturb(_linear_ensemble(), x, y, AttackSettings(0.1))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (AttackSettings(eps=0.0), r"eps must be in \(0, 1\]"),
        (AttackSettings(eps=1.5), r"eps must be in \(0, 1\]"),
        (AttackSettings(eps=0.1, steps=0), "--steps must be >= 1, got 0 \\(pgd\\)"),
        (AttackSettings(eps=0.1, restarts=0), "--restarts must be >= 1"),
        (AttackSettings(eps=0.1, step_size=-1.0), "--step-size must be > 0"),
        (AttackSettings(eps=0.1, objective="dlr"), "unknown objective 'dlr' for pgd"),
        (AttackSettings(eps=0.1, extra={"early_stop": "maybe"}), "early_stop='maybe': not a bool"),
    ],
)
def test_settings_are_validated_once_by_the_runner(settings, message) -> None:
    x, y = _batch(2)
    with pytest.raises(UsageError, match=message):
        PGD.perturb(_linear_ensemble(), x, y, settings)


def test_an_attack_with_its_own_loss_ignores_the_objective_and_reports_its_loss() -> None:
    assert SQUARE.own_loss == "margin" and not SQUARE.uses_objective
    assert PGD.uses_objective and "margin" not in OBJECTIVES
    assert SQUARE.settings_for(0.1, "logits").objective == "margin"
    assert PGD.settings_for(0.1, "logits").objective == "logits"
    assert PGD.settings_for(0.1, steps=None, restarts=3).restarts == 3


def test_single_step_is_decided_by_steps_not_by_the_name() -> None:
    """PGD with one step of size eps from x is FGSM, bit for bit: the step is taken even for an
    example that is already misclassified (no early stop on a single step)."""
    ens = _linear_ensemble(2)
    x, y = _batch(16)
    with torch.no_grad():
        y[0] = (ens(x[:1]).argmax(1) + 1) % 3  # example 0 starts misclassified
    one = AttackSettings(eps=0.1, steps=1, step_size=0.1)
    fgsm = FGSM.perturb(ens, x, y, one)
    pgd = PGD.perturb(ens, x, y, one)
    assert torch.equal(fgsm, pgd)
    assert not torch.equal(fgsm[0], x[0])  # stepped although already adversarial
    assert PGD.run is BIM.run  # PGD and BIM: one body, two registrations


def test_options_parse_typed_values_and_reject_bad_ones() -> None:
    option = AttackOption(0.8, "fraction", float, minimum=1e-6, maximum=1.0)
    assert option.parse("p_init", "0.5") == 0.5
    with pytest.raises(UsageError, match="-o p_init=abc: not a float"):
        option.parse("p_init", "abc")
    with pytest.raises(UsageError, match="p_init must be <= 1"):
        option.parse("p_init", "2")
    assert AttackOption(True, "flag", bool).parse("early_stop", "false") is False
    assert run_options(["p-init=0.5", "select=margin"]) == {"p_init": "0.5", "select": "margin"}
    with pytest.raises(UsageError, match="write -o name=value"):
        run_options(["p_init"])
    with pytest.raises(UsageError, match="given twice"):
        run_options(["a=1", "a=2"])


def test_with_attack_options_sets_declared_options_and_rejects_unknown_ones() -> None:
    runs = [("pgd", AttackSettings(0.1)), ("square", SQUARE.settings_for(0.1))]
    pgd, square = with_attack_options(runs, ["p_init=0.25"])
    assert pgd.extra == {} and square.extra == {"p_init": 0.25}
    with pytest.raises(
        UsageError,
        match=r"-o select: no attack of this run has that option; "
        r"options: early_stop \(pgd\), p_init \(square\)",
    ):
        with_attack_options(runs, ["select=margin"])


def test_an_api_2_attack_is_refused_in_one_line() -> None:
    with pytest.raises(TypeError, match=r"written for ncen plugin API 2 \(Attack\(perturb=...\)\)"):
        Attack("old", "old style", perturb=lambda *a: a[1], defaults=lambda eps: {})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "syn.safetensors")


def _cli(*args) -> object:
    return CliRunner().invoke(app, [*map(str, args), "--device", "cpu", "--test-limit", "8"])


def test_cli_attack_option_reaches_the_run_and_its_report(checkpoint) -> None:
    seen: list[AttackSettings] = []

    def run(job: RunInput) -> torch.Tensor:
        seen.append(job.settings)
        return job.x

    spy = Attack(
        "test-options",
        "spy",
        run,
        lambda eps: {"steps": 2},
        options={"width": AttackOption(3, "an integer option", int, minimum=1)},
    )
    with registered("attacks", spy):
        res = _cli(
            "attack",
            checkpoint,
            "--attacks",
            "test-options",
            "--eps",
            "0.1",
            "-o",
            "width=5",
            "--json",
        )
        assert res.exit_code == 0, res.output
        assert seen and all(s.extra == {"width": 5} for s in seen)
        assert json.loads(res.stdout)["results"][0]["params"]["width"] == 5
        bad = _cli(
            "attack", checkpoint, "--attacks", "test-options", "--eps", "0.1", "-o", "width=0"
        )
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines() == ["error: attack option width must be >= 1, got 0"]


def test_cli_transfer_rejects_an_option_no_attack_has(checkpoint) -> None:
    res = _cli("transfer", checkpoint, "--attacks", "pgd", "-o", "select=margin")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "-o select: no attack of this run has that option" in lines[0]
