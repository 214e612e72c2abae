"""BIM: the basic iterative method (Kurakin et al., 2017, arXiv:1607.02533).

Distance: L-infinity. PGD without the random start: from x, ``steps`` iterations of
``x <- project(x + step_size * sign(grad_x L(x, y)))`` onto the eps ball and [0, 1]. ``L`` is the
chosen ensemble objective. Defaults (when no settings are given): 10 steps of eps/4. The paper's
protocol uses 10 steps of size eps (advertorch LinfBasicIterativeAttack). An iterate that is already
misclassified is kept.
Shapes: x (B, C, H, W) float32 in [0, 1], y (B,), x_adv like x.
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
    return {"steps": 10, "step_size": eps / 4, "restarts": 1, "random_start": False}


ATTACK = Attack(
    name="bim",
    summary="BIM: iterated sign-gradient steps from x, projected (L-inf)",
    perturb=perturb,
    defaults=defaults,
)
