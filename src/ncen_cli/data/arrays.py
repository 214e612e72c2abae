"""Local arrays: ``.npz`` files with uint8 ``x`` (N x H x W or N x H x W x C) and int ``y``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ncen_cli.data.base import (
    MAX_CLASSES,
    DatasetSpec,
    ImageArrays,
    check_labels,
)
from ncen_cli.errors import DataUnavailableError, UsageError
from ncen_cli.presets import family_for_channels


def read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one .npz into ((N, C, H, W) uint8, (N,) int64). Checks dtype and shapes."""
    if not path.is_file():
        raise UsageError(f"{path} is not a regular file")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise UsageError(f"{path} is a single .npy array, not an .npz archive of x and y")
            if "x" not in f or "y" not in f:
                raise UsageError(f"{path} must hold arrays 'x' and 'y', it has {sorted(f.files)}")
            x, y = f["x"], f["y"]
    except UsageError:
        raise
    except Exception as exc:  # a damaged archive raises anything from zipfile, numpy or EOFError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot read {path} as .npz: {reason}") from None
    if x.dtype != np.uint8:
        raise UsageError(f"{path}: 'x' must be uint8 images (0-255), got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2) if x.shape[-1] in (1, 3) else x
    else:
        raise UsageError(f"{path}: 'x' must be N x H x W or N x H x W x C, got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"{path}: 'y' must be {len(x)} integer labels, got {y.dtype} {y.shape}")
    if len(x) == 0 or 0 in x.shape[1:]:
        raise UsageError(f"{path}: 'x' holds no images (shape {x.shape})")
    if y.dtype == np.uint64 and int(y.max()) >= MAX_CLASSES:
        raise UsageError(f"{path}: label {int(y.max())} is outside [0, {MAX_CLASSES})")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


def find_split_files(folder: Path, stem: str) -> tuple[Path, Path] | None:
    """Find ``{stem}train*.npz`` and ``{stem}test*.npz`` in ``folder`` (first match, sorted)."""
    train = sorted(folder.glob(f"{stem}train*.npz"))
    test = sorted(folder.glob(f"{stem}test*.npz"))
    if train and test:
        return train[0], test[0]
    return None


def arrays_from_files(name: str, family: str | None, train: Path, test: Path) -> ImageArrays:
    train_x, train_y = read_npz(train)
    test_x, test_y = read_npz(test)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UsageError(
            f"train images {tuple(train_x.shape[1:])} and test images "
            f"{tuple(test_x.shape[1:])} differ in shape"
        )
    check_labels(train_y, None, str(train))
    check_labels(test_y, None, str(test))
    num_classes = max(int(max(train_y.max(), test_y.max())) + 1, 2)
    return ImageArrays(
        name=name,
        family=family or family_for_channels(name, train_x.shape[1]),
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=tuple(str(i) for i in range(num_classes)),
        source=f"{train}, {test}",
    )


def _load(data_dir: Path | None, download: bool) -> ImageArrays:
    if data_dir is None:
        raise UsageError("--dataset npz needs --data-dir DIR holding train*.npz and test*.npz")
    files = find_split_files(data_dir, "")
    if files is None:
        raise DataUnavailableError(f"no train*.npz and test*.npz in {data_dir}")
    return arrays_from_files("npz", None, *files)


NPZ = DatasetSpec(
    name="npz",
    summary="your own arrays: --data-dir with train*.npz and test*.npz (uint8 x, integer y)",
    load=_load,
)
