"""clip_cov_loss and kl_cov_loss against verl 0.9.1's own ``clip_cov`` / ``kl_cov`` policy losses in verl's actor
loss (tests/verl_actor.py), value and gradient w.r.t. the logits (float64 on verl's side), under the same seed
of torch's default generator for clip_cov's random selection. Figures:
``python -m pytest -s tests/test_batch_selected.py -k parity``.
"""
import pytest
import torch

import reference
from helpers import BACKENDS, assert_grad_close, assert_loss_close
from verl_actor import verl_actor_loss
from lco_kernels import clip_cov_loss, kl_cov_loss


def cov_inputs(B=6, T=10, V=120):
    """Per-sequence advantages of both signs and log-ratios within ±0.3 (some beyond PPO's ε = 0.2, so that
    PPO's own clip removes candidates), NaN at padding."""
    logits = torch.randn(B, T, V, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1).reshape(B, T)
    labels[:, 1:][torch.rand(B, T - 1) < 0.15] = -100
    adv = torch.randn(B, 1, dtype=torch.float64) * 1.5
    logp = reference.token_logprobs(logits, labels, -100)
    old = logp - 0.3 * (2 * torch.rand(B, T, dtype=torch.float64) - 1)
    ref = logp + 0.5 * torch.randn(B, T, dtype=torch.float64)
    pad = labels == -100
    return (logits.float(), labels, adv.float(), old.float().masked_fill(pad, float("nan")),
            ref.float().masked_fill(pad, float("nan")))


def covariances(logits, labels, adv):
    """verl's covariance in float64 over the valid tokens (for choosing inputs away from the bounds)."""
    valid = labels != -100
    logp = reference.token_logprobs(logits.double(), labels, -100)
    a = adv.double().expand(labels.shape)
    return ((a - a[valid].mean()) * (logp - logp[valid].mean()))[valid]


def both(loss_mode, ours_fn, logits, labels, adv, old, ref, reduction, backend, seed, verl_cfg, ours_cfg):
    z = logits.double().requires_grad_(True)
    torch.manual_seed(seed)
    ref_loss = verl_actor_loss(loss_mode, z, labels, adv, old, reduction, ref=ref, beta=0.1, entropy_coef=0.01,
                               **verl_cfg)
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    x = logits.clone().requires_grad_(True)
    torch.manual_seed(seed)
    loss = ours_fn(x, labels, adv, old, ref_logprobs=ref, beta=0.1, entropy_coef=0.01, reduction=reduction,
                   backend=backend, **ours_cfg)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, ref_loss.detach(), ref_grad


CLIP_COV = dict(clip_cov_ratio=0.1, clip_cov_lb=0.5, clip_cov_ub=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "seq-mean-token-mean"])
def test_clip_cov_parity_with_verl_under_the_same_seed(backend, reduction):
    torch.manual_seed(0)
    logits, labels, adv, old, ref = cov_inputs()
    cov = covariances(logits, labels, adv)
    n_candidates = int(((cov > 0.5) & (cov < 4.0)).sum())
    # candidates well inside the bounds, more of them than are drawn (the draw matters)
    assert min((cov - 0.5).abs().min().item(), (cov - 4.0).abs().min().item()) > 1e-4
    assert n_candidates > int(0.1 * int((labels != -100).sum())) + 2
    results = {}
    for seed in (1, 2):
        loss, grad, ref_loss, ref_grad = both("clip_cov", clip_cov_loss, logits, labels, adv, old, ref, reduction,
                                              backend, seed, CLIP_COV, CLIP_COV)
        rel = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
        print(f"\nclip_cov vs verl {reduction} {backend} seed {seed}: |loss - verl| / |verl| = "
              f"{(abs(loss.double() - ref_loss) / ref_loss.abs()).item():.1e}; max|grad - verl| / max|grad| = {rel:.1e}")
        assert_loss_close(loss, ref_loss, adv)
        assert_grad_close(grad, ref_grad, adv, torch.float32)
        results[seed] = ref_grad
    assert not torch.allclose(results[1], results[2])  # another seed selects other tokens: the seed is matched


def test_clip_cov_default_ratio_selects_one_token_as_verl():
    torch.manual_seed(3)
    logits, labels, adv, old, ref = cov_inputs()
    cfg = dict(clip_cov_lb=0.5)
    loss, grad, ref_loss, ref_grad = both("clip_cov", clip_cov_loss, logits, labels, adv, old, ref, "mean", "torch", 5,
                                          cfg, cfg)
    assert_loss_close(loss, ref_loss, adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)


def test_clip_cov_generator_and_stats():
    """A torch.Generator seeded as the default one draws the same tokens and leaves the default one alone;
    ``clipped`` counts PPO's clipped tokens plus the drawn ones."""
    torch.manual_seed(4)
    logits, labels, adv, old, _ = cov_inputs()
    torch.manual_seed(7)
    loss_default, stats = clip_cov_loss(logits, labels, adv, old, backend="torch", return_stats=True, **CLIP_COV)
    state = torch.get_rng_state()
    # with stats too: the CPU sweep takes another reference when the entropy is needed, so like is compared with like
    loss_gen, _ = clip_cov_loss(logits, labels, adv, old, backend="torch", generator=torch.Generator().manual_seed(7),
                                return_stats=True, **CLIP_COV)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(loss_default, loss_gen)
    valid = labels != -100
    logp = reference.token_logprobs(logits.double(), labels, -100)
    ratio = torch.exp(logp - torch.where(valid, old.double(), 0.0))
    a = adv.double().expand(labels.shape)
    ppo_clipped = valid & (-a * ratio.clamp(0.8, 1.2) > -a * ratio)
    assert 0 < int(ppo_clipped.sum())
    assert int(stats.clipped.sum()) == int(ppo_clipped.sum()) + max(int(0.1 * int(valid.sum())), 1)
    assert bool((stats.clipped[ppo_clipped] == 1).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,ratio", [("mean", 0.1), ("seq-mean-token-sum", 2e-4)])
def test_kl_cov_parity_with_verl(backend, reduction, ratio):
    torch.manual_seed(5)
    logits, labels, adv, old, ref = cov_inputs()
    cov = covariances(logits, labels, adv).sort(descending=True).values
    k = max(int(ratio * cov.numel()), 1)
    assert (cov[k - 1] - cov[k]).item() > 1e-4  # the k-th largest is not a near tie
    cfg = dict(kl_cov_ratio=ratio, ppo_kl_coef=0.5)
    loss, grad, ref_loss, ref_grad = both("kl_cov", kl_cov_loss, logits, labels, adv, old, ref, reduction, backend, 0,
                                          cfg, cfg)
    rel = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    print(f"\nkl_cov vs verl {reduction} ratio {ratio} {backend}: |loss - verl| / |verl| = "
          f"{(abs(loss.double() - ref_loss) / ref_loss.abs()).item():.1e}; max|grad - verl| / max|grad| = {rel:.1e}")
    assert_loss_close(loss, ref_loss, adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)


def test_kl_cov_penalises_the_top_tokens():
    """The penalty changes the gradient of exactly k tokens (against the same loss with ppo_kl_coef=0)."""
    torch.manual_seed(6)
    logits, labels, adv, old, _ = cov_inputs()
    grads = []
    for coef in (0.0, 0.5):
        x = logits.clone().requires_grad_(True)
        kl_cov_loss(x, labels, adv, old, kl_cov_ratio=0.1, ppo_kl_coef=coef, backend="torch").backward()
        grads.append(x.grad)
    changed = (grads[0] != grads[1]).any(-1)
    assert int(changed.sum()) == int(0.1 * int((labels != -100).sum()))


def test_bad_input():
    logits, labels, adv, old, _ = cov_inputs(B=2, T=3, V=20)
    with pytest.raises(ValueError, match="clip_cov_lb"):
        clip_cov_loss(logits, labels, adv, old, clip_cov_lb=5.0, clip_cov_ub=5.0)
    for bad in (0.0, -1e-3, 1.5):
        with pytest.raises(ValueError, match="clip_cov_ratio"):
            clip_cov_loss(logits, labels, adv, old, clip_cov_ratio=bad)
        with pytest.raises(ValueError, match="kl_cov_ratio"):
            kl_cov_loss(logits, labels, adv, old, kl_cov_ratio=bad)
    with pytest.raises(TypeError, match="clip_cov_ub"):
        clip_cov_loss(logits, labels, adv, old, clip_cov_ub="5")
    with pytest.raises(TypeError, match="generator"):
        clip_cov_loss(logits, labels, adv, old, generator=0)
    with pytest.raises(ValueError, match="ppo_kl_coef"):
        kl_cov_loss(logits, labels, adv, old, ppo_kl_coef=-0.1)
    with pytest.raises(ValueError, match="epsilon_low"):
        clip_cov_loss(logits, labels, adv, old, epsilon_low=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_cov_stats_against_verl(backend):
    """logit_grad_norm: ‖∂ℓ_t/∂z_t‖ of each token's own term; verl's token-mean loss × the valid-token count
    holds it in row t (the selection is detached)."""
    torch.manual_seed(5)
    logits, labels, adv, old, _ = cov_inputs()
    valid = labels != -100
    z = logits.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(verl_actor_loss("kl_cov", z, labels, adv, old, "mean", kl_cov_ratio=0.1,
                                                  ppo_kl_coef=0.5) * valid.sum(), z)
    _, stats = kl_cov_loss(logits, labels, adv, old, kl_cov_ratio=0.1, ppo_kl_coef=0.5, backend=backend,
                           return_stats=True)
    norm = torch.where(valid, grad.norm(dim=-1), 0.0)
    torch.testing.assert_close(stats.logit_grad_norm.double(), norm, rtol=1e-5, atol=1e-6 * float(norm.max()))
    assert stats.clipped is None
