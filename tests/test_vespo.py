"""vespo_loss against TRL 1.16's own ``GRPOTrainer.get_gamma_weights`` and Liger 0.8.5's own chunked GRPO loss
(``LigerFusedLinearGRPOFunction.ppo_loss_fn`` fed float64 log-probs, and ``LigerFusedLinearGRPOLoss`` for the
fused-linear form), value and gradient w.r.t. the logits (float64 peer side). Figures:
``python -m pytest -s tests/test_vespo.py -k parity``.
"""
import pytest
import torch

import reference
from helpers import BACKENDS, assert_grad_close, assert_loss_close
from lco_kernels import fused_linear_vespo_loss, vespo_loss


def vespo_inputs(B=5, T=8, V=200, temperature=1.0):
    """Logits, labels (some padding), per-sequence advantages of both signs and one exact 0 (TRL picks
    k_pos / λ_pos at Ψ ≥ 0), old log-probs that spread the sequence ratios w over [e^-1.5, e^1.5], the
    reference half a nat off, and a vLLM ratio with truncated values and masked (0) tokens. NaN at padding."""
    logits = torch.randn(B, T, V, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1).reshape(B, T)
    labels[:, 1:][torch.rand(B, T - 1) < 0.2] = -100
    adv = torch.randn(B, 1, dtype=torch.float64)
    adv[0] = 0.0
    adv[1] = -adv[1].abs()
    logp = reference.token_logprobs(logits / temperature, labels, -100)
    old = logp - torch.linspace(-1.5, 1.5, B, dtype=torch.float64)[:, None] / T + 0.05 * torch.randn(B, T)
    ref = logp + 0.5 * torch.randn(B, T, dtype=torch.float64)
    sampler = torch.exp(0.1 * torch.randn(B, T, dtype=torch.float64)).clamp(max=1.1)
    sampler[-1, 0] = 0.0  # a token masked out by token_mask: its log is clamped at log 1e-8
    pad = labels == -100
    return (logits.float(), labels, adv.float(), old.float().masked_fill(pad, float("nan")),
            ref.float().masked_fill(pad, float("nan")), sampler.float().masked_fill(pad, float("nan")))


def trl_loss(z, labels, adv, old, ref, sampler, beta, bias_correction_kl, temperature=1.0):
    """TRL's vespo loss in float64: TRL's own get_gamma_weights, then _compute_loss's per-token loss,
    k3 KL (× coef_1 with use_bias_correction_kl) and its "vespo" aggregation (token mean, one process)."""
    GRPOTrainer = pytest.importorskip("trl").GRPOTrainer
    logp = reference.token_logprobs(z / temperature, labels, -100)
    mask = (labels != -100).double()
    log_ratio = logp - torch.where(mask > 0, old.double(), 0.0)
    # TRL's pipeline puts ratio 1 at padding (its log-ratio diff is multiplied by the mask before exp)
    is_ratio = None if sampler is None else torch.where(mask > 0, sampler.double(), 1.0)
    phi = GRPOTrainer.get_gamma_weights(adv.double(), log_ratio, mask, is_ratio)
    loss = -phi * adv.double() * logp
    if beta:
        d = torch.where(mask > 0, ref.double(), 0.0) - logp
        kl = torch.exp(d) - d - 1
        loss = loss + beta * (kl * torch.exp(log_ratio) if bias_correction_kl else kl)
    return (loss * mask).sum() / mask.sum()


def liger_loss(z, labels, adv, old, ref, sampler, beta, bias_correction_kl, temperature=1.0):
    """Liger's own chunked GRPO loss function (loss_type="vespo") on float64 log-probs."""
    grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    logp = reference.token_logprobs(z / temperature, labels, -100)
    mask = (labels != -100).double()
    loss, _ = grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        logp, mask, adv.double()[:, 0], mask, ref_per_token_logps=torch.where(mask > 0, ref.double(), 0.0),
        old_per_token_logps=torch.where(mask > 0, old.double(), 0.0), beta=beta, loss_type="vespo",
        vllm_is_ratio=None if sampler is None else torch.where(mask > 0, sampler.double(), 1.0),
        use_bias_correction_kl=bias_correction_kl)
    return loss


PEERS = {"trl": trl_loss, "liger": liger_loss}
CASES = {"plain": dict(sampler=False, beta=0.0, bias_correction_kl=False),
         "vllm-ratio+kl": dict(sampler=True, beta=0.1, bias_correction_kl=False),
         "vllm-ratio+bias-corrected-kl": dict(sampler=True, beta=0.1, bias_correction_kl=True)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("peer", list(PEERS))
def test_parity_with_peers(peer, case, backend):
    torch.manual_seed(0)
    logits, labels, adv, old, ref, sampler = vespo_inputs()
    opts = CASES[case]
    sampler = sampler if opts["sampler"] else None
    z = logits.double().requires_grad_(True)
    ref_loss = PEERS[peer](z, labels, adv, old, ref, sampler, opts["beta"], opts["bias_correction_kl"])
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    x = logits.clone().requires_grad_(True)
    kl = dict(ref_logprobs=ref, beta=opts["beta"]) if opts["beta"] else {}
    loss = vespo_loss(x, labels, adv, old, sampler_ratio=sampler, bias_correction_kl=opts["bias_correction_kl"],
                      backend=backend, **kl)
    (grad,) = torch.autograd.grad(loss, x)
    rel = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    print(f"\nvespo vs {peer} {case} {backend}: |loss - peer| / |peer| = "
          f"{(abs(loss.double() - ref_loss) / ref_loss.abs()).item():.1e}; max|grad - peer| / max|grad| = {rel:.1e}")
    assert_loss_close(loss, ref_loss.detach(), adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)


def test_the_weights_span_both_gamma_branches_and_the_clamps():
    """The inputs above are not a degenerate case: φ takes values well away from 1 on both sides of Ψ's sign."""
    GRPOTrainer = pytest.importorskip("trl").GRPOTrainer
    torch.manual_seed(0)
    logits, labels, adv, old, _, sampler = vespo_inputs()
    logp = reference.token_logprobs(logits.double(), labels, -100)
    mask = (labels != -100).double()
    phi = GRPOTrainer.get_gamma_weights(adv.double(), logp - torch.where(mask > 0, old.double(), 0.0), mask,
                                        torch.where(mask > 0, sampler.double(), 1.0))
    print(f"\nφ = {phi[:, 0].tolist()}")
    assert phi.min() < 1e-6 and bool(((phi > 0.2) & (phi < 0.95)).sum() >= 2)


def test_trl_sums_the_sampler_ratio_over_padding():
    """The documented difference: TRL folds the vLLM ratio of every position into w, padding included;
    here only valid tokens count, so a padding ratio other than 1 changes TRL's loss and not ours."""
    GRPOTrainer = pytest.importorskip("trl").GRPOTrainer
    torch.manual_seed(1)
    logits, labels, adv, old, _, sampler = vespo_inputs()
    assert bool((labels == -100).any())
    logp = reference.token_logprobs(logits.double(), labels, -100)
    mask = (labels != -100).double()
    log_ratio = logp - torch.where(mask > 0, old.double(), 0.0)
    phis = [GRPOTrainer.get_gamma_weights(adv.double(), log_ratio, mask, torch.where(mask > 0, sampler.double(), pad))
            for pad in (1.0, 2.0)]
    padded = (mask == 0).any(-1)
    assert bool((phis[1][padded] > 2 * phis[0][padded]).all() | (phis[1][padded] < phis[0][padded] / 2).all())
    ours = [vespo_loss(logits, labels, adv, old, sampler_ratio=sampler.masked_fill(mask == 0, pad), backend="torch")
            for pad in (1.0, 2.0)]
    assert torch.equal(ours[0], ours[1])


def test_on_policy_is_reinforce():
    """old_logprobs=None: w = 1 and φ(1) = 1 exactly: REINFORCE's loss and gradient (float64 reference)."""
    torch.manual_seed(2)
    logits, labels, adv, *_ = vespo_inputs(B=3, T=4, V=50)
    x = logits.clone().requires_grad_(True)
    loss = vespo_loss(x, labels, adv, None, temperature=0.8, reduction="seq-mean-token-mean", backend="torch")
    loss.backward()
    z = logits.double().requires_grad_(True)
    _, ref = reference.policy_loss_reference("pg", z, labels, adv.double(), temperature=0.8,
                                             reduction="seq-mean-token-mean")
    ref.backward()
    assert_loss_close(loss, ref.detach(), adv)
    assert_grad_close(x.grad, z.grad, adv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_parity_with_liger_module(backend):
    """fused_linear_vespo_loss against Liger's LigerFusedLinearGRPOLoss(loss_type="vespo") (float32, its own
    chunking), with the vLLM ratio and the bias-corrected KL: loss and the hidden / weight / bias gradients."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    torch.manual_seed(3)
    B, T, H, V = 4, 6, 16, 96
    hidden, weight, bias = torch.randn(B, T, H), torch.randn(V, H) * 0.5, torch.randn(V) * 0.1
    labels = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[:, -2:][torch.rand(B, 2) < 0.5] = 0
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    with torch.no_grad():
        logp = torch.log_softmax((hidden @ weight.T + bias).double(), -1).gather(-1, labels[..., None])[..., 0]
    old = (logp + 0.1 * torch.randn(B, T)).float()
    ref = (logp + 0.3 * torch.randn(B, T)).float()
    sampler = torch.exp(0.2 * torch.randn(B, T)).masked_fill(mask == 0, 1.0)
    module = liger.LigerFusedLinearGRPOLoss(beta=0.05, compiled=False, chunk_size=2, loss_type="vespo",
                                            use_bias_correction_kl=True)
    results = []
    for ours in (False, True):
        xs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        if ours:
            loss = fused_linear_vespo_loss(xs[0], xs[1], labels, adv[:, None], old, bias=xs[2], sampler_ratio=sampler,
                                           ref_logprobs=ref, beta=0.05, bias_correction_kl=True, loss_mask=mask,
                                           chunk_size=5, backend=backend)
        else:
            loss, _ = module(xs[0], xs[1], labels, mask, adv, bias=xs[2], ref_per_token_logps=ref,
                             old_per_token_logps=old, vllm_is_ratio=sampler)
        results.append((loss.detach(), torch.autograd.grad(loss, xs)))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        print(f"\nfused linear vespo vs Liger module {backend} grad_{name}: max|diff| / max|grad| = "
              f"{((g - r).abs().max() / r.abs().max()).item():.1e}")
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_against_float64(backend):
    """logit_grad_norm: ‖∂ℓ_t/∂z_t‖ of each token's own VESPO and bias-corrected KL terms (φ is detached, so the
    float64 gradient of TRL's unreduced loss summed holds it in row t); no clipped; logprobs and entropy."""
    torch.manual_seed(5)
    logits, labels, adv, old, ref, sampler = vespo_inputs()
    valid = labels != -100
    z = logits.double().requires_grad_(True)
    per_token_sum = trl_loss(z, labels, adv, old, ref, sampler, 0.1, True) * valid.sum()
    (grad,) = torch.autograd.grad(per_token_sum, z)
    _, stats = vespo_loss(logits, labels, adv, old, sampler_ratio=sampler, ref_logprobs=ref, beta=0.1,
                          bias_correction_kl=True, backend=backend, return_stats=True)
    norm = torch.where(valid, grad.norm(dim=-1), 0.0)
    torch.testing.assert_close(stats.logit_grad_norm.double(), norm, rtol=1e-5, atol=1e-6 * float(norm.max()))
    logp = reference.token_logprobs(logits.double(), labels, -100)
    torch.testing.assert_close(stats.logprobs.double(), torch.where(valid, logp, 0.0), rtol=1e-5, atol=1e-6)
    assert stats.clipped is None


def test_bad_input():
    logits, labels, adv, old, _, sampler = vespo_inputs(B=2, T=3, V=20)
    for name in ("k_pos", "lambda_pos", "k_neg", "lambda_neg"):
        with pytest.raises(ValueError, match=name):
            vespo_loss(logits, labels, adv, old, **{name: 0.0})
    with pytest.raises(TypeError, match="k_pos"):
        vespo_loss(logits, labels, adv, old, k_pos="2")
    with pytest.raises(TypeError, match="sampler_ratio"):
        vespo_loss(logits, labels, adv, old, sampler_ratio=1.0)
    with pytest.raises(ValueError, match="sampler_ratio"):
        vespo_loss(logits, labels, adv, old, sampler_ratio=sampler[:, :2])
    with pytest.raises(TypeError, match="bias_correction_kl"):
        vespo_loss(logits, labels, adv, old, bias_correction_kl=1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        vespo_loss(logits, labels, adv, old, beta=0.1)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_vespo_loss(torch.randn(2, 3, 4), torch.randn(20, 3), labels, adv, old)
