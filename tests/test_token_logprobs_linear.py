"""fused_linear_token_logprobs against the unfused float64 log-probs, and the fused-linear forms with
mixed dtypes (autocast's rule: products in the lower precision, each gradient in its input's dtype)."""
import pytest
import torch
import torch.nn.functional as F

from helpers import BACKENDS, GRAD_ATOL_FACTOR
from lco_kernels import fused_linear_policy_loss, fused_linear_token_logprobs, token_logprobs


def linear_inputs(B=3, T=5, H=24, V=130, with_bias=True, dtypes=(torch.float32, torch.float32)):
    hidden = torch.randn(B, T, H).to(dtypes[0])
    weight = (torch.randn(V, H) * 0.4).to(dtypes[1])
    bias = (torch.randn(V) * 0.5).to(dtypes[1]) if with_bias else None
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < 0.2] = -100
    return hidden, weight, bias, labels


def reference_logprobs(hidden, weight, bias, labels, temperature):
    """float64 log_softmax on the (already rounded) inputs: (log p_i, entropy), differentiable."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    log_pi = torch.log_softmax(logits / temperature, -1)
    valid = labels != -100
    logp = log_pi.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, entropy, 0.0)


def grads_of(fn, leaves, upstream):
    """Outputs of fn(*leaves) and the gradients of Σ upstream·outputs w.r.t. the leaves."""
    xs = [None if t is None else t.detach().clone().requires_grad_(True) for t in leaves]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    live = [x for x in xs if x is not None]
    return [o.detach() for o in outs], torch.autograd.grad(total, live)


# Gradients w.r.t. hidden and weight in bf16/fp16 come out of a low-precision GEMM over V (or N) terms whose
# signs cancel (each row of the logit gradient sums to 0): within a few roundings of the largest element.
PROJECTION_ATOL_FACTOR = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def close(actual, expected, dtype=torch.float32, projected=False):
    """fp32: SPEC §4's 1e-5; bf16/fp16 inputs: within the output dtype's rounding of the largest element."""
    scale = float(expected.abs().max())
    factors = PROJECTION_ATOL_FACTOR if projected else GRAD_ATOL_FACTOR
    atol = (1e-6 if dtype == torch.float32 else factors[dtype]) * max(scale, 1e-30)
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_unfused_float64(backend, return_entropy, with_bias):
    hidden, weight, bias, labels = linear_inputs(with_bias=with_bias)
    upstream = [torch.randn(labels.shape, dtype=torch.float64) for _ in range(2)]

    def fused(h, w, b):
        return fused_linear_token_logprobs(h, w, labels, bias=b, temperature=0.7, return_entropy=return_entropy,
                                           chunk_size=4, backend=backend)

    def unfused(h, w, b):
        out = reference_logprobs(h, w, b, labels, 0.7)
        return out if return_entropy else out[0]

    outs, grads = grads_of(fused, [hidden, weight, bias], upstream)
    ref_outs, ref_grads = grads_of(unfused, [hidden, weight, bias], upstream)
    assert outs[0].dtype == torch.float32 and bool((outs[0][labels == -100] == 0).all())
    for o, r in zip(outs, ref_outs):
        close(o, r)
    for g, r, leaf in zip(grads, ref_grads, [t for t in (hidden, weight, bias) if t is not None]):
        assert g.dtype == leaf.dtype
        close(g, r)


def test_chunking_does_not_change_the_result():
    hidden, weight, bias, labels = linear_inputs(T=7)
    upstream = [torch.randn(labels.shape, dtype=torch.float64) for _ in range(2)]
    results = [grads_of(lambda h, w, b: fused_linear_token_logprobs(h, w, labels, bias=b, return_entropy=True,
                                                                     chunk_size=c, backend="torch"),
                        [hidden, weight, bias], upstream) for c in (1, 5, None)]
    for outs, grads in results[1:]:
        for a, b in zip(outs + list(grads), results[0][0] + list(results[0][1])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_equals_token_logprobs_of_the_logits():
    hidden, weight, bias, labels = linear_inputs()
    upstream = [torch.randn(labels.shape, dtype=torch.float64)]
    outs, grads = grads_of(lambda h, w, b: fused_linear_token_logprobs(h, w, labels, bias=b, backend="torch"),
                           [hidden, weight, bias], upstream)
    ref_outs, ref_grads = grads_of(lambda h, w, b: token_logprobs(h @ w.T + b, labels, backend="torch"),
                                   [hidden, weight, bias], upstream)
    for a, b in zip(outs + list(grads), ref_outs + list(ref_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_mixed_dtypes_follow_autocast(dtypes):
    """Products in the lower precision: the float64 reference runs on the inputs rounded to it."""
    low = min(dtypes, key=lambda d: torch.finfo(d).bits)
    hidden, weight, bias, labels = linear_inputs(dtypes=dtypes)
    upstream = [torch.randn(labels.shape, dtype=torch.float64) for _ in range(2)]
    outs, grads = grads_of(lambda h, w, b: fused_linear_token_logprobs(h, w, labels, bias=b, return_entropy=True,
                                                                        chunk_size=4, backend="torch"),
                           [hidden, weight, bias], upstream)
    ref_outs, ref_grads = grads_of(
        lambda h, w, b: reference_logprobs(h.to(low), w.to(low), b.to(low), labels, 1.0), [hidden, weight, bias],
        upstream)
    for o, r in zip(outs, ref_outs):  # logits rounded to `low` before the fp32 sweep
        close(o, r, low)
    for g, r, leaf in zip(grads, ref_grads, (hidden, weight, bias)):
        assert g.dtype == leaf.dtype
        close(g, r, low, projected=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_mixed_dtype_policy_loss_matches_autocast(reduction):
    """bf16 hidden with an fp32 LM head, as under torch.autocast: the fused loss equals the unfused one."""
    hidden, weight, bias, labels = linear_inputs(dtypes=(torch.bfloat16, torch.float32))
    adv = torch.randn(labels.shape[0], 1)
    upstream = [torch.randn(labels.shape if reduction == "none" else (), dtype=torch.float64)]

    def fused(h, w, b):
        return fused_linear_policy_loss(h, w, labels, adv, loss="lco", bias=b, reduction=reduction, chunk_size=4,
                                        backend="torch")

    def unfused(h, w, b):
        from lco_kernels import lco_loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(h, w, b)
        assert logits.dtype == torch.bfloat16
        return lco_loss(logits, labels, adv, reduction=reduction, backend="torch")

    outs, grads = grads_of(fused, [hidden, weight, bias], upstream)
    ref_outs, ref_grads = grads_of(unfused, [hidden, weight, bias], upstream)
    close(outs[0], ref_outs[0])  # the same bf16 logits (bias added inside the GEMM), the same fp32 sweep
    for g, r, leaf in zip(grads, ref_grads, (hidden, weight, bias)):
        assert g.dtype == leaf.dtype
        close(g, r, torch.bfloat16, projected=True)


def test_bad_input():
    hidden, weight, bias, labels = linear_inputs(dtypes=(torch.bfloat16, torch.float16))
    with pytest.raises(ValueError, match="bfloat16 and float16"):
        fused_linear_token_logprobs(hidden, weight, labels, bias=bias)
    hidden, weight, bias, labels = linear_inputs()
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_token_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_token_logprobs(hidden, weight.T, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_token_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_token_logprobs(hidden, weight, labels[:, :2])
