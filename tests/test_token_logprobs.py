"""token_logprobs: differentiable log p_i and entropy against float64 autograd, and exact for confident
tokens, where log_softmax(z).gather(...) has already lost 1 − p_i."""
import math

import pytest
import torch

from helpers import BACKENDS, GRAD_ATOL_FACTOR, GRAD_RTOL, make_inputs
from lco_kernels import token_logprobs


def _float64(logits, labels, temperature, g_logp, g_entropy):
    z = logits.detach().cpu().double().requires_grad_(True)
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    valid = labels.cpu() != -100
    logp = torch.where(valid, logp_all.gather(-1, labels.cpu().clamp(min=0)[..., None])[..., 0], 0.0)
    p = logp_all.exp()
    entropy = torch.where(valid, -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1), 0.0)
    (grad,) = torch.autograd.grad((logp * g_logp.cpu()).sum() + (entropy * g_entropy.cpu()).sum(), z)
    return logp.detach(), entropy.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_and_gradients_against_float64(backend, dtype, device):
    logits, labels, _ = make_inputs((3, 4), 1500, dtype, device, ignore_frac=0.2)
    logits[1, 2, :300] = -torch.inf
    for temperature in (1.0, 0.7):
        x = logits.clone().requires_grad_(True)
        logp, entropy = token_logprobs(x, labels, temperature=temperature, return_entropy=True, backend=backend)
        assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == labels.shape
        g_logp, g_entropy = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
        (logp * g_logp + entropy * g_entropy).sum().backward()
        want_logp, want_entropy, want_grad = _float64(logits, labels, temperature, g_logp, g_entropy)
        torch.testing.assert_close(logp.detach().cpu().double(), want_logp, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(entropy.detach().cpu().double(), want_entropy, rtol=1e-5, atol=1e-6)
        atol = 1e-6 if dtype == torch.float32 else GRAD_ATOL_FACTOR[dtype] * float(want_grad.abs().max())
        torch.testing.assert_close(x.grad.cpu().double(), want_grad, rtol=GRAD_RTOL[dtype], atol=atol)
        ignored = labels == -100
        assert bool((logp[ignored] == 0).all()) and bool((x.grad[ignored] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_alone(backend, device):
    logits, labels, _ = make_inputs((6,), 800, torch.float32, device)
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, labels, backend=backend)
    logp.sum().backward()
    want_logp, _, want_grad = _float64(logits, labels, 1.0, torch.ones(6), torch.zeros(6))
    torch.testing.assert_close(logp.detach().cpu().double(), want_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu().double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_tokens_keep_one_minus_p(backend, device):
    """Sampled logit leading the rest by 20-60 (fp32): log p_i ≈ −e^{−lead} and ∂log p_i/∂z_i = 1 − p_i
    ≈ e^{−lead} keep their relative digits; log_softmax's log p_i is 0 and its gradient 0 there."""
    leads = torch.tensor([20.0, 30.0, 45.0, 60.0], dtype=torch.float64)
    V = 2000
    z = torch.randn(4, V, dtype=torch.float64)
    labels = torch.randint(0, V, (4,))
    rows = torch.arange(4)
    z[rows, labels] = -math.inf
    lse_excl = torch.logsumexp(z, dim=1)
    z[rows, labels] = lse_excl + leads
    logits = z.float()
    # the oracle on the rounded fp32 logits, in the log domain
    z64 = logits.double()
    d = z64[rows, labels] - torch.logsumexp(z64.scatter(1, labels[:, None], -math.inf), dim=1)
    want_logp = -torch.nn.functional.softplus(-d)
    want_one_minus_p = torch.exp(-torch.nn.functional.softplus(d))
    x = logits.to(device).requires_grad_(True)
    logp = token_logprobs(x, labels.to(device), backend=backend)
    logp.sum().backward()
    torch.testing.assert_close(logp.detach().cpu().double(), want_logp, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad[rows, labels].cpu().double(), want_one_minus_p, rtol=1e-5, atol=0)
    naive = torch.log_softmax(logits, -1)[rows, labels]
    assert bool((naive == 0).all())  # what a framework's log_softmax route hands over


def test_inplace_backward_writes_into_the_logits():
    logits, labels, _ = make_inputs((5,), 700, torch.float32)
    x = logits.clone().requires_grad_(True)
    token_logprobs(x, labels).sum().backward()
    y = logits.clone().requires_grad_(True)
    view = y * 1.0
    token_logprobs(view, labels, inplace_backward=True).sum().backward()
    assert torch.equal(y.grad, x.grad) and torch.equal(view.detach(), x.grad)
