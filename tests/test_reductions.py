"""reductions.py: the per-token weights, and the one number that replaces them where every token is valid."""
import pytest
import torch

from lco_kernels import lco_loss
from lco_kernels.reductions import REDUCTIONS, token_weights, uniform_weight

COUNTS = list(range(1, 300)) + [1000, 4097, 12345, 99991, 2 ** 20 + 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "token-mean", "sum"])
def test_uniform_weight_is_token_weights_bit_for_bit(reduction, dtype):
    """The one-number weight is the weight of ``dtype`` that ``token_weights`` gives every token of an unpadded
    call, so the reduced loss and every gradient coefficient are the same products, bit for bit."""
    g = torch.Generator().manual_seed(0)
    for n in COUNTS:
        weights = token_weights(torch.ones(n, dtype=torch.bool), None, reduction, dtype=dtype)
        weight = uniform_weight(reduction, n, dtype=dtype)
        assert weight.shape == () and weight.dtype == dtype
        assert torch.equal(weights, weight.expand(n)), n
        if n <= 4097:
            loss = torch.rand(n, generator=g, dtype=dtype) * 10
            upstream = torch.rand((), generator=g, dtype=dtype)
            assert torch.equal((loss * weight).sum(), (loss * weights).sum()), n
            assert torch.equal(weight * upstream * loss, weights * upstream * loss), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unpadded_and_counted_calls_agree_bit_for_bit(dtype):
    """An unpadded "mean" call (one-number weight) and the same call with its own token count given as a tensor
    (per-token weights) give the same loss and gradient, with an upstream gradient other than 1."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 11, generator=g, dtype=dtype)
    labels = torch.randint(0, 11, (6,), generator=g)
    adv = torch.randn(6, generator=g, dtype=dtype)
    results = []
    for kw in ({}, {"token_count": torch.tensor(6.0)}):
        z = x.clone().requires_grad_(True)
        loss = lco_loss(z, labels, adv, backend="torch", **kw)
        (0.37 * loss).backward()
        results.append((loss.detach(), z.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_uniform_weight_only_where_one_number_is_known(reduction):
    """Per-sequence and sign-dependent weights, "none", and a global token count (a tensor, never read on the
    host) keep the per-token weights."""
    def value(weight):
        return None if weight is None else weight.item()
    assert value(uniform_weight(reduction, 8)) == {"sum": 1.0, "mean": 1.0 / 8}.get(reduction)
    assert value(uniform_weight(reduction, 8, token_count=torch.tensor(16.0))) == (1.0 if reduction == "sum" else None)
    assert value(uniform_weight(reduction, 0)) == (1.0 if reduction == "sum" else None)


def test_sign_mean_without_advantages_counts_every_token_positive():
    """SFT passes no advantages: "sign-mean" is then the mean over valid tokens."""
    valid = torch.tensor([True, False, True, True])
    ones = torch.ones(4)
    assert torch.equal(token_weights(valid, None, "sign-mean"), token_weights(valid, ones, "sign-mean"))
    assert torch.equal(token_weights(valid, None, "sign-mean"), token_weights(valid, None, "mean"))
