"""APGD-CE and APGD-DLR: auto-PGD (Croce & Hein, 2020, arXiv:2003.01690), the white-box half of
AutoAttack.

Distance: L-infinity. Step-size-free PGD: from a uniform random start, step ``eta = 2 eps`` with
momentum 0.75; at checkpoints ``w_j = ceil(p_j N)`` (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) ``eta`` is halved for an example, and it restarts
from its best point, when fewer than rho = 75% of its steps since the last checkpoint raised the
loss, or when neither ``eta`` was cut nor the best loss improved at the last checkpoint.

Written here rather than wrapped from torchattacks because torchattacks only sees combined logits:
here APGD-CE ascends the chosen ensemble objective (``mean-ce``, the paper's, by default; ``logits``
or ``prob``), and each step runs each member once forward and once backward. APGD-DLR ascends the
difference-of-logits-ratio loss of the *combined* logits (a logit-margin loss has no per-member
form), so ``--objective`` does not apply to it. It needs at least 3 classes. Random restarts are
counted worst-case per example. Defaults: 100 iterations, 1 restart (AutoAttack's; torchattacks'
AutoAttack runs 10).
Shapes: x (B, C, H, W) float32 in [0, 1], y (B,), x_adv like x.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ncen_cli.attacks.base import Attack, AttackTarget, RunInput, SingleRun
from ncen_cli.attacks.core import LossFn, input_gradient, objective_fn, project, uniform_start
from ncen_cli.errors import UsageError

RHO = 0.75
MOMENTUM = 0.75


def checkpoints(steps: int) -> list[int]:
    """APGD's step-size checkpoints w_j (iteration indices in (0, steps))."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = {math.ceil(round(q * steps, 6)) for q in p[1:]}  # round: 0.57 * 100 is 57.000...01
    return sorted(w for w in marks if 0 < w < steps)


def dlr_loss(target: AttackTarget, x: torch.Tensor, y: torch.Tensor):
    """Difference of logits ratio of the combined logits z: -(z_y - max_{i != y} z_i) /
    (z_pi1 - z_pi3 + 1e-12) with z_pi the sorted logits. Returns loss (B,), z (B, num_classes)."""
    z = target.combine_logits(target.member_logits(x))
    if z.shape[-1] < 3:
        raise UsageError("apgd-dlr needs at least 3 classes; use apgd-ce")
    top, _ = z.sort(dim=-1, descending=True)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(-1)
    return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12), z


def apgd_once(
    target: AttackTarget,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    loss_fn: LossFn,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One APGD run. x (B, C, H, W) float32, y (B,). Returns (B, C, H, W): the first misclassified
    iterate for examples it fooled, the highest-loss iterate for the others."""
    n = len(x)
    dev = x.device
    marks = set(checkpoints(steps))
    x_cur = uniform_start(x, eps, generator)
    x_prev = x_cur.clone()
    result = x_cur.clone()
    x_best = x_cur.clone()
    grad_best = torch.zeros_like(x)
    loss_best = torch.full((n,), float("-inf"), device=dev)
    loss_prev = torch.full((n,), float("-inf"), device=dev)
    loss_best_at_mark = torch.full((n,), float("-inf"), device=dev)
    eta = torch.full((n,), 2 * eps, device=dev)
    reduced_at_mark = torch.ones(n, dtype=torch.bool, device=dev)
    successes = torch.zeros(n, device=dev)
    last_mark = 0
    active = torch.arange(n, device=dev)
    for k in range(steps + 1):
        xa, ya = x_cur[active], y[active]
        grad, loss, logits = input_gradient(target, xa, ya, loss_fn)
        fooled = logits.argmax(-1) != ya
        result[active[fooled]] = xa[fooled]
        keep = ~fooled
        active, xa, grad, loss = active[keep], xa[keep], grad[keep], loss[keep]
        if active.numel() == 0 or k == steps:
            break
        if k > 0:
            successes[active] += (loss > loss_prev[active]).float()
        loss_prev[active] = loss
        improved = loss > loss_best[active]
        idx = active[improved]
        x_best[idx], grad_best[idx], loss_best[idx] = xa[improved], grad[improved], loss[improved]
        if k in marks:
            few = successes[active] < RHO * (k - last_mark)
            stalled = ~reduced_at_mark[active] & (loss_best[active] <= loss_best_at_mark[active])
            cut = few | stalled
            eta[active[cut]] /= 2
            xa = torch.where(cut[:, None, None, None], x_best[active], xa)
            grad = torch.where(cut[:, None, None, None], grad_best[active], grad)
            reduced_at_mark[active] = cut
            loss_best_at_mark[active] = loss_best[active]
            successes[active] = 0
            last_mark = k
        xo, step = x[active], eta[active].view(-1, 1, 1, 1)
        z = project(xa + step * grad.sign(), xo, eps)
        alpha = 1.0 if k == 0 else MOMENTUM
        x_next = project(xa + alpha * (z - xa) + (1 - alpha) * (xa - x_prev[active]), xo, eps)
        x_prev[active] = xa
        x_cur[active] = x_next
    result[active] = x_best[active]
    return result


def apgd_run(loss_fn: LossFn | None = None) -> SingleRun:
    """The single run of APGD (:func:`apgd_once` on ``job.x`` (B, C, H, W), ``job.y`` (B,)) on
    ``loss_fn``, or on ``job.settings.objective`` when None."""

    def run(job: RunInput) -> torch.Tensor:
        loss = loss_fn or objective_fn(job.settings.objective)
        eps, steps = job.settings.eps, job.settings.steps
        return apgd_once(job.target, job.x, job.y, eps, steps, loss, job.generator)

    return run


def defaults(eps: float) -> dict[str, Any]:
    return {"steps": 100, "step_size": None, "restarts": 1, "random_start": True}


APGD_CE = Attack(
    name="apgd-ce",
    summary="APGD-CE: step-size-free PGD on the ensemble objective, 100 iterations (L-inf)",
    run=apgd_run(),
    defaults=defaults,
)
APGD_DLR = Attack(
    name="apgd-dlr",
    summary="APGD-DLR: step-size-free PGD on the DLR loss of the combined logits (L-inf)",
    run=apgd_run(dlr_loss),
    defaults=defaults,
    own_loss="dlr",
)
