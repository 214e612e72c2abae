"""Shared fixtures: offline mode, temporary run folders, tiny ensembles, the real-data path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(
    os.environ.get(
        "NCEN_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
).resolve()

requires_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "FashionMNIST" / "raw").is_dir(),
    reason="real data (../shared/data) is not present",
)


@pytest.fixture
def shared_data() -> Path:
    """The real-data folder (../shared/data or $NCEN_SHARED_DATA); skips the test without it."""
    if not (SHARED_DATA / "FashionMNIST" / "raw").is_dir():
        pytest.skip("real data (../shared/data) is not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Never download; keep runs and caches out of the user's folders."""
    base = tmp_path_factory.mktemp("ncen-home")
    monkeypatch.setenv("NCEN_OFFLINE", "1")
    monkeypatch.setenv("NCEN_RUNS_DIR", str(base / "runs"))
    monkeypatch.setenv("NCEN_CACHE_DIR", str(base / "cache"))
    monkeypatch.delenv("NCEN_DATA_DIR", raising=False)
    torch.set_num_threads(1)


@pytest.fixture
def synthetic_arrays():
    from ncen_cli.data.synthetic import make_arrays

    return make_arrays()


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A 2-member ensemble trained one epoch on the synthetic dataset."""
    from ncen_cli.training import TrainConfig, train

    config = TrainConfig(
        members=["resnet20", "resnet20"],
        dataset="synthetic",
        defense="ncen",
        epochs=1,
        batch_size=32,
        train_limit=64,
        test_limit=32,
        device="cpu",
    )
    out = tmp_path / "tiny.safetensors"
    train(config, out)
    return out


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        help="run the fuzz suite (tests/test_fuzz.py) with 300 random cases per generator "
        "instead of CI's 12 derandomized ones (same as NCEN_FUZZ=long); for releases",
    )


def pytest_configure(config):
    if config.getoption("--fuzz-long", default=False):
        os.environ["NCEN_FUZZ"] = "long"
