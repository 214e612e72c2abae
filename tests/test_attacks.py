"""The attacks on tiny models, against hand-computed steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ncen_cli.attacks.apgd import APGD_CE, APGD_DLR, checkpoints, dlr_loss
from ncen_cli.attacks.base import (
    AttackSettings,
    MemberTarget,
    frozen_parameters,
    objective_loss,
    worst_case_restarts,
)
from ncen_cli.attacks.core import sign_ascent
from ncen_cli.attacks.fgsm import ATTACK as FGSM
from ncen_cli.attacks.mifgsm import ATTACK as MIFGSM
from ncen_cli.attacks.pgd import BIM, PGD
from ncen_cli.attacks.square import ATTACK as SQUARE
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import UsageError

SHAPE = (1, 4, 4)
D = 16


class Linear(nn.Module):
    """Logits = W x.flatten() + b: input gradients are exact and easy to compute by hand."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias if bias is not None else torch.zeros(weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


class Zero(nn.Module):
    """A member whose output ignores its input: every input gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([2.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def linear_ensemble(seed: int = 0, classes: int = 3) -> Ensemble:
    gen = torch.Generator().manual_seed(seed)
    members = [Linear(torch.randn(classes, D, generator=gen)) for _ in range(2)]
    return Ensemble(members).eval()


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.2


def hand_gradient(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dx of mean_i CE(W_i x + b_i, y), written out: mean_i W_i^T (softmax_i - onehot(y))."""
    onehot = F.one_hot(y, ensemble.members[0].weight.shape[0]).float()
    grads = []
    for m in ensemble.members:
        p = torch.softmax(x.flatten(1) @ m.weight.detach().T + m.bias.detach(), -1)
        grads.append((p - onehot) @ m.weight.detach())
    return torch.stack(grads).mean(0).view_as(x)


def test_fgsm_is_one_signed_step():
    ens, x = linear_ensemble(), images()
    y = torch.arange(len(x)) % 3
    eps = 0.1
    x_adv = FGSM.perturb(ens, x, y, AttackSettings(eps=eps), torch.Generator())
    expected = (x + eps * hand_gradient(ens, x, y).sign()).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)


def test_fgsm_clips_to_unit_interval():
    ens = linear_ensemble()
    x = torch.zeros(4, *SHAPE)
    x[:, 0, 0] = 1.0
    y = torch.zeros(4, dtype=torch.long)
    x_adv = FGSM.perturb(ens, x, y, AttackSettings(eps=0.3), None)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    expected = (x + 0.3 * hand_gradient(ens, x, y).sign()).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)


def correct_labels(ens: Ensemble, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ens(x).argmax(-1)


@pytest.mark.parametrize("attack", [PGD, BIM])
def test_one_iteration_equals_hand_step(attack):
    ens, x = linear_ensemble(), images()
    y = correct_labels(ens, x)  # clean points classified correctly: the step is taken
    alpha, eps = 0.03, 0.05
    s = AttackSettings(eps=eps, steps=1, step_size=alpha, random_start=False)
    x_adv = attack.perturb(ens, x, y, s, torch.Generator().manual_seed(0))
    step = x + alpha * hand_gradient(ens, x, y).sign()
    assert torch.allclose(x_adv, step.clamp(x - eps, x + eps).clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("attack", [PGD, BIM, MIFGSM, APGD_CE, APGD_DLR, FGSM])
def test_stays_in_ball_and_box(attack):
    ens, x = linear_ensemble(), images(16)
    y = correct_labels(ens, x)
    eps = 0.07
    s = AttackSettings(eps=eps, steps=12, step_size=0.05, random_start=True, restarts=2)
    x_adv = attack.perturb(ens, x, y, s, torch.Generator().manual_seed(3))
    assert x_adv.dtype == torch.float32 and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not ens.training
    assert all(p.requires_grad for p in ens.parameters())


@pytest.mark.parametrize("attack", [PGD, APGD_CE, MIFGSM])
def test_iterative_attack_beats_clean(attack):
    ens, x = linear_ensemble(), images(16)
    y = correct_labels(ens, x)
    s = AttackSettings(eps=0.5, steps=20, step_size=0.05, random_start=attack is not MIFGSM)
    x_adv = attack.perturb(ens, x, y, s, torch.Generator().manual_seed(0))
    assert (ens(x_adv).argmax(-1) == y).float().mean() < 1.0


def test_mifgsm_momentum_step_by_hand():
    ens, x = linear_ensemble(), images(4)
    y = correct_labels(ens, x)
    s = AttackSettings(eps=0.2, steps=2, step_size=0.01, decay=0.5)
    x_adv = MIFGSM.perturb(ens, x, y, s, None)
    g1 = hand_gradient(ens, x, y)
    m1 = g1 / g1.abs().mean(dim=(1, 2, 3), keepdim=True)
    x1 = (x + 0.01 * m1.sign()).clamp(0, 1)
    g2 = hand_gradient(ens, x1, y)
    m2 = 0.5 * m1 + g2 / g2.abs().mean(dim=(1, 2, 3), keepdim=True)
    x2 = (x1 + 0.01 * m2.sign()).clamp(0, 1)
    still = ens(x1).argmax(-1) == y
    assert torch.allclose(x_adv[still], x2[still], atol=1e-6)


def test_mifgsm_zero_gradient_gives_no_nan():
    ens = Ensemble([Zero(), Zero()]).eval()
    x = images(4)
    y = torch.zeros(4, dtype=torch.long)
    x_adv = MIFGSM.perturb(ens, x, y, AttackSettings(eps=0.1, steps=5, step_size=0.01), None)
    assert torch.isfinite(x_adv).all()
    assert torch.equal(x_adv, x)  # no gradient, no movement


def test_parameters_get_no_gradient():
    ens, x = linear_ensemble(), images()
    y = correct_labels(ens, x)
    PGD.perturb(ens, x, y, AttackSettings(eps=0.1, steps=3, step_size=0.02), None)
    assert all(p.grad is None for p in ens.parameters())
    with frozen_parameters(ens):
        assert not any(p.requires_grad for p in ens.parameters())
    assert all(p.requires_grad for p in ens.parameters())


class Scripted(nn.Module):
    """Predicts correctly unless the image's first pixel is one of the 'fooling' values."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        fooled = x.flatten(1)[:, 0] > 0.5
        logits = torch.stack([(~fooled).float(), fooled.float()], -1)  # label 0 correct
        return logits.unsqueeze(0)

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.mean(0)


def test_worst_case_restarts_counts_any_success():
    target = Scripted()
    x = torch.zeros(4, 1, 1, 2)
    y = torch.zeros(4, dtype=torch.long)
    # restart r fools example r only (example 3 is never fooled)
    calls: list[torch.Tensor] = []

    def run_once(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        r = len(calls)
        calls.append(xs.clone())
        out = xs.clone()
        ids = xs[:, 0, 0, 1].long()
        out[ids == r, 0, 0, 0] = 1.0
        return out

    x[:, 0, 0, 1] = torch.arange(4).float()
    adv = worst_case_restarts(target, x, y, 3, run_once)
    preds = target.combine_logits(target.member_logits(adv)).argmax(-1)
    assert preds.tolist() == [1, 1, 1, 0]  # robust only if it survives every restart
    assert [len(c) for c in calls] == [4, 3, 2]  # later restarts attack only the survivors
    # one restart: only example 0 is fooled
    calls.clear()
    adv1 = worst_case_restarts(target, x, y, 1, run_once)
    assert target.combine_logits(target.member_logits(adv1)).argmax(-1).tolist() == [1, 0, 0, 0]


def test_objectives_match_hand_computation():
    ens, x = linear_ensemble(classes=4), images(5)
    y = torch.tensor([0, 1, 2, 3, 0])
    logits = torch.stack([m(x) for m in ens.members]).detach()
    log_p = torch.log_softmax(logits, -1)
    mean_ce = -(log_p[:, torch.arange(5), y]).mean(0)
    combined = logits.mean(0)
    ce_logits = -torch.log_softmax(combined, -1)[torch.arange(5), y]
    prob = -torch.log(torch.softmax(logits, -1).mean(0)[torch.arange(5), y])
    for name, want in (("mean-ce", mean_ce), ("logits", ce_logits), ("prob", prob)):
        got, comb = objective_loss(ens, x, y, name)
        assert torch.allclose(got, want, atol=1e-5), name
        assert torch.allclose(comb, combined, atol=1e-6)
    with pytest.raises(ValueError):
        objective_loss(ens, x, y, "nope")


@pytest.mark.parametrize("objective", ["logits", "prob"])
def test_fgsm_follows_the_objective(objective):
    ens, x = linear_ensemble(), images()
    y = torch.arange(len(x)) % 3
    xr = x.clone().requires_grad_(True)
    loss, _ = objective_loss(ens, xr, y, objective)
    (grad,) = torch.autograd.grad(loss.sum(), xr)
    x_adv = FGSM.perturb(ens, x, y, AttackSettings(eps=0.1, objective=objective), None)
    assert torch.allclose(x_adv, (x + 0.1 * grad.sign()).clamp(0, 1), atol=1e-6)


def test_dlr_loss_by_hand():
    ens = linear_ensemble(classes=4)
    x = images(3)
    y = torch.tensor([0, 1, 2])
    loss, z = dlr_loss(ens, x, y)
    for i in range(3):
        zs = sorted(z[i].tolist(), reverse=True)
        other = max(v for j, v in enumerate(z[i].tolist()) if j != y[i])
        want = -(z[i, y[i]].item() - other) / (zs[0] - zs[2] + 1e-12)
        assert math.isclose(loss[i].item(), want, rel_tol=1e-4, abs_tol=1e-6)
    two = linear_ensemble(classes=2)
    with pytest.raises(UsageError):
        dlr_loss(two, x, torch.tensor([0, 1, 0]))


def test_apgd_checkpoints():
    marks = checkpoints(100)
    assert marks[:4] == [22, 41, 57, 70]
    assert all(0 < m < 100 for m in marks) and marks == sorted(marks)


def test_sign_ascent_keeps_first_fooling_iterate():
    target = Scripted()
    x = torch.zeros(2, 1, 1, 2)
    x[1, 0, 0, 0] = 0.6  # already fooled at the start: kept as is
    y = torch.zeros(2, dtype=torch.long)

    def loss_fn(t, xs, ys):
        return xs.flatten(1)[:, 0] * 1.0, t.combine_logits(t.member_logits(xs))

    adv = sign_ascent(target, x, y, eps=0.3, steps=3, step_size=0.1, loss_fn=loss_fn)
    assert torch.equal(adv[1], x[1])
    assert math.isclose(adv[0, 0, 0, 0].item(), 0.3, abs_tol=1e-6)


def test_member_target_and_square():
    gen = torch.Generator().manual_seed(0)
    member = Linear(torch.randn(3, D, generator=gen))
    target = MemberTarget(member).eval()
    x = images(6)
    y = correct_labels(target, x)
    s = AttackSettings(eps=0.3, steps=30, extra={"p_init": 0.5}, objective="margin")
    adv = SQUARE.perturb(target, x, y, s, torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not target.training


@pytest.mark.parametrize(
    "bad",
    [
        dict(eps=0.0),
        dict(eps=1.5),
        dict(eps=0.1, steps=0),
        dict(eps=0.1, restarts=0),
        dict(eps=0.1, step_size=-1.0),
    ],
)
def test_bad_settings_are_usage_errors(bad):
    ens, x = linear_ensemble(), images(2)
    with pytest.raises(UsageError):
        PGD.perturb(ens, x, torch.zeros(2, dtype=torch.long), AttackSettings(**bad), None)
