"""The dataset contract: what an ``ncen.datasets`` entry point must be."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ncen_cli.errors import UsageError

# Paper settings per dataset family: augmentation, D_noise epsilon, epochs.
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "fashionmnist": {"crop_padding": 4, "flip": False, "noise_eps": 0.3, "epochs": 40},
    "cifar10": {"crop_padding": 4, "flip": True, "noise_eps": 0.09, "epochs": 60},
}


@dataclass(frozen=True)
class ImageArrays:
    """A train/test split held in memory as uint8 images.

    Attributes:
        name: dataset name as registered.
        family: ``"fashionmnist"`` or ``"cifar10"``: whose paper settings (augmentation, noise,
            attack epsilons, defense hyperparameters) apply.
        train_x / test_x: (N, C, H, W) uint8 images (0-255).
        train_y / test_y: (N,) int64 class ids in [0, num_classes).
        classes: class names, len == num_classes.
    """

    name: str
    family: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def limited(self, train_limit: int | None, test_limit: int | None, seed: int) -> ImageArrays:
        """Seeded random subsets of at most ``train_limit`` / ``test_limit`` examples."""
        return replace(
            self,
            **_subset("train", self.train_x, self.train_y, train_limit, seed),
            **_subset("test", self.test_x, self.test_y, test_limit, seed + 1),
        )


def _subset(split: str, x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int) -> dict:
    if limit is None or limit >= len(x):
        return {f"{split}_x": x, f"{split}_y": y}
    if limit < 1:
        raise UsageError(f"--{split}-limit must be >= 1, got {limit}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
    idx, _ = idx.sort()
    return {f"{split}_x": x[idx], f"{split}_y": y[idx]}


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    Attributes:
        name: registry name (``--dataset NAME``).
        summary: one line for ``ncen plugins``.
        load: ``load(data_dir: Path | None, download: bool) -> ImageArrays``; must raise
            :class:`ncen_cli.errors.DataUnavailableError` with a one-line hint when files are
            missing and cannot be fetched.
        family: default paper family for settings (see :data:`FAMILY_DEFAULTS`).
    """

    name: str
    summary: str
    load: Callable[[Path | None, bool], ImageArrays]
    family: str = "fashionmnist"
    extra: dict = field(default_factory=dict)


def family_for_channels(channels: int) -> str:
    return "fashionmnist" if channels == 1 else "cifar10"


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = True,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
) -> ImageArrays:
    """Load a registered dataset, optionally seeded subsets of it.

    Raises UsageError (unknown name, bad folder) or DataUnavailableError (files missing).
    """
    from ncen_cli.registry import DATASETS

    spec: DatasetSpec = DATASETS.get(name)
    folder = Path(data_dir).expanduser() if data_dir else None
    if folder is not None and not folder.is_dir():
        raise UsageError(f"--data-dir {folder} is not a folder")
    arrays = spec.load(folder, download)
    return arrays.limited(train_limit, test_limit, seed)
