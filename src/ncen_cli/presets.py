"""The paper's per-dataset settings, in one place.

A dataset belongs to a *family* (``ImageArrays.family``): the paper dataset whose settings apply
to it. The paper (Zhang et al. 2022) trains and evaluates on two:

* training (section IV): 40 epochs on FashionMNIST, 60 on CIFAR-10; D + D_noise with noise
  epsilon 0.3 / 0.09 (sigma = eps / 2); random crops with 4 pixels of padding, horizontal flips on
  CIFAR-10 only;
* evaluation (Table II): the white-box attacks' eps values, :data:`PAPER_EPS`.

The defenses' per-dataset hyperparameters live in their :class:`~ncen_cli.defenses.base.
Hyperparameter` tables. A dataset of another family (your own ``npz`` arrays, a plugin dataset)
has no paper settings: give the values explicitly (``--epochs``, ``--noise-eps``, ``--eps``), or
ncen falls back to the FashionMNIST presets and logs one warning line that names the fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("ncen.presets")

FALLBACK_FAMILY = "fashionmnist"


@dataclass(frozen=True)
class TrainingPreset:
    """The paper's training settings for one family.

    Attributes:
        epochs: training epochs.
        noise_eps: D_noise epsilon (Gaussian noise with sigma = noise_eps / 2).
        crop_padding: random-crop padding in pixels (0: no crop).
        flip: random horizontal flips.
    """

    epochs: int
    noise_eps: float
    crop_padding: int
    flip: bool


TRAINING: dict[str, TrainingPreset] = {
    "fashionmnist": TrainingPreset(epochs=40, noise_eps=0.3, crop_padding=4, flip=False),
    "cifar10": TrainingPreset(epochs=60, noise_eps=0.09, crop_padding=4, flip=True),
}

# Table II of the paper: per family, the white-box attacks' eps values.
PAPER_EPS: dict[str, dict[str, tuple[float, ...]]] = {
    "fashionmnist": {
        "fgsm": (0.1, 0.3),
        "mifgsm": (0.1, 0.3),
        "pgd": (0.1, 0.15),
        "bim": (0.1, 0.15),
    },
    "cifar10": {
        "fgsm": (0.03, 0.09),
        "mifgsm": (0.03, 0.09),
        "pgd": (0.01, 0.02),
        "bim": (0.01, 0.02),
    },
}

FAMILIES = tuple(TRAINING)


def training_preset(family: str) -> TrainingPreset:
    """The paper's training settings for ``family``; for a family the paper does not cover, the
    FashionMNIST settings with one warning line naming them (give ``--epochs`` and
    ``--noise-eps`` to choose your own)."""
    if family in TRAINING:
        return TRAINING[family]
    preset = TRAINING[FALLBACK_FAMILY]
    log.warning(
        "dataset family '%s' has no paper presets; using %s's (epochs %d, noise eps %g, "
        "crop padding %d, flip %s) where --epochs/--noise-eps are not given",
        family,
        FALLBACK_FAMILY,
        preset.epochs,
        preset.noise_eps,
        preset.crop_padding,
        preset.flip,
    )
    return preset


def family_for_channels(dataset: str, channels: int) -> str:
    """The family whose presets a dataset without one gets: ``fashionmnist`` for 1-channel
    images, ``cifar10`` for others; logs one warning line naming the choice, so that a 3-channel
    dataset never becomes "cifar10" silently."""
    family = "fashionmnist" if channels == 1 else "cifar10"
    log.warning(
        "dataset %s names no family; using %s's paper presets (%d-channel images)",
        dataset,
        family,
        channels,
    )
    return family
