"""The paper's per-dataset presets: one table, used by training and evaluation; a dataset outside
the paper's families gets a logged fallback, never a silent one."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ncen_cli.data import load_dataset
from ncen_cli.evaluation import paper_protocol, protocol_eps
from ncen_cli.presets import PAPER_EPS, TRAINING, family_for_channels, training_preset


def test_paper_training_presets():
    """Section IV of the paper: 40 / 60 epochs, noise eps 0.3 / 0.09."""
    assert (TRAINING["fashionmnist"].epochs, TRAINING["fashionmnist"].noise_eps) == (40, 0.3)
    assert (TRAINING["cifar10"].epochs, TRAINING["cifar10"].noise_eps) == (60, 0.09)


def test_the_paper_protocol_reads_the_eps_table():
    assert protocol_eps("cifar10") == [0.01, 0.02, 0.03, 0.09]
    runs = paper_protocol("fashionmnist")
    assert {(r.attack, r.settings.eps) for r in runs} == {
        (attack, eps) for attack, values in PAPER_EPS["fashionmnist"].items() for eps in values
    }


def test_known_family_is_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="ncen.presets"):
        assert training_preset("cifar10") is TRAINING["cifar10"]
    assert not caplog.records


def test_unknown_family_falls_back_with_one_warning_naming_it(caplog):
    with caplog.at_level(logging.WARNING, logger="ncen.presets"):
        preset = training_preset("svhn")
    assert preset is TRAINING["fashionmnist"]
    (record,) = caplog.records
    message = record.getMessage()
    assert "'svhn' has no paper presets; using fashionmnist's (epochs 40" in message
    assert "\n" not in message


@pytest.mark.parametrize(("channels", "family"), [(1, "fashionmnist"), (3, "cifar10")])
def test_a_dataset_without_family_is_never_assigned_one_silently(
    tmp_path, caplog, channels, family
):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        x = rng.integers(0, 256, (6, 8, 8, channels), dtype=np.uint8)
        np.savez(tmp_path / f"{split}.npz", x=x if channels == 3 else x[..., 0], y=np.arange(6) % 2)
    with caplog.at_level(logging.WARNING, logger="ncen.presets"):
        arrays = load_dataset("npz", tmp_path, download=False)
    assert arrays.family == family
    assert [r.getMessage() for r in caplog.records] == [
        f"dataset npz names no family; using {family}'s paper presets ({channels}-channel images)"
    ]
    assert family_for_channels("x", channels) == family
