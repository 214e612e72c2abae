"""adv-train: PGD adversarial training of the ensemble (Madry et al. 2018, arXiv:1706.06083).

Each batch, ncen's PGD (:mod:`ncen_cli.attacks.pgd`) attacks the ensemble's mean member
cross-entropy (1/k) sum_i CE(f_i(x'), y) inside the L-inf ball of radius ``eps``: a uniform random
start, ``steps`` sign steps of ``step_scale * eps / steps``, projection onto the ball and [0, 1],
every step run for every example (no early stop: training wants the loss maximised, not merely an
error). Every member then trains on the same batch, in which the first ``round(adv_fraction * B)``
examples (the batch order is already random) are replaced by their adversarial versions; with the
default ``adv_fraction = 1`` that is Madry et al.'s min-max objective.

The attack runs with the members in train mode (BatchNorm batch statistics), as Madry et al.'s
and DVERGE's training code do, with frozen parameters; BatchNorm running statistics, modes and
gradients are restored afterwards (:func:`ncen_cli.crafting.crafting_state`), so only the
training pass updates them. Its random start draws from the step's generator (seeded by seed,
epoch and step), so runs repeat and resume bit-identically.

Combine with a regularizer as ``--defense ncen+adv-train``: the regularizer's terms are then
taken on the adversarial batch (:func:`ncen_cli.crafting.compose`).

Defaults: FashionMNIST eps 0.1, CIFAR-10 eps 8/255; 10 steps of 2.5 eps / 10.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ncen_cli.attacks.base import AttackSettings
from ncen_cli.attacks.pgd import ATTACK as PGD
from ncen_cli.crafting import crafting_state
from ncen_cli.defenses.base import (
    CraftContext,
    Defense,
    DefenseInputs,
    Hyperparameter,
    require_at_most,
    require_integer,
)

if TYPE_CHECKING:
    from ncen_cli.ensemble import Ensemble


def adversarial_batch(
    ensemble: Ensemble,
    x: torch.Tensor,
    y: torch.Tensor,
    context: CraftContext,
    eps: float,
    steps: float,
    step_scale: float,
    adv_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, H, W) in [0, 1], y (B,) -> (the batch with its first round(adv_fraction B)
    examples replaced by PGD examples (B, C, H, W), y)."""
    n_adv = round(adv_fraction * len(x))
    if n_adv == 0 or eps == 0:
        return x, y
    settings = AttackSettings(
        eps=eps,
        steps=int(steps),
        step_size=step_scale * eps / int(steps),
        random_start=True,
        objective="mean-ce",
        extra={"early_stop": False},
    )
    with crafting_state(ensemble, train_mode=True):
        x_adv = PGD.perturb(ensemble, x[:n_adv], y[:n_adv], settings, context.generator)
    return torch.cat([x_adv.to(x.dtype), x[n_adv:]]), y


def terms(inputs: DefenseInputs, **_: float) -> dict[str, torch.Tensor]:
    """No terms: the members' CE on the crafted batch is the whole loss."""
    return {}


def _check(values: dict[str, float]) -> None:
    require_integer(values, "steps")
    require_at_most(values, "eps", 1.0)
    require_at_most(values, "adv_fraction", 1.0)


DEFENSE = Defense(
    name="adv-train",
    summary="PGD adversarial training (Madry et al. 2018): members train on PGD examples of the "
    "ensemble's mean CE",
    hyperparameters={
        "eps": Hyperparameter(
            0.1, "L-inf radius of the training attack", {"fashionmnist": 0.1, "cifar10": 8 / 255}
        ),
        "steps": Hyperparameter(10, "PGD steps (a whole number >= 1)", minimum=1),
        "step_scale": Hyperparameter(2.5, "step size = step_scale * eps / steps"),
        "adv_fraction": Hyperparameter(
            1.0, "fraction of each batch replaced by its PGD examples (1: Madry's objective)"
        ),
    },
    loss_terms=terms,
    needs_input_gradients=False,
    member_inputs=adversarial_batch,
    check=_check,
)
