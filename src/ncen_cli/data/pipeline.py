"""The in-memory training pipeline: seeded order, random crop / flip, and D + D_noise.

Everything random is drawn from a generator seeded by (seed, epoch), so an epoch's batches are
reproducible and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation.

    Attributes:
        crop_padding: random crop after zero-padding by this many pixels (0: off).
        flip: random horizontal flip.
        noise_sigma: if > 0, the epoch holds D + D_noise: every image once clean and once with
            Gaussian noise N(0, sigma^2) added then clipped to [0, 1] (paper: sigma = eps / 2).
            As in the authors' code, the noisy copies are neither cropped nor flipped, and their
            noise is drawn afresh every epoch (from the epoch's (seed, epoch) generator).
    """

    crop_padding: int = 0
    flip: bool = False
    noise_sigma: float = 0.0


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]."""
    return x.float().div_(255.0)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset per image. (B, C, H, W) -> same."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    return padded[
        torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    seed: int,
    epoch: int,
    augment: AugmentConfig | None = None,
    device: torch.device | str = "cpu",
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield shuffled, augmented training batches for one epoch.

    Args:
        x: (N, C, H, W) uint8 images; y: (N,) labels.
        batch_size: the global batch size; with ``world_size`` > 1 each rank gets its contiguous
            share of every global batch (so N ranks together see the batches one process would).
    Yields:
        (B, C, H, W) float32 images in [0, 1] on ``device`` and (B,) int64 labels.
    """
    augment = augment or AugmentConfig()
    gen = epoch_generator(seed, epoch)
    n = len(x)
    copies = 2 if augment.noise_sigma > 0 else 1
    order = torch.randperm(n * copies, generator=gen)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        noisy = (idx >= n)[:, None, None, None]
        plain = to_float(x[idx % n])
        yb = y[idx % n]
        xb = plain
        if augment.crop_padding > 0:
            xb = random_crop(xb, augment.crop_padding, gen)
        if augment.flip:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        if copies == 2:  # D_noise: the unaugmented image plus fresh noise, clipped
            noise = torch.randn(xb.shape, generator=gen) * augment.noise_sigma
            xb = torch.where(noisy, (plain + noise).clamp_(0, 1), xb)
        if world_size > 1:
            share = torch.tensor_split(torch.arange(len(idx)), world_size)[rank]
            xb, yb = xb[share], yb[share]
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def iterate_eval_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Test batches in order: (B, C, H, W) float32 in [0, 1] and (B,) labels on ``device``."""
    for start in range(0, len(x), batch_size):
        yield (
            to_float(x[start : start + batch_size]).to(device),
            y[start : start + batch_size].to(device),
        )
