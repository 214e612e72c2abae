"""Checks on the real datasets in ../shared/data (skipped cleanly when the folder is absent)."""

from __future__ import annotations

import copy

import pytest
import torch

from ncen_cli.data import load_dataset
from ncen_cli.ensemble import build_ensemble
from ncen_cli.layers import BatchNorm2d, Conv2d, use_torch_layers
from ncen_cli.registry import DEFENSES
from ncen_cli.train_step import exact_step

pytestmark = pytest.mark.realdata


def test_fashionmnist_loads_as_uint8_images_with_all_classes(shared_data):
    arrays = load_dataset("fashionmnist", shared_data, False, 512, 256, 0)
    assert arrays.train_x.shape == (512, 1, 28, 28) and arrays.train_x.dtype == torch.uint8
    assert arrays.test_x.shape == (256, 1, 28, 28)
    assert set(arrays.train_y.tolist()) == set(range(10))
    assert arrays.train_x.float().std() > 50  # real images, not blank
    again = load_dataset("fashionmnist", shared_data, False, 512, 256, 0)
    assert torch.equal(again.train_y, arrays.train_y)  # the seeded subset is reproducible


def test_exact_step_on_real_images_equals_the_step_with_torch_layers(shared_data):
    """ncen's fast-double-backward layers give the NCEn parameter gradient that torch's layers
    give, on a real FashionMNIST batch (float64 so that the comparison is tight)."""
    arrays = load_dataset("fashionmnist", shared_data, False, 64, 16, 1)
    x = arrays.train_x.double() / 255
    y = arrays.train_y
    torch.manual_seed(0)
    ours = build_ensemble(["resnet20", "resnet20"], arrays.input_shape, 10).double().train()
    theirs = use_torch_layers(copy.deepcopy(ours))
    assert not any(isinstance(m, (Conv2d, BatchNorm2d)) for m in theirs.modules())
    ncen = DEFENSES.get("ncen")
    hp = {"lambda_cos": 0.5, "lambda_norm": 0.5}
    out_ours = exact_step(ours, ncen, hp, x, y)
    out_theirs = exact_step(theirs, ncen, hp, x, y)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12, msg=name)
