"""The authors' released evaluation as a protocol (``ncen attack --protocol authors``).

MiLabHITSZ/2022ZhangNCEn evaluates with advertorch on a wrapper (src/ensemble_model.py,
``predict_mean``) whose members end in a softmax and which returns ``softmax(mean_i p_i)`` with
``p_i = softmax(f_i(x))``; advertorch's CE (reduction ``sum``) is applied on top of that output.
The members sit in a plain Python list, so ``.eval()`` on the wrapper never reaches them: BatchNorm
runs in train mode (batch statistics of each batch of 64) during the attacks and the evaluation.
Accuracy is measured only on the test examples the ensemble classified correctly (the clean pass
is in train mode too). The attacks are the paper's Table II as advertorch runs them: every example
takes every iteration (no early stop) and MI-FGSM normalises its gradient by its L1 norm floored at
1e-6 (advertorch's ``normalize_by_pnorm``).

Each departure from an honest evaluation is a switch of :class:`AuthorsQuirks`, recorded in every
result's ``params``, so that a user can measure what each adds. This is *not* an honest robustness
evaluation: it reproduces the paper's numbers; the self-checks say so.

Not replicated: their wrapper calls every member twice per forward (the second output is unused).
With BatchNorm in train mode that only doubles the updates of the running statistics, which do
not change train-mode outputs, and here the running statistics are restored anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ncen_cli.errors import UsageError

if TYPE_CHECKING:
    from ncen_cli.attacks.base import AttackTarget

AUTHORS_BATCH_SIZE = 64  # attack_fashionmnist.py / attack_cifar10.py: --batch_size 64
ADVERTORCH_L1_FLOOR = 1e-6  # advertorch.utils.normalize_by_pnorm(small_constant=1e-6)


@dataclass(frozen=True)
class AuthorsQuirks:
    """The switches of the authors' evaluation (all on: their released code).

    Attributes:
        member_softmax: each member's output is ``softmax(f_i(x))`` (their members end in softmax).
        output_softmax: the ensemble returns ``softmax(mean_i o_i)`` (a softmax over the mean of
            the members' outputs ``o_i``), and the attack's CE is applied on top of it.
        batchnorm_train: BatchNorm (every member layer) in train mode, i.e. batch statistics of each
            batch, during attacks and evaluation; running statistics are restored bit-for-bit.
        conditional: accuracy over the examples the ensemble classified correctly (clean pass).
        advertorch_iterations: every example takes every iteration (no early stop) and MI-FGSM
            normalises by the L1 norm floored at 1e-6, as advertorch does.
    """

    member_softmax: bool = True
    output_softmax: bool = True
    batchnorm_train: bool = True
    conditional: bool = True
    advertorch_iterations: bool = True

    @classmethod
    def parse(cls, spec: str | None) -> AuthorsQuirks:
        """``None``/``all``: every quirk; ``none``: none; otherwise a comma list of the quirks to
        keep on (names with ``-`` or ``_``), e.g. ``member-softmax,output-softmax``."""
        if spec is None or spec.strip().lower() == "all":
            return cls()
        names = {f.name for f in fields(cls)}
        wanted = {s.strip().lower().replace("-", "_") for s in spec.split(",") if s.strip()}
        if wanted == {"none"}:
            wanted = set()
        unknown = sorted(wanted - names)
        if unknown:
            raise UsageError(
                f"unknown --quirks {', '.join(unknown)}; choose all, none or a comma "
                f"list of {', '.join(sorted(n.replace('_', '-') for n in names))}"
            )
        return replace(cls(), **{n: n in wanted for n in names})

    def params(self) -> dict[str, Any]:
        """The switches as ``params`` entries (``authors.<name>``)."""
        return {f"authors.{f.name}": getattr(self, f.name) for f in fields(self)}

    def enabled(self) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(self) if getattr(self, f.name)]


class AuthorsEnsemble(nn.Module):
    """The authors' ``EnsembleModel(..., 'predict_mean')`` around an ncen ensemble, as an attack
    target.

    ``member_logits(x)`` -> (k, B, C): the members' outputs ``o_i`` as their members return them
    (softmax probabilities with ``member_softmax``); ``combine_logits(o)`` -> (B, C): the wrapper's
    output ``softmax(mean_i o_i)`` (without ``output_softmax``: ``mean_i o_i``). The attack
    objective ``logits`` (CE of the combined output) is then advertorch's CE on the wrapper's
    output.
    """

    def __init__(self, ensemble: nn.Module, quirks: AuthorsQuirks) -> None:
        super().__init__()
        self.ensemble = ensemble
        self.quirks = quirks

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        # cast: nn.Module types every attribute it holds as Tensor | Module
        outputs = cast("AttackTarget", self.ensemble).member_logits(x)
        return outputs.softmax(-1) if self.quirks.member_softmax else outputs

    def combine_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        mean = outputs.mean(0)
        return mean.softmax(-1) if self.quirks.output_softmax else mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine_logits(self.member_logits(x))


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Every submodule in train mode (BatchNorm on batch statistics) for the duration; on exit
    every buffer (running means, variances, batch counters) is restored bit-for-bit and every
    module's mode is put back, even when the body raises."""
    modes = [(m, m.training) for m in module.modules()]
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    module.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for m, training in modes:
            m.training = training
