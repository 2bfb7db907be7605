"""bypass_mode_loss and rollout_correction against verl 0.9.1's own ``bypass_mode`` policy loss and its
``rollout_corr_helper.compute_rollout_correction_and_rejection_mask``, value and gradient w.r.t. the logits
(float64 on verl's side). Figures: ``python -m pytest -s tests/test_rollout_correction.py -k parity``.
"""
import pytest
import torch

import reference
from helpers import BACKENDS, assert_grad_close, assert_loss_close
from verl_actor import verl_actor_loss
from lco_kernels import bypass_mode_loss, rollout_correction


def rollout_inputs(B=6, T=8, V=100):
    """Rollout log-probs off the current ones by a per-sequence drift (−0.3 … 0.3) plus token noise, so that
    the weights truncate and the rejection options reject some tokens and sequences, not all."""
    logits = torch.randn(B, T, V, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1).reshape(B, T)
    labels[:, 1:][torch.rand(B, T - 1) < 0.2] = -100
    adv = torch.randn(B, 1, dtype=torch.float64)
    adv[1] = -adv[1].abs()
    logp = reference.token_logprobs(logits, labels, -100)
    rollout = logp - torch.linspace(-0.3, 0.3, B, dtype=torch.float64)[:, None] - 0.2 * torch.randn(B, T)
    ref = logp + 0.5 * torch.randn(B, T, dtype=torch.float64)
    pad = labels == -100
    return (logits.float(), labels, adv.float(), rollout.float().masked_fill(pad, float("nan")),
            ref.float().masked_fill(pad, float("nan")))


CASES = {
    "ppo_clip token_k1": dict(loss_type="ppo_clip", rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25"),
    "ppo_clip seq_mean_k3": dict(loss_type="ppo_clip", rollout_is="token", rollout_rs="seq_mean_k3",
                                 rollout_rs_threshold=0.02),
    "reinforce token TIS + token_k2": dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.2,
                                           rollout_rs="token_k2", rollout_rs_threshold=0.08),
    "reinforce sequence IcePop normalized + seq_max_k2,seq_sum_k1": dict(
        loss_type="reinforce", rollout_is="sequence", rollout_is_threshold="0.3_3.0", rollout_is_batch_normalize=True,
        rollout_rs="seq_max_k2,seq_sum_k1", rollout_rs_threshold="0.3,0.2_5.0"),
    "reinforce token normalized": dict(loss_type="reinforce", rollout_is="token", rollout_is_batch_normalize=True),
}


def verl_bypass(z, labels, adv, rollout, reduction, ref, case):
    RolloutCorrectionConfig = pytest.importorskip("verl.trainer.config.algorithm").RolloutCorrectionConfig
    cfg = RolloutCorrectionConfig(bypass_mode=True, **case)
    return verl_actor_loss("bypass_mode", z, labels, adv, rollout, reduction, ref=ref, beta=0.1, entropy_coef=0.01,
                           rollout_correction=cfg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_verl(case, reduction, backend):
    torch.manual_seed(0)
    logits, labels, adv, rollout, ref = rollout_inputs()
    z = logits.double().requires_grad_(True)
    ref_loss = verl_bypass(z, labels, adv, rollout, reduction, ref, CASES[case])
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    x = logits.clone().requires_grad_(True)
    loss = bypass_mode_loss(x, labels, adv, rollout, ref_logprobs=ref, beta=0.1, entropy_coef=0.01,
                            reduction=reduction, backend=backend, **CASES[case])
    (grad,) = torch.autograd.grad(loss, x)
    rel = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    print(f"\nbypass_mode vs verl {case} {reduction} {backend}: |loss - verl| / |verl| = "
          f"{(abs(loss.double() - ref_loss) / ref_loss.abs()).item():.1e}; max|grad - verl| / max|grad| = {rel:.1e}")
    assert_loss_close(loss, ref_loss.detach(), adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_weights_and_mask_match_verl_helper(case):
    """rollout_correction against verl's compute_rollout_correction_and_rejection_mask in float64, and the
    cases are not degenerate: some tokens are rejected, not all; truncated / masked weights occur."""
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    torch.manual_seed(0)
    logits, labels, adv, rollout, _ = rollout_inputs()
    opts = {k: v for k, v in CASES[case].items() if k != "loss_type"}
    valid = labels != -100
    logp = reference.token_logprobs(logits.double(), labels, -100)
    rollout64 = torch.where(valid, rollout.double(), 0.0)
    proto, verl_mask, _ = helper.compute_rollout_correction_and_rejection_mask(logp, rollout64, valid.double(), **opts)
    weights, kept = rollout_correction(logp.float(), rollout.float(), valid, **opts)
    if "rollout_rs" in opts:
        assert torch.equal(kept, verl_mask.bool())
        assert 0 < int((valid & ~kept).sum()) < int(valid.sum())
    if "rollout_is" not in opts:
        assert weights is None and proto is None
        return
    verl_weights = proto.batch["rollout_is_weights"]
    torch.testing.assert_close(weights.double(), verl_weights, rtol=1e-5, atol=1e-7)
    assert bool((verl_weights[valid] != torch.exp(logp - rollout64)[valid]).any())


def test_bad_input():
    logits, labels, adv, rollout, _ = rollout_inputs(B=2, T=3, V=20)
    bad = {"loss_type": "ppo", "rollout_is": "tokens", "rollout_is_threshold": "2_1",
           "rollout_is_batch_normalize": 1, "rollout_rs": "token_k4", "clip_ratio_c": 1.0}
    for name, value in bad.items():
        opts = {name: value, "rollout_is": "token"} if name.startswith("rollout_is_") else {name: value}
        with pytest.raises((ValueError, TypeError), match=name):
            bypass_mode_loss(logits, labels, adv, rollout, **opts)
    with pytest.raises(ValueError, match="rollout_rs_threshold"):
        bypass_mode_loss(logits, labels, adv, rollout, rollout_rs="token_k2")
    with pytest.raises(ValueError, match="rollout_rs_threshold"):
        bypass_mode_loss(logits, labels, adv, rollout, rollout_rs="token_k2", rollout_rs_threshold="0.5_2")
    with pytest.raises(ValueError, match="rollout_rs_threshold"):
        bypass_mode_loss(logits, labels, adv, rollout, rollout_rs="token_k2,seq_mean_k3",
                         rollout_rs_threshold="0.5,0.2,0.1")
    with pytest.raises(TypeError, match="rollout_logprobs"):
        bypass_mode_loss(logits, labels, adv, None)


@pytest.mark.parametrize("case", ["ppo_clip seq_mean_k3", "reinforce token TIS + token_k2"])
def test_stats_against_verl(case):
    """logit_grad_norm: ‖∂ℓ_t/∂z_t‖ of each token's own term (verl's token-mean loss × the kept-token count
    holds it in row t: weights and mask are detached); clipped: PPO's clips and the rejected tokens."""
    torch.manual_seed(0)
    logits, labels, adv, rollout, _ = rollout_inputs()
    valid = labels != -100
    opts = {k: v for k, v in CASES[case].items() if k != "loss_type"}
    _, kept = rollout_correction(reference.token_logprobs(logits.double(), labels, -100).float(), rollout, valid,
                                 **opts)
    z = logits.double().requires_grad_(True)
    RolloutCorrectionConfig = pytest.importorskip("verl.trainer.config.algorithm").RolloutCorrectionConfig
    loss = verl_actor_loss("bypass_mode", z, labels, adv, rollout, "mean",
                           rollout_correction=RolloutCorrectionConfig(bypass_mode=True, **CASES[case]))
    (grad,) = torch.autograd.grad(loss * kept.sum(), z)
    _, stats = bypass_mode_loss(logits, labels, adv, rollout, backend="torch", return_stats=True, **CASES[case])
    norm = torch.where(valid, grad.norm(dim=-1), 0.0)
    torch.testing.assert_close(stats.logit_grad_norm.double(), norm, rtol=1e-5, atol=1e-6 * float(norm.max()))
    assert bool((stats.clipped[valid & ~kept] == 1).all()) and bool((stats.logit_grad_norm[valid & ~kept] == 0).all())
