"""A naive NCEn reference written the way the authors' released code does it (benchmark baseline).

This is NOT library code and NOT a recommended implementation: it reproduces, for timing, the
habits of the authors' code (MiLabHITSZ/2022ZhangNCEn, as described in
../shared/notes/paper-digest.md), written from that description:

* torch's ``nn.Conv2d`` and ``nn.BatchNorm2d`` (not ncen's fast-double-backward layers);
* members return softmax probabilities and cross-entropy is applied on top of them
  (``log_softmax`` of the probabilities + NLL: the "double softmax");
* one Adam optimizer per member (k ``step()`` / ``zero_grad()`` calls);
* per-member detached clones of the batch and ONE ``autograd.grad(..., create_graph=True)``;
* the official log-sum-exp regularizer, member by member in Python lists;
* an ensemble wrapper that keeps its members in a plain list and, at evaluation, runs every member
  twice (once for the per-member outputs, once again for the averaged prediction);
* a torchvision-style data pipeline: a ``Dataset`` with per-sample PIL transforms and a
  ``DataLoader`` that collates one sample at a time; D_noise is a second dataset of noisy copies.

Same architecture (ncen's resnet20), same data and same hyperparameters as the ncen runs it is
compared with, so the timings compare implementations, not models.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ncen_cli.layers import use_torch_layers

EPS = 1e-12


class SoftmaxMember(nn.Module):
    """A member that returns probabilities (B, classes), as in the authors' code (with torch's
    layers)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = use_torch_layers(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.net(x), dim=1)


class ReferenceEnsemble:
    """Members in a plain list (so ``.eval()`` on the wrapper would not reach them)."""

    def __init__(self, members: list[SoftmaxMember]) -> None:
        self.members = members

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Average probability. Runs every member twice, as the authors' wrapper does."""
        outputs = [m(x) for m in self.members]  # per-member outputs (kept for "voting")
        _ = torch.stack(outputs).argmax(-1)
        total = 0
        for m in self.members:  # ... and the members again for the prediction
            total = total + m(x)
        return total / len(self.members)


def official_regularizer(
    grads: list[torch.Tensor], lambda_cos: float, lambda_norm: float
) -> torch.Tensor:
    """The authors' log-sum-exp form, member by member. grads: k tensors (B, C, H, W)."""
    k = len(grads)
    flat = [g.flatten(1) for g in grads]
    mean_grad = sum(flat) / k
    norms = [f.norm(dim=1) for f in flat]
    m = sum(norms) / k
    a = [(n - m) / (m + EPS) for n in norms]
    loss_norm_terms = []
    for i in range(k):
        b_i = sum(a[j] for j in range(k) if j != i) / k
        loss_norm_terms.append(torch.exp(a[i] * b_i))
    loss_norm = torch.log(sum(loss_norm_terms))
    c = [(f * mean_grad).sum(1) / (f.norm(dim=1) * mean_grad.norm(dim=1) + EPS) for f in flat]
    loss_cos_terms = []
    for i in range(k):
        others = sum(torch.exp(c[j]) for j in range(k) if j != i)
        loss_cos_terms.append(torch.exp(c[i]) * others)
    loss_cos = torch.log(sum(loss_cos_terms))
    return (lambda_norm * loss_norm + lambda_cos * loss_cos).mean()


def make_optimizers(members: list[SoftmaxMember], lr: float = 1e-3) -> list[torch.optim.Adam]:
    """One Adam per member, as the authors do."""
    return [torch.optim.Adam(m.parameters(), lr=lr) for m in members]


def reference_step(
    members: list[SoftmaxMember],
    optimizers: list[torch.optim.Optimizer],
    x: torch.Tensor,
    y: torch.Tensor,
    lambda_cos: float = 0.02,
    lambda_norm: float = 0.02,
) -> float:
    """One authors'-style NCEn step (forward, double backprop, k optimizer steps). Returns loss."""
    for opt in optimizers:
        opt.zero_grad()
    k = len(members)
    clones = [x.clone().detach().requires_grad_(True) for _ in range(k)]
    ce_losses = []
    for member, xi in zip(members, clones, strict=True):
        prob = member(xi)
        ce_losses.append(F.cross_entropy(prob, y))  # CE on top of softmax ("double softmax")
    ce = sum(ce_losses) / k
    grads = torch.autograd.grad(ce, clones, create_graph=True)
    loss = ce + official_regularizer(list(grads), lambda_cos, lambda_norm)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------
# Whole-run reference: torchvision-style data pipeline, training epoch(s), evaluation each epoch.


class _PerSampleDataset(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images served one PIL image at a time through torchvision transforms.

    With ``noise_sigma`` > 0 the sample gets Gaussian noise added and is clipped (the D_noise copy).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, padding: int, noise_sigma: float) -> None:
        from torchvision import transforms

        self.x, self.y, self.noise_sigma = x, y, noise_sigma
        self.transform = transforms.Compose(
            [transforms.RandomCrop(x.shape[-1], padding=padding), transforms.ToTensor()]
        )

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img = self.x[index]
        pil = Image.fromarray(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy())
        t = self.transform(pil)
        if self.noise_sigma > 0:
            t = (t + torch.randn_like(t) * self.noise_sigma).clamp(0, 1)
        return t, int(self.y[index])


def reference_train(
    arrays,
    members_arch: list[str],
    epochs: int = 1,
    batch_size: int = 64,
    lambda_cos: float = 0.02,
    lambda_norm: float = 0.02,
    padding: int = 2,
    noise_eps: float = 0.3,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Train like the authors' script: DataLoader over D + D_noise, k optimizers, eval each epoch.

    ``arrays``: an ``ncen_cli.data.ImageArrays``; ``device``: where the members run (the data
    pipeline stays on the CPU, as in the authors' script). Returns seconds and the final test
    accuracy.
    """
    from ncen_cli.archs import build_member

    torch.manual_seed(seed)
    started = time.perf_counter()
    members = [
        SoftmaxMember(build_member(name, arrays.input_shape, arrays.num_classes)).to(device)
        for name in members_arch
    ]
    optimizers = make_optimizers(members)
    data = torch.utils.data.ConcatDataset(
        [
            _PerSampleDataset(arrays.train_x, arrays.train_y, padding, 0.0),
            _PerSampleDataset(arrays.train_x, arrays.train_y, padding, noise_eps / 2),
        ]
    )
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0)
    test = torch.utils.data.TensorDataset(arrays.test_x.float() / 255.0, arrays.test_y)
    test_loader = torch.utils.data.DataLoader(test, batch_size=500, shuffle=False)
    wrapper = ReferenceEnsemble(members)
    accuracy = 0.0
    for _ in range(epochs):
        for m in members:
            m.train()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            reference_step(members, optimizers, xb, yb, lambda_cos, lambda_norm)
        for m in members:
            m.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in test_loader:
                xb, yb = xb.to(device), yb.to(device)
                correct += int((wrapper(xb).argmax(1) == yb).sum())
        accuracy = correct / len(test)
    return {"seconds": time.perf_counter() - started, "test_accuracy": accuracy}
