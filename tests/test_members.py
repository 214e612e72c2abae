"""Member architectures, ensemble construction and the --members grammar."""

from __future__ import annotations

import pytest
import torch

from ncen_cli.archs import build_member
from ncen_cli.ensemble import Ensemble, build_ensemble, paper_ensemble, parse_members
from ncen_cli.errors import UsageError


@pytest.mark.parametrize("name,blocks", [("resnet20", 9), ("resnet26", 12), ("resnet32", 15)])
def test_resnet_depth_and_logits(name, blocks):
    model = build_member(name, (1, 28, 28), 10)
    assert len(model.layers) == blocks
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 6 * (blocks // 3) + 2  # convs + the linear head
    out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # logits, not probabilities


def test_three_channel_input_and_leaky_relu():
    model = build_member("resnet20", (3, 32, 32), 10, activation="leakyrelu")
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_ensemble_eval_reaches_members_and_combines():
    ens = build_ensemble(["resnet20", "resnet26"], (1, 12, 12), 4)
    ens.eval()
    assert all(not m.training for m in ens.modules())
    x = torch.rand(3, 1, 12, 12)
    logits = ens.member_logits(x)
    assert logits.shape == (2, 3, 4)
    assert torch.allclose(ens(x), logits.mean(0))
    prob = Ensemble(list(ens.members), combine="mean-prob").eval()
    assert torch.allclose(prob(x).exp().sum(1), torch.ones(3), atol=1e-5)


def test_parse_members():
    assert parse_members("resnet20,resnet26,resnet32") == ["resnet20", "resnet26", "resnet32"]
    assert parse_members("3xresnet20") == ["resnet20"] * 3
    assert parse_members("ensemble2-k4") == ["resnet26"] * 4
    assert parse_members("ensemble4") == ["resnet20", "resnet26", "resnet32"]
    assert paper_ensemble(4, 5) == ["resnet20"] * 2 + ["resnet26"] * 2 + ["resnet32"]
    assert parse_members("resnet20") == ["resnet20"]  # the count is the run spec's to check
    assert paper_ensemble(4, 0) == []


@pytest.mark.parametrize("members", ["resnet20", "ensemble1-k1", "ensemble4-k0"])
def test_one_member_count_check_at_the_run_spec_and_the_ensemble(members):
    from ncen_cli.training import train_from_names

    config = train_from_names(members)
    with pytest.raises(UsageError, match=f"at least 2 members, got {len(config.members)}$"):
        config.validate()
    with pytest.raises(UsageError, match="at least 2 members"):
        build_ensemble(config.members, (1, 12, 12), 4)


def test_unknown_member_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown arch 'resnet99'"):
        build_ensemble(["resnet20", "resnet99"], (1, 12, 12), 4)
