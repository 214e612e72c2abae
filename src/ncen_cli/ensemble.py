"""The ensemble: k members in an ``nn.ModuleList`` and a recorded rule combining their logits."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from ncen_cli.archs import build_member
from ncen_cli.errors import UsageError

COMBINE_RULES = ("mean-logits", "mean-prob")
# More members than this is a typo (99999999999xresnet20), not an experiment; the paper uses <= 8.
MAX_MEMBERS = 64
MIN_MEMBERS = 2  # diversity needs a pair


def paper_ensemble(index: int, k: int) -> list[str]:
    """The paper's Table I structures for k members.

    Ensemble1 = k x resnet20, Ensemble2 = k x resnet26, Ensemble3 = k x resnet32, Ensemble4 = a mix.
    Table I writes Ensemble4 as (k - floor((k-1)/2)) x resnet20 + floor((k-1)/2) x resnet26 +
    1 x resnet32, which adds up to k + 1 members; we keep its resnet26 and resnet32 counts and fill
    up to k with resnet20 (k = 3 gives resnet20, resnet26, resnet32).
    """
    if k < 1:
        return []
    if index in (1, 2, 3):
        return [("resnet20", "resnet26", "resnet32")[index - 1]] * k
    n26 = (k - 1) // 2
    return ["resnet20"] * (k - n26 - 1) + ["resnet26"] * n26 + ["resnet32"]


def parse_members(spec: str) -> list[str]:
    """Parse ``--members`` into architecture names.

    Accepts a comma list (``resnet20,resnet26,resnet32``), counts (``3xresnet20``), or a Table I
    shorthand ``ensemble1``..``ensemble4`` (k = 3) with an optional size, e.g. ``ensemble4-k5``.
    How many members an ensemble needs is :func:`check_member_count`'s to say (the run spec,
    :class:`~ncen_cli.training.TrainConfig`, and :class:`Ensemble` call it).
    """
    spec = spec.strip().lower()
    shorthand = re.fullmatch(r"ensemble([1-4])(?:[-_]?k(\d+))?", spec)
    if shorthand:
        k = int(shorthand.group(2) or 3)
        _check_count(k, spec)
        return paper_ensemble(int(shorthand.group(1)), k)
    names: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        count, sep, arch = item.partition("x")
        if sep and count.isdigit():
            _check_count(int(count) + len(names), spec)
            names.extend([arch] * int(count))
        else:
            names.append(item)
        _check_count(len(names), spec)
    return names


def check_member_count(count: int) -> None:
    """UsageError unless ``count`` members make an ensemble (at least :data:`MIN_MEMBERS`): the
    one member-count check, made by :class:`Ensemble` and by the run spec
    (:meth:`~ncen_cli.training.TrainConfig.validate`, before any data is loaded)."""
    if count < MIN_MEMBERS:
        raise UsageError(f"an ensemble needs at least {MIN_MEMBERS} members, got {count}")


def _check_count(count: int, spec: str) -> None:
    if count > MAX_MEMBERS:
        raise UsageError(f"--members '{spec[:40]}' asks for {count} members; at most {MAX_MEMBERS}")


class Ensemble(nn.Module):
    """k members whose outputs are combined into one prediction.

    Args:
        members: the member modules, each mapping (B, C, H, W) in [0, 1] to (B, num_classes) logits.
        combine: ``"mean-logits"`` (average the members' logits) or ``"mean-prob"`` (log of the
            average of the members' softmax probabilities, a log-probability usable as logits).
        metadata: free-form record (architectures, dataset, training config) kept with checkpoints.
    """

    def __init__(
        self,
        members: list[nn.Module] | nn.ModuleList,
        combine: str = "mean-logits",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if combine not in COMBINE_RULES:
            raise UsageError(
                f"unknown combination rule '{combine}'; choose {', '.join(COMBINE_RULES)}"
            )
        check_member_count(len(members))
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def k(self) -> int:
        return len(self.members)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Run each member once. (B, C, H, W) -> (k, B, num_classes) logits."""
        return torch.stack([member(x) for member in self.members])

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Combine member logits. (k, B, num_classes) -> (B, num_classes)."""
        if self.combine == "mean-logits":
            return logits.mean(dim=0)
        return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, num_classes) combined logits."""
        return self.combine_logits(self.member_logits(x))


def build_ensemble(
    members: list[str],
    input_shape: tuple[int, int, int],
    num_classes: int,
    activation: str = "relu",
    combine: str = "mean-logits",
) -> Ensemble:
    """Build a fresh ensemble from architecture names (initialised from torch's current RNG)."""
    modules = [build_member(name, input_shape, num_classes, activation) for name in members]
    return Ensemble(modules, combine=combine, metadata={"members": list(members)})
