"""BatchNorm whose double backward is cheap: the dominant cost of an exact NCEn step on a CPU.

NCEn differentiates the members' input gradients, so every BatchNorm layer's *backward* is itself
differentiated. torch's generic double backward of batch norm evaluates a long composite formula
(about 40 full-size tensor passes per layer; in a profile of an exact 3 x resnet20 step it was
30 % of the step). :class:`BatchNorm2d` computes the same derivatives from a closed form derived
for this case (about 15 passes, below), and is otherwise ``torch.nn.BatchNorm2d``: same
parameters, buffers and state-dict keys, same forward values, the same first-order backward (torch's
fused kernel), eval mode untouched.

Derivation (per channel, M = N*H*W values; r = (var + eps)^-1/2, x_hat = (x - mean) r). The first
backward maps the upstream gradient G = dL/dy to

    gx = gamma r (G - mean(G) - x_hat mean(G x_hat)),  g_gamma = sum(G x_hat),  g_beta = sum(G).

Differentiating <A, gx> + a_gamma g_gamma + a_beta g_beta (A, a_gamma, a_beta: the gradients
arriving at gx, g_gamma, g_beta) with d x_hat_j / d x_i = r (delta_ij - 1/M) - r x_hat_i x_hat_j / M
and d r / d x_i = -r^2 x_hat_i / M gives, with m_U = mean(U):

    d/dG     = gamma r (A - m_A - x_hat m_{A x_hat}) + a_gamma x_hat + a_beta
    d/dx     = gamma r^2 [ -m_{G x_hat} (A - m_A) - m_{A x_hat} (G - m_G)
                           + x_hat (3 m_{A x_hat} m_{G x_hat} - m_{AG} + m_A m_G) ]
               + a_gamma r (G - m_G - x_hat m_{G x_hat})
    d/dgamma = r M (m_{AG} - m_A m_G - m_{A x_hat} m_{G x_hat})

Checked against torch's own double backward in float64 (tests/test_layers.py).

Forward mode (``--double-backprop jvp``): the tangent of train-mode batch norm along an input
tangent T is J T = gamma r (T - m_T - x_hat m_{T x_hat}), the first backward's formula for gx
with G = T (the Jacobian with respect to x is self-adjoint). So under a dual tensor the layer
returns the primal from torch's fused forward and the tangent from :class:`_BatchNormBackward`
applied to T, whose closed-form backward above makes the tangent exactly differentiable in
reverse (reverse-over-forward). torch's own ``batch_norm`` forward-mode rule cannot be used for
that: in torch 2.14.1 its second-order JVP in train mode is wrong (pytorch issue 196699).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from ncen_cli.layers.context import parameter_gradients_wanted, split_dual


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) broadcastable against an (N, C, ...) tensor of ``ndim`` dims."""
    return t.view(1, -1, *([1] * (ndim - 2)))


class _BatchNormTrain(torch.autograd.Function):
    """Training-mode batch norm (batch statistics, running statistics updated in place when given).

    Returns y (shape of x) and the batch's per-channel mean and inverse standard deviation (C,),
    the latter two not differentiable (for the forward-mode tangent)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, save_mean, save_invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.eps = eps
        ctx.parameter_gradients = parameter_gradients_wanted()  # captured now, not in backward
        ctx.mark_non_differentiable(save_mean, save_invstd)
        return y, save_mean, save_invstd

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the input gradient will be differentiated
            gx, gw, gb = _BatchNormBackward.apply(
                grad_y, x, weight, mean, invstd, ctx.eps, ctx.parameter_gradients
            )
        else:
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad_y,
                x,
                weight,
                None,
                None,
                mean,
                invstd,
                True,
                ctx.eps,
                [True, weight is not None, weight is not None],
            )
        return gx, gw, gb, None, None, None, None


class _BatchNormBackward(torch.autograd.Function):
    """The first backward (G, x, gamma) -> (gx, g_gamma, g_beta), with the closed-form double
    backward of the module docstring. Its A-part, gamma r (A - m_A - x_hat m_{A x_hat}) with the
    sums of A and A x_hat, is exactly torch's fused first-order kernel applied to A."""

    @staticmethod
    def forward(ctx, grad_y, x, weight, mean, invstd, eps, parameter_gradients):
        ctx.set_materialize_grads(False)
        affine = weight is not None
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, eps, [True, affine, affine]
        )
        if affine:  # sum(G x_hat) and sum(G), reused by the double backward
            ctx.save_for_backward(grad_y, x, weight, mean, invstd, gw.detach(), gb.detach())
        else:
            ctx.save_for_backward(grad_y, x, weight, mean, invstd)
        ctx.eps = eps
        if not parameter_gradients:
            gw = gb = None
        return gx, gw, gb

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gx, grad_gw, grad_gb):
        g, x, weight, mean, invstd, *sums = ctx.saved_tensors
        ndim = x.dim()
        dims = [0, *range(2, ndim)]
        count = x.numel() // x.shape[1]
        r = _channel_view(invstd, ndim)
        x_hat = None
        if sums:
            m_gx, m_g = sums[0] / count, sums[1] / count
        else:
            x_hat = torch.addcmul(_channel_view(-mean * invstd, ndim), x, r)
            m_g, m_gx = g.mean(dims, dtype=mean.dtype), (g * x_hat).mean(dims, dtype=mean.dtype)
        gamma = weight if weight is not None else torch.ones_like(invstd)
        d_g = d_x = d_gamma = None

        if grad_gx is not None:
            a = grad_gx
            # d/dG = gamma r (A - m_A - x_hat m_{A x_hat}): torch's fused kernel, with the sums
            d_g, sum_ax, sum_a = torch.ops.aten.native_batch_norm_backward(
                a, x, gamma, None, None, mean, invstd, True, ctx.eps, [True, True, True]
            )
            m_a, m_ax = sum_a / count, sum_ax / count
            m_ag = (a * g).sum(dims, dtype=mean.dtype) / count  # float32 sums for bf16 inputs
            gr2 = gamma * invstd * invstd
            c3 = 3 * m_ax * m_gx - m_ag + m_a * m_g
            # d/dx = gamma r^2 [-m_Gx A - m_Ax G + x_hat c3 + m_Gx m_A + m_Ax m_G] written in x
            constant = gr2 * (m_gx * m_a + m_ax * m_g - mean * invstd * c3)
            d_x = torch.addcmul(_channel_view(constant, ndim), a, _channel_view(-gr2 * m_gx, ndim))
            d_x.addcmul_(g, _channel_view(-gr2 * m_ax, ndim))
            d_x.addcmul_(x, _channel_view(gr2 * invstd * c3, ndim))
            if weight is not None:
                d_gamma = invstd * count * (m_ag - m_a * m_g - m_ax * m_gx)
        if grad_gw is not None:
            if x_hat is None:
                x_hat = torch.addcmul(_channel_view(-mean * invstd, ndim), x, r)
            w = _channel_view(grad_gw, ndim)
            term = x_hat * w
            d_g = term if d_g is None else d_g.add_(term)
            part = (g - _channel_view(m_g, ndim)).addcmul_(x_hat, _channel_view(-m_gx, ndim))
            part.mul_(w * r)
            d_x = part if d_x is None else d_x.add_(part)
        if grad_gb is not None:
            b = _channel_view(grad_gb, ndim).expand_as(g)
            d_g = b.clone() if d_g is None else d_g.add_(b)
        return d_g, d_x, d_gamma, None, None, None, None


def _batch_norm_dual(
    x: torch.Tensor, weight, bias, running_mean, running_var, momentum: float, eps: float
) -> torch.Tensor:
    """Train-mode batch norm of a dual tensor x: primal by torch's fused kernel, tangent by the
    self-adjoint first backward (module doc), both differentiable in reverse."""
    primal, tangent = split_dual(x)
    y, mean, invstd = _BatchNormTrain.apply(
        primal, weight, bias, running_mean, running_var, momentum, eps
    )
    y_tangent = _BatchNormBackward.apply(
        tangent, primal, weight, mean, invstd, eps, parameter_gradients_wanted()
    )[0]
    return forward_ad.make_dual(y, y_tangent)


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with a cheap double backward in training mode and a forward-mode
    rule that is exactly differentiable in reverse (see module doc).

    Shapes: (N, C, H, W) -> (N, C, H, W). Eval mode, ``track_running_stats=False`` and CUDA
    autocast use torch's own path, except for a dual (forward-mode) input in training mode,
    which always takes ncen's path (torch's is wrong there). Under CPU autocast a bf16 input is
    normalised with the float32 parameters and statistics, as torch's batch norm does (batch norm
    is not an autocast-cast op); the double backward's per-channel sums are taken in float32 and
    its input-sized results are cast back to the input's dtype by autograd."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        batch_statistics = self.training or self.running_mean is None
        if batch_statistics and split_dual(x)[1] is not None:
            return self._forward_dual(x)
        if not (
            self.training
            and self.track_running_stats
            and torch.is_grad_enabled()
            and (device == "cpu" or not torch.is_autocast_enabled(device))
        ):
            return super().forward(x)
        self._check_input_dim(x)
        tracked = self.num_batches_tracked
        assert tracked is not None  # a buffer whenever track_running_stats
        tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average
            momentum = 1.0 / float(tracked)
        return _BatchNormTrain.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, momentum, self.eps
        )[0]

    def _forward_dual(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        track = self.training and self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if track:
            tracked = self.num_batches_tracked
            assert tracked is not None  # a buffer whenever track_running_stats
            tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(tracked)
        running = (self.running_mean, self.running_var) if track else (None, None)
        return _batch_norm_dual(x, self.weight, self.bias, *running, momentum, self.eps)
