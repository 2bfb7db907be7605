"""GSPO (Zheng et al. 2025, arXiv:2507.18071) on ``token_logprobs``: a loss the kernels do not fuse,
written in a few lines of PyTorch (README, "Your own loss").

GSPO's importance ratio belongs to the whole sequence, s = exp(mean_t(log p_t − log p_old,t)), which no
per-token head can form. On the per-token log-probs it is plain PyTorch; the N×V work stays in
``token_logprobs``' two sweeps (or ``fused_linear_token_logprobs``' chunks, without N×V logits).
As verl 0.9.1's ``compute_policy_loss_gspo``: the token-level straight-through ratio
s_t = sg(s)·p_t / sg(p_t) (value s, gradient s·∇log p_t), log s_t clamped at 10, and the clipped
surrogate max(−Ψ·s_t, −Ψ·clip(s_t, 1 − ε_low, 1 + ε_high)) per token. As in verl's actor, a KL penalty
β·KL(log p_t, ref_t) (the heads' ``kl_type`` estimators) and an entropy bonus −c·H_t are added per
token, before the reduction. The statistics come from the same sweep: ``logit_grad_norm`` is
|∂ℓ_t/∂log p_t|·‖e_i − p‖/τ, the second factor being the SFT head's own gradient norm.
"""
import torch

from .._plumbing import loss_spec, prepare_tokens
from .._validation import check_linear, check_logits_labels, check_options
from .per_token import _token_sweep
from ..fused_linear import _token_sweep as fused_linear_token_sweep
from ..stats import TokenStats
from ..torch_heads import _kl_term


def gspo_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=3e-4, epsilon_high=4e-4, ref_logprobs=None,
              beta=0.0, kl_type="k3", temperature=1.0, entropy_coef=0.0, ignore_index=-100, loss_mask=None,
              reduction="seq-mean-token-mean", max_length=None, token_count=None, seq_count=None, backend="auto",
              return_stats=False):
    """GSPO's clipped sequence-ratio surrogate; sequences are the last dimension of ``labels``.

    advantages: per sequence (B, 1) or per token (B, T), as the other losses; old_logprobs: (B, T),
    the behaviour policy's log-probs of the labels, or None on-policy (the ratio is then exactly 1: the
    current log-probs, detached, from the same sweep; no second pass to compute them). Defaults: the GSPO paper's ε (3e-4, 4e-4) and its
    aggregation, "seq-mean-token-mean" (any reduction of ``lco_loss`` is accepted, with its
    ``token_count`` / ``seq_count``). ``ref_logprobs``, ``beta``, ``kl_type``, ``entropy_coef`` and the
    other options as ``lco_loss``; with ``return_stats``, ``(loss, TokenStats)`` with logprobs, entropy,
    logit_grad_norm (of the token's own GSPO and KL terms) and clipped (1 where the sequence's clip took
    the token's gradient away).
    """
    check_logits_labels(logits, labels)
    spec, tokens = _prepare(logits, labels, advantages, old_logprobs, ref_logprobs, epsilon_low, epsilon_high, beta,
                            kl_type, temperature, entropy_coef, ignore_index, loss_mask, reduction, max_length,
                            token_count, seq_count, backend, return_stats)
    sweep = _token_sweep(logits, tokens.labels, temperature=temperature, ignore_index=ignore_index, backend=backend,
                         return_entropy=entropy_coef != 0, return_stats=return_stats)
    return _gspo(*sweep, tokens, spec, ignore_index)


def fused_linear_gspo_loss(hidden, weight, labels, advantages, old_logprobs, *, bias=None, epsilon_low=3e-4,
                           epsilon_high=4e-4, ref_logprobs=None, beta=0.0, kl_type="k3", temperature=1.0,
                           entropy_coef=0.0, ignore_index=-100, loss_mask=None, reduction="seq-mean-token-mean",
                           max_length=None, token_count=None, seq_count=None, chunk_size=None,
                           accum_dtype=torch.float32, backend="auto", return_stats=False):
    """``gspo_loss(hidden @ weight.T + bias, ...)`` without the N×V logits (``fused_linear_token_logprobs``)."""
    check_linear(hidden, weight, bias, labels, chunk_size, accum_dtype)
    spec, tokens = _prepare(hidden, labels, advantages, old_logprobs, ref_logprobs, epsilon_low, epsilon_high, beta,
                            kl_type, temperature, entropy_coef, ignore_index, loss_mask, reduction, max_length,
                            token_count, seq_count, backend, return_stats)
    sweep = fused_linear_token_sweep(hidden, weight, bias, tokens.labels, temperature, ignore_index, chunk_size,
                                     accum_dtype, backend, entropy_coef != 0, return_stats)
    return _gspo(*sweep, tokens, spec, ignore_index)


def _prepare(inputs, labels, advantages, old_logprobs, ref_logprobs, epsilon_low, epsilon_high, beta, kl_type,
             temperature, entropy_coef, ignore_index, loss_mask, reduction, max_length, token_count, seq_count, backend,
             return_stats):
    """(spec, Tokens), every argument checked before any sweep. GSPO takes PPO's per-token inputs
    (advantages, old log-probs, an optional reference) and PPO's ε / KL / temperature options, so PPO's
    spec (PG's on-policy, without old log-probs) checks them and ``prepare_tokens`` folds the loss mask
    and forms the reduction's weights."""
    if old_logprobs is not None and not isinstance(old_logprobs, torch.Tensor):
        raise TypeError(f"old_logprobs must be a tensor (the behaviour policy's log-probs of the labels) or None "
                        f"(on-policy), got {type(old_logprobs).__name__}")
    spec = loss_spec("pg" if old_logprobs is None else "ppo", old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, epsilon_low=epsilon_low,
                     epsilon_high=epsilon_high, beta=beta, kl_type=kl_type, temperature=temperature,
                     entropy_coef=entropy_coef)
    check_options(ignore_index=ignore_index, reduction=reduction, backend=backend, return_stats=return_stats,
                  max_length=max_length, temperature=temperature, entropy_coef=entropy_coef, token_count=token_count,
                  seq_count=seq_count, device=getattr(inputs, "device", None))
    return spec, prepare_tokens(spec, labels, advantages, old_logprobs, ref_logprobs, ignore_index=ignore_index,
                                reduction=reduction, loss_mask=loss_mask, max_length=max_length,
                                token_count=token_count, seq_count=seq_count)


def _gspo(logprobs, entropy, sweep_stats, tokens, spec, ignore_index):
    adv = tokens.advantages.to(logprobs.dtype)
    old = logprobs.detach() if tokens.old_logprobs is None else tokens.old_logprobs.to(logprobs.dtype)
    valid = tokens.labels != ignore_index
    mask = valid.to(logprobs.dtype)
    # log s = mean over the sequence's valid tokens of log p_t − log p_old,t (masked tokens may hold anything)
    log_ratio = torch.where(valid, logprobs - old, 0.0)
    log_seq_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).detach()
    # straight-through: the value is the sequence's ratio, the gradient that of log p_t
    s = torch.exp(torch.clamp(logprobs - logprobs.detach() + log_seq_ratio, max=10.0))
    pg_unclipped = -adv * s
    pg_clipped = -adv * torch.clamp(s, 1 - spec.epsilon_low, 1 + spec.epsilon_high)
    per_token_loss = torch.maximum(pg_unclipped, pg_clipped)
    # ∂(per-token loss)/∂log p_t for the statistics: −Ψ·s unless the clip or the clamp at 10 binds
    clipped = pg_clipped.detach() > pg_unclipped.detach()
    dloss = torch.where(clipped | (log_seq_ratio > 10.0), 0.0, -adv * s.detach())
    if spec.has_ref:
        # a harmless value where masked: a NaN there would reach the gradient through exp's backward (0·NaN)
        ref = torch.where(valid, tokens.ref_logprobs.to(logprobs.dtype), logprobs.detach())
        kl, dkl = _kl_term(logprobs, ref, spec.kl_type)
        per_token_loss = per_token_loss + spec.beta * kl
        dloss = dloss + spec.beta * dkl.detach()
    if spec.entropy_coef != 0:
        per_token_loss = per_token_loss - spec.entropy_coef * entropy
    per_token_loss = torch.where(valid, per_token_loss, 0.0)
    loss = per_token_loss if tokens.weights is None else (per_token_loss.reshape(-1) * tokens.weights).sum()
    if sweep_stats is None:
        return loss
    norm = sweep_stats.logit_grad_norm  # ‖e_i − p‖/τ: the SFT head's gradient norm
    stats = TokenStats(logprobs=sweep_stats.logprobs, entropy=sweep_stats.entropy,
                       logit_grad_norm=torch.where(valid, dloss.abs().to(norm.dtype) * norm, 0.0),
                       clipped=(valid & clipped).to(norm.dtype))
    return loss, stats
