"""Square attack: score-based black-box random search (Andriushchenko et al., 2020,
arXiv:1912.00049), the black-box half of AutoAttack.

Distance: L-infinity. Wraps ``torchattacks.Square`` (margin loss on the combined logits: a
black-box attack sees only the ensemble's output, so ``--objective`` does not apply). ``steps`` is
the query budget per restart (default 1000; AutoAttack uses 5000); option ``p_init`` the initial
square fraction (default 0.8; ``-o p_init=0.5``). Restarts are counted worst-case per example by
ncen's runner.
Guards around torchattacks: its messages go to stderr (stdout stays clean for ``--json``), its
global ``torch.manual_seed`` call runs inside a forked RNG seeded from our generator, no gradients
are recorded, and every module's train/eval mode is restored afterwards.
Shapes: x (B, C, H, W) float32 in [0, 1], y (B,), x_adv like x.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import torch
from torch import nn

from ncen_cli.attacks.base import Attack, AttackOption, AttackTarget, RunInput
from ncen_cli.attacks.core import project, seed_from


class CombinedLogits(nn.Module):
    """An nn.Module view of a target whose forward returns the combined logits (B, num_classes)."""

    def __init__(self, target: AttackTarget) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target.combine_logits(self.target.member_logits(x))


def run(job: RunInput) -> torch.Tensor:
    """One Square run (torchattacks, one restart) on the combined logits of ``job.target``; modes
    restored. ``job.x`` (B, C, H, W), ``job.y`` (B,) -> x_adv (B, C, H, W)."""
    import torchattacks

    x, settings = job.x, job.settings
    model = CombinedLogits(job.target)
    modes = [(m, m.training) for m in model.modules()]
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with (
            torch.random.fork_rng(devices=devices),
            contextlib.redirect_stdout(sys.stderr),
            torch.no_grad(),
        ):
            attack = torchattacks.Square(
                model,
                norm="Linf",
                eps=settings.eps,
                n_queries=settings.steps,
                n_restarts=1,
                p_init=float(ATTACK.option(settings, "p_init")),
                loss="margin",
                seed=seed_from(job.generator) % 2**31,
            )
            attack.set_device(x.device)
            adv = attack(x, job.y).to(torch.float32)
    finally:
        for module, training in modes:
            module.training = training
    return project(adv, x, settings.eps)


def defaults(eps: float) -> dict[str, Any]:
    return {
        "steps": 1000,
        "step_size": None,
        "restarts": 1,
        "random_start": True,
        "extra": {"p_init": 0.8},
    }


ATTACK = Attack(
    name="square",
    summary="Square: black-box random search on the combined logits' margin (torchattacks, L-inf)",
    run=run,
    defaults=defaults,
    white_box=False,
    options={
        "p_init": AttackOption(
            0.8, "initial fraction of the image a square covers", float, minimum=1e-6, maximum=1.0
        )
    },
    own_loss="margin",
)
