"""PGD and BIM: one projected sign-gradient body, two registrations.

PGD, projected gradient descent from a random start (Madry et al., 2018, arXiv:1706.06083), and
BIM, the basic iterative method (Kurakin et al., 2017, arXiv:1607.02533), differ only in their
defaults: PGD starts from a uniform random point of the eps ball, BIM from x. Distance:
L-infinity. ``steps`` iterations of ``x <- project(x + step_size * sign(grad_x L(x, y)))`` onto the
eps ball and [0, 1], with ``L`` the chosen ensemble objective; ``restarts`` independent runs
counted worst-case per example by the runner (:meth:`ncen_cli.attacks.base.Attack.perturb`). An
iterate that is already misclassified is kept (the attack never loses an adversarial example it
found; option ``early_stop=false`` runs every step instead).

Defaults (when no settings are given): PGD 50 steps of eps/4 from a random start, BIM 10 steps of
eps/4 from x; 1 restart. The paper's protocol uses PGD 40 steps and BIM 10 steps of size eps
(advertorch LinfPGDAttack, LinfBasicIterativeAttack).
Shapes: x (B, C, H, W) float32 in [0, 1], y (B,), x_adv like x.

Example::

    from ncen_cli.attacks.pgd import PGD
    settings = PGD.settings_for(0.1, restarts=2)
    x_adv = PGD.perturb(ensemble, x, y, settings, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from typing import Any

from ncen_cli.attacks.base import Attack
from ncen_cli.attacks.core import SIGN_ASCENT_OPTIONS, sign_ascent_run

RUN = sign_ascent_run(default_step_fraction=0.25)


def _registration(name: str, summary: str, steps: int, random_start: bool) -> Attack:
    """One registration of the shared body: defaults ``steps`` steps of eps/4, 1 restart."""

    def defaults(eps: float) -> dict[str, Any]:
        return {"steps": steps, "step_size": eps / 4, "restarts": 1, "random_start": random_start}

    return Attack(name, summary, RUN, defaults, options=SIGN_ASCENT_OPTIONS)


PGD = _registration(
    "pgd",
    "PGD: projected sign-gradient steps from a random start, worst-case restarts (L-inf)",
    steps=50,
    random_start=True,
)
BIM = _registration(
    "bim",
    "BIM: iterated sign-gradient steps from x, projected (L-inf)",
    steps=10,
    random_start=False,
)
ATTACK = PGD  # the name other modules import (adv-train, benchmarks)
