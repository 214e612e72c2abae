"""DVERGE (Yang et al., NeurIPS 2020): diversify the members' vulnerabilities by training each
member on the other members' distilled non-robust features.

Per batch x (B images), with labels y, and t a batch of *target* images (here: x shuffled so that
no image is its own target), member j distils, from every source image x_b, an image x'_jb close to
x_b (L-inf ball of radius ``eps``) whose features at layer ``layer`` of member j match those of
t_b::

    x'_j = argmin_{||x' - x||_inf <= eps}  MSE(h_j(x'), h_j(t))

by ``steps`` sign steps of ``step_size`` with momentum (gradients normalised per sample, mu = 1),
no random start (the authors' Linf_distillation). Member i then trains on the distilled images of
every other member with the *source* labels y (the round-robin "cross-training": x'_j looks like
x_b to the members but carries t_b's features for member j, so member i learns not to share
member j's non-robust features). The "+ clean" variant (``clean = 1``) adds the clean batch to
each member's training batch.

Layers are numbered as in the authors' ``get_features`` for a CIFAR ResNet of depth 6n + 2: 1 is
the stem's BatchNorm output, 2 .. 6n + 1 alternate between a basic block's first BatchNorm output
and its output (both before the activation), 6n + 2 the logits. ``layer = 0`` (the authors'
default, without ``--distill-fixed-layer``) draws one layer uniformly from 1 .. depth per epoch
(the smallest member's depth when depths differ), from a generator seeded by (seed, epoch).

Distillation runs with the members in train mode (BatchNorm batch statistics) as the authors'
code does, with frozen parameters; unlike the authors' code, BatchNorm running statistics are
restored afterwards, so only the training pass updates them. Differences from the authors'
code are listed in this plugin's README.
"""

from __future__ import annotations

import torch
from ncen_cli.attacks.base import MemberTarget
from ncen_cli.attacks.core import sign_ascent
from ncen_cli.crafting import crafting_state
from ncen_cli.defenses.base import (
    CraftContext,
    Defense,
    DefenseInputs,
    Hyperparameter,
    require_at_most,
    require_integer,
)
from ncen_cli.errors import UsageError
from torch import nn


class _Reached(Exception):
    """Raised by the feature hook to stop the forward pass once the layer is reached."""


def depth_of(member: nn.Module) -> int:
    """6n + 2 for a CIFAR ResNet member with 3n basic blocks (ncen's resnet20/26/32)."""
    blocks = getattr(member, "layers", None)
    if not (isinstance(blocks, nn.Sequential) and hasattr(member, "act") and hasattr(member, "fc")):
        raise UsageError(
            f"dverge distils features of CIFAR-style ResNet members (ncen's resnetN); "
            f"{type(member).__name__} is not one"
        )
    return 2 * len(blocks) + 2


def features(member: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Member's features at ``layer`` (numbering in the module docstring) for x (B, C, H, W):
    (B, channels, H', W'), or the logits (B, classes) at the last layer. The forward pass stops
    at the layer."""
    depth = depth_of(member)
    if not 1 <= layer <= depth:
        raise UsageError(f"--layer {layer} is outside this member's layers 1..{depth}")
    if layer == depth:
        return member(x)
    if layer == 1:
        module = member.act
    else:
        block = member.layers[(layer - 2) // 2]
        module = block.act1 if (layer - 2) % 2 == 0 else block.act2
    found: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        found.append(args[0])  # the activation's input: the features before the ReLU
        raise _Reached

    handle = module.register_forward_pre_hook(hook)
    try:
        member(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return found[0]


def distill(
    member: nn.Module,
    source: torch.Tensor,
    target: torch.Tensor,
    layer: int,
    eps: float,
    step_size: float,
    steps: int,
) -> torch.Tensor:
    """Source images (B, C, H, W) moved within ``eps`` (L-inf) so that ``member``'s features at
    ``layer`` approach those of ``target`` (B, C, H, W): ncen's sign-gradient ascent on the
    negative per-sample feature MSE, with MI-FGSM momentum (decay 1), no random start, all steps
    for every image. Call under :func:`ncen_cli.crafting.crafting_state`."""
    with torch.no_grad():
        goal = features(member, target, layer).float()

    def loss_fn(_target, x: torch.Tensor, _y: torch.Tensor):
        gap = (features(member, x, layer).float() - goal).flatten(1)
        return -gap.pow(2).mean(1), gap.new_zeros(len(x), 1)  # (B,), placeholder logits

    dummy_y = torch.zeros(len(source), dtype=torch.long, device=source.device)
    return sign_ascent(
        MemberTarget(member),
        source.float(),
        dummy_y,
        eps=eps,
        steps=steps,
        step_size=step_size,
        loss_fn=loss_fn,
        random_start=False,
        decay=1.0,
        early_stop=False,
    )


def distillation_layer(members: list[nn.Module], layer: float, context: CraftContext) -> int:
    """``layer`` itself, or (0) one layer in 1 .. min depth drawn per epoch from (seed, epoch)."""
    if layer > 0:
        return int(layer)
    depth = min(depth_of(m) for m in members)
    gen = torch.Generator().manual_seed((context.seed * 1_000_003 + context.epoch) * 7 + 3)
    return int(torch.randint(1, depth + 1, (1,), generator=gen))


def shuffled_targets(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x (B, C, H, W) reordered so that every image gets another one as target (B >= 2): a random
    cycle through the batch."""
    order = torch.randperm(len(x), generator=generator)
    successor = torch.empty_like(order)
    successor[order] = order.roll(-1)
    return x[successor.to(x.device)]


def member_inputs(
    ensemble: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    context: CraftContext,
    eps: float,
    step_size: float,
    steps: float,
    layer: float,
    clean: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, H, W), y (B,) -> member i's batch (k, N, C, H, W): the other k - 1 members'
    distilled images (plus x with ``clean``), N = (k - 1) B (+ B), and labels (N,)."""
    members = list(ensemble.members)
    if len(x) < 2:
        return x, y  # no other image to take features from: train on the batch as it is
    at = distillation_layer(members, layer, context)
    target = shuffled_targets(x, context.generator)
    with crafting_state(ensemble, train_mode=True):
        distilled = [distill(m, x, target, at, eps, step_size, int(steps)) for m in members]
    batches = []
    for i in range(len(members)):
        own = [d for j, d in enumerate(distilled) if j != i] + ([x.float()] if clean else [])
        batches.append(torch.cat(own))
    copies = len(members) - 1 + (1 if clean else 0)
    return torch.stack(batches).to(x.dtype), y.repeat(copies)


def _terms(inputs: DefenseInputs, **_: float) -> dict[str, torch.Tensor]:
    return {}


def _check(values: dict[str, float]) -> None:
    require_integer(values, "steps")
    require_integer(values, "layer", minimum=0)
    require_at_most(values, "eps", 1.0)
    if values["clean"] not in (0.0, 1.0):
        raise UsageError(f"--clean must be 0 or 1, got {values['clean']:g}")


DEFENSE = Defense(
    name="dverge",
    summary="DVERGE (Yang et al. 2020): each member trains on the other members' distilled "
    "non-robust features (clean=1: + clean)",
    hyperparameters={
        "eps": Hyperparameter(0.07, "L-inf radius of the feature distillation"),
        "step_size": Hyperparameter(0.007, "distillation step size"),
        "steps": Hyperparameter(10, "distillation steps (a whole number >= 1)", minimum=1),
        "layer": Hyperparameter(
            0, "distillation layer 1..6n+2 as in the authors' code; 0: random per epoch"
        ),
        "clean": Hyperparameter(0, "1: also train each member on the clean batch (+ clean)"),
    },
    loss_terms=_terms,
    needs_input_gradients=False,
    member_inputs=member_inputs,
    check=_check,
)
