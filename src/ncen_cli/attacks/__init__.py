"""White-box and black-box L-infinity attacks on ensembles (``ncen.attacks`` entry points)."""

from ncen_cli.attacks.base import (
    OBJECTIVES,
    Attack,
    AttackSettings,
    AttackTarget,
    MemberTarget,
    RunInput,
    objective_loss,
)

__all__ = [
    "OBJECTIVES",
    "Attack",
    "AttackSettings",
    "AttackTarget",
    "MemberTarget",
    "RunInput",
    "objective_loss",
]
