"""BL: plain joint training of the members (no regularizer; lambda = 0 in the paper)."""

from __future__ import annotations

import torch

from ncen_cli.defenses.base import Defense, DefenseInputs


def terms(inputs: DefenseInputs) -> dict[str, torch.Tensor]:
    """No terms: the training loss is the mean member cross-entropy alone."""
    return {}


DEFENSE = Defense(
    name="baseline",
    summary="plain joint training: mean cross-entropy of the members, no regularizer",
    hyperparameters={},
    loss_terms=terms,
    needs_input_gradients=False,
)
