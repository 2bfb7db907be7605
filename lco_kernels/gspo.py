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

from ._plumbing import loss_spec, prepare_tokens
from ._validation import check_clip, check_kl, check_linear, check_logits_labels, check_options, per_token
from .functional import _token_sweep
from .fused_linear import _apply
from .reductions import token_weights
from .registry import KL_NAMES
from .stats import TokenStats
from .torch_heads import _kl_term


def gspo_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=3e-4, epsilon_high=4e-4, ref_logprobs=None,
              beta=0.0, kl_type="k3", temperature=1.0, entropy_coef=0.0, ignore_index=-100, loss_mask=None,
              reduction="seq-mean-token-mean", max_length=None, token_count=None, seq_count=None, backend="auto",
              return_stats=False):
    """GSPO's clipped sequence-ratio surrogate; sequences are the last dimension of ``labels``.

    advantages: per sequence (B, 1) or per token (B, T), as the other losses; old_logprobs: (B, T),
    the behaviour policy's log-probs of the labels. Defaults: the GSPO paper's ε (3e-4, 4e-4) and its
    aggregation, "seq-mean-token-mean" (any reduction of ``lco_loss`` is accepted, with its
    ``token_count`` / ``seq_count``). ``ref_logprobs``, ``beta``, ``kl_type``, ``entropy_coef`` and the
    other options as ``lco_loss``; with ``return_stats``, ``(loss, TokenStats)`` with logprobs, entropy,
    logit_grad_norm (of the token's own GSPO and KL terms) and clipped (1 where the sequence's clip took
    the token's gradient away).
    """
    _check(logits, old_logprobs, ref_logprobs, epsilon_low, epsilon_high, beta, kl_type, temperature, entropy_coef,
           ignore_index, reduction, max_length, token_count, seq_count, backend, return_stats)
    check_logits_labels(logits, labels)
    tokens = _per_token(labels, advantages, old_logprobs, ref_logprobs, beta, loss_mask, ignore_index)
    sweep = _token_sweep(logits, tokens[0], temperature=temperature, ignore_index=ignore_index, backend=backend,
                         return_entropy=entropy_coef != 0, return_stats=return_stats)
    return _gspo(*sweep, *tokens, epsilon_low, epsilon_high, beta, kl_type, entropy_coef, ignore_index, reduction,
                 max_length, token_count, seq_count)


def fused_linear_gspo_loss(hidden, weight, labels, advantages, old_logprobs, *, bias=None, epsilon_low=3e-4,
                           epsilon_high=4e-4, ref_logprobs=None, beta=0.0, kl_type="k3", temperature=1.0,
                           entropy_coef=0.0, ignore_index=-100, loss_mask=None, reduction="seq-mean-token-mean",
                           max_length=None, token_count=None, seq_count=None, chunk_size=None,
                           accum_dtype=torch.float32, backend="auto", return_stats=False):
    """``gspo_loss(hidden @ weight.T + bias, ...)`` without the N×V logits (``fused_linear_token_logprobs``)."""
    _check(hidden, old_logprobs, ref_logprobs, epsilon_low, epsilon_high, beta, kl_type, temperature, entropy_coef,
           ignore_index, reduction, max_length, token_count, seq_count, backend, return_stats)
    check_linear(hidden, weight, bias, labels, chunk_size, accum_dtype)
    tokens = _per_token(labels, advantages, old_logprobs, ref_logprobs, beta, loss_mask, ignore_index)
    # fused_linear_token_logprobs' pass, with the SFT head's statistics as _token_sweep hands them out
    spec = loss_spec("sft", temperature=temperature)
    rows = prepare_tokens(spec, tokens[0], None, None, None, ignore_index=ignore_index, reduction="none",
                          loss_mask=None, max_length=None, token_count=None, seq_count=None)
    neg_logprobs, entropy, stats = _apply(hidden, weight, bias, rows, spec, ignore_index, chunk_size, accum_dtype,
                                          backend, return_stats, entropy_coef != 0)
    stats = TokenStats.from_rows(stats, labels.shape, spec) if return_stats else None
    return _gspo(-neg_logprobs, entropy, stats, *tokens, epsilon_low, epsilon_high, beta, kl_type, entropy_coef,
                 ignore_index, reduction, max_length, token_count, seq_count)


def _check(inputs, old_logprobs, ref_logprobs, epsilon_low, epsilon_high, beta, kl_type, temperature, entropy_coef,
           ignore_index, reduction, max_length, token_count, seq_count, backend, return_stats):
    check_clip(epsilon_low, epsilon_high, None)
    check_kl(beta, kl_type)
    check_options(ignore_index=ignore_index, reduction=reduction, backend=backend, return_stats=return_stats,
                  max_length=max_length, temperature=temperature, entropy_coef=entropy_coef, token_count=token_count,
                  seq_count=seq_count, device=getattr(inputs, "device", None))
    if not isinstance(old_logprobs, torch.Tensor):
        raise TypeError(f"old_logprobs must be a tensor (the behaviour policy's log-probs of the labels), "
                        f"got {type(old_logprobs).__name__}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference policy's log-probs of the labels)")


def _per_token(labels, advantages, old_logprobs, ref_logprobs, beta, loss_mask, ignore_index):
    """(labels, advantages, old, ref) in labels' shape, checked before any sweep; tokens where ``loss_mask``
    is 0 become ``ignore_index`` (as the fused losses fold it)."""
    adv = per_token("advantages", advantages, labels)
    old = per_token("old_logprobs", old_logprobs, labels, allow_number=False)
    ref = per_token("ref_logprobs", ref_logprobs, labels, allow_number=False) if beta > 0 else None
    if loss_mask is not None:
        mask = per_token("loss_mask", loss_mask, labels, allow_number=False, allow_bool=True)
        labels = labels.masked_fill(mask == 0, ignore_index)
    return labels, adv, old, ref


def _gspo(logprobs, entropy, sweep_stats, labels, adv, old, ref, epsilon_low, epsilon_high, beta, kl_type,
          entropy_coef, ignore_index, reduction, max_length, token_count, seq_count):
    adv, old = adv.to(logprobs.dtype), old.to(logprobs.dtype)
    valid = labels != ignore_index
    mask = valid.to(logprobs.dtype)
    # log s = mean over the sequence's valid tokens of log p_t − log p_old,t (masked tokens may hold anything)
    log_ratio = torch.where(valid, logprobs - old, 0.0)
    log_seq_ratio = (log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).detach()
    # straight-through: the value is the sequence's ratio, the gradient that of log p_t
    s = torch.exp(torch.clamp(logprobs - logprobs.detach() + log_seq_ratio, max=10.0))
    pg_unclipped, pg_clipped = -adv * s, -adv * torch.clamp(s, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = torch.maximum(pg_unclipped, pg_clipped)
    # ∂(per-token loss)/∂log p_t for the statistics: −Ψ·s unless the clip or the clamp at 10 binds
    clipped = pg_clipped.detach() > pg_unclipped.detach()
    dloss = torch.where(clipped | (log_seq_ratio > 10.0), 0.0, -adv * s.detach())
    if beta > 0:
        # a harmless value where masked: a NaN there would reach the gradient through exp's backward (0·NaN)
        kl, dkl = _kl_term(logprobs, torch.where(valid, ref.to(logprobs.dtype), logprobs.detach()), KL_NAMES[kl_type])
        per_token_loss = per_token_loss + beta * kl
        dloss = dloss + beta * dkl.detach()
    if entropy_coef != 0:
        per_token_loss = per_token_loss - entropy_coef * entropy
    per_token_loss = torch.where(valid, per_token_loss, 0.0)
    if max_length is None:
        max_length = labels.shape[-1] if labels.dim() else 1
    weights = token_weights(valid, adv, reduction, max_length, token_count, seq_count)
    loss = per_token_loss if weights is None else (per_token_loss.reshape(-1) * weights).sum()
    if sweep_stats is None:
        return loss
    norm = sweep_stats.logit_grad_norm  # ‖e_i − p‖/τ: the SFT head's gradient norm
    stats = TokenStats(logprobs=sweep_stats.logprobs, entropy=sweep_stats.entropy,
                       logit_grad_norm=torch.where(valid, dloss.abs().to(norm.dtype) * norm, 0.0),
                       clipped=(valid & clipped).to(norm.dtype))
    return loss, stats
