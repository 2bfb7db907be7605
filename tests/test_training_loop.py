"""What an RL training loop needs, against the float64 references: temperature, entropy bonus, KL
estimators, global normalisers across micro-batches, verl's reductions, strict advantage shapes."""
import math

import pytest
import torch

import reference
from helpers import BACKENDS, assert_grad_close, assert_loss_close, make_inputs
from lco_kernels import fused_linear_policy_loss, lco_loss, pg_loss, ppo_loss, sft_loss
from lco_kernels.reductions import REDUCTIONS


def _inputs(shape, V, device, dtype=torch.float32):
    logits, labels, adv = make_inputs(shape, V, dtype, device)
    logp = reference.token_logprobs(logits.cpu(), labels.cpu(), -100)
    old = (logp + 0.3 * torch.randn(shape, dtype=torch.float64)).float().to(device)
    ref = (logp + 0.5 * torch.randn(shape, dtype=torch.float64)).float().to(device)
    return logits, labels, adv, old, ref


def _reference(kind, logits, labels, adv, old, reduction="mean", **kw):
    z = logits.detach().cpu().double().requires_grad_(True)
    _, loss = reference.policy_loss_reference(kind, z, labels.cpu(), None if kind == "sft" else adv.cpu(),
                                              None if old is None else old.cpu(), reduction=reduction, **kw)
    (grad,) = torch.autograd.grad(loss, z, torch.ones_like(loss))
    return loss.detach(), grad


CASES = [  # (kind, our call, reference options)
    ("lco", lambda z, y, a, o, r, **k: lco_loss(z, y, a, **k), {}),
    ("lco", lambda z, y, a, o, r, **k: lco_loss(z, y, a, old_logprobs=o, ref_logprobs=r, beta=0.1, **k),
     {"old": True, "ref_logprobs": True, "beta": 0.1}),
    ("ppo", lambda z, y, a, o, r, **k: ppo_loss(z, y, a, o, ref_logprobs=r, beta=0.05, kl_type="k2", **k),
     {"old": True, "ref_logprobs": True, "beta": 0.05, "kl_type": "k2"}),
    ("sft", lambda z, y, a, o, r, **k: sft_loss(z, y, **k), {}),
]


def _run(case, logits, labels, adv, old, ref, device, backend, reduction="mean", **options):
    kind, fn, ref_opts = case
    x = logits.clone().requires_grad_(True)
    loss = fn(x, labels, adv, old, ref, reduction=reduction, backend=backend, **options)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    opts = {k: v for k, v in ref_opts.items() if k != "old"}
    if opts.get("ref_logprobs") is True:
        opts["ref_logprobs"] = ref.cpu()
    want_loss, want_grad = _reference(kind, logits, labels, adv, old if ref_opts.get("old") else None, reduction,
                                      **opts, **options)
    return loss, grad, want_loss, want_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_temperature_is_the_loss_of_scaled_logits(case, backend, device):
    logits, labels, adv, old, ref = _inputs((3, 4), 1300, device)
    for temperature in (0.6, 1.7):
        loss, grad, want_loss, want_grad = _run(case, logits, labels, adv, old, ref, device, backend,
                                                temperature=temperature)
        assert_loss_close(loss, want_loss, adv.abs().max().clamp(min=1))
        assert_grad_close(grad, want_grad, adv.abs().max().clamp(min=1), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_entropy_bonus_has_the_exact_gradient(case, backend, device):
    """loss −= entropy_coef·H per token; the gradient equals autograd through the float64 entropy."""
    logits, labels, adv, old, ref = _inputs((2, 5), 1100, device)
    logits[0, 1, :200] = -torch.inf   # a masked vocabulary: p = 0 there, no NaN from 0·log 0
    for reduction in ("mean", "none"):
        loss, grad, want_loss, want_grad = _run(case, logits, labels, adv, old, ref, device, backend, reduction,
                                                entropy_coef=0.03, temperature=0.9)
        assert_loss_close(loss, want_loss, adv.abs().max().clamp(min=1))
        assert_grad_close(grad, want_grad, adv.abs().max().clamp(min=1), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", [r for r in REDUCTIONS if r not in ("none", "sign-mean")])
def test_micro_batches_with_global_counts_add_up_to_the_batch(reduction, backend, device):
    """A batch split into micro-batches, each called with the whole batch's counts, sums to the
    batch's loss and gradient (gradient accumulation / data parallelism)."""
    B, T, V = 4, 5, 1030
    logits, labels, adv, old, ref = _inputs((B, T), V, device)
    mask = torch.rand(B, T, device=device) > 0.2
    opts = dict(reduction=reduction, loss_mask=mask, max_length=7, backend=backend)
    x = logits.clone().requires_grad_(True)
    full = lco_loss(x, labels, adv, old_logprobs=old, **opts)
    full.backward()
    valid = (labels != -100) & mask
    counts = {"mean": dict(token_count=valid.sum()), "sum": {}}.get(reduction, dict(seq_count=B))
    y = logits.clone().requires_grad_(True)
    total = 0.0
    for part in (slice(0, 1), slice(1, 4)):
        micro = lco_loss(y[part], labels[part], adv[part], old_logprobs=old[part],
                         **{**opts, "loss_mask": mask[part]}, **counts)
        micro.backward()
        total = total + micro.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_fused_linear(backend, device):
    B, T, H, V = 4, 3, 16, 700
    hidden = torch.randn(B, T, H, device=device)
    weight = torch.randn(V, H, device=device) / 4
    labels = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, 1, device=device)
    full_h, full_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused_linear_policy_loss(full_h, full_w, labels, adv, reduction="seq-mean-token-mean", backend=backend).backward()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    for part in (slice(0, 2), slice(2, 4)):
        fused_linear_policy_loss(h[part], w, labels[part], adv[part], reduction="seq-mean-token-mean", seq_count=B,
                                 backend=backend).backward()
    torch.testing.assert_close(h.grad, full_h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, full_w.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_mean_token_sum_norm_as_verl(backend):
    """verl 0.9.1 and Liger's dr_grpo: the total over (number of sequences × max_length)."""
    loss = pg_loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 1),
                   reduction="seq-mean-token-sum-norm", backend=backend)
    assert math.isclose(float(loss), math.log(5) * 6 / (2 * 3), rel_tol=1e-6)  # 1.6094, not 3.2189


def test_token_mean_is_verls_name_for_mean():
    logits, labels, adv = make_inputs((2, 6), 300)
    assert torch.equal(lco_loss(logits, labels, adv, reduction="token-mean"), lco_loss(logits, labels, adv))


def test_per_sequence_advantages_must_keep_the_token_axis():
    """TRL's advantages are (B,): with (B, T) labels that is an error suggesting (B, 1), even when B == T."""
    logits, labels, _ = make_inputs((4, 4), 50)
    with pytest.raises(ValueError, match=r"advantages\[\.\.\., None\]"):
        lco_loss(logits, labels, torch.randn(4))
    with pytest.raises(ValueError, match="advantages"):
        lco_loss(logits, labels, torch.randn(4, 4, 1))
    with pytest.raises(ValueError, match="advantages is required"):
        pg_loss(logits, labels, None)
    with pytest.raises(TypeError, match="advantages"):
        lco_loss(logits, labels, torch.ones(4, 4, dtype=torch.bool))
    per_seq = torch.randn(4, 1)
    torch.testing.assert_close(lco_loss(logits, labels, per_seq), lco_loss(logits, labels, per_seq.expand(4, 4)))
    torch.testing.assert_close(lco_loss(logits, labels, torch.tensor(0.7)), lco_loss(logits, labels, 0.7))


def test_kl_estimators_equal_verls_own():
    """reference.policy.kl_penalty (the references' KL) against verl 0.9.1's kl_penalty, installed by .ci/run."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    logp = torch.randn(200, dtype=torch.float64) * 3 - 2
    ref = logp + torch.randn(200, dtype=torch.float64) * torch.tensor([0.1, 2.0, 30.0]).repeat_interleave(67)[:200]
    for ours, verls in (("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl"), ("abs", "abs")):
        torch.testing.assert_close(reference.policy.kl_penalty(logp, ref, ours),
                                   core_algos.kl_penalty(logp, ref, verls), rtol=1e-12, atol=1e-12)
