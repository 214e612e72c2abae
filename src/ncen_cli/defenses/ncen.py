"""NCEn (Zhang et al. 2022): negatively correlated gradient directions and magnitudes.

Paper form (eqs. 2, 6, 9, 10), per sample, with g_ens = mean_i g_i and m = mean_i ||g_i||:

    cos_i  = CS(g_i, g_ens) * sum_{j != i} CS(g_j, g_ens)
    norm_i = (1/m^2) (||g_i|| - m) * sum_{j != i} (||g_j|| - m)      ( = -(||g_i|| - m)^2 / m^2 )
    NCE    = (1/k) sum_i (lambda_norm * norm_i + lambda_cos * cos_i), averaged over the batch.

Official form (the authors' released code), per sample, with a_i = (||g_i|| - m)/m,
b_i = (1/k) sum_{j != i} a_j and c_i = CS(g_i, g_ens):

    L_norm = log sum_i exp(a_i b_i);   L_cos = log sum_i [exp(c_i) sum_{j != i} exp(c_j)]
    NCE    = lambda_norm * L_norm + lambda_cos * L_cos, averaged over the batch.

Both forms are invariant to a common rescaling of all gradients.
"""

from __future__ import annotations

import torch

from ncen_cli.defenses.base import EPS, Defense, Hyperparameter, input_gradient_terms

FORMS = ("paper", "official")


def _direction_and_magnitude(
    grads: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, B, *shape) -> c (k, B) cosines to the mean gradient, norms (k, B), m (B,)."""
    flat = grads.flatten(start_dim=2)
    mean_grad = flat.mean(0, keepdim=True)
    norms = flat.norm(dim=2)
    c = (flat * mean_grad).sum(2) / (norms * mean_grad.norm(dim=2) + EPS)
    return c, norms, norms.mean(0)


def terms(
    grads: torch.Tensor, *, form: str, lambda_cos: float, lambda_norm: float
) -> dict[str, torch.Tensor]:
    """Weighted direction (``cos``) and magnitude (``norm``) terms, each a batch-mean scalar.

    grads: (k, B, *shape) input gradients of the k members (DefenseInputs.input_grads); form:
    one of :data:`FORMS`. The weights' defaults are the registered defenses' hyperparameters.
    """
    k = grads.shape[0]
    c, norms, m = _direction_and_magnitude(grads)
    if form == "paper":
        others_c = c.sum(0, keepdim=True) - c  # sum_{j != i} c_j, (k, B)
        loss_cos = (c * others_c).mean(0)
        dev = norms - m
        loss_norm = (dev * (dev.sum(0, keepdim=True) - dev)).mean(0) / (m**2 + EPS)
    elif form == "official":
        a = (norms - m) / (m + EPS)
        b = (a.sum(0, keepdim=True) - a) / k
        loss_norm = torch.logsumexp(a * b, dim=0)
        e = torch.exp(c)
        loss_cos = torch.log((e * (e.sum(0, keepdim=True) - e)).sum(0))
    else:
        raise ValueError(f"unknown NCEn form '{form}'; choose one of {FORMS}")
    return {"cos": lambda_cos * loss_cos.mean(), "norm": lambda_norm * loss_norm.mean()}


def _defense(form: str) -> Defense:
    return Defense(
        name="ncen" if form == "paper" else "ncen-official",
        summary=f"NCEn (Zhang et al. 2022), {form} form: negatively correlated gradient "
        "directions and magnitudes",
        hyperparameters={
            "lambda_cos": Hyperparameter(
                0.02, "weight of the direction term", {"fashionmnist": 0.02, "cifar10": 0.06}
            ),
            "lambda_norm": Hyperparameter(
                0.02, "weight of the magnitude term", {"fashionmnist": 0.02, "cifar10": 0.04}
            ),
        },
        loss_terms=input_gradient_terms(terms, form=form),
    )


DEFENSE = _defense("paper")
DEFENSE_OFFICIAL = _defense("official")
