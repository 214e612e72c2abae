"""Conv2d whose double backward is two ordinary convolution kernels.

The input gradient of a convolution is gI = conv_transpose(gO, W). When gI is differentiated
(NCEn's regularizer), with A the gradient arriving at gI:

    d <A, gI> / d gO = conv(A, W)                  (the layer's own forward convolution)
    d <A, gI> / d W  = weight_grad(input=A, grad_output=gO)

torch's generic formula (``_convolution_double_backward``) computes the second as a convolution
of the transposed tensors whose kernel is the whole output map, which on a CPU measured about
2 x slower for a ResNet-20 layer than the weight-gradient kernel used here
(docs/performance.md). The weight and bias gradients, when asked for with ``create_graph`` of a
forward run outside :func:`~ncen_cli.layers.input_gradients_only`, come from torch's
differentiable ``convolution_backward`` as usual.

Forward mode (``--double-backprop jvp``): a dual input (x, T) gives the dual output
(conv(x, W) + b, conv(T, W)), both through :class:`_Conv2dFunction`, so reverse mode through the
tangent uses the same fused kernels as an ordinary backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from ncen_cli.layers.context import parameter_gradients_wanted, split_dual


def _conv_backward(grad_out, x, weight, has_bias, geometry, mask):
    stride, padding, dilation, groups = geometry
    bias_sizes = [weight.shape[0]] if has_bias else None
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask
    )


class _Conv2dFunction(torch.autograd.Function):
    """y = conv2d(x, W, b) with zero padding. x (N, C_in, H, W) -> y (N, C_out, H', W')."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry):
        stride, padding, dilation, groups = geometry
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias = geometry, bias is not None
        ctx.parameter_gradients = parameter_gradients_wanted()  # captured now, not in backward
        return torch.ops.aten.convolution(
            x, weight, bias, stride, padding, dilation, False, [0, 0], groups
        )

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():  # an ordinary backward: torch's fused kernel
            gx, gw, gb = _conv_backward(
                grad_out, x, weight, ctx.has_bias, ctx.geometry, [need_x, need_w, need_b]
            )
            return gx, gw, gb if ctx.has_bias else None, None
        gx = _ConvInputGradient.apply(grad_out, weight, x, ctx.geometry) if need_x else None
        gw = gb = None
        if (need_w or need_b) and ctx.parameter_gradients:
            _, gw, gb = _conv_backward(
                grad_out, x, weight, ctx.has_bias, ctx.geometry, [False, need_w, need_b]
            )
        return gx, gw, gb if ctx.has_bias else None, None


class _ConvInputGradient(torch.autograd.Function):
    """gI = conv_transpose(gO, W) (shape of x), with the two-kernel double backward."""

    @staticmethod
    def forward(ctx, grad_out, weight, x, geometry):
        ctx.save_for_backward(grad_out, weight)
        ctx.geometry = geometry
        return _conv_backward(grad_out, x, weight, False, geometry, [True, False, False])[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gi):
        grad_out, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        d_gout = d_weight = None
        if ctx.needs_input_grad[0]:
            d_gout = torch.ops.aten.convolution(
                grad_gi, weight, None, stride, padding, dilation, False, [0, 0], groups
            )
        if ctx.needs_input_grad[1]:
            d_weight = _conv_backward(
                grad_out, grad_gi, weight, False, ctx.geometry, [False, True, False]
            )[1]
        return d_gout, d_weight, None, None


def _convolve(x: torch.Tensor, weight, bias, geometry) -> torch.Tensor:
    """_Conv2dFunction on an ordinary or a dual (forward-mode) input x."""
    primal, tangent = split_dual(x)
    if tangent is None:
        return _Conv2dFunction.apply(x, weight, bias, geometry)
    y = _Conv2dFunction.apply(primal, weight, bias, geometry)
    return forward_ad.make_dual(y, _Conv2dFunction.apply(tangent, weight, None, geometry))


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` with the fast double backward above for zero padding given as
    integers (other configurations use torch's path). (N, C_in, H, W) -> (N, C_out, H', W').

    Under CPU autocast (``--precision bf16``) the input, weight and bias are cast to the autocast
    dtype, as autocast casts them for torch's convolution, and the same functions run on the cast
    tensors; the parameters' gradients flow back through the casts in float32. Under CUDA
    autocast torch's own path runs (the mixed-dtype path is untested on a GPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain_zero_padding = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if not plain_zero_padding or not torch.is_grad_enabled():
            return super().forward(x)
        geometry = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return _convolve(x, self.weight, self.bias, geometry)
        if device != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            bias = None if self.bias is None else self.bias.to(dtype)
            return _convolve(x.to(dtype), self.weight.to(dtype), bias, geometry)
