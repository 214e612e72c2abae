"""ADP regularizer: hand-checked entropy and log-det values, and gradients reaching parameters."""

from __future__ import annotations

import math

import pytest
import torch
from ncen_cli.ensemble import Ensemble
from ncen_cli.train_step import exact_step
from torch import nn

from ncen_extra import adp

OFF = -1e4  # a logit whose softmax probability underflows to exactly 0 in float32


def test_non_maximal_drops_the_true_class_and_normalises() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]]))  # (k=1, B=2, C=3)
    q = adp.non_maximal(logits, torch.tensor([0, 1]))
    assert q.shape == (1, 2, 2)
    assert torch.allclose(q[0, 0], torch.tensor([0.3, 0.2]) / math.hypot(0.3, 0.2), atol=1e-6)
    assert torch.allclose(q[0, 1], torch.tensor([0.1, 0.3]) / math.hypot(0.1, 0.3), atol=1e-6)


def test_identical_non_maximal_predictions_give_a_singular_gram() -> None:
    # two members with the same wrong-class profile: G = [[1, 1], [1, 1]], eigenvalues 2 and 0
    logits = torch.tensor([[[2.0, 0.5, -1.0, 0.0]], [[-3.0, 0.5, -1.0, 0.0]]])  # true class differs
    eps = 1e-6
    got = adp.log_det_diversity(logits, torch.tensor([0]), log_det_eps=eps).item()
    assert got == pytest.approx(math.log(2 + eps) + math.log(eps), rel=1e-6)


def test_orthogonal_non_maximal_predictions_give_identity_gram() -> None:
    # k = 3 members, each putting its wrong-class mass on a different class
    logits = torch.full((3, 1, 4), OFF)
    logits[:, 0, 0] = 0.0  # the true class 0
    for i in range(3):
        logits[i, 0, i + 1] = 0.0
    eps = 1e-3
    got = adp.log_det_diversity(logits, torch.tensor([0]), log_det_eps=eps).item()
    assert got == pytest.approx(3 * math.log(1 + eps), rel=1e-6)


def test_true_class_probability_does_not_change_the_log_det() -> None:
    base = torch.tensor([[[0.0, 1.0, -0.5]], [[0.0, -1.0, 0.7]]])
    bumped = base.clone()
    bumped[:, 0, 0] += torch.tensor([3.0, -2.0])
    y = torch.tensor([0])
    assert adp.log_det_diversity(base, y).item() == pytest.approx(
        adp.log_det_diversity(bumped, y).item(), rel=1e-6
    )


def test_ensemble_entropy_of_uniform_and_of_confident_agreeing_members() -> None:
    assert adp.ensemble_entropy(torch.zeros(2, 3, 5)).tolist() == pytest.approx([math.log(5)] * 3)
    confident = torch.full((2, 1, 5), OFF)
    confident[:, 0, 2] = 0.0
    assert adp.ensemble_entropy(confident).item() == pytest.approx(0.0, abs=1e-6)
    # two members each sure of a different class: mean prediction (0.5, 0.5) -> log 2
    split = torch.full((2, 1, 5), OFF)
    split[0, 0, 1] = split[1, 0, 3] = 0.0
    assert adp.ensemble_entropy(split).item() == pytest.approx(math.log(2), rel=1e-6)


def test_terms_carry_the_signs_and_weights() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(3, 4, 6), torch.randint(0, 6, (4,))
    t = adp.terms(logits, y, alpha=2.0, beta=0.5, log_det_eps=1e-6)
    assert t["entropy"].item() == pytest.approx(-2.0 * adp.ensemble_entropy(logits).mean().item())
    assert t["log_det"].item() == pytest.approx(
        -0.5 * adp.log_det_diversity(logits, y, 1e-6).mean().item(), rel=1e-6
    )
    assert adp.regularizer(logits, y).item() == pytest.approx(sum(v.item() for v in t.values()))


def test_defense_needs_outputs_only_and_rejects_a_zero_ridge() -> None:
    from ncen_cli.errors import UsageError

    d = adp.DEFENSE
    assert d.needs_logits and not d.needs_input_gradients
    assert d.resolve("cifar10") == {"alpha": 2.0, "beta": 0.5, "log_det_eps": 1e-6}
    with pytest.raises(UsageError):
        d.resolve("cifar10", {"log_det_eps": 0.0})


def test_regularizer_gradient_reaches_every_member_and_increases_diversity() -> None:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 5)) for _ in range(3)]
    ens = Ensemble(members)
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % 5
    hyper = {"alpha": 0.0, "beta": 1.0, "log_det_eps": 1e-6}
    with torch.no_grad():
        before = adp.log_det_diversity(ens.member_logits(x), y).mean().item()
    out = exact_step(ens, adp.DEFENSE, hyper, x, y)
    assert set(out.terms) == {"entropy", "log_det"}
    for member in ens.members:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in member.parameters())
    # a few steps on the regularizer alone raise the diversity
    opt = torch.optim.SGD(ens.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        adp.terms(ens.member_logits(x), y, 0.0, 1.0, 1e-6)["log_det"].backward()
        opt.step()
    with torch.no_grad():
        after = adp.log_det_diversity(ens.member_logits(x), y).mean().item()
    assert after > before
