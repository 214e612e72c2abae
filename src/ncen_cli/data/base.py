"""The dataset contract: what an ``ncen.datasets`` entry point must be."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, cast

import torch

from ncen_cli.errors import UsageError

MAX_CLASSES = 100_000  # more labels than this is a broken file, not a dataset
MAX_CHANNELS = 16


@dataclass(frozen=True)
class ImageArrays:
    """A train/test split held in memory as uint8 images.

    Attributes:
        name: dataset name as registered.
        family: whose paper settings (augmentation, noise, attack epsilons, defense
            hyperparameters) apply: ``"fashionmnist"`` or ``"cifar10"`` (:mod:`ncen_cli.presets`);
            any other family needs explicit values or gets the logged fallback.
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
        # cast: validate_arrays checked that the images are (N, C, H, W)
        return cast(tuple[int, int, int], tuple(self.train_x.shape[1:]))

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


class DatasetLoader(Protocol):
    """:attr:`DatasetSpec.load`: ``load(data_dir, download) -> ImageArrays``, the arguments passed
    by position (name them as you like)."""

    def __call__(self, data_dir: Path | None, download: bool, /) -> ImageArrays:
        """The whole dataset; ``data_dir`` is the user's ``--data-dir`` (None: the default
        folder), ``download`` whether fetching missing files is allowed. Raises
        :class:`ncen_cli.errors.DataUnavailableError` (one-line hint) when files are missing."""
        ...


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    Attributes:
        name: registry name (``--dataset NAME``).
        summary: one line for ``ncen plugins``.
        load: ``load(data_dir: Path | None, download: bool) -> ImageArrays``; must raise
            :class:`ncen_cli.errors.DataUnavailableError` with a one-line hint when files are
            missing and cannot be fetched.
        family: default paper family for settings (see :mod:`ncen_cli.presets`).
    """

    name: str
    summary: str
    load: DatasetLoader
    family: str = "fashionmnist"
    extra: dict = field(default_factory=dict)


def check_labels(y: torch.Tensor, num_classes: int | None, source: str) -> None:
    """UsageError unless ``y`` is a non-empty 1-D integer tensor with labels in
    ``[0, num_classes)`` (``num_classes`` None: ``[0, MAX_CLASSES)``)."""
    if y.ndim != 1 or y.numel() == 0 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise UsageError(
            f"{source}: labels must be a non-empty list of integers, got {y.dtype} {tuple(y.shape)}"
        )
    high = MAX_CLASSES if num_classes is None else num_classes
    low_seen, high_seen = int(y.min()), int(y.max())
    if low_seen < 0 or high_seen >= high:
        bad = low_seen if low_seen < 0 else high_seen
        raise UsageError(
            f"{source}: label {bad} is outside [0, {high}) "
            + ("" if num_classes is None else f"for its {num_classes} classes")
        )


def validate_arrays(arrays: object, source: str) -> ImageArrays:
    """Check what a dataset loader returned (built-in or plugin) before anything trains on it:
    an :class:`ImageArrays` with non-empty uint8 (N, C, H, W) images, as many int64 labels as
    images, labels in ``[0, num_classes)``, train and test of one image shape, 2 or more classes.
    Raises UsageError naming ``source`` and the first problem."""
    if not isinstance(arrays, ImageArrays):
        raise UsageError(f"{source}: the loader returned {type(arrays).__name__}, not ImageArrays")
    if not 2 <= arrays.num_classes <= MAX_CLASSES:
        raise UsageError(f"{source}: {arrays.num_classes} classes; need 2 to {MAX_CLASSES}")
    for split in ("train", "test"):
        x, y = getattr(arrays, f"{split}_x"), getattr(arrays, f"{split}_y")
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise UsageError(f"{source}: {split} images and labels must be tensors")
        if x.dtype != torch.uint8 or x.ndim != 4 or not 1 <= x.shape[1] <= MAX_CHANNELS:
            raise UsageError(
                f"{source}: {split} images must be uint8 (N, C, H, W), got "
                f"{x.dtype} {tuple(x.shape)}"
            )
        if x.shape[0] == 0 or min(x.shape[2:]) == 0:
            raise UsageError(f"{source}: the {split} split holds no images")
        if y.shape != (x.shape[0],):
            raise UsageError(
                f"{source}: {x.shape[0]} {split} images but labels of shape {tuple(y.shape)}"
            )
        check_labels(y, arrays.num_classes, f"{source} ({split} labels)")
    if arrays.train_x.shape[1:] != arrays.test_x.shape[1:]:
        raise UsageError(
            f"{source}: train images {tuple(arrays.train_x.shape[1:])} and test "
            f"images {tuple(arrays.test_x.shape[1:])} differ in shape"
        )
    return arrays


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
    arrays = validate_arrays(spec.load(folder, download), f"dataset {name}")
    return arrays.limited(train_limit, test_limit, seed)
