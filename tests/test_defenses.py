"""Regularizer values on hand-checked cases, and that their gradients reach the parameters.

Every value goes through the registered defense's ``loss_terms`` (what training calls)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from ncen_cli.defenses import adv_train, baseline, gal, gpmr, ncen
from ncen_cli.defenses.base import DefenseInputs
from ncen_cli.registry import DEFENSES


def loss_terms(name: str, grads: torch.Tensor, **hyperparameters: float) -> dict[str, torch.Tensor]:
    """The terms of registered defense ``name`` on input gradients grads (k, B, *shape)."""
    k, batch = grads.shape[:2]
    inputs = DefenseInputs(
        grads[0], torch.zeros(batch, dtype=torch.long), grads.new_zeros(k, batch, 2), grads
    )
    return DEFENSES.get(name).loss_terms(inputs, **hyperparameters)


def regularizer(name: str, grads: torch.Tensor, **hyperparameters: float) -> torch.Tensor:
    return sum(loss_terms(name, grads, **hyperparameters).values())


def two_members(a: list[float], b: list[float]) -> torch.Tensor:
    """Gradients of shape (k=2, B=1, 1, 1, D)."""
    return torch.tensor([a, b], dtype=torch.float64).view(2, 1, 1, 1, -1)


PARALLEL = two_members([1.0, 0.0], [2.0, 0.0])
OPPOSITE = two_members([1.0, 0.0], [-1.0, 0.0])
ORTHOGONAL = two_members([1.0, 0.0], [0.0, 1.0])


def test_ncen_paper_parallel_gradients():
    # g_ens = (1.5, 0): both cosines are 1; cos_i = 1 * 1 = 1 -> mean 1.
    # norms 1, 2, m = 1.5: norm_i = -(n_i - m)^2 / m^2 = -(0.25 / 2.25) for both.
    terms = loss_terms("ncen", PARALLEL, lambda_cos=1.0, lambda_norm=1.0)
    assert terms["cos"].item() == pytest.approx(1.0, abs=1e-9)
    assert terms["norm"].item() == pytest.approx(-0.25 / 2.25, abs=1e-9)


def test_ncen_paper_orthogonal_gradients():
    # g_ens = (0.5, 0.5): each cosine 1/sqrt(2); cos_i = 1/2. Equal norms: norm term 0.
    terms = loss_terms("ncen", ORTHOGONAL, lambda_cos=1.0, lambda_norm=1.0)
    assert terms["cos"].item() == pytest.approx(0.5, abs=1e-9)
    assert terms["norm"].item() == pytest.approx(0.0, abs=1e-12)


def test_ncen_paper_opposite_gradients_are_finite():
    # g_ens = 0: cosines are guarded to 0, so the direction term is 0 and nothing is NaN.
    terms = loss_terms("ncen", OPPOSITE, lambda_cos=1.0, lambda_norm=1.0)
    assert terms["cos"].item() == pytest.approx(0.0, abs=1e-9)
    assert terms["norm"].item() == pytest.approx(0.0, abs=1e-12)


def test_ncen_norm_term_matches_closed_form():
    grads = torch.randn(4, 8, 1, 3, 3, dtype=torch.float64)
    norms = grads.flatten(2).norm(dim=2)
    m = norms.mean(0)
    expected = (-((norms - m) ** 2) / m**2).mean()
    norm = loss_terms("ncen", grads, lambda_cos=0.0, lambda_norm=1.0)["norm"]
    assert norm.item() == pytest.approx(expected.item(), rel=1e-9)


def test_ncen_official_form_parallel():
    # c = (1, 1): L_cos = log(e * e + e * e) = 2 + log 2. a = (-1/3, 1/3), b_i = a_j / k:
    # a_1 b_1 = a_2 b_2 = -1/18: L_norm = log(2 exp(-1/18)).
    terms = loss_terms("ncen-official", PARALLEL, lambda_cos=1.0, lambda_norm=1.0)
    assert terms["cos"].item() == pytest.approx(2 + math.log(2), abs=1e-9)
    assert terms["norm"].item() == pytest.approx(math.log(2 * math.exp(-1 / 18)), abs=1e-9)


def test_ncen_weights_scale_terms():
    grads = torch.randn(3, 5, 1, 4, 4, dtype=torch.float64)
    one = regularizer("ncen", grads, lambda_cos=1.0, lambda_norm=0.0)
    six = regularizer("ncen", grads, lambda_cos=0.06, lambda_norm=0.0)
    assert six.item() == pytest.approx(0.06 * one.item(), rel=1e-9)


def test_gal_values():
    # one pair: log(exp(cos)); parallel cos 1, opposite -1, orthogonal 0 (times lambda 0.5).
    assert regularizer("gal", PARALLEL, lambda_gal=0.5).item() == pytest.approx(0.5, abs=1e-9)
    assert regularizer("gal", OPPOSITE, lambda_gal=0.5).item() == pytest.approx(-0.5, abs=1e-9)
    assert regularizer("gal", ORTHOGONAL, lambda_gal=0.5).item() == pytest.approx(0.0, abs=1e-9)


def test_gpmr_values():
    # k = 2: div = (cos + 1)^2; eq = mean_i (n_i - mean n)^2, per sample on g (norms 1, 2), or the
    # authors' way on G = g / (k B) (norms 0.5, 1 with k = 2, B = 1).
    t = loss_terms("gpmr-per-sample", PARALLEL, lambda_div=1.0, lambda_eq=1.0)
    assert t["div"].item() == pytest.approx(4.0, abs=1e-9)
    assert t["eq"].item() == pytest.approx(0.25, abs=1e-9)
    t = loss_terms("gpmr", PARALLEL, lambda_div=1.0, lambda_eq=1.0)
    assert t["div"].item() == pytest.approx(4.0, abs=1e-9)
    assert t["eq"].item() == pytest.approx(0.0625, abs=1e-9)
    t = loss_terms("gpmr", OPPOSITE, lambda_div=1.0, lambda_eq=1.0)
    assert t["div"].item() == pytest.approx(0.0, abs=1e-9)
    assert t["eq"].item() == pytest.approx(0.0, abs=1e-9)
    t = loss_terms("gpmr", ORTHOGONAL, lambda_div=1.0, lambda_eq=1.0)
    assert t["div"].item() == pytest.approx(1.0, abs=1e-9)


def test_baseline_has_no_terms():
    assert loss_terms("baseline", PARALLEL) == {}


@pytest.mark.parametrize(
    "fn",
    [
        lambda g: regularizer("ncen", g, lambda_cos=0.5, lambda_norm=0.5),
        lambda g: regularizer("ncen-official", g, lambda_cos=0.5, lambda_norm=0.5),
        lambda g: regularizer("gal", g, lambda_gal=0.5),
        lambda g: regularizer("gpmr", g, lambda_div=0.1, lambda_eq=10.0),
        lambda g: regularizer("gpmr-per-sample", g, lambda_div=0.1, lambda_eq=10.0),
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


@pytest.mark.parametrize("module", [baseline, ncen, gal, gpmr, adv_train])
def test_hyperparameter_defaults_live_only_in_the_registered_defense(module):
    """One ``terms`` per module, and none of its parameters has a default of its own (the only
    defaults are the Defense's Hyperparameter table)."""
    defaults = [
        p.name
        for p in inspect.signature(module.terms).parameters.values()
        if p.default is not inspect.Parameter.empty
    ]
    assert defaults == []
    assert not hasattr(module, "regularizer")


def test_registered_defaults_are_the_papers():
    assert DEFENSES.get("ncen").resolve("cifar10") == {"lambda_cos": 0.06, "lambda_norm": 0.04}
    assert DEFENSES.get("ncen").resolve("fashionmnist") == {"lambda_cos": 0.02, "lambda_norm": 0.02}
