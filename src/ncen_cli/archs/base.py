"""The architecture contract: what an ``ncen.archs`` entry point must be."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from torch import nn

from ncen_cli.errors import UsageError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "leakyrelu": lambda: nn.LeakyReLU(0.1, inplace=False),
}


class ArchitectureBuilder(Protocol):
    """:attr:`Architecture.build`: ``build(input_shape, num_classes, activation) -> nn.Module``,
    the arguments passed by position (name them as you like)."""

    def __call__(
        self, input_shape: tuple[int, int, int], num_classes: int, activation: str, /
    ) -> nn.Module:
        """A new member for images of ``input_shape`` (C, H, W) and ``num_classes`` classes, with
        ``activation`` (a key of :data:`ACTIVATIONS`); it maps (B, C, H, W) images in [0, 1] to
        (B, num_classes) logits."""
        ...


@dataclass(frozen=True)
class Architecture:
    """A member architecture.

    Attributes:
        name: registry name, e.g. ``"resnet20"``.
        summary: one line for ``ncen plugins``.
        build: ``build(input_shape, num_classes, activation) -> nn.Module``; ``input_shape`` is
            ``(C, H, W)``; the module maps ``(B, C, H, W)`` images in [0, 1] to ``(B, num_classes)``
            **logits** (never probabilities).
        min_size: smallest H and W the architecture accepts.
    """

    name: str
    summary: str
    build: ArchitectureBuilder
    min_size: int = 1


def build_member(
    name: str, input_shape: tuple[int, int, int], num_classes: int, activation: str = "relu"
) -> nn.Module:
    """Build one member by registry name. Raises UsageError for unknown names or unfit inputs."""
    from ncen_cli.registry import ARCHS

    arch: Architecture = ARCHS.get(name)
    if activation not in ACTIVATIONS:
        raise UsageError(
            f"unknown activation '{activation}'; choose one of {', '.join(ACTIVATIONS)}"
        )
    if min(input_shape[1:]) < arch.min_size:
        raise UsageError(
            f"architecture '{name}' needs images of at least {arch.min_size}x{arch.min_size}, "
            f"got {input_shape[1]}x{input_shape[2]}"
        )
    shape = cast(tuple[int, int, int], tuple(input_shape))  # a plain tuple (not torch.Size)
    return arch.build(shape, num_classes, activation)
