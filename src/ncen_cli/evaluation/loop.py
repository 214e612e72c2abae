"""The evaluation loop: the clean pass, every attack run over this rank's batches, and
:func:`evaluate`, which ties them to the self-checks and the report."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch import nn

from ncen_cli.attacks.base import Attack
from ncen_cli.attacks.core import as_float
from ncen_cli.authors_protocol import AuthorsEnsemble, AuthorsQuirks, batch_statistics
from ncen_cli.distributed import SINGLE, DistContext
from ncen_cli.errors import NcenError, UsageError
from ncen_cli.evaluation.checks import (
    large_eps_check,
    large_eps_run,
    model_checks,
    objective_sensitivity_check,
    result_checks,
)
from ncen_cli.evaluation.protocols import AttackRun, run_params, validate_runs
from ncen_cli.evaluation.report import (
    AttackResult,
    EvaluationReport,
    masked_result,
    worst_case_results,
)

Progress = Callable[[str, int, int], None]
"""``progress(label, images_done, images_total)``: called as each run advances (this rank's
counts)."""


def batch_generator(stream: int, start: int, device: torch.device) -> torch.Generator:
    """The randomness of one batch: a generator seeded by ``stream`` (which run, which seed) and
    ``start``, the global index of the batch's first example, so that results do not depend on
    the batch order or on how the examples are shared between ranks. A CPU generator unless the
    device is CUDA. :func:`evaluate` and :func:`~ncen_cli.transfer.transfer_matrix` both draw
    from it."""
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    return gen.manual_seed((stream + start) % 2**64)


def run_stream(seed: int, run_index: int) -> int:
    """:func:`batch_generator`'s stream of the ``run_index``-th run of an evaluation."""
    return (seed * 1_000_003 + run_index) * 1_000_033


class _Batches:
    """This rank's examples in batches: ``for start, xb, yb in batches`` gives each batch's global
    index of its first example, (B, C, H, W) float32 images on ``device`` and (B,) labels."""

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, offset: int, batch_size: int, device: torch.device
    ) -> None:
        self.x, self.y, self.offset = x, y, offset
        self.batch_size, self.device = batch_size, device

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.x), self.batch_size):
            xb = as_float(self.x[start : start + self.batch_size]).to(self.device)
            yield (self.offset + start, xb, self.y[start : start + self.batch_size].to(self.device))

    def subset(self, keep: torch.Tensor) -> _Batches:
        """The examples where ``keep`` (len(self),) is True, re-batched in order."""
        keep = keep.cpu()
        return _Batches(self.x[keep], self.y[keep], self.offset, self.batch_size, self.device)


def _finite_rows(outputs: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B,) bool: every entry of the row finite."""
    return torch.isfinite(outputs).all(-1)


def _clean_pass(target, batches: _Batches, dist: DistContext) -> torch.Tensor:
    """(len(batches),) bool per-example clean correctness; NcenError when any output is not
    finite (NaN/inf weights or a broken model: no accuracy can be reported)."""
    correct, bad = [], 0
    with torch.no_grad():
        for _, xb, yb in batches:
            out = target(xb)
            bad += int((~_finite_rows(out)).sum())
            correct.append((out.argmax(-1) == yb).cpu())
    bad, n = dist.sum_counts(bad, len(batches))
    if bad:
        raise NcenError(
            f"the ensemble's outputs are not finite (NaN or inf) on {bad} of {n} clean "
            "test images: its weights or inputs are broken; no accuracy reported"
        )
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


class _Runner:
    """Runs attack runs on one target over one rank's batches (see :func:`evaluate`)."""

    def __init__(
        self,
        target,
        batches: _Batches,
        seed: int,
        progress: Progress | None,
        quirks: AuthorsQuirks | None,
        dist: DistContext,
    ) -> None:
        self.target, self.batches, self.seed = target, batches, seed
        self.progress, self.quirks, self.dist = progress, quirks, dist

    def run(self, run: AttackRun, index: int) -> AttackResult:
        """One run over every batch; the per-example mask is kept on the result. A non-finite
        output on an adversarial image counts as a success of the attack (params
        ``nonfinite_outputs``)."""
        from ncen_cli.registry import ATTACKS

        attack: Attack = ATTACKS.get(run.attack)
        label = f"{run.attack} eps={run.settings.eps:g}"
        started = time.perf_counter()
        robust, nonfinite, done = [], 0, 0
        self._report(label, 0)
        for start, xb, yb in self.batches:
            gen = batch_generator(run_stream(self.seed, index), start, self.batches.device)
            x_adv = attack.perturb(self.target, xb, yb, run.settings, gen)
            _check_ball(run, xb, x_adv)
            with torch.no_grad():
                out = self.target(x_adv)
            finite = _finite_rows(out)
            nonfinite += int((~finite).sum())
            robust.append(((out.argmax(-1) == yb) & finite).cpu())
            done += len(xb)
            self._report(label, done)
        seconds = time.perf_counter() - started
        mask = torch.cat(robust) if robust else torch.zeros(0, dtype=torch.bool)
        (nonfinite,) = self.dist.sum_counts(nonfinite)
        params = run_params(run, self.seed)
        if self.quirks is not None:
            params.update(self.quirks.params(), batch_size=self.batches.batch_size)
        if nonfinite:
            params["nonfinite_outputs"] = nonfinite
        return masked_result(run.attack, run.settings.eps, mask, params, seconds, self.dist)

    def _report(self, label: str, done: int) -> None:
        if self.progress:
            self.progress(label, done, len(self.batches))


def _check_ball(run: AttackRun, xb: torch.Tensor, x_adv: torch.Tensor) -> None:
    """NcenError when an attack left the eps ball around ``xb`` or the image range [0, 1]."""
    linf = (x_adv - xb).abs().amax().item() if len(xb) else 0.0
    if linf > run.settings.eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
        raise NcenError(f"attack {run.attack} left the eps ball or [0, 1] (|delta| = {linf:.4g})")


def evaluate(
    ensemble: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    runs: list[AttackRun],
    *,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    seed: int = 0,
    checks: bool = True,
    check_large_eps: bool = False,
    progress: Progress | None = None,
    worst_case: bool = False,
    quirks: AuthorsQuirks | None = None,
    dist: DistContext = SINGLE,
) -> EvaluationReport:
    """Clean accuracy and accuracy under every run, with self-checks.

    Args:
        ensemble: an :class:`~ncen_cli.ensemble.Ensemble` (or a target with ``member_logits`` and
            ``combine_logits``); put in eval mode here.
        x: (N, C, H, W) uint8 test images (or float in [0, 1]); y: (N,) labels.
        runs: the attack runs (see :func:`~ncen_cli.evaluation.runs_for`).
        batch_size: images per attack batch. seed: fixes every random start.
        checks: run the self-checks. check_large_eps: also run PGD at eps = 0.5 and check it drives
            accuracy to about 0.
        progress: ``progress(label, done, total)`` callback (images of this rank).
        worst_case: add, per eps with two or more runs, a ``worst-case`` row first: an example
            counts as robust only if it survived every run at that eps.
        quirks: evaluate as the authors' released code does (``runs_for(..., "authors")``); the
            ensemble's buffers are restored bit-for-bit afterwards.
        dist: the processes that share the work (default: this one alone). With several, each
            rank evaluates its contiguous share of ``x`` and the counts are summed over them; every
            rank must call with the same arguments. A process group alone changes nothing.
    Returns:
        an :class:`EvaluationReport` (counts summed over ``dist``'s ranks). Raises NcenError
        when the ensemble's outputs on clean images are not finite.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise UsageError(f"{len(x)} images but {len(y)} labels")
    validate_runs(runs)
    device = torch.device(device)
    ensemble = ensemble.to(device).eval()
    part = dist.shard(len(x))
    batches = _Batches(x[part], y[part].long(), part.start, batch_size, device)
    target = AuthorsEnsemble(ensemble, quirks).eval() if quirks is not None else ensemble
    mode = (
        batch_statistics(ensemble)
        if quirks is not None and quirks.batchnorm_train
        else nullcontext()
    )
    with mode:
        clean = _clean_pass(target, batches, dist)
        clean_correct, n = dist.sum_counts(int(clean.sum()), len(batches))
        report_checks = (
            model_checks(target, batches.x, batches.y, batch_size, device, quirks, dist)
            if checks
            else []
        )
        if quirks is not None and quirks.conditional:
            batches = batches.subset(clean)
        runner = _Runner(target, batches, seed, progress, quirks, dist)
        results = [runner.run(run, index) for index, run in enumerate(runs)]
        if checks:
            report_checks += result_checks(results, runs)
            if check_large_eps:
                report_checks.append(large_eps_check(runner.run(large_eps_run(), len(runs))))
    worst = worst_case_results(results, seed, dist) if worst_case else []
    if checks:
        report_checks.append(objective_sensitivity_check(results, worst))
    return EvaluationReport(
        clean_correct / max(n, 1), clean_correct, n, worst + results, report_checks
    )
