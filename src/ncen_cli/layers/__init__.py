"""Layers with a fast double backward, used by ncen's architectures.

NCEn differentiates the members' input gradients, so the backward pass of every layer is itself
differentiated. For convolutions and batch norm, torch's generic double-backward formulas are
far slower than they need to be on a CPU (a convolution's: it computes the weight gradient as a
convolution whose kernel is the whole feature map). :class:`Conv2d` and :class:`BatchNorm2d` are
drop-in subclasses of torch's layers (same parameters, buffers, state-dict keys, forward values
and first-order gradients) whose double backward is written out by hand; see each module's
docstring for the formulas, and tests/test_layers.py for the checks against torch's own double
backward and finite differences.

:func:`input_gradient_pass` marks a ``torch.autograd.grad(..., create_graph=True)`` taken with
respect to the *inputs only*: inside it the layers do not build graphs for parameter gradients
that nobody asked for (torch's own layers know this from the engine; a custom autograd Function
does not).
"""

from torch import nn

from ncen_cli.layers.batchnorm import BatchNorm2d
from ncen_cli.layers.context import input_gradient_pass
from ncen_cli.layers.conv import Conv2d


def use_torch_layers(module: nn.Module) -> nn.Module:
    """Turn every ncen :class:`Conv2d` / :class:`BatchNorm2d` inside ``module`` back into torch's
    ``nn.Conv2d`` / ``nn.BatchNorm2d``, in place (same parameters and buffers; only the classes
    change), and return ``module``. For comparisons with torch's own double backward (the
    benchmark's reference, tests)."""
    for sub in module.modules():
        if isinstance(sub, BatchNorm2d):
            sub.__class__ = nn.BatchNorm2d
        elif isinstance(sub, Conv2d):
            sub.__class__ = nn.Conv2d
    return module


__all__ = ["BatchNorm2d", "Conv2d", "input_gradient_pass", "use_torch_layers"]
