"""The evaluation package's seams: one run builder (runs_for) for attack, transfer and sweep, one
per-batch seeding function, the explicit distributed context, the runtime scope, and the
planning step of training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import tiny_config
from ncen_cli import distributed
from ncen_cli.cli.attack import build_runs
from ncen_cli.cli.common import select_attacks
from ncen_cli.cli.options import AttackChoice
from ncen_cli.data.synthetic import make_arrays
from ncen_cli.device import Runtime
from ncen_cli.errors import UsageError
from ncen_cli.evaluation import (
    batch_generator,
    custom_runs,
    modules_in_train_mode,
    override_runs,
    paper_protocol,
    run_stream,
    runs_for,
    strong_protocol,
)
from ncen_cli.training import plan_run
from ncen_cli.transfer import run_settings, source_stream


def test_runs_for_builds_every_protocol_the_commands_use():
    assert runs_for("fashionmnist") == paper_protocol("fashionmnist")
    assert runs_for("cifar10", "strong", restarts=3) == override_runs(
        strong_protocol("cifar10", restarts=3), restarts=3
    )  # --restarts: every run
    custom = runs_for("fashionmnist", "custom", attacks=["pgd", "square"], eps=[0.2], steps=7)
    assert custom == override_runs(custom_runs(["pgd", "square"], [0.2], "fashionmnist"), steps=7)
    paper_pgd = runs_for("fashionmnist", "paper", attacks=["pgd"], step_size=0.01)
    assert [(r.attack, r.settings.eps, r.settings.step_size) for r in paper_pgd] == [
        ("pgd", 0.1, 0.01),
        ("pgd", 0.15, 0.01),
    ]
    # the CLI's builder is runs_for behind its option parsing
    choice = AttackChoice(attacks="pgd", eps="0.1", steps=5, restarts=2)
    assert build_runs("fashionmnist", "strong", select_attacks(choice), None) == runs_for(
        "fashionmnist", "strong", attacks=["pgd"], eps=[0.1], steps=5, restarts=2
    )


def test_runs_for_refuses_what_no_protocol_runs():
    with pytest.raises(UsageError, match="--protocol must be"):
        runs_for("fashionmnist", "best")
    with pytest.raises(UsageError, match="not in the paper protocol"):
        runs_for("fashionmnist", attacks=["apgd-ce"])
    with pytest.raises(UsageError, match="--objective does not apply"):
        runs_for("fashionmnist", "authors", objective="logits")
    with pytest.raises(UsageError, match="no paper protocol for family 'None'"):
        runs_for(None, "custom", attacks=["pgd"])  # no eps and no family to take it from
    with pytest.raises(UsageError, match="eps must be in"):
        runs_for(None, "custom", attacks=["pgd"], eps=[1.5])


def test_single_step_runs_keep_their_step_everywhere():
    """--steps / --step-size are for iterative attacks, in attack and transfer alike."""
    fgsm = run_settings("fgsm", 0.1, steps=5, step_size=0.01, restarts=2)
    assert (fgsm.steps, fgsm.step_size, fgsm.restarts) == (1, 0.1, 2)
    pgd = run_settings("pgd", 0.1, steps=5, step_size=0.01)
    assert (pgd.steps, pgd.step_size, pgd.random_start) == (5, 0.01, True)
    (custom,) = runs_for("fashionmnist", "custom", attacks=["fgsm"], eps=[0.1], steps=5)
    assert custom.settings == run_settings("fgsm", 0.1, steps=5)


def test_one_per_batch_seeding_function_for_evaluate_and_transfer():
    """Both streams are the formulas of 0.1 (seeded results do not change across versions)."""
    cpu = torch.device("cpu")

    def draw(gen: torch.Generator) -> torch.Tensor:
        return torch.rand(4, generator=gen)

    old_eval = torch.Generator().manual_seed((7 * 1_000_003 + 2) * 1_000_033 + 64)
    assert torch.equal(draw(batch_generator(run_stream(7, 2), 64, cpu)), draw(old_eval))
    old_transfer = torch.Generator().manual_seed(7 * 1_000_003 + 1 * 10_007 + 64)
    assert torch.equal(draw(batch_generator(source_stream(7, 1), 64, cpu)), draw(old_transfer))
    # the largest seed no longer overflows torch's seed range
    draw(batch_generator(run_stream(2**32 - 1, 99), 10**6, cpu))


def test_modules_in_train_mode_names_the_modules_in_train_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    assert modules_in_train_mode(model) == []
    model[1].train()
    assert modules_in_train_mode(model) == ["1"]
    assert modules_in_train_mode(model.train()) == ["<ensemble>", "0", "1"]


def test_context_is_a_pure_query_and_initialize_needs_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.context() == distributed.SINGLE
    assert distributed.initialize("cpu") == distributed.SINGLE
    assert not torch.distributed.is_initialized()  # nothing was started
    assert distributed.SINGLE.shard(5) == slice(0, 5)
    t = torch.ones(2)
    assert distributed.SINGLE.all_reduce_sum(t) is t and distributed.SINGLE.sum_counts(3, 4) == (
        3,
        4,
    )


def test_a_process_group_of_one_changes_nothing(tmp_path):
    """A group that exists (world size 1, gloo) is not a reason to shard: the context is asked
    for, and a group of one is the single-process context."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert distributed.context() == distributed.SINGLE
    finally:
        torch.distributed.destroy_process_group()


def test_runtime_settings_hold_inside_the_scope_only():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    runtime = Runtime.create("cpu", threads=other, seed=5)
    assert torch.get_num_threads() == before  # creating applies nothing
    with runtime.applied():
        assert torch.get_num_threads() == other
        seeded = torch.rand(3)
    assert torch.get_num_threads() == before
    torch.manual_seed(5)
    assert torch.equal(seeded, torch.rand(3))  # seeded on entry


def test_plan_run_resolves_without_training_or_touching_torch(tmp_path):
    threads = torch.get_num_threads()
    config = tiny_config(noise_eps=None, threads=1 if threads != 1 else 2, batch_size=16)
    out = tmp_path / "run.safetensors"
    plan = plan_run(config, out, arrays=make_arrays(40, 8, seed=0))
    assert plan.epochs >= 1 and plan.recorded["epochs"] == plan.epochs
    assert plan.augment.noise_sigma == plan.recorded["noise_eps"] / 2
    assert plan.batches_per_epoch == 5  # 40 images + 40 noisy copies in batches of 16
    assert not plan.resume and "device" not in plan.recorded
    assert plan.metadata["defense"] == "ncen" and plan.metadata["world_size"] == 1
    assert torch.get_num_threads() == threads
    assert list(tmp_path.iterdir()) == []  # nothing written
