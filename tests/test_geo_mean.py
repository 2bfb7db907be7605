"""geo_mean_loss (GMPO) against verl 0.9.1's own ``geo_mean`` policy loss (``compute_policy_loss_geo_mean``) in
verl's actor loss (tests/verl_actor.py), value and gradient w.r.t. the logits, float64 on verl's side.
Figures: ``python -m pytest -s tests/test_geo_mean.py -k parity``.
"""
import pytest
import torch

import reference
from helpers import BACKENDS, assert_grad_close, assert_loss_close
from verl_actor import VERL_MODES, verl_actor_loss
from lco_kernels import fused_linear_geo_mean_loss, geo_mean_loss


def gmpo_inputs(B=6, T=7, V=150, temperature=1.0):
    """Token log-ratios spread over ±0.5 (so that both clip bounds bind for both advantage signs), one
    sequence fully masked (verl's torch.mean counts it), per-sequence advantages of both signs, one 0."""
    logits = torch.randn(B, T, V, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1).reshape(B, T)
    labels[:, 1:][torch.rand(B, T - 1) < 0.2] = -100
    labels[-1] = -100
    adv = torch.randn(B, 1, dtype=torch.float64)
    adv[0], adv[1] = 0.0, -adv[1].abs()
    logp = reference.token_logprobs(logits / temperature, labels, -100)
    old = logp - 0.5 * (2 * torch.rand(B, T, dtype=torch.float64) - 1)
    ref = logp + 0.5 * torch.randn(B, T, dtype=torch.float64)
    pad = labels == -100
    return (logits.float(), labels, adv.float(), old.float().masked_fill(pad, float("nan")),
            ref.float().masked_fill(pad, float("nan")))


def run(fn, logits, labels, *args, **kw):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, labels, *args, **kw)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", list(VERL_MODES))
def test_parity_with_verl(backend, reduction):
    """GMPO's own mean over the rows, with KL (k3) and an entropy bonus aggregated by ``reduction`` as verl's
    actor does, clip range (0.2, 0.3), at a temperature."""
    torch.manual_seed(0)
    tau = 0.9
    logits, labels, adv, old, ref = gmpo_inputs(temperature=tau)
    kw = dict(temperature=tau, ref=ref, beta=0.1, entropy_coef=0.02)
    z = logits.double().requires_grad_(True)
    ref_loss = verl_actor_loss("geo_mean", z, labels, adv, old, reduction, eps=(0.2, 0.3), **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    loss, grad = run(geo_mean_loss, logits, labels, adv, old, epsilon_low=0.2, epsilon_high=0.3, ref_logprobs=ref,
                     beta=0.1, entropy_coef=0.02, temperature=tau, reduction=reduction, backend=backend)
    rel = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    print(f"\ngeo_mean vs verl {reduction} {backend}: |loss - verl| / |verl| = "
          f"{(abs(loss.double() - ref_loss) / ref_loss.abs()).item():.1e}; max|grad - verl| / max|grad| = {rel:.1e}")
    assert_loss_close(loss, ref_loss.detach(), adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)


def test_clip_binds_in_both_directions():
    """The inputs above are not degenerate: verl clips tokens of both advantage signs."""
    torch.manual_seed(0)
    logits, labels, adv, old, _ = gmpo_inputs(temperature=0.9)
    logp = reference.token_logprobs(logits.double() / 0.9, labels, -100)
    x = (logp - old.double())[labels != -100]
    sign = torch.sign(adv.expand(labels.shape))[labels != -100]
    assert bool(((sign > 0) & (x > 0.3)).any()) and bool(((sign < 0) & (x < -0.2)).any())


def test_seq_count_adds_micro_batches_up():
    """verl divides by the micro-batch's rows; with seq_count the micro-batches' losses and gradients add up to
    the whole batch's (verl's own function on the whole batch in float64)."""
    torch.manual_seed(1)
    logits, labels, adv, old, ref = gmpo_inputs()
    z = logits.double().requires_grad_(True)
    ref_loss = verl_actor_loss("geo_mean", z, labels, adv, old, "seq-mean-token-mean", ref=ref, beta=0.1)
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    parts = [run(geo_mean_loss, logits[rows], labels[rows], adv[rows], old[rows], ref_logprobs=ref[rows], beta=0.1,
                 reduction="seq-mean-token-mean", seq_count=6, backend="torch") for rows in (slice(0, 2), slice(2, 6))]
    assert_loss_close(parts[0][0] + parts[1][0], ref_loss.detach(), adv)
    assert_grad_close(torch.cat([parts[0][1], parts[1][1]]), ref_grad, adv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_corrected_kl_and_stats(backend):
    """bias_correction_kl: k3 × the token's ratio exp(log p − old), differentiable (float64 reference written
    here: verl has no such option); statistics: clipped where verl's clip took the gradient away, and
    logit_grad_norm of each token's share of its sequence's loss and its KL term (float64 autograd)."""
    torch.manual_seed(2)
    logits, labels, adv, old, ref = gmpo_inputs()
    valid = labels != -100
    z = logits.double().requires_grad_(True)
    logp = reference.token_logprobs(z, labels, -100)
    old64 = torch.where(valid, old.double(), 0.0)
    kl = reference.policy.kl_penalty(logp, torch.where(valid, ref.double(), 0.0), "k3") * torch.exp(logp - old64)
    ref_loss = verl_actor_loss("geo_mean", z, labels, adv, old, "mean") + 0.2 * reference.aggregate(kl, valid, "mean")
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    x = logits.clone().requires_grad_(True)
    loss, stats = geo_mean_loss(x, labels, adv, old, ref_logprobs=ref, beta=0.2, bias_correction_kl=True,
                                backend=backend, return_stats=True)
    (grad,) = torch.autograd.grad(loss, x)
    assert_loss_close(loss, ref_loss.detach(), adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)
    # per-token: ∂(sequence loss)/∂z_t + ∂(β·KL_t)/∂z_t, from float64 autograd of the unreduced terms
    z2 = logits.double().requires_grad_(True)
    logp2 = reference.token_logprobs(z2, labels, -100)
    x_t = logp2 - old64
    sign = torch.sign(adv.double()).expand(labels.shape)
    xt = sign * torch.minimum(sign * x_t, sign * x_t.clamp(-0.2, 0.2))
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    seq = -adv.double() * torch.exp((xt * valid).sum(-1, keepdim=True) / n)
    kl2 = reference.policy.kl_penalty(logp2, torch.where(valid, ref.double(), 0.0), "k3") * torch.exp(x_t)
    (g,) = torch.autograd.grad((seq.sum() + 0.2 * (kl2 * valid).sum()), z2)
    clipped = valid & ((sign * x_t.detach()) > (sign * x_t.detach().clamp(-0.2, 0.2)))
    assert 0 < int(clipped.sum()) < int(valid.sum())
    assert torch.equal(stats.clipped, clipped.float())
    torch.testing.assert_close(stats.logit_grad_norm.double(), torch.where(valid, g.norm(dim=-1), 0.0), rtol=1e-5,
                               atol=1e-6 * float(g.norm(dim=-1).max()))


# each loss's own options for the fused-linear parity: clip_cov draws its selection from a generator of the
# same seed in both forms, with ε wide enough that PPO's clip binds nowhere and a covariance band and ratio that
# select tokens (asserted below); bypass_mode's REINFORCE with token IS weights rejects some tokens (k1 ratio
# bounds [1/1.3, 1.3]; its clipped statistic is then exactly the rejection)
FUSED_LINEAR_OPTIONS = {
    "geo_mean": lambda: {},
    "clip_cov": lambda: dict(epsilon_low=0.95, epsilon_high=20.0, clip_cov_ratio=0.2, clip_cov_lb=-50.0,
                             clip_cov_ub=50.0, generator=torch.Generator().manual_seed(5)),
    "kl_cov": lambda: dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5),
    "bypass_mode": lambda: dict(loss_type="reinforce", rollout_is="token", rollout_rs="token_k1",
                                rollout_rs_threshold=1.3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FUSED_LINEAR_OPTIONS))
def test_fused_linear_form_equals_unfused(name, backend):
    """fused_linear_<name>_loss(hidden, weight, ..., bias=bias) against <name>_loss(hidden @ weight.T + bias, ...):
    value and the gradients w.r.t. hidden, weight and bias."""
    import lco_kernels

    torch.manual_seed(3)
    B, T, H, V = 3, 5, 16, 90
    hidden, weight, bias = torch.randn(B, T, H), torch.randn(V, H) * 0.4, torch.randn(V) * 0.1
    labels = torch.randint(0, V, (B, T))
    labels[:, -1][torch.rand(B) < 0.5] = -100
    adv = torch.randn(B, 1)
    with torch.no_grad():
        old = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = old + 0.3 * torch.randn(B, T)
    fused_fn, logits_fn = getattr(lco_kernels, f"fused_linear_{name}_loss"), getattr(lco_kernels, f"{name}_loss")
    results = []
    for fused in (True, False):
        xs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        kw = dict(temperature=0.8, entropy_coef=0.01, ref_logprobs=old - 0.2, beta=0.1, backend=backend,
                  return_stats=True, **FUSED_LINEAR_OPTIONS[name]())
        if fused:
            loss, stats = fused_fn(xs[0], xs[1], labels, adv, old, bias=xs[2], chunk_size=4, **kw)
        else:
            loss, stats = logits_fn(xs[0] @ xs[1].T + xs[2], labels, adv, old, **kw)
        results.append((loss.detach(), torch.autograd.grad(loss, xs), stats))
    (loss, grads, stats), (ref_loss, ref_grads, ref_stats) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * float(r.abs().max()))
    if stats.clipped is not None:  # the same tokens clipped, selected or rejected
        assert torch.equal(stats.clipped, ref_stats.clipped)
    valid = labels != -100
    if name == "clip_cov":  # PPO's clip binds nowhere: every clipped token is one the draw selected
        ratio = torch.exp(ref_stats.logprobs - old)[valid]
        assert bool(((ratio > 0.05) & (ratio < 21.0)).all())
        assert 1 <= int(ref_stats.clipped.sum()) < int(valid.sum())
    if name == "bypass_mode":  # some tokens rejected, not all
        assert 1 <= int(ref_stats.clipped.sum()) < int(valid.sum())
    print(f"{name} {backend}: max rel diff loss {float((loss - ref_loss).abs() / ref_loss.abs()):.1e}, "
          + ", ".join(f"grad {n} {float((g - r).abs().max() / r.abs().max()):.1e}"
                      for n, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads)))


def test_none_reduction_spreads_each_sequence_over_its_tokens():
    torch.manual_seed(4)
    logits, labels, adv, old, _ = gmpo_inputs()
    per_token = geo_mean_loss(logits, labels, adv, old, reduction="none", backend="torch")
    assert per_token.shape == labels.shape and bool((per_token[labels == -100] == 0).all())
    torch.testing.assert_close(per_token.sum(-1).mean(), geo_mean_loss(logits, labels, adv, old, backend="torch"))


def test_bad_input():
    logits, labels, adv, old, _ = gmpo_inputs(B=2, T=3, V=20)
    with pytest.raises(ValueError, match="epsilon_low"):
        geo_mean_loss(logits, labels, adv, old, epsilon_low=-0.1)
    with pytest.raises(TypeError, match="epsilon_high"):
        geo_mean_loss(logits, labels, adv, old, epsilon_high=None)
    with pytest.raises(ValueError, match="seq_count"):
        geo_mean_loss(logits, labels, adv, old, seq_count=0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        fused_linear_geo_mean_loss(torch.randn(2, 3, 4), torch.randn(20, 4), labels, adv, old, beta=0.1)


def test_signatures_of_the_losses_on_token_logprobs_cannot_drift():
    """Every loss written on token log-probs (sequence.py, batch_selected.py, rollout_correction.py) takes the
    options it shares with ``ppo_loss`` (KL, temperature, entropy, masking, counts, backend, stats) with
    ppo_loss's defaults, plus ``bias_correction_kl=False``; each fused-linear form takes exactly its logits
    form's options plus bias / chunk_size / accum_dtype, with the same defaults."""
    import inspect

    import lco_kernels

    def options(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}

    ppo = options(lco_kernels.ppo_loss)
    shared = {n: ppo[n] for n in ("ref_logprobs", "beta", "kl_type", "bias_correction_kl", "temperature",
                                  "entropy_coef", "ignore_index", "loss_mask", "max_length", "token_count",
                                  "seq_count", "backend", "return_stats")}
    assert shared["bias_correction_kl"] is False
    for name in ("gspo", "geo_mean", "vespo", "clip_cov", "kl_cov", "bypass_mode"):
        ours = options(getattr(lco_kernels, f"{name}_loss"))
        assert {n: ours.get(n, "missing") for n in shared} == shared, name
        linear = options(getattr(lco_kernels, f"fused_linear_{name}_loss"))
        assert linear == {**ours, "bias": None, "chunk_size": None, "accum_dtype": torch.float32}, name
