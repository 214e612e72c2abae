"""TRS regularizer: hand-checked values and gradients reaching the members' parameters."""

from __future__ import annotations

import math

import pytest
import torch
from ncen_cli.defenses.base import DefenseInputs
from ncen_cli.ensemble import Ensemble
from ncen_cli.train_step import exact_step
from torch import nn

from ncen_extra import trs


def _grads(*vectors: list[float]) -> torch.Tensor:
    """One sample per member: (k, 1, D)."""
    return torch.tensor(vectors, dtype=torch.float32).unsqueeze(1)


def test_parallel_and_antiparallel_gradients_have_similarity_one() -> None:
    assert trs.similarity(_grads([1.0, 2.0], [3.0, 6.0])).item() == pytest.approx(1.0, abs=1e-6)
    # |cos| penalises anti-aligned gradients as much as aligned ones
    assert trs.similarity(_grads([1.0, 2.0], [-2.0, -4.0])).item() == pytest.approx(1.0, abs=1e-6)


def test_orthogonal_gradients_have_similarity_zero() -> None:
    g = _grads([1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, -2.0])
    assert trs.similarity(g).item() == pytest.approx(0.0, abs=1e-7)


def test_similarity_is_mean_over_pairs_and_batch() -> None:
    # pair cosines for sample 0: (0,1) = 1, (0,2) = 0, (1,2) = 0 -> mean 1/3
    # sample 1: all three gradients along one axis -> |cos| = 1 for every pair -> mean 1
    g = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0]],
            [[2.0, 0.0], [-3.0, 0.0]],
            [[0.0, 1.0], [0.5, 0.0]],
        ]
    )  # (k=3, B=2, D=2)
    assert trs.similarity(g).item() == pytest.approx((1 / 3 + 1) / 2, abs=1e-6)


def test_smoothness_is_batch_mean_of_summed_squared_norms() -> None:
    g = torch.tensor(
        [
            [[3.0, 4.0], [1.0, 0.0]],
            [[0.0, 1.0], [2.0, 2.0]],
        ]
    )  # sample 0: 25 + 1 = 26; sample 1: 1 + 8 = 9
    assert trs.smoothness(g).item() == pytest.approx((26 + 9) / 2)


def test_terms_are_weighted_and_single_member_has_no_similarity() -> None:
    g = _grads([1.0, 2.0], [3.0, 6.0])
    t = trs.terms(g, lambda_sim=0.25, lambda_smooth=0.5)
    assert t["sim"].item() == pytest.approx(0.25)
    assert t["smooth"].item() == pytest.approx(0.5 * (5 + 45))
    assert trs.similarity(g[:1]).item() == 0.0


def test_defense_declares_its_needs_and_hyperparameters() -> None:
    d = trs.DEFENSE
    assert d.needs_input_gradients and not d.needs_logits
    assert d.resolve("fashionmnist", {"lambda_sim": 2.0}) == {
        "lambda_sim": 2.0,
        "lambda_smooth": 0.1,
    }


def test_regularizer_gradient_reaches_every_member_through_double_backprop() -> None:
    torch.manual_seed(0)
    members = [
        nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(2)
    ]
    ens = Ensemble(members)
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    out = exact_step(ens, trs.DEFENSE, {"lambda_sim": 1.0, "lambda_smooth": 1.0}, x, y)
    assert set(out.terms) == {"sim", "smooth"}
    assert all(math.isfinite(v.item()) for v in out.terms.values())
    with_reg = [p.grad.clone() for p in ens.parameters()]
    ens.zero_grad(set_to_none=True)
    exact_step(ens, trs.DEFENSE, {"lambda_sim": 0.0, "lambda_smooth": 0.0}, x, y)
    plain = [p.grad for p in ens.parameters()]
    # the regularizer changes the parameter gradient of both members (including first layers,
    # which the cross-entropy alone also reaches, but differently)
    for m in range(2):
        first = 4 * m  # weight of member m's first Linear
        assert not torch.allclose(with_reg[first], plain[first])


def test_regularizer_gradient_matches_the_closed_form_for_a_linear_member() -> None:
    # for f(x) = W x the CE input gradient is W^T (softmax - onehot); the smoothness term's
    # gradient must flow into W (it is zero only if W is)
    torch.manual_seed(1)
    w = torch.randn(3, 4, requires_grad=True)
    x, y = torch.randn(6, 4, requires_grad=True), torch.tensor([0, 1, 2, 0, 1, 2])
    ce = nn.functional.cross_entropy(x @ w.T, y, reduction="sum")
    (g,) = torch.autograd.grad(ce, x, create_graph=True)
    expected = (torch.softmax(x @ w.T, -1) - nn.functional.one_hot(y, 3)) @ w
    assert torch.allclose(g, expected, atol=1e-6)
    (dw,) = torch.autograd.grad(trs.smoothness(g.unsqueeze(0)), w)
    assert dw.abs().sum() > 0
    inputs = DefenseInputs(x.detach(), y, torch.zeros(1, 6, 3), g.unsqueeze(0))
    assert trs.DEFENSE.loss_terms(inputs, lambda_sim=1.0, lambda_smooth=1.0)["sim"].item() == 0.0
