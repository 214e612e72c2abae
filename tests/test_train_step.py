"""The training step: exact double backprop against slow references, and the forward-mode (jvp)
step against exact."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ncen_cli.archs import build_member
from ncen_cli.defenses import ncen as ncen_defense
from ncen_cli.defenses.base import Defense, DefenseInputs
from ncen_cli.ensemble import Ensemble
from ncen_cli.errors import UsageError
from ncen_cli.member_parallel import MemberExecutor, ThreadPlan, plan_threads
from ncen_cli.registry import DEFENSES
from ncen_cli.train_step import exact_step, jvp_step, training_step

K, B, SHAPE, CLASSES = 3, 8, (1, 8, 8), 3
HP = {"lambda_cos": 0.5, "lambda_norm": 0.5}  # large weights: the regularizer matters


def tiny_member() -> nn.Module:
    """conv-BN-ReLU-conv(stride 2)-BN-ReLU-pool-linear: (B, 1, 8, 8) -> (B, 3) logits."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, CLASSES),
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
        l_norm = torch.log(
            sum(torch.exp(a[i] * sum(a[j] for j in range(k) if j != i) / k) for i in range(k))
        )
        l_cos = torch.log(
            sum(
                torch.exp(c[i]) * sum(torch.exp(c[j]) for j in range(k) if j != i) for i in range(k)
            )
        )
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
    inputs = DefenseInputs(x, y, torch.stack(logits), torch.stack(grads))
    loss = ce + sum(ncen_defense.DEFENSE.loss_terms(inputs, **HP).values())
    loss.backward()

    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(param_grad(ensemble), param_grad(reference), rtol=1e-8, atol=1e-10)
    for a, b in zip(ensemble.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


RESNET_HP = {
    "ncen": HP,
    "ncen-official": HP,
    "gal": {"lambda_gal": 0.5},
    "gpmr": {"lambda_div": 0.1, "lambda_eq": 10.0},
}


@pytest.fixture(scope="module")
def resnet_case():
    """3 x resnet20 (ncen's layers) in float64, train mode, a 4-image 28 x 28 batch; and the
    parameter gradient of the mean CE alone (the step without a regularizer)."""
    torch.manual_seed(21)
    ensemble = Ensemble([build_member("resnet20", (1, 28, 28), 10) for _ in range(3)]).double()
    ensemble.train()
    gen = torch.Generator().manual_seed(22)
    x = torch.rand(4, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=gen)
    plain = copy.deepcopy(ensemble)
    exact_step(plain, DEFENSES.get("baseline"), {}, x, y)
    return ensemble, x, y, param_grad(plain)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(RESNET_HP))
def test_jvp_step_equals_exact_on_resnet20_in_float64(resnet_case, name):
    """Whole parameter gradient and its regularizer-only part (whole minus the CE-only gradient)
    to 1e-10 relative; the same loss; BatchNorm buffers equal to exact's after one step."""
    ensemble, x, y, ce_part = resnet_case
    results = {}
    for step in (exact_step, jvp_step):
        twin = copy.deepcopy(ensemble)
        out = step(twin, DEFENSES.get(name), RESNET_HP[name], x, y)
        results[step] = (out, param_grad(twin), list(twin.buffers()))
    (exact_out, exact_grad, exact_buffers), (jvp_out, jvp_grad, jvp_buffers) = results.values()
    exact_reg, jvp_reg = exact_grad - ce_part, jvp_grad - ce_part
    assert exact_reg.norm() > 1e-4 * exact_grad.norm()  # the regularizer part is not empty
    assert _relative(jvp_grad, exact_grad) <= 1e-10
    assert _relative(jvp_reg, exact_reg) <= 1e-10
    torch.testing.assert_close(jvp_out.loss, exact_out.loss, rtol=1e-12, atol=0)
    for a, b in zip(jvp_buffers, exact_buffers, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    moved = [b for b in exact_buffers if b.dtype == torch.float64]
    assert not all(torch.equal(a, b) for a, b in zip(moved, ensemble.buffers(), strict=False))


def test_jvp_step_equals_exact_in_float32():
    """Tiny members built from torch's own layers (nn.BatchNorm2d runs as ncen's under jvp)."""
    ensemble, x, y = make_case(seed=5, dtype=torch.float32)
    twin = copy.deepcopy(ensemble)
    plain = copy.deepcopy(ensemble)
    exact_step(ensemble, DEFENSES.get("ncen"), HP, x, y)
    jvp_step(twin, DEFENSES.get("ncen"), HP, x, y)
    exact_step(plain, DEFENSES.get("baseline"), {}, x, y)
    ce_part = param_grad(plain)
    reg = param_grad(ensemble) - ce_part
    assert reg.norm() > 0.05 * param_grad(ensemble).norm()
    assert _relative(param_grad(twin), param_grad(ensemble)) <= 1e-5
    assert _relative(param_grad(twin) - ce_part, reg) <= 1e-5
    for a, b in zip(twin.buffers(), ensemble.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    assert all(type(m[1]) is nn.BatchNorm2d for m in twin.members)  # classes given back


def test_no_approximate_mode_remains():
    """Every approximate regularizer gradient must be reported with its R-part cosine; the only
    one (finite-diff, R-part cosine 0.08 at initialisation) is retired: the name is now an alias
    of the exact default, whose R part equals exact's (cosine 1)."""
    from ncen_cli.train_step import DEFAULT_DOUBLE_BACKPROP, DOUBLE_BACKPROP_MODES

    assert set(DOUBLE_BACKPROP_MODES) == {"jvp", "exact", "finite-diff"}
    assert DEFAULT_DOUBLE_BACKPROP in ("jvp", "exact")
    ensemble, x, y = make_case(seed=9)
    plain, exact, alias = (copy.deepcopy(ensemble) for _ in range(3))
    exact_step(plain, DEFENSES.get("baseline"), {}, x, y)
    exact_step(exact, DEFENSES.get("ncen"), HP, x, y)
    training_step(alias, DEFENSES.get("ncen"), HP, x, y, "finite-diff")
    ce_part = param_grad(plain)
    r_cosine = _cosine(param_grad(alias) - ce_part, param_grad(exact) - ce_part)
    assert r_cosine >= 1 - 1e-12


def test_finite_diff_is_a_deprecated_alias_of_the_default(caplog):
    import ncen_cli.train_step as train_step

    train_step._finite_diff_warned = False
    ensemble, x, y = make_case(seed=19, dtype=torch.float32)
    twin = copy.deepcopy(ensemble)
    with caplog.at_level("WARNING", logger="ncen_cli.train_step"):
        training_step(ensemble, DEFENSES.get("ncen"), HP, x, y, "finite-diff")
        training_step(ensemble, DEFENSES.get("ncen"), HP, x, y, "finite-diff")
    warnings = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()  # once, one line
    training_step(twin, DEFENSES.get("ncen"), HP, x, y, train_step.DEFAULT_DOUBLE_BACKPROP)
    training_step(twin, DEFENSES.get("ncen"), HP, x, y, train_step.DEFAULT_DOUBLE_BACKPROP)
    assert torch.equal(param_grad(ensemble), param_grad(twin))


def test_jvp_refuses_a_layer_without_a_correct_forward_mode_rule():
    ensemble, x, y = make_case(seed=23, dtype=torch.float32)
    ensemble.members[1][1] = nn.SyncBatchNorm(4)
    with pytest.raises(UsageError, match=r"jvp does not support layer '1' \(.*SyncBatchNorm\)"):
        jvp_step(ensemble, DEFENSES.get("ncen"), HP, x, y)


def test_jvp_without_input_gradients_is_the_plain_step():
    ensemble, x, y = make_case(seed=11)
    twin = copy.deepcopy(ensemble)
    baseline = DEFENSES.get("baseline")
    jvp_step(ensemble, baseline, {}, x, y)
    exact_step(twin, baseline, {}, x, y)
    torch.testing.assert_close(param_grad(ensemble), param_grad(twin))


def test_unknown_mode_is_a_usage_error():
    ensemble, x, y = make_case(seed=13, dtype=torch.float32)
    with pytest.raises(UsageError, match="double-backprop"):
        training_step(ensemble, DEFENSES.get("ncen"), HP, x, y, double_backprop="fast")


def _logit_and_gradient_defense():
    """A defense whose terms use both the logits and the input gradients (exercises d R / d
    logits in the exact step): entropy of the mean prediction plus the mean gradient norm."""

    def terms(inputs, weight):
        probs = inputs.logits.softmax(-1).mean(0)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        return {"entropy": weight * entropy, "norm": weight * inputs.input_grads.norm()}

    return Defense("logit-test", "test", {}, terms, needs_input_gradients=True, needs_logits=True)


@pytest.mark.parametrize("step", [exact_step, jvp_step])
def test_step_routes_the_logits_gradient_of_the_terms(step):
    ensemble, x, y = make_case(seed=15)
    reference = copy.deepcopy(ensemble)
    defense = _logit_and_gradient_defense()
    step(ensemble, defense, {"weight": 0.7}, x, y)

    copies = [x.clone().requires_grad_(True) for _ in range(K)]
    logits = torch.stack([m(c) for m, c in zip(reference.members, copies, strict=True)])
    ce = sum(F.cross_entropy(lg, y) for lg in logits) / K
    grads = torch.autograd.grad(ce * K * B, copies, create_graph=True)
    inputs = DefenseInputs(x, y, logits, torch.stack(grads))
    (ce + sum(defense.loss_terms(inputs, weight=0.7).values())).backward()
    torch.testing.assert_close(param_grad(ensemble), param_grad(reference), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", ["exact", "jvp"])
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


@pytest.mark.parametrize("mode", ["exact", "jvp"])
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
