"""Kernel structure (SPEC §3), counted under the Triton interpreter: launches and bytes moved."""
import os

import pytest
import torch

from helpers import make_inputs
import lco_kernels
from lco_kernels import lco_loss
from lco_kernels.diagnostics.aot import heads
from lco_kernels.diagnostics.traffic import count_traffic, summarize

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="traffic is counted by the Triton interpreter (CPU runs)")

SIDE_BYTES_PER_ROW = 64  # labels, advantages, loss, alpha, m, log s, coef: O(N), a few scalars per row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_backward_moves_three_NV_in_two_launches(dtype, inplace, reduction):
    B, T, V = 2, 4, 9001
    logits, labels, adv = make_inputs((B, T), V, dtype, ignore_frac=0.0, zero_adv_frac=0.0)
    x = logits.clone().requires_grad_(True)
    y = x * 1.0
    with count_traffic() as launches:
        loss = lco_loss(y, labels, adv, reduction=reduction, inplace_backward=inplace, backend="triton")
        loss.backward(torch.ones_like(loss))
    stats = summarize(launches, B * T, V, logits.element_size())
    assert [l.kernel for l in launches] == ["_forward_kernel", "_backward_kernel"]
    assert stats["launches"] == 2
    assert stats["vocab_elements_per_NV"] == 3.0   # read, read, write: SPEC's bound, met exactly
    assert stats["side_bytes_per_row"] <= SIDE_BYTES_PER_ROW
    assert stats["unattributed_bytes"] == 0
    written = "grad_ptr+logits_ptr" if inplace else "grad_ptr"
    assert launches[1].stored[written] == B * T * V * logits.element_size()


def test_forward_alone_reads_once():
    logits, labels, adv = make_inputs((6,), 3000, torch.float32, ignore_frac=0.0)
    with count_traffic() as launches, torch.no_grad():
        lco_loss(logits, labels, adv, backend="triton")
    stats = summarize(launches, 6, 3000, 4)
    assert stats["launches"] == 1 and stats["vocab_elements_per_NV"] == 1.0


def test_rows_without_gradient_do_not_read_logits():
    """Ignored rows are never read; rows with Ψ = 0 are read once (forward) and only written after."""
    V = 2000
    logits, labels, adv = make_inputs((8,), V, torch.float32, ignore_frac=0.0, zero_adv_frac=0.0)
    labels[:2] = -100
    adv[2:4] = 0.0
    x = logits.clone().requires_grad_(True)
    with count_traffic() as launches:
        lco_loss(x, labels, adv, backend="triton").backward()
    fwd, bwd = launches
    assert fwd.loaded["logits_ptr"] == 6 * V * 4
    assert bwd.loaded["logits_ptr"] == 4 * V * 4
    assert bwd.stored["grad_ptr"] == 8 * V * 4


@pytest.mark.parametrize("loss", ["lco", "ppo+kl"])
def test_stats_come_from_the_same_sweep(loss):
    """return_stats adds O(N) stores, not a pass over the logits."""
    from lco_kernels import ppo_loss
    B, T, V = 2, 3, 5000
    logits, labels, adv = make_inputs((B, T), V, torch.bfloat16, ignore_frac=0.0, zero_adv_frac=0.0)
    old = torch.randn(B, T) - 8
    x = logits.clone().requires_grad_(True)
    with count_traffic() as launches:
        if loss == "lco":
            out, _ = lco_loss(x, labels, adv, backend="triton", return_stats=True)
        else:
            out, _ = ppo_loss(x, labels, adv, old, ref_logprobs=old, beta=0.1, backend="triton", return_stats=True)
        out.backward()
    stats = summarize(launches, B * T, V, 2)
    assert stats["launches"] == 2
    assert stats["vocab_elements_per_NV"] <= 3.0
    assert stats["side_bytes_per_row"] <= SIDE_BYTES_PER_ROW + 4 * 8  # + the stats rows and ref/old log-probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_and_entropy_term_keep_three_NV_in_two_launches(dtype):
    """temperature scales inside both sweeps and the entropy bonus's gradient is folded into sweep 2."""
    from lco_kernels import ppo_loss
    B, T, V = 2, 3, 5000
    logits, labels, adv = make_inputs((B, T), V, dtype, ignore_frac=0.0, zero_adv_frac=0.0)
    old = torch.randn(B, T) - 8
    x = logits.clone().requires_grad_(True)
    with count_traffic() as launches:
        ppo_loss(x, labels, adv, old, ref_logprobs=old, beta=0.1, temperature=0.7, entropy_coef=0.01,
                 backend="triton").backward()
    stats = summarize(launches, B * T, V, logits.element_size())
    assert [l.kernel for l in launches] == ["_forward_kernel", "_backward_kernel"]
    assert launches[1].constexprs["HAS_ENTROPY"]
    assert stats["vocab_elements_per_NV"] == 3.0
    assert stats["side_bytes_per_row"] <= SIDE_BYTES_PER_ROW + 4 * 8  # + old/ref and the entropy's row state


def test_token_logprobs_read_once_forward_read_and_write_once_backward():
    from lco_kernels import token_logprobs
    N, V = 6, 3000
    logits, labels, _ = make_inputs((N,), V, torch.float32, ignore_frac=0.0)
    x = logits.clone().requires_grad_(True)
    with count_traffic() as launches:
        logp, entropy = token_logprobs(x, labels, return_entropy=True, backend="triton")
    assert summarize(launches, N, V, 4)["vocab_elements_per_NV"] == 1.0
    with count_traffic() as launches:
        (logp.sum() + entropy.sum()).backward()
    assert summarize(launches, N, V, 4)["vocab_elements_per_NV"] == 2.0 and len(launches) == 1


@pytest.mark.parametrize("head", heads(), ids=lambda h: h.name)
def test_every_head_moves_three_NV_in_two_launches(head):
    """Every loss of the registry with each option that selects head code (old log-probs, dual clip,
    DPPO's divergence, the KL term plain and bias-corrected): one fused forward, one backward."""
    N, V = 4, 3000
    logits, labels, adv = make_inputs((N,), V, torch.float32, ignore_frac=0.0, zero_adv_frac=0.0)
    old = torch.log_softmax(logits, -1).gather(1, labels[:, None])[:, 0] + 0.05 * torch.randn(N)
    args, options = head.arguments(adv, old, old - 0.1)
    x = logits.clone().requires_grad_(True)
    with count_traffic() as launches:
        getattr(lco_kernels, f"{head.loss}_loss")(x, labels, *args, **options, backend="triton").backward()
    stats = summarize(launches, N, V, 4)
    assert [l.kernel for l in launches] == ["_forward_kernel", "_backward_kernel"]
    assert stats["vocab_elements_per_NV"] == 3.0
    assert stats["side_bytes_per_row"] <= SIDE_BYTES_PER_ROW + 4 * 8


SEQUENCE_LOSSES = {
    "gspo": lambda x, labels, adv, old, extra: lco_kernels.gspo_loss(x, labels, adv, old, **extra),
    "geo_mean": lambda x, labels, adv, old, extra: lco_kernels.geo_mean_loss(x, labels, adv, old, **extra),
    "vespo": lambda x, labels, adv, old, extra: lco_kernels.vespo_loss(x, labels, adv, old, sampler_ratio=old.exp(),
                                                                       **extra),
    "clip_cov": lambda x, labels, adv, old, extra: lco_kernels.clip_cov_loss(x, labels, adv, old, clip_cov_ratio=0.5,
                                                                             clip_cov_lb=-10.0, **extra),
    "kl_cov": lambda x, labels, adv, old, extra: lco_kernels.kl_cov_loss(x, labels, adv, old, kl_cov_ratio=0.5,
                                                                         **extra),
    "bypass_mode": lambda x, labels, adv, old, extra: lco_kernels.bypass_mode_loss(
        x, labels, adv, old, loss_type="reinforce", rollout_is="sequence", rollout_rs="token_k1,seq_mean_k3",
        rollout_rs_threshold="0.5_2.0,1.0", **extra),
}


@pytest.mark.parametrize("loss", list(SEQUENCE_LOSSES))
def test_sequence_and_batch_selected_losses_keep_three_NV_in_two_launches(loss):
    """Losses written on token_logprobs (statistics over sequences or the micro-batch of the current log-probs,
    a KL term with the bias correction, an entropy bonus): one sweep forward, one backward, 3.0·N·V."""
    B, T, V = 2, 3, 5000
    logits, labels, adv = make_inputs((B, T), V, torch.float32, ignore_frac=0.0, zero_adv_frac=0.0)
    adv = adv[:, :1]
    old = torch.randn(B, T) * 0.1 - 8
    extra = dict(ref_logprobs=old + 0.3, beta=0.1, bias_correction_kl=True, entropy_coef=0.01, backend="triton")
    x = logits.clone().requires_grad_(True)
    with count_traffic() as launches:
        SEQUENCE_LOSSES[loss](x, labels, adv, old, extra).backward()
    stats = summarize(launches, B * T, V, logits.element_size())
    assert [l.kernel for l in launches] == ["_forward_kernel", "_backward_kernel"]
    assert stats["vocab_elements_per_NV"] == 3.0
