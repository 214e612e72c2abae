"""Self-checks that catch a broken or gradient-masked evaluation: eval mode, logits, zero input
gradients (on the model), and the consistency of the results (iterative >= FGSM, monotone in eps,
step budget, black-box weaker, objective sensitivity, large-eps accuracy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ncen_cli.attacks.core import as_float, frozen_parameters, input_gradient, objective_fn
from ncen_cli.authors_protocol import AuthorsQuirks
from ncen_cli.distributed import SINGLE, DistContext
from ncen_cli.evaluation.protocols import AttackRun
from ncen_cli.evaluation.report import WORST_CASE, AttackResult, Check, objective_of

CHECK_TOLERANCE = 0.01  # accuracy slack for the monotonicity checks (plus one example)
ZERO_GRAD_LIMIT = 0.01  # largest tolerated fraction of examples with an exactly-zero input gradient
LARGE_EPS = 0.5
LARGE_EPS_LIMIT = 0.05  # the largest accuracy tolerated under PGD at LARGE_EPS


def modules_in_train_mode(module: nn.Module) -> list[str]:
    """The names of ``module``'s submodules (``<ensemble>`` for itself) that are in train mode;
    empty when the whole module is in eval mode."""
    return [name or "<ensemble>" for name, m in module.named_modules() if m.training]


def model_checks(
    ensemble,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    quirks: AuthorsQuirks | None = None,
    dist: DistContext = SINGLE,
) -> list[Check]:
    """Eval mode, logits (not probabilities), fraction of exactly-zero input gradients on this
    rank's examples ``x`` (N, C, H, W) / ``y`` (N,) (counts summed over ``dist``); under the
    authors' protocol, a failing ``honest-protocol`` check first."""
    out = []
    if quirks is not None:
        out.append(
            Check(
                "honest-protocol",
                False,
                "the authors' released evaluation (quirks: "
                f"{', '.join(quirks.enabled()) or 'none'}): reproduces the paper's "
                "numbers, not an honest robustness evaluation",
            )
        )
    out.append(_eval_mode_check(ensemble, quirks))
    xb = as_float(x[:batch_size]).to(device)
    if len(xb) == 0:
        return out
    out.append(_logits_check(ensemble, xb))
    out.append(_zero_gradient_check(ensemble, x, y, batch_size, device, quirks, dist))
    return out


def _eval_mode_check(ensemble, quirks: AuthorsQuirks | None) -> Check:
    training = modules_in_train_mode(ensemble) if isinstance(ensemble, nn.Module) else []
    by_design = (
        " (by design: --protocol authors keeps BatchNorm in train mode, as the authors' code does)"
        if quirks is not None and quirks.batchnorm_train
        else ""
    )
    return Check(
        "eval-mode",
        not training,
        "members and ensemble in eval mode"
        if not training
        else f"in train mode during evaluation: {', '.join(training[:3])}" + by_design,
    )


def _logits_check(ensemble, xb: torch.Tensor) -> Check:
    with torch.no_grad():
        logits = ensemble.member_logits(xb)  # (k, B, C)
    nonneg = bool((logits >= 0).all())
    sums_to_one = bool(torch.allclose(logits.sum(-1), torch.ones_like(logits[..., 0]), atol=1e-3))
    log_probs = bool((logits <= 0).all()) and bool(
        torch.allclose(logits.exp().sum(-1), torch.ones_like(logits[..., 0]), atol=1e-3)
    )
    is_logits = not (nonneg and sums_to_one) and not log_probs
    kind = (
        "probabilities"
        if nonneg and sums_to_one
        else "log-probabilities"
        if log_probs
        else "logits"
    )
    return Check(
        "logits",
        is_logits,
        f"member outputs look like {kind}"
        + ("" if is_logits else " (a softmax inside the members masks gradients)"),
    )


def _zero_gradient_check(
    ensemble,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    quirks: AuthorsQuirks | None,
    dist: DistContext,
) -> Check:
    objective = "logits" if quirks is not None else "mean-ce"  # the authors' CE on their output
    zero = total = 0
    with frozen_parameters(ensemble):
        for start in range(0, len(x), batch_size):
            xs = as_float(x[start : start + batch_size]).to(device)
            grad, _, _ = input_gradient(
                ensemble, xs, y[start : start + batch_size].to(device), objective_fn(objective)
            )
            zero += int((grad.flatten(1).abs().amax(1) == 0).sum())
            total += len(xs)
    zero, total = dist.sum_counts(zero, total)
    fraction = zero / max(total, 1)
    return Check(
        "zero-gradients",
        fraction <= ZERO_GRAD_LIMIT,
        f"{fraction:.1%} of {total} examples have an exactly-zero input gradient "
        f"({objective}; limit {ZERO_GRAD_LIMIT:.0%})",
    )


def large_eps_run() -> AttackRun:
    """The run behind the ``large-eps`` check: PGD-20 at eps :data:`LARGE_EPS`."""
    from ncen_cli.attacks.base import AttackSettings

    return AttackRun(
        "pgd", AttackSettings(eps=LARGE_EPS, steps=20, step_size=LARGE_EPS / 10, random_start=True)
    )


def large_eps_check(result: AttackResult) -> Check:
    """PGD at a huge eps must drive accuracy to about 0; far above means masked gradients."""
    ok = result.accuracy <= LARGE_EPS_LIMIT
    return Check(
        "large-eps",
        ok,
        f"PGD-20 at eps {LARGE_EPS}: accuracy {result.accuracy:.3f} "
        f"({'<=' if ok else '>'} {LARGE_EPS_LIMIT}; far above 0 means masked gradients)",
    )


def step_budget_check(runs: Sequence[AttackRun]) -> Check:
    """Iterative attacks with a fixed step must be able to reach the eps-ball's boundary:
    steps x step size >= eps. Otherwise the attack is weaker than its eps says (e.g. 10 steps of
    0.0125 at eps 0.3 move at most 0.125) and its accuracy overstates robustness."""
    fixed = [
        (run, run.settings.step_size)
        for run in runs
        if run.settings.steps > 1 and run.settings.step_size
    ]
    if not fixed:
        return Check("step-budget", None, "needs an iterative attack with a fixed step size")
    bad = [
        f"{run.attack}@{run.settings.eps:g}: {run.settings.steps} x {step_size:g} = "
        f"{run.settings.steps * step_size:.4g} < eps"
        for run, step_size in fixed
        if run.settings.steps * step_size < run.settings.eps * (1 - 1e-9)
    ]
    detail = (
        "; ".join(bad) + ": cannot reach the eps-ball's boundary, so the accuracy overstates "
        "robustness (raise --steps or --step-size)"
        if bad
        else f"{len(fixed)} iterative runs can reach eps (steps x step size >= eps)"
    )
    return Check("step-budget", not bad, detail)


def _slack(r: AttackResult) -> float:
    return CHECK_TOLERANCE + 1 / max(r.n, 1)


def result_checks(results: list[AttackResult], runs: Sequence[AttackRun]) -> list[Check]:
    """Iterative >= FGSM strength, accuracy non-increasing in eps, steps x step size >= eps,
    Square weaker than white-box (``results[i]`` is the result of ``runs[i]``)."""
    return [
        _iterative_vs_fgsm_check(results, runs),
        _monotone_check(results),
        step_budget_check(runs),
        _black_box_check(results, runs),
    ]


def _iterative_vs_fgsm_check(results: list[AttackResult], runs: Sequence[AttackRun]) -> Check:
    from ncen_cli.registry import ATTACKS

    fgsm = {(r.eps, objective_of(r)): r for r in results if r.attack == "fgsm"}

    def fgsm_for(r: AttackResult) -> AttackResult | None:
        """FGSM at r's eps on r's objective, else on mean-ce, else any."""
        same_eps = [f for (e, _), f in fgsm.items() if e == r.eps]
        return (
            fgsm.get((r.eps, objective_of(r)))
            or fgsm.get((r.eps, "mean-ce"))
            or (same_eps[0] if same_eps else None)
        )

    iterative = [
        r
        for r, run in zip(results, runs, strict=True)
        if run.attack != "fgsm" and run.settings.steps > 1 and ATTACKS.get(run.attack).white_box
    ]
    compared = [(r, f) for r in iterative if (f := fgsm_for(r)) is not None]
    if not compared:
        return Check("iterative-vs-fgsm", None, "needs FGSM and an iterative attack at one eps")
    bad = [
        f"{r.attack}@{r.eps:g} {r.accuracy:.3f} > fgsm {f.accuracy:.3f}"
        for r, f in compared
        if r.accuracy > f.accuracy + _slack(r)
    ]
    return Check(
        "iterative-vs-fgsm",
        not bad,
        "; ".join(bad) or f"{len(compared)} iterative runs no weaker than FGSM at the same eps",
    )


def _monotone_check(results: list[AttackResult]) -> Check:
    bad, pairs = [], 0
    by_attack: dict[str, list[AttackResult]] = {}
    for r in results:
        name = r.attack if objective_of(r) in (None, "mean-ce") else f"{r.attack}/{objective_of(r)}"
        by_attack.setdefault(name, []).append(r)
    for name, rs in by_attack.items():
        rs = sorted(rs, key=lambda r: r.eps)
        for lo, hi in zip(rs, rs[1:], strict=False):
            if hi.eps > lo.eps:
                pairs += 1
                if hi.accuracy > lo.accuracy + _slack(hi):
                    bad.append(
                        f"{name}: {hi.accuracy:.3f} at eps {hi.eps:g} > "
                        f"{lo.accuracy:.3f} at {lo.eps:g}"
                    )
    return Check(
        "monotone-in-eps",
        (not bad) if pairs else None,
        "; ".join(bad)
        or (
            f"accuracy falls with eps ({pairs} pairs)"
            if pairs
            else "needs one attack at two eps values"
        ),
    )


def _black_box_check(results: list[AttackResult], runs: Sequence[AttackRun]) -> Check:
    from ncen_cli.registry import ATTACKS

    white = [r for r, run in zip(results, runs, strict=True) if ATTACKS.get(run.attack).white_box]
    black = [
        r for r, run in zip(results, runs, strict=True) if not ATTACKS.get(run.attack).white_box
    ]
    compared_bb = [
        (b, min(w.accuracy for w in white if w.eps == b.eps))
        for b in black
        if any(w.eps == b.eps for w in white)
    ]
    if not compared_bb:
        return Check("black-box-weaker", None, "needs Square and a white-box attack at one eps")
    bad = [
        f"{b.attack}@{b.eps:g} {b.accuracy:.3f} < best white-box {w:.3f}"
        for b, w in compared_bb
        if b.accuracy + _slack(b) < w
    ]
    return Check(
        "black-box-weaker",
        not bad,
        "; ".join(bad) or "black-box attacks no stronger than the best white-box attack",
    )


def objective_sensitivity_check(results: list[AttackResult], worst: list[AttackResult]) -> Check:
    """Where one attack at one eps ran on two objectives whose accuracies differ by more than their
    95% intervals (the intervals do not overlap), name the stronger objective. Fails when such a
    difference exists at an eps that has no ``worst-case`` row in ``worst`` (a figure from the
    weaker objective alone would overstate robustness); passes, naming it, when the worst case
    covers it; n/a when no attack ran on two objectives at one eps."""
    groups: dict[tuple[str, float], list[AttackResult]] = {}
    for r in results:
        if r.attack != WORST_CASE and objective_of(r) is not None:
            groups.setdefault((r.attack, r.eps), []).append(r)
    covered = {w.eps for w in worst}
    pairs, found, uncovered = 0, [], False
    for (attack, eps), rs in groups.items():
        for i, a in enumerate(rs):
            for b in rs[i + 1 :]:
                if objective_of(a) == objective_of(b):
                    continue
                pairs += 1
                strong, weak = (a, b) if a.accuracy < b.accuracy else (b, a)
                if strong.ci_high < weak.ci_low:
                    found.append(
                        f"{attack}@{eps:g}: {objective_of(strong)} {strong.accuracy:.3f} "
                        f"stronger than {objective_of(weak)} {weak.accuracy:.3f}"
                    )
                    uncovered |= eps not in covered
    if not pairs:
        return Check("objective-sensitivity", None, "needs one attack on two objectives at one eps")
    if not found:
        return Check(
            "objective-sensitivity",
            True,
            f"{pairs} objective pairs agree within their 95% intervals",
        )
    tail = (
        "; no worst-case row covers it: report the stronger objective"
        if uncovered
        else "; the worst-case rows include the stronger objective"
    )
    return Check("objective-sensitivity", not uncovered, "; ".join(found) + tail)
