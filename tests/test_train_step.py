"""The training step: exact double backprop against slow references, and the finite-diff mode."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ncen_cli.defenses import ncen as ncen_defense
from ncen_cli.defenses.base import Defense, DefenseInputs
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import UsageError
from ncen_cli.member_parallel import MemberExecutor, ThreadPlan, plan_threads
from ncen_cli.registry import DEFENSES
from ncen_cli.train_step import exact_step, finite_diff_step, training_step

K, B, SHAPE, CLASSES = 3, 8, (1, 8, 8), 3
HP = {"lambda_cos": 0.5, "lambda_norm": 0.5}  # large weights: the regularizer matters


def tiny_member() -> nn.Module:
    """conv-BN-ReLU-conv(stride 2)-BN-ReLU-pool-linear: (B, 1, 8, 8) -> (B, 3) logits."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, CLASSES),
    )


def make_case(seed: int = 0, dtype=torch.float64) -> tuple[Ensemble, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    ensemble = Ensemble([tiny_member() for _ in range(K)]).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(B, *SHAPE, generator=gen, dtype=dtype)
    y = torch.randint(0, CLASSES, (B,), generator=gen)
    return ensemble, x, y


def param_grad(ensemble: Ensemble) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in ensemble.parameters()])


def slow_input_grads(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g[i, b] = d CE(f_i(x_b), y_b) / d x_b, one member and one sample at a time (eval-mode BN,
    so that a sample's output does not depend on the rest of the batch). -> (k, B, *SHAPE)."""
    rows = []
    for member in ensemble.members:
        per_sample = []
        for b in range(len(x)):
            xb = x[b : b + 1].clone().requires_grad_(True)
            loss = F.cross_entropy(member(xb), y[b : b + 1])
            (g,) = torch.autograd.grad(loss, xb, create_graph=True)
            per_sample.append(g[0])
        rows.append(torch.stack(per_sample))
    return torch.stack(rows)


def slow_paper_regularizer(g: torch.Tensor, lambda_cos: float, lambda_norm: float) -> torch.Tensor:
    """Eqs. 2, 6, 9, 10 of the paper written with explicit loops over samples and members."""
    k, batch = g.shape[:2]
    total = g.new_zeros(())
    for b in range(batch):
        flat = [g[i, b].flatten() for i in range(k)]
        g_ens = sum(flat) / k
        norms = [f.norm() for f in flat]
        m = sum(norms) / k
        cs = [torch.dot(f, g_ens) / (f.norm() * g_ens.norm() + 1e-12) for f in flat]
        sample = g.new_zeros(())
        for i in range(k):
            loss_cos = cs[i] * sum(cs[j] for j in range(k) if j != i)
            others = sum(norms[j] - m for j in range(k) if j != i)
            loss_norm = (norms[i] - m) * others / (m**2 + 1e-12)
            sample = sample + lambda_norm * loss_norm + lambda_cos * loss_cos
        total = total + sample / k
    return total / batch


def slow_official_regularizer(
    g: torch.Tensor, lambda_cos: float, lambda_norm: float
) -> torch.Tensor:
    """The authors' log-sum-exp form with explicit loops over samples and members."""
    k, batch = g.shape[:2]
    total = g.new_zeros(())
    for b in range(batch):
        flat = [g[i, b].flatten() for i in range(k)]
        g_ens = sum(flat) / k
        norms = [f.norm() for f in flat]
        m = sum(norms) / k
        a = [(n - m) / (m + 1e-12) for n in norms]
        c = [torch.dot(f, g_ens) / (f.norm() * g_ens.norm() + 1e-12) for f in flat]
        l_norm = torch.log(sum(torch.exp(a[i] * sum(a[j] for j in range(k) if j != i) / k)
                               for i in range(k)))
        l_cos = torch.log(sum(torch.exp(c[i]) * sum(torch.exp(c[j]) for j in range(k) if j != i)
                              for i in range(k)))
        total = total + lambda_norm * l_norm + lambda_cos * l_cos
    return total / batch


@pytest.mark.parametrize(
    ("name", "slow_regularizer"),
    [("ncen", slow_paper_regularizer), ("ncen-official", slow_official_regularizer)],
)
def test_exact_regularizer_gradient_matches_slow_per_sample_implementation(name, slow_regularizer):
    ensemble, x, y = make_case()
    ensemble.eval()  # per-sample gradients are only well defined without batch statistics
    defense = DEFENSES.get(name)

    exact_step(ensemble, defense, HP, x, y)
    fast_total = param_grad(ensemble)
    ensemble.zero_grad(set_to_none=True)
    exact_step(ensemble, DEFENSES.get("baseline"), {}, x, y)
    fast_reg = fast_total - param_grad(ensemble)

    ensemble.zero_grad(set_to_none=True)
    reg = slow_regularizer(slow_input_grads(ensemble, x, y), **HP)
    reg.backward()
    slow_reg = param_grad(ensemble)

    assert slow_reg.norm() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(fast_reg, slow_reg, rtol=1e-5, atol=1e-5)
    assert torch.allclose(fast_reg, slow_reg, rtol=0, atol=1e-5 * float(slow_reg.abs().max()))


def test_exact_step_matches_backward_of_the_explicit_loss_in_train_mode():
    ensemble, x, y = make_case(seed=3)
    reference = copy.deepcopy(ensemble)
    out = exact_step(ensemble, DEFENSES.get("ncen"), HP, x, y)

    copies = [x.clone().requires_grad_(True) for _ in range(K)]
    logits = [m(c) for m, c in zip(reference.members, copies, strict=True)]
    ce = sum(F.cross_entropy(lg, y) for lg in logits) / K
    # each member's per-sample input gradients of the batch-summed CE (BN batch statistics on)
    grads = torch.autograd.grad(ce * K * B, copies, create_graph=True)
    loss = ce + ncen_defense.regularizer(torch.stack(grads), **HP)
    loss.backward()

    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param_grad(ensemble), param_grad(reference), rtol=1e-8, atol=1e-10)
    for a, b in zip(ensemble.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_finite_diff_gradient_agrees_with_exact(scheme):
    ensemble, x, y = make_case(seed=5)
    defense = DEFENSES.get("ncen")
    state = copy.deepcopy(ensemble.state_dict())
    exact_step(ensemble, defense, HP, x, y)
    exact_total = param_grad(ensemble)
    ensemble.load_state_dict(state)
    ensemble.zero_grad(set_to_none=True)
    exact_step(ensemble, DEFENSES.get("baseline"), {}, x, y)
    ce_part = param_grad(ensemble)

    ensemble.load_state_dict(state)
    ensemble.zero_grad(set_to_none=True)
    out = finite_diff_step(ensemble, defense, HP, x, y, fd_scale=1e-4, fd_scheme=scheme)
    fd_total = param_grad(ensemble)

    assert (exact_total - ce_part).norm() > 0.05 * exact_total.norm()  # the regularizer matters
    assert _cosine(fd_total, exact_total) >= 0.99
    assert _cosine(fd_total - ce_part, exact_total - ce_part) >= 0.95  # the regularizer's part
    assert torch.isfinite(out.loss)


def test_central_difference_is_more_accurate_than_forward():
    ensemble, x, y = make_case(seed=7)
    defense = DEFENSES.get("ncen")
    state = copy.deepcopy(ensemble.state_dict())
    exact_step(ensemble, defense, HP, x, y)
    exact_total = param_grad(ensemble)
    errors = {}
    for scheme in ("forward", "central"):
        ensemble.load_state_dict(state)
        ensemble.zero_grad(set_to_none=True)
        finite_diff_step(ensemble, defense, HP, x, y, fd_scale=1e-2, fd_scheme=scheme)
        errors[scheme] = float((param_grad(ensemble) - exact_total).norm())
    assert errors["central"] < errors["forward"]


def test_finite_diff_leaves_batchnorm_stats_as_a_single_pass_would():
    ensemble, x, y = make_case(seed=9, dtype=torch.float32)
    single = copy.deepcopy(ensemble)
    single(x)  # one forward pass in train mode: what the running statistics should see
    for scheme in ("forward", "central"):
        fd = copy.deepcopy(ensemble)
        finite_diff_step(fd, DEFENSES.get("ncen"), HP, x, y, fd_scheme=scheme)
        for (name, a), b in zip(fd.named_buffers(), single.buffers(), strict=True):
            assert torch.equal(a, b), f"{scheme}: {name} differs from a single pass"
    assert not torch.equal(single.members[0][1].running_mean, torch.zeros(4))  # stats did move


def test_finite_diff_without_input_gradients_is_the_plain_step():
    ensemble, x, y = make_case(seed=11)
    twin = copy.deepcopy(ensemble)
    baseline = DEFENSES.get("baseline")
    finite_diff_step(ensemble, baseline, {}, x, y)
    exact_step(twin, baseline, {}, x, y)
    torch.testing.assert_close(param_grad(ensemble), param_grad(twin))


def test_unknown_mode_and_scheme_are_usage_errors():
    ensemble, x, y = make_case(seed=13, dtype=torch.float32)
    with pytest.raises(UsageError, match="double-backprop"):
        training_step(ensemble, DEFENSES.get("ncen"), HP, x, y, double_backprop="fast")
    with pytest.raises(UsageError, match="scheme"):
        training_step(ensemble, DEFENSES.get("ncen"), HP, x, y, "finite-diff", fd_scheme="backward")


def _logit_and_gradient_defense():
    """A defense whose terms use both the logits and the input gradients (exercises d R / d
    logits in the exact step): entropy of the mean prediction plus the mean gradient norm."""

    def terms(inputs, weight):
        probs = inputs.logits.softmax(-1).mean(0)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        return {"entropy": weight * entropy, "norm": weight * inputs.input_grads.norm()}

    return Defense("logit-test", "test", {}, terms, needs_input_gradients=True, needs_logits=True)


def test_exact_step_routes_the_logits_gradient_of_the_terms():
    ensemble, x, y = make_case(seed=15)
    reference = copy.deepcopy(ensemble)
    defense = _logit_and_gradient_defense()
    exact_step(ensemble, defense, {"weight": 0.7}, x, y)

    copies = [x.clone().requires_grad_(True) for _ in range(K)]
    logits = torch.stack([m(c) for m, c in zip(reference.members, copies, strict=True)])
    ce = sum(F.cross_entropy(lg, y) for lg in logits) / K
    grads = torch.autograd.grad(ce * K * B, copies, create_graph=True)
    inputs = DefenseInputs(x, y, logits, torch.stack(grads))
    (ce + sum(defense.loss_terms(inputs, weight=0.7).values())).backward()
    torch.testing.assert_close(param_grad(ensemble), param_grad(reference), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["exact", "finite-diff"])
def test_member_threads_give_the_same_step_as_serial(mode):
    """One worker per member (the CPU default) computes exactly what the serial loop computes."""
    ensemble, x, y = make_case(seed=17, dtype=torch.float32)
    twin = copy.deepcopy(ensemble)
    defense = DEFENSES.get("ncen")
    serial = training_step(ensemble, defense, HP, x, y, mode)
    with MemberExecutor(K) as executor:
        threaded = training_step(twin, defense, HP, x, y, mode, executor=executor)
    assert torch.equal(serial.loss, threaded.loss)
    assert torch.equal(param_grad(ensemble), param_grad(twin))
    for a, b in zip(ensemble.buffers(), twin.buffers(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["exact", "finite-diff"])
def test_member_threads_run_under_the_callers_bf16_autocast(mode):
    """Autocast is thread-local: under ``--precision bf16`` (CPU autocast around the step) the
    member workers must compute their forward passes in bf16 too, giving what the serial step
    gives under the same autocast, with float32 parameter gradients."""
    ensemble, x, y = make_case(seed=5, dtype=torch.float32)
    twin = copy.deepcopy(ensemble)
    seen: list[torch.dtype] = []  # the first conv's output dtype, from whichever thread ran it
    for member in twin.members:
        member[0].register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    defense = DEFENSES.get("ncen")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        serial = training_step(ensemble, defense, HP, x, y, mode)
        with MemberExecutor(K) as executor:
            threaded = training_step(twin, defense, HP, x, y, mode, executor=executor)
    assert len(seen) >= K and set(seen) == {torch.bfloat16}
    assert torch.isfinite(threaded.loss) and torch.equal(serial.loss, threaded.loss)
    assert all(p.grad.dtype == torch.float32 for p in twin.parameters())
    assert torch.equal(param_grad(ensemble), param_grad(twin))


def test_member_executor_keeps_member_order_and_raises_worker_errors():
    with MemberExecutor(3) as executor:
        assert executor.map(lambda i: i * i, 5) == [0, 1, 4, 9, 16]

        def fail(i):
            raise ValueError(f"member {i}")

        with pytest.raises(ValueError, match="member"):
            executor.map(fail, 3)
    with pytest.raises(UsageError, match="member-threads"):
        MemberExecutor(0)


def test_thread_plan():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = plan_threads(cpu, k=3, threads=2, member_threads=None)
    if (os.cpu_count() or 1) >= 2:
        assert auto == ThreadPlan(member_threads=3, intra_op_threads=1)
    assert plan_threads(cpu, 3, 12, 3) == ThreadPlan(3, 4)  # the cores are shared out
    assert plan_threads(cpu, 3, 1, None) == ThreadPlan(1, 1)
    assert plan_threads(cpu, 3, 8, 1) == ThreadPlan(1, 8)
    assert plan_threads(cpu, 3, 8, 5) == ThreadPlan(3, 2)  # never more workers than members
    assert plan_threads(cuda, 3, 8, None) == ThreadPlan(1, 8)
    with pytest.raises(UsageError, match="does not apply"):
        plan_threads(cuda, 3, 8, 2)
    with pytest.raises(UsageError, match=">= 1"):
        plan_threads(cpu, 3, 8, 0)
