"""MI-FGSM: momentum iterative FGSM (Dong et al., 2018, arXiv:1710.06081).

Distance: L-infinity. From x, ``steps`` iterations of ``g <- decay * g + grad / mean|grad|`` and
``x <- project(x + step_size * sign(g))`` onto the eps ball and [0, 1] (advertorch's
MomentumIterativeAttack, which the paper used with step 0.01, decay 1.0, 40 iterations). Written
here rather than taken from torchattacks, whose MIFGSM divides by mean|grad| unguarded and turns an
exactly-zero gradient into NaN images; here a zero gradient leaves the momentum unchanged.
Defaults (when no settings are given): 10 steps of eps/10, decay 1.0.
Shapes: x (B, C, H, W) float32 in [0, 1], y (B,), x_adv like x.
"""

from __future__ import annotations

from typing import Any

from ncen_cli.attacks.base import Attack, AttackOption
from ncen_cli.attacks.core import SIGN_ASCENT_OPTIONS, sign_ascent_run


def defaults(eps: float) -> dict[str, Any]:
    return {"steps": 10, "step_size": eps / 10, "decay": 1.0, "restarts": 1, "random_start": False}


ATTACK = Attack(
    name="mifgsm",
    summary="MI-FGSM: momentum sign-gradient steps, zero-gradient safe (L-inf)",
    run=sign_ascent_run(default_step_fraction=0.1, momentum=True),
    defaults=defaults,
    options={
        **SIGN_ASCENT_OPTIONS,
        "momentum_l1_floor": AttackOption(
            None,
            "divide the gradient by max(sum|grad|, floor) instead of mean|grad| (advertorch: 1e-6)",
            float,
            minimum=0.0,
        ),
    },
)
