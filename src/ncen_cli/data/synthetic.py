"""A tiny, deterministic, learnable dataset for tests: class-specific stripe patterns plus noise."""

from __future__ import annotations

from pathlib import Path

import torch

from ncen_cli.data.base import DatasetSpec, ImageArrays

SIZE = 12
NUM_CLASSES = 4


def make_arrays(n_train: int = 256, n_test: int = 128, seed: int = 0) -> ImageArrays:
    """(N, 1, 12, 12) uint8 images; class c has a bright bar at row/column 3c and noise."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % NUM_CLASSES
        x = torch.rand(n, 1, SIZE, SIZE, generator=gen) * 0.35
        for c in range(NUM_CLASSES):
            rows = y == c
            x[rows, 0, 3 * c : 3 * c + 2, :] += 0.6
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    return ImageArrays(
        name="synthetic",
        family="fashionmnist",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=tuple(f"class{c}" for c in range(NUM_CLASSES)),
        source="generated",
    )


def _load(data_dir: Path | None, download: bool) -> ImageArrays:
    return make_arrays()


SYNTHETIC = DatasetSpec(
    name="synthetic",
    summary="tiny deterministic 12x12 stripes, 4 classes (for tests)",
    load=_load,
    family="fashionmnist",
)
