"""Shared machinery of the built-in attacks' single runs: input gradients, projection onto the
L-infinity ball, random starts and sign-gradient iterations. (Validation, float conversion, frozen
parameters and worst-case restarts are the runner's: :meth:`ncen_cli.attacks.base.Attack.perturb`.)

Every gradient evaluation runs each member exactly once forward and once backward, and only the
input gets a gradient (the runner marks parameters ``requires_grad=False``). All attack
arithmetic is float32; images stay in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ncen_cli.attacks.base import (  # noqa: F401 - frozen_parameters, as_float: re-exported
    AttackOption,
    AttackTarget,
    RunInput,
    SingleRun,
    as_float,
    frozen_parameters,
    objective_loss,
    predict,
    worst_case_restarts,
)

LossFn = Callable[[AttackTarget, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``loss_fn(target, x, y) -> (per-sample loss (B,), combined logits (B, num_classes))``."""


def objective_fn(objective: str) -> LossFn:
    """The :func:`~ncen_cli.attacks.base.objective_loss` for ``objective`` as a loss function."""

    def loss_fn(target: AttackTarget, x: torch.Tensor, y: torch.Tensor):
        return objective_loss(target, x, y, objective)

    return loss_fn


def input_gradient(
    target: AttackTarget, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-sample loss with respect to the input only.

    Args:
        x: (B, C, H, W) float32 in [0, 1]; y: (B,) labels.
    Returns:
        grad (B, C, H, W), loss (B,), combined logits (B, num_classes), all detached.
        (Summing makes each example's gradient independent of the batch.)
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, logits = loss_fn(target, x, y)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad.detach(), loss.detach(), logits.detach()


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``x_adv`` into the L-infinity ball of radius ``eps`` around ``x`` and into [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform random point of the eps ball around ``x`` (drawn on the generator's device),
    clipped to [0, 1]."""
    device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float32)
    return project(x + (2 * noise.to(x.device) - 1) * eps, x, eps)


def sign_ascent(
    target: AttackTarget,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    loss_fn: LossFn,
    random_start: bool = False,
    decay: float | None = None,
    generator: torch.Generator | None = None,
    early_stop: bool = True,
    l1_floor: float | None = None,
) -> torch.Tensor:
    """Projected sign-gradient ascent (BIM/PGD; MI-FGSM when ``decay`` is given).

    Each step: one gradient of the loss at the current iterate (every member once forward and once
    backward), then ``x <- project(x + step_size * sign(d))`` with ``d`` the gradient or, for
    MI-FGSM, the momentum ``g <- decay * g + grad / mean|grad|`` (an exactly-zero gradient adds
    nothing instead of a NaN). An example whose current iterate is already misclassified keeps that
    iterate and leaves the batch (it is adversarial; further steps cannot help it). With
    ``early_stop=False`` every example runs all ``steps`` (for transfer attacks, where an example
    that barely fools its source transfers poorly; ``settings.extra["early_stop"]``). With
    ``l1_floor`` MI-FGSM divides by ``max(sum|grad|, l1_floor)`` instead, as advertorch does
    (``settings.extra["momentum_l1_floor"]``; differs only for gradients below the floor).

    Args:
        x: (B, C, H, W) float32 clean images in [0, 1]; y: (B,) labels.
    Returns:
        (B, C, H, W) adversarial images within the eps ball and [0, 1].
    """
    x_adv = uniform_start(x, eps, generator) if random_start else x.clone()
    result = x_adv.clone()
    momentum = torch.zeros_like(x) if decay is not None else None
    active = torch.arange(len(x), device=x.device)
    for _ in range(steps):
        xa, ya = x_adv[active], y[active]
        grad, _, logits = input_gradient(target, xa, ya, loss_fn)
        fooled = logits.argmax(-1) != ya
        if early_stop and fooled.any():
            result[active[fooled]] = xa[fooled]
            keep = ~fooled
            active, xa, grad = active[keep], xa[keep], grad[keep]
            if active.numel() == 0:
                return result
        direction = grad
        if momentum is not None and decay is not None:  # both set for MI-FGSM
            if l1_floor is None:
                scale = grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            else:
                scale = grad.abs().flatten(1).sum(1).clamp_min(l1_floor).view(-1, 1, 1, 1)
            direction = decay * momentum[active] + grad / scale
            momentum[active] = direction
        x_adv[active] = project(xa + step_size * direction.sign(), x[active], eps)
    result[active] = x_adv[active]
    return result


def seed_from(generator: torch.Generator | None) -> int:
    """A 63-bit seed drawn from ``generator`` (for code that only takes integer seeds)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def sign_ascent_run(default_step_fraction: float, momentum: bool = False) -> SingleRun:
    """The single run of the sign-gradient attacks (FGSM, BIM, PGD, MI-FGSM): :func:`sign_ascent`
    on ``job.x`` (B, C, H, W) and ``job.y`` (B,), ascending ``job.settings.objective``.

    Args:
        default_step_fraction: step size as a fraction of eps when ``settings.step_size`` is None.
        momentum: use MI-FGSM's momentum with ``settings.decay``.
    A single-step run (``settings.steps == 1``, FGSM) always takes its step; an iterative one
    keeps an iterate that is already misclassified unless option ``early_stop`` is False.
    """

    def run(job: RunInput) -> torch.Tensor:
        settings = job.settings
        step = (
            settings.step_size
            if settings.step_size is not None
            else (settings.eps * default_step_fraction)
        )
        early_stop = bool(settings.extra.get("early_stop", True)) and settings.steps > 1
        return sign_ascent(
            job.target,
            job.x,
            job.y,
            eps=settings.eps,
            steps=settings.steps,
            step_size=step,
            loss_fn=objective_fn(settings.objective),
            random_start=settings.random_start,
            decay=settings.decay if momentum else None,
            generator=job.generator,
            early_stop=early_stop,
            l1_floor=settings.extra.get("momentum_l1_floor"),
        )

    return run


SIGN_ASCENT_OPTIONS = {
    "early_stop": AttackOption(
        True,
        "keep an iterate once it is misclassified (false: run every step, as advertorch "
        "and transfer attacks do)",
        bool,
    ),
}
