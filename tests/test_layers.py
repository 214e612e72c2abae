"""ncen's layers compute exactly what torch's layers compute: double backward, and forward mode
differentiated in reverse (reverse-over-forward)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

from ncen_cli.errors import UsageError
from ncen_cli.layers import (
    BatchNorm2d,
    Conv2d,
    forward_mode_layers,
    input_gradients_only,
    use_torch_layers,
)
from ncen_cli.layers.batchnorm import _BatchNormTrain


def _pair(affine: bool, momentum: float | None = 0.1):
    torch.manual_seed(0)
    reference = nn.BatchNorm2d(5, affine=affine, momentum=momentum).double()
    if affine:
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-0.5, 0.5)
    fast = BatchNorm2d(5, affine=affine, momentum=momentum).double()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _second_order(bn: nn.Module, x: torch.Tensor, upstream: torch.Tensor, head: torch.Tensor):
    """Gradients of <upstream, d loss / d x> + a weight-gradient term, w.r.t. x and the params,
    where loss = sum(head * tanh(bn(x))) (tanh: a non-linear head so that every term is active)."""
    x = x.clone().requires_grad_(True)
    params = list(bn.parameters())
    loss = (head * torch.tanh(bn(x))).sum()
    wanted = [x, *params]
    first = torch.autograd.grad(loss, wanted, create_graph=True)
    objective = (first[0] * upstream).sum() + sum((g * g).sum() for g in first[1:])
    return [first[0].detach(), *torch.autograd.grad(objective, wanted)]


@pytest.mark.parametrize("affine", [True, False])
def test_double_backward_matches_torch(affine):
    reference, fast = _pair(affine)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 4, 3, generator=gen, dtype=torch.float64) * 2 + 0.5
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    head = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    expected = _second_order(reference.train(), x, upstream, head)
    got = _second_order(fast.train(), x, upstream, head)
    assert len(got) == len(expected) == (4 if affine else 2)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for a, b in zip(fast.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradgradcheck_against_finite_differences():
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, dtype=torch.float64).add_(0.5).requires_grad_(True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(inp, weight, bias):
        stats = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
        return torch.tanh(_BatchNormTrain.apply(inp, weight, bias, *stats, 0.1, 1e-5)[0])

    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_eval_mode_and_cumulative_momentum_behave_like_torch():
    reference, fast = _pair(True, momentum=None)
    x = torch.randn(8, 5, 2, 2, dtype=torch.float64)
    for _ in range(3):
        torch.testing.assert_close(fast.train()(x), reference.train()(x))
    torch.testing.assert_close(fast.running_var, reference.running_var)
    assert int(fast.num_batches_tracked) == 3
    torch.testing.assert_close(fast.eval()(x), reference.eval()(x))
    assert fast.state_dict().keys() == reference.state_dict().keys()


CONV_CASES = [
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=1, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=True),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=1, padding=2, dilation=2, groups=2),
    dict(in_channels=2, out_channels=3, kernel_size=1, stride=2, padding=0, bias=True),
]


def _conv_pair(case):
    torch.manual_seed(2)
    reference = nn.Conv2d(**case).double()
    fast = Conv2d(**case).double()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_double_backward_matches_torch(case):
    reference, fast = _conv_pair(case)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, case["in_channels"], 9, 9, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out_shape = reference(x).shape
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    head = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    expected = _second_order(reference, x, upstream, head)
    got = _second_order(fast, x, upstream, head)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", CONV_CASES[:2])
def test_conv_gradgradcheck_against_finite_differences(case):
    _, fast = _conv_pair(case)
    x = torch.randn(2, case["in_channels"], 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda inp: torch.tanh(fast(inp)), (x,))
    assert torch.autograd.gradgradcheck(
        lambda w: torch.tanh(torch.nn.functional.conv2d(x.detach(), w)), (fast.weight,)
    )


def test_input_gradients_only_gives_the_same_double_backward():
    """For a forward run inside the marker the layers skip parameter-gradient graphs; what is
    asked for (the input gradient and its derivative w.r.t. the parameters) is unchanged."""
    torch.manual_seed(4)
    reference = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1),
    ).double()
    fast = nn.Sequential(
        Conv2d(2, 4, 3, padding=1), BatchNorm2d(4), nn.Tanh(), Conv2d(4, 3, 3, stride=2, padding=1)
    ).double()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    results = []
    for net, marked in ((reference, False), (fast, True)):
        xi = x.clone().requires_grad_(True)
        if marked:
            with input_gradients_only():
                loss = net(xi).pow(2).sum()
        else:
            loss = net(xi).pow(2).sum()
        (g,) = torch.autograd.grad(loss, xi, create_graph=True)
        g.pow(2).sum().backward()
        results.append([g.detach(), *[p.grad for p in net.parameters()]])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _fast_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        Conv2d(2, 4, 3, padding=1), BatchNorm2d(4), nn.Tanh(), Conv2d(4, 3, 3, stride=2, padding=1)
    ).double()


def _input_only_member(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Input gradient of a forward marked input-only, then the parameters' gradient of its
    squared norm (the double backward NCEn takes)."""
    xi = x.clone().requires_grad_(True)
    with input_gradients_only():
        loss = net(xi).pow(2).sum()
    (g,) = torch.autograd.grad(loss, xi, create_graph=True)
    g.pow(2).sum().backward()
    return [g.detach(), *[p.grad.clone() for p in net.parameters()]]


def _parameter_member(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Parameter gradients taken with create_graph=True (needs the layers' parameter-gradient
    graphs), then the gradient of their squared norm."""
    loss = net(x).pow(2).sum()
    grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), list(net.parameters()))
    return [g.detach() for g in grads] + list(second)


def test_input_only_switch_is_per_member_across_threads():
    """Member A runs inside input_gradients_only on one thread and keeps the block open while
    member B, on another thread, runs a forward and a create_graph backward that needs parameter
    gradients. B's gradients equal those of B run alone (a process-wide switch read during
    backward dropped them), and A's equal those of A run alone."""
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net_a, net_b = _fast_net(2), _fast_net(3)
    expected_a = _input_only_member(copy.deepcopy(net_a), x)
    expected_b = _parameter_member(copy.deepcopy(net_b), x)

    a_inside, b_done = threading.Barrier(2, timeout=60), threading.Barrier(2, timeout=60)
    got: dict[str, object] = {}

    def member_a() -> None:
        try:
            xi = x.clone().requires_grad_(True)
            with input_gradients_only():
                loss = net_a(xi).pow(2).sum()
                a_inside.wait()  # A's block is open ...
                b_done.wait()  # ... for all of B's forward and backward
            (g,) = torch.autograd.grad(loss, xi, create_graph=True)
            g.pow(2).sum().backward()
            got["a"] = [g.detach(), *[p.grad.clone() for p in net_a.parameters()]]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            got["a"] = exc

    def member_b() -> None:
        try:
            a_inside.wait()
            got["b"] = _parameter_member(net_b, x)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            got["b"] = exc
        finally:
            b_done.wait()

    threads = [threading.Thread(target=member_a), threading.Thread(target=member_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for name, expected in (("a", expected_a), ("b", expected_b)):
        result = got[name]
        assert not isinstance(result, BaseException), f"member {name}: {result!r}"
        for mine, alone in zip(result, expected, strict=True):
            torch.testing.assert_close(mine, alone, rtol=1e-10, atol=1e-12)


def _small_net() -> nn.Sequential:
    """conv-BN-ReLU-conv(stride 2)-BN-ReLU-pool-linear with ncen's layers:
    (B, 1, 8, 8) -> (B, 3)."""
    return nn.Sequential(
        Conv2d(1, 4, 3, padding=1),
        BatchNorm2d(4),
        nn.ReLU(),
        Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
        BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _double_backward_under_bf16(net: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor):
    """Parameter gradient of CE + <d CE / d x, v> with the forward under CPU bf16 autocast."""
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce = nn.functional.cross_entropy(net(xi).float(), y, reduction="sum")
        (g,) = torch.autograd.grad(ce, xi, create_graph=True)
        (ce + (g * v).sum()).backward()
    return g.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])


def test_cpu_bf16_autocast_runs_ncens_double_backward_close_to_torchs():
    """``--precision bf16`` on the CPU: ncen's layers run on the autocast-cast tensors (bf16
    activations, float32 parameters and gradients) and give what torch's layers give under the
    same autocast, to bf16 rounding."""
    torch.manual_seed(3)
    fast = _small_net()
    torch_twin = use_torch_layers(copy.deepcopy(fast))
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    v = torch.randn(x.shape, generator=gen) * 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast[1](fast[0](x.requires_grad_(True)))
        assert out.dtype == torch.bfloat16
        assert type(out.grad_fn).__name__.startswith("_BatchNormTrain")
        assert type(fast[0](x).grad_fn).__name__.startswith("_Conv2dFunction")
    g_fast, grad_fast = _double_backward_under_bf16(fast, x.detach(), y, v)
    g_torch, grad_torch = _double_backward_under_bf16(torch_twin, x.detach(), y, v)
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters())
    cos = nn.functional.cosine_similarity
    assert cos(g_fast.flatten(), g_torch.flatten(), dim=0) > 0.999
    # measured: 0.99997 and 0.8 % apart, while either is 4.8 % from float32 (bf16 rounding)
    assert cos(grad_fast, grad_torch, dim=0) > 0.9995
    assert (grad_fast - grad_torch).norm() < 0.02 * grad_torch.norm()


def _hvp_by_double_backprop(net: nn.Module, x: torch.Tensor, head: torch.Tensor, v: torch.Tensor):
    """Parameter gradient of loss + <d loss / d x, v>, loss = sum(head * tanh(net(x))), by double
    backpropagation. -> (flat parameter gradient, flat buffers after the pass)."""
    xi = x.clone().requires_grad_(True)
    loss = (head * torch.tanh(net(xi))).sum()
    (g,) = torch.autograd.grad(loss, xi, create_graph=True)
    grads = torch.autograd.grad(loss + (g * v).sum(), list(net.parameters()))
    return torch.cat([t.flatten() for t in grads]), torch.cat(
        [b.flatten().double() for b in net.buffers()]
    )


def _hvp_by_forward_mode(net: nn.Module, x: torch.Tensor, head: torch.Tensor, v: torch.Tensor):
    """The same by reverse-over-forward: one dual forward along v gives loss and
    <d loss / d x, v> (its tangent), then one reverse pass over the parameters."""
    with forward_mode_layers([net]), forward_ad.dual_level():
        out, tangent = forward_ad.unpack_dual(net(forward_ad.make_dual(x, v)))
        # d/dt sum(head * tanh(out + t tangent)) = sum(head * (1 - tanh^2) * tangent)
        directional = (head * (1 - torch.tanh(out) ** 2) * tangent).sum()
        loss = (head * torch.tanh(out)).sum()
    grads = torch.autograd.grad(loss + directional, list(net.parameters()))
    return torch.cat([t.flatten() for t in grads]), torch.cat(
        [b.flatten().double() for b in net.buffers()]
    )


def _forward_mode_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64)
    head = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    return x, head, torch.randn(x.shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_reverse_over_forward_equals_double_backprop(momentum):
    """Through ncen's Conv2d and train-mode BatchNorm2d (ReLU, strided conv, pooling between):
    the forward-mode rule differentiated in reverse gives torch's double-backprop parameter
    gradient to 1e-10, and updates the running statistics as one ordinary forward does."""
    torch.manual_seed(5)
    net = _small_net().double()
    for sub in net.modules():
        if isinstance(sub, BatchNorm2d):
            sub.momentum = momentum
            with torch.no_grad():
                sub.weight.uniform_(0.5, 1.5)
    reference = use_torch_layers(copy.deepcopy(net))
    x, head, v = _forward_mode_case(6)
    expected, expected_buffers = _hvp_by_double_backprop(reference, x, head, v)
    got, got_buffers = _hvp_by_forward_mode(net, x, head, v)
    assert expected.norm() > 1e-2
    assert float((got - expected).norm() / expected.norm()) <= 1e-10
    torch.testing.assert_close(got_buffers, expected_buffers, rtol=0, atol=0)


def test_torch_batchnorm_runs_as_ncens_under_forward_mode_layers():
    """torch's own nn.BatchNorm2d (wrong second-order JVP in torch 2.14.1) is handled by ncen's
    rule inside the block, and gets its class back afterwards; batch statistics without running
    statistics (track_running_stats=False) also take ncen's rule."""
    torch.manual_seed(7)
    net = use_torch_layers(_small_net().double())
    net[4] = nn.BatchNorm2d(6, track_running_stats=False).double()
    reference = copy.deepcopy(net)
    x, head, v = _forward_mode_case(8)
    expected, _ = _hvp_by_double_backprop(reference, x, head, v)
    got, _ = _hvp_by_forward_mode(net, x, head, v)
    assert float((got - expected).norm() / expected.norm()) <= 1e-10
    assert type(net[1]) is nn.BatchNorm2d and type(net[4]) is nn.BatchNorm2d


def test_forward_mode_layers_refuses_other_torch_batch_norms_by_name():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UsageError, match=r"layer '1' \(torch.nn.modules.batchnorm.BatchNorm1d\)"):
        with forward_mode_layers([net]):
            pass
    net.eval()  # running statistics: an affine map, torch's rule is right
    with forward_mode_layers([net]):
        pass


def test_forward_mode_under_cpu_bf16_autocast_is_close_to_double_backprop():
    """``--precision bf16``: the dual forward runs in bf16 like the exact path; the two agree to
    bf16 rounding."""
    torch.manual_seed(3)
    net = _small_net()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    head = torch.randn(16, 3, generator=gen)
    v = torch.randn(x.shape, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = _hvp_by_double_backprop(copy.deepcopy(net), x, head, v)
        got, _ = _hvp_by_forward_mode(net, x, head, v)
    assert nn.functional.cosine_similarity(got, expected, dim=0) > 0.999
    assert (got - expected).norm() < 0.03 * expected.norm()
