"""Every built-in defense against a transcription of its reference code, on one fixed batch.

The oracles below marked TRANSCRIPTION are line-by-line transcriptions of the authors' released
code (MiLabHITSZ/2022ZhangNCEn, src/train_engine.py: ``get_project_loss_new`` branches
'project_loss' (their GAL) and 'GPMR', ``get_project_loss_NC``, and the training loop's gradient
computation), with ``.cuda()`` replaced by the input's device and ``args.*`` made parameters. The
authors' code has no paper form of NCEn; its oracle transcribes the paper's eqs. 2, 6, 9, 10.

Members are three real resnet20s in train mode (BatchNorm batch statistics) in float64. The
authors' input gradients are those of (1/k) sum_i mean_b CE_i; ncen's are those of each member's
batch-summed CE, taken by the training step's own member pass. Each defense's ``loss_terms`` on
ncen's gradients must equal the transcription on the authors' gradients to 1e-6 relative.
"""

from __future__ import annotations

from itertools import combinations

import pytest
import torch

from ncen_cli.archs.base import build_member
from ncen_cli.defenses.base import DefenseInputs
from ncen_cli.registry import DEFENSES
from ncen_cli.train_step import _member_pass

K, B, SHAPE, CLASSES = 3, 8, (1, 28, 28), 10


# ---- TRANSCRIPTION of train_engine.py (authors' code), argument names kept -------------------


def authors_gal(x_grads):
    """TRANSCRIPTION: get_project_loss_new, diversity_loss_type == 'project_loss'."""
    x_combinations = list(combinations(x_grads, 2))
    proj_loss = 0
    for combine in x_combinations:
        a = combine[0].view(combine[0].size(0), -1)
        b = combine[1].view(combine[1].size(0), -1)
        cosine_similarity = torch.cosine_similarity(a, b, dim=1)

        proj_loss += torch.exp(cosine_similarity)

    proj_loss = torch.log(proj_loss).mean()

    return 0.5 * proj_loss


def authors_gpmr(x_grads, model_num, data_name):
    """TRANSCRIPTION: get_project_loss_new, diversity_loss_type == 'GPMR'."""
    div_loss = 0
    eq_loss = 0
    x_combinations = list(combinations(x_grads, 2))
    for combine in x_combinations:
        a = combine[0].view(combine[0].size(0), -1)
        b = combine[1].view(combine[1].size(0), -1)
        cosine_similarity = torch.cosine_similarity(a, b, dim=1)
        div = cosine_similarity + (1 / (model_num - 1))
        div = torch.mul(div, div)

        div_loss += div
    div_loss = (2 / (model_num * (model_num - 1))) * div_loss
    div_loss = div_loss.mean()

    for i in range(model_num):
        eq1 = torch.norm(x_grads[i], p=2)
        eq2 = 0
        for j in range(model_num):
            eq2 += torch.norm(x_grads[j], p=2)
        eq2 = eq2 / model_num
        eq = eq1 - eq2
        eq = torch.mul(eq, eq)
        eq_loss += eq
    eq_loss = eq_loss / model_num
    eq_loss = eq_loss.mean()

    if data_name == "cifar10":
        return 0.04 * div_loss + 10 * eq_loss
    elif data_name == "fashion_mnist":
        return 0.1 * div_loss + 10 * eq_loss


def authors_nc(x_grads, model_num, para_norm, para_cos):
    """TRANSCRIPTION: get_project_loss_NC ('norm_cos' branch)."""
    dev = x_grads[0].device
    norm = torch.zeros(x_grads[0].size(0), dtype=x_grads[0].dtype, device=dev)
    g = torch.zeros(
        x_grads[0].size(0),
        x_grads[0].size(1),
        x_grads[0].size(2),
        x_grads[0].size(3),
        dtype=x_grads[0].dtype,
        device=dev,
    )
    gn = torch.zeros(x_grads[0].size(0), dtype=x_grads[0].dtype, device=dev)
    for i in range(model_num):
        g += x_grads[i] / model_num
        xi = x_grads[i].view(x_grads[i].size(0), -1)
        gn += torch.div(torch.norm(xi, dim=1), model_num)

    for i in range(model_num):
        xi = x_grads[i].view(x_grads[i].size(0), -1)
        a = torch.norm(xi, dim=1) - gn
        a = torch.div(a, gn)
        b = torch.zeros(x_grads[0].size(0), dtype=x_grads[0].dtype, device=dev)
        for j in range(model_num):
            if j != i:
                xj = x_grads[j].view(x_grads[j].size(0), -1)
                tmp = torch.norm(xj, dim=1) - gn
                tmp = torch.div(tmp, gn)
                b += tmp / model_num
        proj = torch.mul(a, b)
        norm += torch.exp(proj)
    norm_loss = torch.log(norm).mean()

    cos = torch.zeros(x_grads[0].size(0), dtype=x_grads[0].dtype, device=dev)
    qn = g.view(g.size(0), -1)
    for i in range(model_num):
        fi = x_grads[i].view(x_grads[i].size(0), -1)
        cos1 = torch.cosine_similarity(fi, qn, dim=1)
        cos1 = torch.exp(cos1)
        cos2 = torch.zeros(x_grads[0].size(0), dtype=x_grads[0].dtype, device=dev)
        for j in range(model_num):
            if j != i:
                fj = x_grads[j].view(x_grads[j].size(0), -1)
                tmp = torch.cosine_similarity(fj, qn, dim=1)
                cos2 += torch.exp(tmp)
        cos += torch.mul(cos1, cos2)
    cos_loss = torch.log(cos).mean()
    return para_norm * norm_loss + para_cos * cos_loss


def authors_gradients(model_list, x_train, y_train):
    """TRANSCRIPTION: the training loop's gradient computation (GPMR / norm_cos branches).

    Returns (ce_loss, x_grads) with x_grads the tuple of k (B, C, H, W) gradients."""
    cost = torch.nn.CrossEntropyLoss()
    model_num = len(model_list)
    x_train_list, y_train_list = [], []
    for i in range(model_num):  # noqa: B007 (transcribed as written)
        x_train_list.append(x_train.clone().detach())
        y_train_list.append(y_train.clone().detach())

    ce_loss = 0
    for i, model in enumerate(model_list):
        x_train_list[i].requires_grad = True
        output = model(x_train_list[i])
        ce_loss += cost(output, y_train_list[i]) / model_num
    x_grads = torch.autograd.grad(ce_loss, x_train_list, create_graph=True)
    return ce_loss, x_grads


# ---- the paper's NCEn (no code released for this form) -----------------------------------------


def paper_ncen(x_grads, lambda_cos, lambda_norm):
    """Eqs. 2, 6, 9, 10 of the paper with explicit loops over samples and members."""
    k, batch = len(x_grads), x_grads[0].shape[0]
    total = 0.0
    for b in range(batch):
        flat = [x_grads[i][b].flatten() for i in range(k)]
        g_ens = sum(flat) / k
        norms = [f.norm() for f in flat]
        m = sum(norms) / k
        cs = [torch.dot(f, g_ens) / (f.norm() * g_ens.norm()) for f in flat]
        sample = 0.0
        for i in range(k):
            loss_cos = cs[i] * sum(cs[j] for j in range(k) if j != i)
            loss_norm = (norms[i] - m) * sum(norms[j] - m for j in range(k) if j != i) / m**2
            sample = sample + lambda_norm * loss_norm + lambda_cos * loss_cos
        total = total + sample / k
    return total / batch


# ---- the comparison -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch():
    """Three resnet20 members in train mode, a fixed batch, both ways' gradients."""
    torch.manual_seed(0)
    members = [build_member("resnet20", SHAPE, CLASSES).double().train() for _ in range(K)]
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(B, *SHAPE, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (B,), generator=gen)
    ce_authors, grads_authors = authors_gradients(members, x, y)
    passes = [_member_pass(m, x, y, True, create_graph=True) for m in members]
    inputs = DefenseInputs(
        x, y, torch.stack([p.logits for p in passes]), torch.stack([p.input_grad for p in passes])
    )
    ce_ncen = sum(p.ce for p in passes) / (K * B)
    return {
        "authors": (ce_authors, grads_authors),
        "ncen": (ce_ncen, inputs),
    }


def test_ncen_gradients_are_the_authors_scaled_by_k_times_batch(batch):
    ce_authors, grads_authors = batch["authors"]
    ce_ncen, inputs = batch["ncen"]
    torch.testing.assert_close(ce_ncen, ce_authors, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        inputs.input_grads, torch.stack(grads_authors) * (K * B), rtol=1e-9, atol=1e-15
    )


REFERENCES = {
    "baseline": ({}, lambda g: 0.0),
    "ncen": (
        {"lambda_cos": 0.02, "lambda_norm": 0.02},
        lambda g: paper_ncen(g, lambda_cos=0.02, lambda_norm=0.02),
    ),
    "ncen-official": (
        {"lambda_cos": 0.02, "lambda_norm": 0.02},
        lambda g: authors_nc(list(g), K, para_norm=0.02, para_cos=0.02),
    ),
    "gal": ({"lambda_gal": 0.5}, lambda g: authors_gal(list(g))),
    "gpmr": (
        {"lambda_div": 0.1, "lambda_eq": 10.0},
        lambda g: authors_gpmr(list(g), K, "fashion_mnist"),
    ),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_defense_equals_the_authors_transcription(batch, name):
    defense = DEFENSES.get(name)
    hyperparameters, reference = REFERENCES[name]
    assert defense.resolve("fashionmnist") == hyperparameters  # the defaults are the authors'
    ce_authors, grads_authors = batch["authors"]
    ce_ncen, inputs = batch["ncen"]
    terms = defense.loss_terms(inputs, **hyperparameters)
    ours = ce_ncen + sum(terms.values())
    theirs = ce_authors + reference(grads_authors)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    if terms:  # the regularizer alone, not just the CE-dominated total
        regularizer = sum(terms.values())
        torch.testing.assert_close(regularizer, theirs - ce_authors, rtol=1e-6, atol=0)
        assert abs(regularizer.item()) > 1e-12


def test_authors_gpmr_terms_one_by_one(batch):
    """lambda_div = 0.04 on CIFAR-10 in both; and each of div and eq on its own (the transcription
    hard-codes its weights, so its two datasets' values give the two terms separately)."""
    _, grads_authors = batch["authors"]
    _, inputs = batch["ncen"]
    defense = DEFENSES.get("gpmr")
    ours = defense.loss_terms(inputs, **defense.resolve("cifar10"))
    theirs_cifar = authors_gpmr(list(grads_authors), K, "cifar10")
    torch.testing.assert_close(sum(ours.values()), theirs_cifar, rtol=1e-6, atol=0)
    theirs_fmnist = authors_gpmr(list(grads_authors), K, "fashion_mnist")
    div = (theirs_fmnist - theirs_cifar) / 0.06
    eq = (theirs_fmnist - 0.1 * div) / 10
    unweighted = defense.loss_terms(inputs, lambda_div=1.0, lambda_eq=1.0)
    torch.testing.assert_close(unweighted["div"], div, rtol=1e-6, atol=0)
    torch.testing.assert_close(unweighted["eq"], eq, rtol=1e-6, atol=0)
    assert eq.item() > 1e-6


def test_per_sample_gpmr_is_not_the_authors(batch):
    """The per-sample variant's magnitude term is far larger than the authors' at equal weights."""
    _, inputs = batch["ncen"]
    hp = {"lambda_div": 0.0, "lambda_eq": 1.0}
    authors = DEFENSES.get("gpmr").loss_terms(inputs, **hp)["eq"]
    per_sample = DEFENSES.get("gpmr-per-sample").loss_terms(inputs, **hp)["eq"]
    assert per_sample.item() > 10 * authors.item() > 0
