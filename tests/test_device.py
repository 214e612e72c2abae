"""The device manager: ``--precision`` and its checks."""

from __future__ import annotations

import pytest
import torch

from ncen_cli import device as device_module
from ncen_cli.device import Runtime
from ncen_cli.errors import UsageError


def conv_output_dtype(conv: torch.nn.Module) -> torch.dtype:
    return conv(torch.rand(1, 1, 5, 5)).dtype


def test_bf16_on_a_cpu_with_native_bfloat16_autocasts_only_the_training_step(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    runtime = Runtime.create("cpu", "bf16")
    conv = torch.nn.Conv2d(1, 2, 3)
    with runtime.autocast():
        assert conv_output_dtype(conv) == torch.bfloat16
    assert conv_output_dtype(conv) == torch.float32  # evaluation runs outside the step
    assert conv.weight.dtype == torch.float32  # parameters stay float32
    assert runtime.describe()["precision"] == "bf16"


def test_bf16_on_a_cpu_without_native_bfloat16_is_refused(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(UsageError, match="needs native bfloat16 .* use --precision fp32"):
        Runtime.create("cpu", "bf16")


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_other_precisions_do_not_autocast_on_cpu(precision):
    runtime = Runtime.create("cpu", precision)
    with runtime.autocast():
        assert not torch.is_autocast_enabled("cpu")
        assert conv_output_dtype(torch.nn.Conv2d(1, 2, 3)) == torch.float32


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown --precision 'fp8'"):
        Runtime.create("cpu", "fp8")
