"""Regularizer values on hand-checked cases, and that their gradients reach the parameters."""

from __future__ import annotations

import math

import pytest
import torch

from ncen_cli.defenses import baseline, gal, gpmr, ncen


def two_members(a: list[float], b: list[float]) -> torch.Tensor:
    """Gradients of shape (k=2, B=1, 1, 1, D)."""
    return torch.tensor([a, b], dtype=torch.float64).view(2, 1, 1, 1, -1)


PARALLEL = two_members([1.0, 0.0], [2.0, 0.0])
OPPOSITE = two_members([1.0, 0.0], [-1.0, 0.0])
ORTHOGONAL = two_members([1.0, 0.0], [0.0, 1.0])


def test_ncen_paper_parallel_gradients():
    # g_ens = (1.5, 0): both cosines are 1; cos_i = 1 * 1 = 1 -> mean 1.
    # norms 1, 2, m = 1.5: norm_i = -(n_i - m)^2 / m^2 = -(0.25 / 2.25) for both.
    terms = ncen.terms(PARALLEL, lambda_cos=1.0, lambda_norm=1.0)
    assert terms["cos"].item() == pytest.approx(1.0, abs=1e-9)
    assert terms["norm"].item() == pytest.approx(-0.25 / 2.25, abs=1e-9)


def test_ncen_paper_orthogonal_gradients():
    # g_ens = (0.5, 0.5): each cosine 1/sqrt(2); cos_i = 1/2. Equal norms: norm term 0.
    terms = ncen.terms(ORTHOGONAL, lambda_cos=1.0, lambda_norm=1.0)
    assert terms["cos"].item() == pytest.approx(0.5, abs=1e-9)
    assert terms["norm"].item() == pytest.approx(0.0, abs=1e-12)


def test_ncen_paper_opposite_gradients_are_finite():
    # g_ens = 0: cosines are guarded to 0, so the direction term is 0 and nothing is NaN.
    terms = ncen.terms(OPPOSITE, lambda_cos=1.0, lambda_norm=1.0)
    assert terms["cos"].item() == pytest.approx(0.0, abs=1e-9)
    assert terms["norm"].item() == pytest.approx(0.0, abs=1e-12)


def test_ncen_norm_term_matches_closed_form():
    grads = torch.randn(4, 8, 1, 3, 3, dtype=torch.float64)
    norms = grads.flatten(2).norm(dim=2)
    m = norms.mean(0)
    expected = (-((norms - m) ** 2) / m**2).mean()
    assert ncen.terms(grads, 0.0, 1.0)["norm"].item() == pytest.approx(expected.item(), rel=1e-9)


def test_ncen_official_form_parallel():
    # c = (1, 1): L_cos = log(e * e + e * e) = 2 + log 2. a = (-1/3, 1/3), b_i = a_j / k:
    # a_1 b_1 = a_2 b_2 = -1/18: L_norm = log(2 exp(-1/18)).
    terms = ncen.terms(PARALLEL, 1.0, 1.0, form="official")
    assert terms["cos"].item() == pytest.approx(2 + math.log(2), abs=1e-9)
    assert terms["norm"].item() == pytest.approx(math.log(2 * math.exp(-1 / 18)), abs=1e-9)


def test_ncen_weights_scale_terms():
    grads = torch.randn(3, 5, 1, 4, 4, dtype=torch.float64)
    one = ncen.regularizer(grads, lambda_cos=1.0, lambda_norm=0.0)
    assert ncen.regularizer(grads, 0.06, 0.0).item() == pytest.approx(0.06 * one.item(), rel=1e-9)


def test_gal_values():
    # one pair: log(exp(cos)); parallel cos 1, opposite -1, orthogonal 0 (times lambda 0.5).
    assert gal.regularizer(PARALLEL).item() == pytest.approx(0.5, abs=1e-9)
    assert gal.regularizer(OPPOSITE).item() == pytest.approx(-0.5, abs=1e-9)
    assert gal.regularizer(ORTHOGONAL).item() == pytest.approx(0.0, abs=1e-9)


def test_gpmr_values():
    # k = 2: div = (cos + 1)^2; eq = mean_i (n_i - mean n)^2, per sample on g (norms 1, 2), or the
    # authors' way on G = g / (k B) (norms 0.5, 1 with k = 2, B = 1).
    t = gpmr.terms(PARALLEL, lambda_div=1.0, lambda_eq=1.0, reduction="per-sample")
    assert t["div"].item() == pytest.approx(4.0, abs=1e-9)
    assert t["eq"].item() == pytest.approx(0.25, abs=1e-9)
    t = gpmr.terms(PARALLEL, lambda_div=1.0, lambda_eq=1.0)
    assert t["div"].item() == pytest.approx(4.0, abs=1e-9)
    assert t["eq"].item() == pytest.approx(0.0625, abs=1e-9)
    t = gpmr.terms(OPPOSITE, 1.0, 1.0)
    assert t["div"].item() == pytest.approx(0.0, abs=1e-9)
    assert t["eq"].item() == pytest.approx(0.0, abs=1e-9)
    t = gpmr.terms(ORTHOGONAL, 1.0, 1.0)
    assert t["div"].item() == pytest.approx(1.0, abs=1e-9)


def test_baseline_is_zero():
    assert baseline.regularizer(PARALLEL).item() == 0.0


@pytest.mark.parametrize(
    "fn",
    [
        lambda g: ncen.regularizer(g, 0.5, 0.5),
        lambda g: ncen.regularizer(g, 0.5, 0.5, form="official"),
        gal.regularizer,
        lambda g: gpmr.regularizer(g, 0.1, 10.0),
        lambda g: gpmr.regularizer(g, 0.1, 10.0, reduction="per-sample"),
    ],
    ids=["ncen", "ncen-official", "gal", "gpmr", "gpmr-per-sample"],
)
def test_regularizer_gradient_reaches_parameters(fn):
    """Through double backprop, each member's parameters receive a non-zero regularizer gradient."""
    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)) for _ in range(3)]
    x = torch.rand(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    copies = x.unsqueeze(0).expand(3, *x.shape).clone().requires_grad_(True)
    logits = torch.stack([m(copies[i]) for i, m in enumerate(members)])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(3), reduction="sum")
    (grads,) = torch.autograd.grad(ce, copies, create_graph=True)
    fn(grads).backward()
    for m in members:
        weight_grad = m[1].weight.grad
        assert weight_grad is not None and weight_grad.abs().sum() > 0
