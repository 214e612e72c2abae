"""What an evaluation reports: per-run accuracies with 95% intervals, self-check verdicts, and the
per-example worst cases over several runs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch

from ncen_cli.distributed import SINGLE, DistContext

WORST_CASE = "worst-case"  # the attack name of the per-eps worst-case rows


@dataclass
class AttackResult:
    """Accuracy of the ensemble on one run's adversarial examples.

    Attributes:
        accuracy: correct / n over all evaluated examples; ci_low / ci_high its 95% Wilson interval.
        params: every setting (objective, steps, step_size, restarts, random_start, decay, seed...).
        seconds: wall time of the run (this rank).
        robust: (n_local,) bool, per example of this rank (in the order evaluated) whether the
            ensemble still classified it correctly; for paired comparisons in Python. Not in the
            JSON (see :meth:`EvaluationReport.to_json`).
    """

    attack: str
    eps: float
    accuracy: float
    correct: int
    n: int
    ci_low: float
    ci_high: float
    params: dict[str, Any]
    seconds: float
    robust: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """Every field but the per-example mask."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "robust"}


@dataclass
class Check:
    """A self-check: ``passed`` is None when it does not apply to the runs evaluated."""

    name: str
    passed: bool | None
    detail: str


@dataclass
class EvaluationReport:
    clean_accuracy: float
    clean_correct: int
    n: int
    results: list[AttackResult] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def to_json(self) -> dict[str, Any]:
        low, high = wilson_interval(self.clean_correct, self.n)
        return {
            "clean_accuracy": self.clean_accuracy,
            "clean_correct": self.clean_correct,
            "clean_ci_low": low,
            "clean_ci_high": high,
            "n": self.n,
            "results": [r.to_json() for r in self.results],
            "checks": [asdict(c) for c in self.checks],
        }


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / n`` ((0, 1) when n == 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def objective_of(r: AttackResult) -> str | None:
    """The objective a result's run ascended (None when it records none)."""
    return r.params.get("objective")


def masked_result(
    attack: str,
    eps: float,
    mask: torch.Tensor,
    params: dict[str, Any],
    seconds: float,
    dist: DistContext = SINGLE,
) -> AttackResult:
    """The result whose per-example robustness (this rank's part) is ``mask`` (n_local,) bool;
    counts summed over ``dist``'s ranks."""
    correct, n = dist.sum_counts(int(mask.sum()), len(mask))
    low, high = wilson_interval(correct, n)
    return AttackResult(
        attack, eps, correct / max(n, 1), correct, n, low, high, params, seconds, mask
    )


def worst_over_objectives(
    results: list[AttackResult], dist: DistContext = SINGLE
) -> list[AttackResult]:
    """One result per (attack, eps): where an attack ran on several objectives at one eps, the
    per-example worst case over them (the AND of their ``robust`` masks; without masks, the
    least accurate of them), with ``params["objective"]`` ``"worst-of:a,b"``; other results as
    they are. Order: first appearance."""
    groups: dict[tuple[str, float], list[AttackResult]] = {}
    for r in results:
        groups.setdefault((r.attack, r.eps), []).append(r)
    out = []
    for (attack, eps), rs in groups.items():
        if len(rs) == 1:
            out.append(rs[0])
            continue
        objective = "worst-of:" + ",".join(str(objective_of(r)) for r in rs)
        if any(r.robust is None for r in rs):
            least = min(rs, key=lambda r: r.accuracy)
            out.append(replace(least, params={**least.params, "objective": objective}))
            continue
        mask = torch.stack([r.robust for r in rs if r.robust is not None]).all(0)  # all set
        out.append(
            masked_result(
                attack,
                eps,
                mask,
                {**rs[0].params, "objective": objective},
                sum(r.seconds for r in rs),
                dist,
            )
        )
    return out


def worst_case_results(
    results: list[AttackResult], seed: int = 0, dist: DistContext = SINGLE
) -> list[AttackResult]:
    """Per eps with two or more results that kept their masks, the per-example worst case: an
    example is robust only if it is robust in every one of them (the AND of their ``robust``
    masks). Returns one ``worst-case`` result per such eps, ascending; its ``params`` name the
    runs it covers (``attack/objective``) and its seconds are theirs summed."""
    by_eps: dict[float, list[AttackResult]] = {}
    for r in results:
        if r.robust is not None and r.attack != WORST_CASE:
            by_eps.setdefault(r.eps, []).append(r)
    out = []
    for eps, rs in sorted(by_eps.items()):
        if len(rs) < 2:
            continue
        mask = torch.stack([r.robust for r in rs if r.robust is not None]).all(0)  # all set
        params = {
            "objective": WORST_CASE,
            "seed": seed,
            "over": [f"{r.attack}/{r.params.get('objective')}" for r in rs],
        }
        out.append(masked_result(WORST_CASE, eps, mask, params, sum(r.seconds for r in rs), dist))
    return out
