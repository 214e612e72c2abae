"""GPMR (Dabouei et al. 2020): gradient phase and magnitude regularization.

    div = mean_batch 2/(k(k-1)) sum_{i<j} (CS(g_i, g_j) + 1/(k-1))^2
    eq  = mean_batch (1/k) sum_i (||g_i|| - mean_j ||g_j||)^2
    GPMR = lambda_div * div + lambda_eq * eq

Norms are per sample (the authors' code took them over the whole batch tensor). Paper settings:
lambda_div = 0.1 (FashionMNIST) or 0.04 (CIFAR-10), lambda_eq = 10.
"""

from __future__ import annotations

import torch

from ncen_cli.defenses.base import (
    Defense,
    DefenseInputs,
    Hyperparameter,
    flat_norms,
    pairwise_cosines,
)


def terms(grads: torch.Tensor, lambda_div: float, lambda_eq: float) -> dict[str, torch.Tensor]:
    """The weighted phase (div) and magnitude (eq) terms. grads: (k, B, *shape) -> two scalars."""
    k = grads.shape[0]
    cos = pairwise_cosines(grads)
    i, j = torch.triu_indices(k, k, offset=1, device=grads.device)
    div = ((cos[i, j] + 1.0 / (k - 1)) ** 2).sum(0) * (2.0 / (k * (k - 1)))
    norms = flat_norms(grads)  # (k, B)
    eq = ((norms - norms.mean(0, keepdim=True)) ** 2).mean(0)
    return {"div": lambda_div * div.mean(), "eq": lambda_eq * eq.mean()}


def regularizer(
    grads: torch.Tensor, lambda_div: float = 0.1, lambda_eq: float = 10.0
) -> torch.Tensor:
    """grads: (k, B, *shape) per-sample input gradients -> scalar (batch mean)."""
    return sum(terms(grads, lambda_div, lambda_eq).values())


def _terms(inputs: DefenseInputs, lambda_div: float, lambda_eq: float) -> dict[str, torch.Tensor]:
    return terms(inputs.input_grads, lambda_div, lambda_eq)


DEFENSE = Defense(
    name="gpmr",
    summary="GPMR (Dabouei et al. 2020): gradient phase (cosine) and magnitude equalisation",
    hyperparameters={
        "lambda_div": Hyperparameter(
            0.1, "weight of the phase term", {"fashionmnist": 0.1, "cifar10": 0.04}
        ),
        "lambda_eq": Hyperparameter(10.0, "weight of the magnitude term"),
    },
    loss_terms=_terms,
)
