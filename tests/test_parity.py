"""Both backends against the literal float64 reference (SPEC §4), on fresh random inputs."""
import pytest
import torch

from helpers import BACKENDS
from helpers import assert_grad_close, assert_loss_close, make_inputs, reference_loss_and_grad
from lco_kernels import lco_loss

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def run(logits, labels, advantages, backend, reduction="mean", grad_output=None, **kw):
    x = logits.clone().requires_grad_(True)
    loss = lco_loss(x, labels, advantages, reduction=reduction, backend=backend, **kw)
    g = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, x, g)
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1000, 9001])  # not a block multiple; 9001 spans several blocks
def test_parity_2d(backend, dtype, V, device):
    logits, labels, adv = make_inputs((12,), V, dtype, device)
    for reduction in ("none", "mean", "sum"):
        loss, grad = run(logits, labels, adv, backend, reduction)
        ref_loss, ref_grad = reference_loss_and_grad(logits, labels, adv, reduction)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        assert_loss_close(loss, ref_loss, adv)
        assert_grad_close(grad, ref_grad, adv, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", [False, True])
def test_parity_3d(backend, per_sequence, device):
    B, T, V = 3, 5, 2050
    logits, labels, adv = make_inputs((B, T), V, torch.float32, device, adv_shape=(B, 1) if per_sequence else (B, T))
    adv[0] = 0.0                  # a whole sequence with Ψ = 0
    adv[1] = -adv[1].abs() - 0.1  # a negative sequence beside positive ones
    for reduction in ("none", "mean", "sum"):
        loss, grad = run(logits, labels, adv, backend, reduction)
        ref_loss, ref_grad = reference_loss_and_grad(logits, labels, adv, reduction)
        assert loss.shape == (labels.shape if reduction == "none" else ())
        assert_loss_close(loss, ref_loss, adv)
        assert_grad_close(grad, ref_grad, adv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rho_pos,rho_neg", [(1.8, 0.9), (1.0, 1.0), (3.0, 0.0), (1.05, 0.5)])
def test_parity_hyperparameters(backend, rho_pos, rho_neg, device):
    logits, labels, adv = make_inputs((16,), 700, torch.float32, device)
    loss, grad = run(logits, labels, adv, backend, "none", rho_pos=rho_pos, rho_neg=rho_neg)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, adv, "none", rho_pos=rho_pos, rho_neg=rho_neg)
    assert_loss_close(loss, ref_loss, adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend, device):
    """Same inputs, both backends: the same numbers up to fp32 rounding (the kernel sums in chunks)."""
    logits, labels, adv = make_inputs((2, 7), 5000, torch.bfloat16, device)
    loss_b, grad_b = run(logits, labels, adv, backend, "none")
    loss_t, grad_t = run(logits, labels, adv, "torch", "none")
    torch.testing.assert_close(loss_b, loss_t, rtol=1e-5, atol=1e-7)
    # bf16 outputs may round to neighbouring values: one bf16 ulp apart at most
    torch.testing.assert_close(grad_b.float(), grad_t.float(), rtol=2 ** -7, atol=1e-6)
