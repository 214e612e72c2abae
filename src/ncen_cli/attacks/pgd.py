"""PGD: projected gradient descent from a random start (Madry et al., 2018, arXiv:1706.06083).

Distance: L-infinity. From a uniform random point of the eps ball, ``steps`` iterations of
``x <- project(x + step_size * sign(grad_x L(x, y)))`` onto the eps ball and [0, 1]; ``restarts``
independent random starts counted worst-case per example (see
:func:`ncen_cli.attacks.core.worst_case_restarts`). ``L`` is the chosen ensemble objective.
Defaults (when no settings are given): 50 steps of eps/4, random start, 1 restart. The paper's
protocol uses 40 steps of size eps (advertorch LinfPGDAttack). An iterate that is already
misclassified is kept (the attack never loses an adversarial example it found).
Shapes: x (B, C, H, W) float32 in [0, 1], y (B,), x_adv like x.

Example::

    from ncen_cli.attacks.pgd import ATTACK
    settings = AttackSettings(eps=0.1, steps=50, step_size=0.025, random_start=True, restarts=2)
    x_adv = ATTACK.perturb(ensemble, x, y, settings, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from typing import Any

import torch

from ncen_cli.attacks.base import Attack, AttackSettings, AttackTarget
from ncen_cli.attacks.core import sign_ascent_attack


def perturb(
    target: AttackTarget,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AttackSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return sign_ascent_attack(target, x, y, settings, generator, default_step_fraction=0.25)


def defaults(eps: float) -> dict[str, Any]:
    return {"steps": 50, "step_size": eps / 4, "restarts": 1, "random_start": True}


ATTACK = Attack(
    name="pgd",
    summary="PGD: projected sign-gradient steps from a random start, worst-case restarts (L-inf)",
    perturb=perturb,
    defaults=defaults,
)
