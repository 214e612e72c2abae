"""`ncen inspect` and ncen_cli.diagnostics: hand-built members with known input gradients, the
terms as training computes them, the JSON shape, and bad input handled exactly as `ncen attack`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from helpers import save_tiny_checkpoint
from ncen_cli.cli import app
from ncen_cli.data.pipeline import iterate_eval_batches
from ncen_cli.defenses.base import DefenseInputs
from ncen_cli.diagnostics import TERMS, _input_gradients, batch_terms, gradient_diversity
from ncen_cli.ensemble import Ensemble, build_ensemble
from ncen_cli.registry import DEFENSES
from ncen_cli.train_step import exact_step

runner = CliRunner()
N, SHAPE = 24, (1, 2, 2)


def linear_member(w0: list[float], w1: list[float]) -> nn.Module:
    """Two-class linear member without bias: logits = (w0 . x, w1 . x) on the flattened image.

    Its CE input gradient is (p_1 - [y = 1]) (w1 - w0): always along w1 - w0, with a positive
    factor for y = 0 and a negative one for y = 1, the same sign for every such member. So the
    cosine between two members' gradients is exactly that of their (w1 - w0)."""
    layer = nn.Linear(len(w0), 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([w0, w1]))
    return nn.Sequential(nn.Flatten(), layer)


E0, E1, ZERO = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0] * 4
CASES = {  # second member's (w0, w1) against the first's (ZERO, E0): w1 - w0 = e0
    "equal": ((ZERO, E0), 1.0),
    "orthogonal": ((ZERO, E1), 0.0),
    "opposite": ((E0, ZERO), -1.0),
}


def images() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (N, *SHAPE), generator=gen, dtype=torch.uint8)  # x0 > 0
    y = torch.randint(0, 2, (N,), generator=gen)
    y[:2] = torch.tensor([0, 1])  # both classes present
    return x, y


@pytest.mark.parametrize("case", list(CASES))
def test_hand_built_members_give_the_exact_cosine(case):
    (w0, w1), expected = CASES[case]
    ensemble = Ensemble([linear_member(ZERO, E0), linear_member(w0, w1)])
    x, y = images()
    result = gradient_diversity(ensemble, x, y, batch_size=10)
    (pair,) = result.pairs
    assert pair.grad_cosine_mean == pytest.approx(expected, abs=1e-6)
    assert pair.grad_cosine_quartiles == pytest.approx([expected] * 3, abs=1e-6)
    assert result.terms["gal"] == pytest.approx(expected, abs=1e-6)  # k = 2: log exp(cos)
    assert result.terms["gpmr.div"] == pytest.approx((expected + 1) ** 2, abs=1e-6)
    assert result.n == N and result.batches == 3


def test_agreement_measures_on_hand_built_members():
    x, y = images()
    same = gradient_diversity(Ensemble([linear_member(ZERO, E0), linear_member(ZERO, E0)]), x, y)
    (pair,) = same.pairs
    assert pair.disagreement == 0 and pair.error_correlation == pytest.approx(1.0)
    assert same.norm_dispersion == pytest.approx(0.0, abs=1e-7)
    assert same.member_accuracy[0] == pytest.approx(float((y == 1).double().mean()))
    # the opposite member always predicts the other class: its errors are the complement
    members = [linear_member(ZERO, E0), linear_member(E0, ZERO)]
    opposite = gradient_diversity(Ensemble(members), x, y)
    (pair,) = opposite.pairs
    assert pair.disagreement == 1 and pair.error_correlation == pytest.approx(-1.0)
    assert sum(opposite.member_accuracy) == pytest.approx(1.0)


def test_terms_are_the_training_steps_terms_in_eval_mode():
    """Each batch's unweighted terms equal what a training step reports with every lambda = 1."""
    torch.manual_seed(0)
    ensemble = build_ensemble(["resnet20"] * 3, (1, 12, 12), 4).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (16, 1, 12, 12), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 4, (16,), generator=gen)
    ((xb, yb),) = iterate_eval_batches(x, y, 16)
    xb = xb.double()
    logits, grads = _input_gradients(ensemble, xb, yb)
    ours = batch_terms(DefenseInputs(xb, yb, logits, grads))
    for key, (name, term) in TERMS.items():
        defense = DEFENSES.get(name)
        unit = {h: 1.0 for h in defense.hyperparameters}
        step = exact_step(copy.deepcopy(ensemble), defense, unit, xb, yb)
        assert ours[key] == pytest.approx(float(step.terms[term]), rel=1e-9), key
    assert ours["gpmr.eq"] > 0 and ours["ncen.norm"] < 0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "syn.safetensors", members=3)


def test_json_shape(ckpt):
    res = runner.invoke(
        app,
        [
            "inspect",
            str(ckpt),
            "--json",
            "--test-limit",
            "12",
            "--batch-size",
            "5",
            "--device",
            "cpu",
            "--seed",
            "3",
        ],
    )
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["n"] == 12 and out["batches"] == 3 and out["members"] == ["resnet20"] * 3
    assert len(out["member_accuracy"]) == 3
    assert [(p["i"], p["j"]) for p in out["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    for p in out["pairs"]:
        assert {
            "grad_cosine_mean",
            "grad_cosine_quartiles",
            "disagreement",
            "error_correlation",
        } <= set(p)
        assert -1 <= p["grad_cosine_mean"] <= 1 and len(p["grad_cosine_quartiles"]) == 3
    assert set(out["terms"]) == {
        "ncen.cos",
        "ncen.norm",
        "ncen-official.cos",
        "ncen-official.norm",
        "gal",
        "gpmr.div",
        "gpmr.eq",
    }
    assert out["norm_dispersion"] >= 0
    table = runner.invoke(app, ["inspect", str(ckpt), "--test-limit", "12", "--device", "cpu"])
    assert table.exit_code == 0 and "grad cosine mean" in table.stdout and "gpmr.eq" in table.stdout


def _bad_inputs(tmp_path, ckpt):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    other = save_tiny_checkpoint(
        tmp_path / "other.safetensors", members=3, shape=(1, 8, 8), classes=10
    )
    return {
        "missing": [tmp_path / "none.safetensors"],
        "damaged": [damaged],
        "foreign": [foreign],
        "mismatch": [other],
        "limit 0": [ckpt, "--test-limit", "0"],
        "limit -3": [ckpt, "--test-limit", "-3"],
        "batch 0": [ckpt, "--batch-size", "0"],
        "unknown dataset": [ckpt, "--dataset", "nope"],
        "data dir not a folder": [ckpt, "--data-dir", tmp_path / "nowhere"],
    }


def test_bad_input_gets_the_same_error_as_attack(tmp_path, ckpt):
    for label, args in _bad_inputs(tmp_path, ckpt).items():
        common = [*map(str, args), "--device", "cpu"]
        ours = runner.invoke(app, ["inspect", *common])
        theirs = runner.invoke(app, ["attack", *common])
        assert ours.exit_code in (1, 2), (label, ours.stderr)
        assert ours.exit_code == theirs.exit_code, (label, ours.stderr, theirs.stderr)
        assert ours.stderr == theirs.stderr, label
        assert len(ours.stderr.strip().splitlines()) == 1 and ours.stderr.startswith("error:")
        assert "Traceback" not in ours.stderr + ours.stdout
