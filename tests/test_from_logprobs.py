"""lco_loss_from_logprobs: the fused loss's head on given log-probs.

Fed by token_logprobs it equals lco_loss on every row kind of SPEC §1 (its exactness contract); fed by
log_softmax it inherits log_softmax's rounding for confident tokens. The printed
tables (python -m pytest -s tests/test_from_logprobs.py -k table) are the ones README quotes.
"""
import math

import pytest
import torch

import reference

from helpers import BACKENDS, assert_grad_close, assert_loss_close, make_inputs
from lco_kernels import lco_loss, lco_loss_from_logprobs, token_logprobs
from lco_kernels.reductions import REDUCTIONS


def logprobs_of(x, labels):
    """What a framework hands its loss hook: log_softmax of the logits, gathered at the labels."""
    return torch.log_softmax(x, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_equals_lco_in_float64(reduction):
    logits, labels, adv = make_inputs((3, 6), 400, torch.float64, ignore_frac=0.2)
    x = logits.clone().requires_grad_(True)
    loss = lco_loss_from_logprobs(logprobs_of(x, labels), adv, loss_mask=labels != -100, reduction=reduction,
                                  max_length=9)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    y = logits.clone().requires_grad_(True)
    fused = lco_loss(y, labels, adv, reduction=reduction, backend="torch", max_length=9)
    (fused_grad,) = torch.autograd.grad(fused, y, torch.ones_like(fused))
    torch.testing.assert_close(loss, fused, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, fused_grad, rtol=1e-9, atol=1e-12)


def spec_rows(V, dtype, n_random=24):
    """Logits (n, V) holding every row kind of SPEC §1, with labels and mixed-sign advantages.

    Random rows (some clamped, ρ·p_i ≥ 1), confident rows (the sampled logit leads the others by
    20-60, both signs of Ψ), a row whose other logits are all −inf, a row whose sampled logit is
    −inf, a masked vocabulary (−inf elsewhere), ignored rows and a zero advantage.
    """
    logits, labels, adv = make_inputs((n_random,), V, torch.float64, ignore_frac=0.15)
    extra_z, extra_y, extra_a = [], [], []
    for lead in (20.0, 30.0, 45.0, 60.0):
        for sign in (1.0, -1.0):
            z = torch.randn(V, dtype=torch.float64)
            i = int(torch.randint(0, V, ()))
            z[i] = -math.inf
            z[i] = torch.logsumexp(z, 0) + lead
            extra_z.append(z), extra_y.append(i), extra_a.append(sign * (0.5 + torch.rand(()).item()))
    only = torch.full((V,), -math.inf, dtype=torch.float64)
    only[3] = 1.5
    sampled_ninf = torch.randn(V, dtype=torch.float64)
    sampled_ninf[5] = -math.inf
    masked_vocab = torch.randn(V, dtype=torch.float64) * 3
    masked_vocab[V // 2:] = -math.inf
    for z, i, a in ((only, 3, -1.3), (only, 3, 0.7), (sampled_ninf, 5, -0.8), (sampled_ninf, 5, 1.1),
                    (masked_vocab, 1, -2.0), (masked_vocab, 2, 0.0)):
        extra_z.append(z), extra_y.append(i), extra_a.append(a)
    logits = torch.cat([logits, torch.stack(extra_z)]).to(dtype)
    labels = torch.cat([labels, torch.tensor(extra_y)])
    adv = torch.cat([adv, torch.tensor(extra_a)])
    return logits, labels, adv


def both_routes(logits, labels, adv, backend, reduction="none", **kw):
    """(loss, grad) of lco_loss_from_logprobs(token_logprobs(z, y)) and of lco_loss(z, y)."""
    out = []
    for route in ("token_logprobs", "fused"):
        x = logits.clone().requires_grad_(True)
        if route == "fused":
            loss = lco_loss(x, labels, adv, reduction=reduction, backend=backend, **kw)
        else:
            logp = token_logprobs(x, labels, backend=backend)
            loss = lco_loss_from_logprobs(logp, adv, loss_mask=labels != -100, reduction=reduction, **kw)
        torch.manual_seed(0)  # the same upstream gradient for both routes
        g = torch.randn_like(loss) if reduction == "none" else torch.ones_like(loss)
        (grad,) = torch.autograd.grad(loss, x, g)
        out.append((loss.detach(), grad))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exactness_contract_on_every_row_kind(backend, dtype):
    logits, labels, adv = spec_rows(300, dtype)
    (loss, grad), (fused_loss, fused_grad) = both_routes(logits, labels, adv, backend)
    assert_loss_close(loss, fused_loss, adv)
    assert_grad_close(grad, fused_grad, adv, dtype)
    # and both against the float64 oracle (log domain, exact for confident rows)
    oracle_loss, oracle_grad = reference.lco_rows_closed_form(logits.double(), labels, adv)
    assert_loss_close(loss, oracle_loss, adv)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_exactness_contract_every_reduction_with_old_logprobs(reduction):
    logits, labels, adv = make_inputs((3, 7), 200, torch.float32, ignore_frac=0.2)
    old = reference.token_logprobs(logits, labels, -100).float() + 0.3 * torch.randn(labels.shape)
    (loss, grad), (fused_loss, fused_grad) = both_routes(logits, labels, adv, "torch", reduction=reduction,
                                                         old_logprobs=old, max_length=11)
    assert_loss_close(loss, fused_loss, adv)
    assert_grad_close(grad, fused_grad, adv, torch.float32)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3", "low_var_kl", "abs"])
def test_exactness_contract_with_a_kl_term(kl_type):
    logits, labels, adv = make_inputs((3, 7), 200, torch.float32, ignore_frac=0.2)
    ref = reference.token_logprobs(logits, labels, -100).float() + 0.5 * torch.randn(labels.shape)
    ref[0, 0] = -40.0  # k3's clamp at 10
    (loss, grad), (fused_loss, fused_grad) = both_routes(logits, labels, adv, "torch", reduction="token-mean",
                                                         ref_logprobs=ref, beta=0.3, kl_type=kl_type)
    assert_loss_close(loss, fused_loss, adv)
    assert_grad_close(grad, fused_grad, adv, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                       "seq-mean-token-sum-norm"])
def test_micro_batches_with_global_counts_sum_to_the_batch(reduction):
    logprobs = -torch.rand(6, 5, dtype=torch.float64) * 3
    mask = torch.rand(6, 5) < 0.8
    adv = torch.randn(6, 1, dtype=torch.float64)
    counts = {"token_count": int(mask.sum())} if reduction == "mean" else {"seq_count": 6}
    full = lco_loss_from_logprobs(logprobs, adv, loss_mask=mask, reduction=reduction)
    parts = sum(lco_loss_from_logprobs(logprobs[rows], adv[rows], loss_mask=mask[rows], reduction=reduction,
                                       **counts) for rows in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, full, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_stays_in_its_row(backend):
    logits, labels, adv = make_inputs((6,), 50, torch.float32, ignore_frac=0.0, zero_adv_frac=0.0)
    logits[2, 7] = math.nan
    (loss, grad), (fused_loss, fused_grad) = both_routes(logits, labels, adv, backend)
    assert torch.isnan(loss[2]) and bool(torch.isnan(grad[2]).all())
    assert bool(torch.isfinite(loss[torch.arange(6) != 2]).all())
    assert_loss_close(loss, fused_loss, adv)
    assert_grad_close(grad, fused_grad, adv, torch.float32)


def test_masked_positions_may_hold_anything():
    logprobs = torch.tensor([[-0.3, 0.0, -math.inf], [-1.2, -0.01, 5.0]], requires_grad=True)
    mask = torch.tensor([[True, False, False], [True, True, False]])
    loss = lco_loss_from_logprobs(logprobs.where(mask, -0.5), torch.tensor([[1.0], [-1.0]]), loss_mask=mask,
                                  reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(logprobs.grad).all())
    assert bool((logprobs.grad[~mask] == 0).all()) and bool((logprobs.grad[mask] != 0).all())


def test_bad_input():
    logprobs = -torch.rand(2, 3)
    adv = torch.randn(2, 1)
    with pytest.raises(ValueError, match="logprobs"):
        lco_loss_from_logprobs(torch.tensor([[-0.1, 0.2, -1.0]]), adv[:1])
    with pytest.raises(TypeError, match="mask"):
        lco_loss_from_logprobs(logprobs, adv, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="logprobs"):
        lco_loss_from_logprobs(torch.zeros(2, 3, dtype=torch.long), adv)
    with pytest.raises(ValueError, match="rho_pos"):
        lco_loss_from_logprobs(logprobs, adv, rho_pos=0.5)
    with pytest.raises(ValueError, match="reduction"):
        lco_loss_from_logprobs(logprobs, adv, reduction="avg")
    with pytest.raises(ValueError, match=r"advantages\[\.\.\., None\]"):
        lco_loss_from_logprobs(logprobs, torch.randn(2))
    with pytest.raises(ValueError, match="ref_logprobs"):
        lco_loss_from_logprobs(logprobs, adv, beta=0.1)
    with pytest.raises(ValueError, match="kl_type"):
        lco_loss_from_logprobs(logprobs, adv, ref_logprobs=logprobs, beta=0.1, kl_type="k4")
    with pytest.raises(ValueError, match="token_count"):
        lco_loss_from_logprobs(logprobs, adv, reduction="sum", token_count=4)


def test_double_backward_is_refused():
    logprobs = (-torch.rand(2, 3)).requires_grad_(True)
    loss = lco_loss_from_logprobs(logprobs, torch.randn(2, 1))
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(loss, logprobs, create_graph=True)


def test_return_stats():
    logits, labels, adv = make_inputs((2, 5), 40, torch.float32)
    old = reference.token_logprobs(logits, labels, -100).float() + 0.3 * torch.randn(labels.shape)
    mask = labels != -100
    logp = token_logprobs(logits, labels)
    loss, stats = lco_loss_from_logprobs(logp, adv, loss_mask=mask, old_logprobs=old, return_stats=True)
    _, fused = lco_loss(logits, labels, adv, old_logprobs=old, return_stats=True, backend="torch")
    for name in ("logprobs", "target_prob", "clamped", "clipped"):
        torch.testing.assert_close(getattr(stats, name), getattr(fused, name), rtol=1e-5, atol=1e-6)
    assert stats.entropy is None and stats.logit_grad_norm is None


# ---- measured precision (README, "The log-prob form") ----------------------------------------------------------

def confident(lead, sign, n=8, V=1000):
    z = torch.randn(n, V, dtype=torch.float64)
    labels = torch.randint(0, V, (n,))
    rows = torch.arange(n)
    z[rows, labels] = -math.inf
    z[rows, labels] = torch.logsumexp(z, 1) + lead
    return z.float(), labels, torch.full((n,), sign)


def relative_errors(lead, sign, route):
    """Max relative error (loss, gradient) of one route vs the float64 oracle, fp32 logits."""
    z, labels, adv = confident(lead, sign)
    oracle_loss, oracle_grad = reference.lco_rows_closed_form(z, labels, adv)
    x = z.clone().requires_grad_(True)
    if route == "log_softmax":
        loss = lco_loss_from_logprobs(logprobs_of(x, labels), adv, reduction="none")
    elif route == "token_logprobs":
        loss = lco_loss_from_logprobs(token_logprobs(x, labels, backend="torch"), adv, reduction="none")
    else:
        loss = lco_loss(x, labels, adv, reduction="none", backend="torch")
    loss.sum().backward()

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()
    return rel(loss.detach(), oracle_loss), rel(x.grad, oracle_grad)


ROUTES = ("log_softmax", "token_logprobs", "fused")


def test_confident_tokens_error_table():
    """Relative errors of both log-prob routes and the fused loss, fp32, leads 10-100 (README's table).

    token_logprobs keeps log p_i = −softplus(z_i − lse₋ᵢ) to fp32's relative precision and its
    backward takes 1 − p_i from the log domain, so the log-prob form equals the fused loss until
    fp32 itself runs out: ∂L/∂log p_i = |Ψ|(1 − ρ)·e^d for Ψ < 0 overflows fp32 past d ≈ 91, and
    log p_i ≈ −e^−d is subnormal past d ≈ 87 (0 past d ≈ 103). log_softmax rounds log p_i to 0
    from d ≈ 17 on: the row then reads as p_i = 1 (no other mass, SPEC §1): loss and gradient 0.
    """
    print()
    print("| lead d | Ψ | route | loss rel. error | grad rel. error |")
    for lead in (10.0, 17.0, 20.0, 40.0, 60.0, 80.0, 88.0, 92.0, 100.0):
        for sign in (1.0, -1.0):
            errs = {route: relative_errors(lead, sign, route) for route in ROUTES}
            for route, (le, ge) in errs.items():
                print(f"| {lead:.0f} | {sign:+.0f} | {route} | {le:.1e} | {ge:.1e} |")
            fused, tlp, lsm = errs["fused"], errs["token_logprobs"], errs["log_softmax"]
            if lead <= 88:
                assert max(fused) < 1e-5 and max(tlp) < 1e-5, (lead, sign, tlp, fused)
            if lead == 10.0:
                assert 1e-4 < lsm[0] < 0.05 and lsm[1] < 0.05
            if lead >= 17.0:
                assert lsm == (1.0, 1.0)
            if lead == 92.0 and sign < 0:
                assert not math.isfinite(tlp[1]) and max(fused) < 5e-6
