"""One training step: mean member cross-entropy plus a defense's regularizer, back-propagated.

Two ways to get the regularizer's gradient with respect to the parameters:

* ``exact`` (default): every member runs ONCE forward on its own leaf copy of the batch
  (copies (k, B, C, H, W)); ONE ``autograd.grad(create_graph=True)`` returns all k per-sample input
  gradients; the defense's terms are vectorised over members and batch; one ``backward()`` of
  CE + terms does the double backpropagation. No Python loop over samples.
* ``finite-diff``: the input gradients and the CE parameter gradients come from one ordinary
  forward-backward without a graph; v = dR/dg is cheap (R is a function of the gradients alone);
  then d R / d theta = (d g / d theta)^T v is the directional derivative of the parameter gradient
  along v, estimated by one extra forward-backward (``fd_scheme="forward"``)::

      d R / d theta_i  ~  [ grad_theta L_i(x + h_i v_i) - grad_theta L_i(x) ] / h_i

  or by two (``fd_scheme="central"``: [grad L(x + h v) - grad L(x - h v)] / 2h, error O(h^2)),
  with h_i = fd_scale * ||x|| / ||v_i|| per member i (the input moves by ``fd_scale`` of its
  norm). The extra passes leave BatchNorm running statistics untouched. The measured agreement
  with ``exact`` and the choice of ``fd_scale`` are in docs/performance.md.

Measured on CPU (docs/performance.md): channels_last and a BatchNorm with a hand-written
differentiable backward were both slower than the defaults here, so neither is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ncen_cli.defenses.base import Defense, DefenseInputs
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import UsageError

DOUBLE_BACKPROP_MODES = ("exact", "finite-diff")
DEFAULT_FD_SCALE = 3e-2
FD_SCHEMES = ("forward", "central")


@dataclass
class StepOutput:
    """Detached results of one step: ``loss`` and ``ce`` scalars and the weighted ``terms``."""

    loss: torch.Tensor
    ce: torch.Tensor
    terms: dict[str, torch.Tensor]


def member_input_gradients(
    ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward each member once on its own copy of the batch and take all input gradients at once.

    Args:
        x: (B, C, H, W) images; y: (B,) labels.
    Returns:
        copies (k, B, C, H, W) leaf inputs, logits (k, B, classes), ce_sum (scalar: sum over
        members and samples of CE), grads (k, B, C, H, W) with
        grads[i, b] = d CE(f_i(x_b), y_b) / d x_b.
    """
    copies, logits, ce_sum, _ = _forward(ensemble, x, y)
    (grads,) = torch.autograd.grad(ce_sum, copies, create_graph=create_graph)
    return copies, logits, ce_sum, grads


def _weighted_terms(
    defense: Defense, inputs: DefenseInputs, hyperparameters: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    return dict(defense.loss_terms(inputs, **hyperparameters))


def exact_step(
    ensemble: Ensemble,
    defense: Defense,
    hyperparameters: Mapping[str, float],
    x: torch.Tensor,
    y: torch.Tensor,
) -> StepOutput:
    """Compute the loss and call ``backward()`` (gradients accumulate into ``.grad``)."""
    k, batch = ensemble.k, x.shape[0]
    if defense.needs_input_gradients:
        _, logits, ce_sum, grads = member_input_gradients(ensemble, x, y, create_graph=True)
    else:
        logits = ensemble.member_logits(x)
        ce_sum = _summed_ce(logits, y)
        grads = None
    ce = ce_sum / (k * batch)
    terms = _weighted_terms(defense, DefenseInputs(x, y, logits, grads), hyperparameters)
    loss = ce + sum(terms.values()) if terms else ce
    loss.backward()
    return StepOutput(loss.detach(), ce.detach(), {n: t.detach() for n, t in terms.items()})


@contextmanager
def frozen_batchnorm_stats(ensemble: Ensemble):
    """Restore every BatchNorm buffer afterwards (the extra pass must not update running stats)."""
    saved = [b.detach().clone() for b in ensemble.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in zip(ensemble.buffers(), saved, strict=True):
                buf.copy_(old)


def finite_diff_step(
    ensemble: Ensemble,
    defense: Defense,
    hyperparameters: Mapping[str, float],
    x: torch.Tensor,
    y: torch.Tensor,
    fd_scale: float = DEFAULT_FD_SCALE,
    fd_scheme: str = "forward",
) -> StepOutput:
    """Like :func:`exact_step` but with a finite-difference Hessian-vector product (see module doc).

    ``fd_scheme``: ``"forward"`` (one extra forward-backward, error O(h)) or ``"central"`` (two
    extra, error O(h^2)). Writes parameter gradients into ``.grad`` (accumulating)."""
    if fd_scheme not in FD_SCHEMES:
        raise UsageError(f"unknown finite-difference scheme '{fd_scheme}'; choose {FD_SCHEMES}")
    if not defense.needs_input_gradients:
        return exact_step(ensemble, defense, hyperparameters, x, y)
    if defense.needs_logits:
        raise UsageError(
            f"--double-backprop finite-diff supports defenses that depend only on input gradients; "
            f"'{defense.name}' also uses the members' outputs: use --double-backprop exact"
        )
    k, batch = ensemble.k, x.shape[0]
    params_by_member = [[p for p in m.parameters() if p.requires_grad] for m in ensemble.members]
    flat_params = [p for ps in params_by_member for p in ps]

    copies, logits, ce_sum, _ = _forward(ensemble, x, y)
    grads_all = torch.autograd.grad(ce_sum, [copies, *flat_params])
    input_grads, grad_at_x = grads_all[0], grads_all[1:]

    g = input_grads.detach().requires_grad_(True)
    with torch.enable_grad():
        terms = _weighted_terms(defense, DefenseInputs(x, y, logits.detach(), g), hyperparameters)
        reg = sum(terms.values()) if terms else g.new_zeros(())
    if terms and reg.requires_grad:
        (v,) = torch.autograd.grad(reg, g)
    else:
        v = torch.zeros_like(g)

    v_norm = v.flatten(1).norm(dim=1)  # (k,)
    x_norm = x.detach().flatten().norm()
    active = v_norm > 0
    h = torch.where(active, fd_scale * x_norm / v_norm.clamp_min(1e-30), torch.ones_like(v_norm))
    step = h.view(-1, *([1] * (copies.dim() - 1))) * v
    base = copies.detach()
    if bool(active.any()):
        grad_plus = _param_grads_at(ensemble, base + step, y, flat_params)
        if fd_scheme == "central":
            grad_minus = _param_grads_at(ensemble, base - step, y, flat_params)
            denominator = 2 * h
        else:
            grad_minus, denominator = grad_at_x, h
    else:
        grad_plus = grad_minus = grad_at_x
        denominator = h

    scale_ce = 1.0 / (k * batch)
    inv = torch.where(active, 1.0 / denominator, torch.zeros_like(denominator))  # (k,)
    index = 0
    for i, params in enumerate(params_by_member):
        for p in params:
            update = grad_at_x[index] * scale_ce + (grad_plus[index] - grad_minus[index]) * inv[i]
            p.grad = update if p.grad is None else p.grad + update
            index += 1
    ce = ce_sum.detach() * scale_ce
    loss = ce + reg.detach()
    return StepOutput(loss, ce, {n: t.detach() for n, t in terms.items()})


def _summed_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over members and samples of CE. logits (k, B, classes) (half precision is promoted to
    float32; float64 stays float64), y (B,)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    k = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="sum")


def _param_grads_at(
    ensemble: Ensemble, inputs: torch.Tensor, y: torch.Tensor, flat_params: list[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Gradients of the summed member CE w.r.t. ``flat_params`` at per-member inputs (k, B, ...),
    leaving BatchNorm running statistics as they were."""
    with frozen_batchnorm_stats(ensemble):
        _, _, ce_sum, _ = _forward(ensemble, None, y, inputs=inputs)
        return torch.autograd.grad(ce_sum, flat_params)


def _forward(
    ensemble: Ensemble, x: torch.Tensor | None, y: torch.Tensor, inputs: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    """Members on their own leaf copies (k, B, ...). Returns copies, logits, ce_sum, None."""
    k = ensemble.k
    if inputs is None:
        copies = x.detach().unsqueeze(0).expand(k, *x.shape).clone().requires_grad_(True)
    else:
        copies = inputs.detach().requires_grad_(True)
    logits = torch.stack([member(copies[i]) for i, member in enumerate(ensemble.members)])
    ce_sum = _summed_ce(logits, y)
    return copies, logits, ce_sum, None


def training_step(
    ensemble: Ensemble,
    defense: Defense,
    hyperparameters: Mapping[str, float],
    x: torch.Tensor,
    y: torch.Tensor,
    double_backprop: str = "exact",
    fd_scale: float = DEFAULT_FD_SCALE,
    fd_scheme: str = "forward",
) -> StepOutput:
    """Dispatch on ``double_backprop`` (``exact`` or ``finite-diff``, whose difference scheme is
    ``fd_scheme``); gradients land in ``.grad``."""
    if double_backprop == "exact":
        return exact_step(ensemble, defense, hyperparameters, x, y)
    if double_backprop == "finite-diff":
        return finite_diff_step(ensemble, defense, hyperparameters, x, y, fd_scale, fd_scheme)
    raise UsageError(
        f"unknown --double-backprop '{double_backprop}'; choose {', '.join(DOUBLE_BACKPROP_MODES)}"
    )
