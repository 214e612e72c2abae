"""Shared machinery of the built-in attacks: input gradients with frozen weights, projection onto
the L-infinity ball, random starts, sign-gradient iterations and worst-case random restarts.

Every gradient evaluation runs each member exactly once forward and once backward, and only the
input gets a gradient (parameters are temporarily marked ``requires_grad=False``). All attack
arithmetic is float32; images stay in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ncen_cli.attacks.base import AttackSettings, AttackTarget, objective_loss
from ncen_cli.errors import UsageError

LossFn = Callable[[AttackTarget, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``loss_fn(target, x, y) -> (per-sample loss (B,), combined logits (B, num_classes))``."""


@contextmanager
def frozen_parameters(target: AttackTarget) -> Iterator[None]:
    """Mark the target's parameters ``requires_grad=False`` for the duration (restored after), so
    backward passes compute input gradients only."""
    params = []
    if isinstance(target, nn.Module):
        params = [p for p in target.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


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


@torch.no_grad()
def predict(target: AttackTarget, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes (B,) of the combined logits."""
    return target.combine_logits(target.member_logits(x)).argmax(-1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``x_adv`` into the L-infinity ball of radius ``eps`` around ``x`` and into [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform random point of the eps ball around ``x`` (drawn on the generator's device),
    clipped to [0, 1]."""
    device = generator.device if generator is not None else x.device
    noise = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float32)
    return project(x + (2 * noise.to(x.device) - 1) * eps, x, eps)


def check_settings(settings: AttackSettings) -> None:
    """UsageError for settings no attack can run with."""
    if not 0 < settings.eps <= 1:
        raise UsageError(f"eps must be in (0, 1] for images in [0, 1], got {settings.eps}")
    if settings.steps < 1:
        raise UsageError(f"steps must be >= 1, got {settings.steps}")
    if settings.restarts < 1:
        raise UsageError(f"restarts must be >= 1, got {settings.restarts}")
    if settings.step_size is not None and not settings.step_size > 0:
        raise UsageError(f"step size must be > 0, got {settings.step_size}")


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images -> float32 (detached copy)."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.detach().to(torch.float32).clone()


def worst_case_restarts(
    target: AttackTarget,
    x: torch.Tensor,
    y: torch.Tensor,
    restarts: int,
    run_once: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run an attack ``restarts`` times, counted worst-case per example.

    An example counts as robust only if it survives every restart: after each run, the examples
    still classified correctly are attacked again (a fresh random start), and any restart that fools
    the target replaces that example's adversarial image. Examples fooled earlier keep the image
    that fooled them.

    Args:
        x: (B, C, H, W) clean images; y: (B,) labels.
        run_once: ``run_once(x_subset, y_subset) -> x_adv_subset`` (one run, its own randomness).
    Returns:
        (B, C, H, W) adversarial images.
    """
    x_adv = run_once(x, y)
    if restarts <= 1:
        return x_adv
    robust = predict(target, x_adv) == y
    for _ in range(restarts - 1):
        idx = robust.nonzero().flatten()
        if idx.numel() == 0:
            break
        candidate = run_once(x[idx], y[idx])
        fooled = predict(target, candidate) != y[idx]
        x_adv[idx[fooled]] = candidate[fooled]
        robust[idx[fooled]] = False
    return x_adv


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
        if momentum is not None:
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


def sign_ascent_attack(
    target: AttackTarget,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AttackSettings,
    generator: torch.Generator | None,
    default_step_fraction: float,
    momentum: bool = False,
) -> torch.Tensor:
    """The shared body of BIM, PGD and MI-FGSM: validate ``settings``, then :func:`sign_ascent`
    with frozen weights and worst-case restarts.

    Args:
        x: (B, C, H, W) images (uint8 or float in [0, 1]); y: (B,) labels.
        default_step_fraction: step size as a fraction of eps when ``settings.step_size`` is None.
        momentum: use MI-FGSM's momentum with ``settings.decay``.
    Returns:
        (B, C, H, W) float32 adversarial images.
    """
    check_settings(settings)
    x = as_float(x)
    step = settings.step_size if settings.step_size is not None else (
        settings.eps * default_step_fraction)
    loss_fn = objective_fn(settings.objective)
    decay = settings.decay if momentum else None

    def run_once(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return sign_ascent(target, xs, ys, eps=settings.eps, steps=settings.steps, step_size=step,
                           loss_fn=loss_fn, random_start=settings.random_start, decay=decay,
                           generator=generator,
                           early_stop=bool(settings.extra.get("early_stop", True)),
                           l1_floor=settings.extra.get("momentum_l1_floor"))

    with frozen_parameters(target):
        return worst_case_restarts(target, x, y, settings.restarts, run_once)
