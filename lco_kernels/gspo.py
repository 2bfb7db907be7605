"""GSPO (Zheng et al. 2025, arXiv:2507.18071) on ``token_logprobs``: a loss the kernels do not fuse,
written in a few lines of PyTorch (README, "Your own loss").

GSPO's importance ratio belongs to the whole sequence, s = exp(mean_t(log p_t − log p_old,t)), which no
per-token head can form. On the per-token log-probs it is plain PyTorch; the N×V work stays in
``token_logprobs``' two sweeps (or ``fused_linear_token_logprobs``' chunks, without N×V logits).
As verl 0.9.1's ``compute_policy_loss_gspo``: the token-level straight-through ratio
s_t = sg(s)·p_t / sg(p_t) (value s, gradient s·∇log p_t), log s_t clamped at 10, and the clipped
surrogate max(−Ψ·s_t, −Ψ·clip(s_t, 1 − ε_low, 1 + ε_high)) per token.
"""
import torch

from ._validation import check_clip, check_options, per_token
from .functional import token_logprobs
from .fused_linear import fused_linear_token_logprobs
from .reductions import token_weights


def gspo_loss(logits, labels, advantages, old_logprobs, *, epsilon_low=3e-4, epsilon_high=4e-4, temperature=1.0,
              ignore_index=-100, loss_mask=None, reduction="seq-mean-token-mean", max_length=None, token_count=None,
              seq_count=None, backend="auto"):
    """GSPO's clipped sequence-ratio surrogate; sequences are the last dimension of ``labels``.

    advantages: per sequence (B, 1) or per token (B, T), as the other losses; old_logprobs: (B, T),
    the behaviour policy's log-probs of the labels. Defaults: the GSPO paper's ε (3e-4, 4e-4) and its
    aggregation, "seq-mean-token-mean" (any reduction of ``lco_loss`` is accepted, with its
    ``token_count`` / ``seq_count``). Other options as ``lco_loss``.
    """
    _check(logits, old_logprobs, epsilon_low, epsilon_high, temperature, ignore_index, reduction, max_length,
           token_count, seq_count, backend)
    logprobs = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, backend=backend)
    return _gspo(logprobs, labels, advantages, old_logprobs, epsilon_low, epsilon_high, ignore_index, loss_mask,
                 reduction, max_length, token_count, seq_count)


def fused_linear_gspo_loss(hidden, weight, labels, advantages, old_logprobs, *, bias=None, epsilon_low=3e-4,
                           epsilon_high=4e-4, temperature=1.0, ignore_index=-100, loss_mask=None,
                           reduction="seq-mean-token-mean", max_length=None, token_count=None, seq_count=None,
                           chunk_size=None, accum_dtype=torch.float32, backend="auto"):
    """``gspo_loss(hidden @ weight.T + bias, ...)`` without the N×V logits (``fused_linear_token_logprobs``)."""
    _check(hidden, old_logprobs, epsilon_low, epsilon_high, temperature, ignore_index, reduction, max_length,
           token_count, seq_count, backend)
    logprobs = fused_linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                           ignore_index=ignore_index, chunk_size=chunk_size,
                                           accum_dtype=accum_dtype, backend=backend)
    return _gspo(logprobs, labels, advantages, old_logprobs, epsilon_low, epsilon_high, ignore_index, loss_mask,
                 reduction, max_length, token_count, seq_count)


def _check(inputs, old_logprobs, epsilon_low, epsilon_high, temperature, ignore_index, reduction, max_length,
           token_count, seq_count, backend):
    check_clip(epsilon_low, epsilon_high, None)
    check_options(ignore_index=ignore_index, reduction=reduction, backend=backend, return_stats=False,
                  max_length=max_length, temperature=temperature, token_count=token_count, seq_count=seq_count,
                  device=getattr(inputs, "device", None))
    if not isinstance(old_logprobs, torch.Tensor):
        raise TypeError(f"old_logprobs must be a tensor (the behaviour policy's log-probs of the labels), "
                        f"got {type(old_logprobs).__name__}")


def _gspo(logprobs, labels, advantages, old_logprobs, epsilon_low, epsilon_high, ignore_index, loss_mask,
          reduction, max_length, token_count, seq_count):
    adv = per_token("advantages", advantages, labels).to(logprobs.dtype)
    old = per_token("old_logprobs", old_logprobs, labels, allow_number=False).to(logprobs.dtype)
    valid = labels != ignore_index
    if loss_mask is not None:
        valid = valid & (per_token("loss_mask", loss_mask, labels, allow_number=False, allow_bool=True) != 0)
    mask = valid.to(logprobs.dtype)
    # log s = mean over the sequence's valid tokens of log p_t − log p_old,t (masked tokens may hold anything)
    log_ratio = torch.where(valid, logprobs - old, 0.0)
    log_seq_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    # straight-through: the value is the sequence's ratio, the gradient that of log p_t
    log_s = torch.clamp(logprobs - logprobs.detach() + log_seq_ratio.detach(), max=10.0)
    s = torch.exp(log_s)
    per_token_loss = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - epsilon_low, 1 + epsilon_high))
    per_token_loss = torch.where(valid, per_token_loss, 0.0)
    if max_length is None:
        max_length = labels.shape[-1] if labels.dim() else 1
    weights = token_weights(valid, adv, reduction, max_length, token_count, seq_count)
    if weights is None:
        return per_token_loss
    return (per_token_loss.reshape(-1) * weights).sum()
