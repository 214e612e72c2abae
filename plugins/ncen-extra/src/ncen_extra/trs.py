"""TRS (Yang et al., NeurIPS 2021): orthogonal and small member input gradients.

With g_i the input gradient of member i (ncen's DefenseInputs.input_grads:
d (sum_b CE_i[b]) / d x_b, which with BatchNorm in train mode is not sample b's own CE gradient),
this module
implements, per sample and then averaged over the batch,

    sim    = 2 / (k (k - 1)) * sum_{i<j} |CS(g_i, g_j)|          (mean over member pairs)
    smooth = sum_i ||g_i||_2^2
    TRS    = lambda_sim * sim + lambda_smooth * smooth

How this differs from the paper (as we read it): the paper's smoothness term penalises the
gradient norm ||g_i||_2 rather than its square, and its practical algorithm evaluates the terms at
points found by a few PGD steps inside a small L-inf ball around x, in addition to x itself. Here
both terms are taken at the training point x, from the input gradients that ncen's training step
already computes (double backpropagation), and the squared norm is used because it is smooth at
g = 0. The defaults below (lambda_sim = 0.5, lambda_smooth = 0.1) are ncen-extra's starting points,
not the paper's values (those were tuned for its own loss and evaluation points). The squared norm
scales with the input size and the model: for a fresh resnet20 pair on the 12x12 synthetic set,
sum_i ||g_i||^2 averaged ~ 68 over the first epoch, so lambda_smooth = 1 swamps the cross-entropy
(~ 1.4); tune it per dataset with ``--param lambda_smooth=...``.
"""

from __future__ import annotations

import torch
from ncen_cli.defenses.base import Defense, DefenseInputs, Hyperparameter, pairwise_cosines


def similarity(grads: torch.Tensor) -> torch.Tensor:
    """Mean |cosine| over member pairs and samples. grads: (k, B, *shape) -> scalar.

    Zero when there is only one member (no pairs).
    """
    k = grads.shape[0]
    if k < 2:
        return grads.new_zeros(())
    cos = pairwise_cosines(grads)  # (k, k, B)
    i, j = torch.triu_indices(k, k, offset=1, device=grads.device)
    return cos[i, j].abs().mean()


def smoothness(grads: torch.Tensor) -> torch.Tensor:
    """Batch mean of sum_i ||g_i||^2. grads: (k, B, *shape) -> scalar."""
    return grads.flatten(start_dim=2).pow(2).sum(dim=2).sum(dim=0).mean()


def terms(grads: torch.Tensor, lambda_sim: float, lambda_smooth: float) -> dict[str, torch.Tensor]:
    """The weighted ``sim`` and ``smooth`` terms. grads: (k, B, *shape) -> two scalars."""
    return {
        "sim": lambda_sim * similarity(grads),
        "smooth": lambda_smooth * smoothness(grads),
    }


def regularizer(
    grads: torch.Tensor, lambda_sim: float = 0.5, lambda_smooth: float = 0.1
) -> torch.Tensor:
    """The TRS regularizer as one scalar. grads: (k, B, *shape)."""
    return sum(terms(grads, lambda_sim, lambda_smooth).values())


def _loss_terms(
    inputs: DefenseInputs, lambda_sim: float, lambda_smooth: float
) -> dict[str, torch.Tensor]:
    return terms(inputs.input_grads, lambda_sim, lambda_smooth)


DEFENSE = Defense(
    name="trs",
    summary="TRS (Yang et al. 2021): pairwise |cos| of member input gradients plus a "
    "gradient-magnitude smoothness penalty",
    hyperparameters={
        "lambda_sim": Hyperparameter(0.5, "weight of the mean pairwise |cos| of input gradients"),
        "lambda_smooth": Hyperparameter(0.1, "weight of sum_i ||g_i||^2 (batch mean)"),
    },
    loss_terms=_loss_terms,
    needs_input_gradients=True,
    needs_logits=False,
)
