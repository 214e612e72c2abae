"""White-box (and black-box) evaluation of an ensemble: attack protocols, accuracies with 95%
intervals, and self-checks that catch a broken or gradient-masked evaluation.

Typical use::

    from ncen_cli.evaluation import evaluate, strong_protocol
    report = evaluate(ensemble, arrays.test_x, arrays.test_y, strong_protocol("fashionmnist"))
    report.to_json()

Accuracy is over all evaluated examples (not only the clean-correct ones), except under the
authors' protocol (:mod:`ncen_cli.authors_protocol`), which reproduces their conditional accuracy.
The strong protocol runs its gradient attacks on every objective that can be stronger and reports,
per eps, the per-example worst case over all its runs (``worst-case`` rows). Under ``torchrun`` each
rank attacks its share of the test set and the counts are summed exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from ncen_cli import distributed
from ncen_cli.attacks.base import OBJECTIVES, Attack, AttackSettings
from ncen_cli.attacks.core import as_float, input_gradient, objective_fn
from ncen_cli.authors_protocol import (
    ADVERTORCH_L1_FLOOR,
    AuthorsEnsemble,
    AuthorsQuirks,
    batch_statistics,
)
from ncen_cli.errors import NcenError, UsageError
from ncen_cli.presets import PAPER_EPS

Progress = Callable[[str, int, int], None]
"""``progress(label, images_done, images_total)``: called as each run advances (this rank's
counts)."""

# Table II of the paper: the settings as a function of eps (the eps values: presets.PAPER_EPS).
PAPER_SETTINGS: dict[str, Callable[[float], dict[str, Any]]] = {
    "fgsm": lambda eps: {"steps": 1, "step_size": eps, "random_start": False},
    "mifgsm": lambda eps: {"steps": 40, "step_size": 0.01, "decay": 1.0, "random_start": False},
    "pgd": lambda eps: {"steps": 40, "step_size": eps, "random_start": True},
    "bim": lambda eps: {"steps": 10, "step_size": eps, "random_start": False},
}
LARGE_EPS = 0.5
CHECK_TOLERANCE = 0.01  # accuracy slack for the monotonicity checks (plus one example)
ZERO_GRAD_LIMIT = 0.01  # largest tolerated fraction of examples with an exactly-zero input gradient
WORST_CASE = "worst-case"  # the attack name of the per-eps worst-case rows
STRONG_OBJECTIVES: dict[str, tuple[str, ...]] = {
    # objectives the strong protocol ascends, per combination rule (``prob`` on a mean-prob
    # ensemble is the CE of its combined output, so ``logits`` would repeat it)
    "mean-logits": ("mean-ce", "logits"),
    "mean-prob": ("mean-ce", "prob"),
}


@dataclass(frozen=True)
class AttackRun:
    """One attack at one setting.

    Attributes:
        attack: registry name (``ncen.attacks``).
        settings: every setting of the run.
    """

    attack: str
    settings: AttackSettings


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


def _family(family: str) -> str:
    if family not in PAPER_EPS:
        raise UsageError(f"no paper protocol for family '{family}'; known: {', '.join(PAPER_EPS)}")
    return family


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown --objective '{objective}'; choose {', '.join(OBJECTIVES)}")


def paper_protocol(
    family: str, objective: str = "mean-ce", eps: list[float] | None = None
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


def protocol_eps(family: str) -> list[float]:
    """Every eps value of the paper's protocol for ``family``, ascending."""
    return sorted({e for values in PAPER_EPS[_family(family)].values() for e in values})


def strong_objectives(combine: str = "mean-logits") -> tuple[str, ...]:
    """The objectives the strong protocol ascends for an ensemble combined by ``combine``."""
    if combine not in STRONG_OBJECTIVES:
        raise UsageError(f"unknown combination rule '{combine}'; "
                         f"choose {', '.join(STRONG_OBJECTIVES)}")
    return STRONG_OBJECTIVES[combine]


def strong_protocol(
    family: str,
    restarts: int = 2,
    objective: str | None = None,
    eps: list[float] | None = None,
    combine: str = "mean-logits",
) -> list[AttackRun]:
    """A stronger protocol at the paper's eps values (all of them, for every attack).

    Per eps, on every objective of :func:`strong_objectives` (``mean-ce`` and the combined output's
    CE; only ``objective`` when given): FGSM (the single-step reference for the masking checks),
    PGD with 50 steps of size eps/4 from random starts (``restarts`` counted worst-case per
    example) and APGD-CE at 100 iterations; then APGD-DLR (the combined logits' DLR) once.
    :func:`evaluate` with ``worst_case=True`` adds the per-example worst case over all of them.
    ``eps`` replaces the eps values.
    """
    objectives = (objective,) if objective is not None else strong_objectives(combine)
    for o in objectives:
        _check_objective(o)
    if restarts < 1:
        raise UsageError(f"--restarts must be >= 1, got {restarts}")
    runs = []
    for e in eps or protocol_eps(family):
        runs += [AttackRun("fgsm", AttackSettings(eps=e, steps=1, step_size=e, objective=o))
                 for o in objectives]
        runs += [AttackRun("pgd", AttackSettings(eps=e, steps=50, step_size=e / 4,
                                                 restarts=restarts, random_start=True,
                                                 objective=o)) for o in objectives]
        runs += [AttackRun("apgd-ce", AttackSettings(eps=e, steps=100, random_start=True,
                                                     objective=o)) for o in objectives]
        runs.append(AttackRun("apgd-dlr", AttackSettings(eps=e, steps=100, random_start=True,
                                                         objective="dlr")))
    return runs


def authors_protocol(
    family: str, eps: list[float] | None = None, quirks: AuthorsQuirks | None = None
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


def attack_settings(attack: Attack, eps: float, objective: str = "mean-ce",
                    **overrides: Any) -> AttackSettings:
    """An attack's default settings at ``eps`` with ``overrides`` (None values ignored); see
    :meth:`~ncen_cli.attacks.base.Attack.settings_for` (an attack with its own fixed loss keeps
    it)."""
    return attack.settings_for(eps, objective, **overrides)


def custom_runs(
    attacks: list[str],
    eps: list[float] | None,
    family: str,
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


def override_runs(
    runs: list[AttackRun],
    steps: int | None = None,
    step_size: float | None = None,
    restarts: int | None = None,
) -> list[AttackRun]:
    """Replace steps / step size / restarts in every run (None: keep). A single-step run
    (``steps == 1``, FGSM) keeps its single step of size eps (``--steps``/``--step-size`` are for
    the iterative attacks)."""
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


def validate_runs(runs: list[AttackRun]) -> None:
    """UsageError for an unknown attack or an out-of-range setting (before any work is done)."""
    from ncen_cli.registry import ATTACKS

    if not runs:
        raise UsageError("no attack runs to evaluate")
    for run in runs:
        ATTACKS.get(run.attack).check(run.settings)


def run_params(run: AttackRun, seed: int) -> dict[str, Any]:
    """Every setting of a run, for reports."""
    s = run.settings
    return {"objective": s.objective, "steps": s.steps, "step_size": s.step_size,
            "restarts": s.restarts, "random_start": s.random_start, "decay": s.decay,
            "seed": seed, **s.extra}


def _generator(seed: int, run_index: int, start: int, device: torch.device) -> torch.Generator:
    """Randomness for one batch of one run: fixed by (seed, run, first example's global index)."""
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    return gen.manual_seed((seed * 1_000_003 + run_index) * 1_000_033 + start)


def _count(correct: int, n: int, device: torch.device) -> tuple[int, int]:
    total = distributed.all_reduce_sum(torch.tensor([correct, n], dtype=torch.float64,
                                                    device=device))
    return int(total[0].item()), int(total[1].item())


class _Batches:
    """This rank's examples in batches: ``for start, xb, yb in batches`` gives each batch's global
    index of its first example, (B, C, H, W) float32 images on ``device`` and (B,) labels."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, offset: int, batch_size: int,
                 device: torch.device) -> None:
        self.x, self.y, self.offset = x, y, offset
        self.batch_size, self.device = batch_size, device

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self):
        for start in range(0, len(self.x), self.batch_size):
            xb = as_float(self.x[start:start + self.batch_size]).to(self.device)
            yield (self.offset + start, xb,
                   self.y[start:start + self.batch_size].to(self.device))

    def subset(self, keep: torch.Tensor) -> _Batches:
        """The examples where ``keep`` (len(self),) is True, re-batched in order."""
        keep = keep.cpu()
        return _Batches(self.x[keep], self.y[keep], self.offset, self.batch_size, self.device)


def _finite_rows(outputs: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B,) bool: every entry of the row finite."""
    return torch.isfinite(outputs).all(-1)


def _clean_pass(target, batches: _Batches) -> torch.Tensor:
    """(len(batches),) bool per-example clean correctness; NcenError when any output is not
    finite (NaN/inf weights or a broken model: no accuracy can be reported)."""
    correct, bad = [], 0
    with torch.no_grad():
        for _, xb, yb in batches:
            out = target(xb)
            bad += int((~_finite_rows(out)).sum())
            correct.append((out.argmax(-1) == yb).cpu())
    bad, n = _count(bad, len(batches), batches.device)
    if bad:
        raise NcenError(f"the ensemble's outputs are not finite (NaN or inf) on {bad} of {n} clean "
                        "test images: its weights or inputs are broken; no accuracy reported")
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


def evaluate(
    ensemble: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    runs: list[AttackRun],
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    seed: int = 0,
    checks: bool = True,
    check_large_eps: bool = False,
    progress: Progress | None = None,
    *,
    worst_case: bool = False,
    quirks: AuthorsQuirks | None = None,
) -> EvaluationReport:
    """Clean accuracy and accuracy under every run, with self-checks.

    Args:
        ensemble: an :class:`~ncen_cli.ensemble.Ensemble` (or a target with ``member_logits`` and
            ``combine_logits``); put in eval mode here.
        x: (N, C, H, W) uint8 test images (or float in [0, 1]); y: (N,) labels.
        runs: the attack runs (see :func:`paper_protocol`, :func:`strong_protocol`).
        batch_size: images per attack batch. seed: fixes every random start.
        checks: run the self-checks. check_large_eps: also run PGD at eps = 0.5 and check it drives
            accuracy to about 0.
        progress: ``progress(label, done, total)`` callback (images of this rank).
        worst_case: add, per eps with two or more runs, a ``worst-case`` row first: an example
            counts as robust only if it survived every run at that eps.
        quirks: evaluate as the authors' released code does (:func:`authors_protocol`); the
            ensemble's buffers are restored bit-for-bit afterwards.
    Returns:
        an :class:`EvaluationReport` (counts summed over ranks under torchrun). Raises NcenError
        when the ensemble's outputs on clean images are not finite.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise UsageError(f"{len(x)} images but {len(y)} labels")
    validate_runs(runs)
    device = torch.device(device)
    ensemble = ensemble.to(device).eval()
    part = distributed.shard_slice(len(x))
    batches = _Batches(x[part], y[part].long(), part.start, batch_size, device)
    target = AuthorsEnsemble(ensemble, quirks).eval() if quirks is not None else ensemble
    mode = (batch_statistics(ensemble) if quirks is not None and quirks.batchnorm_train
            else nullcontext())
    with mode:
        clean = _clean_pass(target, batches)
        clean_correct, n = _count(int(clean.sum()), len(batches), device)
        report_checks = (_model_checks(target, batches.x, batches.y, batch_size, device, quirks)
                         if checks else [])
        if quirks is not None and quirks.conditional:
            batches = batches.subset(clean)
        results = [_run_one(target, run, index, seed, batches, progress, quirks)
                   for index, run in enumerate(runs)]
        if checks:
            report_checks += _result_checks(results, runs)
            if check_large_eps:
                report_checks.append(_large_eps_check(target, len(runs), seed, batches, progress))
    if worst_case:
        worst = worst_case_results(results, device, seed)
        if checks:
            report_checks.append(objective_sensitivity_check(results, worst))
        results = worst + results
    elif checks:
        report_checks.append(objective_sensitivity_check(results, []))
    return EvaluationReport(clean_correct / max(n, 1), clean_correct, n, results, report_checks)


def worst_over_objectives(results: list[AttackResult], device: str | torch.device = "cpu"
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
        objective = "worst-of:" + ",".join(str(_objective(r)) for r in rs)
        if any(r.robust is None for r in rs):
            least = min(rs, key=lambda r: r.accuracy)
            out.append(replace(least, params={**least.params, "objective": objective}))
            continue
        mask = torch.stack([r.robust for r in rs]).all(0)
        correct, n = _count(int(mask.sum()), len(mask), torch.device(device))
        low, high = wilson_interval(correct, n)
        out.append(AttackResult(attack, eps, correct / max(n, 1), correct, n, low, high,
                                {**rs[0].params, "objective": objective},
                                sum(r.seconds for r in rs), mask))
    return out


def _large_eps_check(target, index: int, seed: int, batches: _Batches,
                     progress: Progress | None) -> Check:
    big = AttackRun("pgd", AttackSettings(eps=LARGE_EPS, steps=20, step_size=LARGE_EPS / 10,
                                          random_start=True))
    res = _run_one(target, big, index, seed, batches, progress, None)
    ok = res.accuracy <= 0.05
    return Check("large-eps", ok, f"PGD-20 at eps {LARGE_EPS}: accuracy {res.accuracy:.3f} "
                 f"({'<=' if ok else '>'} 0.05; far above 0 means masked gradients)")


def _run_one(target, run: AttackRun, index: int, seed: int, batches: _Batches,
             progress: Progress | None, quirks: AuthorsQuirks | None) -> AttackResult:
    """One run over every batch; the per-example mask is kept on the result. A non-finite output
    on an adversarial image counts as a success of the attack (params ``nonfinite_outputs``)."""
    from ncen_cli.registry import ATTACKS

    attack: Attack = ATTACKS.get(run.attack)
    label = f"{run.attack} eps={run.settings.eps:g}"
    started = time.perf_counter()
    robust, nonfinite, done = [], 0, 0
    if progress:
        progress(label, 0, len(batches))
    for start, xb, yb in batches:
        gen = _generator(seed, index, start, batches.device)
        x_adv = attack.perturb(target, xb, yb, run.settings, gen)
        linf = (x_adv - xb).abs().amax().item() if len(xb) else 0.0
        if linf > run.settings.eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
            raise NcenError(f"attack {run.attack} left the eps ball or [0, 1] "
                            f"(|delta| = {linf:.4g})")
        with torch.no_grad():
            out = target(x_adv)
        finite = _finite_rows(out)
        nonfinite += int((~finite).sum())
        robust.append(((out.argmax(-1) == yb) & finite).cpu())
        done += len(xb)
        if progress:
            progress(label, done, len(batches))
    seconds = time.perf_counter() - started
    mask = torch.cat(robust) if robust else torch.zeros(0, dtype=torch.bool)
    correct, n = _count(int(mask.sum()), len(batches), batches.device)
    nonfinite, _ = _count(nonfinite, 0, batches.device)
    low, high = wilson_interval(correct, n)
    params = run_params(run, seed)
    if quirks is not None:
        params.update(quirks.params(), batch_size=batches.batch_size)
    if nonfinite:
        params["nonfinite_outputs"] = nonfinite
    return AttackResult(run.attack, run.settings.eps, correct / max(n, 1), correct, n, low, high,
                        params, seconds, mask)


def worst_case_results(results: list[AttackResult], device: str | torch.device = "cpu",
                       seed: int = 0) -> list[AttackResult]:
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
        mask = torch.stack([r.robust for r in rs]).all(0)
        correct, n = _count(int(mask.sum()), len(mask), torch.device(device))
        low, high = wilson_interval(correct, n)
        params = {"objective": WORST_CASE, "seed": seed,
                  "over": [f"{r.attack}/{r.params.get('objective')}" for r in rs]}
        out.append(AttackResult(WORST_CASE, eps, correct / max(n, 1), correct, n, low, high,
                                params, sum(r.seconds for r in rs), mask))
    return out


def _all_eval(module: nn.Module) -> list[str]:
    return [name or "<ensemble>" for name, m in module.named_modules() if m.training]


def _model_checks(ensemble, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  device: torch.device, quirks: AuthorsQuirks | None = None) -> list[Check]:
    """Eval mode, logits (not probabilities), fraction of exactly-zero input gradients; under the
    authors' protocol, a failing ``honest-protocol`` check first."""
    out = []
    if quirks is not None:
        out.append(Check("honest-protocol", False,
                         "the authors' released evaluation (quirks: "
                         f"{', '.join(quirks.enabled()) or 'none'}): reproduces the paper's "
                         "numbers, not an honest robustness evaluation"))
    training = _all_eval(ensemble) if isinstance(ensemble, nn.Module) else []
    by_design = (" (by design: --protocol authors keeps BatchNorm in train mode, as the authors' "
                 "code does)" if quirks is not None and quirks.batchnorm_train else "")
    out.append(Check("eval-mode", not training,
                     "members and ensemble in eval mode" if not training
                     else f"in train mode during evaluation: {', '.join(training[:3])}"
                     + by_design))
    xb = as_float(x[:batch_size]).to(device)
    if len(xb) == 0:
        return out
    with torch.no_grad():
        logits = ensemble.member_logits(xb)  # (k, B, C)
    nonneg = bool((logits >= 0).all())
    sums_to_one = bool(torch.allclose(logits.sum(-1), torch.ones_like(logits[..., 0]), atol=1e-3))
    log_probs = bool((logits <= 0).all()) and bool(torch.allclose(
        logits.exp().sum(-1), torch.ones_like(logits[..., 0]), atol=1e-3))
    is_logits = not (nonneg and sums_to_one) and not log_probs
    kind = ("probabilities" if nonneg and sums_to_one
            else "log-probabilities" if log_probs else "logits")
    out.append(Check("logits", is_logits, f"member outputs look like {kind}"
                     + ("" if is_logits else " (a softmax inside the members masks gradients)")))
    from ncen_cli.attacks.core import frozen_parameters

    objective = "logits" if quirks is not None else "mean-ce"  # the authors' CE on their output
    zero = total = 0
    with frozen_parameters(ensemble):
        for start in range(0, len(x), batch_size):
            xs = as_float(x[start:start + batch_size]).to(device)
            grad, _, _ = input_gradient(ensemble, xs, y[start:start + batch_size].to(device),
                                        objective_fn(objective))
            zero += int((grad.flatten(1).abs().amax(1) == 0).sum())
            total += len(xs)
    zero, total = _count(zero, total, device)
    fraction = zero / max(total, 1)
    out.append(Check("zero-gradients", fraction <= ZERO_GRAD_LIMIT,
                     f"{fraction:.1%} of {total} examples have an exactly-zero input gradient "
                     f"({objective}; limit {ZERO_GRAD_LIMIT:.0%})"))
    return out


def _step_budget_check(runs: list[AttackRun]) -> Check:
    """Iterative attacks with a fixed step must be able to reach the eps-ball's boundary:
    steps x step size >= eps. Otherwise the attack is weaker than its eps says (e.g. 10 steps of
    0.0125 at eps 0.3 move at most 0.125) and its accuracy overstates robustness."""
    fixed = [run for run in runs if run.settings.steps > 1 and run.settings.step_size]
    if not fixed:
        return Check("step-budget", None, "needs an iterative attack with a fixed step size")
    bad = [
        f"{run.attack}@{run.settings.eps:g}: {run.settings.steps} x {run.settings.step_size:g} = "
        f"{run.settings.steps * run.settings.step_size:.4g} < eps"
        for run in fixed
        if run.settings.steps * run.settings.step_size < run.settings.eps * (1 - 1e-9)
    ]
    detail = (
        "; ".join(bad) + ": cannot reach the eps-ball's boundary, so the accuracy overstates "
        "robustness (raise --steps or --step-size)"
        if bad
        else f"{len(fixed)} iterative runs can reach eps (steps x step size >= eps)"
    )
    return Check("step-budget", not bad, detail)


def _result_checks(results: list[AttackResult], runs: list[AttackRun]) -> list[Check]:
    """Iterative >= FGSM strength, accuracy non-increasing in eps, steps x step size >= eps,
    Square weaker than white-box."""
    from ncen_cli.registry import ATTACKS

    out = []

    def slack(r: AttackResult) -> float:
        return CHECK_TOLERANCE + 1 / max(r.n, 1)

    fgsm = {(r.eps, _objective(r)): r for r in results if r.attack == "fgsm"}

    def fgsm_for(r: AttackResult) -> AttackResult | None:
        """FGSM at r's eps on r's objective, else on mean-ce, else any."""
        same_eps = [f for (e, _), f in fgsm.items() if e == r.eps]
        return (fgsm.get((r.eps, _objective(r))) or fgsm.get((r.eps, "mean-ce"))
                or (same_eps[0] if same_eps else None))

    iterative = [r for r, run in zip(results, runs, strict=True)
                 if run.attack != "fgsm" and run.settings.steps > 1
                 and ATTACKS.get(run.attack).white_box]
    compared = [(r, f) for r in iterative if (f := fgsm_for(r)) is not None]
    if compared:
        bad = [f"{r.attack}@{r.eps:g} {r.accuracy:.3f} > fgsm {f.accuracy:.3f}"
               for r, f in compared if r.accuracy > f.accuracy + slack(r)]
        out.append(Check("iterative-vs-fgsm", not bad, "; ".join(bad) or
                         f"{len(compared)} iterative runs no weaker than FGSM at the same eps"))
    else:
        out.append(Check("iterative-vs-fgsm", None,
                         "needs FGSM and an iterative attack at one eps"))

    bad, pairs = [], 0
    by_attack: dict[str, list[AttackResult]] = {}
    for r in results:
        name = r.attack if _objective(r) in (None, "mean-ce") else f"{r.attack}/{_objective(r)}"
        by_attack.setdefault(name, []).append(r)
    for name, rs in by_attack.items():
        rs = sorted(rs, key=lambda r: r.eps)
        for lo, hi in zip(rs, rs[1:], strict=False):
            if hi.eps > lo.eps:
                pairs += 1
                if hi.accuracy > lo.accuracy + slack(hi):
                    bad.append(f"{name}: {hi.accuracy:.3f} at eps {hi.eps:g} > "
                               f"{lo.accuracy:.3f} at {lo.eps:g}")
    out.append(Check("monotone-in-eps", (not bad) if pairs else None,
                     "; ".join(bad) or (f"accuracy falls with eps ({pairs} pairs)" if pairs
                                        else "needs one attack at two eps values")))

    out.append(_step_budget_check(runs))

    white = [r for r, run in zip(results, runs, strict=True) if ATTACKS.get(run.attack).white_box]
    black = [r for r, run in zip(results, runs, strict=True)
             if not ATTACKS.get(run.attack).white_box]
    compared_bb = [(b, min(w.accuracy for w in white if w.eps == b.eps)) for b in black
                   if any(w.eps == b.eps for w in white)]
    if compared_bb:
        bad = [f"{b.attack}@{b.eps:g} {b.accuracy:.3f} < best white-box {w:.3f}"
               for b, w in compared_bb if b.accuracy + slack(b) < w]
        out.append(Check("black-box-weaker", not bad, "; ".join(bad) or
                         "black-box attacks no stronger than the best white-box attack"))
    else:
        out.append(Check("black-box-weaker", None,
                         "needs Square and a white-box attack at one eps"))
    return out


def _objective(r: AttackResult) -> str | None:
    return r.params.get("objective")


def objective_sensitivity_check(results: list[AttackResult],
                                worst: list[AttackResult]) -> Check:
    """Where one attack at one eps ran on two objectives whose accuracies differ by more than their
    95% intervals (the intervals do not overlap), name the stronger objective. Fails when such a
    difference exists at an eps that has no ``worst-case`` row in ``worst`` (a figure from the
    weaker objective alone would overstate robustness); passes, naming it, when the worst case
    covers it; n/a when no attack ran on two objectives at one eps."""
    groups: dict[tuple[str, float], list[AttackResult]] = {}
    for r in results:
        if r.attack != WORST_CASE and _objective(r) is not None:
            groups.setdefault((r.attack, r.eps), []).append(r)
    covered = {w.eps for w in worst}
    pairs, found, uncovered = 0, [], False
    for (attack, eps), rs in groups.items():
        for i, a in enumerate(rs):
            for b in rs[i + 1:]:
                if _objective(a) == _objective(b):
                    continue
                pairs += 1
                strong, weak = (a, b) if a.accuracy < b.accuracy else (b, a)
                if strong.ci_high < weak.ci_low:
                    found.append(f"{attack}@{eps:g}: {_objective(strong)} {strong.accuracy:.3f} "
                                 f"stronger than {_objective(weak)} {weak.accuracy:.3f}")
                    uncovered |= eps not in covered
    if not pairs:
        return Check("objective-sensitivity", None, "needs one attack on two objectives at one eps")
    if not found:
        return Check("objective-sensitivity", True, f"{pairs} objective pairs agree within their "
                     "95% intervals")
    tail = ("; no worst-case row covers it: report the stronger objective" if uncovered
            else "; the worst-case rows include the stronger objective")
    return Check("objective-sensitivity", not uncovered, "; ".join(found) + tail)
