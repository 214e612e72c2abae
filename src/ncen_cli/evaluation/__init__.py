"""White-box (and black-box) evaluation of an ensemble: attack protocols, accuracies with 95%
intervals, and self-checks that catch a broken or gradient-masked evaluation.

Typical use::

    from ncen_cli.evaluation import evaluate, runs_for
    report = evaluate(ensemble, arrays.test_x, arrays.test_y, runs_for("fashionmnist", "strong"))
    report.to_json()

Accuracy is over all evaluated examples (not only the clean-correct ones), except under the
authors' protocol (:mod:`ncen_cli.authors_protocol`), which reproduces their conditional accuracy.
The strong protocol runs its gradient attacks on every objective that can be stronger and reports,
per eps, the per-example worst case over all its runs (``worst-case`` rows). Given a
:class:`~ncen_cli.distributed.DistContext` of several processes (``dist=``), each rank attacks
its share of the test set and the counts are summed exactly.

Modules: :mod:`.protocols` (which runs, :func:`runs_for`), :mod:`.loop` (:func:`evaluate`),
:mod:`.checks` (the self-checks), :mod:`.report` (results, intervals, worst cases).
"""

from ncen_cli.evaluation.checks import (
    CHECK_TOLERANCE,
    LARGE_EPS,
    ZERO_GRAD_LIMIT,
    modules_in_train_mode,
    objective_sensitivity_check,
    result_checks,
    step_budget_check,
)
from ncen_cli.evaluation.loop import Progress, batch_generator, evaluate, run_stream
from ncen_cli.evaluation.protocols import (
    PAPER_EPS,
    PAPER_SETTINGS,
    PROTOCOLS,
    STRONG_OBJECTIVES,
    AttackRun,
    attack_settings,
    authors_protocol,
    custom_runs,
    override_runs,
    paper_protocol,
    protocol_eps,
    run_params,
    runs_for,
    score_runs,
    strong_objectives,
    strong_protocol,
    validate_runs,
)
from ncen_cli.evaluation.report import (
    WORST_CASE,
    AttackResult,
    Check,
    EvaluationReport,
    wilson_interval,
    worst_case_results,
    worst_over_objectives,
)

__all__ = [
    "CHECK_TOLERANCE",
    "LARGE_EPS",
    "PAPER_EPS",
    "PAPER_SETTINGS",
    "PROTOCOLS",
    "STRONG_OBJECTIVES",
    "WORST_CASE",
    "ZERO_GRAD_LIMIT",
    "AttackResult",
    "AttackRun",
    "Check",
    "EvaluationReport",
    "Progress",
    "attack_settings",
    "authors_protocol",
    "batch_generator",
    "custom_runs",
    "evaluate",
    "modules_in_train_mode",
    "objective_sensitivity_check",
    "override_runs",
    "paper_protocol",
    "protocol_eps",
    "result_checks",
    "run_params",
    "run_stream",
    "runs_for",
    "score_runs",
    "step_budget_check",
    "strong_objectives",
    "strong_protocol",
    "validate_runs",
    "wilson_interval",
    "worst_case_results",
    "worst_over_objectives",
]
