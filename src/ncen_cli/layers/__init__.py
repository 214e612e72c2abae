"""Layers with a fast double backward, used by ncen's architectures.

NCEn differentiates the members' input gradients, so the backward pass of every layer is itself
differentiated. For convolutions and batch norm, torch's generic double-backward formulas are
far slower than they need to be on a CPU (a convolution's: it computes the weight gradient as a
convolution whose kernel is the whole feature map). :class:`Conv2d` and :class:`BatchNorm2d` are
drop-in subclasses of torch's layers (same parameters, buffers, state-dict keys, forward values
and first-order gradients) whose double backward is written out by hand; see each module's
docstring for the formulas, and tests/test_layers.py for the checks against torch's own double
backward and finite differences.

:func:`input_gradients_only` marks a member's forward pass whose ``torch.autograd.grad(...,
create_graph=True)`` will be taken with respect to the *inputs only*: the layers then do not build
graphs for parameter gradients that nobody asked for (torch's own layers know this from the
engine; a custom autograd Function does not). The switch is captured per layer call when the
forward runs, so members run concurrently on other threads are unaffected.

:func:`forward_mode_layers` prepares a module for forward-mode AD differentiated in reverse
(``--double-backprop jvp``): torch's own train-mode batch norm has a wrong second-order JVP in
torch 2.14.1 (pytorch issue 196699), so its ``nn.BatchNorm2d`` layers run as ncen's meanwhile, and
other train-mode normalisation layers built on it are refused.
"""

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from ncen_cli.layers.batchnorm import BatchNorm2d
from ncen_cli.layers.context import input_gradients_only
from ncen_cli.layers.conv import Conv2d


def use_torch_layers(module: nn.Module) -> nn.Module:
    """Turn every ncen :class:`Conv2d` / :class:`BatchNorm2d` inside ``module`` back into torch's
    ``nn.Conv2d`` / ``nn.BatchNorm2d``, in place (same parameters and buffers; only the classes
    change), and return ``module``. For comparisons with torch's own double backward (the
    benchmark's reference, tests)."""
    for sub in module.modules():
        torch_class: type[nn.Module] | None = None
        if isinstance(sub, BatchNorm2d):
            torch_class = nn.BatchNorm2d
        elif isinstance(sub, Conv2d):
            torch_class = nn.Conv2d
        if torch_class is not None:
            sub.__class__ = torch_class
    return module


@contextmanager
def forward_mode_layers(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within this block every torch ``nn.BatchNorm2d`` inside ``modules`` runs as ncen's
    :class:`BatchNorm2d` (same parameters, buffers and values; the classes are restored on exit).

    Raises UsageError naming the first other batch- or instance-norm layer that normalises with
    batch statistics (its forward-mode rule is torch's, wrong in reverse)."""
    from ncen_cli.errors import UsageError

    swapped = []
    try:
        for module in modules:
            for name, sub in module.named_modules():
                if type(sub) is nn.BatchNorm2d:
                    sub.__class__ = BatchNorm2d
                    swapped.append(sub)
                elif _uses_torch_batch_statistics(sub):
                    raise UsageError(
                        f"--double-backprop jvp does not support layer '{name}' "
                        f"({type(sub).__module__}.{type(sub).__qualname__}): torch's forward-mode "
                        "rule for it is wrong in train mode; use ncen_cli.layers.BatchNorm2d "
                        "or --double-backprop exact"
                    )
        yield
    finally:
        for sub in swapped:
            sub.__class__ = nn.BatchNorm2d


def _uses_torch_batch_statistics(module: nn.Module) -> bool:
    """A torch batch/instance norm (not ncen's) that normalises with batch statistics."""
    if isinstance(module, BatchNorm2d):
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.training or module.running_mean is None
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return module.training or not module.track_running_stats
    return False


__all__ = [
    "BatchNorm2d",
    "Conv2d",
    "forward_mode_layers",
    "input_gradients_only",
    "use_torch_layers",
]
