"""Autograd modes: grad_output, in-place backward, non-contiguous inputs, determinism, gradcheck, the module."""
import pytest
import torch

from helpers import BACKENDS
from helpers import assert_grad_close, assert_loss_close, make_inputs, reference_loss_and_grad
from lco_kernels import LCOLoss, lco_loss, torch_backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_output_is_applied_exactly(backend, reduction, device):
    logits, labels, adv = make_inputs((3, 4), 1500, torch.float32, device)
    x = logits.clone().requires_grad_(True)
    loss = lco_loss(x, labels, adv, reduction=reduction, backend=backend)
    grad_output = (torch.randn(loss.shape) * 3).to(device) if reduction == "none" else torch.tensor(-2.75, device=device)
    loss.backward(grad_output)
    ref_loss, ref_grad = reference_loss_and_grad(logits, labels, adv, reduction, grad_output=grad_output)
    assert_loss_close(loss.detach(), ref_loss, adv)
    assert_grad_close(x.grad, ref_grad, adv * grad_output.abs().max(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_out_of_place(backend, dtype, device):
    logits, labels, adv = make_inputs((2, 6), 3000, dtype, device)
    original = logits.clone()

    x = logits.clone().requires_grad_(True)
    y = x * 1.0                      # the logits as a non-leaf, as out of an LM head
    lco_loss(y, labels, adv, backend=backend).backward()
    assert torch.equal(y.detach(), original), "the default mode must leave the logits bit-identical"

    x2 = logits.clone().requires_grad_(True)
    y2 = x2 * 1.0
    loss2 = lco_loss(y2, labels, adv, backend=backend, inplace_backward=True)
    loss2.backward(retain_graph=True)
    assert torch.equal(x2.grad, x.grad)
    assert torch.equal(y2.detach(), x.grad), "inplace_backward must write the gradient into the logits' storage"
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss2.backward()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_pass_backward_twice_through_a_kept_graph(temperature, monkeypatch):
    """The one-pass CPU path writes its first backward's gradient into the forward's e^{z/τ} buffer; a second
    backward through the kept graph (retain_graph) forms the buffer again: both gradients are the same bit for
    bit, the first is left as it was, and they match the float64 reference."""
    logits, labels, adv = make_inputs((3, 5), 300, torch.float32, "cpu", ignore_frac=0.0)
    buffers = []
    real_backward = torch_backend.ordinary_backward
    monkeypatch.setattr(torch_backend, "ordinary_backward",
                        lambda *a: buffers.append(a[-1] is not None) or real_backward(*a))
    x = logits.clone().requires_grad_(True)
    loss = lco_loss(x, labels, adv, temperature=temperature, backend="torch")
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(loss, x)
    assert buffers == [True, False], "the one-pass path hands its buffer to the first backward only"
    assert torch.equal(first, kept) and torch.equal(second, kept)
    ref_loss, ref_grad = reference_loss_and_grad(logits.double() / temperature, labels, adv)
    assert_loss_close(loss.detach(), ref_loss, adv)
    assert_grad_close(second, ref_grad / temperature, adv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_invalidates_other_readers(backend, device):
    """Another op that saved the same logits fails its version check instead of reading the gradient."""
    logits, labels, adv = make_inputs((5,), 200, torch.float32, device)
    x = logits.clone().requires_grad_(True)
    y = x * 1.0
    other = (y * y).sum()            # saves y for its backward
    total = lco_loss(y, labels, adv, backend=backend, inplace_backward=True) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    """The usual shift `logits[:, :-1, :]`, a transposed vocabulary dim and strided labels/advantages."""
    B, T, V = 2, 6, 1100
    logits, labels, adv = make_inputs((B, T), V, torch.float32, device)
    shifted = logits[:, :-1, :]
    lab = labels[:, 1:]
    a = adv[:, 1:]
    assert not shifted.is_contiguous() and not lab.is_contiguous()
    for inplace in (False, True):
        x = logits.clone().requires_grad_(True)
        y = (x * 1.0)[:, :-1, :]
        loss = lco_loss(y, lab, a, reduction="sum", backend=backend, inplace_backward=inplace)
        loss.backward()
        ref_loss, ref_grad = reference_loss_and_grad(shifted, lab, a, "sum")
        assert_loss_close(loss.detach(), ref_loss, a)
        assert_grad_close(x.grad[:, :-1, :], ref_grad, a, torch.float32)
        assert bool((x.grad[:, -1, :] == 0).all())

    transposed = logits[0].t().contiguous().t()      # (T, V) with stride(-1) == T
    assert transposed.stride(-1) != 1
    x = transposed.clone().requires_grad_(True)
    assert x.stride(-1) != 1
    loss = lco_loss(x, labels[0], adv[0], reduction="none", backend=backend)
    loss.sum().backward()
    ref_loss, ref_grad = reference_loss_and_grad(transposed, labels[0], adv[0], "none")
    assert_loss_close(loss.detach(), ref_loss, adv[0])
    assert_grad_close(x.grad, ref_grad, adv[0], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, device):
    logits, labels, adv = make_inputs((4, 3), 5000, torch.bfloat16, device)
    results = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        loss = lco_loss(x, labels, adv, reduction="none", backend=backend)
        loss.sum().backward()
        results.append((loss.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_gradcheck_float64():
    """Finite differences agree with the backward (torch backend, float64).

    LCO's gradient treats the target π' as a constant (stop-gradient), so it is the derivative of
    the loss only where π' does not move with z: rows with ρ·p_i ≥ 1 (π' = e_i, L = |Ψ|·CE),
    Ψ = 0 rows and ignored rows. On those, gradcheck tests the autograd plumbing (reductions,
    grad_output, chunking) exactly; the stop-gradient rows are checked against reference/."""
    logits = torch.randn(6, 9, dtype=torch.float64)
    labels = torch.tensor([0, 3, 8, -100, 4, 5])
    adv = torch.tensor([1.5, 0.8, 0.6, 1.0, 0.0, 2.0], dtype=torch.float64)
    logits[torch.arange(6), labels.clamp(min=0)] += 6.0   # p_i > 0.9: clamped for ρ = 1.8
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda z: lco_loss(z, labels, adv, reduction=reduction, backend="torch"),
            (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_int32_and_scalar_advantage(backend, device):
    logits, labels, adv = make_inputs((7,), 400, torch.float32, device)
    a = lco_loss(logits, labels.to(torch.int32), -0.5, reduction="none", backend=backend)
    b = lco_loss(logits, labels, torch.full((7,), -0.5, device=device), reduction="none", backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_functional(backend, device):
    logits, labels, adv = make_inputs((2, 3), 300, torch.float32, device)
    module = LCOLoss(rho_pos=2.0, rho_neg=0.5, reduction="sum", backend=backend)
    assert "rho_pos=2.0" in repr(module)
    expected = lco_loss(logits, labels, adv, rho_pos=2.0, rho_neg=0.5, reduction="sum", backend=backend)
    assert torch.equal(module(logits, labels, adv), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_and_empty_batch(backend, device):
    logits, labels, adv = make_inputs((3,), 100, torch.float32, device)
    with torch.no_grad():
        loss = lco_loss(logits, labels, adv, backend=backend)
    ref_loss, _ = reference_loss_and_grad(logits, labels, adv)
    assert_loss_close(loss, ref_loss, adv)

    empty = torch.randn(0, 50, device=device, requires_grad=True)
    lab = torch.zeros(0, dtype=torch.long, device=device)
    loss = lco_loss(empty, lab, torch.zeros(0, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 50)
    assert lco_loss(empty, lab, 1.0, reduction="none", backend=backend).shape == (0,)


def test_advantages_get_no_gradient(device):
    logits, labels, adv = make_inputs((4,), 64, torch.float32, device)
    adv = adv.clone().requires_grad_(True)
    loss = lco_loss(logits.requires_grad_(True), labels, adv)
    loss.backward()
    assert adv.grad is None
