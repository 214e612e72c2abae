"""ADP (Pang et al., ICML 2019): adaptive diversity promoting regularizer on member outputs.

With p_i = softmax(f_i(x)) the prediction of member i (C classes), p = (1/k) sum_i p_i the
ensemble prediction, and, for label y, q_i = p_i with entry y removed ((C - 1) entries) scaled to
unit L2 norm (the "non-maximal" prediction), per sample:

    H       = -sum_c p_c log p_c                                    (ensemble entropy)
    G       = [<q_i, q_j>]_{i,j}                                    (k x k Gram matrix)
    log_det = log det(G + log_det_eps * I)                          (ensemble diversity)
    ADP     = -alpha * H - beta * log_det                           (batch mean)

Paper defaults: alpha = 2, beta = 0.5, log_det_eps = 1e-6. Maximising H keeps the ensemble from
being over-confident; maximising log_det pushes the members' wrong-class predictions apart (G -> I)
without touching the true class. It needs the members' outputs only (no input gradients).

Difference from the paper: the paper adds ADP to the *sum* of the members' cross-entropies, while
ncen's training loss uses their *mean*, so at the same alpha and beta the regularizer weighs k times
more relative to the cross-entropy here. Divide alpha and beta by k to match the paper's balance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ncen_cli.defenses.base import EPS, Defense, DefenseInputs, Hyperparameter


def ensemble_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the mean member prediction. logits: (k, B, C) -> (B,)."""
    mean_prob = torch.softmax(logits.float(), dim=-1).mean(0)
    return -(mean_prob * torch.log(mean_prob.clamp_min(EPS))).sum(-1)


def non_maximal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unit-norm predictions with the true class removed. (k, B, C), (B,) -> (k, B, C - 1)."""
    k, batch, classes = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    keep = ~F.one_hot(labels, classes).bool()  # (B, C)
    rest = probs[:, keep].view(k, batch, classes - 1)
    return rest / (rest.norm(dim=-1, keepdim=True) + EPS)


def log_det_diversity(
    logits: torch.Tensor, labels: torch.Tensor, log_det_eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample log det(G + eps I) of the non-maximal predictions' Gram matrix. -> (B,).

    logits: (k, B, C); labels: (B,). Computed in float64 (G is near-singular when members agree).
    """
    q = non_maximal(logits, labels).double()
    gram = torch.einsum("ibc,jbc->bij", q, q)  # (B, k, k)
    eye = torch.eye(q.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.logdet(gram + log_det_eps * eye).float()


def terms(
    logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float, log_det_eps: float
) -> dict[str, torch.Tensor]:
    """The weighted ``entropy`` (-alpha H) and ``log_det`` (-beta log det) terms, batch means."""
    return {
        "entropy": -alpha * ensemble_entropy(logits).mean(),
        "log_det": -beta * log_det_diversity(logits, labels, log_det_eps).mean(),
    }


def regularizer(
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 0.5,
    log_det_eps: float = 1e-6,
) -> torch.Tensor:
    """The ADP regularizer as one scalar. logits: (k, B, C); labels: (B,)."""
    return sum(terms(logits, labels, alpha, beta, log_det_eps).values())


def _loss_terms(
    inputs: DefenseInputs, alpha: float, beta: float, log_det_eps: float
) -> dict[str, torch.Tensor]:
    return terms(inputs.logits, inputs.labels, alpha, beta, log_det_eps)


DEFENSE = Defense(
    name="adp",
    summary="ADP (Pang et al. 2019): ensemble entropy plus log-det diversity of the members' "
    "non-maximal predictions",
    hyperparameters={
        "alpha": Hyperparameter(2.0, "weight of the ensemble entropy (maximised)"),
        "beta": Hyperparameter(0.5, "weight of the log-det diversity (maximised)"),
        "log_det_eps": Hyperparameter(1e-6, "ridge added to the Gram matrix", minimum=1e-12),
    },
    loss_terms=_loss_terms,
    needs_input_gradients=False,
    needs_logits=True,
)
