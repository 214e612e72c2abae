"""BL: plain joint training of the members (no regularizer; lambda = 0 in the paper)."""

from __future__ import annotations

import torch

from ncen_cli.defenses.base import Defense, DefenseInputs


def regularizer(grads: torch.Tensor) -> torch.Tensor:
    """Always zero. grads: (k, B, *shape) -> scalar."""
    return grads.new_zeros(())


def _terms(inputs: DefenseInputs) -> dict[str, torch.Tensor]:
    return {}


DEFENSE = Defense(
    name="baseline",
    summary="plain joint training: mean cross-entropy of the members, no regularizer",
    hyperparameters={},
    loss_terms=_terms,
    needs_input_gradients=False,
)
