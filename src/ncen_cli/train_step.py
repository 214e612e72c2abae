"""One training step: mean member cross-entropy plus a defense's regularizer, back-propagated.

The regularizer R is a function of the members' input gradients g_i = d (sum_b CE_i,b) / d x
(the batch-summed CE; with train-mode BatchNorm each sample's gradient depends on the whole
batch) and of their logits;
its parameter gradient needs the derivative of g_i with respect to the parameters. With
v_i = d R / d g_i held fixed, that is grad_theta <g_i, v_i>. Two exact ways to get it:

* ``jvp``: reverse-over-forward. <g_i, v_i> is the directional derivative of CE_i
  along v_i in input space, d/dt CE_i(theta, x + t v_i) at t = 0, which forward-mode AD computes
  exactly in one dual forward pass (no step size); one reverse pass then gives its parameter
  gradient. The input gradients themselves come from an earlier forward-backward without any
  parameter graph. See :func:`_jvp_step`.
* ``exact`` (default): double backpropagation. The input gradients are taken with
  ``autograd.grad(create_graph=True)`` and the backward of <g_i, v_i> differentiates the
  backward pass itself. See :func:`_exact_step`.

Both give the same parameter gradients (to rounding; tests/test_train_step.py) and update
BatchNorm running statistics once per step. In both, the defense's terms are evaluated vectorised
over members and batch on detached leaves and differentiated (cheap); the per-member stages run
concurrently on CPU threads when given a threaded :class:`~ncen_cli.member_parallel.
MemberExecutor`. ``finite-diff`` (a difference of two backward passes) is retired: its
regularizer gradient crossed ReLU kinks and was mostly noise; the name is a deprecated alias of
the default for one release. Measurements: docs/performance.md. Most of the speed on a CPU comes
from the members' layers (``ncen_cli.layers``: Conv2d and BatchNorm2d with hand-written double
backwards and forward-mode rules).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from ncen_cli.attacks.core import frozen_parameters
from ncen_cli.defenses.base import Defense, DefenseInputs
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import UsageError
from ncen_cli.layers import forward_mode_layers, input_gradients_only
from ncen_cli.member_parallel import SERIAL, MemberExecutor

DOUBLE_BACKPROP_MODES = ("exact", "jvp", "finite-diff")  # finite-diff: deprecated alias
DEFAULT_DOUBLE_BACKPROP = "exact"  # jvp measured slower on the 2-core CPU (docs/performance.md)
DEFAULT_FD_SCALE = 3e-2  # only for the deprecated --fd-scale option, which is ignored

logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """Detached results of one step: ``loss`` and ``ce`` scalars and the weighted ``terms``."""

    loss: torch.Tensor
    ce: torch.Tensor
    terms: dict[str, torch.Tensor]


@dataclass
class _MemberPass:
    """One member's forward (and first backward) on its own leaf copy of the batch.

    logits (B, classes) and ce (scalar: CE summed over the batch) are in the autograd graph;
    input_grad (B, C, H, W) is d ce / d copy (in the graph when taken with create_graph)."""

    logits: torch.Tensor
    ce: torch.Tensor
    input_grad: torch.Tensor | None


@dataclass(frozen=True)
class _Step:
    """One step's problem: the ensemble and its defense (with its weighted hyperparameters),
    the batch x (B, C, H, W), or (k, B, C, H, W) when each member trains on its own inputs
    (:mod:`ncen_cli.crafting`), with labels y (B,), and how the per-member stages run."""

    ensemble: Ensemble
    defense: Defense
    hyperparameters: Mapping[str, float]
    x: torch.Tensor
    y: torch.Tensor
    executor: MemberExecutor

    def member_input(self, i: int) -> torch.Tensor:
        """Member i's images (B, C, H, W)."""
        return self.x[i] if self.x.dim() == 5 else self.x


def _member_pass(
    member: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    input_grad: bool,
    create_graph: bool = False,
) -> _MemberPass:
    """Member on x (B, C, H, W) with labels y (B,)."""
    copy = x.detach().clone().requires_grad_(input_grad)
    # the create_graph backward below is w.r.t. the input only: the layers need not build
    # parameter-gradient graphs (captured by each layer as this forward runs)
    marker = input_gradients_only() if create_graph and input_grad else nullcontext()
    with marker:
        logits = member(copy)
    ce = _summed_ce(logits.unsqueeze(0), y)
    if not input_grad:
        return _MemberPass(logits, ce, None)
    (grad,) = torch.autograd.grad(ce, copy, create_graph=create_graph)
    return _MemberPass(logits, ce, grad)


def _trainable(members: list[torch.nn.Module]) -> list[list[torch.Tensor]]:
    """Each member's parameters that require gradients, member by member."""
    return [[p for p in m.parameters() if p.requires_grad] for m in members]


def _step_output(
    passes: list[_MemberPass], terms: dict[str, torch.Tensor], scale_ce: float
) -> StepOutput:
    """Detached loss = mean CE + terms, the mean CE and the terms."""
    # cast: sum() of tensors is a tensor (typeshed types its int start into the result)
    ce = cast(torch.Tensor, sum(p.ce.detach() for p in passes)) * scale_ce
    reg = sum(t.detach() for t in terms.values()) if terms else 0.0
    return StepOutput(ce + reg, ce, {n: t.detach() for n, t in terms.items()})


def _weighted_terms(
    defense: Defense, inputs: DefenseInputs, hyperparameters: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    return dict(defense.loss_terms(inputs, **hyperparameters))


def _regularizer_gradients(
    step: _Step, passes: list[_MemberPass]
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Evaluate the defense's terms on detached leaves and differentiate them (cheap: the terms
    are small functions of the gradients and logits).

    Returns the weighted terms, v = d R / d grads (k, B, C, H, W) and u = d R / d logits
    (k, B, classes); either is None when R does not depend on it."""
    # logits always get a gradient slot (tiny): a defense that reads them without declaring
    # needs_logits still trains correctly
    logits = torch.stack([p.logits.detach() for p in passes]).requires_grad_(True)
    wrt = {"logits": logits}
    grads = None
    defense = step.defense
    if defense.needs_input_gradients:
        # cast: every pass took its input gradient (the defense asked for them)
        grads = torch.stack([cast(torch.Tensor, p.input_grad).detach() for p in passes])
        grads.requires_grad_(True)
        wrt["grads"] = grads
    with torch.enable_grad():
        inputs = DefenseInputs(step.x, step.y, logits, grads)
        terms = _weighted_terms(defense, inputs, step.hyperparameters)
        reg = cast(torch.Tensor, sum(terms.values())) if terms else None  # cast: as above
    if reg is None or not reg.requires_grad:
        return terms, None, None
    values = torch.autograd.grad(reg, list(wrt.values()), allow_unused=True)
    found = dict(zip(wrt, values, strict=True))
    return terms, found.get("grads"), found.get("logits")


def _exact_step(step: _Step) -> StepOutput:
    """Compute the loss and back-propagate it (gradients accumulate into ``.grad``).

    Three stages, the first and last run per member (concurrently with a threaded ``executor``):

    1. member i: logits_i and CE_i on its own leaf copy of the batch; g_i = d CE_i / d x with
       ``create_graph`` (when the defense uses input gradients);
    2. the defense's terms R on detached leaves, v_i = d R / d g_i and u_i = d R / d logits_i;
    3. member i: backward of CE_i / (k B) + <g_i, v_i> + <logits_i, u_i>, whose parameter
       gradient is exactly that of mean CE + R (the chain rule through g_i and logits_i): the
       double backpropagation runs here, member by member.
    """
    k, batch = step.ensemble.k, step.x.shape[-4]
    members = list(step.ensemble.members)
    params = _trainable(members)
    needs_grads = step.defense.needs_input_gradients

    def forward(i: int) -> _MemberPass:
        xi = step.member_input(i)
        return _member_pass(members[i], xi, step.y, needs_grads, create_graph=True)

    passes = step.executor.map(forward, k)
    terms, v, u = _regularizer_gradients(step, passes)
    scale_ce = 1.0 / (k * batch)

    def backward(i: int) -> None:
        member = passes[i]
        total = member.ce * scale_ce
        if v is not None and member.input_grad is not None:
            total = total + (member.input_grad * v[i]).sum()
        if u is not None:
            total = total + (member.logits * u[i]).sum()
        # inputs=: only parameter gradients (nothing is spent on d/dx of the input copy)
        total.backward(inputs=params[i] or None)

    step.executor.map(backward, k)
    return _step_output(passes, terms, scale_ce)


def _jvp_step(step: _Step) -> StepOutput:
    """Same result as :func:`_exact_step` (loss, terms, parameter gradients in ``.grad``, one
    BatchNorm statistics update), with the double backpropagation replaced by reverse-over-
    forward. Three stages, the first and last per member (concurrently with a threaded executor):

    1. member i on its own leaf copy of the batch, with no parameter graph: logits_i, CE_i and
       g_i = d CE_i / d x by an ordinary backward (BatchNorm statistics restored afterwards);
    2. the defense's terms R on detached leaves, v_i = d R / d g_i and u_i = d R / d logits_i;
    3. member i on the dual input (x, v_i): forward mode gives logits_i and their tangent
       t_i = J_i v_i, so <g_i, v_i> = <softmax(logits_i) - onehot(y), t_i> exactly (the
       directional derivative of CE_i along v_i, written from primitives); one reverse pass of
       CE_i / (k B) + <g_i, v_i> + <logits_i, u_i> over the parameters.

    A defense that does not use input gradients gets the plain step. Raises UsageError for a
    member layer without a correct forward-mode rule (see :func:`ncen_cli.layers.
    forward_mode_layers`)."""
    if not step.defense.needs_input_gradients:
        return _exact_step(step)
    k, batch = step.ensemble.k, step.x.shape[-4]
    members, y, executor = list(step.ensemble.members), step.y, step.executor
    params = _trainable(members)

    def first(i: int) -> _MemberPass:
        with frozen_parameters(members[i]), frozen_batchnorm_stats(members[i]):
            return _member_pass(members[i], step.member_input(i), y, True)

    passes = executor.map(first, k)
    terms, v, u = _regularizer_gradients(step, passes)
    scale_ce = 1.0 / (k * batch)

    def dual_forward(i: int) -> torch.Tensor:
        xi = step.member_input(i)
        direction = torch.zeros_like(xi) if v is None else v[i].to(xi.dtype)
        dual = forward_ad.make_dual(xi.detach(), direction)
        logits, tangent = forward_ad.unpack_dual(members[i](dual))
        total = _summed_ce(logits.unsqueeze(0), y) * scale_ce
        total = total + _ce_directional_derivative(logits, tangent, y)
        if u is not None:
            total = total + (logits * u[i]).sum()
        return total

    def backward(i: int) -> None:
        totals[i].backward(inputs=params[i] or None)

    with forward_mode_layers(members), forward_ad.dual_level():
        try:
            totals = executor.map(dual_forward, k)
        except NotImplementedError as error:
            first_line = (str(error).strip() or "?").splitlines()[0]
            raise UsageError(
                f"--double-backprop jvp: a member operation has no forward-mode rule "
                f"({first_line}); use --double-backprop exact"
            ) from None
    # outside the dual level: the reverse pass computes no forward-mode tangents
    executor.map(backward, k)
    return _step_output(passes, terms, scale_ce)


def _ce_directional_derivative(
    logits: torch.Tensor, tangent: torch.Tensor | None, y: torch.Tensor
) -> torch.Tensor:
    """d/dt sum_b CE(logits_b + t tangent_b, y_b) at t = 0 = <softmax(logits) - onehot(y),
    tangent>, a scalar differentiable in reverse through both arguments. logits, tangent
    (B, classes); half precision is promoted to float32. (torch's cross_entropy cannot be
    differentiated in reverse after a forward-mode pass in torch 2.14.1.)"""
    if tangent is None:  # the logits do not depend on the input
        return logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits, tangent = logits.float(), tangent.float()
    residual = torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return (residual * tangent).sum()


@contextmanager
def frozen_batchnorm_stats(module: torch.nn.Module):
    """Restore every buffer of ``module`` (BatchNorm running statistics) afterwards: a pass that
    is not the step's counted forward must not update them."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in zip(module.buffers(), saved, strict=True):
                buf.copy_(old)


def _summed_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over members and samples of CE. logits (k, B, classes) (half precision is promoted to
    float32; float64 stays float64), y (B,)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    k = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="sum")


def training_step(
    ensemble: Ensemble,
    defense: Defense,
    hyperparameters: Mapping[str, float],
    x: torch.Tensor,
    y: torch.Tensor,
    double_backprop: str = DEFAULT_DOUBLE_BACKPROP,
    executor: MemberExecutor = SERIAL,
) -> StepOutput:
    """One step of mean CE + the defense's terms on x (B, C, H, W), or (k, B, C, H, W) when each
    member trains on its own inputs (:mod:`ncen_cli.crafting`), with labels y (B,); parameter
    gradients accumulate into ``.grad``. ``double_backprop``: ``exact`` (:func:`_exact_step`)
    or ``jvp`` (:func:`_jvp_step`); the retired ``finite-diff`` runs the default mode after a
    one-time deprecation warning. The per-member stages run on ``executor``."""
    mode = resolve_double_backprop(double_backprop)
    step = _Step(ensemble, defense, hyperparameters, x, y, executor)
    return _jvp_step(step) if mode == "jvp" else _exact_step(step)


exact_step = functools.partial(training_step, double_backprop="exact")
"""``training_step(ensemble, defense, hyperparameters, x, y, executor=...)`` by double backprop."""
jvp_step = functools.partial(training_step, double_backprop="jvp")
"""``training_step(ensemble, defense, hyperparameters, x, y, executor=...)`` by forward mode."""


def resolve_double_backprop(mode: str) -> str:
    """The mode that runs for ``--double-backprop mode``: ``finite-diff`` (retired: its
    regularizer gradient was mostly noise, docs/performance.md) is an alias of the default,
    ``exact``, with
    a deprecation warning logged once per process. Raises UsageError for unknown modes."""
    global _finite_diff_warned
    if mode == "finite-diff":
        if not _finite_diff_warned:
            _finite_diff_warned = True
            logger.warning(
                "--double-backprop finite-diff is deprecated (its regularizer gradient was "
                "inaccurate) and now runs the exact '%s' mode; it will be removed in the next "
                "release",
                DEFAULT_DOUBLE_BACKPROP,
            )
        return DEFAULT_DOUBLE_BACKPROP
    if mode not in ("jvp", "exact"):
        raise UsageError(
            f"unknown --double-backprop '{mode}'; choose {', '.join(DOUBLE_BACKPROP_MODES)}"
        )
    return mode


_finite_diff_warned = False
