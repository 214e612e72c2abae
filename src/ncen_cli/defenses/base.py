"""The defense contract (plugin API version 2; unchanged in version 3).

A defense is a :class:`Defense`: a name, its hyperparameters with per-dataset defaults, what it
needs (the members' input gradients, their logits, or both), and a function
``loss_terms`` that returns named, already weighted, scalar loss terms. The training loss is
``mean_i CE_i + sum(loss_terms(...).values())``.

Since API version 2 a defense may also craft the inputs the members train on
(``member_inputs``: adversarial training, DVERGE); CE_i and the terms are then taken on those
inputs. Version 1 defenses are valid version 2 defenses unchanged (the new fields are optional).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ncen_cli.registry import API_VERSION  # noqa: F401 - re-exported: plugins import it from here

if TYPE_CHECKING:
    from ncen_cli.ensemble import Ensemble

EPS = 1e-30  # guards divisions by norms; tiny enough not to break scale invariance


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
class CraftContext:
    """Where one training step is, for a defense that crafts its members' inputs.

    Attributes:
        generator: CPU ``torch.Generator`` seeded from (seed, epoch, step, rank) alone: draw every
            random number of the crafting from it (never from torch's global RNG), so a run
            repeats and resumes bit-identically.
        seed: the run's seed; epoch (from 0); step (batch index within the epoch, from 0).
    """

    generator: torch.Generator
    seed: int
    epoch: int
    step: int


class LossTerms(Protocol):
    """:attr:`Defense.loss_terms`: ``loss_terms(inputs, **hyperparameters) -> dict[str, Tensor]``.

    ``inputs`` comes by position; every resolved hyperparameter comes as a float keyword argument,
    which an implementation may take by name (``*, lambda_gal: float``) or as ``**values``."""

    def __call__(
        self, inputs: DefenseInputs, /, *args: Any, **hyperparameters: Any
    ) -> dict[str, torch.Tensor]:
        """Named scalar terms, each batch-averaged and already multiplied by its weight."""
        ...


class MemberInputs(Protocol):
    """:attr:`Defense.member_inputs` (API 2): ``member_inputs(ensemble, x, y, context,
    **hyperparameters) -> (inputs, labels)``; the first four by position, every hyperparameter as
    a float keyword argument (by name or as ``**values``)."""

    def __call__(
        self,
        ensemble: Ensemble,
        x: torch.Tensor,
        y: torch.Tensor,
        context: CraftContext,
        /,
        *args: Any,
        **hyperparameters: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the members train on for the batch x (B, C, H, W), y (B,): inputs (N, C, H, W)
        or (k, N, C, H, W) in [0, 1], labels (N,) (see :class:`Defense`)."""
        ...


HyperparameterCheck = Callable[[dict[str, float]], None]
""":attr:`Defense.check` (API 2): ``check(values)`` raises ``UsageError`` (one line) for resolved
hyperparameter values the defense cannot run with."""


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
        member_inputs: optional (API 2) ``member_inputs(ensemble, x, y, context: CraftContext,
            **hyperparameters) -> (inputs, labels)``: what the members train on for the batch
            x (B, C, H, W), y (B,). ``inputs`` is (N, C, H, W) (every member trains on it) or
            (k, N, C, H, W) (member i on ``inputs[i]``), images in [0, 1]; ``labels`` (N,). It is
            called with the ensemble in train mode under the step's autocast; it must leave
            parameters, ``.grad``, modes and BatchNorm buffers as it found them (see
            :mod:`ncen_cli.crafting`) and draw randomness from ``context.generator`` only.
        check: optional (API 2) ``check(values) -> None``: raise ``UsageError`` (one line) for
            resolved hyperparameter values the defense cannot run with (e.g. a non-integer
            step count).
    """

    name: str
    summary: str
    hyperparameters: Mapping[str, Hyperparameter]
    loss_terms: LossTerms
    needs_input_gradients: bool = True
    needs_logits: bool = False
    member_inputs: MemberInputs | None = None
    check: HyperparameterCheck | None = None

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
        if self.check is not None:
            self.check(values)
        return values


def require_integer(values: Mapping[str, float], name: str, minimum: int = 1) -> int:
    """``values[name]`` as an int; UsageError unless it is a whole number >= ``minimum``."""
    from ncen_cli.errors import UsageError

    value = values[name]
    if not (value >= minimum and float(value).is_integer()):
        flag = name.replace("_", "-")
        raise UsageError(f"--{flag} must be a whole number >= {minimum}, got {value:g}")
    return int(value)


def require_at_most(values: Mapping[str, float], name: str, maximum: float) -> None:
    """UsageError unless ``values[name] <= maximum``."""
    from ncen_cli.errors import UsageError

    if not values[name] <= maximum:
        flag = name.replace("_", "-")
        raise UsageError(f"--{flag} must be <= {maximum:g}, got {values[name]:g}")


def flat_norms(grads: torch.Tensor) -> torch.Tensor:
    """Per-member, per-sample L2 norms. (k, B, *shape) -> (k, B)."""
    return grads.flatten(start_dim=2).norm(dim=2)


def pairwise_cosines(grads: torch.Tensor) -> torch.Tensor:
    """Cosine of every pair of members' gradients, per sample. (k, B, *shape) -> (k, k, B)."""
    flat = grads.flatten(start_dim=2)
    unit = flat / (flat.norm(dim=2, keepdim=True) + EPS)
    return torch.einsum("ibd,jbd->ijb", unit, unit)


def input_gradient_terms(
    terms: Callable[..., dict[str, torch.Tensor]], **variant: Any
) -> LossTerms:
    """A :attr:`Defense.loss_terms` for a defense whose terms depend on the input gradients only:
    ``loss_terms(inputs, **hyperparameters) = terms(inputs.input_grads, **variant,
    **hyperparameters)``, with ``variant`` the registration's fixed choices (e.g. NCEn's
    ``form``)."""

    def loss_terms(inputs: DefenseInputs, **hyperparameters: float) -> dict[str, torch.Tensor]:
        return terms(inputs.input_grads, **variant, **hyperparameters)

    return loss_terms
