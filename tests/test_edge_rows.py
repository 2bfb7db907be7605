"""Every row kind of SPEC §1, on both backends."""
import math

import pytest
import torch
import torch.nn.functional as F

import reference
from helpers import BACKENDS
from helpers import assert_grad_close, assert_loss_close, reference_loss_and_grad
from lco_kernels import lco_loss

NEG_INF = -math.inf


def loss_and_grad(logits, labels, adv, backend, reduction="none", **kw):
    x = logits.clone().requires_grad_(True)
    loss = lco_loss(x, labels, adv, reduction=reduction, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    return loss, grad


def confident_rows(n, V, leads, device, dtype=torch.float32):
    """Rows whose sampled logit leads the others by ``leads[r]`` = z_i − lse_excl = log(p_i / (1 − p_i))."""
    logits = torch.randn(n, V, dtype=torch.float64)
    labels = torch.randint(0, V, (n,))
    rows = torch.arange(n)
    logits[rows, labels] = -math.inf
    lse_excl = torch.logsumexp(logits, dim=1)
    logits[rows, labels] = lse_excl + torch.as_tensor(leads, dtype=torch.float64)
    return logits.to(dtype).to(device), labels.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamped_rows_equal_weighted_cross_entropy(backend, device):
    """ρ·p_i ≥ 1: the target is one-hot and the loss is |Ψ|·(−log p_i), the gradient |Ψ|·(p − e_i)."""
    logits, labels = confident_rows(8, 777, torch.linspace(0.5, 12, 8).tolist(), device)
    adv = torch.rand(8, device=device) + 0.2
    loss, grad = loss_and_grad(logits, labels, adv, backend)
    z = logits.double().cpu().requires_grad_(True)
    ce = adv.double().cpu() * F.cross_entropy(z, labels.cpu(), reduction="none")
    (ce_grad,) = torch.autograd.grad(ce.sum(), z)
    p_i = torch.softmax(logits.double(), -1).gather(1, labels[:, None])[:, 0]
    assert bool((1.8 * p_i >= 1).all())
    assert_loss_close(loss, ce.detach(), adv)
    assert_grad_close(grad, ce_grad, adv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_confident_rows_exact_log_one_minus_p(backend, sign, device):
    """Sampled logit leading by 20-60: 1 − p_i is below fp32's spacing at 1, only log(1 − p_i) survives.

    For Ψ < 0 the loss depends on log(1 − p_i) ≈ −lead; for Ψ > 0 (clamped) the gradient at the
    label is −|Ψ|·(1 − p_i) ≈ −|Ψ|·e^{−lead}. Both must keep their relative digits."""
    leads = [20.0, 27.5, 35.0, 42.5, 50.0, 60.0]
    logits, labels = confident_rows(len(leads), 3001, leads, device)
    adv = sign * (torch.rand(len(leads), device=device) + 0.5)
    loss, grad = loss_and_grad(logits, labels, adv, backend)
    oracle_loss, oracle_grad = reference.lco_rows_closed_form(logits.cpu(), labels.cpu(), adv.cpu())
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    torch.testing.assert_close(loss.double().cpu(), oracle_loss, rtol=1e-5, atol=0)
    at_label = grad.double().cpu().gather(1, labels.cpu()[:, None])[:, 0]
    torch.testing.assert_close(at_label, oracle_grad.gather(1, labels.cpu()[:, None])[:, 0], rtol=1e-5, atol=0)
    assert_grad_close(grad, oracle_grad, adv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary(backend, device):
    """−inf logits elsewhere are ordinary (p = 0 there), including whole leading chunks."""
    V = 9001
    logits = torch.randn(6, V) * 2
    logits[:, :5000] = NEG_INF                      # more than one whole block of −inf first
    logits[torch.rand(6, V) < 0.3] = NEG_INF        # and scattered masks
    labels = torch.stack([torch.multinomial(torch.isfinite(r).float(), 1)[0] for r in logits])
    adv = torch.randn(6)
    logits, labels, adv = logits.to(device), labels.to(device), adv.to(device)
    loss, grad = loss_and_grad(logits, labels, adv, backend)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, adv, "none")
    assert not torch.isnan(loss).any() and not torch.isnan(grad).any()
    assert bool((grad[torch.isinf(logits)] == 0).all())
    assert_loss_close(loss, ref_loss, adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_rows_are_exact_zeros(backend, device):
    """Sampled logit −inf (p_i = 0); every other logit −inf (p_i = 1); Ψ = 0; for both signs of Ψ."""
    V = 600
    logits = torch.randn(6, V) * 3
    labels = torch.randint(0, V, (6,))
    adv = torch.tensor([1.3, -0.7, 2.0, -1.1, 0.0, 0.0])
    rows = torch.arange(6)
    logits[rows[:2], labels[:2]] = NEG_INF          # sampled −inf
    only = torch.full((V,), NEG_INF)
    for r in (2, 3):                                # only-option rows
        logits[r] = only
        logits[r, labels[r]] = torch.randn(())
    logits, labels, adv = logits.to(device), labels.to(device), adv.to(device)
    loss, grad = loss_and_grad(logits, labels, adv, backend)
    assert bool((loss == 0).all()), loss
    assert bool((grad == 0).all())
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, adv, "none")
    assert float(ref_loss.abs().max()) < 1e-12 and float(ref_grad.abs().max()) < 1e-12  # float64 rounding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, -1, 7])
def test_ignore_index(backend, ignore_index, device):
    V = 300
    logits = torch.randn(10, V).to(device)
    labels = torch.randint(0, V, (10,))
    labels[labels == ignore_index] = ignore_index + 1
    labels[::3] = ignore_index
    labels = labels.to(device)
    adv = torch.randn(10, device=device)
    for reduction in ("none", "mean", "sum"):
        loss, grad = loss_and_grad(logits, labels, adv, backend, reduction, ignore_index=ignore_index)
        ref_loss, ref_grad = reference_loss_and_grad(logits, labels, adv, reduction, ignore_index=ignore_index)
        assert_loss_close(loss, ref_loss, adv)
        assert_grad_close(grad, ref_grad, adv, torch.float32)
        assert bool((grad[::3] == 0).all())
        if reduction == "none":
            assert bool((loss[::3] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_mean_is_zero(backend, device):
    logits = torch.randn(4, 5, 64, device=device)
    labels = torch.full((4, 5), -100, device=device)
    loss, grad = loss_and_grad(logits, labels, torch.randn(4, 1, device=device), backend, "mean")
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert bool((grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_row(backend, device):
    V = 500
    logits = torch.randn(8, V) * 2
    labels = torch.randint(0, V, (8,))
    adv = torch.randn(8)
    clean_loss, clean_grad = loss_and_grad(logits.to(device), labels.to(device), adv.to(device), backend)
    logits[2, 17] = math.nan                  # NaN logit off the label
    logits[4, labels[4]] = math.nan           # NaN at the label
    adv[6] = math.nan                         # NaN advantage
    loss, grad = loss_and_grad(logits.to(device), labels.to(device), adv.to(device), backend)
    nan_rows = torch.tensor([2, 4, 6])
    others = torch.tensor([0, 1, 3, 5, 7])
    assert bool(loss[nan_rows].isnan().all())
    assert bool(grad[nan_rows].isnan().all())
    assert torch.equal(loss[others], clean_loss[others])
    assert torch.equal(grad[others], clean_grad[others])
    # with a reduction, the other rows' gradients are untouched too
    _, grad_sum = loss_and_grad(logits.to(device), labels.to(device), adv.to(device), backend, "sum")
    assert torch.equal(grad_sum[others], clean_grad[others])


def test_literal_reference_agrees_with_closed_form_where_it_is_exact():
    """The two float64 references agree on moderate rows (lead < 30), clamped and degenerate rows included."""
    V = 400
    logits = torch.randn(40, V, dtype=torch.float64) * 4
    labels = torch.randint(0, V, (40,))
    logits[:10, :][torch.arange(10), labels[:10]] += torch.linspace(0, 25, 10, dtype=torch.float64)
    logits[10, :] = NEG_INF
    logits[10, labels[10]] = 0.5                                      # only option
    logits[11, labels[11]] = NEG_INF                                  # sampled −inf
    logits[12:20, :50] = NEG_INF                                      # masked vocabulary
    labels[12:20] = torch.randint(50, V, (8,))
    adv = torch.randn(40, dtype=torch.float64)
    adv[::7] = 0.0
    for rho_pos, rho_neg in ((1.8, 0.9), (1.0, 0.0), (4.0, 1.0)):
        z = logits.clone().requires_grad_(True)
        lit = reference.lco_loss_reference(z, labels, adv, rho_pos=rho_pos, rho_neg=rho_neg, reduction="none")
        (lit_grad,) = torch.autograd.grad(lit.sum(), z)
        cf, cf_grad = reference.lco_rows_closed_form(logits, labels, adv, rho_pos=rho_pos, rho_neg=rho_neg)
        torch.testing.assert_close(lit.detach(), cf, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(lit_grad, cf_grad, rtol=1e-9, atol=1e-12)


def test_literal_reference_loses_digits_where_the_oracle_does_not():
    """Why confident rows are judged by the closed form: at a lead of 40, 1 − p_i is 0 in float64."""
    logits, labels = confident_rows(1, 50, [40.0], "cpu", torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    lit = reference.lco_loss_reference(logits, labels, adv, reduction="none")
    cf, _ = reference.lco_rows_closed_form(logits, labels, adv)
    assert not torch.isfinite(lit).all() or (lit - cf).abs().item() > 1e-3 * cf.abs().item()
    assert torch.isfinite(cf).all() and cf.item() > 3.0   # ≈ 0.1·(lead + log 0.1) + 0.9·log 0.9
