"""MC-PGD: L-inf PGD on the member that currently holds the ensemble's correct answer.

Averaging the members' losses (the usual ensemble attack objective) lets members whose input
gradients point in different directions cancel each other out, which is exactly what gradient-
diversity defenses (NCEn, GAL, GPMR, TRS) encourage. MC-PGD instead picks, at every step and for
every example separately, one member and ascends that member's cross-entropy only:

* ``select="confidence"`` (default): the member with the highest softmax probability on the true
  class, i.e. the one most responsible for the ensemble still being right;
* ``select="margin"``: the member with the largest logit margin z_y - max_{c != y} z_c.

Each step: x <- clip_[0,1](Pi_{B_inf(x0, eps)}(x + step_size * sign(grad_x CE(f_s(x), y)))), with s
the selected member. Distance: L-inf, radius ``settings.eps``. Settings used: ``eps``, ``steps``,
``step_size`` (default eps / 4), ``restarts`` (counted worst-case per example: an example counts as
broken if any iterate of any restart fools the ensemble's combined prediction), ``random_start``
and ``extra["select"]``; ``objective`` is ignored (the selection rule is the objective). Defaults:
50 steps of eps / 4 from a random start, 1 restart (the same budget as ncen's ``pgd``).

The target's parameters are frozen during the attack (``requires_grad`` off, restored after), so
they receive no gradients; its train/eval mode is left untouched.
Shapes: x, x_adv (B, C, H, W) in [0, 1]; y (B,).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from ncen_cli.attacks.base import Attack, AttackSettings, AttackTarget
from torch import nn

SELECT_RULES = ("confidence", "margin")


def select_members(logits: torch.Tensor, y: torch.Tensor, rule: str = "confidence") -> torch.Tensor:
    """Index of the member to attack for each example. logits: (k, B, C), y: (B,) -> (B,)."""
    if rule == "confidence":
        score = (
            torch.softmax(logits.float(), dim=-1)
            .gather(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1))
            .squeeze(2)
        )
    elif rule == "margin":
        true = logits.gather(2, y.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
        others = logits.masked_fill(
            F.one_hot(y, logits.shape[2]).bool().unsqueeze(0), float("-inf")
        )
        score = true - others.amax(dim=2)
    else:
        raise ValueError(f"unknown mc-pgd select rule '{rule}'; choose one of {SELECT_RULES}")
    return score.argmax(dim=0)  # (B,)


def _selected_loss(
    target: AttackTarget, x: torch.Tensor, y: torch.Tensor, rule: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over the batch of the CE of each example's selected member, and whether the ensemble
    is already fooled at ``x`` ((B,) bool, from the same forward pass)."""
    logits = target.member_logits(x)  # (k, B, C)
    with torch.no_grad():
        chosen = select_members(logits, y, rule)
        fooled = target.combine_logits(logits).argmax(dim=1) != y
    picked = logits[chosen, torch.arange(x.shape[0], device=x.device)]  # (B, C)
    return F.cross_entropy(picked.float(), y, reduction="sum"), fooled


def _fooled(target: AttackTarget, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return target.combine_logits(target.member_logits(x)).argmax(dim=1) != y


@contextmanager
def _frozen(target: AttackTarget) -> Iterator[None]:
    """Parameters of ``target`` stop requiring gradients for the attack, then are restored."""
    params = list(target.parameters()) if isinstance(target, nn.Module) else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def perturb(
    target: AttackTarget,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AttackSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial images within ``settings.eps`` (L-inf) of ``x``, in [0, 1]. (B, C, H, W).

    An example keeps the first iterate (of any step or restart) that fools the ensemble's combined
    prediction; an example never fooled gets the last iterate of the last restart.
    """
    eps = float(settings.eps)
    step_size = float(settings.step_size) if settings.step_size is not None else eps / 4
    rule = str(settings.extra.get("select", "confidence"))
    if rule not in SELECT_RULES:
        raise ValueError(f"unknown mc-pgd select rule '{rule}'; choose one of {SELECT_RULES}")
    x0 = x.detach().float()
    best = x0.clone()
    best_fooled = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)

    def keep(adv: torch.Tensor, fooled: torch.Tensor) -> None:
        open_ = ~best_fooled
        best[open_] = adv[open_]
        best_fooled.logical_or_(fooled)

    with _frozen(target):
        for _ in range(max(1, int(settings.restarts))):
            adv = x0.clone()
            if settings.random_start:
                where = generator.device if generator is not None else x0.device
                noise = torch.rand(x0.shape, generator=generator, device=where).to(x0.device)
                adv = (x0 + (2 * noise - 1) * eps).clamp(0, 1)
            for _ in range(int(settings.steps)):
                with torch.enable_grad():  # also works when the caller runs under no_grad
                    adv.requires_grad_(True)
                    loss, fooled = _selected_loss(target, adv, y, rule)
                    (grad,) = torch.autograd.grad(loss, adv)
                adv = adv.detach()
                keep(adv, fooled)
                adv = adv + step_size * grad.sign()
                adv = torch.min(torch.max(adv, x0 - eps), x0 + eps).clamp(0, 1)
            keep(adv, _fooled(target, adv, y))
    return best


def defaults(eps: float) -> dict:
    """Settings used when the user gives none: 50 steps of eps/4 from a random start."""
    return {"steps": 50, "step_size": eps / 4, "random_start": True, "restarts": 1}


ATTACK = Attack(
    name="mc-pgd",
    summary="PGD on the member most confident in the true class, re-chosen per example and step",
    perturb=perturb,
    defaults=defaults,
    white_box=True,
)
