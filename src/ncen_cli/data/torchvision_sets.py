"""FashionMNIST and CIFAR-10 through torchvision (downloaded into the cache, or from --data-dir).

With ``--data-dir DIR`` the files are read from DIR in torchvision's layout
(``DIR/FashionMNIST/raw/*-ubyte``, ``DIR/cifar-10-batches-py/``), or from arrays
``DIR/<name>_train*.npz`` and ``DIR/<name>_test*.npz``; nothing is downloaded into a folder the user
names. Without it, files go to the platformdirs cache (``ncen env`` prints where), downloaded once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch

from ncen_cli import paths
from ncen_cli.data.arrays import arrays_from_files, find_split_files
from ncen_cli.data.base import DatasetSpec, ImageArrays
from ncen_cli.errors import DataUnavailableError

FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DOWNLOAD_TIMEOUT_S = 20.0


def _offline() -> bool:
    return os.environ.get("NCEN_OFFLINE", "").lower() in ("1", "true", "yes")


def _torchvision_load(cls_name: str, root: Path, download: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        train = cls(root=str(root), train=True, download=download)
        test = cls(root=str(root), train=False, download=download)
    finally:
        socket.setdefaulttimeout(old_timeout)
    return train, test


def _load(name: str, cls_name: str, classes: tuple[str, ...], marker: str):
    def load(data_dir: Path | None, download: bool) -> ImageArrays:
        if data_dir is not None:
            files = find_split_files(data_dir, f"{name}_")
            if not (data_dir / marker).exists() and files is not None:
                arrays = arrays_from_files(name, name, *files)
                return ImageArrays(**{**arrays.__dict__, "classes": classes})
            root, may_download = data_dir, False
        else:
            root, may_download = paths.cache_dir(), download and not _offline()
        hint = (
            f"{name} is not in {root}: put torchvision's files there ({marker}/...) or "
            f"{name}_train.npz/{name}_test.npz, or pass --data-dir DIR"
        )
        if not may_download and not (root / marker).exists():
            raise DataUnavailableError(hint)
        present = (root / marker).exists()
        try:
            train, test = _torchvision_load(cls_name, root, may_download)
        except Exception as exc:  # network errors, checksum failures, missing or damaged files
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if present:
                raise DataUnavailableError(
                    f"{name} files in {root / marker} are unreadable or damaged ({reason}); "
                    "replace them (or delete them to download again)"
                ) from None
            raise DataUnavailableError(f"{hint} (download failed: {reason})") from None
        return ImageArrays(
            name=name,
            family=name,
            train_x=_as_nchw(train.data),
            train_y=torch.as_tensor(np.asarray(train.targets), dtype=torch.int64),
            test_x=_as_nchw(test.data),
            test_y=torch.as_tensor(np.asarray(test.targets), dtype=torch.int64),
            classes=classes,
            source=str(root),
        )

    return load


def _as_nchw(data) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
    return x[:, None].contiguous() if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


FASHIONMNIST = DatasetSpec(
    name="fashionmnist",
    summary="FashionMNIST 28x28 grey, 60k/10k (torchvision)",
    load=_load("fashionmnist", "FashionMNIST", FASHION_CLASSES, "FashionMNIST"),
    family="fashionmnist",
)
CIFAR10 = DatasetSpec(
    name="cifar10",
    summary="CIFAR-10 32x32 colour, 50k/10k (torchvision)",
    load=_load("cifar10", "CIFAR10", CIFAR_CLASSES, "cifar-10-batches-py"),
    family="cifar10",
)
