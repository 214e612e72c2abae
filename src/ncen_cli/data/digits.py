"""Real handwritten digits shipped inside scikit-learn: 1,797 8x8 grey images, no network needed.

Used by the quick start. A fixed, seeded split gives 1,437 training and 360 test images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ncen_cli.data.base import DatasetSpec, ImageArrays
from ncen_cli.errors import DataUnavailableError

TEST_SIZE = 360


def _load(data_dir: Path | None, download: bool) -> ImageArrays:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataUnavailableError(
            "the digits dataset needs scikit-learn: pip install scikit-learn"
        ) from None
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)  # (N, 8, 8), values 0..16
    x = (images * (255.0 / 16.0)).round().to(torch.uint8)[:, None]
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1797))
    test, train = order[:TEST_SIZE].sort().values, order[TEST_SIZE:].sort().values
    return ImageArrays(
        name="digits",
        family="fashionmnist",
        train_x=x[train],
        train_y=y[train],
        test_x=x[test],
        test_y=y[test],
        classes=tuple(str(i) for i in range(10)),
        source="scikit-learn load_digits (bundled)",
    )


DIGITS = DatasetSpec(
    name="digits",
    summary="real 8x8 handwritten digits bundled with scikit-learn (no network), 1437/360",
    load=_load,
    family="fashionmnist",
)
