"""The training loop: loss goes down, the checkpoint round-trips, runs are reproducible."""

from __future__ import annotations

import math

import pytest
import torch

from ncen_cli import device as device_module
from ncen_cli.checkpoint import load_ensemble, read_metadata
from ncen_cli.data.pipeline import AugmentConfig, epoch_generator, iterate_batches
from ncen_cli.errors import UsageError
from ncen_cli.presets import TRAINING
from ncen_cli.training import TrainConfig, learning_rate, train


def config(**kw) -> TrainConfig:
    base = dict(
        members=["resnet20", "resnet20"],
        dataset="synthetic",
        defense="ncen",
        epochs=2,
        batch_size=32,
        train_limit=128,
        test_limit=64,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss(tmp_path):
    result = train(config(epochs=3, noise=False), tmp_path / "a.safetensors")
    ces = [r.ce for r in result.history]
    assert ces[-1] < ces[0]
    assert set(result.history[0].terms) == {"cos", "norm"}


@pytest.mark.parametrize("mode", ["exact", "jvp"])
def test_bf16_training_on_cpu_keeps_float32_checkpoints(tmp_path, monkeypatch, mode):
    """``--precision bf16`` on the CPU (emulated where the CPU lacks native bf16): finite
    losses, float32 parameters in the checkpoint, the precision recorded."""
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    out = tmp_path / "b.safetensors"
    result = train(config(epochs=1, precision="bf16", double_backprop=mode), out)
    assert all(math.isfinite(r.loss) and math.isfinite(r.ce) for r in result.history)
    loaded = load_ensemble(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert read_metadata(out)["config"]["precision"] == "bf16"


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path, synthetic_arrays):
    out = tmp_path / "b.safetensors"
    result = train(config(epochs=1), out)
    loaded = load_ensemble(out)
    assert not loaded.training and all(not m.training for m in loaded.modules())
    x = synthetic_arrays.test_x[:16].float() / 255
    with torch.no_grad():
        assert torch.equal(result.ensemble.eval()(x), loaded(x))
    meta = loaded.metadata
    assert meta["members"] == ["resnet20", "resnet20"]
    assert meta["defense"] == "ncen" and meta["dataset"] == "synthetic"
    assert meta["hyperparameters"] == {"lambda_cos": 0.02, "lambda_norm": 0.02}
    assert meta["epochs_done"] == 1 and meta["complete"] is True
    assert meta["config"]["batch_size"] == 32
    assert "torch_version" in meta and "ncen_version" in meta
    assert read_metadata(out)["schema_version"] == 1


def test_same_seed_gives_bit_identical_checkpoints(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    train(config(epochs=1), a)
    train(config(epochs=1), b)
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.safetensors"
    train(config(epochs=1, seed=1), c)
    assert c.read_bytes() != a.read_bytes()


def test_every_defense_trains(tmp_path):
    for defense in ("baseline", "gal", "gpmr", "ncen-official"):
        result = train(config(epochs=1, defense=defense), tmp_path / f"{defense}.safetensors")
        assert result.metadata["defense"] == defense


def test_learning_rate_schedule():
    cfg = TrainConfig()
    assert [learning_rate(cfg, e) for e in (0, 14, 15, 30, 45, 59)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-5, 1e-5, 1e-5]
    )


def test_learning_rate_floor_scales_with_a_small_lr(tmp_path):
    """An --lr below 1e-5 is not raised by the floor (issue 18); the floor used is recorded."""
    cfg = TrainConfig(lr=1e-6)
    assert [learning_rate(cfg, e) for e in (0, 15, 30, 45)] == pytest.approx(
        [1e-6, 1e-7, 1e-8, 1e-8]
    )
    with pytest.raises(UsageError, match="floor"):
        TrainConfig(lr=1e-4, lr_min=1e-3).validate()
    result = train(config(epochs=1, lr=1e-6), tmp_path / "small.safetensors")
    assert result.history[0].lr == pytest.approx(1e-6)
    recorded = read_metadata(tmp_path / "small.safetensors")["config"]
    assert recorded["lr"] == 1e-6 and recorded["lr_min"] == pytest.approx(1e-8)


def test_paper_defaults_follow_the_authors():
    """RandomCrop(28, padding=4) on FashionMNIST, (32, 4) + flip on CIFAR-10; mean of the
    members' probabilities (their ensemble wrapper's prediction)."""
    assert TRAINING["fashionmnist"].crop_padding == 4 and not TRAINING["fashionmnist"].flip
    assert TRAINING["cifar10"].crop_padding == 4 and TRAINING["cifar10"].flip
    assert TrainConfig().combine == "mean-prob"


def test_noise_copies_are_unaugmented_and_redrawn_each_epoch():
    """D_noise as in the authors' code: the image plus fresh noise, never cropped or flipped.

    Mid-grey random textures (no clipping at sigma = 0.05): a noisy copy minus its source image
    is pure N(0, sigma^2) noise only if the copy was not shifted or flipped (a shifted texture
    would add a residual of std ~0.15)."""
    sigma, n = 0.05, 40
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(80, 177, (n, 1, 12, 12), generator=gen, dtype=torch.uint8)
    y = torch.zeros(n, dtype=torch.long)
    clean = x.float() / 255
    aug = AugmentConfig(crop_padding=4, flip=True, noise_sigma=sigma)
    noise = {}
    for epoch in (0, 1):
        ((xb, _),) = iterate_batches(x, y, 2 * n, seed=3, epoch=epoch, augment=aug)
        # the pipeline's order, re-derived from its (seed, epoch) generator
        order = torch.randperm(2 * n, generator=epoch_generator(3, epoch))
        is_noisy = order >= n
        residual = xb[is_noisy] - clean[order[is_noisy] - n]
        assert abs(float(residual.std()) - sigma) < 0.005
        assert abs(float(residual.mean())) < 0.005
        assert not torch.equal(xb[~is_noisy], clean[order[~is_noisy]])  # clean copies augmented
        noise[epoch] = residual[order[is_noisy].argsort()]  # by source image
    assert (noise[0] - noise[1]).abs().mean() > sigma / 2  # redrawn, not reused


def test_pipeline_doubles_with_noise_and_is_seeded(synthetic_arrays):
    aug = AugmentConfig(crop_padding=2, flip=True, noise_sigma=0.15)
    x, y = synthetic_arrays.train_x[:40], synthetic_arrays.train_y[:40]
    first = list(iterate_batches(x, y, 16, seed=3, epoch=0, augment=aug))
    again = list(iterate_batches(x, y, 16, seed=3, epoch=0, augment=aug))
    other = list(iterate_batches(x, y, 16, seed=3, epoch=1, augment=aug))
    assert sum(len(b[1]) for b in first) == 80  # D + D_noise
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0][0])
    assert all(b[0].min() >= 0 and b[0].max() <= 1 for b in first)
