"""Property-based tests (hypothesis) for argument parsing and the regularizers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ncen_cli.cli.common import parse_float_list
from ncen_cli.defenses.base import DefenseInputs
from ncen_cli.ensemble import check_member_count, parse_members
from ncen_cli.errors import UsageError
from ncen_cli.registry import DEFENSES

ARCH = st.sampled_from(["resnet20", "resnet26", "resnet32"])


@given(st.lists(ARCH, min_size=2, max_size=6))
def test_member_lists_round_trip(names):
    assert parse_members(",".join(names)) == names
    assert parse_members(" , ".join(n.upper() for n in names)) == names


@given(st.integers(min_value=2, max_value=9), ARCH)
def test_counted_members(count, arch):
    assert parse_members(f"{count}x{arch}") == [arch] * count


@given(st.text(max_size=30))
def test_member_parsing_never_crashes(text):
    try:
        names = parse_members(text)
    except UsageError:
        return
    assert all(isinstance(n, str) for n in names)
    if len(names) < 2:  # the run spec refuses it with one line
        with pytest.raises(UsageError, match="at least 2 members"):
            check_member_count(len(names))


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=5))
def test_float_lists_round_trip(values):
    parsed = parse_float_list(",".join(repr(v) for v in values), "--eps")
    assert parsed == pytest.approx(values)


@given(st.text(alphabet="abc,;=.-e", min_size=1, max_size=12))
def test_float_list_errors_are_usage_errors(text):
    try:
        parse_float_list(text, "--eps")
    except UsageError as exc:
        assert "--eps" in str(exc)


def _registered(name: str, **hyperparameters: float):
    """The summed terms of registered defense ``name`` on input gradients g (k, B, *shape),
    through its ``loss_terms`` (what training calls)."""

    def regularizer(g: torch.Tensor) -> torch.Tensor:
        k, batch = g.shape[:2]
        inputs = DefenseInputs(
            g[0], torch.zeros(batch, dtype=torch.long), g.new_zeros(k, batch, 2), g
        )
        return sum(DEFENSES.get(name).loss_terms(inputs, **hyperparameters).values())

    return regularizer


REGULARIZERS = {
    "ncen": _registered("ncen", lambda_cos=0.06, lambda_norm=0.04),
    "ncen-official": _registered("ncen-official", lambda_cos=0.06, lambda_norm=0.04),
    "gal": _registered("gal", lambda_gal=0.5),
    "gpmr": _registered("gpmr", lambda_div=0.04, lambda_eq=10.0),
    "gpmr-per-sample": _registered("gpmr-per-sample", lambda_div=0.04, lambda_eq=10.0),
}
SCALE_INVARIANT = ("ncen", "ncen-official", "gal")


def grads_strategy():
    return st.tuples(
        st.integers(2, 5),
        st.integers(1, 4),
        st.integers(0, 2**31 - 1),
        st.sampled_from([1e-6, 1e-3, 1.0, 1e3]),
    )


@settings(max_examples=40, deadline=None)
@given(grads_strategy(), st.sampled_from(list(REGULARIZERS)))
def test_regularizers_are_finite_and_symmetric(params, name):
    k, batch, seed, scale = params
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, batch, 1, 3, 3, generator=gen, dtype=torch.float64) * scale
    if seed % 5 == 0:
        grads[0] = 0  # a member with an exactly-zero gradient
    value = REGULARIZERS[name](grads)
    assert math.isfinite(value.item())
    perm = torch.randperm(k, generator=gen)
    assert REGULARIZERS[name](grads[perm]).item() == pytest.approx(
        value.item(), rel=1e-9, abs=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(grads_strategy(), st.sampled_from(SCALE_INVARIANT), st.floats(1e-3, 1e3))
def test_direction_and_magnitude_terms_are_scale_invariant(params, name, factor):
    k, batch, seed, scale = params
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, batch, 1, 3, 3, generator=gen, dtype=torch.float64) * scale
    a = REGULARIZERS[name](grads).item()
    b = REGULARIZERS[name](grads * factor).item()
    assert b == pytest.approx(a, rel=1e-6, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_ncen_paper_norm_term_is_never_positive(k, seed):
    grads = torch.randn(k, 3, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert _registered("ncen", lambda_cos=0.0, lambda_norm=1.0)(grads).item() <= 1e-12
