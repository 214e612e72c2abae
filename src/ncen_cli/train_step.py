"""One training step: mean member cross-entropy plus a defense's regularizer, back-propagated.

Two ways to get the regularizer's gradient with respect to the parameters:

* ``exact`` (default): every member runs ONCE forward on its own leaf copy of the batch and takes
  its per-sample input gradients with ``autograd.grad(create_graph=True)``; the defense's terms are
  evaluated vectorised over members and batch on detached leaves and differentiated (cheap), and
  each member then back-propagates CE_i / (k B) + <g_i, d R / d g_i> (+ <logits_i, d R / d
  logits_i>), which carries the double backpropagation. No Python loop over samples; the
  per-member stages run concurrently on CPU threads when given a threaded
  :class:`~ncen_cli.member_parallel.MemberExecutor`.
* ``finite-diff``: the input gradients and the CE parameter gradients come from one ordinary
  forward-backward without a graph; v = dR/dg is cheap (R is a function of the gradients alone);
  then d R / d theta = (d g / d theta)^T v is the directional derivative of the parameter gradient
  along v, estimated by one extra forward-backward (``fd_scheme="forward"``)::

      d R / d theta_i  ~  [ grad_theta L_i(x + h_i v_i) - grad_theta L_i(x) ] / h_i

  or by two (``fd_scheme="central"``: [grad L(x + h v) - grad L(x - h v)] / 2h, error O(h^2)),
  with h_i = fd_scale * ||x|| / ||v_i|| per member i (the input moves by ``fd_scale`` of its
  norm). The extra passes leave BatchNorm running statistics untouched. The measured agreement
  with ``exact`` and the choice of ``fd_scale`` are in docs/performance.md.

Measured on CPU (docs/performance.md): most of the speed comes from the members' layers
(``ncen_cli.layers``: Conv2d and BatchNorm2d with hand-written double backwards); member threads
(one per member, single-threaded operations) beat intra-op threading; channels_last was slower.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ncen_cli.defenses.base import Defense, DefenseInputs
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import UsageError
from ncen_cli.layers import input_gradient_pass
from ncen_cli.member_parallel import SERIAL, MemberExecutor

DOUBLE_BACKPROP_MODES = ("exact", "finite-diff")
DEFAULT_FD_SCALE = 3e-2
FD_SCHEMES = ("forward", "central")


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
    input_grad (B, C, H, W) is d ce / d copy (in the graph when taken with create_graph);
    param_grads: d ce / d theta_i when asked for (finite-diff), else None."""

    logits: torch.Tensor
    ce: torch.Tensor
    input_grad: torch.Tensor | None
    param_grads: tuple[torch.Tensor, ...] | None = None


def _member_pass(
    member: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    input_grad: bool,
    create_graph: bool = False,
    params: list[torch.Tensor] | None = None,
) -> _MemberPass:
    copy = x.detach().clone().requires_grad_(input_grad)
    logits = member(copy)
    ce = _summed_ce(logits.unsqueeze(0), y)
    if not input_grad:
        return _MemberPass(logits, ce, None)
    wanted = [copy, *(params or [])]
    # w.r.t. the input only: the layers need not build parameter-gradient graphs
    marker = input_gradient_pass() if create_graph and not params else nullcontext()
    with marker:
        grads = torch.autograd.grad(ce, wanted, create_graph=create_graph)
    return _MemberPass(logits, ce, grads[0], tuple(grads[1:]) if params else None)


def _trainable(members: list[torch.nn.Module]) -> list[list[torch.Tensor]]:
    """Each member's parameters that require gradients, member by member."""
    return [[p for p in m.parameters() if p.requires_grad] for m in members]


def _step_output(
    passes: list[_MemberPass], terms: dict[str, torch.Tensor], scale_ce: float
) -> StepOutput:
    """Detached loss = mean CE + terms, the mean CE and the terms."""
    ce = sum(p.ce.detach() for p in passes) * scale_ce
    reg = sum(t.detach() for t in terms.values()) if terms else 0.0
    return StepOutput(ce + reg, ce, {n: t.detach() for n, t in terms.items()})


def _weighted_terms(
    defense: Defense, inputs: DefenseInputs, hyperparameters: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    return dict(defense.loss_terms(inputs, **hyperparameters))


def _regularizer_gradients(
    defense: Defense,
    hyperparameters: Mapping[str, float],
    x: torch.Tensor,
    y: torch.Tensor,
    passes: list[_MemberPass],
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
    if defense.needs_input_gradients:
        grads = torch.stack([p.input_grad.detach() for p in passes]).requires_grad_(True)
        wrt["grads"] = grads
    with torch.enable_grad():
        terms = _weighted_terms(defense, DefenseInputs(x, y, logits, grads), hyperparameters)
        reg = sum(terms.values()) if terms else None
    if reg is None or not reg.requires_grad:
        return terms, None, None
    values = torch.autograd.grad(reg, list(wrt.values()), allow_unused=True)
    found = dict(zip(wrt, values, strict=True))
    return terms, found.get("grads"), found.get("logits")


def exact_step(
    ensemble: Ensemble,
    defense: Defense,
    hyperparameters: Mapping[str, float],
    x: torch.Tensor,
    y: torch.Tensor,
    executor: MemberExecutor = SERIAL,
) -> StepOutput:
    """Compute the loss and back-propagate it (gradients accumulate into ``.grad``).

    Three stages, the first and last run per member (concurrently with a threaded ``executor``):

    1. member i: logits_i and CE_i on its own leaf copy of the batch; g_i = d CE_i / d x with
       ``create_graph`` (when the defense uses input gradients);
    2. the defense's terms R on detached leaves, v_i = d R / d g_i and u_i = d R / d logits_i;
    3. member i: backward of CE_i / (k B) + <g_i, v_i> + <logits_i, u_i>, whose parameter
       gradient is exactly that of mean CE + R (the chain rule through g_i and logits_i): the
       double backpropagation runs here, member by member.

    ``x`` is (B, C, H, W), or (k, B, C, H, W) when each member trains on its own inputs (a
    defense's crafted inputs, :mod:`ncen_cli.crafting`); ``y`` (B,).
    """
    k, batch = ensemble.k, x.shape[-4]
    members = list(ensemble.members)
    params = _trainable(members)
    needs_grads = defense.needs_input_gradients

    def forward(i: int) -> _MemberPass:
        xi = x[i] if x.dim() == 5 else x  # (k, B, C, H, W): member i trains on its own inputs
        return _member_pass(members[i], xi, y, needs_grads, create_graph=True)

    passes = executor.map(forward, k)
    terms, v, u = _regularizer_gradients(defense, hyperparameters, x, y, passes)
    scale_ce = 1.0 / (k * batch)

    def backward(i: int) -> None:
        total = passes[i].ce * scale_ce
        if v is not None and passes[i].input_grad is not None:
            total = total + (passes[i].input_grad * v[i]).sum()
        if u is not None:
            total = total + (passes[i].logits * u[i]).sum()
        # inputs=: only parameter gradients (nothing is spent on d/dx of the input copy)
        total.backward(inputs=params[i] or None)

    executor.map(backward, k)
    return _step_output(passes, terms, scale_ce)


@contextmanager
def frozen_batchnorm_stats(module: torch.nn.Module):
    """Restore every buffer of ``module`` (BatchNorm running statistics) afterwards: the extra
    finite-difference pass must not update them."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in zip(module.buffers(), saved, strict=True):
                buf.copy_(old)


def finite_diff_step(
    ensemble: Ensemble,
    defense: Defense,
    hyperparameters: Mapping[str, float],
    x: torch.Tensor,
    y: torch.Tensor,
    fd_scale: float = DEFAULT_FD_SCALE,
    fd_scheme: str = "forward",
    executor: MemberExecutor = SERIAL,
) -> StepOutput:
    """Like :func:`exact_step` but with a finite-difference Hessian-vector product (see module doc).

    ``fd_scheme``: ``"forward"`` (one extra forward-backward, error O(h)) or ``"central"`` (two
    extra, error O(h^2)). Writes parameter gradients into ``.grad`` (accumulating). Per member
    (concurrently with a threaded ``executor``): one forward-backward for g_i and d CE_i / d theta;
    then, after v = d R / d g, the extra pass(es) at x +- h_i v_i."""
    if fd_scheme not in FD_SCHEMES:
        raise UsageError(f"unknown finite-difference scheme '{fd_scheme}'; choose {FD_SCHEMES}")
    if not defense.needs_input_gradients:
        return exact_step(ensemble, defense, hyperparameters, x, y, executor)
    if x.dim() == 5:
        raise UsageError("--double-backprop finite-diff takes one batch shared by the members")
    if defense.needs_logits:
        raise UsageError(
            f"--double-backprop finite-diff supports defenses that depend only on input gradients; "
            f"'{defense.name}' also uses the members' outputs: use --double-backprop exact"
        )
    k, batch = ensemble.k, x.shape[0]
    members = list(ensemble.members)
    params = _trainable(members)

    def first(i: int) -> _MemberPass:
        return _member_pass(members[i], x, y, True, params=params[i])

    passes = executor.map(first, k)
    terms, v, _ = _regularizer_gradients(defense, hyperparameters, x, y, passes)
    if v is None:
        v = torch.zeros(k, *x.shape, dtype=x.dtype, device=x.device)
    v_norms = v.flatten(1).norm(dim=1).tolist()  # k floats
    x_norm = float(x.detach().flatten().norm())
    scale_ce = 1.0 / (k * batch)

    def second(i: int) -> None:
        grad_at_x = passes[i].param_grads
        differences = None  # (grad_plus - grad_minus) / denominator, per parameter
        if v_norms[i] > 0:  # a member with v = 0 gets only its CE gradient
            h = fd_scale * x_norm / v_norms[i]
            grad_plus = _param_grads_at(members[i], x + h * v[i], y, params[i])
            if fd_scheme == "central":
                grad_minus = _param_grads_at(members[i], x - h * v[i], y, params[i])
                inv = 1.0 / (2 * h)
            else:
                grad_minus, inv = grad_at_x, 1.0 / h
            differences = [(gp - gm) * inv for gp, gm in zip(grad_plus, grad_minus, strict=True)]
        for j, p in enumerate(params[i]):
            update = grad_at_x[j] * scale_ce
            if differences is not None:
                update = update + differences[j]
            p.grad = update if p.grad is None else p.grad + update

    executor.map(second, k)
    return _step_output(passes, terms, scale_ce)


def _summed_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over members and samples of CE. logits (k, B, classes) (half precision is promoted to
    float32; float64 stays float64), y (B,)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    k = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="sum")


def _param_grads_at(
    member: torch.nn.Module, inputs: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Gradients of member CE (summed over the batch) w.r.t. ``params`` at ``inputs``
    (B, C, H, W), leaving the member's BatchNorm running statistics as they were."""
    with frozen_batchnorm_stats(member):
        ce = _summed_ce(member(inputs.detach()).unsqueeze(0), y)
        return torch.autograd.grad(ce, params)


def training_step(
    ensemble: Ensemble,
    defense: Defense,
    hyperparameters: Mapping[str, float],
    x: torch.Tensor,
    y: torch.Tensor,
    double_backprop: str = "exact",
    fd_scale: float = DEFAULT_FD_SCALE,
    fd_scheme: str = "forward",
    executor: MemberExecutor = SERIAL,
) -> StepOutput:
    """Dispatch on ``double_backprop`` (``exact`` or ``finite-diff``, whose difference scheme is
    ``fd_scheme``); gradients land in ``.grad``."""
    if double_backprop == "exact":
        return exact_step(ensemble, defense, hyperparameters, x, y, executor)
    if double_backprop == "finite-diff":
        return finite_diff_step(
            ensemble, defense, hyperparameters, x, y, fd_scale, fd_scheme, executor
        )
    raise UsageError(
        f"unknown --double-backprop '{double_backprop}'; choose {', '.join(DOUBLE_BACKPROP_MODES)}"
    )
