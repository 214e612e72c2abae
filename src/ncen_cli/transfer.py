"""The member-to-member transferability matrix (the paper's Fig. 3).

For each member ``i`` of an ensemble, adversarial examples are crafted against member ``i`` alone
(wrapped in :class:`~ncen_cli.attacks.base.MemberTarget`) and evaluated on every member ``j`` and on
the whole ensemble. The result is a ``k x (k + 1)`` matrix of accuracies: row = source member,
column ``j < k`` = target member, last column = the ensemble. The diagonal is white-box accuracy;
off-diagonal cells measure transfer. An ensemble whose members are diverse has off-diagonal cells
well above the diagonal.

Each batch is crafted once per source member; all ``k + 1`` evaluations reuse that batch.
Iterative attacks run all their steps here (``settings.extra["early_stop"] = False`` unless given):
an example that stops at the first iterate that barely fools its source transfers poorly, which
would make the members look more diverse than they are.

Example::

    from ncen_cli.checkpoint import load_ensemble
    from ncen_cli.transfer import transfer_matrix

    ensemble = load_ensemble("run.safetensors")
    result = transfer_matrix(ensemble, x_test, y_test, attack="pgd", settings=None)
    print(result.matrix, result.summary)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ncen_cli.attacks.base import Attack, AttackSettings, MemberTarget, as_float
from ncen_cli.distributed import SINGLE, DistContext
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import NcenError, UsageError

DEFAULT_EPS = 0.05
"""The paper's transfer radius (Fig. 3: PGD and MI-FGSM at eps = 0.05)."""

Progress = Callable[[int, int], None]


@dataclass
class TransferResult:
    """A transferability matrix and how it was measured.

    Attributes:
        matrix: k rows of k + 1 accuracies in [0, 1]. ``matrix[i][j]`` (j < k) is member j's
            accuracy on examples crafted against member i; ``matrix[i][k]`` is the ensemble's.
        members: row/column labels, ``"<index>:<architecture>"``.
        attack: the attack's registry name.
        params: every attack setting used (eps, steps, step_size, restarts, ...), plus ``seed`` and
            ``only_correct``.
        n: number of test examples evaluated (after ``only_correct`` filtering).
        clean: k + 1 clean accuracies on the same n examples (members, then the ensemble).
    """

    matrix: list[list[float]]
    members: list[str]
    attack: str
    params: dict[str, Any]
    n: int
    clean: list[float] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def summary(self) -> dict[str, float]:
        """Mean diagonal (white-box), mean off-diagonal (member-to-member transfer), their gap
        (off-diagonal minus diagonal: positive when attacks transfer less than they hit their own
        source), and the mean of the ensemble column."""
        k = self.k
        diag = [self.matrix[i][i] for i in range(k)]
        off = [self.matrix[i][j] for i in range(k) for j in range(k) if i != j]
        ens = [self.matrix[i][k] for i in range(k)]
        mean_diag = sum(diag) / k
        mean_off = sum(off) / len(off) if off else math.nan
        return {
            "mean_diagonal": mean_diag,
            "mean_off_diagonal": mean_off,
            "gap": mean_off - mean_diag,
            "ensemble_mean": sum(ens) / k,
        }

    def to_json(self) -> dict[str, Any]:
        """``{"matrix", "members", "attack", "params", "n", "summary", "clean"}`` (see
        docs/transfer.md)."""
        return {
            "matrix": [list(row) for row in self.matrix],
            "members": list(self.members),
            "attack": self.attack,
            "params": dict(self.params),
            "n": self.n,
            "summary": self.summary,
            "clean": list(self.clean),
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> TransferResult:
        """Rebuild a result from :meth:`to_json` output (e.g. to re-plot a saved ``--json``)."""
        try:
            return cls(
                matrix=[[float(v) for v in row] for row in payload["matrix"]],
                members=[str(m) for m in payload["members"]],
                attack=str(payload["attack"]),
                params=dict(payload["params"]),
                n=int(payload["n"]),
                clean=[float(v) for v in payload.get("clean", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"not a transfer result ({type(exc).__name__}: {exc})") from None


class SoftmaxOutput(torch.nn.Module):
    """A member whose output is ``softmax(f(x))`` (B, C), as the authors' members return."""

    def __init__(self, member: torch.nn.Module) -> None:
        super().__init__()
        self.member = member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member(x).softmax(-1)


def member_labels(ensemble: Ensemble) -> list[str]:
    """``"<index>:<architecture>"`` for each member (architecture from the metadata if recorded)."""
    names = ensemble.metadata.get("members")
    if not isinstance(names, list | tuple) or len(names) != ensemble.k:
        names = [type(m).__name__.lower() for m in ensemble.members]
    return [f"{i}:{name}" for i, name in enumerate(names)]


def run_settings(
    attack: str,
    eps: float = DEFAULT_EPS,
    steps: int | None = None,
    step_size: float | None = None,
    restarts: int | None = None,
) -> AttackSettings:
    """The attack's own defaults for ``eps`` with overrides applied (a single-step attack keeps
    its one step): :func:`~ncen_cli.evaluation.runs_for`'s ``custom`` run of ``attack``."""
    from ncen_cli.evaluation import runs_for

    (run,) = runs_for(
        None,
        "custom",
        attacks=[attack],
        eps=[eps],
        steps=steps,
        step_size=step_size,
        restarts=restarts,
    )
    return run.settings


def source_stream(seed: int, source: int) -> int:
    """:func:`~ncen_cli.evaluation.batch_generator`'s stream for crafting on member ``source``."""
    return seed * 1_000_003 + source * 10_007


@torch.no_grad()
def _correct(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (k + 1, B) booleans: each member's, then the ensemble's, correctness."""
    logits = ensemble.member_logits(x)  # (k, B, classes)
    combined = ensemble.combine_logits(logits)  # (B, classes)
    preds = torch.cat([logits.argmax(-1), combined.argmax(-1).unsqueeze(0)])
    return preds == y.unsqueeze(0)


def transfer_matrix(
    ensemble: Ensemble,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str = "pgd",
    settings: AttackSettings | None = None,
    batch_size: int = 500,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    only_correct: bool = False,
    progress: Progress | None = None,
    member_softmax: bool = False,
    dist: DistContext = SINGLE,
) -> TransferResult:
    """Measure how adversarial examples crafted on each member transfer to the others.

    Args:
        ensemble: the ensemble (put in eval mode here; its parameters are not changed).
        x: (N, C, H, W) test images, uint8 (0-255) or float in [0, 1]; y: (N,) int64 labels.
        attack: registry name in ``ncen.attacks`` (e.g. ``"pgd"``, ``"mifgsm"``).
        settings: the attack's settings; None: ``run_settings(attack)`` (its defaults at the
            paper's eps). ``extra["early_stop"]`` defaults to False here (every example runs all
            steps).
        batch_size: examples crafted at once.
        device: where to compute.
        seed: seeds the attack's randomness (random starts), per source member and batch.
        only_correct: keep only examples that every member classifies correctly (as DVERGE does).
        progress: called as ``progress(done, total)`` after each (batch, source member) pass.
        member_softmax: craft on ``softmax(f_i(x))`` with CE on top, as the authors' code does
            (their members end in a softmax; ``ncen transfer --protocol authors``). Evaluation
            still uses the members' predictions (a softmax does not change the argmax).
        dist: the processes that share the work (default: this one alone); with several, each
            rank evaluates its share of the examples and the counts are summed exactly.
    Returns:
        a :class:`TransferResult` with the k x (k + 1) matrix.
    Raises:
        UsageError for bad arguments; NcenError when no example is left to evaluate.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise UsageError(f"x has {len(x)} examples but y has {len(y)} labels")
    if settings is None:
        settings = run_settings(attack, DEFAULT_EPS)
    if "early_stop" not in settings.extra:  # craft with every step: see the module docstring
        settings = replace(settings, extra={**settings.extra, "early_stop": False})
    device = torch.device(device)
    ensemble = ensemble.to(device).eval()
    share = dist.shard(len(x))
    counts = _Counts(ensemble.k, device)
    crafter = _Crafter(ensemble, attack, settings, seed, member_softmax)
    starts = range(share.start, share.stop, batch_size)
    done, total = 0, len(starts) * ensemble.k
    if progress is not None:  # the total is known before the first (slow) pass
        progress(0, total)
    for start in starts:
        stop = min(start + batch_size, share.stop)
        xb, yb = as_float(x[start:stop]).to(device), y[start:stop].to(device)
        clean = _correct(ensemble, xb, yb)  # (k + 1, B)
        if only_correct:
            keep = clean[: ensemble.k].all(0)
            xb, yb, clean = xb[keep], yb[keep], clean[:, keep]
        counts.count += len(yb)
        counts.clean += clean.sum(1)
        for i in range(ensemble.k):
            if len(yb):
                counts.adversarial[i] += _correct(
                    ensemble, crafter.craft(i, xb, yb, start), yb
                ).sum(1)
            done += 1
            if progress is not None:
                progress(done, total)
    return counts.result(
        dist,
        ensemble,
        attack,
        {**asdict(settings), "seed": seed, "only_correct": only_correct},
        member_softmax,
    )


class _Crafter:
    """Crafts adversarial examples on one member at a time (see :func:`transfer_matrix`)."""

    def __init__(
        self,
        ensemble: Ensemble,
        attack: str,
        settings: AttackSettings,
        seed: int,
        member_softmax: bool,
    ) -> None:
        from ncen_cli.registry import ATTACKS

        self.attack: Attack = ATTACKS.get(attack)
        self.settings, self.seed = settings, seed
        sources = [SoftmaxOutput(m) if member_softmax else m for m in ensemble.members]
        self.targets = [MemberTarget(member).eval() for member in sources]

    def craft(self, source: int, xb: torch.Tensor, yb: torch.Tensor, start: int) -> torch.Tensor:
        """(B, C, H, W) adversarial images crafted on member ``source`` for the batch whose first
        example has global index ``start``."""
        from ncen_cli.evaluation import batch_generator

        gen = batch_generator(source_stream(self.seed, source), start, xb.device)
        return self.attack.perturb(self.targets[source], xb, yb, self.settings, gen).detach()


class _Counts:
    """This rank's correct-prediction counts: ``adversarial`` (k, k + 1), ``clean`` (k + 1,),
    ``count`` examples."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.adversarial = torch.zeros(k, k + 1, dtype=torch.int64, device=device)
        self.clean = torch.zeros(k + 1, dtype=torch.int64, device=device)
        self.count = 0

    def result(
        self,
        dist: DistContext,
        ensemble: Ensemble,
        attack: str,
        params: dict[str, Any],
        member_softmax: bool,
    ) -> TransferResult:
        """The counts summed over ``dist``'s ranks, as accuracies."""
        (count,) = dist.sum_counts(self.count)
        adv_correct = dist.all_reduce_sum(self.adversarial).cpu()
        clean_correct = dist.all_reduce_sum(self.clean).cpu()
        if count == 0:
            why = " that every member classifies correctly" if params["only_correct"] else ""
            raise NcenError(f"no test example{why} to evaluate; use more examples (--test-limit)")
        if member_softmax:
            params["authors.member_softmax"] = True
        return TransferResult(
            matrix=(adv_correct.double() / count).tolist(),
            members=member_labels(ensemble),
            attack=attack,
            params=params,
            n=count,
            clean=(clean_correct.double() / count).tolist(),
        )
