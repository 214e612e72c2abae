"""mc-pgd: member selection, the L-inf ball, frozen parameters, and an accuracy drop."""

from __future__ import annotations

import pytest
import torch
from ncen_cli.attacks.base import AttackSettings, RunInput, frozen_parameters, worst_case_restarts
from ncen_cli.data.synthetic import make_arrays
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import UsageError
from torch import nn

from ncen_extra import mc_pgd


def test_select_members_by_confidence_and_by_margin() -> None:
    # sample 0: member 1 puts most probability on y=0; sample 1: member 0 on y=2
    logits = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
            [[4.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
        ]
    )  # (k=2, B=2, C=3)
    y = torch.tensor([0, 2])
    assert mc_pgd.select_members(logits, y, "confidence").tolist() == [1, 0]
    # margins: member 0 -> [1, 3], member 1 -> [4, 1]; confidence and margin can disagree
    wide = torch.tensor([[[5.0, 4.9, -9.0]], [[3.0, 0.0, 0.0]]])
    y0 = torch.tensor([0])
    assert mc_pgd.select_members(wide, y0, "margin").tolist() == [1]
    assert mc_pgd.select_members(logits, y, "margin").tolist() == [1, 0]
    with pytest.raises(ValueError):
        mc_pgd.select_members(logits, y, "nope")


@pytest.fixture(scope="module")
def trained() -> tuple[Ensemble, torch.Tensor, torch.Tensor]:
    """A 3-member linear ensemble fitted on the synthetic stripes (seconds on a CPU)."""
    torch.manual_seed(0)
    arrays = make_arrays(n_train=256, n_test=64)
    x = arrays.train_x.float() / 255
    members = [nn.Sequential(nn.Flatten(), nn.Linear(144, 4)) for _ in range(3)]
    ens = Ensemble(members)
    opt = torch.optim.Adam(ens.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        logits = ens.member_logits(x)
        nn.functional.cross_entropy(logits.flatten(0, 1), arrays.train_y.repeat(3)).backward()
        opt.step()
    ens.eval()
    ens.zero_grad(set_to_none=True)
    return ens, arrays.test_x.float() / 255, arrays.test_y


def _accuracy(ens: Ensemble, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (ens(x).argmax(1) == y).float().mean().item()


def test_attack_stays_in_the_ball_and_lowers_accuracy(trained) -> None:
    ens, x, y = trained
    clean = _accuracy(ens, x, y)
    assert clean > 0.9
    params = [p.detach().clone() for p in ens.parameters()]
    eps = 0.25
    settings = AttackSettings(eps=eps, **mc_pgd.defaults(eps) | {"steps": 10})
    x_adv = mc_pgd.perturb(ens, x, y, settings, torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert _accuracy(ens, x_adv, y) < clean - 0.3
    # parameters untouched, no gradients left on them, mode unchanged
    assert all(torch.equal(a, b) for a, b in zip(params, ens.parameters(), strict=True))
    assert all(p.grad is None for p in ens.parameters())
    assert all(p.requires_grad for p in ens.parameters())  # frozen only during the attack
    assert not ens.training


def test_more_budget_is_not_weaker_and_margin_rule_works(trained) -> None:
    ens, x, y = trained
    small = AttackSettings(eps=0.05, steps=10, step_size=0.0125, random_start=False)
    large = AttackSettings(
        eps=0.25, steps=10, step_size=0.0625, random_start=False, extra={"select": "margin"}
    )
    acc_small = _accuracy(ens, mc_pgd.perturb(ens, x, y, small), y)
    adv_large = mc_pgd.perturb(ens, x, y, large)
    assert (adv_large - x).abs().max().item() <= 0.25 + 1e-6
    assert _accuracy(ens, adv_large, y) <= acc_small


def test_restarts_are_counted_worst_case(trained) -> None:
    ens, x, y = trained
    one = AttackSettings(eps=0.1, steps=3, step_size=0.03, random_start=True, restarts=1)
    three = AttackSettings(eps=0.1, steps=3, step_size=0.03, random_start=True, restarts=3)
    adv1 = mc_pgd.perturb(ens, x, y, one, torch.Generator().manual_seed(3))
    adv3 = mc_pgd.perturb(ens, x, y, three, torch.Generator().manual_seed(3))
    # the first restart of both runs is identical, so extra restarts can only break more examples
    with torch.no_grad():
        fooled1 = ens(adv1).argmax(1) != y
        fooled3 = ens(adv3).argmax(1) != y
    assert bool((fooled3 | ~fooled1).all())
    assert (adv3 - x).abs().max().item() <= 0.1 + 1e-6


def test_unknown_select_rule_is_rejected(trained) -> None:
    ens, x, y = trained
    with pytest.raises(UsageError, match="select='x'; choose one of confidence, margin"):
        mc_pgd.perturb(ens, x[:2], y[:2], AttackSettings(eps=0.1, steps=1, extra={"select": "x"}))
    with pytest.raises(UsageError, match="choose one of"):
        mc_pgd.ATTACK.with_options(AttackSettings(eps=0.1), {"select": "nope"})


def test_restarts_are_the_runners_worst_case_restarts(trained) -> None:
    """mc-pgd's restarts are ncen's: the same images as the runner's worst_case_restarts around
    mc-pgd's single run, drawing from the generator in the same order."""
    ens, x, y = trained
    settings = AttackSettings(eps=0.1, steps=3, step_size=0.03, random_start=True, restarts=3)
    got = mc_pgd.perturb(ens, x, y, settings, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    with frozen_parameters(ens):
        expected = worst_case_restarts(
            ens, x, y, 3, lambda xs, ys: mc_pgd.run(RunInput(ens, xs, ys, settings, gen))
        )
    assert torch.equal(got, expected)


def test_select_option_is_settable_from_text() -> None:
    settings = mc_pgd.ATTACK.with_options(AttackSettings(eps=0.1), {"select": "margin"})
    assert settings.extra == {"select": "margin"}
    assert mc_pgd.ATTACK.option(AttackSettings(eps=0.1), "select") == "confidence"


def test_attack_works_when_called_under_no_grad(trained) -> None:
    ens, x, y = trained
    with torch.no_grad():
        x_adv = mc_pgd.perturb(ens, x[:8], y[:8], AttackSettings(eps=0.1, steps=2, step_size=0.05))
    assert 0 < (x_adv - x[:8]).abs().max().item() <= 0.1 + 1e-6
