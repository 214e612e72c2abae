"""MC-PGD: L-inf PGD on the member that currently holds the ensemble's correct answer.

Averaging the members' losses (the usual ensemble attack objective) lets members whose input
gradients point in different directions cancel each other out, which is exactly what gradient-
diversity defenses (NCEn, GAL, GPMR, TRS) encourage. MC-PGD instead picks, at every step and for
every example separately, one member and ascends that member's cross-entropy only:

* ``select="confidence"`` (default): the member with the highest softmax probability on the true
  class, i.e. the one most responsible for the ensemble still being right;
* ``select="margin"``: the member with the largest logit margin z_y - max_{c != y} z_c.

Each step: x <- clip_[0,1](Pi_{B_inf(x0, eps)}(x + step_size * sign(grad_x CE(f_s(x), y)))), with s
the selected member; an example keeps the first iterate that fools the ensemble's combined
prediction (ncen's :func:`~ncen_cli.attacks.core.sign_ascent` with this loss). Distance: L-inf,
radius ``settings.eps``. Settings used: ``eps``, ``steps``, ``step_size`` (default eps / 4),
``restarts``, ``random_start`` and option ``select`` (``-o select=margin``); ``objective`` does
not apply (the selection rule is the objective: ``own_loss`` is ``selected-ce``). Defaults: 50
steps of eps / 4 from a random start, 1 restart (the same budget as ncen's ``pgd``).

This module implements the single run only; ncen's runner (plugin API 3) validates the settings,
freezes the target's parameters, counts restarts worst-case per example exactly as for ncen's own
attacks (an example counts as robust only if it survives every restart) and checks that every
image stays in the eps ball and [0, 1].
Shapes: x, x_adv (B, C, H, W) in [0, 1]; y (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ncen_cli.attacks.base import Attack, AttackOption, AttackTarget, RunInput
from ncen_cli.attacks.core import LossFn, sign_ascent

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


def selected_loss(rule: str) -> LossFn:
    """``loss_fn(target, x, y) -> (CE of each example's selected member (B,), combined logits
    (B, C))`` for :func:`~ncen_cli.attacks.core.sign_ascent`; every member runs once."""

    def loss_fn(target: AttackTarget, x: torch.Tensor, y: torch.Tensor):
        logits = target.member_logits(x)  # (k, B, C)
        with torch.no_grad():
            chosen = select_members(logits, y, rule)
        picked = logits[chosen, torch.arange(x.shape[0], device=x.device)]  # (B, C)
        return F.cross_entropy(picked.float(), y, reduction="none"), target.combine_logits(logits)

    return loss_fn


def run(job: RunInput) -> torch.Tensor:
    """One MC-PGD run: ``job.x`` (B, C, H, W) float32 in [0, 1], ``job.y`` (B,) -> x_adv
    (B, C, H, W)."""
    settings = job.settings
    step_size = settings.step_size if settings.step_size is not None else settings.eps / 4
    return sign_ascent(
        job.target,
        job.x,
        job.y,
        eps=settings.eps,
        steps=settings.steps,
        step_size=step_size,
        loss_fn=selected_loss(str(ATTACK.option(settings, "select"))),
        random_start=settings.random_start,
        generator=job.generator,
    )


def defaults(eps: float) -> dict:
    """Settings used when the user gives none: 50 steps of eps/4 from a random start."""
    return {"steps": 50, "step_size": eps / 4, "random_start": True, "restarts": 1}


ATTACK = Attack(
    name="mc-pgd",
    summary="PGD on the member most confident in the true class, re-chosen per example and step",
    run=run,
    defaults=defaults,
    options={
        "select": AttackOption(
            "confidence",
            "which member each step ascends: confidence (highest true-class probability) or margin",
            str,
            choices=SELECT_RULES,
        )
    },
    own_loss="selected-ce",
)
perturb = ATTACK.perturb  # the runner: restarts, validation, frozen parameters
