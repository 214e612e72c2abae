"""The attack contract (plugin API version 1) and the ensemble attack objectives.

An attack is an :class:`Attack`: ``attack.perturb(target, x, y, settings, generator)`` returns
adversarial images within the L-infinity ball of radius ``settings.eps`` around ``x``, clipped to
[0, 1]. ``target`` is anything with ``member_logits`` and ``combine_logits`` (an
:class:`~ncen_cli.ensemble.Ensemble`, or one member wrapped in :class:`MemberTarget`); it is in eval
mode, and attacks must not change its parameters or mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

OBJECTIVES = ("mean-ce", "logits", "prob")


class AttackTarget(Protocol):
    """What an attack may call. Shapes: x (B, C, H, W) in [0, 1]."""

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (k, B, num_classes): every member run exactly once."""
        ...

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(k, B, num_classes) -> (B, num_classes) combined logits used for the prediction."""
        ...


class MemberTarget(nn.Module):
    """One member as a 1-member target (for transfer attacks crafted on a single member)."""

    def __init__(self, member: nn.Module) -> None:
        super().__init__()
        self.member = member

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.member(x).unsqueeze(0)

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member(x)


def objective_loss(
    target: AttackTarget, x: torch.Tensor, y: torch.Tensor, objective: str = "mean-ce"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample loss an attack ascends, and the combined logits (for predictions).

    Objectives:
        ``mean-ce``: (1/k) sum_i CE(f_i(x), y) (the paper's attack objective; default).
        ``logits``: CE of the combined logits.
        ``prob``: NLL of the mean of the members' softmax probabilities.
    Returns:
        loss (B,), combined logits (B, num_classes). Each member runs once.
    """
    logits = target.member_logits(x)  # (k, B, C)
    combined = target.combine_logits(logits)
    if objective == "mean-ce":
        k = logits.shape[0]
        loss = (
            F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1).mean(0)
        )
    elif objective == "logits":
        loss = F.cross_entropy(combined, y, reduction="none")
    elif objective == "prob":
        log_mean_prob = torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - torch.log(
            torch.tensor(float(logits.shape[0]), device=logits.device)
        )
        loss = F.nll_loss(log_mean_prob, y, reduction="none")
    else:
        raise ValueError(f"unknown objective '{objective}'; choose one of {OBJECTIVES}")
    return loss, combined


@dataclass(frozen=True)
class AttackSettings:
    """Every setting of one attack run (all reported with its result).

    Attributes:
        eps: L-infinity radius, in (0, 1].
        steps: iterations (1 for FGSM).
        step_size: per-step size (alpha); None: the attack's default for ``eps``.
        restarts: independent random starts, counted worst-case per example (>= 1).
        random_start: start from a uniform point in the ball.
        decay: momentum decay (MI-FGSM).
        objective: one of :data:`OBJECTIVES`.
        extra: attack-specific settings (e.g. Square's query budget).
    """

    eps: float
    steps: int = 1
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = False
    decay: float = 1.0
    objective: str = "mean-ce"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Attack:
    """A registered attack.

    Attributes:
        name: registry name (``--attacks NAME``).
        summary: one line for ``ncen plugins``.
        perturb: ``perturb(target, x, y, settings, generator) -> x_adv`` with x, x_adv of shape
            (B, C, H, W) in [0, 1], ``y`` (B,), ``generator`` a torch.Generator for any randomness.
        defaults: ``defaults(eps) -> dict`` of AttackSettings fields used when the user gives none.
        white_box: whether it uses gradients (False for score-based black-box attacks).
    """

    name: str
    summary: str
    perturb: Callable[..., torch.Tensor]
    defaults: Callable[[float], dict[str, Any]]
    white_box: bool = True
