"""torch.distributed on the CPU (gloo, 2 processes): gradients, sharded accuracy, torchrun training.

The gradient test uses a registered BatchNorm-free test architecture. With BatchNorm in train
mode each rank normalises its share with its own batch statistics (as DDP without SyncBatchNorm),
so N ranks and one process would compute genuinely different gradients; without BatchNorm every
per-sample loss is independent of the other samples, and the share-size-weighted average over
ranks must equal the global-batch gradient up to floating-point rounding.

Every multi-process run has a deadline (and NCEN_DIST_TIMEOUT bounds each collective), so a hang
fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ncen_cli import distributed
from ncen_cli.archs.base import Architecture
from ncen_cli.attacks.base import AttackSettings
from ncen_cli.checkpoint import read_metadata
from ncen_cli.data.synthetic import make_arrays
from ncen_cli.ensemble import build_ensemble
from ncen_cli.evaluation import AttackRun, evaluate
from ncen_cli.registry import ARCHS, DEFENSES, registered
from ncen_cli.train_step import training_step
from ncen_cli.training import TrainConfig, clean_accuracy, resume_path, train
from ncen_cli.transfer import transfer_matrix

WORLD = 2
DEADLINE_S = 150
TINY = "tiny-dist-test"
HYPER = {"lambda_cos": 0.5, "lambda_norm": 0.5}
BATCHES = {"unequal": 7, "empty": 1}  # global batch sizes: shares 4/3, and 1/0
ACCURACY_SIZES = (11, 1)  # not divisible by the world size; fewer examples than ranks


def _build_tiny(input_shape: tuple[int, int, int], num_classes: int, activation: str) -> nn.Module:
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * h * w, num_classes)
    )


TINY_ARCH = Architecture(TINY, "BN-free test member", _build_tiny)


@pytest.fixture(autouse=True)
def _tiny_registered():
    with registered("archs", TINY_ARCH):
        yield


def _ensemble(seed: int = 0):
    torch.manual_seed(seed)
    return build_ensemble([TINY, TINY], (1, 12, 12), 4)


def _batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(size)
    return torch.rand(size, 1, 12, 12, generator=gen), torch.randint(0, 4, (size,), generator=gen)


def _grads(ensemble) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in ensemble.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: runs every multi-process check and saves what the parent compares."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        NCEN_DIST_TIMEOUT="60",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    ARCHS.register(TINY, TINY_ARCH)  # a fresh process: the fixture's registration is not here
    assert distributed.context() == distributed.SINGLE  # a pure query: nothing started yet
    ctx = distributed.initialize("cpu")
    assert (ctx.rank, ctx.world_size, ctx.enabled) == (rank, WORLD, True)
    assert distributed.context() == ctx
    results: dict[str, object] = {"rank": rank}
    defense = DEFENSES.get("ncen")

    # 1. gradients on one global batch, this rank computing only its share
    for name, size in BATCHES.items():
        ensemble = _ensemble()
        x, y = _batch(size)
        share = torch.tensor_split(torch.arange(size), WORLD)[rank]
        ensemble.zero_grad(set_to_none=True)
        if len(share):
            training_step(ensemble, defense, HYPER, x[share], y[share])
            results[f"local_{name}"] = _grads(ensemble)
        ctx.average_gradients(ensemble, weight=len(share))
        results[f"grads_{name}"] = _grads(ensemble)

    # 2. sharded clean accuracy and the shards themselves
    ensemble = _ensemble(seed=1).eval()
    arrays = make_arrays(8, 16, seed=3)
    for n in ACCURACY_SIZES:
        results[f"accuracy_{n}"] = clean_accuracy(
            ensemble, arrays.test_x[:n], arrays.test_y[:n], 4, torch.device("cpu"), dist=ctx
        )
        results[f"shards_{n}"] = ctx.gather_objects(ctx.shard(n))

    # 3. small helpers
    results["all_true_mixed"] = ctx.all_true(rank == 0)
    results["all_true_all"] = ctx.all_true(True)
    results["broadcast"] = ctx.broadcast_object(f"from-{rank}")
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(rank))
    ctx.sync_buffers(bn)
    results["bn_mean"] = bn.running_mean.clone()
    results["single_shard"] = distributed.SINGLE.shard(5)

    # 3b. a process group alone changes nothing: without dist= evaluate, transfer_matrix and
    # clean_accuracy see every example (no double sharding in a user's own DDP script)
    runs = [AttackRun("fgsm", AttackSettings(eps=0.1, steps=1, step_size=0.1))]
    x, y = arrays.test_x[: ACCURACY_SIZES[0]], arrays.test_y[: ACCURACY_SIZES[0]]
    plain = evaluate(ensemble, x, y, runs, batch_size=4, checks=False)
    sharded = evaluate(ensemble, x, y, runs, batch_size=4, checks=False, dist=ctx)
    results["evaluate"] = {"plain": plain.to_json(), "sharded": sharded.to_json()}
    results["transfer_n"] = transfer_matrix(ensemble, x, y, "fgsm", runs[0].settings, 4).n
    results["accuracy_plain"] = clean_accuracy(ensemble, x, y, 4, torch.device("cpu"))

    # 4. train() end to end: 40 images + 40 noisy copies in global batches of 79 -> the last
    # global batch has 1 image, so rank 1 gets an empty share; then a resume of the finished run
    config = TrainConfig(
        members=[TINY, TINY],
        dataset="synthetic",
        epochs=1,
        batch_size=79,
        eval_batch_size=4,
        device="cpu",
        seed=0,
    )
    out = Path(out_dir) / "tiny.safetensors"
    saved_state = Path(out_dir) / "state-after-epoch-1"
    first = train(
        config,
        out,
        arrays=make_arrays(40, 11, seed=2),
        dist=ctx,
        on_epoch=lambda _: shutil.copyfile(resume_path(out), saved_state),
    )
    if rank == 0:  # the finished run deleted its resume state: restore the epoch-1 one
        shutil.copyfile(saved_state, resume_path(out))
    ctx.barrier()
    again = train(config, out, resume=True, arrays=make_arrays(40, 11, seed=2), dist=ctx)
    results["train"] = {
        "world_size": first.metadata["world_size"],
        "accuracy": first.history[-1].test_accuracy,
        "resumed_from": again.resumed_from_epoch,
        "params": [p.detach().clone() for p in first.ensemble.parameters()],
    }
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run :func:`_worker` on 2 gloo ranks once; every rank's saved results."""
    out_dir = tmp_path_factory.mktemp("dist")
    procs = mp.start_processes(
        _worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not procs.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers still running after {DEADLINE_S} s (hang?)")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(BATCHES))
def test_two_ranks_give_the_global_batch_gradient(ranks, name):
    ensemble = _ensemble()
    x, y = _batch(BATCHES[name])
    training_step(ensemble, DEFENSES.get("ncen"), HYPER, x, y)
    expected = _grads(ensemble)
    for r in ranks:
        assert len(r[f"grads_{name}"]) == len(expected)
        for got, want in zip(r[f"grads_{name}"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if name == "unequal":
        # the weighting matters: the plain mean of the two shares' gradients is not the answer
        naive = [
            (a + b) / 2
            for a, b in zip(ranks[0]["local_unequal"], ranks[1]["local_unequal"], strict=True)
        ]
        assert max(float((a - b).abs().max()) for a, b in zip(naive, expected, strict=True)) > 1e-6


@pytest.mark.parametrize("n", ACCURACY_SIZES)
def test_sharded_accuracy_equals_one_process(ranks, n):
    arrays = make_arrays(8, 16, seed=3)
    single = clean_accuracy(
        _ensemble(seed=1).eval(), arrays.test_x[:n], arrays.test_y[:n], 4, torch.device("cpu")
    )
    assert [r[f"accuracy_{n}"] for r in ranks] == [single] * WORLD
    shards = ranks[0][f"shards_{n}"]
    covered = [i for s in shards for i in range(n)[s]]
    assert covered == list(range(n))
    assert max(len(range(n)[s]) for s in shards) - min(len(range(n)[s]) for s in shards) <= 1


def test_helpers_agree_across_ranks(ranks):
    for r in ranks:
        assert r["all_true_mixed"] is False and r["all_true_all"] is True
        assert r["broadcast"] == "from-0"
        torch.testing.assert_close(r["bn_mean"], torch.full((3,), 0.5))
        assert r["single_shard"] == slice(0, 5)


def test_evaluate_shards_only_when_given_the_context(ranks):
    """Without ``dist=`` every rank evaluates all 11 examples (a user's DDP script is not
    sharded behind its back); with the context the shares' counts add up to the same report."""
    arrays = make_arrays(8, 16, seed=3)
    x, y = arrays.test_x[: ACCURACY_SIZES[0]], arrays.test_y[: ACCURACY_SIZES[0]]
    runs = [AttackRun("fgsm", AttackSettings(eps=0.1, steps=1, step_size=0.1))]
    single = evaluate(_ensemble(seed=1).eval(), x, y, runs, batch_size=4, checks=False).to_json()
    for r in ranks:
        assert r["evaluate"]["plain"]["n"] == len(x) == r["evaluate"]["sharded"]["n"]
        for report in (r["evaluate"]["plain"], r["evaluate"]["sharded"]):
            assert report["clean_correct"] == single["clean_correct"]
            assert [res["correct"] for res in report["results"]] == [
                res["correct"] for res in single["results"]
            ]
        assert r["transfer_n"] == len(x)
        assert r["accuracy_plain"] == r["accuracy_11"]


def test_train_with_empty_share_and_resume(ranks, tmp_path):
    a, b = ranks[0]["train"], ranks[1]["train"]
    assert a["world_size"] == b["world_size"] == WORLD
    assert a["accuracy"] == b["accuracy"]
    assert a["resumed_from"] == b["resumed_from"] == 1
    for p, q in zip(a["params"], b["params"], strict=True):
        assert torch.equal(p, q) and bool(torch.isfinite(p).all())


def test_torchrun_ncen_train_writes_one_checkpoint(tmp_path):
    out = tmp_path / "run" / "dist.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCEN_DIST_TIMEOUT": "60"}
    env.pop("NCEN_DATA_DIR", None)  # the synthetic dataset reads no folder
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(WORLD),
        "-m",
        "ncen_cli",
        "train",
        "--members",
        "resnet20,resnet20",
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--train-limit",
        "24",
        "--test-limit",
        "9",
        "--batch-size",
        "16",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)  # exactly one JSON document: rank 0 alone reports
    assert summary["checkpoint"] == str(out)
    # the finished run deleted its resume state
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    meta = read_metadata(out)
    assert meta["world_size"] == WORLD and meta["config"]["world_size"] == WORLD
    assert meta["complete"] is True
