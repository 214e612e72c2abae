"""Datasets (``ncen.datasets`` entry points) and the in-memory batch pipeline."""

from ncen_cli.data.base import DatasetSpec, ImageArrays, load_dataset
from ncen_cli.data.pipeline import AugmentConfig, iterate_batches, to_float

__all__ = [
    "AugmentConfig",
    "DatasetSpec",
    "ImageArrays",
    "iterate_batches",
    "load_dataset",
    "to_float",
]
