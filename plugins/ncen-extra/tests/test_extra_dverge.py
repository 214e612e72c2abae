"""DVERGE: feature layers as the authors number them, distillation held against a transcription of
the authors' Linf_distillation, the round-robin member batches, and kill-and-resume equivalence."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from ncen_cli.crafting import craft_batch, crafting_generator, crafting_state
from ncen_cli.defenses.base import CraftContext
from ncen_cli.errors import UsageError

from ncen_extra import dverge

# the shared test helpers of the repository's tests/ folder (on sys.path already in a full run)
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))

from helpers import (  # noqa: E402
    member_weights,
    start_ncen,
    tiny_ensemble,
    train_flags,
    wait_for_epoch,
)


def _ensemble(k: int = 3) -> nn.Module:
    return tiny_ensemble(k).train()


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 12, 12, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _context(epoch: int = 0, step: int = 0) -> CraftContext:
    return CraftContext(crafting_generator(0, epoch, step), 0, epoch, step)


def test_layers_are_numbered_as_in_the_authors_get_features() -> None:
    member = _ensemble().members[0].eval()
    x, _ = _batch()
    with torch.no_grad():
        stem = member.bn(member.conv(x))  # layer 1: the stem's BN output, before the ReLU
        block = member.layers[0]
        inner = block.bn1(block.conv1(member.act(stem)))  # layer 2: block 1's bn1 output
        out = block.bn2(block.conv2(block.act1(inner))) + block.shortcut(member.act(stem))
        assert torch.equal(dverge.features(member, x, 1), stem)
        assert torch.equal(dverge.features(member, x, 2), inner)
        assert torch.equal(dverge.features(member, x, 3), out)  # block 1's output before ReLU
        assert dverge.depth_of(member) == 20
        assert torch.equal(dverge.features(member, x, 20), member(x))  # logits
        assert dverge.features(member, x, 19).shape == (6, 64, 3, 3)
    with pytest.raises(UsageError, match="outside"):
        dverge.features(member, x, 21)


# ---- transcription of the authors' distillation.py (zjysteven/DVERGE): Linf_distillation with
# gradient_wrt_feature; model.get_features(x, layer, before_relu=True) is ncen's dverge.features


def _ref_gradient_wrt_feature(model, source_data, target_data, layer, criterion=None):
    criterion = criterion or nn.MSELoss()  # the authors' default argument
    source_data.requires_grad = True
    out = dverge.features(model, source_data, layer)
    target = dverge.features(model, target_data, layer).data.clone().detach()
    loss = criterion(out, target)
    model.zero_grad()
    loss.backward()
    data_grad = source_data.grad.data
    return data_grad.clone().detach()


def _ref_Linf_distillation(model, dat, target, eps, alpha, steps, layer, mu=1):
    x_nat = dat.clone().detach()
    x_adv = dat.clone().detach()  # rand_start=False (the authors' default)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    g = torch.zeros_like(x_adv)
    for _ in range(steps):
        grad = _ref_gradient_wrt_feature(model, x_adv, target, layer)
        with torch.no_grad():
            flat_grad = grad.view(grad.shape[0], -1)  # momentum=True (the authors' default)
            l1_grad = torch.norm(flat_grad, 1, dim=1)
            grad = grad / torch.clamp(l1_grad, min=1e-12).view(grad.shape[0], 1, 1, 1)
            new_grad = mu * g + grad
            g = new_grad
            x_adv = x_adv - alpha * new_grad.sign()
            x_adv = torch.max(torch.min(x_adv, x_nat + eps), x_nat - eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.clone().detach()


@pytest.mark.parametrize("layer", [1, 6, 20])  # stem, a block, logits
def test_distillation_matches_the_authors_linf_distillation(layer: int) -> None:
    member = _ensemble().members[0].eval()  # eval: both sides see the same BN normalisation
    x, _ = _batch()
    target = dverge.shuffled_targets(x, torch.Generator().manual_seed(0))
    ref = _ref_Linf_distillation(member, x, target, eps=0.07, alpha=0.007, steps=10, layer=layer)
    with crafting_state(member, train_mode=False):
        ours = dverge.distill(member, x, target, layer, eps=0.07, step_size=0.007, steps=10)
    # the same sign steps: equal up to float rounding of x +- k * 0.007
    assert (ours - ref).abs().max() < 1e-6
    assert (ours - x).abs().max() <= 0.07 + 1e-6 and not torch.equal(ours, x)
    with torch.no_grad():  # the features moved towards the target's
        before = dverge.features(member, x, layer) - dverge.features(member, target, layer)
        after = dverge.features(member, ours, layer) - dverge.features(member, target, layer)
    assert after.pow(2).mean() < before.pow(2).mean()


def test_shuffled_targets_never_pair_an_image_with_itself() -> None:
    x = torch.arange(7.0).view(7, 1, 1, 1)
    for seed in range(20):
        t = dverge.shuffled_targets(x, torch.Generator().manual_seed(seed))
        assert not (t == x).any() and sorted(t.flatten().tolist()) == list(range(7))


def test_random_layer_is_fixed_per_epoch_and_in_range() -> None:
    members = list(_ensemble().members)
    layers = [
        dverge.distillation_layer(members, 0, _context(epoch=e, step=s))
        for e in range(30)
        for s in (0, 5)
    ]
    assert all(1 <= v <= 20 for v in layers)
    assert all(layers[2 * e] == layers[2 * e + 1] for e in range(30))  # same epoch, any step
    assert len(set(layers)) > 5
    assert dverge.distillation_layer(members, 7, _context()) == 7


@pytest.mark.parametrize("clean", [0, 1])
def test_each_member_trains_on_the_other_members_distilled_images(clean: int) -> None:
    ens = _ensemble(3)
    x, y = _batch()
    hp = dverge.DEFENSE.resolve("cifar10", {"layer": 5, "steps": 3, "clean": clean})
    assert hp["eps"] == 0.07 and hp["step_size"] == 0.007
    buffers = [b.clone() for b in ens.buffers()]
    inputs, labels = craft_batch(dverge.DEFENSE, ens, x, y, hp, _context())
    assert all(torch.equal(a, b) for a, b in zip(buffers, ens.buffers(), strict=True))
    copies = 2 + clean
    assert inputs.shape == (3, copies * 6, 1, 12, 12)
    assert torch.equal(labels, y.repeat(copies))  # the source labels
    target = dverge.shuffled_targets(x, _context().generator)
    with crafting_state(ens, train_mode=True):
        distilled = [dverge.distill(m, x, target, 5, 0.07, 0.007, 3) for m in ens.members]
    for i in range(3):
        others = [d for j, d in enumerate(distilled) if j != i] + ([x] if clean else [])
        assert torch.equal(inputs[i], torch.cat(others))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"steps": 1.5}, "--steps must be a whole number"),
        ({"layer": 2.5}, "--layer must be"),
        ({"clean": 0.5}, "--clean must be 0 or 1"),
        ({"eps": 3}, "--eps must be <= 1"),
    ],
)
def test_bad_dverge_hyperparameters_are_usage_errors(override, message) -> None:
    with pytest.raises(UsageError, match=message):
        dverge.DEFENSE.resolve("cifar10", override)


def test_non_resnet_members_are_refused() -> None:
    with pytest.raises(UsageError, match="CIFAR-style ResNet"):
        dverge.depth_of(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


# ---- kill and resume -----------------------------------------------------------------------

ARGS = [
    "train",
    *train_flags(epochs=3, batch_size=16, train_limit=32, test_limit=16, threads=True),
    *["--seed", "4", "--defense", "dverge", "-p", "steps=2", "-p", "clean=1"],
]


def test_dverge_sigkill_then_resume_equals_uninterrupted_run(tmp_path) -> None:
    straight = tmp_path / "straight.safetensors"
    proc = start_ncen([*ARGS, "--out", str(straight)])
    _, stderr = proc.communicate(timeout=600)
    if proc.returncode != 0 and "unknown defense 'dverge'" in stderr:
        pytest.skip("ncen-extra is not installed (pip install -e plugins/ncen-extra)")
    assert proc.returncode == 0, stderr
    killed = tmp_path / "killed.safetensors"
    proc = start_ncen([*ARGS, "--out", str(killed)])
    wait_for_epoch(proc, killed, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = start_ncen([*ARGS, "--out", str(killed), "--resume", "--json"])
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["resumed_from_epoch"] >= 1
    a, b = member_weights(straight), member_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
