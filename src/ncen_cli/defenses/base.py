"""The defense contract (plugin API version 1).

A defense is a :class:`Defense`: a name, its hyperparameters with per-dataset defaults, what it
needs (the members' input gradients, their logits, or both), and a function
``loss_terms`` that returns named, already weighted, scalar loss terms. The training loss is
``mean_i CE_i + sum(loss_terms(...).values())``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

EPS = 1e-30  # guards divisions by norms; tiny enough not to break scale invariance
API_VERSION = 1


@dataclass(frozen=True)
class DefenseInputs:
    """What a defense sees for one batch.

    Attributes:
        inputs: (B, C, H, W) images in [0, 1].
        labels: (B,) class ids.
        logits: (k, B, num_classes) member logits (in the autograd graph).
        input_grads: (k, B, C, H, W) input gradients of each member's batch-summed CE,
            g_i[b] = d (sum_b' CE(f_i(x_b'), y_b')) / d x_b. With BatchNorm in train mode (batch
            statistics) sample b's gradient also carries the other samples' CE, so it is not
            sample b's own CE gradient; in eval mode it is. The authors' code uses the gradients of
            (1/k) sum_i mean_b CE_i, i.e. g_i / (k B). Created with ``create_graph=True`` (exact
            mode) so that a loss on them reaches the parameters; ``None`` when the defense does
            not ask for them.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    input_grads: torch.Tensor | None


@dataclass(frozen=True)
class Hyperparameter:
    """A non-negative float hyperparameter with a default and optional per-dataset defaults."""

    default: float
    help: str
    per_dataset: Mapping[str, float] = field(default_factory=dict)
    minimum: float = 0.0

    def default_for(self, dataset: str) -> float:
        return float(self.per_dataset.get(dataset, self.default))


@dataclass(frozen=True)
class Defense:
    """An ensemble defense.

    Attributes:
        name: registry name (``--defense NAME``).
        summary: one line for ``ncen plugins`` and docs.
        hyperparameters: name -> :class:`Hyperparameter` (names use underscores: ``lambda_cos``).
        loss_terms: ``loss_terms(inputs: DefenseInputs, **hyperparameters) -> dict[str, Tensor]`` of
            scalar terms (batch-averaged, already multiplied by their weights).
        needs_input_gradients: whether ``inputs.input_grads`` must be computed (double backprop).
        needs_logits: whether the terms depend on ``inputs.logits`` (not only on the input
            gradients).
    """

    name: str
    summary: str
    hyperparameters: Mapping[str, Hyperparameter]
    loss_terms: Callable[..., dict[str, torch.Tensor]]
    needs_input_gradients: bool = True
    needs_logits: bool = False

    def resolve(
        self, dataset: str, overrides: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Hyperparameters for ``dataset`` with ``overrides`` applied (unknown names rejected)."""
        from ncen_cli.errors import UsageError

        values = {n: hp.default_for(dataset) for n, hp in self.hyperparameters.items()}
        for key, value in (overrides or {}).items():
            if key not in self.hyperparameters:
                known = ", ".join(self.hyperparameters) or "none"
                raise UsageError(
                    f"defense '{self.name}' has no hyperparameter '{key}'; it has: {known}"
                )
            if not (value >= self.hyperparameters[key].minimum):  # also rejects NaN
                flag = key.replace("_", "-")
                raise UsageError(
                    f"--{flag} must be >= {self.hyperparameters[key].minimum}, got {value}"
                )
            values[key] = float(value)
        return values


def flat_norms(grads: torch.Tensor) -> torch.Tensor:
    """Per-member, per-sample L2 norms. (k, B, *shape) -> (k, B)."""
    return grads.flatten(start_dim=2).norm(dim=2)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dim, epsilon-guarded. (..., D) -> (...)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + EPS)


def pairwise_cosines(grads: torch.Tensor) -> torch.Tensor:
    """Cosine of every pair of members' gradients, per sample. (k, B, *shape) -> (k, k, B)."""
    flat = grads.flatten(start_dim=2)
    unit = flat / (flat.norm(dim=2, keepdim=True) + EPS)
    return torch.einsum("ibd,jbd->ijb", unit, unit)
