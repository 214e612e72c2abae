"""`ncen transfer` and ncen_cli.transfer: orientation, --only-correct, JSON schema, bad input.

The ensemble here is built by hand on the synthetic stripes (class c = bright rows 3c, 3c+1) so the
answer is known: member 0 reads only the right half of the image, member 1 only the left half, and
member 2 ignores its input (always predicts class 0). An FGSM step crafted on member 0 changes only
right-half pixels, so it fools member 0 but leaves member 1 and member 2 untouched, and so on.
"""

from __future__ import annotations

import json
from contextlib import ExitStack

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ncen_cli.archs.base import Architecture
from ncen_cli.attacks.base import Attack, AttackSettings, RunInput, objective_loss
from ncen_cli.checkpoint import save_ensemble
from ncen_cli.cli import app
from ncen_cli.data.pipeline import to_float
from ncen_cli.data.synthetic import NUM_CLASSES, SIZE, make_arrays
from ncen_cli.ensemble import Ensemble
from ncen_cli.registry import registered
from ncen_cli.transfer import TransferResult, transfer_matrix

EPS = 0.5


class HalfBarReader(nn.Module):
    """Logit c = 10 * mean brightness of rows 3c, 3c+1 over one half of the columns."""

    def __init__(self, half: str) -> None:
        super().__init__()
        self.cols = slice(SIZE // 2, SIZE) if half == "right" else slice(0, SIZE // 2)
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = x[:, 0, :, self.cols]
        rows = torch.stack([part[:, 3 * c : 3 * c + 2].mean((1, 2)) for c in range(NUM_CLASSES)], 1)
        return self.scale * rows


class Constant(nn.Module):
    """Ignores its input: always predicts class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([3.0] + [0.0] * (NUM_CLASSES - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def fgsm(job: RunInput) -> torch.Tensor:
    """One signed-gradient step of size eps: job.x (B, C, H, W) -> x_adv (B, C, H, W)."""
    x = job.x.clone().requires_grad_(True)
    loss, _ = objective_loss(job.target, x, job.y, job.settings.objective)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return (x + job.settings.eps * grad.sign()).clamp(0, 1).detach()


TEST_ATTACK = Attack("test-fgsm", "one signed-gradient step", fgsm, lambda eps: {"steps": 1})
ARCHITECTURES = {
    "test-right": Architecture("test-right", "tests", lambda s, n, a: HalfBarReader("right")),
    "test-left": Architecture("test-left", "tests", lambda s, n, a: HalfBarReader("left")),
    "test-const": Architecture("test-const", "tests", lambda s, n, a: Constant()),
}


@pytest.fixture(autouse=True)
def _registered():
    with ExitStack() as stack:
        stack.enter_context(registered("attacks", TEST_ATTACK))
        for arch in ARCHITECTURES.values():
            stack.enter_context(registered("archs", arch))
        yield


def hand_built() -> Ensemble:
    members = [HalfBarReader("right"), HalfBarReader("left"), Constant()]
    return Ensemble(members, metadata={"members": ["test-right", "test-left", "test-const"]})


def run(**kwargs) -> TransferResult:
    arrays = make_arrays(n_train=8, n_test=64)
    settings = AttackSettings(eps=EPS, steps=1)
    return transfer_matrix(
        hand_built(),
        arrays.test_x,
        arrays.test_y,
        attack="test-fgsm",
        settings=settings,
        batch_size=24,
        **kwargs,
    )


def member_accuracy(member: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (member(to_float(x)).argmax(1) == y).float().mean().item()


def test_matrix_shape_and_orientation():
    arrays = make_arrays(n_train=8, n_test=64)
    result = run()
    m = torch.tensor(result.matrix)
    assert m.shape == (3, 4)
    assert result.members == ["0:test-right", "1:test-left", "2:test-const"]
    assert result.n == 64
    # the readers are accurate on clean stripes, the constant member only on class 0
    assert result.clean[0] == result.clean[1] == 1.0
    const_acc = member_accuracy(Constant(), arrays.test_x, arrays.test_y)
    assert result.clean[2] == pytest.approx(const_acc) == pytest.approx(0.25)
    # row = source: crafting on a reader fools it (white-box) ...
    assert m[0, 0] < 0.2 and m[1, 1] < 0.2
    # ... but leaves the reader of the other half exactly at its clean accuracy
    assert m[0, 1] == 1.0 and m[1, 0] == 1.0
    # the constant member is never fooled, whatever the source
    assert torch.allclose(m[:, 2], torch.full((3,), const_acc, dtype=m.dtype))
    # crafting on the constant member has zero gradient: nothing moves, so row 2 is clean accuracy
    assert m[2].tolist() == pytest.approx(result.clean)
    s = result.summary
    assert s["mean_diagonal"] == pytest.approx((m[0, 0] + m[1, 1] + m[2, 2]).item() / 3)
    off = m[:, :3].sum() - m[:, :3].diagonal().sum()
    assert s["mean_off_diagonal"] == pytest.approx(off.item() / 6)
    assert s["gap"] == pytest.approx(s["mean_off_diagonal"] - s["mean_diagonal"])
    assert s["ensemble_mean"] == pytest.approx(m[:, 3].mean().item())


def test_batch_size_does_not_change_the_result():
    arrays = make_arrays(n_train=8, n_test=64)
    settings = AttackSettings(eps=EPS, steps=1)
    a = transfer_matrix(hand_built(), arrays.test_x, arrays.test_y, "test-fgsm", settings, 64)
    b = transfer_matrix(hand_built(), arrays.test_x, arrays.test_y, "test-fgsm", settings, 7)
    assert a.matrix == b.matrix and a.n == b.n == 64


def test_only_correct_keeps_examples_every_member_gets_right():
    arrays = make_arrays(n_train=8, n_test=64)
    ensemble = hand_built()
    with torch.no_grad():
        preds = ensemble.member_logits(to_float(arrays.test_x)).argmax(-1)
    expected = int((preds == arrays.test_y).all(0).sum())
    result = run(only_correct=True)
    assert 0 < expected < 64
    assert result.n == expected == 16  # the constant member is right on class 0 only
    assert result.clean[:3] == [1.0, 1.0, 1.0]
    assert result.params["only_correct"] is True
    assert result.matrix[0][2] == 1.0  # the constant member stays right on its class-0 examples


def test_json_schema():
    payload = run().to_json()
    assert set(payload) >= {"matrix", "members", "attack", "params", "n", "summary"}
    json.dumps(payload)  # plain JSON types
    assert payload["attack"] == "test-fgsm"
    assert isinstance(payload["n"], int) and payload["n"] == 64
    assert len(payload["matrix"]) == len(payload["members"]) == 3
    for row in payload["matrix"]:
        assert len(row) == 4 and all(isinstance(v, float) for v in row)
    assert payload["params"]["eps"] == EPS and payload["params"]["steps"] == 1
    assert {"mean_diagonal", "mean_off_diagonal", "gap", "ensemble_mean"} <= set(payload["summary"])
    again = TransferResult.from_json(json.loads(json.dumps(payload)))
    assert again.to_json() == payload


@pytest.fixture
def checkpoint(tmp_path):
    ensemble = hand_built()
    meta = {
        "members": ["test-right", "test-left", "test-const"],
        "dataset": "synthetic",
        "family": "fashionmnist",
        "input_shape": [1, SIZE, SIZE],
        "num_classes": NUM_CLASSES,
    }
    return save_ensemble(ensemble, tmp_path / "hand.safetensors", meta)


def test_cli_json_matches_the_api(checkpoint):
    result = CliRunner().invoke(
        app,
        [
            "transfer",
            str(checkpoint),
            "--attacks",
            "test-fgsm",
            "--eps",
            str(EPS),
            "--test-limit",
            "40",
            "--json",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--data-dir",
            str(checkpoint.parent),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["n"] == 40
    assert payload["members"] == ["0:test-right", "1:test-left", "2:test-const"]
    assert payload["matrix"][0][1] == 1.0 and payload["matrix"][0][0] < 0.2


def test_cli_table_and_png(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "heat.png"
    result = CliRunner().invoke(
        app,
        [
            "transfer",
            str(checkpoint),
            "--attacks",
            "test-fgsm,test-fgsm",
            "--eps",
            str(EPS),
            "--test-limit",
            "16",
            "--figure",
            str(png),
            "--device",
            "cpu",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "0:test-right" in result.stdout and "ensemble" in result.stdout
    assert result.stdout.count("mean diagonal") == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "args",
    [
        ["missing.safetensors"],
        ["{ckpt}", "--eps", "0"],
        ["{ckpt}", "--eps", "1.5"],
        ["{ckpt}", "--attacks", "no-such-attack"],
        ["{ckpt}", "--test-limit", "0"],
        ["{ckpt}", "--steps", "-1"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, checkpoint, tmp_path):
    argv = [
        "transfer",
        *[a.format(ckpt=checkpoint) for a in args],
        "--device",
        "cpu",
        "--data-dir",
        str(tmp_path),
    ]
    if args[0] == "missing.safetensors":
        argv[1] = str(tmp_path / "missing.safetensors")
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


def test_builtin_pgd_keeps_the_orientation():
    """The real PGD (no random start, so untouched pixels stay untouched) gives the same picture."""
    arrays = make_arrays(n_train=8, n_test=32)
    settings = AttackSettings(eps=EPS, steps=3, step_size=EPS / 2, random_start=False)
    result = transfer_matrix(hand_built(), arrays.test_x, arrays.test_y, "pgd", settings, 32)
    m = result.matrix
    assert m[0][0] < 0.2 and m[1][1] < 0.2
    assert m[0][1] == m[1][0] == 1.0
    assert result.params["steps"] == 3 and result.params["random_start"] is False


def test_crafting_runs_every_step_unless_told_otherwise():
    seen: list[AttackSettings] = []

    def spy(job: RunInput) -> torch.Tensor:
        seen.append(job.settings)
        return fgsm(job)

    with registered("attacks", Attack("test-spy", "records settings", spy, lambda eps: {})):
        arrays = make_arrays(n_train=8, n_test=8)
        result = transfer_matrix(
            hand_built(), arrays.test_x, arrays.test_y, "test-spy", AttackSettings(eps=EPS)
        )
        assert result.params["extra"] == {"early_stop": False}
        assert len(seen) == 3 and all(s.extra["early_stop"] is False for s in seen)
        mine = AttackSettings(eps=EPS, extra={"early_stop": True})
        transfer_matrix(hand_built(), arrays.test_x, arrays.test_y, "test-spy", mine)
        assert seen[-1].extra["early_stop"] is True
