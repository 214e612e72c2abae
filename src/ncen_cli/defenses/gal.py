"""GAL (Kariyappa & Qureshi 2019): penalise aligned member input gradients.

    GAL = lambda_gal * mean_batch log sum_{i<j} exp(CS(g_i, g_j))

with lambda_gal = 0.5 as in the NCEn paper's comparison.
"""

from __future__ import annotations

import torch

from ncen_cli.defenses.base import (
    Defense,
    Hyperparameter,
    input_gradient_terms,
    pairwise_cosines,
)


def terms(grads: torch.Tensor, *, lambda_gal: float) -> dict[str, torch.Tensor]:
    """The weighted GAL term ``gal``. grads: (k, B, *shape) input gradients
    (DefenseInputs.input_grads) -> a batch-mean scalar."""
    k = grads.shape[0]
    cos = pairwise_cosines(grads)  # (k, k, B)
    i, j = torch.triu_indices(k, k, offset=1, device=grads.device)
    return {"gal": lambda_gal * torch.logsumexp(cos[i, j], dim=0).mean()}


DEFENSE = Defense(
    name="gal",
    summary="GAL (Kariyappa & Qureshi 2019): log-sum-exp of pairwise gradient cosines",
    hyperparameters={"lambda_gal": Hyperparameter(0.5, "weight of the GAL term")},
    loss_terms=input_gradient_terms(terms),
)
