"""What the defenses act on, measured on test data: input-gradient diversity and member agreement.

:func:`gradient_diversity` runs an ensemble in eval mode over test images, batch by batch in
order, and reports

* per member pair: the cosine between the members' input gradients (mean and quartiles over the
  images), how often their predictions disagree, and the correlation of their errors;
* the dispersion of the gradient norms: per image std/mean of ||g_i|| over the members (population
  std), averaged over the images;
* the regularizers' terms, unweighted (every lambda = 1), computed by the registered defenses' own
  ``loss_terms`` on the input gradients exactly as a training step computes them, one value per
  batch of ``batch_size`` images, averaged over the batches (so, like training, they depend on the
  batch size where a defense reduces over the batch: ``gpmr``'s magnitude term);
* each member's clean accuracy, and the combined ensemble's.

The input gradients are those a training step takes (the training step's own member pass): g_i =
d (sum_b CE(f_i(x_b), y_b)) / d x, here in eval mode, where each image's gradient is its own CE's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ncen_cli.data.pipeline import iterate_eval_batches
from ncen_cli.defenses.base import DefenseInputs, flat_norms, pairwise_cosines
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import UsageError
from ncen_cli.registry import DEFENSES
from ncen_cli.train_step import _member_pass

# report key -> (defense, its term): every lambda of the defense is set to 1
TERMS: dict[str, tuple[str, str]] = {
    "ncen.cos": ("ncen", "cos"),
    "ncen.norm": ("ncen", "norm"),
    "ncen-official.cos": ("ncen-official", "cos"),
    "ncen-official.norm": ("ncen-official", "norm"),
    "gal": ("gal", "gal"),
    "gpmr.div": ("gpmr", "div"),
    "gpmr.eq": ("gpmr", "eq"),
}
QUARTILES = (0.25, 0.5, 0.75)


@dataclass
class PairDiagnostics:
    """Members i < j: gradient cosine (mean, quartiles), prediction disagreement, error
    correlation (Pearson over the 0/1 error indicators; None when either member's errors are
    constant)."""

    i: int
    j: int
    grad_cosine_mean: float
    grad_cosine_quartiles: list[float]
    disagreement: float
    error_correlation: float | None


@dataclass
class Diagnostics:
    """The result of :func:`gradient_diversity` (``to_json`` gives the ``ncen inspect`` shape)."""

    n: int
    members: list[str]
    member_accuracy: list[float]
    ensemble_accuracy: float
    pairs: list[PairDiagnostics]
    norm_dispersion: float
    terms: dict[str, float]
    batch_size: int
    batches: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "members": self.members,
            "member_accuracy": self.member_accuracy,
            "ensemble_accuracy": self.ensemble_accuracy,
            "pairs": [vars(p) for p in self.pairs],
            "norm_dispersion": self.norm_dispersion,
            "terms": self.terms,
            "batch_size": self.batch_size,
            "batches": self.batches,
            **self.extra,
        }


def _unit_weights(name: str) -> dict[str, float]:
    return {key: 1.0 for key in DEFENSES.get(name).hyperparameters}


def batch_terms(inputs: DefenseInputs) -> dict[str, float]:
    """The unweighted terms of :data:`TERMS` on one batch, by the defenses' own ``loss_terms``."""
    values: dict[str, float] = {}
    for defense_name in dict.fromkeys(d for d, _ in TERMS.values()):
        terms = DEFENSES.get(defense_name).loss_terms(inputs, **_unit_weights(defense_name))
        for key, (d, term) in TERMS.items():
            if d == defense_name:
                values[key] = float(terms[term])
    return values


def _error_correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation of two 0/1 vectors; None when either is constant."""
    a, b = a.double(), b.double()
    da, db = a - a.mean(), b - b.mean()
    denominator = float((da.square().sum() * db.square().sum()).sqrt())
    return float((da * db).sum()) / denominator if denominator > 0 else None


def _input_gradients(
    ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's logits (k, B, classes) and input gradients (k, B, C, H, W), detached, taken
    by the training step's member pass."""
    with torch.enable_grad():
        passes = [_member_pass(m, x, y, input_grad=True) for m in ensemble.members]
    logits = torch.stack([p.logits.detach() for p in passes])
    grads = torch.stack([cast(torch.Tensor, p.input_grad).detach() for p in passes])  # asked for
    return logits, grads


def gradient_diversity(
    ensemble: Ensemble,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Diagnostics:
    """Measure gradient diversity and member agreement on test data, in eval mode.

    Args:
        ensemble: the members (any mode on entry; run in eval mode, mode restored after).
        test_x: (N, C, H, W) uint8 images; test_y: (N,) labels.
        batch_size: images per batch (the terms are computed per batch, then averaged).
        progress: called with (images done, N) after each batch.
    """
    if len(test_x) == 0:
        raise UsageError("no test images to inspect")
    was_training = ensemble.training
    ensemble.eval()
    k, n = ensemble.k, len(test_x)
    cosines, dispersions, predictions, term_rows = [], [], [], []
    correct_ensemble = 0
    try:
        for x, y in iterate_eval_batches(test_x, test_y, batch_size, device):
            logits, grads = _input_gradients(ensemble, x, y)
            cosines.append(pairwise_cosines(grads).cpu())  # (k, k, B)
            norms = flat_norms(grads)  # (k, B)
            mean = norms.mean(0)
            dispersions.append((norms.std(0, unbiased=False) / mean.clamp_min(1e-30)).cpu())
            predictions.append(logits.argmax(-1).cpu())  # (k, B)
            correct_ensemble += int((ensemble.combine_logits(logits).argmax(-1) == y).sum())
            term_rows.append(batch_terms(DefenseInputs(x, y, logits, grads)))
            if progress is not None:
                progress(sum(p.shape[1] for p in predictions), n)
    finally:
        ensemble.train(was_training)
    cos = torch.cat(cosines, dim=2)
    preds = torch.cat(predictions, dim=1)
    errors = preds != test_y.to(preds.device)[None]
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            values = cos[i, j].double()
            pairs.append(
                PairDiagnostics(
                    i,
                    j,
                    float(values.mean()),
                    [float(q) for q in torch.quantile(values, torch.tensor(QUARTILES).double())],
                    float((preds[i] != preds[j]).double().mean()),
                    _error_correlation(errors[i], errors[j]),
                )
            )
    names = ensemble.metadata.get("members") or [type(m).__name__ for m in ensemble.members]
    return Diagnostics(
        n=n,
        members=list(names),
        member_accuracy=[float(1 - errors[i].double().mean()) for i in range(k)],
        ensemble_accuracy=correct_ensemble / n,
        pairs=pairs,
        norm_dispersion=float(torch.cat(dispersions).double().mean()),
        terms={key: sum(row[key] for row in term_rows) / len(term_rows) for key in TERMS},
        batch_size=batch_size,
        batches=len(term_rows),
    )
