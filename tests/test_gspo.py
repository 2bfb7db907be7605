"""gspo_loss against verl 0.9.1's own ``gspo`` policy loss (``core_algos.compute_policy_loss_gspo``).

verl is a test dependency, installed by .ci/run (``pip install --no-deps verl==0.9.1`` and the few
packages its import needs), as for tests/test_training_loop.py's KL check; ``import lco_kernels``
never imports it, and the tests here that do not compare with verl run without it. verl is fed float64 log-probs from log_softmax of the
same (rounded) logits; the parity figures are printed by
``python -m pytest -s tests/test_gspo.py -k parity``.
"""
import os

import pytest
import torch


from helpers import BACKENDS, assert_grad_close, assert_loss_close
from lco_kernels import fused_linear_gspo_loss, gspo_loss
from lco_kernels.diagnostics.traffic import count_traffic, summarize

# our reduction -> verl's loss_agg_mode
VERL_MODES = {"mean": "token-mean", "seq-mean-token-mean": "seq-mean-token-mean",
              "seq-mean-token-sum": "seq-mean-token-sum", "seq-mean-token-sum-norm": "seq-mean-token-sum-norm"}


def gspo_inputs(B=4, T=9, V=300, dtype=torch.float32):
    """Logits, labels (some ignored, none all-ignored), per-sequence advantages and old log-probs that
    put some sequences inside GSPO's narrow clip range [1 − 3e-4, 1 + 4e-4] and some outside."""
    logits = (torch.randn(B, T, V, dtype=torch.float64) * 2).to(dtype)
    labels = torch.multinomial(torch.softmax(logits.double().reshape(-1, V), -1), 1).reshape(B, T)
    labels[:, 1:][torch.rand(B, T - 1) < 0.2] = -100
    adv = torch.randn(B, 1, dtype=torch.float64)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    # per-sequence log-ratio offsets: inside, above, below, inside the clip range (plus token noise)
    offsets = torch.tensor([1e-4, 1e-3, -1e-3, -1e-4], dtype=torch.float64).repeat(B)[:B, None]
    old = logp - offsets + 1e-4 * torch.randn(B, T, dtype=torch.float64)
    old[labels == -100] = float("nan")  # whatever sits at padding must not matter
    return logits, labels, adv.float(), old.float()


def verl_gspo(logits, labels, adv, old, mode, temperature=1.0, eps=(3e-4, 4e-4)):
    """verl's loss and its float64 gradient w.r.t. the logits."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import FSDPActorConfig
    cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=eps[0],
                          clip_ratio_high=eps[1], loss_agg_mode=mode)
    x = logits.detach().double().requires_grad_(True)
    logp = torch.log_softmax(x / temperature, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = (labels != -100).double()
    old64 = torch.where(labels != -100, old.double(), 0.0)
    loss, _ = core_algos.get_policy_loss_fn("gspo")(old64, logp, adv.double().expand(labels.shape), mask, mode, cfg)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def ours(logits, labels, adv, old, reduction, backend, **kw):
    x = logits.clone().requires_grad_(True)
    loss = gspo_loss(x, labels, adv, old, reduction=reduction, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def seq_ratios(logits, labels, old):
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    valid = labels != -100
    return torch.exp(torch.where(valid, logp - old.double(), 0.0).sum(-1) / valid.sum(-1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", list(VERL_MODES))
def test_parity_with_verl(backend, reduction):
    logits, labels, adv, old = gspo_inputs()
    s = seq_ratios(logits, labels, old)
    assert bool(((s < 1 - 3e-4) | (s > 1 + 4e-4)).any()) and bool(((s > 1 - 3e-4) & (s < 1 + 4e-4)).any())
    ref_loss, ref_grad = verl_gspo(logits, labels, adv, old, VERL_MODES[reduction])
    loss, grad = ours(logits, labels, adv, old, reduction, backend)
    print(f"\n{backend} fp32 {reduction}: |loss - verl| = {abs(loss.double() - ref_loss).item():.1e} "
          f"(loss {ref_loss.item():.4f}); max|grad - verl| / max|grad| = "
          f"{((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item():.1e}")
    assert_loss_close(loss, ref_loss, adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)


def test_parity_with_verl_float64_and_temperature():
    logits, labels, adv, old = gspo_inputs()
    logits = logits.double()
    ref_loss, ref_grad = verl_gspo(logits, labels, adv, old, "seq-mean-token-mean", temperature=0.7)
    loss, grad = ours(logits, labels, adv, old, "seq-mean-token-mean", "torch", temperature=0.7)
    print(f"\ntorch fp64 τ=0.7: |loss - verl| = {abs(loss - ref_loss).item():.1e}; "
          f"max|grad - verl| = {(grad - ref_grad).abs().max().item():.1e}")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-12)  # the reductions weigh in fp32
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_with_global_counts_sum_to_the_batch(reduction):
    logits, labels, adv, old = gspo_inputs(B=4)
    counts = {"token_count": int((labels != -100).sum())} if reduction == "mean" else {"seq_count": 4}
    full, full_grad = ours(logits, labels, adv, old, reduction, "torch")
    parts = [ours(logits[rows], labels[rows], adv[rows], old[rows], reduction, "torch", **counts)
             for rows in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full_grad, rtol=1e-5, atol=1e-8)


def test_clip_and_clamp_take_the_gradient_away():
    """A sequence outside the clip range in its advantage's direction, or with log s > 10, has no gradient."""
    logits, labels, adv, old = gspo_inputs(B=3)
    adv = torch.tensor([[1.0], [-1.0], [1.0]])
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0].float()
    old = torch.stack([logp[0] - 1e-2, logp[1] + 1e-2, logp[2] - 11.0])  # ratios e^0.01, e^-0.01, e^11
    loss, grad = ours(logits, labels, adv, old, "seq-mean-token-mean", "torch")
    assert bool((grad == 0).all())
    ref_loss, _ = verl_gspo(logits, labels, adv, old, "seq-mean-token-mean")
    assert_loss_close(loss, ref_loss, adv)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_linear_form_equals_unfused(with_bias):
    B, T, H, V = 3, 6, 16, 120
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H) * 0.3
    bias = torch.randn(V) * 0.1 if with_bias else None
    labels = torch.randint(0, V, (B, T))
    labels[:, -2:][torch.rand(B, 2) < 0.5] = -100
    adv = torch.randn(B, 1)
    old = torch.log_softmax((hidden @ weight.T + (0 if bias is None else bias)).double(), -1).gather(
        -1, labels.clamp(min=0)[..., None])[..., 0].float() + 1e-3 * torch.randn(B, T)
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    results = []
    for fused in (True, False):
        xs = [t.clone().requires_grad_(True) for t in leaves]
        h, w, b = xs[0], xs[1], xs[2] if with_bias else None
        if fused:
            loss = fused_linear_gspo_loss(h, w, labels, adv, old, bias=b, temperature=0.8, chunk_size=5)
        else:
            logits = h @ w.T + (0 if b is None else b)
            loss = gspo_loss(logits, labels, adv, old, temperature=0.8, backend="torch")
        results.append((loss.detach(), torch.autograd.grad(loss, xs)))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="traffic is counted by the Triton interpreter (CPU runs), as in test_traffic.py")
def test_same_vocabulary_traffic_as_a_fused_head():
    """GSPO on token_logprobs: 2 launches over the logits and 3.0 × N·V elements, as ppo_loss; the rest is O(N)."""
    logits, labels, adv, old = gspo_inputs(B=2, T=3, V=3001)
    x = logits.clone().requires_grad_(True)
    with count_traffic() as launches:
        gspo_loss(x, labels, adv, old, backend="triton").backward()
    stats = summarize(launches, labels.numel(), logits.shape[-1], logits.element_size())
    assert [launch.kernel for launch in launches] == ["_forward_kernel", "_backward_kernel"]
    assert stats["vocab_elements_per_NV"] == 3.0


def test_bad_input():
    logits, labels, adv, old = gspo_inputs(B=2, T=3, V=20)
    with pytest.raises(TypeError, match="old_logprobs"):
        gspo_loss(logits, labels, adv, None)
    with pytest.raises(ValueError, match="epsilon_low"):
        gspo_loss(logits, labels, adv, old, epsilon_low=1.5)
    with pytest.raises(ValueError, match="reduction"):
        gspo_loss(logits, labels, adv, old, reduction="seq-sum")
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(logits, labels, torch.randn(3, 1), old)
