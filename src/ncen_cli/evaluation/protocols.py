"""Attack protocols: which attack runs, at which settings. :func:`runs_for` is the one builder
that ``ncen attack``, ``ncen transfer`` and ``ncen sweep`` use; the named protocols
(:func:`paper_protocol`, :func:`strong_protocol`, :func:`authors_protocol`) are its parts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ncen_cli.attacks.base import OBJECTIVES, Attack, AttackSettings
from ncen_cli.authors_protocol import ADVERTORCH_L1_FLOOR, AuthorsQuirks
from ncen_cli.errors import UsageError
from ncen_cli.presets import PAPER_EPS

# Table II of the paper: the settings as a function of eps (the eps values: presets.PAPER_EPS).
PAPER_SETTINGS: dict[str, Callable[[float], dict[str, Any]]] = {
    "fgsm": lambda eps: {"steps": 1, "step_size": eps, "random_start": False},
    "mifgsm": lambda eps: {"steps": 40, "step_size": 0.01, "decay": 1.0, "random_start": False},
    "pgd": lambda eps: {"steps": 40, "step_size": eps, "random_start": True},
    "bim": lambda eps: {"steps": 10, "step_size": eps, "random_start": False},
}
STRONG_OBJECTIVES: dict[str, tuple[str, ...]] = {
    # objectives the strong protocol ascends, per combination rule (``prob`` on a mean-prob
    # ensemble is the CE of its combined output, so ``logits`` would repeat it)
    "mean-logits": ("mean-ce", "logits"),
    "mean-prob": ("mean-ce", "prob"),
}
PROTOCOLS = ("paper", "strong", "authors", "custom", "score")
"""What :func:`runs_for` builds: the paper's Table II, the strong protocol, the authors' released
evaluation, named attacks at their defaults (``custom``), or the sweep's scoring battery
(``score``)."""
PAPER_ATTACKS = ("fgsm", "mifgsm", "pgd", "bim")


@dataclass(frozen=True)
class AttackRun:
    """One attack at one setting.

    Attributes:
        attack: registry name (``ncen.attacks``).
        settings: every setting of the run.
    """

    attack: str
    settings: AttackSettings


def _family(family: str | None) -> str:
    if family not in PAPER_EPS:
        raise UsageError(f"no paper protocol for family '{family}'; known: {', '.join(PAPER_EPS)}")
    return family


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown --objective '{objective}'; choose {', '.join(OBJECTIVES)}")


def paper_protocol(
    family: str, objective: str = "mean-ce", eps: Sequence[float] | None = None
) -> list[AttackRun]:
    """The paper's Table II white-box settings for ``family`` (``fashionmnist`` or ``cifar10``).

    FGSM and MI-FGSM at eps 0.1/0.3 (CIFAR-10 0.03/0.09), PGD and BIM at 0.1/0.15 (0.01/0.02); PGD
    40 iterations of step eps from a random start, BIM 10 of step eps, MI-FGSM step 0.01, decay 1.0,
    40 iterations. ``eps`` replaces every attack's eps values.
    """
    _check_objective(objective)
    runs = []
    for attack, values in PAPER_EPS[_family(family)].items():
        for e in eps or values:
            settings = AttackSettings(eps=e, objective=objective, **PAPER_SETTINGS[attack](e))
            runs.append(AttackRun(attack, settings))
    return runs


def protocol_eps(family: str | None) -> list[float]:
    """Every eps value of the paper's protocol for ``family``, ascending."""
    return sorted({e for values in PAPER_EPS[_family(family)].values() for e in values})


def strong_objectives(combine: str = "mean-logits") -> tuple[str, ...]:
    """The objectives the strong protocol ascends for an ensemble combined by ``combine``."""
    if combine not in STRONG_OBJECTIVES:
        raise UsageError(
            f"unknown combination rule '{combine}'; choose {', '.join(STRONG_OBJECTIVES)}"
        )
    return STRONG_OBJECTIVES[combine]


def strong_protocol(
    family: str,
    restarts: int = 2,
    objective: str | None = None,
    eps: Sequence[float] | None = None,
    combine: str = "mean-logits",
) -> list[AttackRun]:
    """A stronger protocol at the paper's eps values (all of them, for every attack).

    Per eps, on every objective of :func:`strong_objectives` (``mean-ce`` and the combined output's
    CE; only ``objective`` when given): FGSM (the single-step reference for the masking checks),
    PGD with 50 steps of size eps/4 from random starts (``restarts`` counted worst-case per
    example) and APGD-CE at 100 iterations; then APGD-DLR (the combined logits' DLR) once.
    :func:`~ncen_cli.evaluation.evaluate` with ``worst_case=True`` adds the per-example worst case
    over all of them. ``eps`` replaces the eps values.
    """
    objectives = (objective,) if objective is not None else strong_objectives(combine)
    for o in objectives:
        _check_objective(o)
    if restarts < 1:
        raise UsageError(f"--restarts must be >= 1, got {restarts}")
    runs = []
    for e in eps or protocol_eps(family):
        runs += [
            AttackRun("fgsm", AttackSettings(eps=e, steps=1, step_size=e, objective=o))
            for o in objectives
        ]
        runs += [
            AttackRun(
                "pgd",
                AttackSettings(
                    eps=e,
                    steps=50,
                    step_size=e / 4,
                    restarts=restarts,
                    random_start=True,
                    objective=o,
                ),
            )
            for o in objectives
        ]
        runs += [
            AttackRun("apgd-ce", AttackSettings(eps=e, steps=100, random_start=True, objective=o))
            for o in objectives
        ]
        runs.append(
            AttackRun(
                "apgd-dlr", AttackSettings(eps=e, steps=100, random_start=True, objective="dlr")
            )
        )
    return runs


def authors_protocol(
    family: str, eps: Sequence[float] | None = None, quirks: AuthorsQuirks | None = None
) -> list[AttackRun]:
    """The paper's Table II attacks as the authors' advertorch code runs them (see
    :mod:`ncen_cli.authors_protocol`): the objective is CE on the wrapper's output (``logits`` on an
    :class:`~ncen_cli.authors_protocol.AuthorsEnsemble`); with ``advertorch_iterations`` no early
    stop, and MI-FGSM's L1 normalisation floored at 1e-6. Evaluate with ``evaluate(...,
    quirks=quirks)``."""
    quirks = quirks or AuthorsQuirks()
    runs = []
    for run in paper_protocol(family, "logits", eps):
        extra: dict[str, Any] = {}
        if quirks.advertorch_iterations:
            extra["early_stop"] = False
            if run.attack == "mifgsm":
                extra["momentum_l1_floor"] = ADVERTORCH_L1_FLOOR
        runs.append(replace(run, settings=replace(run.settings, extra=extra)))
    return runs


def attack_settings(
    attack: Attack, eps: float, objective: str = "mean-ce", **overrides: Any
) -> AttackSettings:
    """An attack's default settings at ``eps`` with ``overrides`` (None values ignored); see
    :meth:`~ncen_cli.attacks.base.Attack.settings_for` (an attack with its own fixed loss keeps
    it)."""
    return attack.settings_for(eps, objective, **overrides)


def custom_runs(
    attacks: Sequence[str],
    eps: Sequence[float] | None,
    family: str | None,
    objective: str = "mean-ce",
) -> list[AttackRun]:
    """Runs for named attacks at the given eps values (default: the paper's eps for that attack and
    family, or every paper eps for attacks outside Table II), each with the attack's defaults."""
    from ncen_cli.registry import ATTACKS

    _check_objective(objective)
    runs = []
    for name in attacks:
        attack: Attack = ATTACKS.get(name)
        values = eps or list(PAPER_EPS[_family(family)].get(name, protocol_eps(family)))
        runs += [AttackRun(name, attack_settings(attack, e, objective)) for e in values]
    return runs


def score_runs(
    family: str,
    attacks: Sequence[str] | None = None,
    eps: Sequence[float] | None = None,
    objective: str = "mean-ce",
    combine: str = "mean-logits",
) -> list[AttackRun]:
    """The sweep's scoring battery (paper Fig. 4) for ``attacks`` / ``eps`` (None: the default).

    Attacks of the paper's protocol (fgsm, mifgsm, pgd, bim; the default) keep the paper's
    settings and objective; other attacks (the strong ones: apgd-ce, ...) use their registered
    defaults and, when they ascend a CE objective, run on every objective of
    :func:`strong_objectives` for ``combine``; a cell scores each attack by its per-example worst
    case over those objectives. Each runs at every ``eps``, or without ``eps`` at its smaller paper
    epsilon (other attacks: the family's smallest paper epsilon).
    """
    from ncen_cli.registry import ATTACKS

    smaller = {name: min(values) for name, values in PAPER_EPS[_family(family)].items()}
    runs: list[AttackRun] = []
    for name in attacks if attacks is not None else list(smaller):
        ATTACKS.get(name)  # unknown names: UsageError listing the known ones
        values = list(eps) if eps is not None else [smaller.get(name, min(protocol_eps(family)))]
        if name in PAPER_SETTINGS:
            runs += [r for r in paper_protocol(family, objective, values) if r.attack == name]
        else:
            for o in strong_objectives(combine):
                extra = custom_runs([name], values, family, o)
                runs += [
                    r
                    for r in extra
                    if r.settings.objective == o or o == strong_objectives(combine)[0]
                ]  # a fixed loss (dlr) runs once
    return runs


def override_runs(
    runs: list[AttackRun],
    steps: int | None = None,
    step_size: float | None = None,
    restarts: int | None = None,
) -> list[AttackRun]:
    """Replace steps / step size / restarts in every run (None: keep). A single-step run (FGSM:
    ``steps == 1``) keeps its single step of size eps (``--steps``/``--step-size`` are for the
    iterative attacks)."""
    out = []
    for run in runs:
        changes: dict[str, Any] = {}
        single_step = run.settings.steps == 1
        if steps is not None and not single_step:
            changes["steps"] = steps
        if step_size is not None and not single_step:
            changes["step_size"] = step_size
        if restarts is not None:
            changes["restarts"] = restarts
        out.append(replace(run, settings=replace(run.settings, **changes)))
    return out


def validate_runs(runs: Sequence[AttackRun]) -> None:
    """UsageError for an unknown attack or an out-of-range setting (before any work is done;
    :meth:`~ncen_cli.attacks.base.Attack.check`, which the attacks' runner applies too), naming
    the attack."""
    from ncen_cli.registry import ATTACKS

    if not runs:
        raise UsageError("no attack runs to evaluate")
    for run in runs:
        ATTACKS.get(run.attack).check(run.settings)


def _select(runs: list[AttackRun], names: Sequence[str], protocol: str) -> list[AttackRun]:
    """The runs of ``names`` only; UsageError naming an attack the protocol does not run."""
    from ncen_cli.registry import ATTACKS

    for name in names:
        ATTACKS.get(name)
    missing = [n for n in names if n not in {r.attack for r in runs}]
    if missing:
        raise UsageError(
            f"--attacks {','.join(missing)} not in the {protocol} protocol "
            f"({', '.join(dict.fromkeys(r.attack for r in runs))}); "
            "drop --protocol to run any attack"
        )
    return [r for r in runs if r.attack in names]


def runs_for(
    family: str | None,
    protocol: str = "paper",
    *,
    attacks: Sequence[str] | None = None,
    eps: Sequence[float] | None = None,
    objective: str | None = None,
    combine: str = "mean-logits",
    steps: int | None = None,
    step_size: float | None = None,
    restarts: int | None = None,
    quirks: AuthorsQuirks | None = None,
) -> list[AttackRun]:
    """The attack runs of ``protocol`` (one of :data:`PROTOCOLS`), validated.

    Args:
        family: the dataset family whose paper eps values are the defaults (``fashionmnist`` or
            ``cifar10``); may be None when ``eps`` is given and the protocol needs no other
            default.
        protocol: ``paper`` (:func:`paper_protocol`), ``strong`` (:func:`strong_protocol`),
            ``authors`` (:func:`authors_protocol` with ``quirks``), ``custom`` (``attacks`` at
            their registered defaults, :func:`custom_runs`; default the paper's four attacks) or
            ``score`` (the sweep's battery, :func:`score_runs`).
        attacks: for paper / strong / authors, keep only these attacks (each must be in the
            protocol); for custom and score, the attacks to run.
        eps: replaces the protocol's eps values.
        objective: None: the protocol's (``mean-ce``; strong: every objective of
            :func:`strong_objectives` for ``combine``). Not allowed with ``authors``.
        steps, step_size, restarts: replace these settings in every run (None: keep; a
            single-step run keeps its one step, see :func:`override_runs`).
    Raises:
        UsageError: an unknown protocol, attack or objective, or a setting out of range.
    """
    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol must be {', '.join(PROTOCOLS[:3])}, got '{protocol}'")
    if protocol == "authors" and objective is not None:
        raise UsageError(
            "--objective does not apply to --protocol authors (its objective is "
            "advertorch's CE on the authors' ensemble output)"
        )
    if protocol == "custom":
        runs = custom_runs(attacks or PAPER_ATTACKS, eps, family, objective or "mean-ce")
    elif protocol == "score":
        runs = score_runs(_family(family), attacks, eps, objective or "mean-ce", combine)
    else:
        if protocol == "strong":
            runs = strong_protocol(_family(family), restarts or 2, objective, eps, combine)
        elif protocol == "authors":
            runs = authors_protocol(_family(family), eps, quirks)
        else:
            runs = paper_protocol(_family(family), objective or "mean-ce", eps)
        if attacks is not None:
            runs = _select(runs, attacks, protocol)
    runs = override_runs(runs, steps=steps, step_size=step_size, restarts=restarts)
    validate_runs(runs)
    return runs


def run_params(run: AttackRun, seed: int) -> dict[str, Any]:
    """Every setting of a run, for reports."""
    s = run.settings
    return {
        "objective": s.objective,
        "steps": s.steps,
        "step_size": s.step_size,
        "restarts": s.restarts,
        "random_start": s.random_start,
        "decay": s.decay,
        "seed": seed,
        **s.extra,
    }
