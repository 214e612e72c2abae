"""GAL (Kariyappa & Qureshi 2019): penalise aligned member input gradients.

    GAL = lambda_gal * mean_batch log sum_{i<j} exp(CS(g_i, g_j))

with lambda_gal = 0.5 as in the NCEn paper's comparison.
"""

from __future__ import annotations

import torch

from ncen_cli.defenses.base import Defense, DefenseInputs, Hyperparameter, pairwise_cosines


def regularizer(grads: torch.Tensor, lambda_gal: float = 0.5) -> torch.Tensor:
    """grads: (k, B, *shape) input gradients (DefenseInputs.input_grads) -> scalar (batch mean)."""
    k = grads.shape[0]
    cos = pairwise_cosines(grads)  # (k, k, B)
    i, j = torch.triu_indices(k, k, offset=1, device=grads.device)
    return lambda_gal * torch.logsumexp(cos[i, j], dim=0).mean()


def _terms(inputs: DefenseInputs, lambda_gal: float) -> dict[str, torch.Tensor]:
    return {"gal": regularizer(inputs.input_grads, lambda_gal=lambda_gal)}


DEFENSE = Defense(
    name="gal",
    summary="GAL (Kariyappa & Qureshi 2019): log-sum-exp of pairwise gradient cosines",
    hyperparameters={"lambda_gal": Hyperparameter(0.5, "weight of the GAL term")},
    loss_terms=_terms,
)
