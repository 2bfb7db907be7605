"""gspo_loss against verl 0.9.1's own ``gspo`` policy loss (``core_algos.compute_policy_loss_gspo``).

verl is a test dependency, installed by .ci/run (``pip install --no-deps verl==0.9.1`` and the few
packages its import needs), as for tests/test_training_loop.py's KL check; ``import lco_kernels``
never imports it, and the tests here that do not compare with verl run without it. verl is fed float64
log-probs from log_softmax of the same (rounded) logits; the parity figures are printed by
``python -m pytest -s tests/test_gspo.py -k parity``. The KL and entropy terms are checked against verl's
actor loss built from the same float64 references (reference.policy's ``kl_penalty``, ``entropy``,
reference.aggregate), and the statistics against their float64 values (``-k float64``).
"""
import os

import pytest
import torch


import reference
from helpers import BACKENDS, assert_grad_close, assert_loss_close
from verl_actor import VERL_MODES, verl_actor_loss
from lco_kernels import fused_linear_gspo_loss, gspo_loss
from lco_kernels.diagnostics.traffic import count_traffic, summarize

def gspo_inputs(B=4, T=9, V=300, dtype=torch.float32, temperature=1.0, clip=False):
    """Logits, labels (some ignored, none all-ignored), per-sequence advantages and old log-probs that
    put some sequences inside GSPO's narrow clip range [1 − 3e-4, 1 + 4e-4] and some outside (at ``temperature``);
    with ``clip``, advantage signs that make those outside clipped (the 2nd above the range, the 3rd below)."""
    logits = (torch.randn(B, T, V, dtype=torch.float64) * 2).to(dtype)
    labels = torch.multinomial(torch.softmax(logits.double().reshape(-1, V), -1), 1).reshape(B, T)
    labels[:, 1:][torch.rand(B, T - 1) < 0.2] = -100
    adv = torch.randn(B, 1, dtype=torch.float64)
    if clip:
        adv = adv.abs() * torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64).repeat(B)[:B, None]
    logp = reference.token_logprobs(logits.double() / temperature, labels, -100)
    # per-sequence log-ratio offsets: inside, above, below, inside the clip range (plus token noise)
    offsets = torch.tensor([1e-4, 1e-3, -1e-3, -1e-4], dtype=torch.float64).repeat(B)[:B, None]
    old = logp - offsets + 1e-4 * torch.randn(B, T, dtype=torch.float64)
    old[labels == -100] = float("nan")  # whatever sits at padding must not matter
    return logits, labels, adv.float(), old.float()


def verl_loss(z, labels, adv, old, reduction, temperature=1.0, eps=(3e-4, 4e-4), **kw):
    """verl's actor loss with its own gspo policy loss, in float64 (tests/verl_actor.py)."""
    return verl_actor_loss("gspo", z, labels, adv, old, reduction, temperature=temperature, eps=eps, **kw)


def verl_gspo(logits, labels, adv, old, reduction, **kw):
    """verl's loss and its float64 gradient w.r.t. the logits."""
    x = logits.detach().double().requires_grad_(True)
    loss = verl_loss(x, labels, adv, old, reduction, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def reference_stats(logits, labels, adv, old, temperature=1.0, eps=(3e-4, 4e-4), **kl):
    """Float64 per-token log-probs, entropy, ‖∂ℓ_t/∂z_t‖ of each token's own GSPO and KL terms, and clipped.

    The norm: verl's token-mean loss is Σ_t ℓ_t / N and ℓ_t reaches the logits only through its own row's
    log p_t (the sequence ratio is detached), so N × its gradient holds ∂ℓ_t/∂z_t in row t."""
    x = logits.detach().double().requires_grad_(True)
    valid = labels != -100
    (grad,) = torch.autograd.grad(verl_loss(x, labels, adv, old, "mean", temperature, eps, **kl), x)
    z = logits.double() / temperature
    logp = reference.token_logprobs(z, labels, -100)
    s = seq_ratios(logits / temperature, labels, old)[:, None]
    clipped = ((adv > 0) & (s > 1 + eps[1])) | ((adv < 0) & (s < 1 - eps[0]))
    return {"logprobs": torch.where(valid, logp, 0.0), "entropy": torch.where(valid, reference.policy.entropy(z), 0.0),
            "logit_grad_norm": (grad * valid.sum()).norm(dim=-1), "clipped": (valid & clipped).double()}


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
    ref_loss, ref_grad = verl_gspo(logits, labels, adv, old, reduction)
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


def ref_inputs(logits, labels, temperature):
    """Reference log-probs half a nat or so off the current ones (NaN at padding: it must not matter)."""
    logp = reference.token_logprobs(logits.double() / temperature, labels, -100)
    ref = (logp + 0.5 * torch.randn(logp.shape, dtype=torch.float64)).float()
    return ref.masked_fill(labels == -100, float("nan"))


def check_stats(stats, expected, rtol, atol_factor, what):
    """Each statistic against its float64 value (atol: ``atol_factor`` × its largest element); clipped exactly."""
    for name, value in expected.items():
        ours = getattr(stats, name)
        assert ours.shape == value.shape and ours.dtype == torch.float32, name
        diff = (ours.double() - value).abs().max().item()
        print(f"{what} {name}: max |ours - float64| = {diff:.1e} (max |value| {value.abs().max().item():.2g})")
        if name == "clipped":
            assert torch.equal(ours.double(), value) and 0 < value.sum() < value.numel()
        else:
            torch.testing.assert_close(ours.double(), value, rtol=rtol, atol=atol_factor * value.abs().max().item())
    assert stats.target_prob is None and stats.clamped is None


# each kl_type with another reduction (the reductions themselves are covered above)
KL_CASES = {"k1": "mean", "k2": "seq-mean-token-sum", "k3": "seq-mean-token-mean", "abs": "seq-mean-token-sum-norm"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_type", list(KL_CASES))
def test_kl_entropy_and_stats_against_float64(backend, kl_type):
    """β·KL and −c·H per token against verl's actor loss in float64 (loss and gradient, SPEC §4), and every
    statistic against its float64 value, at a temperature."""
    reduction, tau = KL_CASES[kl_type], 0.8
    logits, labels, adv, old = gspo_inputs(temperature=tau, clip=True)
    kl = dict(ref=ref_inputs(logits, labels, tau), beta=0.3, kl_type=kl_type)
    ref_loss, ref_grad = verl_gspo(logits, labels, adv, old, reduction, temperature=tau, entropy_coef=0.05, **kl)
    x = logits.clone().requires_grad_(True)
    loss, stats = gspo_loss(x, labels, adv, old, ref_logprobs=kl["ref"], beta=0.3, kl_type=kl_type, temperature=tau,
                            entropy_coef=0.05, reduction=reduction, backend=backend, return_stats=True)
    (grad,) = torch.autograd.grad(loss, x)
    rel = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    print(f"\n{backend} {kl_type} {reduction}: |loss - float64| = {abs(loss.double() - ref_loss).item():.1e}; "
          f"max|grad - float64| / max|grad| = {rel:.1e}")
    assert_loss_close(loss, ref_loss, adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)
    check_stats(stats, reference_stats(logits, labels, adv, old, temperature=tau, **kl), 1e-5, 1e-6, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_kl_entropy_and_stats_against_float64(backend):
    """fused_linear_gspo_loss with KL, entropy and statistics against the same float64 reference on
    hidden @ weight.T + bias (tolerances of tests/test_fused_linear.py: the projection rounds in fp32)."""
    B, T, H, V, tau = 4, 7, 16, 130, 0.9
    hidden, weight, bias = torch.randn(B, T, H), torch.randn(V, H) * 0.5, torch.randn(V) * 0.1
    labels = torch.randint(0, V, (B, T))
    labels[:, 1:][torch.rand(B, T - 1) < 0.2] = -100
    adv = torch.randn(B, 1).abs() * torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])  # as gspo_inputs(clip=True)
    leaves = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    z64 = leaves[0] @ leaves[1].T + leaves[2]
    logp = reference.token_logprobs(z64.detach() / tau, labels, -100)
    offsets = torch.tensor([1e-4, 1e-3, -1e-3, -1e-4], dtype=torch.float64)[:, None]  # as gspo_inputs
    old = (logp - offsets + 1e-4 * torch.randn(B, T, dtype=torch.float64)).float()
    kl = dict(ref=ref_inputs(z64.detach(), labels, tau), beta=0.2, kl_type="k3")
    ref_loss = verl_loss(z64, labels, adv, old, "mean", tau, entropy_coef=0.03, **kl)
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    xs = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, stats = fused_linear_gspo_loss(xs[0], xs[1], labels, adv, old, bias=xs[2], ref_logprobs=kl["ref"], beta=0.2,
                                         temperature=tau, entropy_coef=0.03, reduction="mean", chunk_size=5,
                                         backend=backend, return_stats=True)
    grads = torch.autograd.grad(loss, xs)
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-7)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        print(f"\nfused linear {backend} grad_{name}: max|diff| / max|grad| = "
              f"{((g.double() - r).abs().max() / r.abs().max()).item():.1e}")
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
    check_stats(stats, reference_stats(z64.detach(), labels, adv, old, temperature=tau, **kl), 1e-4, 1e-5,
                f"fused linear {backend}")


def test_loss_mask_is_ignore_index():
    """A masked token is an ignored one: same loss and gradient, zero statistics there."""
    logits, labels, adv, old = gspo_inputs(B=3)
    mask = torch.rand(labels.shape) < 0.8
    mask[:, 0] = True
    results = []
    for lab, m in ((labels, mask), (labels.masked_fill(~mask, -100), None)):
        x = logits.clone().requires_grad_(True)
        loss, stats = gspo_loss(x, lab, adv, old.masked_fill(~mask, float("nan")), loss_mask=m, backend="torch",
                                entropy_coef=0.1, return_stats=True)
        results.append((loss, torch.autograd.grad(loss, x)[0], stats))
    (loss, grad, stats), (ref_loss, ref_grad, ref_stats) = results
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    for name in ("logprobs", "entropy", "logit_grad_norm", "clipped"):
        assert torch.equal(getattr(stats, name), getattr(ref_stats, name)), name
        assert bool((getattr(stats, name)[~mask] == 0).all()), name


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_without_old_logprobs(backend):
    """old_logprobs=None is the ratio 1 exactly: the same loss, gradient and statistics as passing the
    current log-probs (float64 reference), with KL, entropy bonus and temperature; fused-linear too."""
    torch.manual_seed(3)
    logits, labels, adv, _ = gspo_inputs(B=3, T=5, V=64)
    ref = torch.randn(labels.shape) - 3.0
    options = dict(ref_logprobs=ref, beta=0.1, entropy_coef=0.02, temperature=0.8, backend=backend)
    current = reference.token_logprobs(logits.double() / 0.8, labels, -100).float()
    z1, z2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    loss1, stats1 = gspo_loss(z1, labels, adv, current, return_stats=True, **options)
    loss2, stats2 = gspo_loss(z2, labels, adv, None, return_stats=True, **options)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(loss2, loss1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(z2.grad, z1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats2.logit_grad_norm, stats1.logit_grad_norm, rtol=1e-5, atol=1e-7)
    assert not stats2.clipped.any()
    hidden, weight = torch.randn(3, 5, 16), torch.randn(64, 16) / 4
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    current = reference.token_logprobs((hidden.double() @ weight.double().T) / 0.8, labels, -100).float()
    fused_linear_gspo_loss(h1, weight, labels, adv, current, **options).backward()
    fused_linear_gspo_loss(h2, weight, labels, adv, None, **options).backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)


def test_bad_input():
    logits, labels, adv, old = gspo_inputs(B=2, T=3, V=20)
    with pytest.raises(TypeError, match="old_logprobs"):
        gspo_loss(logits, labels, adv, [0.0] * 3)
    with pytest.raises(ValueError, match="epsilon_low"):
        gspo_loss(logits, labels, adv, old, epsilon_low=1.5)
    with pytest.raises(ValueError, match="reduction"):
        gspo_loss(logits, labels, adv, old, reduction="seq-sum")
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(logits, labels, torch.randn(3, 1), old)
    with pytest.raises(ValueError, match="ref_logprobs"):
        gspo_loss(logits, labels, adv, old, beta=0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        gspo_loss(logits, labels, adv, old, ref_logprobs=old[:, :1].expand(2, 2), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        gspo_loss(logits, labels, adv, old, ref_logprobs=old, beta=-0.1)
    with pytest.raises(ValueError, match="kl_type"):
        gspo_loss(logits, labels, adv, old, ref_logprobs=old, beta=0.1, kl_type="k4")
    with pytest.raises(TypeError, match="entropy_coef"):
        gspo_loss(logits, labels, adv, old, entropy_coef="0.1")
    with pytest.raises(TypeError, match="return_stats"):
        gspo_loss(logits, labels, adv, old, return_stats=1)
    with pytest.raises(ValueError, match="loss_mask"):
        gspo_loss(logits, labels, adv, old, loss_mask=torch.ones(2, 2))
    hidden, weight = torch.randn(2, 3, 4), torch.randn(20, 4)
    with pytest.raises(ValueError, match="ref_logprobs"):
        fused_linear_gspo_loss(hidden, weight, labels, adv, old, beta=0.1)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_gspo_loss(hidden, weight[:, :3], labels, adv, old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_corrected_kl_as_trl_sequence_level(backend):
    """bias_correction_kl: TRL's loss_type="grpo" with importance_sampling_level="sequence" and
    use_bias_correction_kl, in float64 as TRL's _compute_loss writes it (k3 × the sequence's coef_1 =
    exp(mean log-ratio), differentiable; its "grpo" aggregation: our "seq-mean-token-mean")."""
    logits, labels, adv, old = gspo_inputs(clip=True)
    ref = ref_inputs(logits, labels, 1.0)
    z = logits.double().requires_grad_(True)
    logp = reference.token_logprobs(z, labels, -100)
    mask = (labels != -100).double()
    log_ratio = logp - torch.where(mask > 0, old.double(), 0.0)
    coef_1 = torch.exp((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0))
    coef_2 = torch.clamp(coef_1, 1 - 3e-4, 1 + 4e-4)
    d = torch.where(mask > 0, ref.double(), 0.0) - logp
    kl = (torch.exp(d) - d - 1) * coef_1
    per_token = -torch.min(coef_1 * adv.double(), coef_2 * adv.double()) + 0.2 * kl
    ref_loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    (ref_grad,) = torch.autograd.grad(ref_loss, z)
    loss, grad = ours(logits, labels, adv, old, "seq-mean-token-mean", backend, ref_logprobs=ref, beta=0.2,
                      bias_correction_kl=True)
    print(f"\ngspo bias-corrected KL vs TRL {backend}: max|grad - TRL| / max|grad| = "
          f"{((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item():.1e}")
    assert_loss_close(loss, ref_loss.detach(), adv)
    assert_grad_close(grad, ref_grad, adv, torch.float32)
