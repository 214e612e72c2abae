"""GPMR (Dabouei et al. 2020): gradient phase and magnitude regularization.

g_i (k, B, *shape) are ncen's input gradients: g_i[b] = d (sum_b' CE_i[b']) / d x_b, the gradient
of member i's batch-summed CE with respect to sample b (with BatchNorm in train mode a sample's
gradient also carries the other samples' CE through the batch statistics).

Two reductions of the magnitude term, registered under two names:

* ``gpmr`` (default, the authors' released GPMR branch of train_engine.py): their input gradients
  are those of CE = (1/k) sum_i mean_b CE_i[b], i.e. G_i = g_i / (k B), and the magnitude term
  takes ``torch.norm`` of each member's *whole batch tensor*::

      div = mean_b 2/(k(k-1)) sum_{i<j} (CS(g_i[b], g_j[b]) + 1/(k-1))^2
      eq  = (1/k) sum_i (||G_i|| - (1/k) sum_j ||G_j||)^2          (||.|| over (B, *shape))

  The paper's lambda_div = 0.1 (FashionMNIST) / 0.04 (CIFAR-10) and lambda_eq = 10 were chosen
  for these reductions.
* ``gpmr-per-sample``: the same direction term, magnitudes per sample on g_i itself::

      eq = mean_b (1/k) sum_i (||g_i[b]|| - mean_j ||g_j[b]||)^2

  About B^2 k^2 / B = k^2 B times larger than the authors' term at the same weights (10^3 on
  3 members, batch 64), so lambda_eq = 10 makes training dominated by magnitude equalisation.
"""

from __future__ import annotations

import torch

from ncen_cli.defenses.base import (
    Defense,
    Hyperparameter,
    flat_norms,
    input_gradient_terms,
    pairwise_cosines,
)

REDUCTIONS = ("authors", "per-sample")


def magnitude_term(grads: torch.Tensor, reduction: str) -> torch.Tensor:
    """Unweighted magnitude (eq) term. grads: (k, B, *shape) as in the module doc -> scalar."""
    k, batch = grads.shape[:2]
    if reduction == "authors":
        norms = (grads / (k * batch)).flatten(start_dim=1).norm(dim=1)  # (k,) ||G_i||
        return ((norms - norms.mean()) ** 2).mean()
    if reduction == "per-sample":
        norms = flat_norms(grads)  # (k, B)
        return ((norms - norms.mean(0, keepdim=True)) ** 2).mean(0).mean()
    raise ValueError(f"unknown GPMR reduction '{reduction}'; choose one of {REDUCTIONS}")


def direction_term(grads: torch.Tensor) -> torch.Tensor:
    """Unweighted phase (div) term, per sample then batch mean. grads: (k, B, *shape) -> scalar."""
    k = grads.shape[0]
    cos = pairwise_cosines(grads)
    i, j = torch.triu_indices(k, k, offset=1, device=grads.device)
    return (((cos[i, j] + 1.0 / (k - 1)) ** 2).sum(0) * (2.0 / (k * (k - 1)))).mean()


def terms(
    grads: torch.Tensor, *, reduction: str, lambda_div: float, lambda_eq: float
) -> dict[str, torch.Tensor]:
    """The weighted phase (``div``) and magnitude (``eq``) terms. grads: (k, B, *shape) as in the
    module docstring; reduction: one of :data:`REDUCTIONS` -> two scalars."""
    return {
        "div": lambda_div * direction_term(grads),
        "eq": lambda_eq * magnitude_term(grads, reduction),
    }


def _defense(reduction: str) -> Defense:
    where = (
        "the authors' reductions (norms of the whole batch of mean-CE gradients)"
        if reduction == "authors"
        else "per-sample norms of the summed-CE gradients (not the authors' scaling)"
    )
    return Defense(
        name="gpmr" if reduction == "authors" else "gpmr-per-sample",
        summary=f"GPMR (Dabouei et al. 2020): gradient phase (cosine) and magnitude "
        f"equalisation, {where}",
        hyperparameters={
            "lambda_div": Hyperparameter(
                0.1, "weight of the phase term", {"fashionmnist": 0.1, "cifar10": 0.04}
            ),
            "lambda_eq": Hyperparameter(10.0, "weight of the magnitude term"),
        },
        loss_terms=input_gradient_terms(terms, reduction=reduction),
    )


DEFENSE = _defense("authors")
DEFENSE_PER_SAMPLE = _defense("per-sample")
