"""White-box (and black-box) evaluation of an ensemble: attack protocols, accuracies with 95%
intervals, and self-checks that catch a broken or gradient-masked evaluation.

Typical use::

    from ncen_cli.evaluation import evaluate, strong_protocol
    report = evaluate(ensemble, arrays.test_x, arrays.test_y, strong_protocol("fashionmnist"))
    report.to_json()

Accuracy is over all evaluated examples (not only the clean-correct ones). Under ``torchrun`` each
rank attacks its share of the test set and the counts are summed exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ncen_cli import distributed
from ncen_cli.attacks.base import OBJECTIVES, Attack, AttackSettings
from ncen_cli.attacks.core import as_float, input_gradient, objective_fn
from ncen_cli.errors import NcenError, UsageError

Progress = Callable[[str, int, int], None]
"""``progress(label, images_done, images_total)``: called as each run advances (this rank's
counts)."""

# Table II of the paper: per family, (attack, eps values) and the settings as a function of eps.
PAPER_EPS: dict[str, dict[str, tuple[float, ...]]] = {
    "fashionmnist": {"fgsm": (0.1, 0.3), "mifgsm": (0.1, 0.3), "pgd": (0.1, 0.15),
                     "bim": (0.1, 0.15)},
    "cifar10": {"fgsm": (0.03, 0.09), "mifgsm": (0.03, 0.09), "pgd": (0.01, 0.02),
                "bim": (0.01, 0.02)},
}
PAPER_SETTINGS: dict[str, Callable[[float], dict[str, Any]]] = {
    "fgsm": lambda eps: {"steps": 1, "step_size": eps, "random_start": False},
    "mifgsm": lambda eps: {"steps": 40, "step_size": 0.01, "decay": 1.0, "random_start": False},
    "pgd": lambda eps: {"steps": 40, "step_size": eps, "random_start": True},
    "bim": lambda eps: {"steps": 10, "step_size": eps, "random_start": False},
}
LARGE_EPS = 0.5
CHECK_TOLERANCE = 0.01  # accuracy slack for the monotonicity checks (plus one example)
ZERO_GRAD_LIMIT = 0.01  # largest tolerated fraction of examples with an exactly-zero input gradient


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
            "results": [asdict(r) for r in self.results],
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


def strong_protocol(
    family: str, restarts: int = 2, objective: str = "mean-ce", eps: list[float] | None = None
) -> list[AttackRun]:
    """A stronger protocol at the paper's eps values (all of them, for every attack).

    FGSM (the single-step reference for the masking checks); PGD with 50 steps of size eps/4 from
    random starts, ``restarts`` counted worst-case per example; APGD-CE and APGD-DLR at 100
    iterations. ``eps`` replaces the eps values.
    """
    _check_objective(objective)
    if restarts < 1:
        raise UsageError(f"--restarts must be >= 1, got {restarts}")
    runs = []
    for e in eps or protocol_eps(family):
        runs += [
            AttackRun("fgsm", AttackSettings(eps=e, steps=1, step_size=e, objective=objective)),
            AttackRun("pgd", AttackSettings(eps=e, steps=50, step_size=e / 4, restarts=restarts,
                                            random_start=True, objective=objective)),
            AttackRun("apgd-ce", AttackSettings(eps=e, steps=100, random_start=True,
                                                objective=objective)),
            AttackRun("apgd-dlr", AttackSettings(eps=e, steps=100, random_start=True,
                                                 objective="dlr")),
        ]
    return runs


def attack_settings(attack: Attack, eps: float, objective: str = "mean-ce",
                    **overrides: Any) -> AttackSettings:
    """An attack's default settings at ``eps`` with ``overrides`` (None values ignored).

    An attack whose defaults name an objective outside :data:`OBJECTIVES` (APGD-DLR's ``dlr``,
    Square's ``margin``) has its own fixed loss, which ``objective`` does not replace.
    """
    values: dict[str, Any] = {"objective": objective, **attack.defaults(eps)}
    if values["objective"] in OBJECTIVES:
        values["objective"] = objective
    values.update({k: v for k, v in overrides.items() if v is not None})
    return AttackSettings(eps=eps, **values)


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
    """Replace steps / step size / restarts in every run (None: keep). FGSM keeps its single step
    of size eps (``--steps``/``--step-size`` are for the iterative attacks)."""
    out = []
    for run in runs:
        changes: dict[str, Any] = {}
        single_step = run.attack == "fgsm"
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
        ATTACKS.get(run.attack)
        s = run.settings
        if not 0 < s.eps <= 1:
            raise UsageError(f"eps must be in (0, 1] for images in [0, 1], got {s.eps}")
        if s.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {s.steps} ({run.attack})")
        if s.restarts < 1:
            raise UsageError(f"--restarts must be >= 1, got {s.restarts} ({run.attack})")
        if s.step_size is not None and not s.step_size > 0:
            raise UsageError(f"--step-size must be > 0, got {s.step_size} ({run.attack})")


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
    Returns:
        an :class:`EvaluationReport` (counts summed over ranks under torchrun).
    """
    from ncen_cli.registry import ATTACKS

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise UsageError(f"{len(x)} images but {len(y)} labels")
    validate_runs(runs)
    device = torch.device(device)
    ensemble = ensemble.to(device).eval()
    part = distributed.shard_slice(len(x))
    x_local, y_local = x[part], y[part].long()
    offset = part.start

    def batches():
        for start in range(0, len(x_local), batch_size):
            xb = as_float(x_local[start:start + batch_size]).to(device)
            yield offset + start, xb, y_local[start:start + batch_size].to(device)

    report_checks: list[Check] = []
    clean_correct = 0
    with torch.no_grad():
        for _, xb, yb in batches():
            clean_correct += int((ensemble(xb).argmax(-1) == yb).sum())
    clean_correct, n = _count(clean_correct, len(x_local), device)
    if checks:
        report_checks += _model_checks(ensemble, x_local, y_local, batch_size, device)

    results = []
    for index, run in enumerate(runs):
        results.append(_run_one(ensemble, ATTACKS.get(run.attack), run, index, seed, batches,
                                len(x_local), device, progress))
    if checks:
        report_checks += _result_checks(results, runs)
        if check_large_eps:
            big = AttackRun("pgd", AttackSettings(eps=LARGE_EPS, steps=20, step_size=LARGE_EPS / 10,
                                                  random_start=True))
            res = _run_one(ensemble, ATTACKS.get("pgd"), big, len(runs), seed, batches,
                           len(x_local), device, progress)
            ok = res.accuracy <= 0.05
            report_checks.append(Check(
                "large-eps", ok, f"PGD-20 at eps {LARGE_EPS}: accuracy {res.accuracy:.3f} "
                f"({'<=' if ok else '>'} 0.05; far above 0 means masked gradients)"))
    return EvaluationReport(clean_correct / max(n, 1), clean_correct, n, results, report_checks)


def _run_one(ensemble, attack: Attack, run: AttackRun, index: int, seed: int, batches,
             total: int, device: torch.device, progress: Progress | None) -> AttackResult:
    label = f"{run.attack} eps={run.settings.eps:g}"
    started = time.perf_counter()
    correct = done = 0
    if progress:
        progress(label, 0, total)
    for start, xb, yb in batches():
        gen = _generator(seed, index, start, device)
        x_adv = attack.perturb(ensemble, xb, yb, run.settings, gen)
        linf = (x_adv - xb).abs().amax().item() if len(xb) else 0.0
        if linf > run.settings.eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
            raise NcenError(f"attack {run.attack} left the eps ball or [0, 1] "
                            f"(|delta| = {linf:.4g})")
        with torch.no_grad():
            correct += int((ensemble(x_adv).argmax(-1) == yb).sum())
        done += len(xb)
        if progress:
            progress(label, done, total)
    seconds = time.perf_counter() - started
    correct, n = _count(correct, total, device)
    low, high = wilson_interval(correct, n)
    return AttackResult(run.attack, run.settings.eps, correct / max(n, 1), correct, n, low, high,
                        run_params(run, seed), seconds)


def _all_eval(module: nn.Module) -> list[str]:
    return [name or "<ensemble>" for name, m in module.named_modules() if m.training]


def _model_checks(ensemble, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  device: torch.device) -> list[Check]:
    """Eval mode, logits (not probabilities), fraction of exactly-zero input gradients."""
    out = []
    training = _all_eval(ensemble) if isinstance(ensemble, nn.Module) else []
    out.append(Check("eval-mode", not training,
                     "members and ensemble in eval mode" if not training
                     else f"in train mode during evaluation: {', '.join(training[:3])}"))
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

    zero = total = 0
    with frozen_parameters(ensemble):
        for start in range(0, len(x), batch_size):
            xs = as_float(x[start:start + batch_size]).to(device)
            grad, _, _ = input_gradient(ensemble, xs, y[start:start + batch_size].to(device),
                                        objective_fn("mean-ce"))
            zero += int((grad.flatten(1).abs().amax(1) == 0).sum())
            total += len(xs)
    zero, total = _count(zero, total, device)
    fraction = zero / max(total, 1)
    out.append(Check("zero-gradients", fraction <= ZERO_GRAD_LIMIT,
                     f"{fraction:.1%} of {total} examples have an exactly-zero input gradient "
                     f"(mean-ce; limit {ZERO_GRAD_LIMIT:.0%})"))
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

    fgsm = {r.eps: r for r in results if r.attack == "fgsm"}
    iterative = [r for r, run in zip(results, runs, strict=True)
                 if run.attack != "fgsm" and run.settings.steps > 1
                 and ATTACKS.get(run.attack).white_box]
    compared = [(r, fgsm[r.eps]) for r in iterative if r.eps in fgsm]
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
        by_attack.setdefault(r.attack, []).append(r)
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
