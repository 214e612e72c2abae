"""FGSM: the fast gradient sign method (Goodfellow et al., 2015, arXiv:1412.6572).

Distance: L-infinity. One step ``x_adv = clip(x + step_size * sign(grad_x L(x, y)), [0, 1])`` with
``step_size = eps`` by default (advertorch's GradientSignAttack, the paper's FGSM). ``L`` is the
chosen ensemble objective (``mean-ce`` by default; see
:func:`ncen_cli.attacks.base.objective_loss`).
Shapes: x (B, C, H, W) float32 in [0, 1], y (B,), x_adv like x.

Example::

    from ncen_cli.attacks.fgsm import ATTACK
    x_adv = ATTACK.perturb(ensemble, x, y, AttackSettings(eps=0.1), torch.Generator())
"""

from __future__ import annotations

from typing import Any

import torch

from ncen_cli.attacks.base import Attack, AttackSettings, AttackTarget
from ncen_cli.attacks.core import (
    as_float,
    check_settings,
    frozen_parameters,
    input_gradient,
    objective_fn,
    project,
    uniform_start,
    worst_case_restarts,
)


def perturb(
    target: AttackTarget,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AttackSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One signed-gradient step of size ``settings.step_size`` (default eps) from x (or from a
    uniform random start when ``random_start``), projected onto the eps ball and [0, 1]."""
    check_settings(settings)
    x = as_float(x)
    step = settings.step_size if settings.step_size is not None else settings.eps
    loss_fn = objective_fn(settings.objective)

    def run_once(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        start = uniform_start(xs, settings.eps, generator) if settings.random_start else xs
        grad, _, _ = input_gradient(target, start, ys, loss_fn)
        return project(start + step * grad.sign(), xs, settings.eps)

    with frozen_parameters(target):
        return worst_case_restarts(target, x, y, settings.restarts, run_once)


def defaults(eps: float) -> dict[str, Any]:
    return {"steps": 1, "step_size": eps, "restarts": 1, "random_start": False}


ATTACK = Attack(
    name="fgsm",
    summary="FGSM: one signed-gradient step of size eps (L-inf)",
    perturb=perturb,
    defaults=defaults,
)
