"""FGSM: the fast gradient sign method (Goodfellow et al., 2015, arXiv:1412.6572).

Distance: L-infinity. One step ``x_adv = clip(x + step_size * sign(grad_x L(x, y)), [0, 1])`` with
``step_size = eps`` by default (advertorch's GradientSignAttack, the paper's FGSM). ``L`` is the
chosen ensemble objective (``mean-ce`` by default; see
:func:`ncen_cli.attacks.base.objective_loss`). The single-step case of the sign-gradient body
(:func:`ncen_cli.attacks.core.sign_ascent_run`, ``steps == 1``): the step is always taken.
Shapes: x (B, C, H, W) float32 in [0, 1], y (B,), x_adv like x.

Example::

    from ncen_cli.attacks.fgsm import ATTACK
    x_adv = ATTACK.perturb(ensemble, x, y, ATTACK.settings_for(0.1), torch.Generator())
"""

from __future__ import annotations

from typing import Any

from ncen_cli.attacks.base import Attack
from ncen_cli.attacks.core import SIGN_ASCENT_OPTIONS, sign_ascent_run


def defaults(eps: float) -> dict[str, Any]:
    return {"steps": 1, "step_size": eps, "restarts": 1, "random_start": False}


ATTACK = Attack(
    name="fgsm",
    summary="FGSM: one signed-gradient step of size eps (L-inf)",
    run=sign_ascent_run(default_step_fraction=1.0),
    defaults=defaults,
    options=SIGN_ASCENT_OPTIONS,
)
