"""Defenses that craft the inputs their members train on (plugin API 2): the per-step generator,
the state a crafting pass must leave untouched, the checked call, and the composition of a
regularizer defense with an input-crafting one (``--defense ncen+adv-train``).

A crafting defense's ``member_inputs(ensemble, x, y, context, **hyperparameters)`` returns
``(inputs, labels)``: inputs (N, C, H, W) shared by every member or (k, N, C, H, W) per member, in
[0, 1], labels (N,). The training step then takes member i's cross-entropy (and the defense's
terms) on its inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from ncen_cli.defenses.base import CraftContext, Defense, DefenseInputs
from ncen_cli.errors import UsageError

if TYPE_CHECKING:
    from ncen_cli.ensemble import Ensemble

_MIX = 1_000_003  # the data pipeline's (seed, epoch) mixing constant, continued over (step, rank)


def crafting_generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, step, rank) alone: the crafting of step ``step``
    of epoch ``epoch`` draws the same numbers in an uninterrupted and a resumed run."""
    mixed = ((seed * _MIX + epoch) * _MIX + step) * 1_009 + rank
    return torch.Generator().manual_seed(mixed % (2**63))


@contextmanager
def crafting_state(modules: nn.Module, train_mode: bool) -> Iterator[None]:
    """Run a crafting pass on ``modules``: parameters frozen (input gradients only), every
    submodule in train (``train_mode``) or eval mode, and afterwards each submodule's mode, each
    parameter's ``requires_grad`` and every buffer (BatchNorm running statistics) restored
    exactly."""
    modes = [(m, m.training) for m in modules.modules()]
    params = [p for p in modules.parameters() if p.requires_grad]
    buffers = [(b, b.detach().clone()) for b in modules.buffers()]
    modules.train(train_mode)
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for buf, old in buffers:
                buf.copy_(old)


def craft_batch(
    defense: Defense,
    ensemble: Ensemble,
    x: torch.Tensor,
    y: torch.Tensor,
    hyperparameters: Mapping[str, float],
    context: CraftContext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call ``defense.member_inputs`` and check what it returns (shapes, [0, 1], detached).

    x: (B, C, H, W), y: (B,). Returns inputs (N, C, H, W) or (k, N, C, H, W) and labels (N,)."""
    assert defense.member_inputs is not None
    inputs, labels = defense.member_inputs(ensemble, x, y, context, **hyperparameters)
    inputs, labels = inputs.detach(), labels.detach()
    k = len(ensemble.members)
    shared = inputs.dim() == x.dim() and inputs.shape[1:] == x.shape[1:]
    per_member = inputs.dim() == x.dim() + 1 and inputs.shape[0] == k
    if not (shared or per_member) or per_member and inputs.shape[2:] != x.shape[1:]:
        raise UsageError(
            f"defense '{defense.name}' crafted inputs of shape {tuple(inputs.shape)} for a batch "
            f"of {tuple(x.shape)}; expected (N, C, H, W) or ({k}, N, C, H, W)"
        )
    if labels.shape != (inputs.shape[-4],):
        raise UsageError(
            f"defense '{defense.name}' crafted {inputs.shape[-4]} inputs but "
            f"{tuple(labels.shape)} labels"
        )
    if bool(inputs.min() < 0) or bool(inputs.max() > 1):
        raise UsageError(f"defense '{defense.name}' crafted inputs outside [0, 1]")
    return inputs, labels


def _only(names: Mapping[str, object], values: Mapping[str, float]) -> dict[str, float]:
    return {n: values[n] for n in names}


def compose(regularizer: Defense, crafter: Defense) -> Defense:
    """``regularizer``'s terms evaluated on the inputs ``crafter`` makes (e.g. NCEn on PGD
    examples: ``ncen+adv-train``). Hyperparameters are the union (a shared name is refused); the
    crafter must give every member the same inputs, so that the regularizer's per-sample
    comparisons across members compare the same images."""
    if regularizer.member_inputs is not None or crafter.member_inputs is None:
        raise UsageError(
            f"'{regularizer.name}+{crafter.name}': write the regularizer first and a defense that "
            "crafts training inputs (adv-train, dverge) second"
        )
    clash = set(regularizer.hyperparameters) & set(crafter.hyperparameters)
    if clash:
        raise UsageError(
            f"'{regularizer.name}' and '{crafter.name}' both have {', '.join(sorted(clash))}"
        )
    name = f"{regularizer.name}+{crafter.name}"

    def loss_terms(inputs: DefenseInputs, **values: float) -> dict[str, torch.Tensor]:
        terms = regularizer.loss_terms(inputs, **_only(regularizer.hyperparameters, values))
        mine = crafter.loss_terms(inputs, **_only(crafter.hyperparameters, values))
        return {**terms, **mine}

    def member_inputs(ensemble, x, y, context, **values):
        inputs, labels = crafter.member_inputs(
            ensemble, x, y, context, **_only(crafter.hyperparameters, values)
        )
        if inputs.dim() != x.dim():
            raise UsageError(
                f"'{name}': {crafter.name} trains each member on its own inputs, so a regularizer "
                "comparing the members per sample cannot be added to it"
            )
        return inputs, labels

    def check(values: dict[str, float]) -> None:
        for part in (regularizer, crafter):
            if part.check is not None:
                part.check(_only(part.hyperparameters, values))

    return replace(
        regularizer,
        name=name,
        summary=f"{regularizer.summary}; trained on {crafter.name}'s inputs",
        hyperparameters={**regularizer.hyperparameters, **crafter.hyperparameters},
        loss_terms=loss_terms,
        needs_input_gradients=regularizer.needs_input_gradients or crafter.needs_input_gradients,
        needs_logits=regularizer.needs_logits or crafter.needs_logits,
        member_inputs=member_inputs,
        check=check,
    )


def get_defense(name: str) -> Defense:
    """The registered defense ``name``, or the composition ``REGULARIZER+CRAFTER``."""
    from ncen_cli.registry import DEFENSES

    if "+" not in name:
        return DEFENSES.get(name)
    parts = name.split("+")
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"--defense '{name}': combine exactly two, as REGULARIZER+CRAFTER")
    return compose(DEFENSES.get(parts[0]), DEFENSES.get(parts[1]))
