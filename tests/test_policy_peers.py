"""The per-token losses against each peer's own installed function, value and gradient w.r.t. the logits.

Peers, fed float64 log-probs of the same (rounded) logits through log_softmax, autograd for the gradient:
- verl 0.9.1: ``core_algos.get_policy_loss_fn(loss_mode)`` (sapo, dppo_tv, dppo_kl, dro, cispo) with its own
  ``agg_loss`` for every ``loss_agg_mode`` it has (SAPO: always seq-mean-token-mean, as verl forces);
- TRL 1.16: ``GRPOTrainer._compute_loss`` itself, on a stand-in trainer whose model returns those log-probs
  (loss types sapo and dapo, with β > 0 and ``use_bias_correction_kl`` on and off);
- Liger 0.8.5: ``LigerFusedLinearGRPOFunction.ppo_loss_fn`` (the chunked GRPO loss on per-token log-probs).

Each comparison prints the worst relative error (``python -m pytest -s tests/test_policy_peers.py``):
|loss − peer| / |peer| and max|grad − peer| / max|peer grad|. Where the peers disagree with each other
(SAPO's ±20 log-ratio clamp, SAPO's sequence normaliser) there is one test per peer showing which inputs
tell them apart.
"""
import collections
import types

import pytest
import torch

import reference
from helpers import BACKENDS, assert_grad_close, assert_loss_close
from lco_kernels import cispo_loss, dppo_loss, dro_loss, ppo_loss, sapo_loss

# our reduction -> verl's loss_agg_mode
VERL_AGG = {"mean": "token-mean", "sum": "token-sum", "seq-mean-token-mean": "seq-mean-token-mean",
            "seq-mean-token-sum": "seq-mean-token-sum", "seq-mean-token-sum-norm": "seq-mean-token-sum-norm"}
IGNORE = -100


def peer_inputs(B=4, T=6, V=257, far_ratios=False, padded_sequence=False, seed=0):
    """fp32 logits, labels (some ignored), per-sequence advantages of both signs, old and reference
    log-probs around the current ones (ratios on both sides of every clip); ``far_ratios``: two tokens
    with |log r| = 25 (past verl's ±20 clamp); ``padded_sequence``: the last sequence fully ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).float()
    probs = torch.softmax(logits.double().reshape(-1, V) * 1.5, -1)
    labels = torch.multinomial(probs, 1, generator=g).reshape(B, T)
    labels[torch.rand(B, T, generator=g) < 0.15] = IGNORE
    labels[:, 0] = labels[:, 0].clamp(min=0)
    if padded_sequence:
        labels[-1] = IGNORE
    adv = torch.randn(B, 1, generator=g) * 1.5
    adv[0] = adv[0].abs() + 0.1
    adv[1] = -adv[1].abs() - 0.1
    logp = reference.token_logprobs(logits.double(), labels, IGNORE)
    old = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    if far_ratios:
        old[0, 0] = float(logp[0, 0]) + 25.0
        old[1, 0] = float(logp[1, 0]) - 25.0
    return logits, labels, adv, old, ref


def _logp(z, labels, temperature=1.0):
    return reference.token_logprobs(z / temperature, labels, IGNORE)


def _peer(loss_of_logp, logits, labels):
    """(loss, grad) of a peer's loss on float64 log-probs of ``logits``."""
    z = logits.detach().double().requires_grad_(True)
    loss = loss_of_logp(_logp(z, labels), labels != IGNORE)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def _ours(fn, logits, labels, adv, old, backend, **kw):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, labels, adv, old, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _compare(what, ours, peer, adv, dtype=torch.float32):
    (loss, grad), (ref_loss, ref_grad) = ours, peer
    rel_loss = (abs(loss.double() - ref_loss) / ref_loss.abs().clamp(min=1e-30)).item()
    rel_grad = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
    print(f"\n{what}: loss {ref_loss.item():+.5f}, rel err loss {rel_loss:.1e}, grad {rel_grad:.1e}")
    if dtype == torch.float64:  # the reductions' weights are fp32
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)
    else:
        assert_loss_close(loss, ref_loss, adv)
        assert_grad_close(grad, ref_grad, adv, torch.float32)
    assert bool(ref_grad.abs().max() > 0)


# ---- verl 0.9.1 ----

def verl_loss(mode, reduction, labels, adv, old, **config):
    """verl's registered policy loss ``mode`` as a function of float64 log-probs (padding masked)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig
    dro_beta = config.pop("dro_beta", None)
    cfg = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                          loss_agg_mode=VERL_AGG[reduction],
                          policy_loss=PolicyLossConfig(loss_mode=mode, dro_beta=dro_beta), **config)
    fn = core_algos.get_policy_loss_fn(mode)

    def loss(logp, valid):
        old64 = torch.where(valid, old.double(), 0.0)
        return fn(old64, logp, adv.double().expand(labels.shape), valid.double(), VERL_AGG[reduction], cfg)[0]
    return loss


# (verl loss_mode, our function, our options, verl's config for them, the reductions verl applies)
VERL_CASES = {
    "sapo": ("sapo", sapo_loss, dict(tau_pos=1.3, tau_neg=0.8), dict(tau_pos=1.3, tau_neg=0.8),
             ("seq-mean-token-mean",)),
    "dppo_tv": ("dppo_tv", dppo_loss, dict(divergence="tv", delta_low=0.03, delta_high=0.04, clip_ratio_c=1.5),
                dict(clip_ratio_low=0.03, clip_ratio_high=0.04, clip_ratio_c=1.5), tuple(VERL_AGG)),
    "dppo_kl": ("dppo_kl", dppo_loss, dict(divergence="kl", delta_low=0.01, delta_high=0.02, clip_ratio_c=1.5),
                dict(clip_ratio_low=0.01, clip_ratio_high=0.02, clip_ratio_c=1.5), tuple(VERL_AGG)),
    "dro": ("dro", dro_loss, dict(dro_beta=0.4), dict(dro_beta=0.4), tuple(VERL_AGG)),
    "cispo": ("cispo", cispo_loss, dict(epsilon_low=0.15, epsilon_high=0.25),
              dict(clip_ratio_low=0.15, clip_ratio_high=0.25), tuple(VERL_AGG)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(VERL_CASES))
def test_parity_with_verl(case, backend):
    mode, fn, ours_kw, verl_kw, reductions = VERL_CASES[case]
    logits, labels, adv, old, _ = peer_inputs(far_ratios=True)
    for reduction in reductions:
        peer = _peer(verl_loss(mode, reduction, labels, adv, old, **verl_kw), logits, labels)
        ours = _ours(fn, logits, labels, adv, old, backend, reduction=reduction, max_length=labels.shape[-1],
                     **ours_kw)
        _compare(f"verl {mode} {backend} fp32 {reduction}", ours, peer, adv)


@pytest.mark.parametrize("case", list(VERL_CASES))
def test_parity_with_verl_float64(case):
    mode, fn, ours_kw, verl_kw, reductions = VERL_CASES[case]
    logits, labels, adv, old, _ = peer_inputs(far_ratios=True, seed=1)
    logits = logits.double()
    peer = _peer(verl_loss(mode, reductions[0], labels, adv, old, **verl_kw), logits, labels)
    ours = _ours(fn, logits, labels, adv, old, "torch", reduction=reductions[0], **ours_kw)
    _compare(f"verl {mode} torch fp64 {reductions[0]}", ours, peer, adv, torch.float64)


def test_dppo_masks_where_some_tokens_leave_the_region():
    """The parity inputs exercise both sides of DPPO's masks (else the test above could not fail on them)."""
    logits, labels, adv, old, _ = peer_inputs(far_ratios=True)
    logp = _logp(logits.double(), labels)
    valid = labels != IGNORE
    for divergence, (lo, hi) in (("tv", (0.03, 0.04)), ("kl", (0.01, 0.02))):
        _, outside = reference.policy.dppo_token_loss(logp, old.double(), adv.double(), divergence, lo, hi, 1.5)
        assert 0 < int((outside & valid).sum()) < int(valid.sum())


def test_sapo_log_ratio_clamp_follows_verl():
    """|log r| > 20: verl clamps (no gradient there), TRL and Liger do not. Ours is verl's on those tokens;
    TRL's unclamped gate's gradient there is below 3e-9·|Ψ| (r < e^−20, or σ(1 − σ) = 0 at r > e^20)."""
    logits, labels, adv, old, _ = peer_inputs(far_ratios=True)
    far = torch.zeros(labels.shape, dtype=torch.bool)
    far[0, 0] = far[1, 0] = True
    _, ours = _ours(sapo_loss, logits.double(), labels, adv, old, "torch")
    _, verl = _peer(verl_loss("sapo", "seq-mean-token-mean", labels, adv, old), logits, labels)
    _, trl = _peer(trl_loss("sapo", labels, adv, old, old), logits, labels)
    assert bool((ours[far] == 0).all()) and bool((verl[far] == 0).all())
    assert 0 < trl[far].abs().max().item() < 3e-9 * adv.abs().max().item()
    torch.testing.assert_close(ours[~far], trl[~far], rtol=1e-6, atol=1e-12)


# ---- TRL 1.16 and Liger 0.8.5 ----

def trl_loss(loss_type, labels, adv, old, ref, *, beta=0.0, bias_correction_kl=False, tau_pos=1.0, tau_neg=1.05,
             epsilon=0.2):
    """TRL's GRPOTrainer._compute_loss on a stand-in trainer: its model returns the float64 log-probs."""
    from trl import GRPOTrainer
    B, T = labels.shape

    def loss(logp, valid):
        mask = valid.long()
        metrics = collections.defaultdict(lambda: collections.defaultdict(list))
        accelerator = types.SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x,
                                            gather_for_metrics=lambda x: x, num_processes=1, sync_gradients=True)
        trainer = types.SimpleNamespace(
            _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
            beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon, use_vllm=False,
            args=types.SimpleNamespace(use_bias_correction_kl=bias_correction_kl, sapo_temperature_pos=tau_pos,
                                       sapo_temperature_neg=tau_neg, delta=None, steps_per_generation=1),
            model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
            _entropy_bonus_enabled=False, aux_loss_enabled=False, accelerator=accelerator, _metrics=metrics)
        inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.long),
                      completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                      advantages=adv.double()[:, 0], old_per_token_logps=torch.where(valid, old.double(), 0.0),
                      ref_per_token_logps=torch.where(valid, ref.double(), 0.0),
                      num_items_in_batch=mask.sum().double())
        return GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss


def liger_loss(loss_type, labels, adv, old, ref, *, beta=0.0, bias_correction_kl=False, tau_pos=1.0, tau_neg=1.05,
               epsilon=0.2):
    """Liger's chunked GRPO loss (``ppo_loss_fn``) on float64 per-token log-probs."""
    grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

    def loss(logp, valid):
        mask = valid.double()
        out, _ = grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn(
            logp, mask, adv.double()[:, 0], mask, ref_per_token_logps=torch.where(valid, ref.double(), 0.0),
            old_per_token_logps=torch.where(valid, old.double(), 0.0), epsilon_low=epsilon, epsilon_high=epsilon,
            beta=beta, loss_type=loss_type, sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg,
            use_bias_correction_kl=bias_correction_kl, num_items_in_batch=mask.sum())
        return out
    return loss


# (loss_type, our function, our reduction, options) — the options are TRL's / Liger's names mapped to ours
TRL_CASES = {
    "sapo": ("sapo", sapo_loss, "seq-mean-token-mean", dict(tau_pos=1.3, tau_neg=0.8)),
    "sapo+kl": ("sapo", sapo_loss, "seq-mean-token-mean", dict(tau_pos=1.3, tau_neg=0.8, beta=0.1)),
    "sapo+kl+bias": ("sapo", sapo_loss, "seq-mean-token-mean",
                     dict(tau_pos=1.3, tau_neg=0.8, beta=0.1, bias_correction_kl=True)),
    "dapo+kl+bias": ("dapo", ppo_loss, "mean", dict(beta=0.1, bias_correction_kl=True)),
    "grpo+kl+bias": ("grpo", ppo_loss, "seq-mean-token-mean", dict(beta=0.1, bias_correction_kl=True)),
}
PEERS = {"trl": trl_loss, "liger": liger_loss}


def _peer_kw(kw):
    return {k: v for k, v in kw.items() if k in ("beta", "bias_correction_kl", "tau_pos", "tau_neg")}


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("triton", torch.float32),
                                           ("torch", torch.float64)])
@pytest.mark.parametrize("case", list(TRL_CASES))
def test_parity_with_trl_and_liger(case, backend, dtype):
    loss_type, fn, reduction, kw = TRL_CASES[case]
    logits, labels, adv, old, ref = peer_inputs(seed=2 if dtype == torch.float32 else 3)
    logits = logits.to(dtype)
    ref_arg = dict(ref_logprobs=ref) if kw.get("beta") else {}
    ours = _ours(fn, logits, labels, adv, old, backend, reduction=reduction, **ref_arg, **kw)
    for peer, peer_loss in PEERS.items():
        expected = _peer(peer_loss(loss_type, labels, adv, old, ref, **_peer_kw(kw)), logits, labels)
        _compare(f"{peer} {case} {backend} {str(dtype)[6:]}", ours, expected, adv, dtype)


def test_bias_correction_changes_the_loss():
    """The bias-corrected KL is not the plain one on these inputs (so its parity above can fail)."""
    logits, labels, adv, old, ref = peer_inputs(seed=2)
    kw = dict(reduction="none", backend="torch")
    kl = sapo_loss(logits, labels, adv, old, ref_logprobs=ref, beta=0.1, **kw) - sapo_loss(logits, labels, adv, old,
                                                                                             **kw)
    corrected = sapo_loss(logits, labels, adv, old, ref_logprobs=ref, beta=0.1, bias_correction_kl=True, **kw)
    plain = kl + sapo_loss(logits, labels, adv, old, **kw)
    assert (corrected - plain).abs().max() > 0.2 * kl.abs().max()


def test_sapo_sequence_normaliser_per_peer():
    """A fully padded sequence: TRL and Liger divide by all B sequences (our default), verl by the
    non-empty ones (ours with seq_count = that number)."""
    logits, labels, adv, old, ref = peer_inputs(padded_sequence=True, seed=4)
    B = labels.shape[0]
    non_empty = int((labels != IGNORE).any(-1).sum())
    assert non_empty == B - 1
    for peer, seq_count in (("trl", None), ("liger", None), ("verl", non_empty)):
        if peer == "verl":
            expected = _peer(verl_loss("sapo", "seq-mean-token-mean", labels, adv, old), logits, labels)
        else:
            expected = _peer(PEERS[peer]("sapo", labels, adv, old, ref), logits, labels)
        ours = _ours(sapo_loss, logits.double(), labels, adv, old, "torch", seq_count=seq_count)
        _compare(f"{peer} sapo, one padded sequence, seq_count={seq_count}", ours, expected, adv, torch.float64)
    default = sapo_loss(logits.double(), labels, adv, old, backend="torch")
    verl_value = _peer(verl_loss("sapo", "seq-mean-token-mean", labels, adv, old), logits, labels)[0]
    torch.testing.assert_close(default * B / non_empty, verl_value, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dppo_kl_exact_log1mp_where_verl_keeps_the_token(backend):
    """p_old = 0.988, p_i = 1 − 1e-12: the exact binary KL is 0.267 > δ = 0.2 (Ψ > 0, p_i > p_old: masked,
    no gradient); verl's log((1 − p_old + 1e-8) / (1 − p_i + 1e-8)) makes it 0.156 and keeps the token."""
    logits = torch.tensor([[[27.631021, 0.0]]])    # log(1 − p_i) = −softplus(27.631021) ≈ log(1e-12)
    labels = torch.tensor([[0]])
    adv = torch.tensor([[1.0]])
    old = torch.log(torch.tensor([[0.988]]))
    kw = dict(divergence="kl", delta_low=0.2, delta_high=0.2, reduction="sum")
    loss, grad = _ours(dppo_loss, logits, labels, adv, old, backend, **kw)
    _, stats = dppo_loss(logits, labels, adv, old, backend=backend, return_stats=True, **kw)
    _, verl_grad = _peer(verl_loss("dppo_kl", "sum", labels, adv, old, clip_ratio_low=0.2, clip_ratio_high=0.2),
                         logits, labels)
    logp = _logp(logits.double(), labels)
    _, outside = reference.policy.dppo_token_loss(logp, old.double(), adv.double(), "kl", 0.2, 0.2, 3.0)
    assert bool(outside.all()) and stats.clipped.item() == 1.0 and loss.item() == 0.0
    assert bool((grad == 0).all()) and verl_grad.abs().max().item() > 1e-13
