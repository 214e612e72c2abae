"""Defenses that craft their members' training inputs (plugin API 2): the contract, adv-train,
the composition REGULARIZER+CRAFTER, and kill-and-resume equivalence of an adv-train run."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import torch.nn.functional as F

from helpers import member_weights, start_ncen, tiny_config, train_flags, wait_for_epoch
from ncen_cli.crafting import compose, craft_batch, crafting_generator, crafting_state, get_defense
from ncen_cli.defenses.adv_train import DEFENSE as ADV
from ncen_cli.defenses.adv_train import adversarial_batch
from ncen_cli.defenses.base import CraftContext, Defense
from ncen_cli.ensemble import build_ensemble
from ncen_cli.errors import UsageError
from ncen_cli.train_step import exact_step, jvp_step
from ncen_cli.training import resume_path, train


def _ensemble(k: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    ens = build_ensemble(["resnet20"] * k, (1, 12, 12), 4)
    with torch.no_grad():  # non-trivial running statistics, to see whether they change
        for m in ens.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    return ens.train()


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.rand(n, 1, 12, 12, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _context(step: int = 0) -> CraftContext:
    return CraftContext(crafting_generator(0, 0, step), 0, 0, step)


def test_crafting_generator_depends_on_seed_epoch_step_and_rank_only() -> None:
    draw = [
        torch.rand(3, generator=crafting_generator(*a))
        for a in [
            (1, 2, 3, 0),
            (1, 2, 3, 0),
            (1, 2, 4, 0),
            (1, 3, 3, 0),
            (2, 2, 3, 0),
            (1, 2, 3, 1),
        ]
    ]
    assert torch.equal(draw[0], draw[1])
    assert all(not torch.equal(draw[0], d) for d in draw[2:])


def test_crafting_state_restores_modes_buffers_and_requires_grad() -> None:
    ens = _ensemble()
    ens.members[1].eval()  # mixed modes must come back as they were
    modes = [m.training for m in ens.modules()]
    buffers = [b.clone() for b in ens.buffers()]
    x, _ = _batch()
    with crafting_state(ens, train_mode=True):
        assert all(m.training for m in ens.modules())
        assert not any(p.requires_grad for p in ens.parameters())
        ens.member_logits(x)  # train-mode BatchNorm updates the running statistics here
    assert [m.training for m in ens.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(buffers, ens.buffers(), strict=True))
    assert all(p.requires_grad for p in ens.parameters())


def test_adv_train_batch_is_a_stronger_pgd_batch_and_leaves_the_ensemble_alone() -> None:
    ens = _ensemble()
    x, y = _batch()
    buffers = [b.clone() for b in ens.buffers()]
    state = {k: v.clone() for k, v in ens.state_dict().items()}
    hp = ADV.resolve("fashionmnist")
    assert hp == {"eps": 0.1, "steps": 10.0, "step_scale": 2.5, "adv_fraction": 1.0}
    x_adv, y_adv = craft_batch(ADV, ens, x, y, hp, _context())
    assert torch.equal(y_adv, y) and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(torch.equal(a, b) for a, b in zip(buffers, ens.buffers(), strict=True))
    assert all(p.grad is None and p.requires_grad for p in ens.parameters())
    with torch.no_grad():  # PGD raised the ensemble's mean CE (train mode, as it was crafted)
        ce = [F.cross_entropy(ens.member_logits(v).flatten(0, 1), y.repeat(2)) for v in (x, x_adv)]
    assert ce[1] > ce[0] + 0.05
    ens.load_state_dict(state)  # the CE check above moved the running statistics
    again, _ = craft_batch(ADV, ens, x, y, hp, _context())  # same (seed, epoch, step): same batch
    other, _ = craft_batch(ADV, ens, x, y, hp, _context(step=1))
    assert torch.equal(x_adv, again) and not torch.equal(x_adv, other)


def test_adv_fraction_replaces_the_first_part_of_the_batch() -> None:
    ens = _ensemble()
    x, y = _batch(8)
    mixed, _ = adversarial_batch(ens, x, y, _context(), 0.1, 3, 2.5, adv_fraction=0.25)
    assert not torch.equal(mixed[:2], x[:2]) and torch.equal(mixed[2:], x[2:])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"steps": 2.5}, "--steps must be a whole number"),
        ({"steps": 0}, "--steps must be >= 1"),
        ({"adv_fraction": 1.5}, "--adv-fraction must be <= 1"),
        ({"eps": 2}, "--eps must be <= 1"),
        ({"eps": float("nan")}, "--eps must be >= 0"),
    ],
)
def test_bad_adv_train_hyperparameters_are_usage_errors(override, message) -> None:
    with pytest.raises(UsageError, match=message):
        ADV.resolve("cifar10", override)


def test_per_member_inputs_train_each_member_on_its_own_batch() -> None:
    """exact_step on (k, B, C, H, W) inputs: member i's gradient is that of CE(f_i(x_i)) / (k B)."""
    ens = _ensemble()
    x, y = _batch()
    per_member = torch.stack([x, x.flip(0)])
    out = exact_step(ens, get_defense("baseline"), {}, per_member, y)
    for i, member in enumerate(ens.members):
        params = list(member.parameters())
        got = [p.grad.clone() for p in params]
        # train-mode BatchNorm normalises with batch statistics: the gradient does not depend on
        # the running statistics the step updated
        ce = F.cross_entropy(member(per_member[i]), y, reduction="sum") / (2 * len(y))
        want = torch.autograd.grad(ce, params)
        pairs = zip(got, want, strict=True)
        assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-7) for g, w in pairs)
    expected = sum(
        F.cross_entropy(m(per_member[i]), y, reduction="sum") for i, m in enumerate(ens.members)
    ) / (2 * len(y))
    assert out.ce.item() == pytest.approx(expected.item(), rel=1e-5)


def test_jvp_step_on_per_member_inputs_equals_exact_step() -> None:
    """Both exact modes take (k, B, C, H, W) inputs: same loss, terms and parameter gradients
    (GAL reads the input gradients, so the forward-mode path is exercised per member)."""
    x, y = _batch()
    per_member = torch.stack([x, x.flip(0)])
    results = []
    for step in (exact_step, jvp_step):
        ens = _ensemble().double()
        out = step(ens, get_defense("gal"), {"lambda_gal": 0.5}, per_member.double(), y)
        results.append((out, [p.grad.clone() for p in ens.parameters()]))
    (exact_out, exact_grads), (jvp_out, jvp_grads) = results
    assert jvp_out.loss.item() == pytest.approx(exact_out.loss.item(), rel=1e-10)
    for e, j in zip(exact_grads, jvp_grads, strict=True):
        assert torch.allclose(e, j, rtol=1e-8, atol=1e-12)


def test_composition_takes_the_regularizer_on_the_crafted_batch() -> None:
    both = get_defense("ncen+adv-train")
    ncen = get_defense("ncen")
    assert set(both.hyperparameters) == {*ncen.hyperparameters, *ADV.hyperparameters}
    assert both.needs_input_gradients and both.member_inputs is not None
    hp = both.resolve("fashionmnist", {"steps": 2})
    ens = _ensemble()
    x, y = _batch()
    crafted, _ = craft_batch(both, ens, x, y, hp, _context())
    alone, _ = craft_batch(ADV, ens, x, y, ADV.resolve("fashionmnist", {"steps": 2}), _context())
    assert torch.equal(crafted, alone)
    ens.zero_grad()
    result = exact_step(ens, both, hp, crafted, y)  # what training does with the crafted batch
    assert set(result.terms) == {"cos", "norm"}
    with pytest.raises(UsageError, match="regularizer first"):
        get_defense("adv-train+ncen")
    with pytest.raises(UsageError, match="both have"):
        compose(Defense("r", "", {"eps": ADV.hyperparameters["eps"]}, lambda i, eps: {}), ADV)
    with pytest.raises(UsageError, match="steps must be a whole number"):
        both.resolve("fashionmnist", {"steps": 1.5})


def test_adv_train_trains_and_records_its_settings(tmp_path) -> None:
    config = tiny_config(
        epochs=1,
        batch_size=16,
        train_limit=32,
        test_limit=16,
        defense="ncen+adv-train",
        hyperparameters={"steps": 2},
    )
    result = train(config, tmp_path / "a.safetensors")
    assert result.metadata["defense"] == "ncen+adv-train"
    assert result.metadata["hyperparameters"]["steps"] == 2.0
    assert {"cos", "norm"} <= set(result.history[0].terms)


ADV_ARGS = [
    "train",
    *train_flags(epochs=3, batch_size=16, train_limit=48, test_limit=16, threads=True),
    *["--seed", "7", "--defense", "adv-train", "-p", "steps=2"],
]


def test_adv_train_sigkill_then_resume_equals_uninterrupted_run(tmp_path) -> None:
    straight = tmp_path / "straight.safetensors"
    proc = start_ncen([*ADV_ARGS, "--out", str(straight)])
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    killed = tmp_path / "killed.safetensors"
    proc = start_ncen([*ADV_ARGS, "--out", str(killed)])
    wait_for_epoch(proc, killed, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert resume_path(killed).exists()
    resumed = start_ncen([*ADV_ARGS, "--out", str(killed), "--resume", "--json"])
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert json.loads(stdout)["resumed_from_epoch"] >= 1
    a, b = member_weights(straight), member_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ncen_plugins_lists_the_crafting_defenses_with_their_hyperparameters() -> None:
    from typer.testing import CliRunner

    from ncen_cli.cli import app

    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {
        r["name"]: r for r in json.loads(result.output)["plugins"] if r["group"] == "ncen.defenses"
    }
    hyper = rows["adv-train"]["hyperparameters"]
    assert set(hyper) == {"eps", "steps", "step_scale", "adv_fraction"}
    assert hyper["eps"]["per_dataset"] == {"fashionmnist": 0.1, "cifar10": 8 / 255}
    if "dverge" in rows:  # ncen-extra installed
        assert rows["dverge"]["hyperparameters"]["eps"]["default"] == 0.07
    table = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "250"})
    assert "step_scale=2.5" in table.output
